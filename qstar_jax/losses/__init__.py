"""qstar_jax.losses."""

from qstar_jax.losses.dqn import (
  q_learning_targets,
  q_targets_from_value,
  squared_td_error,
  value_iteration_targets,
)

__all__: list[str] = [
  "q_learning_targets",
  "q_targets_from_value",
  "squared_td_error",
  "value_iteration_targets",
]
