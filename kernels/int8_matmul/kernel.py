"""Pallas W8A8 kernel: int8 tiles, int32 accumulation over K, scale epilogue.

Each program holds a [block_m, K] row panel of x and a column panel of w and loops over K in
block_k steps (`lax.fori_loop`, which Triton pipelines), so the same kernel runs on Triton (no
cross-program accumulation), in interpret mode, and on Mosaic TPU when the panels fit VMEM.

Weight layouts: "kn" (w [K, N], N contiguous) or "nk" (w [N, K], K contiguous: the HF weight's
own layout, and the one 8-bit tensor-core MMAs want for both operands — Hopper's wgmma takes
8-bit operands only K-major, as cuBLAS's int8 GEMMs take only "TN").

Program order: `group_m=None` runs a 2-D grid (M / block_m, N / block_n); an int `group_m`
runs a 1-D grid in grouped order (group_m row panels sweep the column panels together), so the
panels a wave of programs reads are shared in L2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qstar_jax.kernels._common import compiler_params

__all__ = ["int8_matmul_pallas"]


def _kernel(*refs, block_k: int, num_k: int, true_k: int, half_offset: bool, scaled: bool,
            w_layout: str):
  if scaled:
    x_ref, w_ref, xs_ref, ws_ref, o_ref = refs
  else:
    x_ref, w_ref, o_ref = refs
  block_m = x_ref.shape[0]
  nk = w_layout == "nk"
  block_n = w_ref.shape[0] if nk else w_ref.shape[1]
  # Contract x's K with w's K: axis 1 of a [block_n, block_k] tile ("nk"), else axis 0.
  dims = (((1,), (1 if nk else 0,)), ((), ()))

  def body(i, carry):
    acc, row_sum, col_sum = carry
    start = pl.multiple_of(i * block_k, block_k)
    x = x_ref[:, pl.ds(start, block_k)]
    w = w_ref[:, pl.ds(start, block_k)] if nk else w_ref[pl.ds(start, block_k), :]
    acc += jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)
    if half_offset:
      row_sum += jnp.sum(x.astype(jnp.int32), axis=1)
      col_sum += jnp.sum(w.astype(jnp.int32), axis=1 if nk else 0)
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
    "num_warps", "num_stages", "w_layout", "group_m", "debug",
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
  w_layout: str = "kn",
  group_m: int | None = None,
  debug: bool = False,
) -> jax.Array:
  """The raw pallas_call. Shapes must already be multiples of the blocks (ops.py pads).

  backend: "interpret", "triton" (GPU) or "mosaic" (TPU). w: [K, N] ("kn") or [N, K] ("nk").
  debug: Pallas prints the kernel's jaxpr and its lowered (e.g. Triton) IR when it lowers.
  """
  m, k = x.shape
  n = w.shape[0] if w_layout == "nk" else w.shape[1]
  scaled = x_scale is not None
  grid_m, grid_n = m // block_m, n // block_n
  if group_m is None:
    grid = (grid_m, grid_n)

    def tile(*ids):  # (row panel, column panel) of this program
      return ids
  else:
    grid = (grid_m * grid_n,)
    per_group = group_m * grid_n

    def tile(p):
      first = (p // per_group) * group_m
      size = jnp.minimum(grid_m - first, group_m)
      return first + (p % per_group) % size, (p % per_group) // size

  def x_map(*ids):
    return tile(*ids)[0], 0

  def w_map(*ids):
    return (tile(*ids)[1], 0) if w_layout == "nk" else (0, tile(*ids)[1])

  in_specs = [
    pl.BlockSpec((block_m, k), x_map),
    pl.BlockSpec((block_n, k) if w_layout == "nk" else (k, block_n), w_map),
  ]
  args = [x, w]
  if scaled:
    in_specs += [
      pl.BlockSpec((block_m,), lambda *ids: (tile(*ids)[0],)),
      pl.BlockSpec((block_n,), lambda *ids: (tile(*ids)[1],)),
    ]
    args += [x_scale, w_scale]
  out_dtype = jnp.dtype(out_dtype) if scaled else jnp.dtype(jnp.int32)
  kernel = functools.partial(
    _kernel, block_k=block_k, num_k=k // block_k, true_k=true_k, half_offset=half_offset,
    scaled=scaled, w_layout=w_layout,
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
    grid=grid,
    in_specs=in_specs,
    out_specs=pl.BlockSpec((block_m, block_n), tile),
    interpret=backend == "interpret",
    compiler_params=compiler_params(backend, num_warps=num_warps, num_stages=num_stages),
    debug=debug,
  )(*args)
