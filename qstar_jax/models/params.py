"""Parameter counts and sizes of a model's parameter pytree (one place for both)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = ["count_params", "param_bytes"]


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
