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
from jax.sharding import Mesh

from qstar_jax.distributed import DEFAULT_RULES, Rules
from qstar_jax.envs.puzzle import PuzzleEnv
from qstar_jax.search import open_list as ol
from qstar_jax.search.puzzle import loop as search_loop
from qstar_jax.search.puzzle.result import SearchResult

HeuristicFn = Callable[[Any, jax.Array], jax.Array]  # (params, states [K, D]) -> h [K]


def _astar_batched(params, start_states, weight, max_iterations, *, env: PuzzleEnv,
                   heuristic_fn: HeuristicFn, batch_pops: int, node_capacity: int,
                   open_capacity: int, table_capacity: int, max_path_len: int) -> SearchResult:
  a = env.num_actions
  costs = jnp.asarray(env.action_costs)

  def init_one(start):
    loop = search_loop.init_loop(env, start, node_capacity=node_capacity,
                                 open_capacity=open_capacity, table_capacity=table_capacity)
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
    tables, index, improved = search_loop.insert_states(tables, env, children, child_g,
                                                        child_parent, child_action, child_valid)
    h = heuristic_fn(params, children)  # one batched call for every generated child
    goal = env.is_goal(children) & improved
    loop = search_loop.record_goals(loop, goal, child_g, index)
    tables = ol.push(tables, weight * child_g + h, child_g, index, jnp.full_like(index, -1),
                     improved & ~goal)
    step = active.astype(jnp.int32)
    return (loop.replace(
        tables=tables, iterations=loop.iterations + step,
        nodes_generated=loop.nodes_generated + jnp.sum(child_valid, dtype=jnp.int32),
        nodes_expanded=loop.nodes_expanded + jnp.sum(valid, dtype=jnp.int32),
        network_calls=loop.network_calls + step),)

  return search_loop.run_batched(init_one, step_one,
                                 lambda c: search_loop.finish(env, c[0], max_path_len),
                                 start_states, weight, max_iterations)


_STATIC = ("env", "heuristic_fn", "batch_pops", "node_capacity", "open_capacity",
           "table_capacity", "max_path_len")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _astar_jit(params, start_states, weight, max_iterations, **static) -> SearchResult:
  return _astar_batched(params, start_states, weight, max_iterations, **static)


def astar_search(params: Any, start_states, *, env: PuzzleEnv, heuristic_fn: HeuristicFn,
                 weight: float = 1.0, batch_pops: int = 1, max_iterations: int = 1000,
                 node_capacity: int = 100_000, open_capacity: int | None = None,
                 table_capacity: int | None = None, max_path_len: int = 64,
                 mesh: Mesh | None = None,
                 sharding_rules: Rules = DEFAULT_RULES) -> SearchResult:
  """Batched weighted A* from ``start_states [B, D]``; jitted, vmapped over problems.

  ``heuristic_fn(params, states [K, D]) -> h [K]`` must be a pure function (an identity-stable
  object: a new lambda per call recompiles). Priority ``f = weight * g + h``.
  States, capacities and sizes are validated on the host before tracing.

  ``mesh``: None runs on the default device (unchanged). With a mesh, the B problems (their
  start states, search tables and results) are split over its ``data`` x ``fsdp`` axes and the
  parameters placed by ``sharding_rules`` (see ``loop.run_sharded``); results are identical to
  the unsharded search up to float rounding of the network. B must divide over
  ``data * fsdp`` (``MeshShapeError`` otherwise, before tracing).
  """
  open_capacity = open_capacity or node_capacity
  states, table_capacity = search_loop.validate_search_args(
      env, start_states, node_capacity=node_capacity, open_capacity=open_capacity,
      table_capacity=table_capacity, batch_pops=batch_pops,
      pushes_per_iteration=batch_pops * env.num_actions, max_iterations=max_iterations,
      max_path_len=max_path_len)
  static = dict(env=env, heuristic_fn=heuristic_fn, batch_pops=batch_pops,
                node_capacity=node_capacity, open_capacity=open_capacity,
                table_capacity=table_capacity, max_path_len=max_path_len)
  if mesh is not None:
    return search_loop.run_sharded(_astar_batched, params, states, jnp.float32(weight),
                                   jnp.int32(max_iterations), mesh=mesh, rules=sharding_rules,
                                   static=static)
  return _astar_jit(params, jnp.asarray(states), jnp.float32(weight), jnp.int32(max_iterations),
                    **static)
