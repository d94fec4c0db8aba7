"""Reasoning steps on a tree KV cache: the one expansion every LM step search is built from.

A `StepTree` is a search tree over reasoning steps for B problems at once, in static shapes:
the tree KV cache (`qstar_jax.models.tree_cache`: each prompt prefilled once, every later token
in a shared page pool) plus, per node slot, what a search needs to rank and extend the node:

- `hidden`: the final-normed hidden state after the node's last token (for a root: after the
  prompt). The next token's logits are `lm_head(hidden)`, and the node's value is
  `value_fn(value_params, hidden)`: a node's value costs one small matmul, no extra forward.
- `value`, `log_prob` (the model's log-probability of the node's own step at temperature 1),
  `step_tokens` (the step's ids, `pad_id` after its end), `terminal`, `truncated`, `failed`.

`expand_steps` forks K children of each of W parent rows per problem (`fork_nodes`: the
children share every page of their parent) and decodes one step for all B*W*K rows together,
one token per batched `step_decode`, until every row has sampled a step delimiter or EOS or has
`max_step_tokens` tokens: the parents' suffixes are gathered from the pages once per step
(`gather_ancestors`), the step's keys/values go into a dense buffer and into pages once after
the step (`commit_steps`), so the token loop never touches the page pool. Every sampled token
is fed (the delimiter too), so each node's cache holds its whole sequence and the next
expansion starts from its `hidden` with no recompute: the tokens that pass through the model
are exactly the prompts plus the tree's tokens.

A step is terminal when it holds an EOS id, or one of `final_markers` (token sequences such as
the ids of "The answer is"), so a search never expands a finished solution. A step that reaches
`max_step_tokens` without a delimiter is `truncated` (not terminal: searches may extend it,
or cap depth). A row whose fork or write failed for lack of capacity is `failed` and its
problem's `cache.overflow` flag is set: searches treat failed nodes as unusable and report the
overflow per problem instead of crashing the batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qstar_jax.models.decoding import SamplingConfig, sample_tokens
from qstar_jax.models.tree_cache import (
  StepKV,
  TreeKVCache,
  commit_steps,
  copy_nodes,
  fork_nodes,
  gather_ancestors,
  init_tree_cache,
  release_nodes,
  step_decode,
)

__all__ = [
  "PolicyValueParams",
  "copy_steps",
  "release_steps",
  "StepSpec",
  "StepTree",
  "TreeCapacity",
  "expand_steps",
  "init_step_tree",
  "linear_value",
  "node_step_ids",
  "node_token_ids",
  "step_contains",
  "tree_capacity",
]

ValueFn = Callable[[Any, jax.Array], jax.Array]


@struct.dataclass
class PolicyValueParams:
  """What every LM step search takes as `params`: the policy's weights and an optional value.

  `value` is whatever the search's `value_fn` reads; for `linear_value` (the default) a mapping
  with `kernel` [D, 1] and `bias` [1] (the arrays of `qstar_jax.models.ValueHead`). None: no
  value head; node values are 0 and value-guided searches fall back on other scores.
  """

  policy: Any
  value: Any = None


def linear_value(value_params: Any, hidden: jax.Array) -> jax.Array:
  """v = h . kernel + bias for hidden [..., D] -> [...] float32; 0 when `value_params` is None."""
  if value_params is None:
    return jnp.zeros(hidden.shape[:-1], jnp.float32)
  kernel = jnp.asarray(value_params["kernel"], jnp.float32)
  bias = jnp.asarray(value_params["bias"], jnp.float32)
  return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), kernel[:, 0]) + bias[0]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What a reasoning step is, for one policy and task (hashable: a static jit argument).

  Attributes:
    stop_ids: token ids that end a step (e.g. the newline); the step keeps the delimiter.
    eos_ids: token ids that end the solution; a step holding one is terminal.
    max_step_tokens: T, the most tokens in one step.
    final_markers: token-id sequences (e.g. the ids of "The answer is") whose presence in a step
      makes it terminal: a solution that states its answer is finished.
    pad_id: written in `step_tokens` after a step's end.
  """

  stop_ids: tuple[int, ...]
  eos_ids: tuple[int, ...] = ()
  max_step_tokens: int = 32
  final_markers: tuple[tuple[int, ...], ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    object.__setattr__(self, "final_markers",
                       tuple(tuple(int(i) for i in m) for m in self.final_markers))
    if not self.stop_ids and not self.eos_ids:
      raise ValueError("StepSpec: stop_ids and eos_ids are both empty: expected at least one "
                       "token id that ends a step")
    if self.max_step_tokens < 1:
      raise ValueError(f"max_step_tokens={self.max_step_tokens}: expected >= 1")
    for marker in self.final_markers:
      if not 0 < len(marker) <= self.max_step_tokens:
        raise ValueError(f"final marker {marker}: expected 1..max_step_tokens="
                         f"{self.max_step_tokens} token ids")


@dataclasses.dataclass(frozen=True)
class TreeCapacity:
  """Static sizes of a `StepTree` (all per batch, shared by its B problems)."""

  max_nodes: int            # node slots, roots included
  num_pages: int            # pages in the pool
  page_len: int             # tokens per page
  max_pages_per_node: int   # page-table width: a node holds <= this * page_len tokens
  max_depth: int            # steps from a root to any node

  def check(self, num_problems: int) -> None:
    for name in ("max_nodes", "num_pages", "page_len", "max_pages_per_node"):
      if getattr(self, name) < 1:
        raise ValueError(f"TreeCapacity.{name}={getattr(self, name)}: expected >= 1")
    if self.max_depth < 1:
      raise ValueError(f"TreeCapacity.max_depth={self.max_depth}: expected >= 1")
    if self.max_nodes < num_problems:
      raise ValueError(f"TreeCapacity.max_nodes={self.max_nodes}: expected >= the "
                       f"{num_problems} problems (one root each)")


def tree_capacity(num_problems: int, *, nodes_per_problem: int, max_depth: int,
                  max_step_tokens: int, page_len: int = 16,
                  page_slack: float = 1.0) -> TreeCapacity:
  """Capacities that never overflow for `nodes_per_problem` nodes per problem (root excluded).

  Each node holds at most ceil(T / page_len) + 1 pages of its own (its step, plus a private copy
  of its parent's partial page), so `num_pages` = nodes * that bound * page_slack (< 1 trades
  memory for the risk of an overflow, which is reported, never silent).
  """
  if nodes_per_problem < 1:
    raise ValueError(f"nodes_per_problem={nodes_per_problem}: expected >= 1")
  if max_depth < 1:
    raise ValueError(f"max_depth={max_depth}: expected >= 1")
  if page_len < 1 or max_step_tokens < 1:
    raise ValueError(f"page_len={page_len}, max_step_tokens={max_step_tokens}: expected >= 1")
  nodes = num_problems * (nodes_per_problem + 1)
  own_pages = math.ceil(max_step_tokens / page_len) + 1
  return TreeCapacity(
    max_nodes=nodes,
    num_pages=max(1, math.ceil(num_problems * nodes_per_problem * own_pages * page_slack)),
    page_len=page_len,
    max_pages_per_node=math.ceil(max_depth * max_step_tokens / page_len) + 1,
    max_depth=max_depth)


@struct.dataclass
class StepTree:
  """The tree KV cache of B problems plus each node slot's step, state and value."""

  cache: TreeKVCache          # pages, node table, per-problem token counters and overflow flags
  hidden: jax.Array           # [N, D] compute dtype, state after the node's last token
  value: jax.Array            # [N] float32 value_fn at `hidden` (0 without a value head)
  log_prob: jax.Array         # [N] float32 model log-prob of the node's own step (0 for roots)
  step_tokens: jax.Array      # [N, T] int32 the node's own step, pad_id after its end
  terminal: jax.Array         # [N] bool the step holds EOS or a final marker
  truncated: jax.Array        # [N] bool the step reached T tokens without a delimiter
  failed: jax.Array           # [N] bool the node could not be decoded (capacity overflow)
  model_calls: jax.Array      # [] int32 batched forward passes (prefill + one per token step)

  @property
  def step_length(self) -> jax.Array:
    """[N] int32 tokens of each node's own step."""
    return self.cache.node_step_length

  @property
  def usable(self) -> jax.Array:
    """[N] bool live nodes whose step decoded fully (not failed)."""
    return self.cache.node_live & ~self.failed

  @property
  def expandable(self) -> jax.Array:
    """[N] bool usable nodes that may get children (not terminal, below max_depth)."""
    return self.usable & ~self.terminal & (self.cache.node_depth < self.cache.max_depth)


def init_step_tree(params: PolicyValueParams, *, graphdef: nnx.GraphDef,
                   prompt_tokens: jax.Array, prompt_lengths: jax.Array, capacity: TreeCapacity,
                   spec: StepSpec, value_fn: ValueFn = linear_value) -> StepTree:
  """Prefill B right-padded prompts; node b is problem b's root (traceable, no jit of its own).

  Args:
    params: the policy's weights and optional value head.
    graphdef: `nnx.split` graph of the policy `Llama`.
    prompt_tokens: [B, P] int32; prompt_lengths: [B] int32 (each >= 1).
    capacity, spec: static sizes and step definition.
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  cache, roots = init_tree_cache(
    graphdef, params.policy, prompt_tokens, prompt_lengths, page_len=capacity.page_len,
    num_pages=capacity.num_pages, max_nodes=capacity.max_nodes,
    max_pages_per_node=capacity.max_pages_per_node, max_depth=capacity.max_depth)
  b = prompt_tokens.shape[0]
  n = capacity.max_nodes
  root_hidden = roots.hidden[:, 0]                                       # [B, D]
  hidden = jnp.zeros((n, root_hidden.shape[-1]), root_hidden.dtype).at[:b].set(root_hidden)
  value = jnp.zeros((n,), jnp.float32).at[:b].set(value_fn(params.value, root_hidden))
  return StepTree(
    cache=cache, hidden=hidden, value=value, log_prob=jnp.zeros((n,), jnp.float32),
    step_tokens=jnp.full((n, spec.max_step_tokens), spec.pad_id, jnp.int32),
    terminal=jnp.zeros((n,), bool), truncated=jnp.zeros((n,), bool),
    failed=jnp.zeros((n,), bool), model_calls=jnp.ones((), jnp.int32))


def step_contains(tokens: jax.Array, lengths: jax.Array,
                  markers: Sequence[Sequence[int]]) -> jax.Array:
  """[R] bool: row r's first lengths[r] tokens of `tokens` [R, T] hold one of `markers`."""
  r, t = tokens.shape
  found = jnp.zeros((r,), bool)
  for marker in markers:
    m = len(marker)
    for start in range(t - m + 1):
      window = tokens[:, start:start + m] == jnp.asarray(marker, jnp.int32)[None, :]
      found = found | (jnp.all(window, axis=1) & (start + m <= lengths))
  return found


@struct.dataclass
class _StepLoop:
  """Carry of the step-decoding while_loop over R = B * W * K rows."""

  t: jax.Array                # [] int32 tokens sampled so far
  kv: StepKV                  # parents' suffixes and the step's key/value buffer
  logits: jax.Array           # [R, V] float32 next-token logits
  hidden: jax.Array           # [R, D] state after the row's last token
  tokens: jax.Array           # [R, T] int32
  length: jax.Array           # [R] int32
  log_prob: jax.Array         # [R] float32
  active: jax.Array           # [R] bool still decoding
  ended: jax.Array            # [R] bool sampled a delimiter / EOS
  eos: jax.Array              # [R] bool sampled an EOS
  calls: jax.Array            # [] int32


def expand_steps(params: PolicyValueParams, rng_key: jax.Array, tree: StepTree,
                 parents: jax.Array, *, graphdef: nnx.GraphDef, spec: StepSpec,
                 sampling: SamplingConfig, num_children: int, valid: jax.Array | None = None,
                 value_fn: ValueFn = linear_value) -> tuple[StepTree, jax.Array]:
  """K new child steps of each parent row, decoded together (traceable, no jit of its own).

  Args:
    params: policy (and value) weights.
    rng_key: consumed.
    tree: the search tree.
    parents: [B, W] int32 node ids, row b's nodes of problem b (distinct or not).
    graphdef, spec, value_fn: the policy's graph, the step definition, the value head.
    sampling: the token sampler (`greedy`, `temperature`, `top_k`, `top_p`; its
      `max_new_tokens` is ignored: `spec.max_step_tokens` bounds a step).
    num_children: K, static.
    valid: [B, W] bool rows to expand (default all); rows whose parent is not expandable
      (terminal, failed, dead, at max depth) are skipped.
  Returns:
    (tree, children [B, W, K] int32 node ids, -1 where none was made).
  """
  parents = jnp.asarray(parents, jnp.int32)
  b, w = parents.shape
  k = num_children
  if valid is None:
    valid = jnp.ones((b, w), bool)
  valid = valid & tree.expandable[parents]
  cache, children = fork_nodes(tree.cache, parents.reshape(-1), num_children=k,
                               valid=valid.reshape(-1))
  children = children.reshape(b, w * k)                                 # [B, WK]
  made = (children >= 0).reshape(-1)
  model = nnx.merge(graphdef, params.policy)
  hidden0 = jnp.repeat(tree.hidden[parents.reshape(-1)], k, axis=0)     # [R, D]
  r, t_max = b * w * k, spec.max_step_tokens
  stop = jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32)
  eos_ids = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,), jnp.int32)
  # The parents' suffixes are read from the pages once; the step's tokens go into a dense
  # buffer and into pages once after the loop (`commit_steps`): the loop never touches the pool.
  state = _StepLoop(
    t=jnp.zeros((), jnp.int32),
    kv=gather_ancestors(cache, jnp.where(valid, parents, -1), num_children=k, max_tokens=t_max),
    logits=model.logits(hidden0), hidden=hidden0,
    tokens=jnp.full((r, t_max), spec.pad_id, jnp.int32), length=jnp.zeros((r,), jnp.int32),
    log_prob=jnp.zeros((r,), jnp.float32), active=made, ended=jnp.zeros((r,), bool),
    eos=jnp.zeros((r,), bool), calls=jnp.zeros((), jnp.int32))

  fused = model.fused_decode_weights()   # built once, outside the token loop

  def cond(s: _StepLoop):
    return (s.t < t_max) & jnp.any(s.active)

  def body(s: _StepLoop) -> _StepLoop:
    tok, lp, _ = sample_tokens(s.logits, jax.random.fold_in(rng_key, s.t), sampling)
    kv, out = step_decode(graphdef, params.policy, cache, s.kv, s.t, tok.reshape(b, w * k),
                          fused)
    fed = s.active
    is_stop = jnp.any(tok[:, None] == stop[None, :], axis=1)
    is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=1)
    hidden = jnp.where(fed[:, None], out.hidden.reshape(r, -1), s.hidden)
    return _StepLoop(
      t=s.t + 1, kv=kv, logits=out.logits.reshape(r, -1), hidden=hidden,
      tokens=s.tokens.at[:, s.t].set(jnp.where(fed, tok, spec.pad_id)),
      length=s.length + fed, log_prob=s.log_prob + jnp.where(fed, lp, 0.0),
      active=fed & ~is_stop, ended=s.ended | (fed & is_stop), eos=s.eos | (fed & is_eos),
      calls=s.calls + 1)

  s = jax.lax.while_loop(cond, body, state)
  cache, committed = commit_steps(cache, s.kv, children, s.length.reshape(b, w * k))
  failed = made & ~committed.reshape(-1)
  terminal = s.eos | step_contains(s.tokens, s.length, spec.final_markers)
  flat = children.reshape(-1)
  dst = jnp.where(made, flat, tree.cache.max_nodes)

  def put(field, value):
    return field.at[dst].set(value, mode="drop")

  tree = tree.replace(
    cache=cache, hidden=put(tree.hidden, s.hidden.astype(tree.hidden.dtype)),
    value=put(tree.value, value_fn(params.value, s.hidden)),
    log_prob=put(tree.log_prob, s.log_prob), step_tokens=put(tree.step_tokens, s.tokens),
    terminal=put(tree.terminal, terminal & ~failed),
    truncated=put(tree.truncated, ~s.ended & ~failed), failed=put(tree.failed, failed),
    model_calls=tree.model_calls + s.calls)
  return tree, children.reshape(b, w, k)


def copy_steps(tree: StepTree, sources: jax.Array, targets: jax.Array,
               valid: jax.Array | None = None) -> StepTree:
  """targets[i] becomes a copy of node sources[i], pages (shared) and step fields alike.

  For resampling (particle filtering) and pruning (beam search): no key/value moves. Sources
  are read before targets are written. Arrays [M] int32 (`valid` [M] bool, default all).
  """
  sources = jnp.asarray(sources, jnp.int32)
  targets = jnp.asarray(targets, jnp.int32)
  if valid is None:
    valid = jnp.ones(sources.shape, bool)
  valid = valid & tree.cache.node_live[sources]
  dst = jnp.where(valid, targets, tree.cache.max_nodes)

  def put(field):
    return field.at[dst].set(field[sources], mode="drop")

  return tree.replace(
    cache=copy_nodes(tree.cache, sources, targets, valid), hidden=put(tree.hidden),
    value=put(tree.value), log_prob=put(tree.log_prob), step_tokens=put(tree.step_tokens),
    terminal=put(tree.terminal), truncated=put(tree.truncated), failed=put(tree.failed))


def release_steps(tree: StepTree, nodes: jax.Array, valid: jax.Array | None = None) -> StepTree:
  """Free node slots (their pages lose a reference). Release only nodes no live node descends
  from through `node_path` reads on the host (`node_token_ids`): leaves that were pruned."""
  nodes = jnp.asarray(nodes, jnp.int32)
  if valid is None:
    valid = jnp.ones(nodes.shape, bool)
  dst = jnp.where(valid & tree.cache.node_live[nodes], nodes, tree.cache.max_nodes)
  return tree.replace(cache=release_nodes(tree.cache, nodes, valid),
                      terminal=tree.terminal.at[dst].set(False, mode="drop"),
                      failed=tree.failed.at[dst].set(False, mode="drop"))


# ----------------------------------------------------------------------------- host helpers


def node_step_ids(tree: StepTree, node: int) -> list[int]:
  """The token ids of node's own step (host)."""
  length = int(np.asarray(tree.step_length[node]))
  return [int(i) for i in np.asarray(tree.step_tokens[node, :length])]


def node_token_ids(tree: StepTree, node: int) -> list[int]:
  """Every token id after the prompt on the path root..node, in order (host)."""
  path = np.asarray(tree.cache.node_path[node])
  ids: list[int] = []
  for n in path[1:]:
    if n < 0:
      break
    ids.extend(node_step_ids(tree, int(n)))
  return ids
