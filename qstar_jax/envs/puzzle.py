"""The common interface of the permutation puzzles (Rubik's cube, n-puzzle).

A puzzle state is a vector of ``state_dim`` small integers (``uint8``). Every action is a
permutation of the state's positions, possibly depending on the state (the n-puzzle's moves
depend on where the blank is): ``next_state = state[perm(state, action)]``. All methods are pure,
batched over any leading axes, and jittable; an environment object is hashable by identity so it
can be a static argument of ``jax.jit``.

Host-side validation (``validate_states``, ``validate_actions``) raises ``ValueError`` before
anything is traced.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Odd 32-bit multipliers for the two state hashes (fixed so hashes are reproducible).
_HASH_SEEDS = (0x9E3779B1, 0x85EBCA77)


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer (avalanche mixing), on uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True, eq=False)
class PuzzleEnv(abc.ABC):
  """Base class: a deterministic puzzle with positive action costs and one goal state.

  Subclasses set ``name``, ``goal`` [D], ``num_symbols`` (values 0..num_symbols-1 appear in a
  state; the network input is their one-hot code) and implement ``_perms(states)``.
  """

  name: str
  goal: np.ndarray  # [D] uint8
  action_costs: np.ndarray  # [A] float32, the quarter turns / tile moves each action makes
  action_names: tuple[str, ...]
  num_symbols: int

  # ---- sizes ----------------------------------------------------------------------------
  @property
  def state_dim(self) -> int:
    return int(self.goal.shape[0])

  @property
  def num_actions(self) -> int:
    return int(self.action_costs.shape[0])

  @property
  def input_dim(self) -> int:
    """Length of ``encode``'s output vector."""
    return self.state_dim * self.num_encoded_symbols

  @property
  def num_encoded_symbols(self) -> int:
    return self.num_symbols

  # ---- transitions ------------------------------------------------------------------------
  @abc.abstractmethod
  def action_perms(self, states: jax.Array) -> jax.Array:
    """Gather indices of every action: [..., D] -> [..., A, D] int32."""

  @abc.abstractmethod
  def action_perm(self, states: jax.Array, actions: jax.Array) -> jax.Array:
    """Gather indices of the chosen actions: [..., D], [...] -> [..., D] int32."""

  def next_states(self, states: jax.Array) -> jax.Array:
    """All children: [..., D] -> [..., A, D]; ``children[..., a, i] = state[perm_a[i]]``."""
    perms = self.action_perms(states)
    return jnp.take_along_axis(states[..., None, :], perms, axis=-1)

  def step(self, states: jax.Array, actions: jax.Array) -> jax.Array:
    """Children for chosen actions: [..., D], [...] int -> [..., D]."""
    perm = self.action_perm(states, actions)
    return jnp.take_along_axis(states, perm, axis=-1)

  def valid_action_mask(self, states: jax.Array) -> jax.Array:
    """[..., D] -> [..., A] bool: actions that change the state (the n-puzzle's moves off the
    board and the cube's meta-actions that compose to the identity do not)."""
    perms = self.action_perms(states)
    return jnp.any(perms != jnp.arange(self.state_dim), axis=-1)

  def costs(self, actions: jax.Array) -> jax.Array:
    """Transition costs c(a) of action ids: [...] -> [...] float32."""
    return jnp.asarray(self.action_costs)[actions]

  def is_goal(self, states: jax.Array) -> jax.Array:
    """[..., D] -> [...] bool."""
    return jnp.all(states == jnp.asarray(self.goal, states.dtype), axis=-1)

  # ---- network input and hashing ----------------------------------------------------------
  def symbols(self, states: jax.Array) -> jax.Array:
    """The per-position symbol the network sees (the cube maps sticker id -> colour)."""
    return states

  def encode(self, states: jax.Array) -> jax.Array:
    """One-hot network input: [..., D] -> [..., D * num_encoded_symbols] float32."""
    onehot = jax.nn.one_hot(self.symbols(states), self.num_encoded_symbols, dtype=jnp.float32)
    return onehot.reshape(*states.shape[:-1], self.input_dim)

  def hash(self, states: jax.Array) -> jax.Array:
    """Two independent 32-bit hashes of each state: [..., D] -> [..., 2] uint32.

    ``h_k = fmix32(sum_i (s_i + 1) * r_k^(i+1) mod 2^32)`` with fixed odd multipliers ``r_k``.
    """
    d = self.state_dim
    out = []
    for seed in _HASH_SEEDS:
      # r^(i+1) mod 2^32 for i < d, computed on the host once.
      mult = np.ones(d, np.uint64)
      acc = np.uint64(1)
      for i in range(d):
        acc = (acc * np.uint64(seed)) % np.uint64(2**32)
        mult[i] = acc
      mult32 = jnp.asarray(mult.astype(np.uint32))
      h = jnp.sum((states.astype(jnp.uint32) + jnp.uint32(1)) * mult32, axis=-1, dtype=jnp.uint32)
      out.append(_fmix32(h))
    return jnp.stack(out, axis=-1)

  # ---- scrambles --------------------------------------------------------------------------
  @property
  def num_scramble_moves(self) -> int:
    """Scrambles use the first ``num_scramble_moves`` actions (the base moves)."""
    return self.num_actions

  def scramble(self, rng_key: jax.Array, *, num_states: int, max_depth: int,
               min_depth: int = 1) -> tuple[jax.Array, jax.Array]:
    """Random backward scrambles of the goal.

    Each state is the goal after ``depth ~ Uniform{min_depth..max_depth}`` uniformly random
    base moves (all moves are invertible, so a random walk from the goal is a backward
    scramble). Returns ``(states [num_states, D] uint8, depths [num_states] int32)``.
    ``num_states`` and ``max_depth`` must be static under jit.
    """
    if max_depth < min_depth or min_depth < 0:
      raise ValueError(f"scramble depths must satisfy 0 <= min_depth <= max_depth, got "
                       f"min_depth={min_depth}, max_depth={max_depth}")
    key_depth, key_moves = jax.random.split(rng_key)
    depths = jax.random.randint(key_depth, (num_states,), min_depth, max_depth + 1)
    moves = jax.random.randint(key_moves, (max(max_depth, 1), num_states), 0,
                               self.num_scramble_moves)
    states = jnp.broadcast_to(jnp.asarray(self.goal), (num_states, self.state_dim))

    def body(i, s):
      nxt = self.step(s, moves[i])
      return jnp.where((i < depths)[:, None], nxt, s)

    states = jax.lax.fori_loop(0, max_depth, body, states)
    return states, depths.astype(jnp.int32)

  # ---- host-side helpers ------------------------------------------------------------------
  def validate_actions(self, actions) -> np.ndarray:
    """Checks action ids are in ``0..num_actions-1`` (or -1 padding); returns int array."""
    arr = np.asarray(actions)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{self.name}: action ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < -1) | (arr >= self.num_actions)
    if np.any(bad):
      raise ValueError(f"{self.name}: unknown action id {int(arr[bad][0])}; expected 0.."
                       f"{self.num_actions - 1} (or -1 as padding)")
    return arr

  @abc.abstractmethod
  def validate_states(self, states) -> np.ndarray:
    """Raises ``ValueError`` for states that are not reachable from the goal; returns
    ``uint8 [N, D]`` (a single state is promoted to a batch of one)."""

  def base_moves(self, action: int) -> list[int]:
    """The base (quarter-turn / tile) moves an action consists of."""
    return [int(action)]

  def expand_path(self, actions) -> list[int]:
    """Action ids (-1 padding ignored) -> base move ids."""
    out: list[int] = []
    for a in self.validate_actions(actions).reshape(-1):
      if a >= 0:
        out.extend(self.base_moves(int(a)))
    return out

  def apply_actions(self, states: jax.Array, actions: jax.Array) -> jax.Array:
    """Applies action sequences: [..., D], [..., L] int (-1 = no-op padding) -> [..., D]."""

    def body(s, a):
      nxt = self.step(s, jnp.maximum(a, 0))
      return jnp.where((a >= 0)[..., None], nxt, s), None

    out, _ = jax.lax.scan(body, states, jnp.moveaxis(actions, -1, 0))
    return out

  def replay(self, states, actions) -> np.ndarray:
    """Host helper: validated ``apply_actions`` on numpy inputs (one state or a batch)."""
    acts = self.validate_actions(actions)
    s = np.asarray(states, np.uint8)
    if acts.shape[-1] == 0:
      return s
    return np.asarray(self.apply_actions(jnp.asarray(s), jnp.asarray(acts, jnp.int32)))

  def path_cost(self, actions) -> float:
    acts = self.validate_actions(actions).reshape(-1)
    return float(sum(self.action_costs[a] for a in acts if a >= 0))

  def _check_shape(self, states) -> np.ndarray:
    arr = np.asarray(states)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != self.state_dim:
      raise ValueError(f"{self.name}: states must have shape [N, {self.state_dim}] or "
                       f"[{self.state_dim}], got {np.asarray(states).shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{self.name}: states must be integers, got dtype {arr.dtype}")
    sorted_rows = np.sort(arr.astype(np.int64), axis=1)
    expect = np.arange(self.state_dim)
    bad = np.nonzero(np.any(sorted_rows != expect, axis=1))[0]
    if bad.size:
      raise ValueError(f"{self.name}: state {int(bad[0])} is not a permutation of "
                       f"0..{self.state_dim - 1}: {arr[bad[0]].tolist()}")
    return arr.astype(np.uint8)


def permutation_parity(perm: list[int]) -> int:
  """0 for an even permutation of 0..n-1, 1 for an odd one (from its cycle lengths)."""
  seen, parity = [False] * len(perm), 0
  for i in range(len(perm)):
    if not seen[i]:
      j, length = i, 0
      while not seen[j]:
        seen[j] = True
        j = perm[j]
        length += 1
      parity ^= (length - 1) & 1
  return parity
