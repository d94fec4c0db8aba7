"""The search loop shared by A* and Q* on puzzles: loop state, goal bookkeeping, stop rule,
the batched while loop, the result, and the host-side checks of the arguments.

A* and Q* differ only in what one iteration pops and pushes (nodes with all their children,
or single edges); each supplies ``init_one`` / ``step_one`` and runs them through
``run_batched``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qstar_jax.distributed import (
  Rules,
  batch_shardings,
  batch_spec,
  param_shardings,
  put_global,
  replicated,
)
from qstar_jax.envs.puzzle import PuzzleEnv
from qstar_jax.search import open_list as ol
from qstar_jax.search.puzzle.result import SearchResult


@struct.dataclass
class LoopState:
  tables: ol.SearchTables
  upper_bound: jax.Array  # [] float32, cost of the best goal found (+inf)
  goal_node: jax.Array  # [] int32
  iterations: jax.Array  # [] int32
  nodes_generated: jax.Array  # [] int32
  nodes_expanded: jax.Array  # [] int32
  network_calls: jax.Array  # [] int32


def insert_states(tables: ol.SearchTables, env: PuzzleEnv, states: jax.Array, g: jax.Array,
                  parent: jax.Array, action: jax.Array,
                  valid: jax.Array) -> tuple[ol.SearchTables, jax.Array, jax.Array]:
  """``open_list.insert_nodes`` with the environment's state hashes (all arguments [K])."""
  return ol.insert_nodes(tables, states, env.hash(states), g, parent, action, valid)


def init_loop(env: PuzzleEnv, start: jax.Array, *, node_capacity: int, open_capacity: int,
              table_capacity: int) -> LoopState:
  """Tables holding the start as node 0 (nothing on the open list yet); a start that is the
  goal is already the solution."""
  tables = ol.init_tables(env.state_dim, node_capacity=node_capacity,
                          open_capacity=open_capacity, table_capacity=table_capacity)
  tables, _, _ = insert_states(tables, env, start[None], jnp.zeros((1,)),
                               jnp.full((1,), -1, jnp.int32), jnp.full((1,), -1, jnp.int32),
                               jnp.ones((1,), bool))
  is_goal = env.is_goal(start)
  z = jnp.zeros((), jnp.int32)
  return LoopState(tables=tables, upper_bound=jnp.where(is_goal, 0.0, jnp.inf),
                   goal_node=jnp.where(is_goal, 0, -1).astype(jnp.int32), iterations=z,
                   nodes_generated=z, nodes_expanded=z, network_calls=z)


def should_continue(loop: LoopState, weight: jax.Array, max_iterations: jax.Array) -> jax.Array:
  """The stop rule, negated: stop when a goal is found and the open list's lowest priority is
  >= ``weight * upper_bound``, when the open list is empty, at ``max_iterations``, or when the
  node store overflowed."""
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
  """One problem's ``SearchResult``: the best goal's path (parent pointers) and the counters."""
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

  def active(carry):
    return jax.vmap(lambda loop: should_continue(loop, weight, max_iterations))(carry[0])

  carry = jax.lax.while_loop(lambda c: jnp.any(active(c)),
                             lambda c: jax.vmap(step_one)(c, active(c)), carry)
  return jax.vmap(finish_one)(carry)


def validate_search_args(env: PuzzleEnv, start_states, *, node_capacity: int, open_capacity: int,
                         table_capacity: int | None, batch_pops: int, pushes_per_iteration: int,
                         max_iterations: int, max_path_len: int) -> tuple[np.ndarray, int]:
  """Host-side checks before tracing (raise ``ValueError``); returns the validated start states
  and the table capacity (default: ``open_list.default_table_capacity(node_capacity)``)."""
  states = env.validate_states(start_states)
  table_capacity = table_capacity or ol.default_table_capacity(node_capacity)
  ol.check_capacities(node_capacity=node_capacity, open_capacity=open_capacity,
                      table_capacity=table_capacity, batch_pops=batch_pops,
                      pushes_per_iteration=pushes_per_iteration)
  if max_iterations < 0 or max_path_len <= 0:
    raise ValueError(f"max_iterations must be >= 0 and max_path_len > 0, got {max_iterations}, "
                     f"{max_path_len}")
  return states, table_capacity


# ----------------------------------------------------------------------------- sharded runs

_SHARDED_JITS: dict[Any, Any] = {}


def sharded_jit(fun: Callable, static: dict[str, Any], mesh: Mesh, in_shardings: tuple,
                out_shardings: Any) -> Any:
  """The search ``partial(fun, **static)`` as a ``shard_map`` over the mesh's problem axes,
  jitted with explicit ``in_shardings`` / ``out_shardings``; built once per (function, static
  arguments, mesh, shardings) and kept, so a second batch of the same shapes on the same mesh
  reuses the compiled program (as the unsharded jit's cache keyed by its static arguments).

  Each device runs the whole search loop on its own B / (data * fsdp) problems: ``fun`` is
  written for a batch of problems (vmapped tables, a loop until ``any(active)`` is false) and
  a problem's result depends only on its own steps (a finished problem's steps are no-ops), so
  every device stops when its own problems are done and the loop needs no collective at all.
  (Under plain SPMD partitioning of the jit, XLA gathered every problem's open list once per
  iteration for ``lax.top_k``, and reduced ``any(active)`` across devices each iteration.)
  The parameters enter the map whole (``P()``): stored as the rules place them, they are
  gathered once per search before the loop, since every device evaluates the network on its
  own problems' states.
  """
  leaves, treedef = jax.tree.flatten((in_shardings, out_shardings))
  key = (fun, tuple(sorted(static.items())), mesh, treedef, tuple(leaves))
  if key not in _SHARDED_JITS:
    problems = batch_spec(1)
    mapped = jax.shard_map(functools.partial(fun, **static), mesh=mesh,
                           in_specs=(P(), problems, P(), P()), out_specs=problems,
                           check_vma=False)
    _SHARDED_JITS[key] = jax.jit(mapped, in_shardings=in_shardings,
                                 out_shardings=out_shardings)
  return _SHARDED_JITS[key]


def run_sharded(fun: Callable, params: Any, start_states: np.ndarray, weight: jax.Array,
                max_iterations: jax.Array, *, mesh: Mesh, rules: Rules,
                static: dict[str, Any]) -> SearchResult:
  """``fun(params, start_states, weight, max_iterations, **static)`` on ``mesh``.

  Problems (the leading dimension of the start states, and with it every vmapped search table
  and every ``SearchResult`` leaf) are split over the mesh's ``data`` x ``fsdp`` axes (see
  ``sharded_jit``); the network's parameters are placed by ``rules`` (``param_shardings``: the
  puzzle net's hidden dimensions over ``fsdp`` / ``tensor``, unmatched leaves replicated;
  ``params=None`` is an empty tree); the weight and the iteration bound are replicated.
  Nothing is fetched to the host.

  Raises ``MeshShapeError`` (before tracing) when the number of problems does not divide over
  ``data`` x ``fsdp`` or a parameter dimension does not divide over its axes.
  """
  states_sharding = batch_shardings(start_states, mesh, what="start_states")
  params_sharding = param_shardings(params, mesh, rules)
  scalar = replicated(mesh)
  in_shardings = (params_sharding, states_sharding, scalar, scalar)
  # Every SearchResult leaf is [B] or [B, max_path_len]: one prefix sharding for all of them.
  out_shardings = NamedSharding(mesh, batch_spec(1))
  jitted = sharded_jit(fun, static, mesh, in_shardings, out_shardings)
  return jitted(*put_global((params, start_states, weight, max_iterations), in_shardings))
