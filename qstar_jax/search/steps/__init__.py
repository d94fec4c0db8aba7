"""qstar_jax.search.steps: search over reasoning steps of a language model (rollouts, MCTS)."""

from qstar_jax.search.steps.mcts import MCTS_POLICIES, MctsResult, mcts
from qstar_jax.search.steps.rollout import StepRollout, step_rollout

__all__ = ["MCTS_POLICIES", "MctsResult", "StepRollout", "mcts", "step_rollout"]
