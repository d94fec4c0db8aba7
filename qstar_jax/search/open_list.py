"""Static-capacity search tables: node store, closed set, open list.

Used by the puzzle searches (A*, Q*) and usable by any best-first search over fixed-width
states: the tables know nothing of an environment. A state is a row of ``D`` integers (a puzzle
state, or any fixed-width key of an LM reasoning node) and the caller passes two 32-bit hashes of
each state alongside it.

All functions act on ONE problem (no batch axis); the searches ``vmap`` them over problems.

- Node store: ``node_states [C, D]``, best-known cost ``node_g [C]``, parent pointer
  ``node_parent [C]`` (node index, -1 at the root) and the action that led here
  ``node_action [C]``; nodes are appended.
- Closed set: an open-addressing hash table ``table [T]`` (T a power of two, >= 2C) mapping a
  state to its node index, linear probing from ``hash_0(state) mod T``; a probe compares the full
  state, so hash collisions never merge distinct states. Duplicates: the lower g wins (the node
  keeps its index and takes the better g, parent and action).
- Open list: fixed-size arrays of entries ``(priority, g, node, action)`` (``action = -1`` for A*'s
  node entries, Q*'s edge rank); an empty slot has priority +inf; popped slots are recycled
  through a free stack. "Pop N" is ``lax.top_k(-priority, N)``; an entry is stale (skipped)
  when its g is above the node's current g (a better path was found after it was pushed).
Every entry that does not fit is counted (``overflow_nodes``, ``overflow_open``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SearchTables:
  node_states: jax.Array  # [C, D] state_dtype (uint8 for the puzzles)
  node_g: jax.Array  # [C] float32
  node_parent: jax.Array  # [C] int32
  node_action: jax.Array  # [C] int32
  num_nodes: jax.Array  # [] int32
  table: jax.Array  # [T] int32, node index or -1
  open_priority: jax.Array  # [O] float32, +inf = empty
  open_g: jax.Array  # [O] float32
  open_node: jax.Array  # [O] int32
  open_action: jax.Array  # [O] int32
  open_free: jax.Array  # [O] int32, stack of freed slots (first open_free_count are valid)
  open_free_count: jax.Array  # [] int32
  open_high: jax.Array  # [] int32, slots >= open_high have never been used
  overflow_nodes: jax.Array  # [] int32
  overflow_open: jax.Array  # [] int32


def check_capacities(*, node_capacity: int, open_capacity: int, table_capacity: int,
                     batch_pops: int, pushes_per_iteration: int) -> None:
  """Host-side checks of the static sizes (raise ``ValueError``)."""
  for name, v in (("node_capacity", node_capacity), ("open_capacity", open_capacity),
                  ("table_capacity", table_capacity), ("batch_pops", batch_pops)):
    if not isinstance(v, int) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  if table_capacity & (table_capacity - 1):
    raise ValueError(f"table_capacity must be a power of two, got {table_capacity}")
  if table_capacity < 2 * node_capacity:
    raise ValueError(f"table_capacity ({table_capacity}) must be >= 2 * node_capacity "
                     f"({2 * node_capacity}) to keep linear probing short")
  if open_capacity < pushes_per_iteration:
    raise ValueError(f"open_capacity ({open_capacity}) is smaller than the pushes of one "
                     f"iteration ({pushes_per_iteration}); raise it")
  if batch_pops > open_capacity:
    raise ValueError(f"batch_pops ({batch_pops}) exceeds open_capacity ({open_capacity})")


def default_table_capacity(node_capacity: int) -> int:
  """Smallest power of two >= 2 * node_capacity."""
  t = 1
  while t < 2 * node_capacity:
    t *= 2
  return t


def init_tables(state_dim: int, *, node_capacity: int, open_capacity: int, table_capacity: int,
                state_dtype: jnp.dtype = jnp.uint8) -> SearchTables:
  """Empty tables for states of ``state_dim`` integers of ``state_dtype``."""
  i32 = jnp.int32
  return SearchTables(
      node_states=jnp.zeros((node_capacity, state_dim), state_dtype),
      node_g=jnp.full((node_capacity,), jnp.inf, jnp.float32),
      node_parent=jnp.full((node_capacity,), -1, i32),
      node_action=jnp.full((node_capacity,), -1, i32),
      num_nodes=jnp.zeros((), i32),
      table=jnp.full((table_capacity,), -1, i32),
      open_priority=jnp.full((open_capacity,), jnp.inf, jnp.float32),
      open_g=jnp.zeros((open_capacity,), jnp.float32),
      open_node=jnp.zeros((open_capacity,), i32),
      open_action=jnp.full((open_capacity,), -1, i32),
      open_free=jnp.zeros((open_capacity,), i32),
      open_free_count=jnp.zeros((), i32),
      open_high=jnp.zeros((), i32),
      overflow_nodes=jnp.zeros((), i32),
      overflow_open=jnp.zeros((), i32),
  )


def _dedup_mask(hashes: jax.Array, g: jax.Array, valid: jax.Array) -> jax.Array:
  """[K] bool: the lowest-g representative of each distinct (hash_0, hash_1) among valid rows.

  Within one insertion batch duplicates are found by their 64-bit hash pair (a collision among
  the K rows of one batch has probability ~K^2 / 2^65); against the stored nodes the full state
  is compared.
  """
  k = g.shape[0]
  order = jnp.lexsort((jnp.where(valid, g, jnp.inf), hashes[:, 1], hashes[:, 0], ~valid))
  h0, h1, v = hashes[order, 0], hashes[order, 1], valid[order]
  new_key = jnp.concatenate([jnp.array([True]), (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])])
  first = v & new_key
  return jnp.zeros((k,), bool).at[order].set(first)


def insert_nodes(tables: SearchTables, states: jax.Array, hashes: jax.Array, g: jax.Array,
                 parent: jax.Array, action: jax.Array,
                 valid: jax.Array) -> tuple[SearchTables, jax.Array, jax.Array]:
  """Adds K candidate nodes to the closed set; duplicates keep the best g.

  Args: ``states [K, D]``, ``hashes [K, 2]`` uint32 (two independent hashes of each state:
  ``hashes[:, 0]`` picks the first probed slot, the pair finds duplicates within the batch),
  ``g [K]``, ``parent [K]``, ``action [K]``, ``valid [K]``.
  Returns ``(tables, node_index [K] (-1 if dropped or a beaten duplicate), improved [K])``;
  ``improved`` is true for a new state or a strictly better g for a known one — those nodes'
  children must be (re)generated.
  """
  k = states.shape[0]
  capacity = tables.node_states.shape[0]
  t = tables.table.shape[0]
  pending = _dedup_mask(hashes, g, valid)
  pos = (hashes[:, 0] & jnp.uint32(t - 1)).astype(jnp.int32)
  ids = jnp.arange(k, dtype=jnp.int32)

  def cond(carry):
    _, _, pending, _, _, rounds = carry
    return jnp.any(pending) & (rounds < t)

  def body(carry):
    tb, pos, pending, node_index, improved, rounds = carry
    slot = tb.table[pos]
    empty = slot < 0
    safe = jnp.maximum(slot, 0)
    same = ~empty & jnp.all(tb.node_states[safe] == states, axis=-1)
    found = pending & same
    better = found & (g < tb.node_g[safe])
    tgt = jnp.where(better, safe, capacity)
    tb = tb.replace(
        node_g=tb.node_g.at[tgt].set(g, mode="drop"),
        node_parent=tb.node_parent.at[tgt].set(parent, mode="drop"),
        node_action=tb.node_action.at[tgt].set(action, mode="drop"))
    node_index = jnp.where(better, safe, node_index)
    improved = improved | better
    pending = pending & ~found
    # Claim empty slots: the lowest row id proposing a slot wins it this round.
    # (Sorting the K proposals keeps this O(K log K), independent of the table size.)
    want = pending & empty
    proposal = jnp.where(want, pos, t)
    order = jnp.lexsort((ids, proposal))
    sorted_pos = proposal[order]
    first = jnp.concatenate([jnp.array([True]), sorted_pos[1:] != sorted_pos[:-1]])
    won = jnp.zeros((k,), bool).at[order].set(first & (sorted_pos < t))
    new_index = tb.num_nodes + jnp.cumsum(won.astype(jnp.int32)) - 1
    fits = won & (new_index < capacity)
    dst = jnp.where(fits, new_index, capacity)
    tb = tb.replace(
        table=tb.table.at[jnp.where(fits, pos, t)].set(new_index, mode="drop"),
        node_states=tb.node_states.at[dst].set(states, mode="drop"),
        node_g=tb.node_g.at[dst].set(g, mode="drop"),
        node_parent=tb.node_parent.at[dst].set(parent, mode="drop"),
        node_action=tb.node_action.at[dst].set(action, mode="drop"),
        num_nodes=tb.num_nodes + jnp.sum(fits, dtype=jnp.int32),
        overflow_nodes=tb.overflow_nodes + jnp.sum(won & ~fits, dtype=jnp.int32))
    node_index = jnp.where(fits, new_index, node_index)
    improved = improved | fits
    pending = pending & ~won
    # Slots holding another state: probe the next one. Losers of a claim retry the same slot,
    # which now holds the winner's state.
    pos = jnp.where(pending & ~empty, (pos + 1) & (t - 1), pos)
    return tb, pos, pending, node_index, improved, rounds + 1

  init = (tables, pos, pending, jnp.full((k,), -1, jnp.int32), jnp.zeros((k,), bool),
          jnp.zeros((), jnp.int32))
  tables, _, pending, node_index, improved, _ = jax.lax.while_loop(cond, body, init)
  # Unreachable while table_capacity >= 2 * node_capacity; counted rather than silent.
  tables = tables.replace(overflow_nodes=tables.overflow_nodes + jnp.sum(pending, dtype=jnp.int32))
  return tables, node_index, improved


def push(tables: SearchTables, priority: jax.Array, g: jax.Array, node: jax.Array,
         action: jax.Array, mask: jax.Array) -> SearchTables:
  """Writes the masked entries (all [K]) into free open-list slots; the rest are counted.

  Free slots come from the stack of popped slots, then from the never-used tail: O(K), no scan
  of the open list.
  """
  o = tables.open_priority.shape[0]
  m = mask.astype(jnp.int32)
  rank = jnp.cumsum(m) - 1
  n = jnp.sum(m)
  free = tables.open_free_count
  from_stack = rank < free
  stack_slot = tables.open_free[jnp.clip(free - 1 - rank, 0, o - 1)]
  tail_slot = tables.open_high + rank - free
  slot = jnp.where(from_stack, stack_slot, tail_slot)
  fits = mask & (slot < o)
  dst = jnp.where(fits, slot, o)
  used_tail = jnp.maximum(n - free, 0)
  return tables.replace(
      open_priority=tables.open_priority.at[dst].set(priority.astype(jnp.float32), mode="drop"),
      open_g=tables.open_g.at[dst].set(g, mode="drop"),
      open_node=tables.open_node.at[dst].set(node, mode="drop"),
      open_action=tables.open_action.at[dst].set(action, mode="drop"),
      open_free_count=jnp.maximum(free - n, 0),
      open_high=jnp.minimum(tables.open_high + used_tail, o),
      overflow_open=tables.overflow_open + jnp.sum(mask & ~fits, dtype=jnp.int32))


def pop(tables: SearchTables, num: int, active: jax.Array | bool = True):
  """Removes the ``num`` lowest-priority entries (nothing when ``active`` is false).

  Returns ``(tables, priority [num], g [num], node [num], action [num], valid [num])`` where
  ``valid`` is false for empty slots and stale entries (and everywhere when not active).
  """
  o = tables.open_priority.shape[0]
  neg, idx = jax.lax.top_k(-tables.open_priority, num)
  priority = -neg
  node = tables.open_node[idx]
  g = tables.open_g[idx]
  action = tables.open_action[idx]
  occupied = jnp.isfinite(priority) & active
  valid = occupied & (g <= tables.node_g[node])
  removed = jnp.where(occupied, idx, o)
  # Freed slots go on the free stack for later pushes.
  rank = jnp.cumsum(occupied.astype(jnp.int32)) - 1
  stack_pos = jnp.where(occupied, tables.open_free_count + rank, o)
  tables = tables.replace(
      open_priority=tables.open_priority.at[removed].set(jnp.inf, mode="drop"),
      open_free=tables.open_free.at[stack_pos].set(idx, mode="drop"),
      open_free_count=tables.open_free_count + jnp.sum(occupied, dtype=jnp.int32))
  return tables, priority, g, node, action, valid


def min_priority(tables: SearchTables) -> jax.Array:
  """The lowest priority on the open list (+inf when empty): the search's lower bound."""
  return jnp.min(tables.open_priority)


def reconstruct_path(tables: SearchTables, goal_node: jax.Array,
                     max_path_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Follows parent pointers from ``goal_node`` to the root.

  Returns ``(path [max_path_len] int32 -1 padded, length [], truncated [] bool)``; the path is
  empty when ``goal_node < 0``.
  """
  capacity = tables.node_states.shape[0]
  rev = jnp.full((max_path_len,), -1, jnp.int32)

  def cond(c):
    node, length, _ = c
    return (node >= 0) & (tables.node_parent[jnp.maximum(node, 0)] >= 0) & (length < capacity)

  def body(c):
    node, length, rev = c
    rev = rev.at[length].set(tables.node_action[node], mode="drop")
    return tables.node_parent[node], length + 1, rev

  _, length, rev = jax.lax.while_loop(cond, body, (goal_node, jnp.zeros((), jnp.int32), rev))
  i = jnp.arange(max_path_len)
  stored = jnp.minimum(length, max_path_len)
  path = jnp.where(i < stored, rev[jnp.clip(stored - 1 - i, 0, max_path_len - 1)], -1)
  return path, length, length > max_path_len
