"""Fake-quantized dense layer used by the transformer's block projections under QuEST."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.quant.config import QuantConfig
from qstar_jax.quant.hadamard import effective_block, hadamard
from qstar_jax.quant.quest import quantize_rotated

__all__ = ["fake_quant_dense"]


def fake_quant_dense(x: jax.Array, kernel: jax.Array, cfg: QuantConfig) -> jax.Array:
  """`y = q_a(x H) q_w(W H)^T`, the QuEST linear layer (no bias), with W = kernel^T.

  Activations are quantized per row (token) and weights per output column of `kernel` (row n
  of the HF weight), both after the same block Hadamard along the contraction axis K, so
  without quantization `(x H)(W H)^T = x W^T = x @ kernel`. The grid math runs in float32.
  With both operands quantized the matmul multiplies the levels' odd integers
  `m = q / (D/2)` (exact in bf16 and float32, float32 accumulation) and scales the result by
  `(D_x/2)(D_w/2)` afterwards: the same numbers as the integer kernels, and cheap in bf16.
  Otherwise the matmul runs in x's dtype with float32 accumulation.

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
  if x.ndim != 2:
    # Rows are independent; flattening keeps the rotation the same [M, K] computation as the
    # integer path's (so both round identically), whatever the leading shape.
    y = fake_quant_dense(x.reshape(-1, k), kernel, cfg)
    return y.reshape(*x.shape[:-1], kernel.shape[1])
  if cfg.w_bits is not None and cfg.a_bits is not None:
    m_x, h_x = quantize_rotated(x, cfg.a_bits, block, cfg.method, cfg.trust_factor)
    m_w, h_w = quantize_rotated(kernel.T, cfg.w_bits, block, cfg.method, cfg.trust_factor)
    acc = jnp.einsum("...k,nk->...n", m_x.astype(dtype), m_w.astype(dtype),
                     preferred_element_type=jnp.float32)
    return (acc * h_x * h_w[:, 0]).astype(dtype)
  if cfg.a_bits is not None:
    m_x, h_x = quantize_rotated(x, cfg.a_bits, block, cfg.method, cfg.trust_factor)
    xq = m_x * h_x
  else:
    xq = hadamard(x.astype(jnp.float32), block)
  if cfg.w_bits is not None:
    m_w, h_w = quantize_rotated(kernel.T, cfg.w_bits, block, cfg.method, cfg.trust_factor)
    wq = m_w * h_w
  else:
    wq = hadamard(kernel.T.astype(jnp.float32), block)
  y = jnp.einsum("...k,nk->...n", xq.astype(dtype), wq.astype(dtype),
                 preferred_element_type=jnp.float32)
  return y.astype(dtype)
