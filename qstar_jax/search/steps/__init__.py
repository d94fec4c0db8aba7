"""qstar_jax.search.steps: search over reasoning steps of a language model (rollouts so far)."""

from qstar_jax.search.steps.rollout import StepRollout, step_rollout

__all__ = ["StepRollout", "step_rollout"]
