"""Block-diagonal orthonormal Sylvester Hadamard transform along the last axis.

QuEST rotates both operands of a matmul along the contraction dimension K with the same
orthonormal `H = blockdiag(H_b, ..., H_b)` (`H_b = H_2^{(x) log2 b} / sqrt(b)`), so
`(x H)(W H)^T = x W^T` and the rotated values are close to Gaussian, which the grid assumes.
`H_b` is symmetric and orthonormal: `H_b^T = H_b = H_b^{-1}`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["hadamard", "hadamard_matrix", "check_hadamard_block", "effective_block"]


def check_hadamard_block(block: int) -> None:
  """Raises ValueError unless `block` is a power of two >= 1."""
  if not isinstance(block, (int, np.integer)) or block < 1 or block & (block - 1):
    raise ValueError(f"Hadamard block={block!r}: expected a power of two >= 1")


def effective_block(dim: int, block: int) -> int:
  """The block used along a contraction dimension `dim`: `block`, or `dim` when smaller.

  Raises ValueError when `dim` is not a multiple of `block` (and, for `dim < block`, when
  `dim` itself is not a power of two).
  """
  check_hadamard_block(block)
  if dim < block:
    if dim & (dim - 1):
      raise ValueError(
        f"contraction dimension K={dim} is smaller than the Hadamard block {block} and not a "
        "power of two: expected K a power of two or a multiple of the block")
    return dim
  if dim % block:
    raise ValueError(
      f"contraction dimension K={dim} is not a multiple of the Hadamard block {block}")
  return block


@functools.cache
def _hadamard_np(block: int) -> np.ndarray:
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < block:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(block)


def hadamard_matrix(block: int, dtype=jnp.float32) -> jax.Array:
  """The orthonormal Sylvester Hadamard matrix `H_b` [block, block] (symmetric)."""
  check_hadamard_block(block)
  return jnp.asarray(_hadamard_np(block), dtype)


def _hadamard_matmul(x: jax.Array, block: int) -> jax.Array:
  k = x.shape[-1]
  xb = x.reshape(*x.shape[:-1], k // block, block)
  h = hadamard_matrix(block, x.dtype)
  y = jnp.einsum("...gi,ij->...gj", xb, h, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(x.shape)


def _hadamard_butterfly(x: jax.Array, block: int) -> jax.Array:
  # Fast Walsh-Hadamard transform: log2(block) stages of (a + b, a - b) on pairs at distance
  # `half`; in Sylvester order the pair at stage `half` differs in that bit of the index.
  k = x.shape[-1]
  lead = x.shape[:-1]
  y = x.reshape(*lead, k // block, block)
  half = block // 2
  while half >= 1:
    y = y.reshape(*lead, k // block, block // (2 * half), 2, half)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    half //= 2
  y = y.reshape(x.shape)
  return y * jnp.asarray(1.0 / np.sqrt(block), x.dtype)


# Measured (`python -m experiments.bench_quant --hadamard`) on the 2-core CPU of the build
# machine, float32, block 128: block matmul 3.2 ms vs butterfly 5.0 ms at [4096, 512], about
# equal at [512, 256] (XLA's CPU GEMM beats 7 memory-bound add/sub passes). On GPU/TPU the block
# matmul runs on the tensor cores / MXU, so it is the choice everywhere for now; the butterfly
# stays as an independent implementation (tests compare the two).
_CPU_METHOD = "matmul"


def _default_method() -> str:
  return _CPU_METHOD if jax.default_backend() == "cpu" else "matmul"


def hadamard(x: jax.Array, block: int = 128, *, method: str | None = None) -> jax.Array:
  """Orthonormal block Hadamard along the last axis: `y = x @ blockdiag(H_b, ..., H_b)`.

  Args:
    x: [..., K] with K a multiple of `block`.
    block: power-of-two block size b.
    method: "matmul" (einsum with H_b), "butterfly" (fast Walsh-Hadamard, log2(b) add/sub
      stages) or None for the faster one on the current backend.

  Returns:
    [..., K] in x's dtype. Applying it twice returns x (H_b is an involution).
  """
  check_hadamard_block(block)
  k = x.shape[-1]
  if k % block:
    raise ValueError(f"hadamard: last axis K={k} is not a multiple of block={block}")
  method = method or _default_method()
  if method == "matmul":
    return _hadamard_matmul(x, block)
  if method == "butterfly":
    return _hadamard_butterfly(x, block)
  raise ValueError(f"hadamard method={method!r}: expected 'matmul', 'butterfly' or None")
