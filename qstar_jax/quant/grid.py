"""QuEST's zero-free symmetric grid (the one implementation) and its Gaussian-MSE scale.

With `sigma = sqrt(mean(x_h^2))` per row, `s = alpha_b sigma` and step `D = 2 s / (2^b - 1)`,
the quantizer is

  q(x_h) = round(clip(x_h, -s, s) / D + 1/2) * D - D/2     (ties rounded up),

a nearest-level quantizer onto the 2^b levels `+-D/2, +-3D/2, ..., +-s` (no zero level; `s` is
the outermost level, not a clip edge). `quest_grid` / `QuestGrid` compute it; every
quantizer, kernel reference, kernel epilogue and weight converter of the project calls them.

The integer code (one convention everywhere): the signed integer
`c = round(clip(x_h, -s, s) / D + 1/2) - 1` in `[-2^(b-1), 2^(b-1) - 1]`, with value
`q = (c + 1/2) D`; `2c + 1` is the level's odd integer `q / (D/2)`. int8 stores c as it is
(every b <= 8), int4 nibbles store it in two's complement (`qstar_jax.kernels.pack_int4`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "QuestGrid",
  "quest_grid",
  "grid_values",
  "gaussian_mse_scale",
  "gaussian_quantization_mse",
  "check_bits",
  "QUEST_ALPHAS",
]

# The constants in QuEST's code (for comparison in tests; this module derives its own).
QUEST_ALPHAS = (0.7979, 1.4935, 2.0511, 2.5139, 2.9161, 3.2766, 3.6010, 3.8849)


def check_bits(bits: int, name: str = "bits") -> None:
  """Raises ValueError unless `bits` is an int in 1..8."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ValueError(f"{name}={bits!r}: expected an int in 1..8")


def _phi(x: float) -> float:
  return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) if math.isfinite(x) else 0.0


def _gauss_cdf_diff(a: float, b: float) -> float:
  # P(a < x < b) for x ~ N(0, 1), accurate in both tails (erfc on the far side).
  if a >= 0:
    return 0.5 * (math.erfc(a / math.sqrt(2)) - math.erfc(b / math.sqrt(2)))
  if b <= 0:
    return 0.5 * (math.erfc(-b / math.sqrt(2)) - math.erfc(-a / math.sqrt(2)))
  return 1.0 - 0.5 * math.erfc(-a / math.sqrt(2)) - 0.5 * math.erfc(b / math.sqrt(2))


def _cell_mse(a: float, b: float, c: float) -> float:
  """E[(x - c)^2 ; a < x < b], x ~ N(0, 1), in closed form.

  With P = Phi(b) - Phi(a): int x phi = phi(a) - phi(b); int x^2 phi = P + a phi(a) - b phi(b)
  (the boundary terms vanish at +-inf). So the integral is
  P (1 + c^2) + a phi(a) - b phi(b) - 2 c (phi(a) - phi(b)).
  """
  p = _gauss_cdf_diff(a, b)
  pa, pb = _phi(a), _phi(b)
  apa = a * pa if math.isfinite(a) else 0.0
  bpb = b * pb if math.isfinite(b) else 0.0
  return p * (1.0 + c * c) + apa - bpb - 2.0 * c * (pa - pb)


def gaussian_quantization_mse(alpha: float, bits: int) -> float:
  """E[(x - q(x))^2] for x ~ N(0, 1) on the zero-free 2^b-level grid with outermost level alpha.

  Exact up to float64 rounding: the expectation is a sum over the 2^b quantization cells of
  closed-form Gaussian integrals (no sampling). Cell k (level `(k + 1/2) D`, k = -2^(b-1) ..
  2^(b-1) - 1) spans `[k D, (k + 1) D]`, the two outer cells extend to -inf / +inf.
  """
  check_bits(bits)
  if not alpha > 0:
    raise ValueError(f"alpha={alpha!r}: expected > 0")
  n = 2**bits
  step = 2.0 * alpha / (n - 1)
  half = n // 2
  total = 0.0
  for k in range(-half, half):
    lo = -math.inf if k == -half else k * step
    hi = math.inf if k == half - 1 else (k + 1) * step
    total += _cell_mse(lo, hi, (k + 0.5) * step)
  return total


@functools.cache
def gaussian_mse_scale(bits: int) -> float:
  """The MSE-optimal outermost level alpha_b for N(0, 1) inputs on QuEST's zero-free grid.

  `alpha_b = argmin_alpha E[(x - q_alpha(x))^2]`, x ~ N(0, 1), found by a coarse grid search
  followed by golden-section refinement to 1e-10 on the exact (closed-form) MSE. For b = 1 the
  optimum is E|x| = sqrt(2/pi) = 0.79788. Cached per b.

  References: Panferov et al. 2025 (QuEST), Sec. 3; their code lists 0.7979, 1.4935, 2.0511,
  2.5139, 2.9161, 3.2766, 3.6010, 3.8849 for b = 1..8.
  """
  check_bits(bits)
  f = lambda a: gaussian_quantization_mse(a, int(bits))
  grid = np.linspace(0.05, 6.0, 1191)
  values = [f(a) for a in grid]
  i = int(np.argmin(values))
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
  ratio = (math.sqrt(5.0) - 1.0) / 2.0
  c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
  fc, fd = f(c), f(d)
  while hi - lo > 1e-10:
    if fc < fd:
      hi, d, fd = d, c, fc
      c = hi - ratio * (hi - lo)
      fc = f(c)
    else:
      lo, c, fc = c, d, fd
      d = lo + ratio * (hi - lo)
      fd = f(d)
  return float(0.5 * (lo + hi))


# Floor of the RMS scale: an all-zero row quantizes to +-D/2 with a tiny D instead of 0/0.
_MIN_SIGMA = 1e-12


class QuestGrid(NamedTuple):
  """QuEST's b-bit grid of each row: its RMS scale, outermost level and step.

  Built by `quest_grid(x_h, bits)` (sigma from the rows) or `QuestGrid.from_sigma` (a
  precomputed sigma, e.g. the Pallas kernel's, accumulated over Hadamard blocks); `codes`
  quantizes values onto it, `values` maps codes back.
  """

  sigma: jax.Array  # [..., 1] float32 RMS scale of the row, at least 1e-12
  scale: jax.Array  # [..., 1] float32 outermost level s = alpha_b sigma
  step: jax.Array  # [..., 1] float32 grid step D = 2 s / (2^b - 1)

  @classmethod
  def from_sigma(cls, sigma: jax.Array, bits: int) -> QuestGrid:
    """The grid of rows with RMS scale `sigma` [..., 1] (clamped at 1e-12), used as given."""
    check_bits(bits)
    sigma = jnp.maximum(sigma, _MIN_SIGMA)
    scale = gaussian_mse_scale(bits) * sigma
    return cls(sigma, scale, 2.0 * scale / (2**bits - 1))

  def codes(self, x_h: jax.Array) -> jax.Array:
    """float32 [..., K] signed integer codes `c = floor(clip(x_h, -s, s) / D + 1) - 1`.

    That is `round(clip / D + 1/2) - 1` with ties rounded up (x_h an exact multiple of D,
    e.g. 0, goes to the level above; the Pallas kernels run this same expression, and Triton
    has no round-to-nearest-even). `c` lies in `[-2^(b-1), 2^(b-1) - 1]`; its value is
    `(c + 1/2) D` and `2c + 1` is the level's odd integer `q / (D/2)`.
    """
    x_h = x_h.astype(jnp.float32)
    return jnp.floor(jnp.clip(x_h, -self.scale, self.scale) / self.step + 1.0) - 1.0

  def values(self, codes: jax.Array) -> jax.Array:
    """float32 [..., K] quantized values `q = (c + 1/2) D` of codes on this grid."""
    return grid_values(codes, self.step)


def quest_grid(x_h: jax.Array, bits: int) -> QuestGrid:
  """The b-bit grid of each row of rotated values x_h [..., K]: sigma = RMS of the row.

  sigma carries no gradient (QuEST treats the scale as a constant). The grid math runs in
  float32 whatever x_h's dtype. `quest_grid(x_h, b).codes(x_h)` are the row's codes.
  """
  x_h = x_h.astype(jnp.float32)
  sigma = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(x_h), axis=-1, keepdims=True)))
  return QuestGrid.from_sigma(sigma, bits)


def grid_values(codes: jax.Array, step: jax.Array) -> jax.Array:
  """float32 values `(c + 1/2) D` of integer codes c (any int or float dtype) on steps D.

  `step` broadcasts against `codes`: [..., 1] per row, [N] per column of a [K, N] weight.
  """
  return (codes.astype(jnp.float32) + 0.5) * step
