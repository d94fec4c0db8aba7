"""LM step searches besides MCTS: sampling (best-of-N, majority), beam, Q-guided, particle
filtering and best-first (the LLM variant of Q*), each one jitted program batched over problems.

Every search grows a `StepTree` (the tree KV cache plus per-node values and steps) through
`expand_fn` (default `expand_steps`) and returns a `StepSearchResult`: its tree, the chosen
node per problem, the candidate nodes it weighed and their scores. Node values are the value
head's (`value_fn` at the node's hidden state; 0 without a value head).

- `sample_solutions`: N independent solutions per problem (the root forked N ways, then each
  leaf extended by one step per round). Scores: values; chosen: best-of-N by value. Greedy
  decoding is `sample_solutions` with N = 1 and `SamplingConfig(greedy=True)`. Majority vote,
  weighted majority (Qwen2.5-Math rm@N) and best-of-N by a reward run on the host over
  `read_solutions` (`majority_answer`, `weighted_majority_answer`, `best_of_n_by_reward`).
- `beam_search`: value-guided step beam search (OREO, AlphaMath): each round every live beam
  gets E children; the top W by value among {children, finished beams} are kept.
- `q_guided_search`: one path; at each step K candidates, the argmax-value one is kept.
- `particle_filter`: N particles extended one step per round, weighted by softmax(value / tau)
  and resampled (systematic or multinomial) before each extension after the first.
- `best_first_search`: an open list of tree nodes with priority f = g + lam * value (g: minus
  step_cost per step, or the path's log-probability); each iteration pops each problem's best
  node and expands it; a popped terminal node ends the problem.

Choosing. Among a problem's candidates the chosen node is the best-scoring terminal one; a
problem with no terminal candidate gets its best-scoring non-terminal leaf, or -1 (no usable
node); the host then reads "no answer". Failed nodes (capacity overflow) and roots score -inf.

Memory. Pruned branches are released as the search goes (beam, Q-guided, particle: every live
node that is not on the path of a kept node), so the default capacity covers the live nodes,
not every node ever decoded. Overflow is reported per problem (`result.overflow`), never a crash.

Compilation. Every non-array argument (graphdef, spec, sampling's static fields, sizes,
capacity, value_fn, expand_fn) is static; a second batch of the same shapes reuses the
program (`trace_count` counts traces).

Sharding. Every search takes `mesh=` (None: one device, unchanged) and `sharding_rules=`: with
a mesh the B problems are split over its `data` x `fsdp` axes: prompts, the prompts' KV cache,
per-problem counters and every result leaf indexed by problem (`chosen`, `candidates`,
`scores`, `beams`); the tree's page pool and node table are shared by the problems (slots are
allocated for the whole batch) and stay replicated; parameters are placed by the rules. The
program is jitted with explicit in/out shardings, built once per static arguments (see
`search.steps.sharded`). B must divide over data x fsdp (`MeshShapeError` before tracing).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from qstar_jax.distributed import DEFAULT_RULES, Rules
from qstar_jax.models.decoding import SamplingConfig, model_config_of
from qstar_jax.search import open_list
from qstar_jax.search.steps import sharded
from qstar_jax.search.steps.result import Solution, StepSearchResult, vote
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  StepSpec,
  StepTree,
  TreeCapacity,
  ValueFn,
  copy_steps,
  expand_steps,
  init_step_tree,
  linear_value,
  release_steps,
  tree_capacity,
)

__all__ = [
  "BeamSearchResult",
  "PATH_COSTS",
  "RESAMPLING_METHODS",
  "beam_search",
  "best_first_search",
  "best_of_n_by_reward",
  "majority_answer",
  "particle_filter",
  "q_guided_search",
  "resample_ancestors",
  "sample_solutions",
  "trace_count",
  "weighted_majority_answer",
]

RESAMPLING_METHODS = ("systematic", "multinomial")
PATH_COSTS = ("depth", "log_prob")

_TRACES: collections.Counter = collections.Counter()


def trace_count(search: str | None = None) -> int:
  """How many times a search's jitted program was traced (each trace is a compilation).

  `search`: "sample_solutions", "beam_search", "q_guided_search", "particle_filter" or
  "best_first_search"; None: all of them together.
  """
  return sum(_TRACES.values()) if search is None else _TRACES[search]


@struct.dataclass
class BeamSearchResult(StepSearchResult):
  """A `StepSearchResult` plus the beams kept after each round."""

  beams: jax.Array            # [B, max_depth, W] int32 nodes kept after round r, -1 padded


# ----------------------------------------------------------------------------- host checks


def _check_positive(**sizes: Any) -> None:
  for name, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r}: expected an int >= 1")


def _prepare(params: PolicyValueParams, *, graphdef: nnx.GraphDef, prompt_tokens: Any,
             prompt_lengths: Any, spec: StepSpec, sampling: SamplingConfig, max_depth: int,
             capacity: TreeCapacity | None, nodes_per_problem: int,
             **sizes: int) -> tuple[jax.Array, jax.Array, SamplingConfig, TreeCapacity]:
  """Host-side validation shared by the searches; the capacity derived when None.

  Returns (prompt_tokens [B, P] int32, prompt_lengths [B] int32, traced sampling, capacity).
  """
  _check_positive(max_depth=max_depth, **sizes)
  if not isinstance(spec, StepSpec):
    raise ValueError(f"spec={spec!r}: expected a StepSpec")
  sampling.check()
  tokens = np.asarray(prompt_tokens)
  if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
    raise ValueError(f"prompt_tokens has shape {tokens.shape}: expected [B, P] with B, P >= 1")
  b, p = tokens.shape
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != (b,):
    raise ValueError(f"prompt_lengths has shape {lengths.shape}: expected [B]=({b},)")
  if lengths.min() < 1 or lengths.max() > p:
    raise ValueError(f"prompt_lengths {lengths.tolist()}: expected each in 1..P={p}")
  context = model_config_of(graphdef, params.policy).max_position_embeddings
  longest = int(lengths.max()) + max_depth * spec.max_step_tokens
  if longest > context:
    raise ValueError(f"prompt of {int(lengths.max())} tokens + max_depth={max_depth} steps of "
                     f"max_step_tokens={spec.max_step_tokens} = {longest} tokens exceeds the "
                     f"model context of {context} tokens")
  if capacity is None:
    capacity = tree_capacity(b, nodes_per_problem=nodes_per_problem, max_depth=max_depth,
                             max_step_tokens=spec.max_step_tokens)
  capacity.check(b)
  if capacity.max_depth < max_depth:
    raise ValueError(f"capacity.max_depth={capacity.max_depth}: expected >= max_depth="
                     f"{max_depth}")
  return (jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), sampling.traced(),
          capacity)


# ----------------------------------------------------------------------------- traced helpers



class _Model:
  """The static pieces every search threads to `expand_fn` (built inside the traced body)."""

  def __init__(self, *, graphdef, spec, sampling, value_fn, expand_fn, max_depth):
    self.graphdef, self.spec, self.sampling = graphdef, spec, sampling
    self.value_fn, self.expand_fn, self.max_depth = value_fn, expand_fn, max_depth

  def init(self, params, prompt_tokens, prompt_lengths, capacity) -> StepTree:
    return init_step_tree(params, graphdef=self.graphdef, prompt_tokens=prompt_tokens,
                          prompt_lengths=prompt_lengths, capacity=capacity, spec=self.spec,
                          value_fn=self.value_fn)

  def live(self, tree: StepTree, nodes: jax.Array) -> jax.Array:
    """nodes [...] -> bool: a node (not -1) that may get children within the search's depth."""
    safe = jnp.maximum(nodes, 0)
    return (nodes >= 0) & tree.expandable[safe] & (tree.cache.node_depth[safe] < self.max_depth)

  def expand(self, params, rng_key, tree, parents, num_children, valid):
    """expand_fn on parents [B, W] (-1 allowed where `valid` is False) -> (tree, [B, W, K])."""
    valid = valid & self.live(tree, parents)
    return self.expand_fn(params, rng_key, tree, jnp.maximum(parents, 0), graphdef=self.graphdef,
                          spec=self.spec, sampling=self.sampling, num_children=num_children,
                          valid=valid, value_fn=self.value_fn)


def _node_values(tree: StepTree, nodes: jax.Array) -> jax.Array:
  """nodes [...] -> float32 values; -inf for -1, roots and unusable (failed, freed) nodes."""
  safe = jnp.maximum(nodes, 0)
  ok = (nodes >= 0) & tree.usable[safe] & (tree.cache.node_depth[safe] > 0)
  return jnp.where(ok, tree.value[safe], -jnp.inf)


def _choose(tree: StepTree, nodes: jax.Array, scores: jax.Array) -> jax.Array:
  """[B] the best-scoring terminal candidate; else the best-scoring one; -1 when none scores."""
  ok = (nodes >= 0) & (scores > -jnp.inf)
  terminal = ok & tree.terminal[jnp.maximum(nodes, 0)]
  any_terminal = jnp.any(terminal, axis=1, keepdims=True)
  rank = jnp.where(jnp.where(any_terminal, terminal, ok), scores, -jnp.inf)
  pick = jnp.take_along_axis(nodes, jnp.argmax(rank, axis=1)[:, None], axis=1)[:, 0]
  return jnp.where(jnp.any(ok, axis=1), pick, -1)


def _release_unkept(tree: StepTree, keep: jax.Array) -> StepTree:
  """Release every live non-root node that is not on the root path of a node of keep [B, W]."""
  n = tree.cache.max_nodes
  paths = tree.cache.node_path[jnp.maximum(keep.reshape(-1), 0)]        # [BW, D + 1]
  paths = jnp.where((keep.reshape(-1) >= 0)[:, None] & (paths >= 0), paths, n)
  needed = jnp.zeros((n,), bool).at[paths.reshape(-1)].set(True, mode="drop")
  needed = needed | (tree.cache.node_depth == 0)
  return release_steps(tree, jnp.arange(n, dtype=jnp.int32), tree.cache.node_live & ~needed)


def _advance(tree: StepTree, leaves: jax.Array, children: jax.Array) -> tuple[StepTree,
                                                                            jax.Array]:
  """leaves [B, W] move to their one child each [B, W] when it decoded fully; a failed child
  (overflow) is released and its leaf stays (the overflow is flagged on the problem)."""
  safe = jnp.maximum(children, 0)
  failed = (children >= 0) & tree.failed[safe]
  tree = release_steps(tree, safe.reshape(-1), failed.reshape(-1))
  return tree, jnp.where((children >= 0) & ~failed, children, leaves)


def _extend_each(model: _Model, params, rng_key, tree: StepTree,
                 leaves: jax.Array) -> tuple[StepTree, jax.Array]:
  """One more step for each live leaf of leaves [B, W] (K = 1): (tree, the new leaves)."""
  tree, children = model.expand(params, rng_key, tree, leaves, 1, jnp.ones(leaves.shape, bool))
  return _advance(tree, leaves, children[..., 0])


def _particle_weights(tree: StepTree, particles: jax.Array, temperature: jax.Array) -> jax.Array:
  """[B, N] softmax(value / temperature) over each problem's usable particles (0 elsewhere;
  all 0 for a problem with none)."""
  logits = _node_values(tree, particles) / temperature
  any_ok = jnp.any(logits > -jnp.inf, axis=1, keepdims=True)
  weights = jax.nn.softmax(jnp.where(any_ok, logits, 0.0), axis=1)
  return jnp.where(any_ok & (logits > -jnp.inf), weights, 0.0)


def resample_ancestors(rng_key: jax.Array, weights: jax.Array, *,
                       method: str = "systematic") -> jax.Array:
  """[B, N] int32 ancestor indices drawn from normalised weights [B, N] (traceable).

  "systematic": one uniform u per row, particle i takes the first j with
  cumsum(w)[j] > (i + u) / N (each j appears floor or ceil of N w_j times). "multinomial": N
  independent draws from Categorical(w). A row whose weights are all 0 keeps its particles
  (ancestors = 0..N-1).
  """
  if method not in RESAMPLING_METHODS:
    raise ValueError(f"method={method!r}: expected one of {RESAMPLING_METHODS}")
  b, n = weights.shape
  weights = weights.astype(jnp.float32)
  if method == "systematic":
    u = jax.random.uniform(rng_key, (b, 1))
    positions = (jnp.arange(n, dtype=jnp.float32)[None, :] + u) / n             # [B, N]
    cumulative = jnp.cumsum(weights, axis=1)
    cumulative = cumulative / jnp.maximum(cumulative[:, -1:], 1e-30)
    ancestors = jnp.sum(cumulative[:, None, :] <= positions[:, :, None], axis=2)
    ancestors = jnp.minimum(ancestors, n - 1)
  else:
    logits = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)), -jnp.inf)
    ancestors = jax.random.categorical(rng_key, logits, axis=1, shape=(n, b)).T
  identity = jnp.broadcast_to(jnp.arange(n), (b, n))
  return jnp.where(jnp.sum(weights, axis=1, keepdims=True) > 0, ancestors,
                   identity).astype(jnp.int32)


_STATIC = ("graphdef", "spec", "capacity", "value_fn", "expand_fn", "max_depth")


def _jit(*sizes: str):
  return functools.partial(jax.jit, static_argnames=_STATIC + sizes)


@struct.dataclass
class _Rounds:
  """Carry of a round loop: the tree and W nodes per problem (leaves, beams, particles)."""

  round: jax.Array            # [] int32 rounds done
  tree: StepTree
  nodes: jax.Array            # [B, W] int32
  history: jax.Array          # [B, max_depth, W] int32 nodes after each round (beam only)


def _run_rounds(tree: StepTree, nodes: jax.Array, model: _Model, body: Callable, *,
                history: jax.Array | None = None) -> _Rounds:
  """while some node of `nodes` is live and fewer than max_depth rounds ran: body(carry).

  The round bound matters only when expansions fail (overflow): a live node then stays live."""
  def cond(s: _Rounds):
    return (s.round < model.max_depth) & jnp.any(model.live(s.tree, s.nodes))

  if history is None:
    history = jnp.zeros((nodes.shape[0], 0, nodes.shape[1]), jnp.int32)
  return jax.lax.while_loop(cond, body, _Rounds(round=jnp.zeros((), jnp.int32), tree=tree,
                                                nodes=nodes, history=history))


def _result(tree: StepTree, candidates: jax.Array, scores: jax.Array,
            chosen: jax.Array | None = None) -> StepSearchResult:
  if chosen is None:
    chosen = _choose(tree, candidates, scores)
  return StepSearchResult(tree=tree, chosen=chosen.astype(jnp.int32),
                          candidates=candidates.astype(jnp.int32),
                          scores=scores.astype(jnp.float32))


def _call(jitted: Any, result_cls: type, *args: Any, mesh: Mesh | None, rules: Rules,
          **static: Any) -> Any:
  """``jitted(*args, **static)``; with a mesh, the same search sharded over problems
  (``sharded.run_sharded``: prompts, prompt KV and per-problem results split over ``data`` x
  ``fsdp``, the shared page pool and node table replicated, params placed by ``rules``)."""
  if mesh is None:
    return jitted(*args, **static)
  fields = {"beams": sharded.by_problem(mesh)} if result_cls is BeamSearchResult else {}
  return sharded.run_sharded(jitted, *args, mesh=mesh, rules=rules, static=static,
                             out_shardings=sharded.result_shardings(result_cls, mesh, **fields))


def _model(sampling, graphdef, spec, value_fn, expand_fn, max_depth) -> _Model:
  return _Model(graphdef=graphdef, spec=spec, sampling=sampling, value_fn=value_fn,
                expand_fn=expand_fn, max_depth=max_depth)


# ----------------------------------------------------------------------------- sampling


def sample_solutions(params: PolicyValueParams, rng_key: jax.Array, *, graphdef: nnx.GraphDef,
                     prompt_tokens: Any, prompt_lengths: Any, spec: StepSpec,
                     sampling: SamplingConfig, num_samples: int, max_depth: int,
                     capacity: TreeCapacity | None = None, value_fn: ValueFn = linear_value,
                     expand_fn: Callable = expand_steps, mesh: Mesh | None = None,
                     sharding_rules: Rules = DEFAULT_RULES) -> StepSearchResult:
  """N independent solutions per problem, step by step on the tree; best-of-N by value.

  The root is forked N ways at the first step; then each of the N leaves gets one child per
  round until it is terminal or at `max_depth` steps. Candidates [B, N]: the N final nodes;
  scores: their values; chosen: the best-valued terminal one (see the module doc). With N = 1
  and `SamplingConfig(greedy=True)` this is greedy decoding, step by step.

  Raises:
    ValueError: (before tracing) num_samples or max_depth < 1, bad prompts, a prompt plus
      max_depth full steps longer than the model's context, a capacity too small.
  """
  tokens, lengths, sampling, capacity = _prepare(
    params, graphdef=graphdef, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
    spec=spec, sampling=sampling, max_depth=max_depth, capacity=capacity,
    nodes_per_problem=num_samples * max_depth, num_samples=num_samples)
  return _call(_sample_solutions, StepSearchResult, params, rng_key, tokens, lengths, sampling,
               mesh=mesh, rules=sharding_rules, graphdef=graphdef, spec=spec,
               capacity=capacity, value_fn=value_fn, expand_fn=expand_fn, max_depth=max_depth,
               num_samples=num_samples)


@_jit("num_samples")
def _sample_solutions(params, rng_key, prompt_tokens, prompt_lengths, sampling, *, graphdef,
                      spec, capacity, value_fn, expand_fn, max_depth, num_samples):
  _TRACES["sample_solutions"] += 1
  model = _model(sampling, graphdef, spec, value_fn, expand_fn, max_depth)
  tree = model.init(params, prompt_tokens, prompt_lengths, capacity)
  b = prompt_tokens.shape[0]

  # Round 0 extends N copies of the root by one child each: the root forked N ways (the same
  # rows, in the same order, as one fork of K = N children), with one expand_fn call site.
  def body(s: _Rounds) -> _Rounds:
    tree, leaves = _extend_each(model, params, jax.random.fold_in(rng_key, s.round), s.tree,
                                s.nodes)
    return s.replace(round=s.round + 1, tree=tree, nodes=leaves)

  roots = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, num_samples))
  s = _run_rounds(tree, roots, model, body)
  return _result(s.tree, s.nodes, _node_values(s.tree, s.nodes))


# ----------------------------------------------------------------------------- beam search


def beam_search(params: PolicyValueParams, rng_key: jax.Array, *, graphdef: nnx.GraphDef,
                prompt_tokens: Any, prompt_lengths: Any, spec: StepSpec,
                sampling: SamplingConfig, beam_width: int, expansions: int, max_depth: int,
                release_pruned: bool = True, capacity: TreeCapacity | None = None,
                value_fn: ValueFn = linear_value,
                expand_fn: Callable = expand_steps, mesh: Mesh | None = None,
                sharding_rules: Rules = DEFAULT_RULES) -> BeamSearchResult:
  """Value-guided step beam search: W beams, E expansions each, the top W kept by value.

  Round 1 expands the root W times (W * E children); every later round expands each live
  (non-terminal, below max_depth) beam into E children and keeps the W best-valued nodes among
  {those children, the finished beams}: finished beams are carried and compete each round.
  Pruned nodes are released (`release_pruned=False` keeps the whole tree, e.g. to inspect it).
  Stops when no beam is live or after max_depth rounds. Candidates [B, W]: the final beams
  (distinct nodes, -1 where fewer than W exist); scores: their values; `beams` [B, max_depth,
  W]: the beams after each round (-1 after the last round).

  Raises:
    ValueError: (before tracing) beam_width, expansions or max_depth < 1, bad prompts, a
      prompt too long for the model, a capacity too small.
  """
  nodes = beam_width * (max_depth + expansions if release_pruned else expansions * max_depth)
  tokens, lengths, sampling, capacity = _prepare(
    params, graphdef=graphdef, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
    spec=spec, sampling=sampling, max_depth=max_depth, capacity=capacity,
    nodes_per_problem=nodes, beam_width=beam_width, expansions=expansions)
  return _call(_beam_search, BeamSearchResult, params, rng_key, tokens, lengths, sampling,
               mesh=mesh, rules=sharding_rules, graphdef=graphdef, spec=spec,
               capacity=capacity, value_fn=value_fn, expand_fn=expand_fn, max_depth=max_depth,
               beam_width=beam_width, expansions=expansions,
               release_pruned=bool(release_pruned))


@_jit("beam_width", "expansions", "release_pruned")
def _beam_search(params, rng_key, prompt_tokens, prompt_lengths, sampling, *, graphdef, spec,
                 capacity, value_fn, expand_fn, max_depth, beam_width, expansions,
                 release_pruned):
  _TRACES["beam_search"] += 1
  model = _model(sampling, graphdef, spec, value_fn, expand_fn, max_depth)
  tree = model.init(params, prompt_tokens, prompt_lengths, capacity)
  b, w = prompt_tokens.shape[0], beam_width

  def body(s: _Rounds) -> _Rounds:
    live = model.live(s.tree, s.nodes)                                   # [B, W]
    tree, children = model.expand(params, jax.random.fold_in(rng_key, s.round), s.tree,
                                  s.nodes, expansions, live)             # [B, W, E]
    candidates = jnp.concatenate([jnp.where((s.nodes >= 0) & ~live, s.nodes, -1),
                                  children.reshape(b, w * expansions)], axis=1)
    top, index = jax.lax.top_k(_node_values(tree, candidates), w)
    beams = jnp.where(top > -jnp.inf, jnp.take_along_axis(candidates, index, axis=1), -1)
    if release_pruned:
      tree = _release_unkept(tree, beams)
    return s.replace(round=s.round + 1, tree=tree, nodes=beams,
                     history=s.history.at[:, s.round].set(beams))

  roots = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, w))
  s = _run_rounds(tree, roots, model, body,
                  history=jnp.full((b, max_depth, w), -1, jnp.int32))
  beams = jnp.where(s.round > 0, s.nodes, -1)
  result = _result(s.tree, beams, _node_values(s.tree, beams))
  return BeamSearchResult(tree=result.tree, chosen=result.chosen, candidates=result.candidates,
                          scores=result.scores, beams=s.history)


# ----------------------------------------------------------------------------- Q-guided


def q_guided_search(params: PolicyValueParams, rng_key: jax.Array, *, graphdef: nnx.GraphDef,
                    prompt_tokens: Any, prompt_lengths: Any, spec: StepSpec,
                    sampling: SamplingConfig, num_candidates: int, max_depth: int,
                    release_pruned: bool = True, capacity: TreeCapacity | None = None,
                    value_fn: ValueFn = linear_value,
                    expand_fn: Callable = expand_steps, mesh: Mesh | None = None,
                    sharding_rules: Rules = DEFAULT_RULES) -> StepSearchResult:
  """One path per problem: at each step K candidate steps, the one of highest Q kept.

  Q(s, a) of a candidate is its node's value (the value or Q head read at the step's last
  token); the other K - 1 are released (kept with `release_pruned=False`). Ends at a terminal
  step or max_depth steps.
  Candidates [B, 1]: the path's last node; scores: its value; chosen: that node (-1 when
  no step could be decoded).

  Raises:
    ValueError: (before tracing) num_candidates or max_depth < 1, bad prompts, a prompt too
      long for the model, a capacity too small.
  """
  tokens, lengths, sampling, capacity = _prepare(
    params, graphdef=graphdef, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
    spec=spec, sampling=sampling, max_depth=max_depth, capacity=capacity,
    nodes_per_problem=(max_depth + num_candidates if release_pruned
                       else max_depth * num_candidates), num_candidates=num_candidates)
  return _call(_q_guided_search, StepSearchResult, params, rng_key, tokens, lengths, sampling,
               mesh=mesh, rules=sharding_rules, graphdef=graphdef, spec=spec,
               capacity=capacity, value_fn=value_fn, expand_fn=expand_fn, max_depth=max_depth,
               num_candidates=num_candidates, release_pruned=bool(release_pruned))


@_jit("num_candidates", "release_pruned")
def _q_guided_search(params, rng_key, prompt_tokens, prompt_lengths, sampling, *, graphdef,
                     spec, capacity, value_fn, expand_fn, max_depth, num_candidates,
                     release_pruned):
  _TRACES["q_guided_search"] += 1
  model = _model(sampling, graphdef, spec, value_fn, expand_fn, max_depth)
  tree = model.init(params, prompt_tokens, prompt_lengths, capacity)
  b = prompt_tokens.shape[0]

  def body(s: _Rounds) -> _Rounds:
    tree, children = model.expand(params, jax.random.fold_in(rng_key, s.round), s.tree, s.nodes,
                                  num_candidates, model.live(s.tree, s.nodes))
    q = _node_values(tree, children[:, 0])                               # [B, K]
    best = jnp.take_along_axis(children[:, 0], jnp.argmax(q, axis=1)[:, None], axis=1)
    path = jnp.where(jnp.max(q, axis=1, keepdims=True) > -jnp.inf, best, s.nodes)
    if release_pruned:
      tree = _release_unkept(tree, path)
    return s.replace(round=s.round + 1, tree=tree, nodes=path)

  s = _run_rounds(tree, jnp.arange(b, dtype=jnp.int32)[:, None], model, body)
  return _result(s.tree, s.nodes, _node_values(s.tree, s.nodes))


# ----------------------------------------------------------------------------- particles


def particle_filter(params: PolicyValueParams, rng_key: jax.Array, *, graphdef: nnx.GraphDef,
                    prompt_tokens: Any, prompt_lengths: Any, spec: StepSpec,
                    sampling: SamplingConfig, num_particles: int, max_depth: int,
                    temperature_weights: float = 1.0, resampling: str = "systematic",
                    capacity: TreeCapacity | None = None, value_fn: ValueFn = linear_value,
                    expand_fn: Callable = expand_steps, mesh: Mesh | None = None,
                    sharding_rules: Rules = DEFAULT_RULES) -> StepSearchResult:
  """Particle filtering over steps: N particles, weighted by their values, resampled each round.

  Round 1 extends N copies of the root by one step each; every later round first resamples
  the N particles (`resample_ancestors` with weights w_i = softmax_i(value_i / tau) over the
  problem's usable particles; finished particles keep their node, hence their weight, and may
  be duplicated or dropped like the others), copies the drawn nodes into the particle slots
  (`copy_steps`: shared pages, no recompute; nodes no particle descends from are released),
  then extends each live particle by one step. Stops when no particle is live or after
  max_depth rounds. Candidates [B, N]: the particles; scores: their final weights
  (normalised: each row sums to 1, or 0 without a usable particle); chosen: the
  highest-weight terminal particle. Weighted majority on the host: `weighted_majority_answer`.

  Raises:
    ValueError: (before tracing) num_particles or max_depth < 1, temperature_weights <= 0, an
      unknown resampling method, bad prompts, a prompt too long, a capacity too small.
  """
  if not float(temperature_weights) > 0:
    raise ValueError(f"temperature_weights={temperature_weights!r}: expected > 0")
  if resampling not in RESAMPLING_METHODS:
    raise ValueError(f"resampling={resampling!r}: expected one of {RESAMPLING_METHODS}")
  tokens, lengths, sampling, capacity = _prepare(
    params, graphdef=graphdef, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
    spec=spec, sampling=sampling, max_depth=max_depth, capacity=capacity,
    nodes_per_problem=num_particles * (max_depth + 1), num_particles=num_particles)
  return _call(_particle_filter, StepSearchResult, params, rng_key, tokens, lengths, sampling,
               jnp.asarray(temperature_weights, jnp.float32), mesh=mesh, rules=sharding_rules,
               graphdef=graphdef, spec=spec, capacity=capacity, value_fn=value_fn,
               expand_fn=expand_fn, max_depth=max_depth, num_particles=num_particles,
               resampling=resampling)


@_jit("num_particles", "resampling")
def _particle_filter(params, rng_key, prompt_tokens, prompt_lengths, sampling,
                     temperature_weights, *, graphdef, spec, capacity, value_fn, expand_fn,
                     max_depth, num_particles, resampling):
  _TRACES["particle_filter"] += 1
  model = _model(sampling, graphdef, spec, value_fn, expand_fn, max_depth)
  tree = model.init(params, prompt_tokens, prompt_lengths, capacity)
  b = prompt_tokens.shape[0]

  def body(s: _Rounds) -> _Rounds:
    resample_key, expand_key = jax.random.split(jax.random.fold_in(rng_key, s.round))
    weights = _particle_weights(s.tree, s.nodes, temperature_weights)
    ancestors = resample_ancestors(resample_key, weights, method=resampling)
    sources = jnp.take_along_axis(s.nodes, ancestors, axis=1)
    # Particle nodes are distinct leaves after round 1 (roots only before it, never targets).
    copy = (s.round > 0) & (sources != s.nodes) & (s.tree.cache.node_depth[s.nodes] > 0)
    tree = copy_steps(s.tree, sources.reshape(-1), s.nodes.reshape(-1), copy.reshape(-1))
    tree = _release_unkept(tree, s.nodes)
    tree, particles = _extend_each(model, params, expand_key, tree, s.nodes)
    return s.replace(round=s.round + 1, tree=tree, nodes=particles)

  roots = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, num_particles))
  s = _run_rounds(tree, roots, model, body)
  weights = _particle_weights(s.tree, s.nodes, temperature_weights)
  usable = _node_values(s.tree, s.nodes) > -jnp.inf
  chosen = _choose(s.tree, s.nodes, jnp.where(usable, weights, -jnp.inf))
  return _result(s.tree, s.nodes, weights, chosen)


# ----------------------------------------------------------------------------- best-first


@struct.dataclass
class _BestFirst:
  """Carry of the best-first loop."""

  iteration: jax.Array        # [] int32 pops done
  tree: StepTree
  tables: open_list.SearchTables  # [B, ...] one open list per problem (node ids as entries)
  done: jax.Array             # [B] bool a terminal node was popped, or the open list is empty
  chosen: jax.Array           # [B] int32 the popped terminal node, -1 before
  popped: jax.Array           # [B, budget] int32 nodes popped in order, -1 padded
  popped_f: jax.Array         # [B, budget] float32 their f, -inf padded


def best_first_search(params: PolicyValueParams, rng_key: jax.Array, *,
                      graphdef: nnx.GraphDef, prompt_tokens: Any, prompt_lengths: Any,
                      spec: StepSpec, sampling: SamplingConfig, num_candidates: int,
                      expansions_budget: int, max_depth: int, lam: float = 1.0,
                      step_cost: float = 0.0, path_cost: str = "depth",
                      capacity: TreeCapacity | None = None, value_fn: ValueFn = linear_value,
                      expand_fn: Callable = expand_steps, mesh: Mesh | None = None,
                      sharding_rules: Rules = DEFAULT_RULES) -> StepSearchResult:
  """Best-first search over steps (the LLM variant of Q*): pop the best node, expand K children.

  Priority (highest first) f(n) = g(n) + lam * value(n), with g = -step_cost * depth
  (`path_cost="depth"`) or the path's summed step log-probabilities (`path_cost="log_prob"`).
  The root is pushed first; each iteration pops each unfinished problem's best node: a
  terminal node ends the problem (it is chosen); any other node gets K children (one batched
  `expand_fn` call for the batch), which are pushed, except a child whose step repeats an
  earlier sibling's tokens (the same state: released). Ends after `expansions_budget` pops or
  when every problem is done (terminal pop, or empty open list). A problem that never pops a
  terminal node chooses the best terminal node left on its open list, else its best node.

  The open list is the puzzle search's (`search.open_list`: `init_tables`, `push`, `pop`, one
  per problem under vmap) with tree node ids as entries; its node store and closed set stay
  unused, since every tree node is a distinct state and duplicates are siblings only.

  Candidates [B, expansions_budget]: the nodes popped, in order (-1 padded); scores: their f
  (-inf padded).

  Raises:
    ValueError: (before tracing) num_candidates, expansions_budget or max_depth < 1, an
      unknown path_cost, bad prompts, a prompt too long, a capacity too small.
  """
  if path_cost not in PATH_COSTS:
    raise ValueError(f"path_cost={path_cost!r}: expected one of {PATH_COSTS}")
  for name, value in (("lam", lam), ("step_cost", step_cost)):
    if not math.isfinite(float(value)):
      raise ValueError(f"{name}={value!r}: expected a finite number")
  tokens, lengths, sampling, capacity = _prepare(
    params, graphdef=graphdef, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
    spec=spec, sampling=sampling, max_depth=max_depth, capacity=capacity,
    nodes_per_problem=expansions_budget * num_candidates, num_candidates=num_candidates,
    expansions_budget=expansions_budget)
  return _call(_best_first_search, StepSearchResult, params, rng_key, tokens, lengths, sampling,
               jnp.asarray(lam, jnp.float32), jnp.asarray(step_cost, jnp.float32),
               mesh=mesh, rules=sharding_rules, graphdef=graphdef, spec=spec,
               capacity=capacity, value_fn=value_fn, expand_fn=expand_fn, max_depth=max_depth,
               num_candidates=num_candidates, expansions_budget=expansions_budget,
               path_cost=path_cost)


def _duplicate_siblings(tree: StepTree, children: jax.Array, made: jax.Array) -> jax.Array:
  """[B, K] bool: a made child whose step equals an earlier made sibling's (tokens, length)."""
  safe = jnp.maximum(children, 0)
  steps = tree.step_tokens[safe]                                          # [B, K, T]
  length = tree.step_length[safe]
  same = (jnp.all(steps[:, :, None, :] == steps[:, None, :, :], axis=-1)
          & (length[:, :, None] == length[:, None, :]))                   # [B, K, K]
  k = children.shape[1]
  earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]               # [i, j]: j < i
  return made & jnp.any(same & earlier[None] & made[:, None, :], axis=2)


@_jit("num_candidates", "expansions_budget", "path_cost")
def _best_first_search(params, rng_key, prompt_tokens, prompt_lengths, sampling, lam, step_cost,
                       *, graphdef, spec, capacity, value_fn, expand_fn, max_depth,
                       num_candidates, expansions_budget, path_cost):
  _TRACES["best_first_search"] += 1
  model = _model(sampling, graphdef, spec, value_fn, expand_fn, max_depth)
  tree = model.init(params, prompt_tokens, prompt_lengths, capacity)
  b, k = prompt_tokens.shape[0], num_candidates
  roots = jnp.arange(b, dtype=jnp.int32)
  push = jax.vmap(open_list.push)
  tables = jax.vmap(lambda _: open_list.init_tables(
    1, node_capacity=capacity.max_nodes, open_capacity=expansions_budget * k + 1,
    table_capacity=1, state_dtype=jnp.int32))(roots)
  tables = push(tables, -lam * tree.value[roots][:, None], jnp.zeros((b, 1), jnp.float32),
                roots[:, None], jnp.full((b, 1), -1, jnp.int32), jnp.ones((b, 1), bool))

  def cond(s: _BestFirst):
    return (s.iteration < expansions_budget) & jnp.any(~s.done)

  def body(s: _BestFirst) -> _BestFirst:
    tables, priority, g, node, _, valid = jax.vmap(
      lambda t, active: open_list.pop(t, 1, active))(s.tables, ~s.done)
    priority, g, node, valid = priority[:, 0], g[:, 0], node[:, 0], valid[:, 0]
    terminal = valid & s.tree.terminal[node]
    tree, children = model.expand(params, jax.random.fold_in(rng_key, s.iteration), s.tree,
                                  node[:, None], k, (valid & ~terminal)[:, None])
    children = children[:, 0]                                             # [B, K]
    safe = jnp.maximum(children, 0)
    made = (children >= 0) & ~tree.failed[safe]
    duplicate = _duplicate_siblings(tree, children, made)
    tree = release_steps(tree, safe.reshape(-1),
                         ((children >= 0) & (~made | duplicate)).reshape(-1))
    step_g = (-step_cost * jnp.ones_like(tree.log_prob[safe]) if path_cost == "depth"
              else tree.log_prob[safe])
    child_g = g[:, None] + step_g
    tables = push(tables, -(child_g + lam * tree.value[safe]), child_g, children,
                  jnp.full((b, k), -1, jnp.int32), made & ~duplicate)
    empty = ~jnp.any(jnp.isfinite(tables.open_priority), axis=1)
    return _BestFirst(
      iteration=s.iteration + 1, tree=tree, tables=tables, done=s.done | terminal | empty,
      chosen=jnp.where(terminal, node, s.chosen),
      popped=s.popped.at[:, s.iteration].set(jnp.where(valid, node, -1)),
      popped_f=s.popped_f.at[:, s.iteration].set(jnp.where(valid, -priority, -jnp.inf)))

  s = jax.lax.while_loop(cond, body, _BestFirst(
    iteration=jnp.zeros((), jnp.int32), tree=tree, tables=tables, done=jnp.zeros((b,), bool),
    chosen=jnp.full((b,), -1, jnp.int32),
    popped=jnp.full((b, expansions_budget), -1, jnp.int32),
    popped_f=jnp.full((b, expansions_budget), -jnp.inf, jnp.float32)))
  # No terminal pop: the best terminal node on the open list, else the best node seen.
  pool = jnp.concatenate([jnp.where(jnp.isfinite(s.tables.open_priority), s.tables.open_node,
                                    -1), s.popped], axis=1)
  pool_f = jnp.concatenate([-s.tables.open_priority, s.popped_f], axis=1)
  pool_f = jnp.where(s.tree.cache.node_depth[jnp.maximum(pool, 0)] > 0, pool_f, -jnp.inf)
  chosen = jnp.where(s.chosen >= 0, s.chosen, _choose(s.tree, pool, pool_f))
  return _result(s.tree, s.popped, s.popped_f, chosen)


# ----------------------------------------------------------------------------- host side


def majority_answer(solutions: Sequence[Solution]) -> str | None:
  """The answer stated by most of one problem's solutions (None answers never win; ties go to
  the answer seen first); None when no solution states one."""
  return vote([s.answer for s in solutions])


def weighted_majority_answer(solutions: Sequence[Solution],
                             weights: Sequence[float] | None = None) -> str | None:
  """The answer with the largest total weight (Qwen2.5-Math rm@N style weighted majority).

  weights: one per solution, >= 0 (a vote cannot count against an answer); default each
  solution's `score` (its value, or a particle's weight). Solutions with a non-finite weight
  (failed nodes) do not vote. A value head whose values can be negative (the linear one) needs
  mapping first, e.g. `[max(s.score, 0.0) for s in solutions]`.

  Raises:
    ValueError: a count mismatch or a negative finite weight (named with its index).
  """
  if weights is None:
    weights = [s.score for s in solutions]
  if len(weights) != len(solutions):
    raise ValueError(f"weighted_majority_answer: {len(solutions)} solutions but {len(weights)} "
                     "weights")
  kept = [(s.answer, float(w)) for s, w in zip(solutions, weights, strict=True)
          if math.isfinite(float(w))]
  negative = [(i, float(w)) for i, w in enumerate(weights)
              if math.isfinite(float(w)) and float(w) < 0]
  if negative:
    raise ValueError(f"weighted_majority_answer: weight {negative[0][1]} of solution "
                     f"{negative[0][0]}: expected weights >= 0")
  return vote([a for a, _ in kept], [w for _, w in kept])


def best_of_n_by_reward(solutions: Sequence[Solution],
                        reward_fn: Callable[[Solution], float]) -> Solution | None:
  """The solution of highest `reward_fn(solution)` (e.g. a verifier or reward model; ties go to
  the first); None for no solutions."""
  best, best_reward = None, -math.inf
  for solution in solutions:
    reward = float(reward_fn(solution))
    if best is None or reward > best_reward:
      best, best_reward = solution, reward
  return best
