"""qstar_jax.quant: QuEST quantization (Hadamard transform, Gaussian-MSE grid, trust gradient)."""

from qstar_jax.quant.config import QuantConfig
from qstar_jax.quant.convert import QuantizedDense, convert_to_integer
from qstar_jax.quant.dense import fake_quant_dense
from qstar_jax.quant.grid import QUEST_ALPHAS, gaussian_mse_scale, gaussian_quantization_mse
from qstar_jax.quant.hadamard import hadamard, hadamard_matrix
from qstar_jax.quant.quest import (
  clip_ste_quantize,
  grid_quantize,
  quantize_codes,
  quantize_rotated,
  quest_quantize,
  ste_quantize,
)

__all__ = [
  "QuantConfig",
  "QuantizedDense",
  "convert_to_integer",
  "QUEST_ALPHAS",
  "clip_ste_quantize",
  "fake_quant_dense",
  "gaussian_mse_scale",
  "gaussian_quantization_mse",
  "grid_quantize",
  "hadamard",
  "hadamard_matrix",
  "quantize_codes",
  "quantize_rotated",
  "quest_quantize",
  "ste_quantize",
]
