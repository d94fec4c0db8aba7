"""qstar_jax.quant: QuEST quantization (Hadamard transform, Gaussian-MSE grid, trust gradient).

Pure math over arrays: imports only jax, numpy and other `qstar_jax.quant` modules. The
integer model built from these pieces (`QuantizedDense`, `convert_to_integer`) lives in
`qstar_jax.models.quantized`.
"""

from qstar_jax.quant.config import QuantConfig
from qstar_jax.quant.dense import fake_quant_dense
from qstar_jax.quant.grid import (
  QUEST_ALPHAS,
  QuestGrid,
  gaussian_mse_scale,
  gaussian_quantization_mse,
  grid_values,
  quest_grid,
)
from qstar_jax.quant.hadamard import hadamard, hadamard_matrix
from qstar_jax.quant.quest import (
  clip_ste_quantize,
  grid_quantize,
  quantize_rotated,
  quest_quantize,
  ste_quantize,
)

__all__ = [
  "QuantConfig",
  "QUEST_ALPHAS",
  "QuestGrid",
  "clip_ste_quantize",
  "fake_quant_dense",
  "gaussian_mse_scale",
  "gaussian_quantization_mse",
  "grid_quantize",
  "grid_values",
  "hadamard",
  "hadamard_matrix",
  "quantize_rotated",
  "quest_grid",
  "quest_quantize",
  "ste_quantize",
]
