"""qstar_jax.losses."""

from qstar_jax.losses.dqn import (
  q_learning_targets,
  q_targets_from_value,
  squared_td_error,
  value_iteration_targets,
)
from qstar_jax.losses.lm import mean_token_nll, sequence_log_probs, token_log_probs, token_nll

__all__: list[str] = [
  "mean_token_nll",
  "q_learning_targets",
  "q_targets_from_value",
  "sequence_log_probs",
  "squared_td_error",
  "token_log_probs",
  "token_nll",
  "value_iteration_targets",
]
