"""qstar_jax.search.steps: search over reasoning steps of a language model.

- `step_tree`: the tree KV cache plus per-node steps and values (`StepTree`), and
  `expand_steps`, the batched step expansion every search builds on.
- `lm_mcts`: MCTS on mctx's tree (one decision or an episode), annotation JSONL.
- `lm_searches`: best-of-N / majority sampling, value-guided beam, Q-guided, particle filtering,
  best-first (the LLM variant of Q*).
- `methods`: every method by name under one `SearchBudget`; `tasks`: ready-to-search tasks
  (the arithmetic policy, GSM8K with a pretrained model) and `evaluate`.
- `mcts`: the generic jitted MCTS loop carrying a model state; `rollout`: host-driven
  step-by-step decoding.
"""

from qstar_jax.search.steps.lm_mcts import (
  VALUE_SOURCES,
  MctsStepResult,
  mcts_annotations,
  mcts_step_search,
  read_mcts_annotations,
  write_mcts_annotations,
)
from qstar_jax.search.steps.lm_searches import (
  BeamSearchResult,
  beam_search,
  best_first_search,
  best_of_n_by_reward,
  majority_answer,
  particle_filter,
  q_guided_search,
  sample_solutions,
  weighted_majority_answer,
)
from qstar_jax.search.steps.mcts import MCTS_POLICIES, MctsResult, mcts
from qstar_jax.search.steps.methods import (
  METHODS,
  SearchBudget,
  method_answers,
  pad_prompts,
  run_method,
  stated_answer,
)
from qstar_jax.search.steps.result import (
  Solution,
  StepSearchResult,
  format_tree,
  read_solutions,
  vote,
)
from qstar_jax.search.steps.rollout import StepRollout, step_rollout
from qstar_jax.search.steps.scorers import (
  LogRatioQ,
  ModelValue,
  NodeScorer,
  PathLogRatio,
  PathTokens,
  ScoredExpand,
  VerifierReward,
  encode_answers,
  model_value_params,
  path_log_probs,
  path_tokens,
  path_width,
  q_model_value_params,
  scored_expand,
  verifier_value_params,
  zero_value,
)
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  StepSpec,
  StepTree,
  TreeCapacity,
  copy_steps,
  expand_steps,
  init_step_tree,
  linear_value,
  node_step_ids,
  node_token_ids,
  release_steps,
  tree_capacity,
)

__all__ = [
  "BeamSearchResult", "MCTS_POLICIES", "METHODS", "MctsResult", "MctsStepResult",
  "PolicyValueParams", "SearchBudget", "Solution", "StepRollout", "StepSearchResult", "StepSpec",
  "StepTree", "TreeCapacity", "VALUE_SOURCES", "beam_search", "best_first_search",
  "best_of_n_by_reward", "copy_steps", "expand_steps", "format_tree", "init_step_tree",
  "linear_value", "majority_answer", "mcts", "mcts_annotations", "mcts_step_search",
  "method_answers", "node_step_ids", "node_token_ids", "pad_prompts", "particle_filter",
  "q_guided_search", "read_mcts_annotations", "read_solutions", "release_steps", "run_method",
  "sample_solutions", "stated_answer", "step_rollout", "tree_capacity", "vote",
  "weighted_majority_answer", "write_mcts_annotations",
  # node scorers (verifier reward, step-DPO Q-model) written into tree.value
  "LogRatioQ", "ModelValue", "NodeScorer", "PathLogRatio", "PathTokens", "ScoredExpand",
  "VerifierReward", "encode_answers", "model_value_params", "path_log_probs", "path_tokens",
  "path_width", "q_model_value_params", "scored_expand", "verifier_value_params",
  "zero_value",
]
