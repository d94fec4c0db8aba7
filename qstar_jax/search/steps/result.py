"""What every LM step search returns, and the host-side reading of it (texts, answers, votes).

A search is a pure jitted function; it returns a `StepSearchResult` holding its `StepTree`
(every node it decoded, with values and steps), the node of the solution it chose per problem,
and the candidate solutions it weighed (best-of-N's N samples, beam's final beams, ...) with
their scores. Compute counters are read from the tree: tokens prefilled and decoded per
problem, batched model calls. Answers are strings, so extracting and voting on them happens on
the host after the search (`read_solutions`, `vote`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import struct

from qstar_jax.distributed import to_host
from qstar_jax.search.steps.step_tree import StepTree, node_step_ids, node_token_ids

__all__ = ["StepSearchResult", "Solution", "format_tree", "read_solutions", "vote"]


@struct.dataclass
class StepSearchResult:
  """A batch of B problems searched; C candidate solutions per problem."""

  tree: StepTree              # every node the search decoded
  chosen: jax.Array           # [B] int32 node of the chosen solution, -1: none
  candidates: jax.Array       # [B, C] int32 nodes of the solutions weighed, -1 padded
  scores: jax.Array           # [B, C] float32 the search's score of each candidate

  @property
  def tokens_decoded(self) -> jax.Array:
    """[B] int32 tokens after the prompts that went through the model."""
    return self.tree.cache.tokens_decoded

  @property
  def tokens_prefilled(self) -> jax.Array:
    """[B] int32 prompt tokens that went through the model (each prompt once)."""
    return self.tree.cache.tokens_prefilled

  @property
  def model_calls(self) -> jax.Array:
    """[] int32 batched forward passes."""
    return self.tree.model_calls

  @property
  def overflow(self) -> jax.Array:
    """[B] bool the problem's tree ran out of capacity (its outcome may be incomplete)."""
    return self.tree.cache.overflow


@dataclasses.dataclass(frozen=True)
class Solution:
  """One candidate solution read on the host."""

  node: int
  token_ids: tuple[int, ...]
  text: str | None
  answer: str | None          # the answer the text states, None: no answer stated
  score: float
  finished: bool              # its last step is terminal


def read_solutions(result: StepSearchResult, *, tokenizer: Any = None,
                   extract_answer: Callable[[str], str | None] | None = None
                   ) -> tuple[tuple[Solution | None, tuple[Solution, ...]], ...]:
  """Per problem: (the chosen solution or None, the candidates), decoded on the host.

  Args:
    result: a search's result (device arrays are fetched once).
    tokenizer: decodes token ids to text (None: `text` and `answer` are None).
    extract_answer: text -> the stated answer or None (e.g. `envs.grading.extract_answer`
      style); None: answers are None.
  """
  host = to_host(result)
  tree: StepTree = host.tree

  def solution(node: int, score: float) -> Solution:
    ids = tuple(node_token_ids(tree, node))
    text = tokenizer.decode(ids) if tokenizer is not None else None
    answer = extract_answer(text) if (extract_answer is not None and text is not None) else None
    return Solution(node=node, token_ids=ids, text=text, answer=answer, score=score,
                    finished=bool(tree.terminal[node]))

  out = []
  for b in range(np.asarray(host.chosen).shape[0]):
    cands = tuple(solution(int(n), float(s)) for n, s in zip(host.candidates[b], host.scores[b], strict=True)
                  if n >= 0)
    chosen = int(host.chosen[b])
    pick = next((c for c in cands if c.node == chosen), None)
    if pick is None and chosen >= 0:
      pick = solution(chosen, float("nan"))
    out.append((pick, cands))
  return tuple(out)


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> str | None:
  """The answer with the largest total weight (majority vote: all weights 1).

  None answers (no answer stated) never win; ties go to the answer seen first. Returns None
  when no candidate states an answer.
  """
  if weights is None:
    weights = [1.0] * len(answers)
  if len(weights) != len(answers):
    raise ValueError(f"vote: {len(answers)} answers but {len(weights)} weights")
  totals: dict[str, float] = collections.OrderedDict()
  for a, w in zip(answers, weights, strict=True):
    if a is not None:
      totals[a] = totals.get(a, 0.0) + float(w)
  if not totals:
    return None
  return max(totals, key=lambda a: totals[a])


def format_tree(tree: StepTree, problem: int, *, tokenizer: Any, chosen: int | None = None,
                max_step_chars: int = 70) -> str:
  """Problem `problem`'s search tree as indented text: one line per node with its step, value
  and flags (`*` marks the path to `chosen`, `[end]` a terminal step, `[overflow]` a failed one).
  """
  host = to_host(tree)
  cache = host.cache
  live = np.asarray(cache.node_live)
  parent = np.asarray(cache.node_parent)
  children: dict[int, list[int]] = collections.defaultdict(list)
  for n in np.flatnonzero(live & (np.asarray(cache.node_problem) == problem)):
    if cache.node_depth[n] > 0:
      children[int(parent[n])].append(int(n))
  on_path = set()
  if chosen is not None and chosen >= 0:
    on_path = {int(n) for n in np.asarray(cache.node_path[chosen]) if n >= 0}
  lines = [f"problem {problem}: root (value {float(host.value[problem]):+.3f})"]

  def walk(node: int, indent: str) -> None:
    for c in children.get(node, []):
      text = tokenizer.decode(node_step_ids(host, c))
      if len(text) > max_step_chars:
        text = text[:max_step_chars - 3] + "..."
      flags = (" [end]" if host.terminal[c] else "") + (" [overflow]" if host.failed[c] else "")
      mark = "*" if c in on_path else " "
      lines.append(f"{indent}{mark} v={float(host.value[c]):+.3f} {text!r}{flags}")
      walk(c, indent + "  ")

  walk(problem, "  ")
  return "\n".join(lines)

