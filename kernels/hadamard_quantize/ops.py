"""Public fused Hadamard + quantize op: checks, row padding, interpret mode on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.kernels._common import check_block, check_dtype, pad_to, resolve_backend, round_up
from qstar_jax.kernels.hadamard_quantize.kernel import hadamard_quantize_pallas
from qstar_jax.quant.grid import check_bits
from qstar_jax.quant.hadamard import check_hadamard_block, hadamard_matrix

__all__ = ["hadamard_quantize"]


def hadamard_quantize(
  x: jax.Array,
  bits: int,
  *,
  block: int = 128,
  block_m: int = 16,
  interpret: bool | None = None,
  num_warps: int = 4,
) -> tuple[jax.Array, jax.Array]:
  """QuEST activation codes on the Pallas kernel; same contract as the reference.

  Args:
    x: [M, K] float32 / bfloat16 / float16, K a multiple of the Hadamard `block` (>= 16: the
      block is a tile of the in-kernel dot).
    bits: 1..8.

  Returns:
    (codes int8 [M, K] in [-2^(b-1), 2^(b-1) - 1], step float32 [M]); value (c + 1/2) * step.
    Rows are zero-padded to block_m (padded rows are dropped); K is never padded because
    padding would change each row's RMS scale.
  """
  check_bits(bits)
  check_hadamard_block(block)
  check_dtype("x", x, (jnp.float32, jnp.bfloat16, jnp.float16))
  if x.ndim != 2:
    raise ValueError(f"hadamard_quantize: expected x [M, K], got shape {x.shape}")
  m, k = x.shape
  if block < 16:
    raise ValueError(f"hadamard_quantize: Hadamard block {block} < 16 (the kernel's dot tile)")
  if k % block:
    raise ValueError(f"hadamard_quantize: K={k} is not a multiple of the Hadamard block {block}")
  check_block("block_m", block_m, minimum=16)
  backend = resolve_backend(interpret)
  mp = round_up(m, block_m)
  codes, step = hadamard_quantize_pallas(
    pad_to(x, (mp, k)), hadamard_matrix(block, jnp.float32), bits=bits, block_m=block_m,
    backend=backend, num_warps=num_warps,
  )
  return codes[:m], step[:m]
