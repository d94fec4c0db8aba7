"""Bellman targets for puzzles: deep approximate value iteration (V) and deep Q-learning (Q).

Costs-to-go are minimised (puzzles have positive transition costs and a goal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qstar_jax.envs.puzzle import PuzzleEnv


def value_iteration_targets(target_params: Any, states: jax.Array, *, env: PuzzleEnv,
                            value_fn: Callable[[Any, jax.Array], jax.Array]) -> jax.Array:
  """DAVI targets ``y(s) = min_a [c(a) + 1[next(s,a) not goal] * V_target(next(s,a))]``, and
  ``y(s) = 0`` for a goal state ``s``.

  Args: ``states [B, D]``; ``value_fn(params, states [K, D]) -> [K]``. Returns ``[B]`` float32,
  without gradient. Actions that leave the state unchanged (an n-puzzle move off the board) are
  excluded from the minimum.

  Examples:
    With V_target = 0 every non-goal state's target is its cheapest action cost:
    >>> from qstar_jax.envs import npuzzle
    >>> env = npuzzle(3)
    >>> s = env.step(jnp.asarray(env.goal), jnp.int32(1))[None]  # one move from the goal
    >>> value_iteration_targets(None, s, env=env, value_fn=lambda p, x: jnp.zeros(x.shape[0]))
    Array([1.], dtype=float32)

  References: Agostinelli et al., "Solving the Rubik's cube with deep reinforcement learning and
  search", Nature Machine Intelligence 2019 (DAVI, Algorithm 1).
  """
  b, d = states.shape
  children = env.next_states(states)  # [B, A, D]
  v = value_fn(target_params, children.reshape(-1, d)).reshape(b, env.num_actions)
  v = jnp.where(env.is_goal(children), 0.0, v)
  total = jnp.asarray(env.action_costs)[None, :] + v
  total = jnp.where(env.valid_action_mask(states), total, jnp.inf)
  y = jnp.where(env.is_goal(states), 0.0, jnp.min(total, axis=-1))
  return jax.lax.stop_gradient(y.astype(jnp.float32))


def q_learning_targets(target_params: Any, states: jax.Array, actions: jax.Array, *,
                       env: PuzzleEnv,
                       q_fn: Callable[[Any, jax.Array], jax.Array]) -> jax.Array:
  """Deep Q-learning targets ``y(s, a) = c(a) + 1[s' not goal] * min_a' q_target(s', a')`` with
  ``s' = next(s, a)``, for the given actions only.

  Args: ``states [B, D]``, ``actions [B, M]`` (M actions per state: all of them, or a sample
  when the action space is large: computing a target costs one ``q_target`` call on the child);
  ``q_fn(params, states [K, D]) -> [K, A]``. Returns ``[B, M]`` float32 without gradient.
  Actions that do not change the state are excluded from the inner minimum (they would let q
  bootstrap from itself).

  Examples:
    >>> from qstar_jax.envs import npuzzle
    >>> env = npuzzle(3)
    >>> goal = jnp.asarray(env.goal)[None]
    >>> zero_q = lambda p, x: jnp.zeros((x.shape[0], 4))
    >>> q_learning_targets(None, goal, jnp.array([[0, 3]]), env=env, q_fn=zero_q)
    Array([[1., 1.]], dtype=float32)

  References: Agostinelli et al., "A* search without expansions: learning heuristic functions
  with deep Q-networks" (Q* search), Section 4.
  """
  b, d = states.shape
  m = actions.shape[1]
  children = env.step(jnp.broadcast_to(states[:, None, :], (b, m, d)), actions)  # [B, M, D]
  flat = children.reshape(b * m, d)
  q = q_fn(target_params, flat)  # [B*M, A]
  q = jnp.where(env.valid_action_mask(flat), q, jnp.inf)
  best = jnp.min(q, axis=-1).reshape(b, m)
  best = jnp.where(env.is_goal(children), 0.0, best)
  y = jnp.asarray(env.action_costs)[actions] + best
  return jax.lax.stop_gradient(y.astype(jnp.float32))


def q_targets_from_value(value_params: Any, states: jax.Array, actions: jax.Array, *,
                         env: PuzzleEnv,
                         value_fn: Callable[[Any, jax.Array], jax.Array]) -> jax.Array:
  """Q targets bootstrapped from a (frozen) value network: ``y(s, a) = c(a) + 1[s' not goal] *
  V(s')``, ``s' = next(s, a)``.

  The Bellman identity ``q(s, a) = c(a) + V(s')`` with ``V(s') = min_a' q(s', a')``: with V from
  deep approximate value iteration this distils V into a per-action Q head without the downward
  bias of a minimum over many noisy Q outputs (a concern at 1,884 actions). For the cube the
  cost-to-go in quarter turns is the same with or without meta-actions, so one V serves both.
  Args as ``q_learning_targets``; ``value_fn(params, states [K, D]) -> [K]``. Returns ``[B, M]``.

  Examples:
    >>> from qstar_jax.envs import npuzzle
    >>> env = npuzzle(3)
    >>> goal = jnp.asarray(env.goal)[None]
    >>> q_targets_from_value(None, goal, jnp.array([[1, 3]]), env=env,
    ...                      value_fn=lambda p, x: env.manhattan(x))
    Array([[2., 2.]], dtype=float32)
  """
  b, d = states.shape
  m = actions.shape[1]
  children = env.step(jnp.broadcast_to(states[:, None, :], (b, m, d)), actions)
  v = value_fn(value_params, children.reshape(b * m, d)).reshape(b, m)
  v = jnp.where(env.is_goal(children), 0.0, v)
  return jax.lax.stop_gradient((jnp.asarray(env.action_costs)[actions] + v).astype(jnp.float32))


def squared_td_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Per-element ``(prediction - target)^2`` in float32 (the caller averages)."""
  return jnp.square(prediction.astype(jnp.float32) - jax.lax.stop_gradient(target))
