"""Pallas kernels of qstar_jax, each beside the plain-jnp reference that specifies it.

Installed as ``qstar_jax.kernels`` (the folder sits at the repository top level). Import it as
``from qstar_jax import kernels`` — never as a top-level ``kernels`` module.

- ``int8_matmul``: W8A8 int8 x int8 -> int32, per-row / per-column scales in the epilogue
  (optionally QuEST's half-step offset corrected exactly from row and column sums).
- ``int4_matmul``: W4A16, int4 weights packed two per byte, group scales, in-kernel dequant.
- ``hadamard_quantize``: fused block-Hadamard rotation + QuEST quantization of activations.
- ``quantized_matmul``: picks the kernels or the XLA path by backend and shape.

Every kernel and reference uses QuEST's grid from ``qstar_jax.quant.quest_grid`` and its one
integer-code convention (signed codes c, value (c + 1/2) D).

Interpret mode is automatic on the CPU; on GPUs the kernels compile with Triton, on TPU with
Mosaic.
"""

from qstar_jax.kernels.dispatch import (
  QuantizedWeight,
  dequantize_weight,
  quantize_weight,
  quantized_matmul,
  weight_codes,
)
from qstar_jax.kernels.hadamard_quantize import hadamard_quantize, hadamard_quantize_reference
from qstar_jax.kernels.int4_matmul import (
  int4_matmul,
  int4_matmul_reference,
  pack_int4,
  unpack_int4,
)
from qstar_jax.kernels.int8_matmul import int8_matmul, int8_matmul_reference

__all__ = [
  "QuantizedWeight",
  "dequantize_weight",
  "hadamard_quantize",
  "hadamard_quantize_reference",
  "int4_matmul",
  "int4_matmul_reference",
  "int8_matmul",
  "int8_matmul_reference",
  "pack_int4",
  "quantize_weight",
  "quantized_matmul",
  "unpack_int4",
  "weight_codes",
]
