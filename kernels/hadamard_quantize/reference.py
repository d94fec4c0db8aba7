"""Specification of the fused Hadamard-rotate + quantize of activations (QuEST inference).

For each row x [K]: `x_h = x H` (block-diagonal orthonormal Hadamard), then QuEST's grid
`qstar_jax.quant.quest_grid` (per-row RMS sigma, `s = alpha_b sigma`, `D = 2 s / (2^b - 1)`)
gives the signed code `c = floor(clip(x_h, -s, s)/D + 1) - 1` in `[-2^(b-1), 2^(b-1) - 1]`
(int8 for every b <= 8). The dequantized value is `(c + 1/2) D`, QuEST's zero-free level;
`int8_matmul(..., half_offset=True)` multiplies such codes exactly as odd integers `2c + 1`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.quant.grid import grid_values, quest_grid
from qstar_jax.quant.hadamard import hadamard

__all__ = ["hadamard_quantize_reference", "dequantize_codes"]


def hadamard_quantize_reference(
  x: jax.Array, bits: int, *, block: int = 128
) -> tuple[jax.Array, jax.Array]:
  """Returns (codes int8 [M, K], step D float32 [M])."""
  x_h = hadamard(x.astype(jnp.float32), block, method="matmul")
  grid = quest_grid(x_h, bits)
  return grid.codes(x_h).astype(jnp.int8), grid.step[..., 0]


def dequantize_codes(codes: jax.Array, step: jax.Array) -> jax.Array:
  """`(c + 1/2) D` per row: float32 [M, K] rotated, quantized activations (step [M])."""
  return grid_values(codes, step[..., None])
