"""Public W4A16 op: checks, padding of M and N, interpret mode on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.kernels._common import check_block, check_dtype, pad_to, resolve_backend, round_up
from qstar_jax.kernels.int4_matmul.kernel import int4_matmul_pallas

__all__ = ["int4_matmul"]


def int4_matmul(
  x: jax.Array,
  packed: jax.Array,
  scale: jax.Array,
  *,
  half_offset: bool = False,
  block_m: int = 16,
  block_n: int = 64,
  block_k: int = 64,
  interpret: bool | None = None,
  num_warps: int = 4,
  num_stages: int = 3,
  split_k: int = 1,
) -> jax.Array:
  """`x @ dequantize_int4(packed, scale)` on the Pallas kernel; see `int4_matmul_reference`.

  Args:
    x: [M, K] float32 / bfloat16 / float16. Decode shapes (M <= 16) use one row block;
      prefill shapes tile M by block_m.
    packed: int8 [K/2, N] split-halves nibbles (`pack_int4`).
    scale: [G, N]: G = 1 per output channel, else groups of K/G rows (K/G a multiple of 16,
      so that every kernel step of 16..block_k rows lies inside one group).

  M and N are zero-padded to the blocks; K must split into whole 16-row tiles per half
  (K a multiple of 32) and per group, else a ValueError explains which. `split_k` (a power of
  two) splits the K/2 packed rows into that many chunks run by separate programs, whose partial
  sums are added afterwards (decode shapes: more programs than N / block_n alone); each chunk
  must still hold whole 16-row steps.

  Returns:
    float32 [M, N].
  """
  check_dtype("x", x, (jnp.float32, jnp.bfloat16, jnp.float16))
  check_dtype("packed", packed, (jnp.int8,))
  check_dtype("scale", scale, (jnp.float32, jnp.bfloat16, jnp.float16))
  if x.ndim != 2 or packed.ndim != 2 or scale.ndim != 2:
    raise ValueError(
      f"int4_matmul: expected x [M, K], packed [K/2, N], scale [G, N]; got {x.shape}, "
      f"{packed.shape}, {scale.shape}")
  m, k = x.shape
  half_k, n = packed.shape
  if k % 2:
    raise ValueError(f"int4_matmul: K={k} is odd: int4 packing needs an even K")
  if half_k * 2 != k:
    raise ValueError(f"int4_matmul: packed has {half_k} rows: expected K/2={k // 2} for x {x.shape}")
  groups = scale.shape[0]
  if scale.shape[1] != n or groups < 1 or k % groups:
    raise ValueError(
      f"int4_matmul: scale has shape {scale.shape}: expected [G, {n}] with G dividing K={k}")
  group = k // groups
  for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    check_block(name, value, minimum=16)
  check_block("split_k", split_k, minimum=1)
  # The K step divides the chunk K/(2 split_k) and the group size, so no step straddles two
  # groups or two chunks.
  chunk = half_k // split_k
  step = block_k
  while step > 16 and (chunk % step or (groups > 1 and group % step)):
    step //= 2
  if half_k % split_k or chunk % step or (groups > 1 and group % step):
    raise ValueError(
      f"int4_matmul: K={k} (group size {group}, split_k={split_k}) does not tile: K/2 / split_k "
      "and the group size must be multiples of 16")
  backend = resolve_backend(interpret)
  block_m = min(block_m, max(16, 1 << (max(m, 1) - 1).bit_length()))
  block_n = min(block_n, max(16, 1 << (max(n, 1) - 1).bit_length()))
  mp, np_ = round_up(m, block_m), round_up(n, block_n)
  out = int4_matmul_pallas(
    pad_to(x, (mp, k)), pad_to(packed, (half_k, np_)), pad_to(scale, (groups, np_)),
    block_m=block_m, block_n=block_n, block_k=step, half_offset=half_offset, backend=backend,
    num_warps=num_warps, num_stages=num_stages, split_k=split_k,
  )
  out = out[0] if split_k == 1 else jnp.sum(out, axis=0)
  return out[:m, :n]
