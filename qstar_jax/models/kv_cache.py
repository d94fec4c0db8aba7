"""Key/value cache of a Llama decoder, right-padded with per-row lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qstar_jax.models.config import LlamaConfig


@struct.dataclass
class KVCache:
  """Keys and values of every layer for a batch of sequences.

  Row b's tokens occupy positions [0, lengths[b]) (right-padded layout); entries at positions
  >= lengths[b] are stale and always masked out. A forward step with new tokens [B, T] writes
  them at positions lengths[b] .. lengths[b] + T - 1, so S_max must be >= max(lengths) + T.
  """

  keys: jax.Array     # [L, B, S_max, Hkv, hd] compute dtype
  values: jax.Array   # [L, B, S_max, Hkv, hd] compute dtype
  lengths: jax.Array  # [B] int32, number of valid positions of each row

  @property
  def max_len(self) -> int:
    return self.keys.shape[2]

  @property
  def batch_size(self) -> int:
    return self.keys.shape[1]

  @classmethod
  def init(cls, config: LlamaConfig, batch_size: int, max_len: int,
           dtype: str | jnp.dtype | None = None) -> KVCache:
    """An empty cache (all lengths 0) holding up to `max_len` positions per row."""
    if max_len < 1:
      raise ValueError(f"KVCache max_len={max_len}: expected >= 1")
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads,
             config.resolved_head_dim)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch_size,), jnp.int32))

  def take(self, rows: jax.Array) -> KVCache:
    """The cache of rows `rows` [B'] (gather along the batch axis)."""
    return KVCache(keys=jnp.take(self.keys, rows, axis=1),
                   values=jnp.take(self.values, rows, axis=1),
                   lengths=jnp.take(self.lengths, rows, axis=0))

  def repeat(self, num_copies: int) -> KVCache:
    """Each row repeated `num_copies` times: row b -> rows b*K .. b*K + K - 1."""
    return KVCache(keys=jnp.repeat(self.keys, num_copies, axis=1),
                   values=jnp.repeat(self.values, num_copies, axis=1),
                   lengths=jnp.repeat(self.lengths, num_copies, axis=0))

  def grow(self, max_len: int) -> KVCache:
    """The same cache with room for `max_len` positions (zero-padded at the end)."""
    extra = max_len - self.max_len
    if extra < 0:
      raise ValueError(f"KVCache.grow({max_len}): cache already holds {self.max_len} positions")
    if extra == 0:
      return self
    pad = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
    return KVCache(keys=jnp.pad(self.keys, pad), values=jnp.pad(self.values, pad),
                   lengths=self.lengths)
