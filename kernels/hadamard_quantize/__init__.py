"""Fused Hadamard rotation + QuEST quantization of activations (integer codes + row step)."""

from qstar_jax.kernels.hadamard_quantize.ops import hadamard_quantize
from qstar_jax.kernels.hadamard_quantize.reference import (
  dequantize_codes,
  hadamard_quantize_reference,
)

__all__ = ["hadamard_quantize", "hadamard_quantize_reference", "dequantize_codes"]
