"""The result of a batched puzzle search (A* or Q*)."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class SearchResult:
  """Per-problem outcome of ``astar_search`` / ``qstar_search`` (B problems).

  ``path`` holds the environment's action ids (meta-actions not expanded), -1 padded;
  ``path_cost`` is the sum of the path's action costs. Counters: ``nodes_generated`` counts the
  children produced by transitions (before duplicate detection), ``nodes_expanded`` the popped
  open-list entries that were not stale (nodes for A*, edges for Q*), ``network_calls`` the
  batched heuristic / Q evaluations (one per iteration plus one for the start).
  ``overflow_nodes`` counts children dropped because the node store was full (the search then
  stops), ``overflow_open`` open-list entries dropped because the open list was full, and
  ``path_truncated`` a solution longer than ``max_path_len``. Nothing is dropped silently.
  """

  found: jax.Array  # [B] bool
  path: jax.Array  # [B, max_path_len] int32, -1 padded
  path_length: jax.Array  # [B] int32, number of actions
  path_cost: jax.Array  # [B] float32 (inf where not found)
  nodes_generated: jax.Array  # [B] int32
  nodes_expanded: jax.Array  # [B] int32
  iterations: jax.Array  # [B] int32
  network_calls: jax.Array  # [B] int32
  num_nodes: jax.Array  # [B] int32, distinct states stored
  overflow_nodes: jax.Array  # [B] int32
  overflow_open: jax.Array  # [B] int32
  path_truncated: jax.Array  # [B] bool

  @property
  def overflow(self) -> jax.Array:
    """[B] bool: anything dropped for lack of capacity."""
    return (self.overflow_nodes > 0) | (self.overflow_open > 0) | self.path_truncated
