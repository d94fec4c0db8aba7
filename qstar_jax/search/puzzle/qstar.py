"""Batched Q* search (Agostinelli et al., "A* search without expansions").

The open list holds (node, action) edges with priority ``f = weight * g(s) + q(s, a)`` where
``q(s, a) ~ c(s, a) + h(next(s, a))``. Each iteration pops the N lowest edges, applies only those
transitions, goal-tests and closed-set-checks the N children, evaluates ``q(child, .)`` for all of
them in ONE network call and pushes the children's edges. The edges are kept lazily (see
``EdgeStore``): each node's q-values are sorted once and the open list holds only each node's
cheapest unpopped edge, which pops edges in the same order as a queue of all edges. The stop
rule is A*'s (``loop.should_continue``): a goal found and the lowest priority on the open list
>= ``weight * g_goal`` (with weight = 1 and a q that never overestimates ``c + h*``, the path is
optimal), or an empty open list, a full node store, or ``max_iterations``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from qstar_jax.distributed import DEFAULT_RULES, Rules
from qstar_jax.envs.puzzle import PuzzleEnv
from qstar_jax.search import open_list as ol
from qstar_jax.search.puzzle import loop as search_loop
from qstar_jax.search.puzzle.result import SearchResult

QFn = Callable[[Any, jax.Array], jax.Array]  # (params, states [K, D]) -> q [K, A]


@struct.dataclass
class EdgeStore:
  """Each stored node's q-values sorted ascending, and the actions in that order.

  The open list holds ONE entry per node: its cheapest edge not yet popped, as
  ``(priority = weight * g + q_sorted[node, rank], g, node, rank)``. Popping it pushes the node's
  next edge ``rank + 1`` (its priority is >= the popped one), so the open list pops edges in
  exactly the order of a priority queue holding every edge, while its size stays O(nodes) rather
  than O(nodes * A). Actions that do not change the state are stored as +inf and never popped.
  """

  q_sorted: jax.Array  # [C + 1, E] float32 (E = edges_per_node; the last row is scratch)
  action_sorted: jax.Array  # [C + 1, E] int32


def _sort_edges(q: jax.Array, valid_actions: jax.Array,
                edges_per_node: int) -> tuple[jax.Array, jax.Array]:
  """The ``edges_per_node`` cheapest entries of each row of ``q [K, A]`` in ascending order
  (invalid actions +inf) ``[K, E]`` and their actions ``[K, E]``.

  Edges left out when ``E < A`` are counted where they are lost, when a node's last kept edge
  is popped (``overflow_open`` in ``step_one``), not here.
  """
  q = jnp.where(valid_actions, q, jnp.inf).astype(jnp.float32)
  a = q.shape[-1]
  if edges_per_node >= a:
    order = jnp.argsort(q, axis=-1).astype(jnp.int32)
    return jnp.take_along_axis(q, order, axis=-1), order
  neg, order = jax.lax.top_k(-q, edges_per_node)  # partial selection: O(A) per row
  return -neg, order.astype(jnp.int32)


def _write_edges(edges: EdgeStore, pending) -> EdgeStore:
  """Writes rows ``(dst [K], q_sorted [K, A], order [K, A])``; masked rows have ``dst`` = the
  scratch last row (an unconditional scatter: a masked, select-based one made XLA copy the
  whole store)."""
  dst, q_sorted, order = pending
  return EdgeStore(q_sorted=edges.q_sorted.at[dst].set(q_sorted),
                   action_sorted=edges.action_sorted.at[dst].set(order))


def _qstar_batched(params, start_states, weight, max_iterations, *, env: PuzzleEnv, q_fn: QFn,
                   batch_pops: int, node_capacity: int, open_capacity: int, table_capacity: int,
                   max_path_len: int, edges_per_node: int) -> SearchResult:
  a = env.num_actions
  e = min(edges_per_node, a)
  costs = jnp.asarray(env.action_costs)

  def init_one(start):
    loop = search_loop.init_loop(env, start, node_capacity=node_capacity,
                                 open_capacity=open_capacity, table_capacity=table_capacity)
    # One extra row receives the writes of masked entries (see _write_edges).
    edges = EdgeStore(q_sorted=jnp.full((node_capacity + 1, e), jnp.inf, jnp.float32),
                      action_sorted=jnp.zeros((node_capacity + 1, e), jnp.int32))
    root = jnp.zeros((1,), jnp.int32)
    q0 = q_fn(params, start[None])  # [1, A]
    q0_sorted, order0 = _sort_edges(q0, env.valid_action_mask(start[None]), e)
    edges = _write_edges(edges, (root, q0_sorted, order0))
    tables = ol.push(loop.tables, q0_sorted[:, 0], jnp.zeros((1,)), root, root,
                     jnp.isfinite(q0_sorted[:, 0]) & ~env.is_goal(start[None]))
    # Rows waiting to be written at the start of the next iteration (see step_one).
    pending = (jnp.full((batch_pops,), node_capacity, jnp.int32),
               jnp.full((batch_pops, e), jnp.inf, jnp.float32),
               jnp.zeros((batch_pops, e), jnp.int32))
    return loop.replace(tables=tables, network_calls=loop.network_calls + 1), edges, pending

  def step_one(carry, active):
    loop, edges, pending = carry
    # The previous iteration's rows are written first, so every read of the store below depends
    # on the write (reads after a write let XLA update the [C + 1, A] store in place; a read that
    # may run before a later write makes it copy the whole store each iteration).
    edges = _write_edges(edges, pending)
    tables, _, g, node, rank, valid = ol.pop(loop.tables, batch_pops, active)
    rank = jnp.maximum(rank, 0)
    action = edges.action_sorted[node, rank]
    # The popped node's next edge goes back on the open list.
    next_rank = jnp.minimum(rank + 1, e - 1)
    next_q = jnp.where(rank + 1 < e, edges.q_sorted[node, next_rank], jnp.inf)
    tables = ol.push(tables, weight * g + next_q, g, node, next_rank,
                     valid & jnp.isfinite(next_q))
    if e < a:  # the node's kept edges are used up; its other edges are dropped: counted
      tables = tables.replace(overflow_open=tables.overflow_open + jnp.sum(
          valid & (rank + 1 == e), dtype=jnp.int32))
    parents = tables.node_states[node]  # [N, D]
    children = env.step(parents, action)  # only the popped edges' children
    child_g = g + costs[action]
    tables, index, improved = search_loop.insert_states(tables, env, children, child_g, node,
                                                        action, valid)
    goal = env.is_goal(children) & improved
    loop = search_loop.record_goals(loop, goal, child_g, index)
    q = q_fn(params, children)  # [N, A], one batched call
    push = improved & ~goal
    q_sorted, order = _sort_edges(q, env.valid_action_mask(children), e)
    best = q_sorted[:, 0]
    pending = (jnp.where(push, index, node_capacity), q_sorted, order)
    tables = ol.push(tables, weight * child_g + best, child_g, index, jnp.zeros_like(index),
                     push & jnp.isfinite(best))
    step = active.astype(jnp.int32)
    loop = loop.replace(
        tables=tables, iterations=loop.iterations + step,
        nodes_generated=loop.nodes_generated + jnp.sum(valid, dtype=jnp.int32),
        nodes_expanded=loop.nodes_expanded + jnp.sum(valid, dtype=jnp.int32),
        network_calls=loop.network_calls + step)
    return loop, edges, pending

  return search_loop.run_batched(init_one, step_one,
                                 lambda c: search_loop.finish(env, c[0], max_path_len),
                                 start_states, weight, max_iterations)


_STATIC = ("env", "q_fn", "batch_pops", "node_capacity", "open_capacity", "table_capacity",
           "max_path_len", "edges_per_node")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _qstar_jit(params, start_states, weight, max_iterations, **static) -> SearchResult:
  return _qstar_batched(params, start_states, weight, max_iterations, **static)


def qstar_search(params: Any, start_states, *, env: PuzzleEnv, q_fn: QFn, weight: float = 1.0,
                 batch_pops: int = 1, max_iterations: int = 1000, node_capacity: int = 100_000,
                 open_capacity: int | None = None, table_capacity: int | None = None,
                 max_path_len: int = 64, edges_per_node: int | None = None,
                 mesh: Mesh | None = None,
                 sharding_rules: Rules = DEFAULT_RULES) -> SearchResult:
  """Batched Q* search from ``start_states [B, D]``; jitted, vmapped over problems.

  ``q_fn(params, states [K, D]) -> q [K, A]`` (identity-stable, pure). ``nodes_generated`` =
  ``nodes_expanded`` = popped non-stale edges (each generates exactly one child). Memory: the
  sorted q-values of every stored node, ``node_capacity * A`` floats and ints (``EdgeStore``);
  the open list holds one entry per node (``open_capacity`` default ``2 * node_capacity``).
  ``edges_per_node`` (default: all A, exact): keep only each node's E cheapest edges, selected
  with ``lax.top_k`` instead of a full sort (memory ``node_capacity * E``); when E < A, popping
  a node's last kept edge counts one ``overflow_open`` (its other A - E edges are dropped, valid
  or not), so the result says when the cut may have mattered.

  ``mesh``: None runs on the default device (unchanged). With a mesh, the B problems (start
  states, node stores, closed sets, open lists, edge stores and results: every carry leaf is
  per problem) are split over its ``data`` x ``fsdp`` axes, so each device searches B / (data
  * fsdp) problems (devices along ``tensor`` repeat their group's) and evaluates the Q network
  on their children only, with no collective inside the loop; the parameters are
  placed by ``sharding_rules`` (``param_shardings``; ``DEFAULT_RULES`` holds the puzzle net's:
  hidden dimensions over ``fsdp`` / ``tensor``), see ``loop.run_sharded``. B must divide over
  ``data * fsdp`` (``MeshShapeError`` otherwise, before tracing).
  """
  open_capacity = open_capacity or 2 * node_capacity
  states, table_capacity = search_loop.validate_search_args(
      env, start_states, node_capacity=node_capacity, open_capacity=open_capacity,
      table_capacity=table_capacity, batch_pops=batch_pops, pushes_per_iteration=2 * batch_pops,
      max_iterations=max_iterations, max_path_len=max_path_len)
  if edges_per_node is not None and edges_per_node <= 0:
    raise ValueError(f"edges_per_node must be a positive integer, got {edges_per_node}")
  static = dict(env=env, q_fn=q_fn, batch_pops=batch_pops, node_capacity=node_capacity,
                open_capacity=open_capacity, table_capacity=table_capacity,
                max_path_len=max_path_len, edges_per_node=edges_per_node or env.num_actions)
  if mesh is not None:
    return search_loop.run_sharded(_qstar_batched, params, states, jnp.float32(weight),
                                   jnp.int32(max_iterations), mesh=mesh, rules=sharding_rules,
                                   static=static)
  return _qstar_jit(params, jnp.asarray(states), jnp.float32(weight), jnp.int32(max_iterations),
                    **static)
