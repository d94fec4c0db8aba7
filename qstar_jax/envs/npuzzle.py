"""Sliding-tile n-puzzles (8, 15, 24) with the convention of DeepCubeA's ``puzzle15_test.npz``.

A state lists the tiles row-major, 0 is the blank; the goal is ``1..n, 0``. Actions ``U D L R``
name the direction in which the tile next to the blank moves (``D`` moves the tile above the
blank down, so the blank moves up). A move with no such tile leaves the state unchanged. Every
move costs 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.envs.puzzle import PuzzleEnv, permutation_parity

ACTION_NAMES = ("U", "D", "L", "R")
# Offset (row, col) from the blank to the tile that moves, per action: U moves the tile below
# the blank up, D the tile above down, L the tile right of the blank left, R the tile left right.
_TILE_OFFSET = {"U": (1, 0), "D": (-1, 0), "L": (0, 1), "R": (0, -1)}


@functools.cache
def _perm_table(width: int) -> np.ndarray:
  """[D, 4, D] int32: gather indices of each action for each blank position."""
  d = width * width
  table = np.tile(np.arange(d, dtype=np.int32), (d, 4, 1))
  for b in range(d):
    r, c = divmod(b, width)
    for a, name in enumerate(ACTION_NAMES):
      dr, dc = _TILE_OFFSET[name]
      rr, cc = r + dr, c + dc
      if 0 <= rr < width and 0 <= cc < width:
        t = rr * width + cc
        table[b, a, b], table[b, a, t] = t, b
  return table


@dataclasses.dataclass(frozen=True, eq=False)
class NPuzzle(PuzzleEnv):
  """The (width^2 - 1)-puzzle."""

  width: int = 4

  @classmethod
  def create(cls, width: int) -> NPuzzle:
    if width < 2:
      raise ValueError(f"n-puzzle width must be >= 2, got {width}")
    d = width * width
    goal = np.concatenate([np.arange(1, d), [0]]).astype(np.uint8)
    return cls(name=f"puzzle{d - 1}", goal=goal, action_costs=np.ones(4, np.float32),
               action_names=ACTION_NAMES, num_symbols=d, width=width)

  def blank(self, states: jax.Array) -> jax.Array:
    return jnp.argmax(states == 0, axis=-1)

  def action_perms(self, states: jax.Array) -> jax.Array:
    return jnp.asarray(_perm_table(self.width))[self.blank(states)]

  def action_perm(self, states: jax.Array, actions: jax.Array) -> jax.Array:
    return jnp.asarray(_perm_table(self.width))[self.blank(states), actions]

  def validate_states(self, states) -> np.ndarray:
    arr = self._check_shape(states)
    goal_pos = {int(v): i for i, v in enumerate(self.goal)}
    for n, s in enumerate(arr):
      # Each move swaps the blank with a neighbour: it flips the permutation parity and the
      # parity of the blank's Manhattan distance to its goal cell, so the two must agree.
      perm = [goal_pos[int(v)] for v in s]
      parity = permutation_parity(perm)
      b = int(np.argmax(s == 0))
      gb = goal_pos[0]
      dist = abs(b // self.width - gb // self.width) + abs(b % self.width - gb % self.width)
      if parity != dist % 2:
        raise ValueError(f"{self.name}: state {n} is unsolvable (permutation parity {parity} "
                         f"differs from the blank's distance parity {dist % 2}): {s.tolist()}")
    return arr

  def manhattan(self, states: jax.Array) -> jax.Array:
    """Sum of the tiles' Manhattan distances to their goal cells (admissible): [..., D] -> [...]."""
    d = self.state_dim
    goal_pos = np.zeros(d, np.int32)
    for i, v in enumerate(self.goal):
      goal_pos[v] = i
    pos = jnp.arange(d)
    gp = jnp.asarray(goal_pos)[states.astype(jnp.int32)]
    dist = (jnp.abs(pos // self.width - gp // self.width) + jnp.abs(pos % self.width - gp % self.width))
    return jnp.sum(jnp.where(states == 0, 0, dist), axis=-1).astype(jnp.float32)


@functools.cache
def npuzzle(width: int) -> NPuzzle:
  """The (cached, so jit-static-stable) n-puzzle of the given width (3: 8-puzzle, 4: 15, 5: 24)."""
  return NPuzzle.create(width)
