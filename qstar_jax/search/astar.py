"""Batched weighted A* search (DeepCubeA's BWAS) over a learned or hand-made heuristic.

Each iteration pops the N lowest-priority nodes, generates and evaluates EVERY child of each
(one batched heuristic call), and pushes the new or improved children with priority
``f = weight * g + h``. The search stops when a goal has been generated and the open list's lowest
priority is >= the goal's priority ``weight * g_goal`` (with weight = 1 and an admissible h that is
the usual lower-bound >= upper-bound rule, so the returned path is optimal), when the open list is
empty, when the node store overflowed (children were dropped), or at ``max_iterations``.
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
from qstar_jax.search.result import SearchResult

HeuristicFn = Callable[[Any, jax.Array], jax.Array]  # (params, states [K, D]) -> h [K]


@struct.dataclass
class LoopState:
  tables: ol.SearchTables
  upper_bound: jax.Array  # [] float32, cost of the best goal found (+inf)
  goal_node: jax.Array  # [] int32
  iterations: jax.Array  # [] int32
  nodes_generated: jax.Array  # [] int32
  nodes_expanded: jax.Array  # [] int32
  network_calls: jax.Array  # [] int32


def init_loop(env: PuzzleEnv, start: jax.Array, *, node_capacity: int, open_capacity: int,
              table_capacity: int) -> LoopState:
  tables = ol.init_tables(env.state_dim, node_capacity=node_capacity,
                          open_capacity=open_capacity, table_capacity=table_capacity)
  tables, _, _ = ol.insert_nodes(tables, env, start[None], jnp.zeros((1,)),
                                 jnp.full((1,), -1, jnp.int32), jnp.full((1,), -1, jnp.int32),
                                 jnp.ones((1,), bool))
  is_goal = env.is_goal(start)
  z = jnp.zeros((), jnp.int32)
  return LoopState(tables=tables, upper_bound=jnp.where(is_goal, 0.0, jnp.inf),
                   goal_node=jnp.where(is_goal, 0, -1).astype(jnp.int32), iterations=z,
                   nodes_generated=z, nodes_expanded=z, network_calls=z)


def should_continue(loop: LoopState, weight: jax.Array, max_iterations: jax.Array) -> jax.Array:
  lower = ol.min_priority(loop.tables)
  found = loop.goal_node >= 0
  done = (found & (lower >= weight * loop.upper_bound)) | ~jnp.isfinite(lower)
  done |= loop.iterations >= max_iterations
  done |= loop.tables.overflow_nodes > 0  # node store full: stop, reported as overflow
  return ~done


def record_goals(loop: LoopState, is_goal: jax.Array, g: jax.Array,
                 node_index: jax.Array) -> LoopState:
  """Lowers the upper bound with the goal children (all [K])."""
  cand = jnp.where(is_goal, g, jnp.inf)
  best = jnp.argmin(cand)
  better = cand[best] < loop.upper_bound
  return loop.replace(upper_bound=jnp.where(better, cand[best], loop.upper_bound),
                      goal_node=jnp.where(better, node_index[best], loop.goal_node))


def finish(env: PuzzleEnv, loop: LoopState, max_path_len: int) -> SearchResult:
  found = loop.goal_node >= 0
  path, length, truncated = ol.reconstruct_path(loop.tables, loop.goal_node, max_path_len)
  cost = jnp.sum(jnp.where(path >= 0, env.costs(jnp.maximum(path, 0)), 0.0))
  return SearchResult(
      found=found, path=path, path_length=length,
      path_cost=jnp.where(found & ~truncated, cost, jnp.inf),
      nodes_generated=loop.nodes_generated, nodes_expanded=loop.nodes_expanded,
      iterations=loop.iterations, network_calls=loop.network_calls,
      num_nodes=loop.tables.num_nodes, overflow_nodes=loop.tables.overflow_nodes,
      overflow_open=loop.tables.overflow_open, path_truncated=truncated)


def run_batched(init_one, step_one, finish_one, start_states, weight, max_iterations):
  """The batched search loop shared by A* and Q*.

  ``init_one(start) -> carry``, ``step_one(carry, active) -> carry`` (a no-op when ``active`` is
  false), ``finish_one(carry) -> SearchResult``; carries hold a ``LoopState`` first. The
  ``while_loop`` is NOT vmapped: a vmapped loop with a per-problem predicate would select between
  old and new carries every iteration (a copy of every table, O(capacity) per iteration); here
  the predicate is ``any(active)`` and finished problems skip their work through ``active``.
  """
  carry = jax.vmap(init_one)(start_states)
  active = lambda c: jax.vmap(lambda lp: should_continue(lp, weight, max_iterations))(c[0])  # noqa: E731
  carry = jax.lax.while_loop(lambda c: jnp.any(active(c)),
                             lambda c: jax.vmap(step_one)(c, active(c)), carry)
  return jax.vmap(finish_one)(carry)


def _astar_batched(params, start_states, weight, max_iterations, *, env: PuzzleEnv,
                   heuristic_fn: HeuristicFn, batch_pops: int, node_capacity: int,
                   open_capacity: int, table_capacity: int, max_path_len: int) -> SearchResult:
  a = env.num_actions
  costs = jnp.asarray(env.action_costs)

  def init_one(start):
    loop = init_loop(env, start, node_capacity=node_capacity, open_capacity=open_capacity,
                     table_capacity=table_capacity)
    h0 = heuristic_fn(params, start[None])[0]
    tables = ol.push(loop.tables, jnp.reshape(h0, (1,)), jnp.zeros((1,)),
                     jnp.zeros((1,), jnp.int32), jnp.full((1,), -1, jnp.int32),
                     jnp.ones((1,), bool))
    return (loop.replace(tables=tables, network_calls=loop.network_calls + 1),)

  def step_one(carry, active):
    (loop,) = carry
    tables, _, g, node, _, valid = ol.pop(loop.tables, batch_pops, active)
    parents = tables.node_states[node]  # [N, D]
    children = env.next_states(parents).reshape(batch_pops * a, env.state_dim)
    child_g = (g[:, None] + costs[None, :]).reshape(-1)
    child_valid = (valid[:, None] & env.valid_action_mask(parents)).reshape(-1)
    child_parent = jnp.repeat(node, a)
    child_action = jnp.tile(jnp.arange(a, dtype=jnp.int32), batch_pops)
    tables, index, improved = ol.insert_nodes(tables, env, children, child_g, child_parent,
                                              child_action, child_valid)
    h = heuristic_fn(params, children)  # one batched call for every generated child
    goal = env.is_goal(children) & improved
    loop = record_goals(loop, goal, child_g, index)
    tables = ol.push(tables, weight * child_g + h, child_g, index, jnp.full_like(index, -1),
                     improved & ~goal)
    step = active.astype(jnp.int32)
    return (loop.replace(
        tables=tables, iterations=loop.iterations + step,
        nodes_generated=loop.nodes_generated + jnp.sum(child_valid, dtype=jnp.int32),
        nodes_expanded=loop.nodes_expanded + jnp.sum(valid, dtype=jnp.int32),
        network_calls=loop.network_calls + step),)

  return run_batched(init_one, step_one, lambda c: finish(env, c[0], max_path_len),
                     start_states, weight, max_iterations)


_STATIC = ("env", "heuristic_fn", "batch_pops", "node_capacity", "open_capacity",
           "table_capacity", "max_path_len")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _astar_jit(params, start_states, weight, max_iterations, **static) -> SearchResult:
  return _astar_batched(params, start_states, weight, max_iterations, **static)


def astar_search(params: Any, start_states, *, env: PuzzleEnv, heuristic_fn: HeuristicFn,
                 weight: float = 1.0, batch_pops: int = 1, max_iterations: int = 1000,
                 node_capacity: int = 100_000, open_capacity: int | None = None,
                 table_capacity: int | None = None, max_path_len: int = 64) -> SearchResult:
  """Batched weighted A* from ``start_states [B, D]``; jitted, vmapped over problems.

  ``heuristic_fn(params, states [K, D]) -> h [K]`` must be a pure function (an identity-stable
  object: a new lambda per call recompiles). Priority ``f = weight * g + h``.
  States, capacities and sizes are validated on the host before tracing.
  """
  states = env.validate_states(start_states)
  open_capacity = open_capacity or node_capacity
  table_capacity = table_capacity or ol.default_table_capacity(node_capacity)
  ol.check_capacities(node_capacity=node_capacity, open_capacity=open_capacity,
                      table_capacity=table_capacity, batch_pops=batch_pops,
                      pushes_per_iteration=batch_pops * env.num_actions)
  if max_iterations < 0 or max_path_len <= 0:
    raise ValueError(f"max_iterations must be >= 0 and max_path_len > 0, got {max_iterations}, "
                     f"{max_path_len}")
  return _astar_jit(params, jnp.asarray(states), jnp.float32(weight), jnp.int32(max_iterations),
                    env=env, heuristic_fn=heuristic_fn, batch_pops=batch_pops,
                    node_capacity=node_capacity, open_capacity=open_capacity,
                    table_capacity=table_capacity, max_path_len=max_path_len)
