"""Node scorers: scores other than the policy's value head, written into `StepTree.value`.

Every step search ranks nodes by `tree.value`, which `expand_steps` fills with
`value_fn(params.value, hidden)`. A `NodeScorer` computes a node's score from the tree itself
(its tokens, its terminal flag) and its own parameters; `scored_expand(scorer)` is an
`expand_fn` (`expand_steps`'s signature) that decodes the children and then overwrites their
values with the scorer's, so MCTS, beam, Q-guided, best-of-N and particle filtering use it
unchanged. `params.value` is then the scorer's dict, and the search's `value_fn` must be
`zero_value` (roots, which `init_step_tree` scores with `value_fn`, score 0).

- `VerifierReward`: the environment's outcome reward (MCTS annotation on train problems, Zhai
  et al.): 1.0 for a terminal node whose solution states the reference answer, 0.0 for any
  other terminal node and for every non-terminal one. With `value_source="rollout"` MCTS then
  backs up Monte Carlo outcome estimates. Solutions are decoded and graded on the host
  (`jax.pure_callback`; the grader is `envs.grading`).
- `LogRatioQ`: the step-level Q-value of a Q-model trained by step-DPO (Zhai et al.),
  `Q = beta * mean over the node's own step tokens of (log pi_q(tok|ctx) - log pi_ref(tok|ctx))`,
  pi_q and pi_ref two Llamas of one graph, e.g. the policy's (the Q-model and its frozen
  reference; they must share the policy's tokenizer), by
  full causal forwards (no KV cache) over prompt + ancestor steps + the node's step.

- `PathLogRatio`: an implicit PRM's value of a partial solution (PRIME), `beta * sum over all
  its solution tokens of (log pi_prm - log pi_ref)`.
- `ModelValue`: a separate value model's linear head on its own hidden state after the node's
  last token (OREO's value model run beside another policy).
- `StepVerifier`: a process reward model that checks each step alone
  (`training.step_verifier`): the product over the node's steps of ``P(step correct)``.

`path_tokens` assembles those sequences from the tree (traceable).

References: Zhai et al., "Enhancing Decision-Making for LLM Agents via Step-Level Q-Value
Models" (2024), sec. 3 (MCTS annotation, step-level DPO, Q = beta * mean log-ratio).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qstar_jax.envs.grading import answers_match, normalize_number, stated_answer
from qstar_jax.models.llama import apply_hidden, apply_logits
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  StepTree,
  ValueFn,
  expand_steps,
  linear_value,
)

__all__ = [
  "LogRatioQ",
  "ModelValue",
  "NodeScorer",
  "PathLogRatio",
  "PathTokens",
  "ScoredExpand",
  "StepVerifier",
  "VerifierReward",
  "encode_answers",
  "model_value_params",
  "path_log_probs",
  "path_tokens",
  "step_alone_tokens",
  "path_width",
  "q_model_value_params",
  "line_logits",
  "scored_expand",
  "step_verifier_value_params",
  "verifier_value_params",
  "zero_value",
]


@struct.dataclass
class PathTokens:
  """Token sequences of tree nodes: prompt, then each step root..node, left-aligned."""

  tokens: jax.Array           # [M, width] int32, pad_id after `lengths`
  lengths: jax.Array          # [M] int32 tokens of the sequence (0 for node -1)
  step_start: jax.Array       # [M] int32 index of the node's own first step token
  prompt_length: jax.Array    # [M] int32 tokens of the node's prompt


def step_alone_tokens(tree: StepTree, nodes: jax.Array, bos_id: int) -> PathTokens:
  """Each node's own step alone after ``bos_id``: tokens [M, 1 + T] (``[bos_id] + step``, the
  step's pads after its length), step_start 1, prompt_length 1; node -1 gives length 0."""
  nodes = jnp.asarray(nodes, jnp.int32)
  safe = jnp.maximum(nodes, 0)
  steps = tree.step_tokens[safe]                                                 # [M, T]
  tokens = jnp.concatenate([jnp.full((steps.shape[0], 1), bos_id, jnp.int32), steps], axis=1)
  ones = jnp.ones(nodes.shape, jnp.int32)
  lengths = jnp.where(nodes >= 0, 1 + tree.step_length[safe], 0).astype(jnp.int32)
  return PathTokens(tokens=tokens, lengths=lengths, step_start=ones, prompt_length=ones)


def path_width(tree: StepTree, prompt_width: int) -> int:
  """The width every path fits in: prompt width P + max_depth * T (static)."""
  return prompt_width + tree.cache.max_depth * tree.step_tokens.shape[1]


def path_tokens(tree: StepTree, nodes: jax.Array, prompt_tokens: jax.Array,
                prompt_lengths: jax.Array, *, width: int | None = None,
                pad_id: int = 0) -> PathTokens:
  """Prompt + ancestor steps (root..node) + the node's own step, per node (traceable).

  Args:
    tree: the search tree.
    nodes: [M] int32 node ids; -1 gives an empty row (length 0).
    prompt_tokens: [B, P] int32 the tree's right-padded prompts; prompt_lengths: [B] int32.
    width: static output width; None: P + max_depth * T (`path_width`), the longest path.
    pad_id: written after each row's tokens.
  Raises:
    ValueError: width < P + max_depth * T (a path could not fit: nothing is ever cut), or
      prompts whose batch differs from the tree's.
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  batch = tree.cache.prompt.lengths.shape[0]
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[0] != batch:
    raise ValueError(f"prompt_tokens has shape {prompt_tokens.shape}: expected [B, P] with the "
                     f"tree's B={batch}")
  if prompt_lengths.shape != (batch,):
    raise ValueError(f"prompt_lengths has shape {prompt_lengths.shape}: expected [B]=({batch},)")
  p = prompt_tokens.shape[1]
  depth, t = tree.cache.max_depth, tree.step_tokens.shape[1]
  needed = path_width(tree, p)
  if width is None:
    width = needed
  if not isinstance(width, (int, np.integer)) or width < needed:
    raise ValueError(f"width={width!r}: expected an int >= prompt width {p} + max_depth "
                     f"{depth} * max_step_tokens {t} = {needed}, so that no path is cut")
  nodes = jnp.asarray(nodes, jnp.int32)
  m = nodes.shape[0]
  safe = jnp.maximum(nodes, 0)
  real = nodes >= 0
  plen = jnp.where(real, prompt_lengths[tree.cache.node_problem[safe]], 0)      # [M]
  path = tree.cache.node_path[safe][:, 1:]                                      # [M, D]
  on_path = real[:, None] & (path >= 0)
  steps = jnp.where(on_path, tree.step_length[jnp.maximum(path, 0)], 0)         # [M, D]
  starts = plen[:, None] + jnp.cumsum(steps, axis=1) - steps                    # [M, D]
  # Scatter every source token (prompt position i, or token j of the path's step d) to its
  # place; sources past their segment's length go to `width` and are dropped.
  i = jnp.arange(p)
  prompt_dst = jnp.where(i[None, :] < plen[:, None], i[None, :], width)         # [M, P]
  j = jnp.arange(t)
  step_dst = jnp.where(j[None, None, :] < steps[:, :, None],
                       starts[:, :, None] + j[None, None, :], width)            # [M, D, T]
  src = jnp.concatenate([prompt_tokens[tree.cache.node_problem[safe]],
                         tree.step_tokens[jnp.maximum(path, 0)].reshape(m, depth * t)], axis=1)
  dst = jnp.concatenate([prompt_dst, step_dst.reshape(m, depth * t)], axis=1)
  rows = jnp.broadcast_to(jnp.arange(m)[:, None], dst.shape)
  tokens = jnp.full((m, width), pad_id, jnp.int32).at[rows, dst].set(src, mode="drop")
  lengths = plen + jnp.sum(steps, axis=1)
  own = jnp.where(real, tree.step_length[safe], 0)
  return PathTokens(tokens=tokens, lengths=lengths, step_start=lengths - own,
                    prompt_length=plen)


class NodeScorer(Protocol):
  """A node score (a frozen, hashable dataclass: a static jit argument).

  `scorer(value_params, tree, nodes [M] int32) -> [M] float32`, traceable; `value_params` is
  what the search carries as `PolicyValueParams.value`.
  """

  def __call__(self, value_params: Any, tree: StepTree, nodes: jax.Array) -> jax.Array:
    ...


def zero_value(value_params: Any, hidden: jax.Array) -> jax.Array:
  """[...] float32 zeros for hidden [..., D]: the `value_fn` of a search scored by a scorer."""
  del value_params
  return jnp.zeros(hidden.shape[:-1], jnp.float32)


@dataclasses.dataclass(frozen=True)
class ScoredExpand:
  """`expand_steps`, then `scorer(params.value, tree, child)` written into each usable child's
  `tree.value` (equal and hashable for equal scorers: one compilation)."""

  scorer: NodeScorer

  def __call__(self, params: PolicyValueParams, rng_key: jax.Array, tree: StepTree,
               parents: jax.Array, *, graphdef: nnx.GraphDef, spec: Any, sampling: Any,
               num_children: int, valid: jax.Array | None = None,
               value_fn: ValueFn = linear_value) -> tuple[StepTree, jax.Array]:
    # The children's values are overwritten: the value head is not called (`params.value` is
    # the scorer's dict, not a head's).
    del value_fn
    tree, children = expand_steps(params, rng_key, tree, parents, graphdef=graphdef, spec=spec,
                                  sampling=sampling, num_children=num_children, valid=valid,
                                  value_fn=zero_value)
    flat = children.reshape(-1)
    safe = jnp.maximum(flat, 0)
    usable = (flat >= 0) & tree.usable[safe]
    scores = jnp.asarray(self.scorer(params.value, tree, safe), jnp.float32)
    dst = jnp.where(usable, flat, tree.cache.max_nodes)
    return tree.replace(value=tree.value.at[dst].set(scores, mode="drop")), children


def scored_expand(scorer: NodeScorer) -> ScoredExpand:
  """The `expand_fn` of a search scored by `scorer` (pass `value_fn=zero_value` with it)."""
  try:
    hash(scorer)
  except TypeError as e:
    raise ValueError(f"scorer {scorer!r} is not hashable: expected a frozen dataclass (it is a "
                     "static jit argument)") from e
  return ScoredExpand(scorer)


def _require(value_params: Any, keys: Sequence[str], who: str) -> None:
  if not isinstance(value_params, Mapping):
    raise ValueError(f"{who}: value_params is {type(value_params).__name__}: expected a dict "
                     f"with keys {list(keys)} (params.value of the search)")
  missing = [k for k in keys if k not in value_params]
  if missing:
    raise ValueError(f"{who}: value_params lacks {missing}: expected keys {list(keys)}, "
                     f"got {sorted(value_params)}")


# ----------------------------------------------------------------------------- verifier


def encode_answers(references: Sequence[str], max_answer_chars: int = 24) -> np.ndarray:
  """[B, max_answer_chars] uint8: each reference answer's UTF-8 bytes, zero padded.

  Raises:
    ValueError: an answer that is not a number (`grading.normalize_number`) or that needs more
      than max_answer_chars bytes.
  """
  out = np.zeros((len(references), max_answer_chars), np.uint8)
  for b, ref in enumerate(references):
    data = str(ref).encode()
    if normalize_number(str(ref)) is None:
      raise ValueError(f"reference answer {ref!r} (problem {b}) is not a number")
    if len(data) > max_answer_chars or b"\0" in data:
      raise ValueError(f"reference answer {ref!r} (problem {b}) has {len(data)} bytes: expected "
                       f"<= max_answer_chars={max_answer_chars} and no NUL byte")
    out[b, :len(data)] = np.frombuffer(data, np.uint8)
  return out


def verifier_value_params(prompt_tokens: Any, prompt_lengths: Any,
                          answers: Sequence[str] | np.ndarray | jax.Array, *,
                          max_answer_chars: int = 24) -> dict[str, jax.Array]:
  """`params.value` of a `VerifierReward` search: prompts [B, P], [B] and reference answers
  (strings, encoded by `encode_answers`, or already encoded [B, max_answer_chars])."""
  if isinstance(answers, (np.ndarray, jax.Array)):
    encoded = np.asarray(answers)
  else:
    encoded = encode_answers(list(answers), max_answer_chars)
  return {"prompt_tokens": jnp.asarray(prompt_tokens, jnp.int32),
          "prompt_lengths": jnp.asarray(prompt_lengths, jnp.int32),
          "answers": jnp.asarray(encoded, jnp.int32)}


@dataclasses.dataclass(frozen=True, eq=False)
class VerifierReward:
  """Outcome reward: 1.0 for a terminal node whose solution states its problem's answer.

  value_params: `verifier_value_params(...)`: {"prompt_tokens" [B, P], "prompt_lengths" [B],
  "answers" [B, max_answer_chars]}. A terminal usable node's solution (its path after the
  prompt) is decoded by `tokenizer.decode` on the host and scores
  `answers_match(stated_answer(text), reference)` (0.0 when it states no answer); non-terminal
  nodes score 0.0. Equal and hashed by the tokenizer's identity (one per run) and
  max_answer_chars.
  """

  tokenizer: Any
  max_answer_chars: int = 24

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, VerifierReward) and other.tokenizer is self.tokenizer
            and other.max_answer_chars == self.max_answer_chars)

  def __hash__(self) -> int:
    return hash((VerifierReward, id(self.tokenizer), self.max_answer_chars))

  def _grade(self, tokens, lengths, starts, answers, terminal) -> np.ndarray:
    """Host: the reward of each row (the callback's body)."""
    scores = np.zeros(np.shape(terminal), np.float32)
    for r in np.flatnonzero(np.asarray(terminal)):
      ids = [int(i) for i in np.asarray(tokens[r, int(starts[r]):int(lengths[r])])]
      reference = bytes(np.asarray(answers[r], np.uint8)).rstrip(b"\0").decode()
      answer = stated_answer(self.tokenizer.decode(ids))
      scores[r] = float(answer is not None and answers_match(answer, reference))
    return scores

  def __call__(self, value_params: Any, tree: StepTree, nodes: jax.Array) -> jax.Array:
    _require(value_params, ("prompt_tokens", "prompt_lengths", "answers"), "VerifierReward")
    answers = jnp.asarray(value_params["answers"], jnp.int32)
    batch = tree.cache.prompt.lengths.shape[0]
    if answers.shape != (batch, self.max_answer_chars):
      raise ValueError(f"VerifierReward: answers have shape {answers.shape}: expected [B, "
                       f"max_answer_chars]=({batch}, {self.max_answer_chars})")
    nodes = jnp.asarray(nodes, jnp.int32)
    paths = path_tokens(tree, nodes, value_params["prompt_tokens"],
                        value_params["prompt_lengths"])
    safe = jnp.maximum(nodes, 0)
    terminal = (nodes >= 0) & tree.usable[safe] & tree.terminal[safe]
    return jax.pure_callback(
      self._grade, jax.ShapeDtypeStruct(nodes.shape, jnp.float32), paths.tokens, paths.lengths,
      paths.prompt_length, answers[tree.cache.node_problem[safe]], terminal,
      vmap_method="sequential")


# ----------------------------------------------------------------------------- Q-model


def q_model_value_params(q_params: Any, reference_params: Any, prompt_tokens: Any,
                         prompt_lengths: Any) -> dict[str, Any]:
  """`params.value` of a `LogRatioQ` search: the Q-model's and the reference's Llama states
  (both of the policy's graphdef) and the prompts [B, P], [B]."""
  return {"q": q_params, "reference": reference_params,
          "prompt_tokens": jnp.asarray(prompt_tokens, jnp.int32),
          "prompt_lengths": jnp.asarray(prompt_lengths, jnp.int32)}


@dataclasses.dataclass(frozen=True)
class LogRatioQ:
  """Step-level Q of a step-DPO Q-model: `beta * mean_t (log pi_q - log pi_ref)(tok_t | ctx)`
  over the node's own step tokens (the sum with `mean_tokens=False`); 0 for a root.

  value_params: `q_model_value_params(...)`. Each forward runs over the full path (prompt,
  ancestor steps, the node's step: `path_tokens`, width P + max_depth * T); only the T
  positions that predict the node's step go through the LM head.

  With ``step_alone_bos`` set, ``ctx`` is that id alone: both models read ``[step_alone_bos] +
  the node's own step tokens`` (width 1 + T), the input a Q-model trained on step pairs with
  context ``(step_alone_bos,)`` saw (`experiments.qvalue_stepdpo` ``qmodel.context=step``: on the
  arithmetic task a line's arithmetic checks without its context). The prompts in value_params
  are then not read.
  """

  graphdef: nnx.GraphDef
  beta: float
  mean_tokens: bool = True
  step_alone_bos: int | None = None

  def __post_init__(self):
    if not float(self.beta) > 0:
      raise ValueError(f"LogRatioQ: beta={self.beta!r}: expected > 0")

  def step_log_probs(self, params: Any, paths: PathTokens, num_tokens: int) -> jax.Array:
    """[M, num_tokens] float32 log pi(tok | ctx) of the first num_tokens tokens of each node's
    step under Llama state `params` (garbage past the step's length: mask it)."""
    hidden, _ = apply_hidden(self.graphdef, params, paths.tokens)                # [M, W, D]
    j = jnp.arange(num_tokens)
    target_pos = jnp.minimum(paths.step_start[:, None] + j[None, :], paths.tokens.shape[1] - 1)
    # Position p's hidden state predicts token p + 1; step_start >= 1 (a prompt is never empty).
    state = jnp.take_along_axis(hidden, jnp.maximum(target_pos - 1, 0)[:, :, None], axis=1)
    logp = jax.nn.log_softmax(apply_logits(self.graphdef, params, state).astype(jnp.float32),
                              axis=-1)                                           # [M, T, V]
    targets = jnp.take_along_axis(paths.tokens, target_pos, axis=1)
    return jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[:, :, 0]

  def __call__(self, value_params: Any, tree: StepTree, nodes: jax.Array) -> jax.Array:
    _require(value_params, ("q", "reference", "prompt_tokens", "prompt_lengths"), "LogRatioQ")
    nodes = jnp.asarray(nodes, jnp.int32)
    if self.step_alone_bos is None:
      paths = path_tokens(tree, nodes, value_params["prompt_tokens"],
                          value_params["prompt_lengths"])
    else:
      paths = step_alone_tokens(tree, nodes, self.step_alone_bos)
    t = tree.step_tokens.shape[1]
    count = paths.lengths - paths.step_start                                     # [M]
    mask = jnp.arange(t)[None, :] < count[:, None]
    ratio = (self.step_log_probs(value_params["q"], paths, t)
             - self.step_log_probs(value_params["reference"], paths, t))
    total = jnp.sum(jnp.where(mask, ratio, 0.0), axis=1)
    if self.mean_tokens:
      total = total / jnp.maximum(count, 1).astype(jnp.float32)
    return (float(self.beta) * total).astype(jnp.float32)


def path_log_probs(graphdef: nnx.GraphDef, params: Any, paths: PathTokens) -> jax.Array:
  """[M, width - 1] float32 log pi(tok_{p+1} | tok_{<=p}) of every path position under Llama
  state `params`, 0 outside the solution (the tokens after the prompt, up to the path's end)."""
  hidden, _ = apply_hidden(graphdef, params, paths.tokens)                        # [M, W, D]
  logp = jax.nn.log_softmax(apply_logits(graphdef, params, hidden[:, :-1]).astype(jnp.float32),
                            axis=-1)                                              # [M, W-1, V]
  targets = paths.tokens[:, 1:]
  lp = jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[:, :, 0]
  pos = jnp.arange(1, paths.tokens.shape[1])[None, :]                             # target index
  solution = (pos >= paths.prompt_length[:, None]) & (pos < paths.lengths[:, None])
  return jnp.where(solution, lp, 0.0)


@dataclasses.dataclass(frozen=True)
class PathLogRatio:
  """Implicit PRM value of a partial solution (PRIME): `beta * sum over every solution token so
  far of (log pi_prm - log pi_ref)`, i.e. the sum of the per-token process rewards
  `r_t = beta * log pi_prm / pi_ref` from the prompt's end to the node's end; 0 for a root.

  value_params: `q_model_value_params(prm_params, reference_params, prompts, lengths)` (the
  PRM in the "q" slot). Full forwards over each node's path (`path_tokens`), one LM head call
  per position.
  """

  graphdef: nnx.GraphDef
  beta: float

  def __post_init__(self):
    if not float(self.beta) > 0:
      raise ValueError(f"PathLogRatio: beta={self.beta!r}: expected > 0")

  def __call__(self, value_params: Any, tree: StepTree, nodes: jax.Array) -> jax.Array:
    _require(value_params, ("q", "reference", "prompt_tokens", "prompt_lengths"), "PathLogRatio")
    paths = path_tokens(tree, jnp.asarray(nodes, jnp.int32), value_params["prompt_tokens"],
                        value_params["prompt_lengths"])
    ratio = (path_log_probs(self.graphdef, value_params["q"], paths)
             - path_log_probs(self.graphdef, value_params["reference"], paths))
    return (float(self.beta) * jnp.sum(ratio, axis=1)).astype(jnp.float32)


def model_value_params(model_params: Any, head: Mapping[str, Any], prompt_tokens: Any,
                       prompt_lengths: Any) -> dict[str, Any]:
  """`params.value` of a `ModelValue` search: a value model's Llama state, its linear head
  (`{"kernel": [D, 1], "bias": [1]}`) and the prompts [B, P], [B]."""
  return {"model": model_params,
          "head": {"kernel": jnp.asarray(head["kernel"], jnp.float32),
                   "bias": jnp.asarray(head["bias"], jnp.float32)},
          "prompt_tokens": jnp.asarray(prompt_tokens, jnp.int32),
          "prompt_lengths": jnp.asarray(prompt_lengths, jnp.int32)}


@dataclasses.dataclass(frozen=True)
class ModelValue:
  """A separate value model's V(s): its linear head on its own final-normed hidden state after
  the node's last token (OREO's value model, or an outcome-regression value of another model;
  the same reading as `linear_value` on the policy's own tree). Roots score their prompt's
  state. value_params: `model_value_params(...)`."""

  graphdef: nnx.GraphDef

  def __call__(self, value_params: Any, tree: StepTree, nodes: jax.Array) -> jax.Array:
    _require(value_params, ("model", "head", "prompt_tokens", "prompt_lengths"), "ModelValue")
    paths = path_tokens(tree, jnp.asarray(nodes, jnp.int32), value_params["prompt_tokens"],
                        value_params["prompt_lengths"])
    hidden, _ = apply_hidden(self.graphdef, value_params["model"], paths.tokens)  # [M, W, D]
    last = jnp.maximum(paths.lengths - 1, 0)
    state = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]        # [M, D]
    return linear_value(value_params["head"], state)


# ----------------------------------------------------------------------------- step verifier


def line_logits(graphdef: nnx.GraphDef, params: Mapping[str, Any], tokens: jax.Array,
                last: jax.Array) -> jax.Array:
  """[N] float32 logits of ``P(line correct)``: a step verifier's linear head on its hidden
  state at position ``last`` [N] of each row of tokens [N, T]. params: ``{"model": Llama state,
  "head": {"kernel" [D, 1], "bias" [1]}}``."""
  hidden, _ = apply_hidden(graphdef, params["model"], tokens)
  hidden = jnp.take_along_axis(hidden, jnp.asarray(last, jnp.int32)[:, None, None], axis=1)[:, 0]
  head = params["head"]
  return ((hidden.astype(jnp.float32) @ head["kernel"])[:, 0] + head["bias"][0]).astype(
    jnp.float32)


def step_verifier_value_params(model_params: Any, head: Mapping[str, Any]) -> dict[str, Any]:
  """`params.value` of a `StepVerifier` search: the verifier's Llama state and its head
  (``{"kernel": [D, 1], "bias": [1]}``, logits of ``P(step correct)``)."""
  return {"model": model_params,
          "head": {"kernel": jnp.asarray(head["kernel"], jnp.float32),
                   "bias": jnp.asarray(head["bias"], jnp.float32)}}


@dataclasses.dataclass(frozen=True)
class StepVerifier:
  """A step verifier's value of a node: ``value(parent) * P(the node's step is correct)``, the
  probability read by `line_logits` on ``[BOS] + the node's own step tokens`` alone (its last
  token: the delimiter), a depth-1 node's parent counting 1. So a node's value is the product
  over its path of ``P(step correct)`` (a PRM's product aggregation), in [0, 1]. Roots score
  0 (like every scored search's). value_params: `step_verifier_value_params(...)`."""

  graphdef: nnx.GraphDef
  bos_id: int

  def __call__(self, value_params: Any, tree: StepTree, nodes: jax.Array) -> jax.Array:
    _require(value_params, ("model", "head"), "StepVerifier")
    nodes = jnp.asarray(nodes, jnp.int32)
    safe = jnp.maximum(nodes, 0)
    tokens = step_alone_tokens(tree, nodes, self.bos_id).tokens                 # [M, 1 + T]
    p_step = jax.nn.sigmoid(line_logits(self.graphdef, value_params, tokens,
                                        tree.step_length[safe]))
    parent = tree.cache.node_parent[safe]
    safe_parent = jnp.maximum(parent, 0)
    before = jnp.where((parent < 0) | (tree.cache.node_depth[safe_parent] == 0), 1.0,
                       tree.value[safe_parent])
    value = before * p_step
    return jnp.where((nodes >= 0) & (tree.cache.node_depth[safe] > 0), value, 0.0).astype(
      jnp.float32)
