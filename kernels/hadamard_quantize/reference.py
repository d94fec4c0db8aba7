"""Specification of the fused Hadamard-rotate + quantize of activations (QuEST inference).

For each row x [K]: `x_h = x H` (block-diagonal orthonormal Hadamard), `sigma =
sqrt(mean(x_h^2))`, `s = alpha_b sigma`, `D = 2 s / (2^b - 1)`, `r = floor(clip(x_h, -s, s)/D
+ 1)` (round half up of `clip/D + 1/2`), and the signed code `c = r - 1` in
`[-2^(b-1), 2^(b-1) - 1]` (int8 for every b <= 8). The dequantized value is `(c + 1/2) D`,
exactly QuEST's zero-free level `r D - D/2`; `int8_matmul(..., half_offset=True)` multiplies
such codes exactly as odd integers `2c + 1`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.quant.grid import check_bits, gaussian_mse_scale
from qstar_jax.quant.hadamard import hadamard

__all__ = ["hadamard_quantize_reference", "dequantize_codes"]


def hadamard_quantize_reference(
  x: jax.Array, bits: int, *, block: int = 128
) -> tuple[jax.Array, jax.Array]:
  """Returns (codes int8 [M, K], step D float32 [M])."""
  check_bits(bits)
  x_h = hadamard(x.astype(jnp.float32), block, method="matmul")
  sigma = jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(x_h), axis=-1, keepdims=True)), 1e-12)
  s = gaussian_mse_scale(bits) * sigma
  step = 2.0 * s / (2**bits - 1)
  r = jnp.floor(jnp.clip(x_h, -s, s) / step + 1.0)
  return (r - 1.0).astype(jnp.int8), step[..., 0]


def dequantize_codes(codes: jax.Array, step: jax.Array) -> jax.Array:
  """`(c + 1/2) D` per row: float32 [M, K] rotated, quantized activations."""
  return (codes.astype(jnp.float32) + 0.5) * step[..., None]
