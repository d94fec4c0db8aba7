"""W4A16: int4 weights packed two per byte, dequantized in the kernel, float activations."""

from qstar_jax.kernels.int4_matmul.ops import int4_matmul
from qstar_jax.kernels.int4_matmul.reference import (
  dequantize_int4,
  int4_matmul_reference,
  pack_int4,
  unpack_int4,
)

__all__ = ["int4_matmul", "int4_matmul_reference", "pack_int4", "unpack_int4", "dequantize_int4"]
