"""W8A8: int8 x int8 -> int32 matmul with per-row / per-column scales in the epilogue."""

from qstar_jax.kernels.int8_matmul.ops import int8_matmul
from qstar_jax.kernels.int8_matmul.reference import int8_matmul_reference

__all__ = ["int8_matmul", "int8_matmul_reference"]
