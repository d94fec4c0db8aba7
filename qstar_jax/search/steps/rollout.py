"""Step-by-step rollout of a batch of problems: decode one reasoning step at a time.

Each round decodes every problem's next step (until a step delimiter, EOS, or
`sampling.max_new_tokens` tokens) in one batched `decode` call that continues from the KV cache
of everything so far (the prefix is never recomputed): the first round prefills the prompts,
later rounds feed only each row's pending last token (the decoding cache invariant). A problem
ends at EOS, at a step for which `is_final_step(step_ids)` holds (e.g. a final-answer pattern),
or after `max_steps` steps.

Every round after the first has the same shapes (tokens [B, 1], a cache of fixed size), so a
rollout compiles two programs (the prefill round and the continuation round) whatever its length.
Problems that have ended stay in the batch (static shapes) and their further tokens are dropped;
`model_calls` counts the forward passes they share with the others.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.decoding import SamplingConfig, decode, model_config_of

__all__ = ["StepRollout", "step_rollout"]


@dataclasses.dataclass(frozen=True)
class StepRollout:
  """Steps of B problems (ragged: host tuples, not arrays) and the cost of producing them."""

  steps: tuple[tuple[tuple[int, ...], ...], ...]  # [B][steps][tokens] ids, delimiter/EOS included
  finished: tuple[bool, ...]        # [B] ended at EOS or a final step (not at max_steps)
  texts: tuple[tuple[str, ...], ...] | None  # [B][steps] decoded steps (with a tokenizer)
  model_calls: int                  # batched forward passes of the model (prefill + each token)
  tokens_decoded: tuple[int, ...]   # [B] tokens in problem b's steps
  call_seconds: tuple[float, ...]   # [rounds] wall time of each decode call (the first compiles)
  call_tokens: tuple[int, ...]      # [rounds] tokens each call added to unfinished problems

  @property
  def decode_calls(self) -> int:
    """Batched `decode` calls (rounds), one per step of the longest problem."""
    return len(self.call_seconds)


def step_rollout(graphdef: nnx.GraphDef, params: Any, rng: jax.Array, *,
                 prompts: Sequence[Sequence[int]], sampling: SamplingConfig, max_steps: int,
                 step_stop_ids: Sequence[int], eos_ids: Sequence[int] = (),
                 is_final_step: Callable[[tuple[int, ...]], bool] | None = None,
                 tokenizer: Any = None,
                 on_step: Callable[[int, int, tuple[int, ...]], None] | None = None,
                 model_config: LlamaConfig | None = None) -> StepRollout:
  """Rolls out B problems step by step (see the module docstring).

  Args:
    graphdef, params: `nnx.split(model)` of a `Llama`.
    rng: PRNG key; round i samples with `fold_in(rng, i)` (unused when greedy).
    prompts: B prompts of token ids (any lengths >= 1).
    sampling: how each step is decoded; `max_new_tokens` is the step length limit and
      `num_candidates` must be 1 (sample K candidate steps with `sample_steps`).
    max_steps: steps per problem at most.
    step_stop_ids: ids that end a step (`delimiter_token_ids(tokenizer, "\\n")`).
    eos_ids: ids that end a problem, besides the model config's EOS ids (unless
      `sampling.ignore_eos`); they end the step too.
    is_final_step: `is_final_step(step_ids)` true ends the problem after that step.
    tokenizer: when given, `texts` holds each step decoded.
    on_step: called as `on_step(step_index, problem_index, step_ids)` as each step arrives.
    model_config: the model's config when the caller holds it (else read from the graph).
  """
  if sampling.num_candidates != 1:
    raise ValueError(f"sampling.num_candidates={sampling.num_candidates}: a rollout decodes one "
                     "continuation per problem (use sample_steps for K candidates)")
  if max_steps < 1:
    raise ValueError(f"max_steps={max_steps}: expected >= 1")
  if model_config is None:
    model_config = model_config_of(graphdef, params)
  num = len(prompts)
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if num == 0 or lengths.min() < 1:
    raise ValueError(f"prompts have lengths {lengths.tolist()}: expected at least one prompt, "
                     "each of at least one token")
  tokens = np.zeros((num, int(lengths.max())), np.int32)
  for b, prompt in enumerate(prompts):
    tokens[b, :len(prompt)] = prompt
  end_ids = set(eos_ids) | (set() if sampling.ignore_eos else set(model_config.eos_token_ids))
  stop_ids = tuple(sorted(set(step_stop_ids) | set(eos_ids)))
  # Each round adds at most N tokens to a row's cache (its pending token + N - 1 sampled).
  cache_max_len = tokens.shape[1] + max_steps * sampling.max_new_tokens
  steps: list[list[tuple[int, ...]]] = [[] for _ in range(num)]
  active = np.ones((num,), bool)
  finished = np.zeros((num,), bool)
  call_seconds, call_tokens = [], []
  model_calls = 0
  cache = None
  for step in range(max_steps):
    start = time.perf_counter()
    result = decode(graphdef, params, jax.random.fold_in(rng, step), tokens=tokens,
                    lengths=lengths, cache=cache, stop_token_ids=stop_ids, sampling=sampling,
                    cache_max_len=cache_max_len, model_config=model_config)
    out, out_lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    call_seconds.append(time.perf_counter() - start)
    model_calls += int(out_lengths.max())  # the prefill, then one forward per further token
    call_tokens.append(int(out_lengths[active].sum()))
    for b in np.flatnonzero(active):
      ids = tuple(int(t) for t in out[b, :out_lengths[b]])
      steps[b].append(ids)
      if on_step is not None:
        on_step(step, int(b), ids)
      if ids[-1] in end_ids or (is_final_step is not None and is_final_step(ids)):
        finished[b], active[b] = True, False
    if not active.any():
      break
    # Continue: each row's last token was sampled but not yet fed through the model.
    cache = result.cache
    tokens = out[np.arange(num), out_lengths - 1][:, None].astype(np.int32)
    lengths = np.ones((num,), np.int32)
  texts = None
  if tokenizer is not None:
    texts = tuple(tuple(tokenizer.decode(list(s)) for s in row) for row in steps)
  return StepRollout(steps=tuple(tuple(row) for row in steps),
                     finished=tuple(bool(f) for f in finished), texts=texts,
                     model_calls=model_calls,
                     tokens_decoded=tuple(sum(len(s) for s in row) for row in steps),
                     call_seconds=tuple(call_seconds), call_tokens=tuple(call_tokens))
