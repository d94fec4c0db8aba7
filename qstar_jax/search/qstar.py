"""Batched Q* search (Agostinelli et al., "A* search without expansions").

The open list holds (node, action) edges with priority ``f = weight * g(s) + q(s, a)`` where
``q(s, a) ~ c(s, a) + h(next(s, a))``. Each iteration pops the N lowest edges, applies only those
transitions, goal-tests and closed-set-checks the N children, evaluates ``q(child, .)`` for all of
them in ONE network call and pushes the children's edges. The edges are kept lazily (see
``EdgeStore``): each node's q-values are sorted once and the open list holds only each node's
cheapest unpopped edge, which pops edges in the same order as a queue of all edges. Stop rule as in ``astar_search``: a goal
found and the lowest priority on the open list >= ``weight * g_goal`` (with weight = 1 and a q
that never overestimates ``c + h*``, the path is optimal), or an empty open list, a full node
store, or ``max_iterations``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flax import struct

from qstar_jax.envs.puzzle import PuzzleEnv
from qstar_jax.search import open_list as ol
from qstar_jax.search.astar import LoopState, finish, init_loop, record_goals, should_continue
from qstar_jax.search.result import SearchResult

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

  q_sorted: jax.Array  # [C, A] float32
  action_sorted: jax.Array  # [C, A] int32


def _store_edges(edges: EdgeStore, index: jax.Array, q: jax.Array, valid_actions: jax.Array,
                 mask: jax.Array) -> tuple[EdgeStore, jax.Array]:
  """Sorts ``q [K, A]`` per row and writes it at node rows ``index [K]`` where ``mask``.

  Returns the store and each row's cheapest q ``[K]`` (+inf when no action is valid)."""
  capacity = edges.q_sorted.shape[0]
  q = jnp.where(valid_actions, q, jnp.inf).astype(jnp.float32)
  order = jnp.argsort(q, axis=-1).astype(jnp.int32)
  q_sorted = jnp.take_along_axis(q, order, axis=-1)
  dst = jnp.where(mask, index, capacity)
  return EdgeStore(q_sorted=edges.q_sorted.at[dst].set(q_sorted, mode="drop"),
                   action_sorted=edges.action_sorted.at[dst].set(order, mode="drop")), q_sorted[:, 0]


def _qstar_one(params, start, weight, max_iterations, *, env: PuzzleEnv, q_fn: QFn,
               batch_pops: int, node_capacity: int, open_capacity: int, table_capacity: int,
               max_path_len: int) -> SearchResult:
  a = env.num_actions
  costs = jnp.asarray(env.action_costs)
  loop = init_loop(env, start, node_capacity=node_capacity, open_capacity=open_capacity,
                   table_capacity=table_capacity)
  edges = EdgeStore(q_sorted=jnp.full((node_capacity, a), jnp.inf, jnp.float32),
                    action_sorted=jnp.zeros((node_capacity, a), jnp.int32))
  root = jnp.zeros((1,), jnp.int32)
  q0 = q_fn(params, start[None])  # [1, A]
  edges, best0 = _store_edges(edges, root, q0, env.valid_action_mask(start[None]),
                              jnp.ones((1,), bool))
  tables = ol.push(loop.tables, best0, jnp.zeros((1,)), root, root,
                   jnp.isfinite(best0) & ~env.is_goal(start[None]))
  loop = loop.replace(tables=tables, network_calls=loop.network_calls + 1)

  def body(carry):
    loop, edges = carry
    tables, _, g, node, rank, valid = ol.pop(loop.tables, batch_pops)
    rank = jnp.maximum(rank, 0)
    action = edges.action_sorted[node, rank]
    # The popped node's next edge goes back on the open list.
    next_rank = jnp.minimum(rank + 1, a - 1)
    next_q = jnp.where(rank + 1 < a, edges.q_sorted[node, next_rank], jnp.inf)
    tables = ol.push(tables, weight * g + next_q, g, node, next_rank,
                     valid & jnp.isfinite(next_q))
    parents = tables.node_states[node]  # [N, D]
    children = env.step(parents, action)  # only the popped edges' children
    child_g = g + costs[action]
    tables, index, improved = ol.insert_nodes(tables, env, children, child_g, node, action,
                                              valid)
    goal = env.is_goal(children) & improved
    loop = record_goals(loop, goal, child_g, index)
    q = q_fn(params, children)  # [N, A], one batched call
    push = improved & ~goal
    edges, best = _store_edges(edges, index, q, env.valid_action_mask(children), push)
    tables = ol.push(tables, weight * child_g + best, child_g, index, jnp.zeros_like(index),
                     push & jnp.isfinite(best))
    loop = loop.replace(
        tables=tables, iterations=loop.iterations + 1,
        nodes_generated=loop.nodes_generated + jnp.sum(valid, dtype=jnp.int32),
        nodes_expanded=loop.nodes_expanded + jnp.sum(valid, dtype=jnp.int32),
        network_calls=loop.network_calls + 1)
    return loop, edges

  loop, _ = jax.lax.while_loop(lambda c: should_continue(c[0], weight, max_iterations), body,
                               (loop, edges))
  return finish(env, loop, max_path_len)


_STATIC = ("env", "q_fn", "batch_pops", "node_capacity", "open_capacity", "table_capacity",
           "max_path_len")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _qstar_jit(params, start_states, weight, max_iterations, **static) -> SearchResult:
  one = functools.partial(_qstar_one, **static)
  return jax.vmap(one, in_axes=(None, 0, None, None))(params, start_states, weight,
                                                      max_iterations)


def qstar_search(params: Any, start_states, *, env: PuzzleEnv, q_fn: QFn, weight: float = 1.0,
                 batch_pops: int = 1, max_iterations: int = 1000, node_capacity: int = 100_000,
                 open_capacity: int | None = None, table_capacity: int | None = None,
                 max_path_len: int = 64) -> SearchResult:
  """Batched Q* search from ``start_states [B, D]``; jitted, vmapped over problems.

  ``q_fn(params, states [K, D]) -> q [K, A]`` (identity-stable, pure). ``nodes_generated`` =
  ``nodes_expanded`` = popped non-stale edges (each generates exactly one child). Memory: the
  sorted q-values of every stored node, ``node_capacity * A`` floats and ints (``EdgeStore``);
  the open list holds one entry per node (``open_capacity`` default ``2 * node_capacity``).
  """
  states = env.validate_states(start_states)
  open_capacity = open_capacity or 2 * node_capacity
  table_capacity = table_capacity or ol.default_table_capacity(node_capacity)
  ol.check_capacities(node_capacity=node_capacity, open_capacity=open_capacity,
                      table_capacity=table_capacity, batch_pops=batch_pops,
                      pushes_per_iteration=2 * batch_pops)
  if max_iterations < 0 or max_path_len <= 0:
    raise ValueError(f"max_iterations must be >= 0 and max_path_len > 0, got {max_iterations}, "
                     f"{max_path_len}")
  return _qstar_jit(params, jnp.asarray(states), jnp.float32(weight), jnp.int32(max_iterations),
                    env=env, q_fn=q_fn, batch_pops=batch_pops, node_capacity=node_capacity,
                    open_capacity=open_capacity, table_capacity=table_capacity,
                    max_path_len=max_path_len)
