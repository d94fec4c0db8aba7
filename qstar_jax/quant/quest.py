"""QuEST quantizers: Hadamard + RMS-scaled Gaussian grid, with trust / STE / clip-STE gradients.

Forward (per row of the last axis, after the block Hadamard `x_h = x H`; `quest_grid`):

  sigma = sqrt(mean(x_h^2))  (no gradient),   s = alpha_b sigma,   D = 2 s / (2^b - 1),
  q = round(clip(x_h, -s, s) / D + 1/2) D - D/2     (ties rounded up).

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

from qstar_jax.quant.grid import check_bits, gaussian_mse_scale, quest_grid
from qstar_jax.quant.hadamard import check_hadamard_block, hadamard

__all__ = [
  "quest_quantize",
  "ste_quantize",
  "clip_ste_quantize",
  "quantize_rotated",
  "grid_quantize",
]


def grid_quantize(x_h: jax.Array, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Forward grid of QuEST on already-rotated values, per row of the last axis.

  Returns (q, sigma [..., 1], scale s [..., 1]), all float32 (x_h is cast to float32).
  """
  grid = quest_grid(x_h, bits)
  return grid.values(grid.codes(x_h)), grid.sigma, grid.scale


def _odd(codes: jax.Array) -> jax.Array:
  """The odd integers `m = 2c + 1 = q / (D/2)` of grid codes c (exact in float32 and bf16)."""
  return 2.0 * codes + 1.0


def _trust_radius(bits: int, trust_factor: float | None) -> float:
  return gaussian_mse_scale(bits) / (2**bits - 1) if trust_factor is None else float(trust_factor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def quantize_rotated(
  x: jax.Array, bits: int, block: int, method: str, trust_factor: float | None
) -> tuple[jax.Array, jax.Array]:
  """Rotate and quantize in integer form: `q(x H) = m * h` per row of the last axis.

  The single custom_vjp of QuEST. Returns (m [..., K], h [..., 1]), float32: m = 2c + 1 the
  odd integer of the level (|m| <= 2^b - 1, exact in float32 and bfloat16) and h = D/2 the
  half step (no gradient). A matmul of two such operands `(m_x @ m_w^T) h_x h_w^T` is then
  an exact integer product scaled in the epilogue, bit for bit what the integer kernels of
  `qstar_jax.kernels` compute.

  Backward: with the rotated-domain cotangent `g_h = g_m / h` (the cotangent of q),
  `dL/dx = (g_h * M) H^T` with M the trust mask `|q - x_h| <= T sigma` ("quest"),
  `|x_h| <= s` ("clip_ste") or 1 ("ste"). `quest_quantize` de-rotates `q H^T`, which gives
  QuEST's `((g H) * M) H^T`.
  """
  x_h = hadamard(x.astype(jnp.float32), block)
  grid = quest_grid(x_h, bits)
  return _odd(grid.codes(x_h)), 0.5 * grid.step


def _quantize_rotated_fwd(x, bits, block, method, trust_factor):
  x_h = hadamard(x.astype(jnp.float32), block)
  grid = quest_grid(x_h, bits)
  m, half_step = _odd(grid.codes(x_h)), 0.5 * grid.step
  if method == "quest":
    mask = jnp.abs(m * half_step - x_h) <= _trust_radius(bits, trust_factor) * grid.sigma
  elif method == "clip_ste":
    mask = jnp.abs(x_h) <= grid.scale
  elif method == "ste":
    mask = None
  else:
    raise ValueError(f"quantizer method={method!r}: expected 'quest', 'ste' or 'clip_ste'")
  return (m, half_step), (mask, half_step, jnp.zeros((), x.dtype))


def _quantize_rotated_bwd(bits, block, method, trust_factor, res, cotangents):
  mask, half_step, dtype_token = res
  g_m, _ = cotangents  # the half step carries no gradient (sigma is a constant)
  g_h = g_m / half_step  # dL/dq = dL/dm * dm/dq with m = q / h
  if mask is not None:
    g_h = jnp.where(mask, g_h, 0.0)
  # H_b is symmetric, so H^T is the same block transform.
  return (hadamard(g_h, block).astype(dtype_token.dtype),)


quantize_rotated.defvjp(_quantize_rotated_fwd, _quantize_rotated_bwd)


def _fake_quantize(
  x: jax.Array, bits: int, block: int, method: str, trust_factor: float | None
) -> jax.Array:
  """Checks the arguments, then `q(x H) H^T` in x's dtype with the method's gradient."""
  check_bits(bits)
  check_hadamard_block(block)
  if x.shape[-1] % block:
    raise ValueError(f"last axis K={x.shape[-1]} is not a multiple of the Hadamard block {block}")
  m, half_step = quantize_rotated(x, bits, block, method, trust_factor)
  return hadamard(m * half_step, block).astype(x.dtype)


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
  return _fake_quantize(x, bits, block, "quest", trust_factor)


def ste_quantize(x: jax.Array, bits: int, *, block: int = 128) -> jax.Array:
  """Same forward as `quest_quantize`, straight-through (identity) gradient: `dL/dx = g`."""
  return _fake_quantize(x, bits, block, "ste", None)


def clip_ste_quantize(x: jax.Array, bits: int, *, block: int = 128) -> jax.Array:
  """Same forward as `quest_quantize`, gradient `((g H) * 1[|x_h| <= s]) H^T`."""
  return _fake_quantize(x, bits, block, "clip_ste", None)
