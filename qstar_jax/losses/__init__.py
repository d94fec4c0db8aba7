"""qstar_jax.losses."""

from qstar_jax.losses.dqn import q_learning_targets, squared_td_error, value_iteration_targets

__all__: list[str] = ["q_learning_targets", "squared_td_error", "value_iteration_targets"]
