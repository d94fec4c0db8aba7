"""Batched Q* search (Agostinelli et al., "A* search without expansions").

The open list holds (node, action) edges with priority ``f = weight * g(s) + q(s, a)`` where
``q(s, a) ~ c(s, a) + h(next(s, a))``. Each iteration pops the N lowest edges, applies only those
transitions, goal-tests and closed-set-checks the N children, evaluates ``q(child, .)`` for all of
them in ONE network call and pushes the children's edges. Stop rule as in ``astar_search``: a goal
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

from qstar_jax.envs.puzzle import PuzzleEnv
from qstar_jax.search import open_list as ol
from qstar_jax.search.astar import LoopState, finish, init_loop, record_goals, should_continue
from qstar_jax.search.result import SearchResult

QFn = Callable[[Any, jax.Array], jax.Array]  # (params, states [K, D]) -> q [K, A]


def _qstar_one(params, start, weight, max_iterations, *, env: PuzzleEnv, q_fn: QFn,
               batch_pops: int, node_capacity: int, open_capacity: int, table_capacity: int,
               max_path_len: int) -> SearchResult:
  a = env.num_actions
  costs = jnp.asarray(env.action_costs)
  actions = jnp.arange(a, dtype=jnp.int32)
  loop = init_loop(env, start, node_capacity=node_capacity, open_capacity=open_capacity,
                   table_capacity=table_capacity)
  q0 = q_fn(params, start[None])[0]  # [A]
  tables = ol.push(loop.tables, q0, jnp.zeros((a,)), jnp.zeros((a,), jnp.int32), actions,
                   env.valid_action_mask(start) & ~env.is_goal(start))
  loop = loop.replace(tables=tables, network_calls=loop.network_calls + 1)

  def body(loop: LoopState) -> LoopState:
    tables, _, g, node, action, valid = ol.pop(loop.tables, batch_pops)
    parents = tables.node_states[node]  # [N, D]
    safe_action = jnp.maximum(action, 0)
    children = env.step(parents, safe_action)  # only the popped edges' children
    child_g = g + costs[safe_action]
    tables, index, improved = ol.insert_nodes(tables, env, children, child_g, node, safe_action,
                                              valid)
    goal = env.is_goal(children) & improved
    loop = record_goals(loop, goal, child_g, index)
    q = q_fn(params, children)  # [N, A], one batched call
    push_mask = (improved & ~goal)[:, None] & env.valid_action_mask(children)
    tables = ol.push(tables, (weight * child_g[:, None] + q).reshape(-1),
                     jnp.repeat(child_g, a), jnp.repeat(index, a),
                     jnp.tile(actions, batch_pops), push_mask.reshape(-1))
    return loop.replace(
        tables=tables, iterations=loop.iterations + 1,
        nodes_generated=loop.nodes_generated + jnp.sum(valid, dtype=jnp.int32),
        nodes_expanded=loop.nodes_expanded + jnp.sum(valid, dtype=jnp.int32),
        network_calls=loop.network_calls + 1)

  loop = jax.lax.while_loop(lambda lp: should_continue(lp, weight, max_iterations), body, loop)
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
  ``nodes_expanded`` = popped non-stale edges (each generates exactly one child).
  """
  states = env.validate_states(start_states)
  open_capacity = open_capacity or node_capacity * env.num_actions
  table_capacity = table_capacity or ol.default_table_capacity(node_capacity)
  ol.check_capacities(node_capacity=node_capacity, open_capacity=open_capacity,
                      table_capacity=table_capacity, batch_pops=batch_pops,
                      pushes_per_iteration=batch_pops * env.num_actions)
  if max_iterations < 0 or max_path_len <= 0:
    raise ValueError(f"max_iterations must be >= 0 and max_path_len > 0, got {max_iterations}, "
                     f"{max_path_len}")
  return _qstar_jit(params, jnp.asarray(states), jnp.float32(weight), jnp.int32(max_iterations),
                    env=env, q_fn=q_fn, batch_pops=batch_pops, node_capacity=node_capacity,
                    open_capacity=open_capacity, table_capacity=table_capacity,
                    max_path_len=max_path_len)
