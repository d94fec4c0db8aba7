"""Public W8A8 op: checks, padding to the block grid, interpret mode on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.kernels._common import check_block, check_dtype, pad_to, resolve_backend, round_up
from qstar_jax.kernels.int8_matmul.kernel import int8_matmul_pallas

__all__ = ["int8_matmul"]


def int8_matmul(
  x: jax.Array,
  w: jax.Array,
  x_scale: jax.Array | None = None,
  w_scale: jax.Array | None = None,
  *,
  half_offset: bool = False,
  out_dtype=jnp.float32,
  block_m: int = 64,
  block_n: int = 64,
  block_k: int = 64,
  interpret: bool | None = None,
  num_warps: int = 4,
  num_stages: int = 3,
  w_layout: str = "kn",
  group_m: int | None = None,
) -> jax.Array:
  """W8A8 matmul on the Pallas kernel; same contract as `int8_matmul_reference`.

  `w_layout="nk"` takes the weight transposed, w [N, K] (K contiguous: what 8-bit tensor-core
  MMAs want); the result is the same `x @ w.T`. `group_m` (a positive int) runs the programs in
  grouped order for L2 reuse; None runs the plain 2-D grid.

  Shapes that do not tile are zero-padded up to the blocks (rows and columns of zeros add
  nothing to the int32 accumulator; the half-offset constant uses the true K) and the result
  is sliced back. Block sizes are powers of two >= 16 (Triton's dot tile minimum); the block
  is shrunk to the padded dimension when that is smaller. `interpret=None` interprets exactly
  on the CPU backend.

  Raises:
    TypeError: x or w not int8, scales not floating.
    ValueError: ranks, K mismatch, scale shapes, block sizes.
  """
  check_dtype("x", x, (jnp.int8,))
  check_dtype("w", w, (jnp.int8,))
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f"int8_matmul: expected x [M, K] and w [K, N], got {x.shape} and {w.shape}")
  m, k = x.shape
  if w_layout not in ("kn", "nk"):
    raise ValueError(f"int8_matmul: w_layout={w_layout!r}: expected 'kn' (w [K, N]) or 'nk' "
                     "(w [N, K])")
  if group_m is not None and (not isinstance(group_m, int) or group_m < 1):
    raise ValueError(f"int8_matmul: group_m={group_m!r}: expected a positive int or None")
  if w_layout == "kn" and w.shape[0] != k:
    raise ValueError(f"int8_matmul: x is [M, K]={x.shape} but w is {w.shape}: expected [{k}, N]")
  if w_layout == "nk" and w.shape[1] != k:
    raise ValueError(
      f"int8_matmul: x is [M, K]={x.shape} but w is {w.shape}: expected [N, {k}] (w_layout='nk')")
  n = w.shape[0] if w_layout == "nk" else w.shape[1]
  if (x_scale is None) != (w_scale is None):
    raise ValueError("int8_matmul: give both x_scale and w_scale, or neither")
  if x_scale is not None:
    check_dtype("x_scale", x_scale, (jnp.float32, jnp.bfloat16, jnp.float16))
    check_dtype("w_scale", w_scale, (jnp.float32, jnp.bfloat16, jnp.float16))
    if x_scale.shape != (m,):
      raise ValueError(f"int8_matmul: x_scale has shape {x_scale.shape}: expected ({m},) (per row)")
    if w_scale.shape != (n,):
      raise ValueError(
        f"int8_matmul: w_scale has shape {w_scale.shape}: expected ({n},) (per column)")
  for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    check_block(name, value, minimum=16)
  if half_offset and 255 * 255 * k >= 2**31:
    raise ValueError(f"int8_matmul: K={k} could overflow the int32 half-offset accumulator")
  backend = resolve_backend(interpret)
  # Shrink blocks for small problems (still powers of two >= 16) so tiny shapes pad little.
  block_m = min(block_m, max(16, 1 << (max(m, 1) - 1).bit_length()))
  block_n = min(block_n, max(16, 1 << (max(n, 1) - 1).bit_length()))
  block_k = min(block_k, max(16, 1 << (max(k, 1) - 1).bit_length()))
  mp, np_, kp = round_up(m, block_m), round_up(n, block_n), round_up(k, block_k)
  xp = pad_to(x, (mp, kp))
  wp = pad_to(w, (np_, kp) if w_layout == "nk" else (kp, np_))
  xs = ws = None
  if x_scale is not None:
    xs = pad_to(x_scale.astype(jnp.float32), (mp,))
    ws = pad_to(w_scale.astype(jnp.float32), (np_,))
  out = int8_matmul_pallas(
    xp, wp, xs, ws, block_m=block_m, block_n=block_n, block_k=block_k, true_k=k,
    half_offset=half_offset, out_dtype=jnp.dtype(out_dtype), backend=backend,
    num_warps=num_warps, num_stages=num_stages, w_layout=w_layout, group_m=group_m,
  )
  return out[:m, :n]
