"""Pallas W4A16 kernel: unpack int4 nibbles, dequantize with group scales, float dot.

Grid (M / block_m, N / block_n, split_k). Program (i, j, s) walks the s-th of split_k equal
chunks of the packed rows in steps of `block_k` (one step never straddles a scale group) and
writes its partial sum to out[s]; the caller adds the split_k partials (split-K keeps enough
programs in flight at decode shapes, where M / block_m = 1). Each step loads a packed
[block_k, block_n] byte tile, splits it into the low nibbles (weight rows i) and high nibbles
(rows i + K/2) by arithmetic shifts, scales each by its group's [1, block_n] row, casts to the
activation dtype and multiplies with the two matching x tiles [block_m, block_k] (float32
accumulation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qstar_jax.kernels._common import compiler_params

__all__ = ["int4_matmul_pallas"]


def _kernel(x_ref, p_ref, s_ref, o_ref, *, block_k, half_k, group, half_offset, split_k):
  block_m = x_ref.shape[0]
  block_n = p_ref.shape[1]
  offset = 0.5 if half_offset else 0.0
  chunk = half_k // split_k
  first = pl.program_id(2) * chunk

  def dequant(nibbles, group_index):
    scale = s_ref[pl.ds(group_index, 1), :].astype(jnp.float32)  # [1, block_n]
    return ((nibbles.astype(jnp.float32) + offset) * scale).astype(x_ref.dtype)

  def body(i, acc):
    start = pl.multiple_of(first + i * block_k, block_k)
    packed = p_ref[pl.ds(start, block_k), :]
    low = jnp.right_shift(jnp.left_shift(packed, 4), 4)
    high = jnp.right_shift(packed, 4)
    w_low = dequant(low, start // group)
    w_high = dequant(high, (start + half_k) // group)
    x_low = x_ref[:, pl.ds(start, block_k)]
    x_high = x_ref[:, pl.ds(start + half_k, block_k)]
    acc += jnp.dot(x_low, w_low, preferred_element_type=jnp.float32)
    acc += jnp.dot(x_high, w_high, preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(
    0, chunk // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(
  jax.jit,
  static_argnames=(
    "block_m", "block_n", "block_k", "half_offset", "backend", "num_warps", "num_stages",
    "split_k"),
)
def int4_matmul_pallas(
  x: jax.Array,
  packed: jax.Array,
  scale: jax.Array,
  *,
  block_m: int,
  block_n: int,
  block_k: int,
  half_offset: bool,
  backend: str,
  num_warps: int = 4,
  num_stages: int = 3,
  split_k: int = 1,
) -> jax.Array:
  """The raw pallas_call: M, N multiples of the blocks, block_k dividing K/(2 split_k) and
  (when G > 1) the group size K/G. backend: "interpret", "triton" or "mosaic".

  Returns float32 [split_k, M, N] partial sums (their sum over axis 0 is x @ W).
  """
  m, k = x.shape
  half_k, n = packed.shape
  groups = scale.shape[0]
  kernel = functools.partial(
    _kernel, block_k=block_k, half_k=half_k, group=k // groups, half_offset=half_offset,
    split_k=split_k)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((split_k, m, n), jnp.float32),
    grid=(m // block_m, n // block_n, split_k),
    in_specs=[
      pl.BlockSpec((block_m, k), lambda i, j, s: (i, 0)),
      pl.BlockSpec((half_k, block_n), lambda i, j, s: (0, j)),
      pl.BlockSpec((groups, block_n), lambda i, j, s: (0, j)),
    ],
    out_specs=pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j)),
    interpret=backend == "interpret",
    compiler_params=compiler_params(backend, num_warps=num_warps, num_stages=num_stages),
  )(x, packed, scale)
