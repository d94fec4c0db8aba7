"""Fake-quantized dense layer used by the transformer's block projections under QuEST."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.quant.config import QuantConfig
from qstar_jax.quant.hadamard import effective_block, hadamard
from qstar_jax.quant.quest import quantize_rotated

__all__ = ["fake_quant_dense", "rotate_and_quantize"]


def rotate_and_quantize(
  x: jax.Array, bits: int | None, cfg: QuantConfig, block: int
) -> jax.Array:
  """`q(x H)` per row of the last axis (float32), or just `x H` when bits is None."""
  if bits is None:
    return hadamard(x.astype(jnp.float32), block)
  return quantize_rotated(x, bits, block, cfg.method, cfg.trust_factor)


def fake_quant_dense(x: jax.Array, kernel: jax.Array, cfg: QuantConfig) -> jax.Array:
  """`y = q_a(x H) q_w(W H)^T`, the QuEST linear layer (no bias), with W = kernel^T.

  Activations are quantized per row (token) and weights per output column of `kernel` (row n
  of the HF weight), both after the same block Hadamard along the contraction axis K, so
  without quantization `(x H)(W H)^T = x W^T = x @ kernel`. The grid math runs in float32;
  the matmul runs in x's dtype (bf16 compute stays bf16) with float32 accumulation.

  Args:
    x: [..., K] activations.
    kernel: [K, N] weight, stored `[in, out]`.
    cfg: bits per operand (None keeps that operand full precision), gradient method,
      Hadamard block (the whole K when K is a smaller power of two).

  Returns:
    [..., N] in x's dtype.
  """
  k = x.shape[-1]
  if kernel.ndim != 2 or kernel.shape[0] != k:
    raise ValueError(
      f"fake_quant_dense: kernel shape {tuple(kernel.shape)} does not match activations "
      f"[..., {k}]: expected [{k}, N]")
  dtype = x.dtype
  if cfg.w_bits is None and cfg.a_bits is None:
    return jnp.dot(x, kernel.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
  block = effective_block(k, cfg.hadamard_block)
  xq = rotate_and_quantize(x, cfg.a_bits, cfg, block).astype(dtype)
  wq = rotate_and_quantize(kernel.T, cfg.w_bits, cfg, block).astype(dtype)  # [N, K]
  y = jnp.einsum("...k,nk->...n", xq, wq, preferred_element_type=jnp.float32)
  return y.astype(dtype)
