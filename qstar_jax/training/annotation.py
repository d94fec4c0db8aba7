"""MCTS annotation of reasoning steps with the verifier's outcome reward (Zhai et al.).

`annotate_with_mcts` runs MCTS episodes of a policy over problems whose reference answers are
known (train problems), with `search.steps.scorers.VerifierReward` as the node score (a
terminal step is worth 1 when its solution states the reference answer, else 0) and rollouts
as the leaf values, so each edge's Q is a Monte Carlo estimate of the outcome. It returns the
`mcts_annotations` records (the best trajectory and, at each depth along it, the sibling steps
with their Q-values and visits), ready for `data.preference_pairs_from_annotations` (step-DPO
pairs) or value regression to Q (AlphaMath).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from qstar_jax.models.decoding import SamplingConfig
from qstar_jax.search.steps.lm_mcts import mcts_annotations, mcts_step_search
from qstar_jax.search.steps.methods import prompt_batches
from qstar_jax.search.steps.scorers import (
  VerifierReward,
  encode_answers,
  scored_expand,
  verifier_value_params,
  zero_value,
)
from qstar_jax.search.steps.step_tree import PolicyValueParams, StepSpec
from qstar_jax.training.progress import progress

__all__ = ["AnnotationConfig", "Annotation", "annotate_with_mcts"]


@dataclasses.dataclass(frozen=True)
class AnnotationConfig:
  """MCTS settings of an annotation run (Zhai et al. use UCT with 30-50 iterations)."""

  num_actions: int = 4            # K candidate steps per node
  num_simulations: int = 16       # simulations per decision
  temperature: float = 1.0        # the candidates' sampling temperature
  mcts_policy: str = "gumbel_muzero"
  batch: int = 32                 # problems per jitted search (one shape: one compilation)
  max_answer_chars: int = 24      # reference answers are passed to the jit as bytes


@dataclasses.dataclass(frozen=True)
class Annotation:
  records: list[dict[str, Any]]   # `mcts_annotations` records, "index" = the problem's index
  tokens_decoded: float           # per problem
  overflow: int                   # problems whose tree ran out of capacity
  seconds: float


def annotate_with_mcts(
  graphdef: nnx.GraphDef, params: Any, *, tokenizer: Any, spec: StepSpec,
  prompts: Sequence[Sequence[int]], answers: Sequence[str], max_depth: int,
  cfg: AnnotationConfig = AnnotationConfig(), seed: int = 0,
  problems: Sequence[Mapping[str, Any]] | None = None,
  desc: str = "annotate", on_batch: Callable[[int], None] | None = None,
) -> Annotation:
  """MCTS episodes (rollout values, the verifier's reward at terminal steps) of the policy
  (``graphdef``, Llama state ``params``) on each prompt; see the module doc.

  Args:
    prompts: token ids of each problem's prompt; answers: its reference answer (a number).
    max_depth: most steps of a solution (the prompt plus max_depth * spec.max_step_tokens must
      fit the model's context).
    problems: JSON-ready metadata stored in each record under "problem".
  Raises:
    ValueError: no prompts, as many answers as prompts expected, an answer that is not a number
      or too long (`encode_answers`), the search's own checks.
  """
  if not prompts:
    raise ValueError("annotate_with_mcts got no prompts: expected at least one problem")
  if len(answers) != len(prompts):
    raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts: expected one each")
  if problems is not None and len(problems) != len(prompts):
    raise ValueError(f"{len(problems)} problems for {len(prompts)} prompts: expected one each")
  encoded = encode_answers([str(a) for a in answers], cfg.max_answer_chars)
  scorer = scored_expand(VerifierReward(tokenizer, max_answer_chars=cfg.max_answer_chars))
  sampling = SamplingConfig(max_new_tokens=spec.max_step_tokens, temperature=cfg.temperature)
  records, tokens, overflow, t0 = [], 0, 0, time.perf_counter()
  batches = list(prompt_batches(prompts, cfg.batch))
  for start, real, prompt_tokens, lengths in progress(batches, desc=desc, unit="batch"):
    rows = np.minimum(np.arange(start, start + cfg.batch), start + real - 1)
    value = verifier_value_params(prompt_tokens, lengths, encoded[rows],
                                  max_answer_chars=cfg.max_answer_chars)
    result = mcts_step_search(
      PolicyValueParams(policy=params, value=value), jax.random.key(seed * 7919 + start),
      graphdef=graphdef, prompt_tokens=prompt_tokens, prompt_lengths=lengths, spec=spec,
      sampling=sampling, num_actions=cfg.num_actions, num_simulations=cfg.num_simulations,
      max_depth=max_depth, policy=cfg.mcts_policy, episode=True, value_source="rollout",
      expand_fn=scorer, value_fn=zero_value)
    result = jax.block_until_ready(result)
    tokens += int(np.asarray(result.tokens_decoded)[:real].sum())
    overflow += int(np.asarray(result.overflow)[:real].sum())
    meta = None if problems is None else list(problems[start:start + real]) + [None] * (
      cfg.batch - real)
    batch_records = mcts_annotations(result, tokenizer=tokenizer, problems=meta,
                                     prompt_ids=[prompts[i] for i in rows])[:real]
    for r, record in enumerate(batch_records):
      record["index"] = start + r
    records += batch_records
    if on_batch is not None:
      on_batch(start + real)
  return Annotation(records=records, tokens_decoded=tokens / len(prompts), overflow=overflow,
                    seconds=time.perf_counter() - t0)
