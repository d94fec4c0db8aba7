"""Specification of W4A16: int4 weights packed two per byte, group scales, float activations.

Packing layout ("split halves"): for a weight of int4 values q [K, N] (two's complement,
-8..7), byte `packed[i, n]` holds `q[i, n]` in its low nibble and `q[i + K/2, n]` in its high
nibble, i = 0..K/2-1. A kernel tile then multiplies x[:, i-block] by the low nibbles and
x[:, i-block + K/2] by the high nibbles, both contiguous loads (no interleaving in registers).
Scales are [G, N]: group g covers rows [g K/G, (g+1) K/G) (G = 1: per output channel).
Dequantized weight: `(q + offset) * scale`, offset 0 (symmetric int4) or 1/2 (QuEST's
zero-free 4-bit grid, levels (c + 1/2) D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pack_int4", "unpack_int4", "dequantize_int4", "int4_matmul_reference"]


def pack_int4(q: jax.Array) -> jax.Array:
  """int values in [-8, 7], [K, N] with K even -> int8 [K/2, N] (split-halves layout)."""
  if q.ndim != 2:
    raise ValueError(f"pack_int4: expected [K, N], got shape {q.shape}")
  k = q.shape[0]
  if k % 2:
    raise ValueError(f"pack_int4: K={k} is odd: int4 packing needs an even K")
  q = q.astype(jnp.int32)
  low, high = q[: k // 2], q[k // 2 :]
  byte = (low & 0xF) | ((high & 0xF) << 4)
  return jnp.where(byte >= 128, byte - 256, byte).astype(jnp.int8)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """int8 [K/2, N] -> int8 [K, N] values in [-8, 7] (inverse of pack_int4)."""
  low = jnp.right_shift(jnp.left_shift(packed, 4), 4)  # arithmetic shift sign-extends
  high = jnp.right_shift(packed, 4)
  return jnp.concatenate([low, high], axis=0)


def dequantize_int4(
  packed: jax.Array, scale: jax.Array, *, half_offset: bool = False
) -> jax.Array:
  """float32 [K, N] weight `(q + offset) * scale[group(k), n]`."""
  q = unpack_int4(packed).astype(jnp.float32)
  if half_offset:
    q = q + 0.5
  k = q.shape[0]
  groups = scale.shape[0]
  s = jnp.repeat(scale.astype(jnp.float32), k // groups, axis=0)
  return q * s


def int4_matmul_reference(
  x: jax.Array, packed: jax.Array, scale: jax.Array, *, half_offset: bool = False
) -> jax.Array:
  """`x @ W` with W dequantized to float32 and cast to x's dtype, float32 accumulation.

  Args:
    x: [M, K] float32 / bfloat16 / float16 activations.
    packed: int8 [K/2, N] (see module docstring).
    scale: [G, N] group scales (G divides K).

  Returns:
    float32 [M, N].
  """
  w = dequantize_int4(packed, scale, half_offset=half_offset).astype(x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
