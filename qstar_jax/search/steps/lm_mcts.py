"""MCTS over reasoning steps of a language model: one decision or a whole episode, one jit.

The LM as an MDP (DESIGN.md): a state is a node of the `StepTree`, an action is one of K
candidate next steps sampled at that node. The search is the project's `mcts` loop (mctx's
`Tree`, action selection, q-transforms and backup) with `model_state = (StepTree, cand)`:
`cand` [N, K] int32 holds, per StepTree node, the node ids of its K sampled candidate steps
(-1: not sampled yet, or a fork that failed). The mctx embedding of a node is its StepTree node
id.

- Root: its K candidates are sampled with one `expand_fn` call before the search (a root that
  already has candidates, in an episode, keeps them); prior logits = the candidates' step
  log-probs, failed candidates invalid.
- Expansion of mctx edge (parent, a): the child is `cand[parent, a]`, already decoded when the
  parent's candidates were sampled; expanding it samples ITS K candidates (one batched
  `expand_fn` call for the rows mctx expands, other rows skipped), so the model never runs on a
  step that exists. The child's prior logits = its candidates' log-probs (-1e9 where failed).
  Its value: `value_source="head"`: `tree.value` (the value head at the step's last token);
  `"rollout"`: the value head at the end of a rollout from it (one candidate per step,
  `rollout_sampling`, until a terminal step or the tree's `max_depth`).
- A terminal child (EOS / final marker), or one that cannot be extended (at the tree's
  `max_depth`, or failed for lack of capacity), gets discount 0 and reward = its value, so its
  edge's Q-value is its terminal value (mctx's Q = reward + discount * value) and the descent
  never goes below it. Other children: reward 0, discount 1.
- Episode: `max_decisions` searches, each rooted at the node the previous one chose (its
  subtree's candidates are reused: nothing is decoded twice), in one `lax.scan`; a problem is
  finished once its chosen node is terminal or cannot be extended; later decisions skip it.

`mcts_annotations` reads the result on the host: per problem the best trajectory and, at each
depth along it, the sibling steps with their Q-values and visit counts (what step-DPO and
MCTS-DPO train on); `write_mcts_annotations` / `read_mcts_annotations` store them as JSONL.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import mctx
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from qstar_jax.distributed import DEFAULT_RULES, Rules, replicated, to_host
from qstar_jax.models.decoding import SamplingConfig, model_config_of
from qstar_jax.search.steps import sharded
from qstar_jax.search.steps.mcts import MCTS_POLICIES, mcts
from qstar_jax.search.steps.result import StepSearchResult
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  StepSpec,
  StepTree,
  TreeCapacity,
  ValueFn,
  expand_steps,
  init_step_tree,
  linear_value,
  node_step_ids,
  tree_capacity,
)

__all__ = [
  "MctsStepResult",
  "VALUE_SOURCES",
  "mcts_annotations",
  "mcts_step_search",
  "read_mcts_annotations",
  "write_mcts_annotations",
]

VALUE_SOURCES = ("head", "rollout")
_MASKED = -1e9   # prior logit of a candidate that does not exist


@struct.dataclass
class MctsStepResult(StepSearchResult):
  """A `StepSearchResult` plus the search trees of its D decisions (D = 1 without episode).

  `chosen` [B]: one decision: the candidate step of the chosen root action; episode: the last
  chosen node. `candidates` / `scores` [B, C]: the terminal nodes the searches reached, best
  value first (a problem with none: its `chosen` node alone), C = D * num_simulations + 1.
  """

  step_candidates: jax.Array    # [N, K] int32 StepTree candidates of each node, -1: none
  decision_roots: jax.Array     # [D, B] int32 StepTree root of each decision, -1: finished
  decision_actions: jax.Array   # [D, B] int32 chosen root action of each decision
  decision_visit_counts: jax.Array  # [D, B, K] int32 root children's visits
  decision_qvalues: jax.Array   # [D, B, K] float32 root Q-values (0 where unvisited)
  search_trees: mctx.Tree       # [D, B, S + 1, ...] mctx trees; embeddings = StepTree node ids

  @property
  def root_visit_counts(self) -> jax.Array:
    """[B, K] int32 visits of the first decision's root actions (sum = num_simulations)."""
    return self.decision_visit_counts[0]

  @property
  def root_qvalues(self) -> jax.Array:
    """[B, K] float32 the first decision's root Q-values."""
    return self.decision_qvalues[0]

  @property
  def root_candidates(self) -> jax.Array:
    """[B, K] int32 StepTree nodes of the first decision's root actions."""
    roots = self.decision_roots[0]
    return jnp.where(roots[:, None] >= 0, self.step_candidates[jnp.maximum(roots, 0)], -1)


def mcts_step_search(params: PolicyValueParams, rng_key: jax.Array, *, graphdef: nnx.GraphDef,
                     prompt_tokens: jax.Array, prompt_lengths: jax.Array, spec: StepSpec,
                     sampling: SamplingConfig, num_actions: int, num_simulations: int,
                     max_depth: int, policy: str = "gumbel_muzero", episode: bool = False,
                     max_decisions: int | None = None, value_source: str = "head",
                     rollout_sampling: SamplingConfig | None = None,
                     capacity: TreeCapacity | None = None, value_fn: ValueFn = linear_value,
                     expand_fn: Callable = expand_steps, qtransform: Callable | None = None,
                     max_num_considered_actions: int = 16, gumbel_scale: float = 1.0,
                     dirichlet_fraction: float = 0.25, dirichlet_alpha: float = 0.3,
                     pb_c_init: float = 1.25, pb_c_base: float = 19652.0,
                     temperature: float = 1.0, mesh: Mesh | None = None,
                     sharding_rules: Rules = DEFAULT_RULES) -> MctsStepResult:
  """MCTS over K sampled candidate steps per node for B problems, jitted (see the module doc).

  Args:
    params: policy weights and value head.
    rng_key: PRNG key, consumed.
    graphdef: `nnx.split` graph of the policy `Llama`.
    prompt_tokens: [B, P] int32 right-padded prompts; prompt_lengths: [B] int32 (1..P each).
    spec: the step definition; sampling: the candidate sampler (temperature is traced).
    num_actions: K candidate steps per node (>= 1).
    num_simulations: simulations per decision (>= 1).
    max_depth: most steps from a prompt to any node (>= 1); also each search's depth bound.
    policy: "gumbel_muzero" or "muzero" (see `search.steps.mcts.mcts`).
    episode: False: one decision from the prompts; True: decisions until the chosen node is
      terminal or `max_decisions` decisions were made.
    max_decisions: decisions of an episode (>= 1); None: max_depth. Ignored without episode.
    value_source: "head" (the value head at the new node) or "rollout" (at the end of a
      rollout from it to a terminal step).
    rollout_sampling: the rollouts' sampler (e.g. greedy); None: `sampling`.
    capacity: static tree sizes; None: enough that no search overflows (`tree_capacity`).
    value_fn, expand_fn: the value head and the step expansion (`expand_steps`'s signature).
    qtransform, max_num_considered_actions, gumbel_scale, dirichlet_fraction, dirichlet_alpha,
      pb_c_init, pb_c_base, temperature: mctx settings, as `search.steps.mcts.mcts`.
    mesh: None: one device (unchanged). A mesh: the B problems are split over its `data` x
      `fsdp` axes (`search.steps.sharded`): the prompts, their KV cache, the per-problem tree
      counters and every result leaf indexed by problem (`chosen`, `candidates`, `scores`, the
      decisions and their mctx trees, [D, B, ...] split on B); the shared page pool, the node
      table and `step_candidates` (indexed by node slot: a problem's nodes can be anywhere in
      it) are replicated. Results equal the unsharded search's (up to float rounding).
    sharding_rules: how the parameters are placed on the mesh (`param_shardings`; the Llama's
      FSDP / tensor-parallel rules by default, the value head replicated).

  Returns:
    `MctsStepResult`; compute counters as its properties (tokens prefilled / decoded, model
    calls); `overflow[b]` set where problem b's tree ran out of capacity (its search went on
    with the nodes it had).

  Raises:
    ValueError: (before jit) a size below its minimum, an unknown policy or value source, or a
      prompt length outside 1..min(P, the model's max_seq_len).
    MeshShapeError: (before jit) B does not divide over the mesh's data x fsdp, or a parameter
      dimension does not divide over its axes.
  """
  for name, value in (("num_actions", num_actions), ("num_simulations", num_simulations),
                      ("max_depth", max_depth)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}: expected an int >= 1")
  if policy not in MCTS_POLICIES:
    raise ValueError(f"policy={policy!r}: expected one of {MCTS_POLICIES}")
  if value_source not in VALUE_SOURCES:
    raise ValueError(f"value_source={value_source!r}: expected one of {VALUE_SOURCES}")
  if max_decisions is None or not episode:
    max_decisions = max_depth if episode else 1
  if not isinstance(max_decisions, int) or max_decisions < 1:
    raise ValueError(f"max_decisions={max_decisions!r}: expected an int >= 1 or None")
  sampling.check()
  rollout_sampling = sampling if rollout_sampling is None else rollout_sampling
  rollout_sampling.check()
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens has shape {prompt_tokens.shape}: expected [B, P]")
  batch, width = prompt_tokens.shape
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != (batch,):
    raise ValueError(f"prompt_lengths has shape {lengths.shape}: expected [B]=({batch},)")
  max_seq_len = model_config_of(graphdef, params.policy).max_position_embeddings
  limit = min(width, max_seq_len)
  bad = [int(n) for n in lengths if not 1 <= n <= limit]
  if bad:
    raise ValueError(f"prompt lengths {bad}: expected 1..{limit} (prompt width {width}, the "
                     f"model's max_seq_len {max_seq_len})")
  longest = int(lengths.max()) + max_depth * spec.max_step_tokens
  if longest > max_seq_len:
    raise ValueError(f"prompt of {int(lengths.max())} tokens + max_depth={max_depth} steps of "
                     f"up to {spec.max_step_tokens} tokens = {longest} tokens: expected <= the "
                     f"model's max_seq_len {max_seq_len}")
  if capacity is None:
    per_decision = num_actions * (num_simulations + 1)
    if value_source == "rollout":
      per_decision += num_simulations * max_depth
    capacity = tree_capacity(batch, nodes_per_problem=max_decisions * per_decision,
                             max_depth=max_depth, max_step_tokens=spec.max_step_tokens)
  capacity.check(batch)
  args = (params, rng_key, prompt_tokens, jnp.asarray(lengths, jnp.int32), sampling,
          rollout_sampling)
  static = dict(
    graphdef=graphdef, spec=spec, num_actions=num_actions, num_simulations=num_simulations,
    max_depth=max_depth, policy=policy, max_decisions=max_decisions, value_source=value_source,
    capacity=capacity, value_fn=value_fn, expand_fn=expand_fn, qtransform=qtransform,
    mctx_settings=(("max_num_considered_actions", int(max_num_considered_actions)),
                   ("gumbel_scale", float(gumbel_scale)),
                   ("dirichlet_fraction", float(dirichlet_fraction)),
                   ("dirichlet_alpha", float(dirichlet_alpha)), ("pb_c_init", float(pb_c_init)),
                   ("pb_c_base", float(pb_c_base)), ("temperature", float(temperature))))
  if mesh is None:
    return _search(*args, **static)
  decisions = sharded.by_problem(mesh, 1)     # [D, B, ...]: split on B
  out = sharded.result_shardings(
    MctsStepResult, mesh, step_candidates=replicated(mesh), decision_roots=decisions,
    decision_actions=decisions, decision_visit_counts=decisions, decision_qvalues=decisions,
    search_trees=decisions)
  return sharded.run_sharded(_search, *args, mesh=mesh, rules=sharding_rules,
                             out_shardings=out, static=static)


@struct.dataclass
class _Model:
  """What the step expansion needs besides the mctx tree (static config in metadata)."""

  params: PolicyValueParams
  sampling: SamplingConfig
  rollout_sampling: SamplingConfig
  graphdef: Any = struct.field(pytree_node=False)
  spec: StepSpec = struct.field(pytree_node=False)
  num_actions: int = struct.field(pytree_node=False)
  max_depth: int = struct.field(pytree_node=False)
  value_source: str = struct.field(pytree_node=False)
  value_fn: Any = struct.field(pytree_node=False)
  expand_fn: Any = struct.field(pytree_node=False)


@struct.dataclass
class _Episode:
  """Carry of the decision scan."""

  tree: StepTree
  cand: jax.Array               # [N, K] int32
  roots: jax.Array              # [B] int32 current root (the last chosen node)
  done: jax.Array               # [B] bool finished: no further decision


def _sample_candidates(model: _Model, rng_key: jax.Array, tree: StepTree, cand: jax.Array,
                       nodes: jax.Array, valid: jax.Array) -> tuple[StepTree, jax.Array]:
  """Samples K candidates of nodes [B] where `valid` and none were sampled yet; one call."""
  safe = jnp.maximum(nodes, 0)
  valid = valid & (nodes >= 0) & jnp.all(cand[safe] < 0, axis=-1)
  tree, children = model.expand_fn(
    model.params, rng_key, tree, safe[:, None], graphdef=model.graphdef, spec=model.spec,
    sampling=model.sampling, num_children=model.num_actions, valid=valid[:, None],
    value_fn=model.value_fn)
  rows = jnp.where(valid, safe, cand.shape[0])
  return tree, cand.at[rows].set(children[:, 0], mode="drop")


def _candidate_priors(tree: StepTree, cand: jax.Array, nodes: jax.Array) -> tuple[jax.Array,
                                                                                 jax.Array]:
  """(prior logits [B, K] = the candidates' step log-probs, valid [B, K]) of nodes [B]."""
  kids = jnp.where(nodes[:, None] >= 0, cand[jnp.maximum(nodes, 0)], -1)
  valid = (kids >= 0) & tree.usable[jnp.maximum(kids, 0)]
  return jnp.where(valid, tree.log_prob[jnp.maximum(kids, 0)], _MASKED), valid


def _rollout_values(model: _Model, rng_key: jax.Array, tree: StepTree, start: jax.Array,
                    active: jax.Array) -> tuple[StepTree, jax.Array]:
  """Value head at the end of a one-candidate-per-step rollout from nodes [B] (rows with
  `active` False: their own value); at most max_depth steps, stops at a terminal step."""

  def cond(carry):
    i, _, _, active = carry
    return (i < model.max_depth) & jnp.any(active)

  def body(carry):
    i, tree, node, active = carry
    tree, children = model.expand_fn(
      model.params, jax.random.fold_in(rng_key, i), tree, node[:, None],
      graphdef=model.graphdef, spec=model.spec, sampling=model.rollout_sampling,
      num_children=1, valid=active[:, None], value_fn=model.value_fn)
    child = children[:, 0, 0]
    ok = (child >= 0) & tree.usable[jnp.maximum(child, 0)]
    node = jnp.where(ok, child, node)
    return i + 1, tree, node, ok & tree.expandable[node]

  active = active & tree.expandable[start]
  _, tree, end, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), tree, start,
                                                    active))
  return tree, tree.value[end]


def _expand_child(model: _Model, rng_key: jax.Array, state: tuple[StepTree, jax.Array],
                  parent_index: jax.Array, action: jax.Array, parent_node: jax.Array, *,
                  expand_mask: jax.Array):
  """`mcts`'s expand_fn: the child of (parent, action) is cand[parent, action]; sample its K
  candidates (its priors) and read its value (module doc)."""
  del parent_index
  tree, cand = state
  sample_key, rollout_key = jax.random.split(rng_key)
  safe_parent = jnp.maximum(parent_node, 0)
  child = jnp.where(parent_node >= 0, cand[safe_parent, action], -1)
  safe = jnp.maximum(child, 0)
  usable = (child >= 0) & tree.usable[safe]
  leaf = ~usable | ~tree.expandable[safe]        # terminal, at max_depth, failed or missing
  tree, cand = _sample_candidates(model, sample_key, tree, cand, child, expand_mask & ~leaf)
  prior, _ = _candidate_priors(tree, cand, child)
  value = jnp.where(usable, tree.value[safe], tree.value[safe_parent])
  if model.value_source == "rollout":
    tree, rolled = _rollout_values(model, rollout_key, tree, safe, expand_mask & ~leaf)
    value = jnp.where(expand_mask & ~leaf, rolled, value)
  output = mctx.RecurrentFnOutput(
    reward=jnp.where(leaf, value, 0.0).astype(jnp.float32),
    discount=jnp.where(leaf, 0.0, 1.0).astype(jnp.float32),
    prior_logits=prior.astype(jnp.float32), value=value.astype(jnp.float32))
  return output, child.astype(jnp.int32), (tree, cand)


@functools.partial(jax.jit, static_argnames=(
  "graphdef", "spec", "num_actions", "num_simulations", "max_depth", "policy", "max_decisions",
  "value_source", "capacity", "value_fn", "expand_fn", "qtransform", "mctx_settings"))
def _search(params, rng_key, prompt_tokens, prompt_lengths, sampling, rollout_sampling, *,
            graphdef, spec, num_actions, num_simulations, max_depth, policy, max_decisions,
            value_source, capacity, value_fn, expand_fn, qtransform,
            mctx_settings) -> MctsStepResult:
  """The jitted search: prefill, then `max_decisions` decisions in a scan."""
  model = _Model(params=params, sampling=sampling, rollout_sampling=rollout_sampling,
                 graphdef=graphdef, spec=spec, num_actions=num_actions, max_depth=max_depth,
                 value_source=value_source, value_fn=value_fn, expand_fn=expand_fn)
  tree = init_step_tree(params, graphdef=graphdef, prompt_tokens=prompt_tokens,
                        prompt_lengths=prompt_lengths, capacity=capacity, spec=spec,
                        value_fn=value_fn)
  batch = prompt_tokens.shape[0]
  cand = jnp.full((capacity.max_nodes, num_actions), -1, jnp.int32)
  settings = dict(mctx_settings)

  def decide(carry: _Episode, key: jax.Array):
    root_key, search_key = jax.random.split(key)
    tree, cand = _sample_candidates(model, root_key, carry.tree, carry.cand, carry.roots,
                                    ~carry.done)
    prior, valid = _candidate_priors(tree, cand, carry.roots)
    valid = valid & ~carry.done[:, None]
    # A finished problem's root embeds -1: every edge below it is a leaf, nothing is decoded.
    root = mctx.RootFnOutput(prior_logits=prior, value=tree.value[carry.roots],
                             embedding=jnp.where(carry.done, -1, carry.roots))
    out = mcts(model, search_key, root=root, expand_fn=_expand_child, model_state=(tree, cand),
               num_simulations=num_simulations, max_depth=max_depth, policy=policy,
               qtransform=qtransform, invalid_actions=~valid, **settings)
    tree, cand = out.model_state
    rows = jnp.arange(batch)
    ok = valid[rows, out.action] & ~carry.done
    chosen = jnp.where(ok, cand[carry.roots, out.action], carry.roots)
    done = carry.done | ~ok | ~tree.expandable[chosen]
    record = (jnp.where(carry.done, -1, carry.roots), out.action, out.visit_counts,
              out.qvalues, out.tree)
    return _Episode(tree=tree, cand=cand, roots=chosen, done=done), record

  start = _Episode(tree=tree, cand=cand, roots=jnp.arange(batch, dtype=jnp.int32),
                   done=jnp.zeros((batch,), bool))
  end, (roots, actions, visits, qvalues, trees) = jax.lax.scan(
    decide, start, jax.random.split(rng_key, max_decisions))
  tree = end.tree
  # A problem whose first decision had no valid candidate chose nothing.
  chosen = jnp.where(end.roots >= batch, end.roots, -1)
  candidates, scores = _terminal_candidates(tree, trees, roots, chosen,
                                            max_decisions * num_simulations + 1)
  return MctsStepResult(
    tree=tree, chosen=chosen, candidates=candidates, scores=scores, step_candidates=end.cand,
    decision_roots=roots, decision_actions=actions, decision_visit_counts=visits,
    decision_qvalues=qvalues, search_trees=trees)


def _terminal_candidates(tree: StepTree, trees: mctx.Tree, roots: jax.Array, chosen: jax.Array,
                         num: int) -> tuple[jax.Array, jax.Array]:
  """The terminal StepTree nodes of the searched mctx nodes, best value first ([B, C]); a
  problem with none gets its chosen node (or -1)."""
  n = tree.cache.max_nodes
  batch = chosen.shape[0]
  searched = (trees.node_visits > 0) & (roots[:, :, None] >= 0) & (trees.embeddings >= 0)
  nodes = jnp.where(searched, trees.embeddings, n).reshape(-1)
  seen = jnp.zeros((n,), bool).at[nodes].set(True, mode="drop")
  final = seen & tree.usable & tree.terminal
  mine = final[None, :] & (tree.cache.node_problem[None, :] == jnp.arange(batch)[:, None])
  scores, candidates = jax.lax.top_k(jnp.where(mine, tree.value[None, :], -jnp.inf),
                                     min(num, n))
  candidates = jnp.where(jnp.isfinite(scores), candidates, -1).astype(jnp.int32)
  none = ~jnp.any(mine, axis=1) & (chosen >= 0)
  candidates = candidates.at[:, 0].set(jnp.where(none, chosen, candidates[:, 0]))
  scores = jnp.where(candidates >= 0, tree.value[jnp.maximum(candidates, 0)], 0.0)
  return candidates, scores


# ----------------------------------------------------------------------------- annotations


def mcts_annotations(result: MctsStepResult, *, tokenizer: Any = None,
                     problems: Sequence[Any] | None = None,
                     prompt_ids: Sequence[Sequence[int]] | None = None) -> list[dict]:
  """Per problem: the best trajectory and the siblings at each depth along it (host).

  The trajectory follows each decision's chosen root action; below the last decision it
  follows the most visited child of that decision's tree. Each depth's record lists the K
  sibling steps of the node it extends: StepTree `node`, `ids` and `text` of the step, `q`
  (the mctx Q-value of the edge; None when unvisited), `visits`, `log_prob`, `value`,
  `terminal`, and which sibling the trajectory took (`chosen`).

  Args:
    result: an `MctsStepResult`.
    tokenizer: decodes ids to text (`decode(ids) -> str`); None: texts are None.
    problems: optional per-problem metadata (JSON-serialisable), stored under "problem".
    prompt_ids: optional per-problem prompt token ids, stored under "prompt_ids" (what
      `data.preference_pairs_from_annotations` prefixes the pairs' contexts with).
  Returns:
    One dict per problem: "index", "problem", "prompt_ids", "chosen", "overflow",
    "trajectory" (the steps: node, ids, text), "ids" / "text" of the whole solution, "depths"
    (the siblings records).
  """
  host = to_host(result)
  tree: StepTree = host.tree
  batch = np.asarray(host.chosen).shape[0]
  if problems is not None and len(problems) != batch:
    raise ValueError(f"mcts_annotations: {len(problems)} problems for a batch of {batch}")
  if prompt_ids is not None and len(prompt_ids) != batch:
    raise ValueError(f"mcts_annotations: {len(prompt_ids)} prompts for a batch of {batch}")

  def text(ids):
    return tokenizer.decode(ids) if tokenizer is not None else None

  def step(node: int) -> dict:
    ids = node_step_ids(tree, node)
    return {"node": node, "ids": ids, "text": text(ids),
            "log_prob": float(tree.log_prob[node]), "value": float(tree.value[node]),
            "terminal": bool(tree.terminal[node])}

  def siblings(trees: Any, b: int, mctx_node: int, node: int, chosen: int) -> dict:
    kids = [int(c) for c in host.step_candidates[node]]
    visits = trees.children_visits[b, mctx_node]
    index = trees.children_index[b, mctx_node]
    items = []
    for a, kid in enumerate(kids):
      if kid < 0:
        continue
      q = None
      if visits[a] > 0:
        q = float(trees.children_rewards[b, mctx_node, a] + trees.children_discounts[
          b, mctx_node, a] * trees.node_values[b, index[a]])
      items.append({"action": a, **step(kid), "q": q, "visits": int(visits[a])})
    return {"depth": int(tree.cache.node_depth[node]), "parent": node, "chosen": chosen,
            "siblings": items}

  records = []
  for b in range(batch):
    depths, path = [], []
    last = None
    for d in range(host.decision_roots.shape[0]):
      root = int(host.decision_roots[d, b])
      if root < 0:
        break
      last = (jax.tree.map(lambda x, d=d: x[d], host.search_trees), d)
      action = int(host.decision_actions[d, b])
      depths.append(siblings(last[0], b, 0, root, action))
      path.append(int(host.step_candidates[root, action]))
    if last is not None:   # below the last decision: the most visited children
      trees, d = last
      mctx_node = int(trees.children_index[b, 0, host.decision_actions[d, b]])
      while mctx_node >= 0 and path[-1] >= 0 and np.any(host.step_candidates[path[-1]] >= 0):
        visits = trees.children_visits[b, mctx_node]
        if visits.max() <= 0:
          break
        action = int(np.argmax(visits))
        depths.append(siblings(trees, b, mctx_node, path[-1], action))
        path.append(int(host.step_candidates[path[-1], action]))
        mctx_node = int(trees.children_index[b, mctx_node, action])
    path = [n for n in path if n >= 0]
    trajectory = [step(n) for n in path]
    ids = [i for s in trajectory for i in s["ids"]]
    records.append({
      "index": b, "problem": None if problems is None else problems[b],
      "prompt_ids": None if prompt_ids is None else [int(i) for i in prompt_ids[b]],
      "chosen": int(host.chosen[b]), "overflow": bool(host.tree.cache.overflow[b]),
      "trajectory": trajectory, "ids": ids, "text": text(ids), "depths": depths})
  return records


def write_mcts_annotations(path: str | pathlib.Path, records: Sequence[dict]) -> pathlib.Path:
  """Writes records as JSONL (one problem per line); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return path


def read_mcts_annotations(path: str | pathlib.Path) -> list[dict]:
  """The records of a JSONL file written by `write_mcts_annotations`."""
  with pathlib.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]
