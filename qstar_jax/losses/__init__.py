"""qstar_jax.losses."""

from qstar_jax.losses.dpo import DPOLoss, dpo_loss, implied_reward
from qstar_jax.losses.dqn import (
  q_learning_targets,
  q_targets_from_value,
  squared_td_error,
  value_iteration_targets,
)
from qstar_jax.losses.lm import mean_token_nll, sequence_log_probs, token_log_probs, token_nll
from qstar_jax.losses.oreo import (
  exact_kl,
  k3_kl,
  oreo_policy_loss,
  oreo_value_loss,
  step_log_probs,
)
from qstar_jax.losses.prm import implicit_prm_loss, implicit_process_rewards, value_regression_loss

__all__: list[str] = [
  "DPOLoss",
  "dpo_loss",
  "exact_kl",
  "implicit_prm_loss",
  "implicit_process_rewards",
  "implied_reward",
  "k3_kl",
  "mean_token_nll",
  "oreo_policy_loss",
  "oreo_value_loss",
  "q_learning_targets",
  "q_targets_from_value",
  "sequence_log_probs",
  "squared_td_error",
  "step_log_probs",
  "token_log_probs",
  "token_nll",
  "value_iteration_targets",
  "value_regression_loss",
]
