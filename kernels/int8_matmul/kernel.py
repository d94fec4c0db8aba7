"""Pallas W8A8 kernel: int8 tiles, int32 accumulation over K, scale epilogue.

Grid (M / block_m, N / block_n); each program holds a [block_m, K] row panel of x and a
[K, block_n] column panel of w and loops over K in block_k steps (`lax.fori_loop`, which
Triton pipelines), so the same kernel runs on Triton (no cross-program accumulation), in
interpret mode, and on Mosaic TPU when the panels fit VMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from qstar_jax.kernels._common import compiler_params

__all__ = ["int8_matmul_pallas"]


def _kernel(*refs, block_k: int, num_k: int, true_k: int, half_offset: bool, scaled: bool):
  if scaled:
    x_ref, w_ref, xs_ref, ws_ref, o_ref = refs
  else:
    x_ref, w_ref, o_ref = refs
  block_m = x_ref.shape[0]
  block_n = w_ref.shape[1]

  def body(i, carry):
    acc, row_sum, col_sum = carry
    start = pl.multiple_of(i * block_k, block_k)
    x = x_ref[:, pl.ds(start, block_k)]
    w = w_ref[pl.ds(start, block_k), :]
    acc += jnp.dot(x, w, preferred_element_type=jnp.int32)
    if half_offset:
      row_sum += jnp.sum(x.astype(jnp.int32), axis=1)
      col_sum += jnp.sum(w.astype(jnp.int32), axis=0)
    return acc, row_sum, col_sum

  init = (
    jnp.zeros((block_m, block_n), jnp.int32),
    jnp.zeros((block_m,), jnp.int32),
    jnp.zeros((block_n,), jnp.int32),
  )
  acc, row_sum, col_sum = jax.lax.fori_loop(0, num_k, body, init)
  if half_offset:
    # Zero padding along K adds nothing to acc or the sums; only the constant uses the true K.
    acc = 4 * acc + 2 * row_sum[:, None] + 2 * col_sum[None, :] + true_k
  if scaled:
    out = acc.astype(jnp.float32) * xs_ref[...][:, None]
    out = out * ws_ref[...][None, :]
    o_ref[...] = out.astype(o_ref.dtype)
  else:
    o_ref[...] = acc


@functools.partial(
  jax.jit,
  static_argnames=(
    "block_m", "block_n", "block_k", "true_k", "half_offset", "out_dtype", "backend",
    "num_warps", "num_stages",
  ),
)
def int8_matmul_pallas(
  x: jax.Array,
  w: jax.Array,
  x_scale: jax.Array | None,
  w_scale: jax.Array | None,
  *,
  block_m: int,
  block_n: int,
  block_k: int,
  true_k: int,
  half_offset: bool,
  out_dtype,
  backend: str,
  num_warps: int = 4,
  num_stages: int = 3,
) -> jax.Array:
  """The raw pallas_call. Shapes must already be multiples of the blocks (ops.py pads).

  backend: "interpret", "triton" (GPU) or "mosaic" (TPU).
  """
  m, k = x.shape
  n = w.shape[1]
  scaled = x_scale is not None
  in_specs = [
    pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
    pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
  ]
  args = [x, w]
  if scaled:
    in_specs += [
      pl.BlockSpec((block_m,), lambda i, j: (i,)),
      pl.BlockSpec((block_n,), lambda i, j: (j,)),
    ]
    args += [x_scale, w_scale]
  out_dtype = jnp.dtype(out_dtype) if scaled else jnp.dtype(jnp.int32)
  kernel = functools.partial(
    _kernel, block_k=block_k, num_k=k // block_k, true_k=true_k, half_offset=half_offset,
    scaled=scaled,
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
    grid=(m // block_m, n // block_n),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
    interpret=backend == "interpret",
    compiler_params=compiler_params(backend, num_warps=num_warps, num_stages=num_stages),
  )(*args)
