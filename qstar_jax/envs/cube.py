"""Rubik's cube (3x3x3) with the sticker convention of DeepCubeA's ``cube3_test.npz``.

A state is 54 sticker ids; the solved cube has id ``i`` at position ``i`` and the colour of a
sticker is ``id // 9`` (faces U, D, L, R, B, F). The 12 quarter turns are the permutations
``move_perm`` of the test set: ``next_state = state[move_perm[a]]``.

``Cube3(meta_actions=True)`` is the 1,884-action space of the Q* paper: the 12 quarter turns, then
all 144 two-move and all 1,728 three-move sequences (lexicographic order of the base move ids),
each a composed permutation whose cost is its number of quarter turns.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.envs.data import load_deepcubea
from qstar_jax.envs.puzzle import PuzzleEnv, permutation_parity

# Base moves in the order of cube3_test.npz: (face, direction).
BASE_MOVE_NAMES = ("U-1", "U1", "D-1", "D1", "L-1", "L1", "R-1", "R1", "B-1", "B1", "F-1", "F1")


def _base_move_perms() -> np.ndarray:
  """[12, 54] int32: the quarter turns of cube3_test.npz."""
  return load_deepcubea("cube3")["move_perm"].astype(np.int32)


def _compose(perms: list[np.ndarray]) -> np.ndarray:
  """Permutation of applying ``perms[0]`` then ``perms[1]`` ...: ``s[p0][p1] = s[p0[p1]]``."""
  out = np.arange(perms[0].shape[0])
  for p in perms:
    out = out[p]
  return out


@functools.cache
def _action_table(meta_actions: bool) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, ...], ...]]:
  base = _base_move_perms()
  seqs: list[tuple[int, ...]] = [(a,) for a in range(12)]
  if meta_actions:
    seqs += list(itertools.product(range(12), repeat=2))
    seqs += list(itertools.product(range(12), repeat=3))
  perms = np.stack([_compose([base[a] for a in seq]) for seq in seqs]).astype(np.int32)
  costs = np.array([len(s) for s in seqs], np.float32)
  return perms, costs, tuple(seqs)


@functools.cache
def _cubies() -> dict:
  """Cubie structure derived from the move permutations.

  A sticker position's *signature* is the set of faces whose quarter turn moves it: 3 faces for a
  corner sticker, 2 for an edge sticker, none for a centre; stickers of one cubie share it.
  Orientation references: the sticker on U/D (corners and 8 edges), else on F/B (middle edges).
  The cyclic order of each corner's three positions is chosen so that corner twist is invariant
  under every quarter turn (checked on random states when this table is built).
  """
  base = _base_move_perms()
  moved = base != np.arange(54)[None]  # [12, 54]
  sig = [frozenset(int(m) // 2 for m in range(12) if moved[m, i]) for i in range(54)]
  groups: dict[frozenset, list[int]] = {}
  for i, s in enumerate(sig):
    groups.setdefault(s, []).append(i)
  centres = sorted(i for i, s in enumerate(sig) if not s)
  face_of = lambda i: i // 9  # noqa: E731  (0 U, 1 D, 2 L, 3 R, 4 B, 5 F)

  def primary_first(pos: list[int]) -> list[int]:
    prio = lambda i: (0 if face_of(i) in (0, 1) else 1 if face_of(i) in (4, 5) else 2)  # noqa: E731
    return sorted(pos, key=prio)

  corners = [primary_first(v) for k, v in sorted(groups.items(), key=lambda kv: min(kv[1]))
             if len(k) == 3]
  edges = [primary_first(v) for k, v in sorted(groups.items(), key=lambda kv: min(kv[1]))
           if len(k) == 2]
  assert len(corners) == 8 and len(edges) == 12 and len(centres) == 6
  assert all(len(c) == 3 for c in corners) and all(len(e) == 2 for e in edges)

  # Pick each corner's cyclic order (p0, p1, p2) vs (p0, p2, p1) so that the twist sum is a
  # move invariant; brute force over 2^8 choices, checked on random scrambles.
  rng = np.random.default_rng(0)
  states = []
  for _ in range(40):
    s = np.arange(54)
    for m in rng.integers(0, 12, 30):
      s = s[base[m]]
    states.append(s)
  for flips in itertools.product((False, True), repeat=8):
    cand = [[c[0], c[2], c[1]] if f else list(c) for c, f in zip(corners, flips, strict=True)]
    ok = True
    for s in states:
      twist, refl = _corner_twist(s, cand)
      if refl or twist % 3:
        ok = False
        break
    if ok:
      corners = cand
      break
  else:  # pragma: no cover - would mean move_perm is not a Rubik's cube
    raise RuntimeError("could not derive corner orientations from move_perm")
  return {"corners": corners, "edges": edges, "centres": centres}


def _corner_twist(state: np.ndarray, corners: list[list[int]]) -> tuple[int, bool]:
  """(sum of corner twists, whether some corner's stickers are mirrored)."""
  home = {frozenset(c): c for c in corners}
  total, mirrored = 0, False
  for pos in corners:
    ids = [int(state[p]) for p in pos]
    cubie = home.get(frozenset(ids))
    if cubie is None:
      return 0, True
    k = ids.index(cubie[0])
    total += k
    rotated = [ids[(k + j) % 3] for j in range(3)]
    if rotated != cubie:
      mirrored = True
  return total, mirrored


@dataclasses.dataclass(frozen=True, eq=False)
class Cube3(PuzzleEnv):
  """Rubik's cube; 12 quarter turns, or 1,884 actions with ``meta_actions=True``."""

  perms: np.ndarray = None  # [A, 54] int32
  sequences: tuple = ()  # per action, its base move ids

  @classmethod
  def create(cls, meta_actions: bool = False) -> Cube3:
    perms, costs, seqs = _action_table(meta_actions)
    names = tuple(" ".join(BASE_MOVE_NAMES[m] for m in s) for s in seqs)
    return cls(name="cube3_1884" if meta_actions else "cube3", goal=np.arange(54, dtype=np.uint8),
               action_costs=costs, action_names=names, num_symbols=54, perms=perms,
               sequences=seqs)

  @property
  def meta_actions(self) -> bool:
    return self.num_actions > 12

  @property
  def num_encoded_symbols(self) -> int:
    return 6  # colours

  @property
  def num_scramble_moves(self) -> int:
    return 12

  def symbols(self, states: jax.Array) -> jax.Array:
    return states // 9

  def action_perms(self, states: jax.Array) -> jax.Array:
    perms = jnp.asarray(self.perms)
    return jnp.broadcast_to(perms, (*states.shape[:-1], *perms.shape))

  def action_perm(self, states: jax.Array, actions: jax.Array) -> jax.Array:
    return jnp.asarray(self.perms)[actions]

  def next_states(self, states: jax.Array) -> jax.Array:
    # A plain gather with the static [A, 54] table (no per-state permutation needed).
    return states[..., jnp.asarray(self.perms)]

  def valid_action_mask(self, states: jax.Array) -> jax.Array:
    mask = jnp.asarray(np.any(self.perms != np.arange(54)[None], axis=-1))
    return jnp.broadcast_to(mask, (*states.shape[:-1], self.num_actions))

  def base_moves(self, action: int) -> list[int]:
    return list(self.sequences[int(action)])

  def validate_states(self, states) -> np.ndarray:
    arr = self._check_shape(states)
    info = _cubies()
    for n, s in enumerate(arr):
      s = s.astype(np.int64)
      for c in info["centres"]:
        if s[c] != c:
          raise ValueError(f"cube3: state {n} has sticker {s[c]} at centre position {c}; centres"
                           " never move (expected id {c})")
      corner_ids, edge_ids = [], []
      twist, mirrored = _corner_twist(s, info["corners"])
      if mirrored:
        raise ValueError(f"cube3: state {n} is not a physical cube (a corner position holds "
                         "stickers of different cubies, or a corner's stickers are mirrored)")
      corner_home = {frozenset(c): i for i, c in enumerate(info["corners"])}
      for pos in info["corners"]:
        corner_ids.append(corner_home[frozenset(int(s[p]) for p in pos)])
      edge_home = {frozenset(e): i for i, e in enumerate(info["edges"])}
      flips = 0
      for pos in info["edges"]:
        key = frozenset(int(s[p]) for p in pos)
        if key not in edge_home:
          raise ValueError(f"cube3: state {n} is not a physical cube (edge position {pos} holds "
                           f"stickers {sorted(key)} of different cubies)")
        cubie = info["edges"][edge_home[key]]
        edge_ids.append(edge_home[key])
        flips += int(s[pos[0]] != cubie[0])
      if twist % 3:
        raise ValueError(f"cube3: state {n} is unsolvable: corner twist sum {twist} is not 0 mod 3")
      if flips % 2:
        raise ValueError(f"cube3: state {n} is unsolvable: edge flip sum {flips} is odd")
      if permutation_parity(corner_ids) != permutation_parity(edge_ids):
        raise ValueError(f"cube3: state {n} is unsolvable: corner and edge permutation parities "
                         "differ")
    return arr


@functools.cache
def cube3(meta_actions: bool = False) -> Cube3:
  """The (cached, so jit-static-stable) cube environment."""
  return Cube3.create(meta_actions)
