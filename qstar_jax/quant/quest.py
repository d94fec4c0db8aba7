"""QuEST quantizers: Hadamard + RMS-scaled Gaussian grid, with trust / STE / clip-STE gradients.

Forward (per row of the last axis, after the block Hadamard `x_h = x H`):

  sigma = sqrt(mean(x_h^2))  (no gradient),   s = alpha_b sigma,   D = 2 s / (2^b - 1),
  q = round(clip(x_h, -s, s) / D + 1/2) D - D/2.

Backward (QuEST's trust estimator): `M = 1[|q - x_h| <= T sigma]` with `T = alpha_b/(2^b - 1)`
(half a step) by default, and through the Hadamard `dL/dx = ((g H) * M) H^T`, where g is the
gradient with respect to the de-rotated output `q H^T`. STE passes the gradient unchanged
(`dL/dx = g`); clip-STE masks it with `|x_h| <= s`.

References: Panferov et al. 2025, "QuEST: Stable Training of LLMs with 1-Bit Weights and
Activations", Sec. 3-4 (Hadamard normalisation, MSE-optimal Gaussian fitting, trust estimation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qstar_jax.quant.grid import check_bits, gaussian_mse_scale
from qstar_jax.quant.hadamard import check_hadamard_block, hadamard

__all__ = [
  "quest_quantize",
  "ste_quantize",
  "clip_ste_quantize",
  "quantize_rotated",
  "grid_quantize",
  "quantize_codes",
]

_EPS = 1e-12


def grid_quantize(x_h: jax.Array, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Forward grid of QuEST on already-rotated values, per row of the last axis.

  Returns (q, sigma [..., 1], scale s [..., 1]), all float32 (x_h is cast to float32).
  """
  check_bits(bits)
  x_h = x_h.astype(jnp.float32)
  sigma = jnp.sqrt(jnp.mean(jnp.square(x_h), axis=-1, keepdims=True))
  sigma = jax.lax.stop_gradient(jnp.maximum(sigma, _EPS))
  s = gaussian_mse_scale(bits) * sigma
  step = 2.0 * s / (2**bits - 1)
  q = jnp.round(jnp.clip(x_h, -s, s) / step + 0.5) * step - 0.5 * step
  return q, sigma, s


def quantize_codes(x_h: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """Integer codes of the grid: q = (codes - (2^b - 1)/2) * step, codes in {0..2^b - 1}.

  Returns (codes uint8 [..., K], step float32 [..., 1]).
  """
  check_bits(bits)
  x_h = x_h.astype(jnp.float32)
  sigma = jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(x_h), axis=-1, keepdims=True)), _EPS)
  s = gaussian_mse_scale(bits) * sigma
  step = 2.0 * s / (2**bits - 1)
  r = jnp.round(jnp.clip(x_h, -s, s) / step + 0.5)
  codes = (r + (2 ** (bits - 1) - 1)).astype(jnp.uint8)
  return codes, step


def _trust_radius(bits: int, trust_factor: float | None) -> float:
  return gaussian_mse_scale(bits) / (2**bits - 1) if trust_factor is None else float(trust_factor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def quantize_rotated(
  x: jax.Array, bits: int, block: int, method: str, trust_factor: float | None
) -> jax.Array:
  """Rotate and quantize: returns `q(x H)` (in the rotated basis), float32 [..., K].

  The single custom_vjp of QuEST. Its cotangent `g_h` (with respect to the rotated output)
  maps back as `dL/dx = (g_h * M) H^T` with M the trust mask ("quest"), `|x_h| <= s`
  ("clip_ste") or 1 ("ste"). `quest_quantize` de-rotates (`q H^T`), which gives the full
  `((g H) * M) H^T`; `fake_quant_dense` keeps both operands rotated and skips that step.
  """
  x_h = hadamard(x.astype(jnp.float32), block)
  return grid_quantize(x_h, bits)[0]


def _quantize_rotated_fwd(x, bits, block, method, trust_factor):
  x_h = hadamard(x.astype(jnp.float32), block)
  q, sigma, s = grid_quantize(x_h, bits)
  if method == "quest":
    mask = jnp.abs(q - x_h) <= _trust_radius(bits, trust_factor) * sigma
  elif method == "clip_ste":
    mask = jnp.abs(x_h) <= s
  elif method == "ste":
    mask = None
  else:
    raise ValueError(f"quantizer method={method!r}: expected 'quest', 'ste' or 'clip_ste'")
  return q, (mask, jnp.zeros((), x.dtype))


def _quantize_rotated_bwd(bits, block, method, trust_factor, res, g_h):
  mask, dtype_token = res
  if mask is not None:
    g_h = jnp.where(mask, g_h, 0.0)
  # H_b is symmetric, so H^T is the same block transform.
  return (hadamard(g_h, block).astype(dtype_token.dtype),)


quantize_rotated.defvjp(_quantize_rotated_fwd, _quantize_rotated_bwd)


def _check(x: jax.Array, bits: int, block: int) -> None:
  check_bits(bits)
  check_hadamard_block(block)
  if x.shape[-1] % block:
    raise ValueError(f"last axis K={x.shape[-1]} is not a multiple of the Hadamard block {block}")


def quest_quantize(
  x: jax.Array, bits: int, *, block: int = 128, trust_factor: float | None = None
) -> jax.Array:
  """QuEST fake quantization `y = q(x H) H^T` along the last axis, with the trust gradient.

  Args:
    x: [..., K], K a multiple of `block`.
    bits: 1..8.
    block: Hadamard block (power of two).
    trust_factor: T in `M = 1[|q - x_h| <= T sigma]`; None for alpha_b / (2^b - 1).

  Returns:
    [..., K] in x's dtype: the de-rotated quantized values. Gradient `((g H) * M) H^T`.
  """
  _check(x, bits, block)
  q = quantize_rotated(x, bits, block, "quest", trust_factor)
  return hadamard(q, block).astype(x.dtype)


def ste_quantize(x: jax.Array, bits: int, *, block: int = 128) -> jax.Array:
  """Same forward as `quest_quantize`, straight-through (identity) gradient: `dL/dx = g`."""
  _check(x, bits, block)
  return hadamard(quantize_rotated(x, bits, block, "ste", None), block).astype(x.dtype)


def clip_ste_quantize(x: jax.Array, bits: int, *, block: int = 128) -> jax.Array:
  """Same forward as `quest_quantize`, gradient `((g H) * 1[|x_h| <= s]) H^T`."""
  _check(x, bits, block)
  return hadamard(quantize_rotated(x, bits, block, "clip_ste", None), block).astype(x.dtype)
