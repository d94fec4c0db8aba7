"""Batching and packing: deterministic, seeded, resumable from any step; grain or plain Python.

The order of examples is fixed by :func:`batch_indices` alone (a seeded permutation per epoch,
``numpy.random.Generator(PCG64([seed, epoch]))``), so that

- batch ``s`` is a pure function of ``(seed, s)``: a run resumed at step ``s`` sees exactly the
  batches an uninterrupted run sees from ``s`` on, with no iterator state to save;
- the grain pipeline (``grain.MapDataset`` over step indices, mapped to batches, read with
  prefetch threads) and the plain-Python fallback (used when grain is not installed) give the
  same batches, element for element.

Packing turns a token stream into fixed ``[N, T + 1]`` windows for next-token prediction
(``inputs = w[:, :-1]``, ``targets = w[:, 1:]``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from qstar_jax.data import text as text_lib
from qstar_jax.data.gsm8k import load_gsm8k

__all__ = [
  "RandomAccessSource",
  "grain_available",
  "tfds_available",
  "epoch_permutation",
  "batch_indices",
  "batch_at",
  "iterate_batches",
  "shard_rows",
  "process_rows",
  "pack_tokens",
  "pack_documents",
  "read_tiny_shakespeare_splits",
  "read_gsm8k_split",
]


class RandomAccessSource(Protocol):
  """``len(source)`` and ``source[i]`` (a numpy array or a dict of arrays)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Any: ...


def grain_available() -> bool:
  try:
    import grain  # noqa: F401
  except ImportError:
    return False
  return True


def tfds_available() -> bool:
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=8)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a permutation of ``range(num_examples)``."""
  rng = np.random.Generator(np.random.PCG64([int(seed), int(epoch)]))
  perm = rng.permutation(num_examples)
  perm.setflags(write=False)
  return perm


def batch_indices(
  step: int, *, batch_size: int, num_examples: int, seed: int, shuffle: bool = True
) -> np.ndarray:
  """Example indices ``[batch_size]`` of batch ``step``.

  The stream of examples is epoch 0's permutation, then epoch 1's, ...; batch ``s`` holds
  stream positions ``s * B .. s * B + B - 1`` (a batch may span two epochs).
  """
  if num_examples <= 0:
    raise ValueError(f"num_examples={num_examples}: the data source is empty")
  pos = int(step) * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, within = np.divmod(pos, num_examples)
  if not shuffle:
    return within
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_permutation(num_examples, seed, int(e))[within[sel]]
  return out


def _stack(items: Sequence[Any]) -> Any:
  if isinstance(items[0], dict):
    return {k: np.stack([it[k] for it in items]) for k in items[0]}
  return np.stack([np.asarray(it) for it in items])


def batch_at(
  source: RandomAccessSource,
  step: int,
  *,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  collate: Callable[[Sequence[Any]], Any] = _stack,
  shard: tuple[int, int] | None = None,
) -> Any:
  """Batch ``step`` of ``source`` (stacked along a new leading axis).

  ``shard=(index, count)``: this process's contiguous ``batch_size / count`` rows of the
  global batch (multi-host data parallelism: ``(jax.process_index(), jax.process_count())``).
  """
  idx = batch_indices(step, batch_size=batch_size, num_examples=len(source), seed=seed,
                      shuffle=shuffle)
  if shard is not None:
    idx = idx[shard_rows(batch_size, shard)]
  return collate([source[int(i)] for i in idx])


def shard_rows(batch_size: int, shard: tuple[int, int] | None) -> slice:
  """The rows of a global batch of ``batch_size`` that process ``shard = (index, count)`` holds:
  ``[index * B / count, (index + 1) * B / count)`` (all of them when ``shard`` is None)."""
  if shard is None:
    return slice(0, batch_size)
  index, count = shard
  if count < 1 or batch_size % count or not 0 <= index < count:
    raise ValueError(
      f"shard={shard}: expected 0 <= index < count and batch_size={batch_size} divisible by count"
    )
  per = batch_size // count
  return slice(index * per, (index + 1) * per)


def process_rows(batch: Any, shard: tuple[int, int] | None) -> Any:
  """This process's rows of a global batch built whole in memory: every array leaf of ``batch``
  (a dict, a tuple, a ``flax.struct`` batch) cut to ``shard_rows(B, shard)`` along its leading
  dimension ``B``. ``shard`` None (one process): ``batch`` unchanged. What ``batch_at(...,
  shard=)`` does for a data source, for loops that make each batch in numpy at once."""
  if shard is None or batch is None:
    return batch
  leaves = [x for x in jax.tree.leaves(batch) if np.ndim(x) > 0]
  sizes = {np.shape(x)[0] for x in leaves}
  if len(sizes) > 1:
    raise ValueError(f"process_rows: the batch's leaves have different leading sizes "
                     f"{sorted(sizes)}: expected one batch dimension")
  if not sizes:
    return batch
  rows = shard_rows(sizes.pop(), shard)
  return jax.tree.map(lambda x: x[rows] if np.ndim(x) > 0 else x, batch)


def iterate_batches(
  source: RandomAccessSource,
  *,
  batch_size: int,
  seed: int,
  start_step: int = 0,
  num_steps: int | None = None,
  shuffle: bool = True,
  collate: Callable[[Sequence[Any]], Any] = _stack,
  backend: str = "auto",
  num_threads: int = 2,
  prefetch: int = 8,
  shard: tuple[int, int] | None = None,
) -> Iterator[Any]:
  """Batches ``start_step, start_step + 1, ...`` of ``source`` (``num_steps`` of them, or forever).

  Args:
    source: random-access examples (``len``, ``[i]``).
    batch_size: examples per batch.
    seed: shuffling seed.
    start_step: first batch (resume position).
    num_steps: how many batches; None for an endless stream.
    shuffle: seeded per-epoch permutation (False: file order, cycling).
    collate: list of examples -> batch.
    backend: ``"grain"`` (``grain.MapDataset`` + prefetch threads), ``"python"`` (plain loop),
      or ``"auto"`` (grain when installed).
    num_threads / prefetch: grain read options.
    shard: ``(index, count)``: yield only this shard's rows of each global batch (see batch_at).
  """
  if backend not in ("auto", "grain", "python"):
    raise ValueError(f"backend={backend!r}: expected 'auto', 'grain' or 'python'")
  if backend == "auto":
    backend = "grain" if grain_available() else "python"
  make = functools.partial(batch_at, source, batch_size=batch_size, seed=seed, shuffle=shuffle,
                           collate=collate, shard=shard)
  if backend == "python":
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield make(step)
      step += 1
    return

  import grain

  if num_steps is None:
    # An endless stream: grain ranges are finite, so chain long blocks of steps.
    block = 1 << 20
    step = start_step
    while True:
      yield from iterate_batches(source, batch_size=batch_size, seed=seed, start_step=step,
                                 num_steps=block, shuffle=shuffle, collate=collate,
                                 backend="grain", num_threads=num_threads, prefetch=prefetch,
                                 shard=shard)
      step += block
  dataset = grain.MapDataset.range(start_step, start_step + num_steps).map(make)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  yield from dataset.to_iter_dataset(options)


# ------------------------------------------------------------------------------------ packing


def pack_tokens(
  ids: np.ndarray | Sequence[int], seq_len: int, *, overlap: bool = True
) -> np.ndarray:
  """Cuts a token stream into windows ``[N, seq_len + 1]`` int32.

  With ``overlap`` (default) window ``n`` is ``ids[n*T : n*T + T + 1]``: consecutive windows
  share one boundary token, so every token except the first is a target exactly once. The
  tail shorter than a full window is dropped.
  """
  ids = np.asarray(ids, np.int32)
  if ids.ndim != 1:
    raise ValueError(f"pack_tokens expects a 1-D token stream, got shape {ids.shape}")
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}: expected >= 1")
  stride = seq_len if overlap else seq_len + 1
  n = (len(ids) - 1) // seq_len if overlap else len(ids) // (seq_len + 1)
  if n <= 0:
    raise ValueError(f"token stream of {len(ids)} tokens is too short for seq_len={seq_len}")
  starts = np.arange(n, dtype=np.int64) * stride
  return ids[starts[:, None] + np.arange(seq_len + 1)[None, :]]


def pack_documents(
  docs: Sequence[Sequence[int]], seq_len: int, *, eos_id: int | None = None
) -> np.ndarray:
  """Concatenates documents (each followed by ``eos_id`` when given) and packs the stream."""
  parts = []
  for d in docs:
    parts.append(np.asarray(d, np.int32))
    if eos_id is not None:
      parts.append(np.asarray([eos_id], np.int32))
  return pack_tokens(np.concatenate(parts) if parts else np.zeros(0, np.int32), seq_len)


# ---------------------------------------------------------------------------- dataset readers


def _resolve_backend(backend: str) -> str:
  if backend not in ("auto", "tfds", "files"):
    raise ValueError(f"data backend {backend!r}: expected 'auto', 'tfds' or 'files'")
  if backend == "auto":
    return "tfds" if tfds_available() else "files"
  return backend


def read_tiny_shakespeare_splits(
  *, backend: str = "auto", val_fraction: float = 0.1
) -> tuple[str, str]:
  """(train, validation) text of tiny Shakespeare: through the tfds builder (array_record,
  ``backend="tfds"``) or straight from the file (``"files"``); both give the same strings."""
  if _resolve_backend(backend) == "tfds":
    from qstar_jax.data import tfds_builders  # imports tensorflow_datasets (optional)

    if val_fraction != tfds_builders.VAL_FRACTION:
      raise ValueError(
        f"the tfds builder splits at val_fraction={tfds_builders.VAL_FRACTION}, got {val_fraction}"
      )
    return (tfds_builders.read_tiny_shakespeare("train"),
            tfds_builders.read_tiny_shakespeare("validation"))
  return text_lib.split_text(text_lib.load_tiny_shakespeare(), val_fraction)


def read_gsm8k_split(split: str, *, backend: str = "auto") -> list[dict[str, Any]]:
  """GSM8K records (``load_gsm8k`` format) through the tfds builder or straight from the file."""
  if _resolve_backend(backend) == "tfds":
    from qstar_jax.data import tfds_builders  # imports tensorflow_datasets (optional)

    return tfds_builders.read_gsm8k(split)
  return load_gsm8k(split)
