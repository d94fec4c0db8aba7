"""MCTS over mctx's `Tree` in the project's own jitted loop, carrying a caller's model state.

`mctx.search` hands `recurrent_fn` only the parent's embedding and stores one embedding per
node, so a state shared by the whole tree (the LM tree KV cache: one page pool per problem)
cannot ride through it. `mcts` runs the same simulate / expand / backup loop in a
`lax.fori_loop` whose carry is `(Tree, model_state)`; the model is called through
`expand_fn`, which receives and returns `model_state`. Everything else is mctx's: the `Tree`
arrays, the action selection (`muzero_action_selection`, `gumbel_muzero_root_action_selection`,
`gumbel_muzero_interior_action_selection`), the q-transforms, the backward pass, and the
policies' root noise and final action. The rng key is split exactly as `mctx.muzero_policy` /
`mctx.gumbel_muzero_policy` split it, so on a model without terminal nodes the two give the
same tree for the same key.

Two departures from `mctx.search`, both to avoid model calls that cannot change the tree:
- A child reached with `discount == 0` is terminal: its value no longer matters, the descent
  stops there and nothing is ever expanded below it.
- A simulation that ends on a node that already exists (a terminal node, or a node at
  `max_depth`) reuses the node's stored value instead of calling the model again (mctx calls
  `recurrent_fn` and overwrites the node); its visit count still grows by one, as in mctx.

Node indices follow mctx: the root is node 0 and a node first created by simulation `i` is node
`i + 1` (an index whose simulation reused a node stays empty), so `Tree.summary()` and the other
mctx tools read the returned tree as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import mctx
from flax import struct

# mctx exports no building blocks of its loop; these are the ones `mctx.search` itself uses.
from mctx._src import search as mctx_search
from mctx._src import seq_halving

__all__ = ["MctsResult", "MCTS_POLICIES", "mcts"]

MCTS_POLICIES = ("gumbel_muzero", "muzero")

# expand_fn(params, rng_key, model_state, parent_node_ids [B], actions [B],
#           parent_embeddings [B, ...], *, expand_mask [B])
#   -> (mctx.RecurrentFnOutput, child_embeddings [B, ...], model_state)
ExpandFn = Callable[..., tuple[mctx.RecurrentFnOutput, Any, Any]]


@struct.dataclass
class MctsResult:
  """What one search returns (B problems, K actions, N = num_simulations + 1 tree nodes)."""

  action: jax.Array            # [B] int32 chosen root action (never an invalid one)
  action_weights: jax.Array    # [B, K] float32 policy target (muzero: visit probabilities;
                               # gumbel: softmax(prior logits + completed Q-values))
  visit_counts: jax.Array      # [B, K] int32 root children's visits (sum = num_simulations)
  qvalues: jax.Array           # [B, K] float32 root Q-values, reward + discount * value
                               # (0 for unvisited actions)
  value: jax.Array             # [B] float32 root value after the search
  tree: mctx.Tree              # [B, N, ...] the search tree (embeddings: whatever expand_fn
                               # returned, usually int32 node ids of model_state)
  model_state: Any             # the caller's state after the last expand_fn call
  model_calls: jax.Array       # [] int32 expand_fn invocations (batched calls)
  nodes_expanded: jax.Array    # [B] int32 rows actually expanded (new nodes) per problem


@struct.dataclass
class _LoopCarry:
  rng_key: jax.Array           # [2] uint32
  tree: mctx.Tree              # [B, N, ...]
  model_state: Any
  model_calls: jax.Array       # [] int32
  nodes_expanded: jax.Array    # [B] int32


@struct.dataclass
class _Descent:
  rng_key: jax.Array           # [2] uint32
  node_index: jax.Array        # [] int32 node the last action was selected at
  action: jax.Array            # [] int32
  next_node_index: jax.Array   # [] int32 child reached (Tree.UNVISITED when new)
  depth: jax.Array             # [] float, edges from the root to next_node_index
  is_continuing: jax.Array     # [] bool


def mcts(params: Any, rng_key: jax.Array, *, root: mctx.RootFnOutput, expand_fn: ExpandFn,
         model_state: Any, num_simulations: int, max_depth: int | None = None,
         policy: str = "gumbel_muzero", qtransform: Callable | None = None,
         invalid_actions: jax.Array | None = None, max_num_considered_actions: int = 16,
         gumbel_scale: float = 1.0, dirichlet_fraction: float = 0.25,
         dirichlet_alpha: float = 0.3, pb_c_init: float = 1.25, pb_c_base: float = 19652.0,
         temperature: float = 1.0) -> MctsResult:
  """Runs `num_simulations` simulations of MCTS for B problems at once (see the module doc).

  Each simulation descends from the root with mctx's action selection until it selects an
  action whose child does not exist yet, reaches `max_depth` edges, or reaches a terminal
  child (`discount == 0`); creates the new child through one batched `expand_fn` call (skipped
  when no row needs a new node); and backs the leaf's value up to the root (mctx's backward).

  Args:
    params: forwarded to `expand_fn`.
    rng_key: PRNG key, consumed.
    root: `mctx.RootFnOutput` with prior_logits [B, K], value [B] and embedding (a pytree of
      [B, ...] arrays; for the LM, int32 node ids of the tree KV cache).
    expand_fn: `expand_fn(params, rng_key, model_state, parent_node_ids, actions,
      parent_embeddings, *, expand_mask) -> (mctx.RecurrentFnOutput, child_embeddings,
      model_state)`, all batched over B: `parent_node_ids` [B] are tree node indices,
      `parent_embeddings` their stored embeddings, the output's prior_logits [B, K] (mask
      invalid interior actions with -1e9 logits), value, reward and discount [B] (discount 0
      makes the child terminal). Rows with `expand_mask` [B] False reuse an existing node:
      their outputs are ignored, and `expand_fn` should leave their part of `model_state`
      alone (no cache pages allocated for them).
    model_state: any pytree threaded through every `expand_fn` call (e.g. the tree KV cache).
    num_simulations: simulations (>= 1); the tree has num_simulations + 1 nodes.
    max_depth: most edges from the root to a leaf (>= 1); None: num_simulations, as mctx.
    policy: "gumbel_muzero" (Gumbel MuZero: sequential halving at the root; far cheaper at few
      simulations) or "muzero" (PUCT with Dirichlet noise at the root).
    qtransform: an mctx q-transform; None: the policy's mctx default
      (`qtransform_completed_by_mix_value` / `qtransform_by_parent_and_siblings`). It is a
      static argument: pass the same object each call (a fresh `functools.partial` recompiles).
    invalid_actions: [B, K] bool or 0/1, true where a root action is invalid (root only).
    max_num_considered_actions, gumbel_scale: Gumbel MuZero's settings (as mctx).
    dirichlet_fraction, dirichlet_alpha, pb_c_init, pb_c_base, temperature: MuZero's settings
      (as mctx; dirichlet_fraction=0 searches without root noise).

  Returns:
    `MctsResult`.

  Raises:
    ValueError: (before tracing) a size below its minimum, an unknown policy, or arrays whose
      shapes disagree on B or K.
  """
  batch_size, num_actions = _check_inputs(
      root=root, num_simulations=num_simulations, max_depth=max_depth, policy=policy,
      invalid_actions=invalid_actions, max_num_considered_actions=max_num_considered_actions)
  if invalid_actions is None:
    invalid_actions = jnp.zeros((batch_size, num_actions), jnp.float32)
  if qtransform is None:
    qtransform = (mctx.qtransform_completed_by_mix_value if policy == "gumbel_muzero"
                  else mctx.qtransform_by_parent_and_siblings)
  return _mcts(params, rng_key, root, model_state, jnp.asarray(invalid_actions),
               expand_fn=expand_fn, num_simulations=num_simulations,
               max_depth=num_simulations if max_depth is None else max_depth, policy=policy,
               qtransform=qtransform, max_num_considered_actions=max_num_considered_actions,
               gumbel_scale=float(gumbel_scale), dirichlet_fraction=float(dirichlet_fraction),
               dirichlet_alpha=float(dirichlet_alpha), pb_c_init=float(pb_c_init),
               pb_c_base=float(pb_c_base), temperature=float(temperature))


def _check_inputs(*, root: mctx.RootFnOutput, num_simulations: int, max_depth: int | None,
                  policy: str, invalid_actions: Any,
                  max_num_considered_actions: int) -> tuple[int, int]:
  """Host-side checks (shapes only, so they also run on tracers); returns (B, K)."""
  if not isinstance(num_simulations, int) or num_simulations < 1:
    raise ValueError(f"num_simulations={num_simulations!r}: expected an int >= 1")
  if max_depth is not None and (not isinstance(max_depth, int) or max_depth < 1):
    raise ValueError(f"max_depth={max_depth!r}: expected an int >= 1 or None")
  if policy not in MCTS_POLICIES:
    raise ValueError(f"policy={policy!r}: expected one of {MCTS_POLICIES}")
  if not isinstance(max_num_considered_actions, int) or max_num_considered_actions < 1:
    raise ValueError(f"max_num_considered_actions={max_num_considered_actions!r}: expected an "
                     "int >= 1")
  logits_shape = tuple(jnp.shape(root.prior_logits))
  if len(logits_shape) != 2 or logits_shape[1] < 1:
    raise ValueError(f"root.prior_logits has shape {logits_shape}: expected [B, K] with K >= 1")
  batch_size, num_actions = logits_shape
  if tuple(jnp.shape(root.value)) != (batch_size,):
    raise ValueError(f"root.value has shape {tuple(jnp.shape(root.value))}: expected "
                     f"[B]=({batch_size},) as root.prior_logits {logits_shape}")
  for path, leaf in jax.tree_util.tree_leaves_with_path(root.embedding):
    shape = tuple(jnp.shape(leaf))
    if not shape or shape[0] != batch_size:
      raise ValueError(f"root.embedding{jax.tree_util.keystr(path)} has shape {shape}: "
                       f"expected a leading B={batch_size} (root.prior_logits {logits_shape})")
  if invalid_actions is not None and tuple(jnp.shape(invalid_actions)) != logits_shape:
    raise ValueError(f"invalid_actions has shape {tuple(jnp.shape(invalid_actions))}: "
                     f"expected [B, K]={logits_shape} as root.prior_logits")
  return batch_size, num_actions


@functools.partial(jax.jit, static_argnames=(
    "expand_fn", "num_simulations", "max_depth", "policy", "qtransform",
    "max_num_considered_actions", "gumbel_scale", "dirichlet_fraction", "dirichlet_alpha",
    "pb_c_init", "pb_c_base", "temperature"))
def _mcts(params, rng_key, root, model_state, invalid_actions, *, expand_fn, num_simulations,
          max_depth, policy, qtransform, max_num_considered_actions, gumbel_scale,
          dirichlet_fraction, dirichlet_alpha, pb_c_init, pb_c_base, temperature):
  """The search: root noise and tree, the simulation loop, the policy's final action."""
  batch_size = root.value.shape[0]
  invalid_actions = invalid_actions.astype(root.prior_logits.dtype)
  if policy == "muzero":
    rng_key, noise_key, search_key = jax.random.split(rng_key, 3)
    noise = jax.random.dirichlet(
        noise_key, alpha=jnp.full(root.prior_logits.shape[-1:], dirichlet_alpha),
        shape=(batch_size,))
    noisy_probs = ((1 - dirichlet_fraction) * jax.nn.softmax(root.prior_logits)
                   + dirichlet_fraction * noise)
    root = root.replace(prior_logits=_mask_invalid(_logits_of(noisy_probs), invalid_actions))
    select_interior = functools.partial(
        mctx.muzero_action_selection, pb_c_init=pb_c_init, pb_c_base=pb_c_base,
        qtransform=qtransform)
    select_root = functools.partial(select_interior, depth=0)
    extra_data = None
  else:
    root = root.replace(prior_logits=_mask_invalid(root.prior_logits, invalid_actions))
    search_key, gumbel_key = jax.random.split(rng_key)
    gumbel = gumbel_scale * jax.random.gumbel(gumbel_key, root.prior_logits.shape,
                                              root.prior_logits.dtype)
    extra_data = mctx.GumbelMuZeroExtraData(root_gumbel=gumbel)
    select_root = functools.partial(
        mctx.gumbel_muzero_root_action_selection, num_simulations=num_simulations,
        max_num_considered_actions=max_num_considered_actions, qtransform=qtransform)
    select_interior = functools.partial(mctx.gumbel_muzero_interior_action_selection,
                                        qtransform=qtransform)

  def select(key, tree, node_index, depth):
    return jax.lax.cond(depth == 0, lambda: select_root(key, tree, node_index),
                        lambda: select_interior(key, tree, node_index, depth))

  tree = mctx_search.instantiate_tree_from_root(
      root, num_simulations, root_invalid_actions=invalid_actions, extra_data=extra_data)
  carry = _LoopCarry(rng_key=search_key, tree=tree, model_state=model_state,
                     model_calls=jnp.zeros((), jnp.int32),
                     nodes_expanded=jnp.zeros((batch_size,), jnp.int32))
  body = functools.partial(_simulation, params=params, expand_fn=expand_fn, select=select,
                           max_depth=max_depth)
  carry = jax.lax.fori_loop(0, num_simulations, body, carry)
  tree = carry.tree

  summary = tree.summary()
  if policy == "muzero":
    action_weights = summary.visit_probs
    action_logits = _logits_of(action_weights)
    action_logits = action_logits - jnp.max(action_logits, axis=-1, keepdims=True)
    action_logits = action_logits / jnp.maximum(jnp.finfo(action_logits.dtype).tiny,
                                                temperature)
    action = jax.random.categorical(rng_key, action_logits).astype(jnp.int32)
  else:
    considered_visit = jnp.max(summary.visit_counts, axis=-1, keepdims=True)
    completed_qvalues = jax.vmap(qtransform, in_axes=[0, None])(tree, mctx.Tree.ROOT_INDEX)
    to_argmax = seq_halving.score_considered(considered_visit, gumbel, root.prior_logits,
                                             completed_qvalues, summary.visit_counts)
    action = jnp.argmax(jnp.where(invalid_actions > 0, -jnp.inf, to_argmax),
                        axis=-1).astype(jnp.int32)
    action_weights = jax.nn.softmax(
        _mask_invalid(root.prior_logits + completed_qvalues, invalid_actions))
  return MctsResult(
      action=action, action_weights=action_weights,
      visit_counts=tree.children_visits[:, mctx.Tree.ROOT_INDEX], qvalues=summary.qvalues,
      value=summary.value, tree=tree, model_state=carry.model_state,
      model_calls=carry.model_calls, nodes_expanded=carry.nodes_expanded)


def _simulation(sim: jax.Array, carry: _LoopCarry, *, params: Any, expand_fn: ExpandFn,
                select: Callable, max_depth: int) -> _LoopCarry:
  """One simulation for every row: descend, expand the rows that reached a new child, back up."""
  tree = carry.tree
  batch_size = tree.node_values.shape[0]
  rows = jnp.arange(batch_size)
  rng_key, descend_key, expand_key = jax.random.split(carry.rng_key, 3)
  parent, action, child = jax.vmap(_descend, in_axes=(0, 0, None, None))(
      jax.random.split(descend_key, batch_size), tree, select, max_depth)
  expand_mask = child == mctx.Tree.UNVISITED
  leaf = jnp.where(expand_mask, sim + 1, child).astype(jnp.int32)
  parent_embeddings = jax.tree.map(lambda x: x[rows, parent], tree.embeddings)

  def call(model_state):
    output, embeddings, model_state = expand_fn(
        params, expand_key, model_state, parent, action, parent_embeddings,
        expand_mask=expand_mask)
    _check_expand_output(output, embeddings, tree)
    return output, embeddings, model_state

  def skip(model_state):
    output, embeddings, _ = jax.eval_shape(call, model_state)
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    return jax.tree.map(zeros, output), jax.tree.map(zeros, embeddings), model_state

  any_new = jnp.any(expand_mask)
  output, embeddings, model_state = jax.lax.cond(any_new, call, skip, carry.model_state)
  tree = _write_leaf(tree, expand_mask, leaf, parent, action, output, embeddings)
  tree = mctx_search.backward(tree, leaf)
  return _LoopCarry(rng_key=rng_key, tree=tree, model_state=model_state,
                    model_calls=carry.model_calls + any_new.astype(jnp.int32),
                    nodes_expanded=carry.nodes_expanded + expand_mask.astype(jnp.int32))


def _check_expand_output(output: mctx.RecurrentFnOutput, embeddings: Any,
                         tree: mctx.Tree) -> None:
  """Trace-time shape checks of what `expand_fn` returned (B rows, K actions)."""
  batch_size, _, num_actions = tree.children_index.shape
  expected = {"prior_logits": (batch_size, num_actions), "value": (batch_size,),
              "reward": (batch_size,), "discount": (batch_size,)}
  for name, shape in expected.items():
    got = tuple(jnp.shape(getattr(output, name)))
    if got != shape:
      raise ValueError(f"expand_fn returned {name} of shape {got}: expected {shape} (B, K)")
  want = jax.tree.structure(tree.embeddings)
  if jax.tree.structure(embeddings) != want:
    raise ValueError(f"expand_fn returned embeddings {jax.tree.structure(embeddings)}: "
                     f"expected the root embedding's structure {want}")
  for new, stored in zip(jax.tree.leaves(embeddings), jax.tree.leaves(tree.embeddings),
                         strict=True):
    if tuple(jnp.shape(new)) != stored.shape[:1] + stored.shape[2:]:
      raise ValueError(f"expand_fn returned an embedding of shape {tuple(jnp.shape(new))}: "
                       f"expected {stored.shape[:1] + stored.shape[2:]} as the root's")


def _descend(rng_key: jax.Array, tree: mctx.Tree, select: Callable,
             max_depth: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """mctx's `simulate` for one row, also stopping on a terminal child (discount 0). Returns
  (node the last action was taken at, that action, the child: an index, or UNVISITED)."""

  def body(state: _Descent) -> _Descent:
    node_index = state.next_node_index
    rng_key, select_key = jax.random.split(state.rng_key)
    action = select(select_key, tree, node_index, state.depth)
    next_node_index = tree.children_index[node_index, action]
    depth = state.depth + 1
    is_visited = next_node_index != mctx.Tree.UNVISITED
    is_terminal = is_visited & (tree.children_discounts[node_index, action] == 0)
    return _Descent(rng_key=rng_key, node_index=node_index, action=action,
                    next_node_index=next_node_index, depth=depth,
                    is_continuing=is_visited & (depth < max_depth) & ~is_terminal)

  no_parent = jnp.asarray(mctx.Tree.NO_PARENT, jnp.int32)
  start = _Descent(rng_key=rng_key, node_index=no_parent, action=no_parent,
                   next_node_index=jnp.asarray(mctx.Tree.ROOT_INDEX, jnp.int32),
                   depth=jnp.zeros((), tree.children_prior_logits.dtype),
                   is_continuing=jnp.asarray(True))
  end = jax.lax.while_loop(lambda s: s.is_continuing, body, start)
  return end.node_index, end.action, end.next_node_index


def _write_leaf(tree: mctx.Tree, expand_mask: jax.Array, leaf: jax.Array, parent: jax.Array,
                action: jax.Array, output: mctx.RecurrentFnOutput, embeddings: Any) -> mctx.Tree:
  """Stores the expanded rows' new nodes (as mctx's `expand`) and counts one more visit of
  every row's leaf; rows that reused a node keep its stored values."""
  rows = jnp.arange(leaf.shape[0])

  def put(x, value, *index):
    old = x[(rows,) + index]
    mask = expand_mask.reshape(expand_mask.shape + (1,) * (old.ndim - 1))
    return x.at[(rows,) + index].set(jnp.where(mask, jnp.asarray(value, x.dtype), old))

  return tree.replace(
      node_visits=tree.node_visits.at[rows, leaf].add(1),
      raw_values=put(tree.raw_values, output.value, leaf),
      node_values=put(tree.node_values, output.value, leaf),
      children_prior_logits=put(tree.children_prior_logits, output.prior_logits, leaf),
      embeddings=jax.tree.map(lambda x, e: put(x, e, leaf), tree.embeddings, embeddings),
      parents=put(tree.parents, parent, leaf),
      action_from_parent=put(tree.action_from_parent, action, leaf),
      children_index=put(tree.children_index, leaf, parent, action),
      children_rewards=put(tree.children_rewards, output.reward, parent, action),
      children_discounts=put(tree.children_discounts, output.discount, parent, action))


def _mask_invalid(logits: jax.Array, invalid_actions: jax.Array) -> jax.Array:
  """Logits with (finite, NaN-safe) zero mass on invalid actions, as mctx's policies do."""
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  return jnp.where(invalid_actions > 0, jnp.finfo(logits.dtype).min, logits)


def _logits_of(probs: jax.Array) -> jax.Array:
  return jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))
