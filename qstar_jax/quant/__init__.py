"""qstar_jax.quant: QuEST quantization (Hadamard transform, Gaussian-MSE grid, trust gradient)."""

from qstar_jax.quant.config import QuantConfig

__all__ = ["QuantConfig"]
