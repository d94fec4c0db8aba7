"""Every LM step search by name, under one budget: what experiments, demos and benchmarks call.

`run_method(name, params, rng_key, ...)` runs one of `METHODS` on a batch of prompts and
returns its `StepSearchResult`; `method_answers` reads each problem's answer on the host (a
vote for "majority", the chosen solution otherwise). `pad_prompts` right-pads token-id lists to
a bucketed width, so batches of similar prompts share one compiled program.

Methods (sizes from `SearchBudget`):
- greedy: one solution, argmax tokens (`sample_solutions`, N = 1, greedy).
- majority: N sampled solutions, the most stated answer (self-consistency).
- best_of_n: N sampled solutions, the highest-valued finished one.
- beam: value-guided step beam search, W beams x E expansions.
- mcts: an episode of MCTS decisions (K candidate steps per node, S simulations each).
- particle: particle filtering, N particles resampled by softmax(value / tau).
- q_guided: K candidates per step, argmax value kept.
- best_first: best-first over steps, priority g + lam * value (the LLM variant of Q*).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qstar_jax.distributed import DEFAULT_RULES, Rules
from qstar_jax.envs.grading import stated_answer
from qstar_jax.models.decoding import SamplingConfig
from qstar_jax.search.steps.lm_mcts import mcts_step_search
from qstar_jax.search.steps.lm_searches import (
  beam_search,
  best_first_search,
  majority_answer,
  particle_filter,
  q_guided_search,
  sample_solutions,
)
from qstar_jax.search.steps.result import StepSearchResult, read_solutions
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  StepSpec,
  ValueFn,
  expand_steps,
  linear_value,
)

__all__ = ["METHODS", "SearchBudget", "method_answers", "pad_prompts", "prompt_batches",
           "run_method", "stated_answer"]

METHODS = ("greedy", "majority", "best_of_n", "beam", "mcts", "particle", "q_guided",
           "best_first")


@dataclasses.dataclass(frozen=True)
class SearchBudget:
  """Sizes of every method (each method reads its own)."""

  num_samples: int = 16          # majority, best_of_n: N solutions
  beam_width: int = 4            # beam: W
  expansions: int = 4            # beam: E children per beam
  num_particles: int = 8         # particle: N
  particle_tau: float = 0.1      # particle: softmax temperature of the weights
  mcts_actions: int = 4          # mcts: K candidate steps per node
  mcts_simulations: int = 4      # mcts: S simulations per decision
  mcts_policy: str = "gumbel_muzero"
  q_candidates: int = 4          # q_guided: K
  best_first_candidates: int = 4  # best_first: K children per pop
  best_first_budget: int = 12    # best_first: pops at most
  best_first_lam: float = 1.0
  best_first_step_cost: float = 0.0
  temperature: float = 1.0       # token sampling temperature of every sampled method
  max_depth: int = 8             # steps per solution at most


def pad_prompts(prompts: Sequence[Sequence[int]], *, bucket: int = 32,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [B, P] int32 prompts and [B] lengths; P rounded up to a multiple of `bucket`."""
  if not prompts or any(len(p) < 1 for p in prompts):
    raise ValueError(f"pad_prompts: expected >= 1 prompt, each of >= 1 token; got lengths "
                     f"{[len(p) for p in prompts]}")
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  width = int(math.ceil(lengths.max() / bucket) * bucket)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, lengths

def prompt_batches(prompts: Sequence[Sequence[int]], batch: int, width: int | None = None):
  """(start, real rows, tokens [batch, W], lengths [batch]) per batch of `batch` prompts; the last
  batch is filled with copies of its last prompt (one shape: one compiled program)."""
  if batch < 1:
    raise ValueError(f"batch={batch}: expected >= 1")
  if width is None:
    width = pad_prompts(prompts)[0].shape[1]
  for start in range(0, len(prompts), batch):
    rows = list(prompts[start:start + batch])
    real = len(rows)
    rows += [rows[-1]] * (batch - real)
    tokens, lengths = pad_prompts(rows, bucket=width)
    yield start, real, tokens, lengths


def run_method(method: str, params: PolicyValueParams, rng_key: jax.Array, *,
               graphdef: nnx.GraphDef, prompt_tokens: Any, prompt_lengths: Any, spec: StepSpec,
               budget: SearchBudget, expand_fn: Callable = expand_steps,
               value_fn: ValueFn = linear_value, mesh: Mesh | None = None,
               sharding_rules: Rules = DEFAULT_RULES) -> StepSearchResult:
  """Runs `method` (one of METHODS) on B prompts under `budget`; see the module doc.

  `expand_fn` / `value_fn` go to the search unchanged: e.g. `scorers.scored_expand(scorer)` with
  `scorers.zero_value` scores nodes by a verifier or a separate Q-model (`params.value` then
  holds the scorer's dict).

  `mesh` / `sharding_rules` go to the search too: None runs on one device; a mesh splits the
  B problems over its `data` x `fsdp` axes (B must divide over them) and places the parameters
  by the rules (see `search.steps.sharded`).
  """
  if method not in METHODS:
    raise ValueError(f"method {method!r}: expected one of {METHODS}")
  sampled = SamplingConfig(max_new_tokens=spec.max_step_tokens, temperature=budget.temperature)
  common = dict(graphdef=graphdef, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
                spec=spec, max_depth=budget.max_depth, expand_fn=expand_fn,
                value_fn=value_fn, mesh=mesh, sharding_rules=sharding_rules)
  if method == "greedy":
    return sample_solutions(params, rng_key, sampling=sampled.replace(greedy=True),
                            num_samples=1, **common)
  if method in ("majority", "best_of_n"):
    return sample_solutions(params, rng_key, sampling=sampled, num_samples=budget.num_samples,
                            **common)
  if method == "beam":
    return beam_search(params, rng_key, sampling=sampled, beam_width=budget.beam_width,
                       expansions=budget.expansions, **common)
  if method == "mcts":
    return mcts_step_search(params, rng_key, sampling=sampled, num_actions=budget.mcts_actions,
                            num_simulations=budget.mcts_simulations, policy=budget.mcts_policy,
                            episode=True, **common)
  if method == "particle":
    return particle_filter(params, rng_key, sampling=sampled, num_particles=budget.num_particles,
                           temperature_weights=budget.particle_tau, **common)
  if method == "q_guided":
    return q_guided_search(params, rng_key, sampling=sampled,
                           num_candidates=budget.q_candidates, **common)
  return best_first_search(params, rng_key, sampling=sampled,
                           num_candidates=budget.best_first_candidates,
                           expansions_budget=budget.best_first_budget, lam=budget.best_first_lam,
                           step_cost=budget.best_first_step_cost, **common)


def method_answers(method: str, result: StepSearchResult, *, tokenizer: Any,
                   extract_answer: Callable[[str], str | None] = stated_answer
                   ) -> list[tuple[str | None, str | None]]:
  """Per problem (answer or None, the text it came from or None), read on the host.

  "majority" votes over its candidates' stated answers (the text is the first candidate
  stating the winner); every other method answers with its chosen solution.
  """
  out = []
  for chosen, candidates in read_solutions(result, tokenizer=tokenizer,
                                           extract_answer=extract_answer):
    if method == "majority":
      answer = majority_answer(candidates)
      text = next((c.text for c in candidates if c.answer == answer and answer is not None),
                  None)
      out.append((answer, text))
    elif chosen is None:
      out.append((None, None))
    else:
      out.append((chosen.answer, chosen.text))
  return out
