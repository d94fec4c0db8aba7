"""Pallas kernel: rotate rows by the block Hadamard and quantize them to QuEST codes.

Grid (M / block_m,). A program owns [block_m, K] rows and makes two passes over the K/b
Hadamard blocks: the first accumulates sum(x_h^2) per row (sigma needs the whole row), the
second recomputes `x_h = x_blk @ H_b` (a [block_m, b] x [b, b] dot, cheaper than keeping the
row) and writes its codes on the row's `qstar_jax.quant.QuestGrid` (the reference's grid,
built from the accumulated sigma). Nothing of size K is held in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qstar_jax.kernels._common import compiler_params
from qstar_jax.quant.grid import QuestGrid

__all__ = ["hadamard_quantize_pallas"]


def _kernel(x_ref, h_ref, codes_ref, step_ref, *, block, bits):
  block_m, k = x_ref.shape
  num_blocks = k // block
  h = h_ref[...]

  def rotated(i):
    start = pl.multiple_of(i * block, block)
    xb = x_ref[:, pl.ds(start, block)].astype(jnp.float32)
    return start, jnp.dot(xb, h, preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST)

  def sum_squares(i, acc):
    _, xh = rotated(i)
    return acc + jnp.sum(xh * xh, axis=1)

  ss = jax.lax.fori_loop(0, num_blocks, sum_squares, jnp.zeros((block_m,), jnp.float32))
  grid = QuestGrid.from_sigma(jnp.sqrt(ss / k)[:, None], bits)

  def write_codes(i, carry):
    start, xh = rotated(i)
    codes_ref[:, pl.ds(start, block)] = grid.codes(xh).astype(jnp.int8)
    return carry

  jax.lax.fori_loop(0, num_blocks, write_codes, 0)
  step_ref[...] = grid.step[:, 0]


@functools.partial(
  jax.jit, static_argnames=("bits", "block_m", "backend", "num_warps", "num_stages"))
def hadamard_quantize_pallas(
  x: jax.Array,
  h: jax.Array,
  *,
  bits: int,
  block_m: int,
  backend: str,
  num_warps: int = 4,
  num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
  """The raw pallas_call: x [M, K] with M a multiple of block_m, h [b, b] (K multiple of b)."""
  m, k = x.shape
  block = h.shape[0]
  kernel = functools.partial(_kernel, block=block, bits=bits)
  return pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((m, k), jnp.int8),
      jax.ShapeDtypeStruct((m,), jnp.float32),
    ),
    grid=(m // block_m,),
    in_specs=[
      pl.BlockSpec((block_m, k), lambda i: (i, 0)),
      pl.BlockSpec((block, block), lambda i: (0, 0)),
    ],
    out_specs=(
      pl.BlockSpec((block_m, k), lambda i: (i, 0)),
      pl.BlockSpec((block_m,), lambda i: (i,)),
    ),
    interpret=backend == "interpret",
    compiler_params=compiler_params(backend, num_warps=num_warps, num_stages=num_stages),
  )(x, h)
