"""`quantized_matmul`: QuEST inference matmul that picks a Pallas kernel or the XLA path.

A QuEST layer computes `y = q_a(x H) q_w(W H)^T` (W = kernel^T, [N, K]). After conversion the
weight is stored as integer codes of its rotated rows (`QuantizedWeight`) and at run time:

- W and A quantized (any bits <= 8): the fused `hadamard_quantize` kernel turns x into codes
  c_x and row steps D_x, then `int8_matmul(..., half_offset=True)` computes the exact integer
  `sum_k (2 c_x + 1)(2 c_w + 1)` and scales it by `(D_x / 2)(D_w / 2)`: the zero-free grid's
  half-step offset is corrected exactly (row sums in the epilogue), int8 compute for every b
  (Hopper has no int4 MMA; int4 codes are int8 values here).
- W4, activations full precision: x is rotated (`hadamard`), weights stay packed two per byte
  and `int4_matmul(..., half_offset=True)` dequantizes them in the kernel (W4A16).
- Other weight-only bits: dequantize and `jnp.dot` (XLA).

Kernel or XLA: on GPUs the Pallas (Triton) kernels are used when the shapes suit them (K a
multiple of 32, Hadamard block >= 16); elsewhere the XLA path (the kernels' jnp references, the
same math) runs unless `use_kernel=True` forces the kernels (Mosaic on TPU, interpret mode on
CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qstar_jax.kernels.hadamard_quantize import (
  dequantize_codes,
  hadamard_quantize,
  hadamard_quantize_reference,
)
from qstar_jax.kernels.int4_matmul import (
  int4_matmul,
  int4_matmul_reference,
  pack_int4,
  unpack_int4,
)
from qstar_jax.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from qstar_jax.quant.grid import grid_values
from qstar_jax.quant.hadamard import effective_block, hadamard

__all__ = [
  "QuantizedWeight",
  "quantize_weight",
  "quantized_matmul",
  "dequantize_weight",
  "weight_codes",
]


@struct.dataclass
class QuantizedWeight:
  """A QuEST weight in integer form (rows of W H quantized per output column of the kernel).

  codes: int8 [K, N] signed grid codes c of `qstar_jax.quant.quest_grid` (value
    (c + 1/2) step) — or, with `packed`, int8 [K/2, N] the same codes as int4 nibbles
    (split-halves layout of `pack_int4`; `weight_codes` unpacks them); float32 [K, N] rotated
    weights `(W H)^T` when w_bits is None.
  step: float32 [N] grid step D_w per output column (ones when w_bits is None).
  """

  codes: jax.Array
  step: jax.Array
  w_bits: int | None = struct.field(pytree_node=False, default=4)
  a_bits: int | None = struct.field(pytree_node=False, default=4)
  block: int = struct.field(pytree_node=False, default=128)
  packed: bool = struct.field(pytree_node=False, default=False)

  @property
  def in_features(self) -> int:
    return self.codes.shape[0] * (2 if self.packed else 1)

  @property
  def out_features(self) -> int:
    return self.codes.shape[1]


def quantize_weight(
  kernel: jax.Array, *, w_bits: int | None, a_bits: int | None, block: int,
  pack: bool | None = None,
) -> QuantizedWeight:
  """Converts a kernel [K, N] (x @ kernel) to integer QuEST codes of its rotated columns.

  Uses exactly the forward grid of `qstar_jax.quant` (same sigma, scale, rounding), so the
  integer model reproduces the fake-quantized one. `pack` (default: w_bits == 4 and
  activations unquantized) stores 4-bit codes two per byte for the W4A16 kernel.
  """
  k, n = kernel.shape
  block = effective_block(k, block)
  if w_bits is None:
    rotated = hadamard(kernel.T.astype(jnp.float32), block, method="matmul").T
    return QuantizedWeight(rotated, jnp.ones((n,), jnp.float32), None, a_bits, block, False)
  codes, step = hadamard_quantize_reference(kernel.T, w_bits, block=block)  # [N, K], [N]
  if pack is None:
    pack = w_bits == 4 and a_bits is None
  if pack:
    if w_bits > 4:
      raise ValueError(f"quantize_weight: cannot pack w_bits={w_bits} codes into int4")
    return QuantizedWeight(pack_int4(codes.T), step, w_bits, a_bits, block, True)
  return QuantizedWeight(codes.T, step, w_bits, a_bits, block, False)


def weight_codes(qw: QuantizedWeight) -> jax.Array:
  """int8 [K, N] grid codes c of a quantized weight, unpacked from int4 nibbles if packed."""
  if qw.w_bits is None:
    raise ValueError("weight_codes: the weight is not quantized (w_bits is None)")
  return unpack_int4(qw.codes) if qw.packed else qw.codes


def dequantize_weight(qw: QuantizedWeight) -> jax.Array:
  """float32 [K, N] rotated weights `(q_w(W H))^T`."""
  if qw.w_bits is None:
    return qw.codes
  return grid_values(weight_codes(qw), qw.step[None, :])


def _kernel_shapes_ok(k: int, block: int) -> bool:
  return block >= 16 and k % 32 == 0


def quantized_matmul(
  x: jax.Array, qw: QuantizedWeight, *, use_kernel: bool | None = None
) -> jax.Array:
  """`q_a(x H) q_w(W H)^T` for x [..., K] -> float32 [..., N], kernel or XLA path.

  Args:
    x: activations [..., K] (float32 / bfloat16).
    qw: a `QuantizedWeight` from `quantize_weight`.
    use_kernel: True forces the Pallas kernels (interpret mode on CPU), False the XLA path,
      None picks: kernels on GPU when K and the Hadamard block tile, else XLA.
  """
  k = x.shape[-1]
  if k != qw.in_features:
    raise ValueError(
      f"quantized_matmul: x has K={k} but the weight has {qw.in_features} input features")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  if use_kernel is None:
    # GPU: the Triton kernels. TPU: XLA's native int8 dot (the Mosaic lowering of these kernels
    # is untested on hardware; use_kernel=True forces it). CPU: XLA (interpret mode is slow).
    use_kernel = jax.default_backend() == "gpu" and _kernel_shapes_ok(k, qw.block)
  if qw.a_bits is not None and qw.w_bits is not None:
    if use_kernel:
      codes, step = hadamard_quantize(x2, qw.a_bits, block=qw.block)
      y = int8_matmul(codes, qw.codes, 0.5 * step, 0.5 * qw.step, half_offset=True)
    else:
      codes, step = hadamard_quantize_reference(x2, qw.a_bits, block=qw.block)
      y = int8_matmul_reference(codes, qw.codes, 0.5 * step, 0.5 * qw.step, half_offset=True)
  elif qw.a_bits is not None:
    codes, step = hadamard_quantize_reference(x2, qw.a_bits, block=qw.block)
    y = jnp.dot(dequantize_codes(codes, step), qw.codes, precision=jax.lax.Precision.HIGHEST)
  else:
    x_h = hadamard(x2, qw.block, method="matmul")
    if qw.packed:
      scale = qw.step[None, :]
      if use_kernel:
        y = int4_matmul(x_h, qw.codes, scale, half_offset=True)
      else:
        y = int4_matmul_reference(x_h, qw.codes, scale, half_offset=True)
    else:
      w = dequantize_weight(qw).astype(x_h.dtype)
      y = jnp.dot(x_h, w, preferred_element_type=jnp.float32,
                  precision=jax.lax.Precision.HIGHEST)
  return y.reshape(*lead, qw.out_features)
