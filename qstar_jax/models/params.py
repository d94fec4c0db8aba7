"""Parameter counts and sizes of a model's parameter pytree (one place for both)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from qstar_jax.models.config import LlamaConfig

__all__ = ["count_params", "param_bytes", "quantized_param_count"]


def _leaves(tree: Any) -> list[Any]:
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return jax.tree.leaves(tree)


def count_params(tree: Any) -> int:
  """Number of scalars in a parameter pytree (or in an NNX module's `nnx.Param`s)."""
  return int(sum(int(np.prod(x.shape)) for x in _leaves(tree)))


def param_bytes(tree: Any) -> int:
  """Bytes of a parameter pytree (or of an NNX module's `nnx.Param`s): what one decode step reads
  at least once."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in _leaves(tree)))


def quantized_param_count(config: LlamaConfig) -> int:
  """Weights of the block projections that QuEST quantizes (q, k, v, o, gate, up, down kernels):
  ``L * (2 D Hq hd + 2 D Hkv hd + 3 D F)``. Embeddings, the LM head, norms and biases stay
  16-bit and are not counted."""
  d, f, hd = config.hidden_size, config.intermediate_size, config.resolved_head_dim
  attention = 2 * d * config.num_heads * hd + 2 * d * config.num_kv_heads * hd
  return config.num_layers * (attention + 3 * d * f)
