"""Metrics writer: JSONL always, TensorBoard event files when ``tensorboard`` is installed.

Only process 0 writes (``jax.process_index() == 0``), so multi-host runs produce one log.
Each JSONL line is ``{"step": int, "time": float (unix s), <name>: float, ...}``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax

__all__ = ["MetricsWriter", "read_metrics"]


def _to_float(value: Any) -> float:
  if hasattr(value, "item"):
    value = value.item()
  return float(value)


def _json_value(x: float) -> float | str:
  if math.isnan(x):
    return "NaN"
  if math.isinf(x):
    return "Infinity" if x > 0 else "-Infinity"
  return x


class _TensorBoardWriter:
  """Scalar events through tensorboard's own protobufs (no TensorFlow, no torch)."""

  def __init__(self, log_dir: pathlib.Path):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._event_cls = Event
    self._summary_cls = Summary
    self._writer = EventFileWriter(str(log_dir))

  def write(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
    values = [self._summary_cls.Value(tag=k, simple_value=v) for k, v in metrics.items()]
    event = self._event_cls(
      wall_time=wall_time, step=step, summary=self._summary_cls(value=values)
    )
    self._writer.add_event(event)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _tensorboard_available() -> bool:
  try:
    import tensorboard.summary.writer.event_file_writer  # noqa: F401
  except Exception:
    return False
  return True


class MetricsWriter:
  """Appends scalar metrics to ``out_dir/metrics.jsonl`` (+ ``out_dir/tensorboard/``).

  Args:
    out_dir: run folder (created).
    enabled: write at all; ``None`` means "this is process 0".
    tensorboard: ``None`` writes TensorBoard events when the package is importable.

  Example::

    with MetricsWriter(out) as w:
      w.write(step, {"loss": 2.3, "lr": 1e-3})
  """

  def __init__(
    self,
    out_dir: str | os.PathLike,
    *,
    enabled: bool | None = None,
    tensorboard: bool | None = None,
  ):
    if enabled is None:
      enabled = jax.process_index() == 0
    self.enabled = bool(enabled)
    self.out_dir = pathlib.Path(out_dir)
    self.path = self.out_dir / "metrics.jsonl"
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", buffering=1)  # line-buffered: survives a SIGKILL
    if tensorboard is None:
      tensorboard = _tensorboard_available()
    if tensorboard:
      self._tb = _TensorBoardWriter(self.out_dir / "tensorboard")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records ``metrics`` (scalars: floats, ints, 0-d arrays) at ``step``."""
    if not self.enabled:
      return
    if self._file is None:
      raise RuntimeError(f"MetricsWriter for {self.path} is closed")
    values = {str(k): _to_float(v) for k, v in metrics.items()}
    now = time.time()
    record = {"step": int(step), "time": now}
    record.update({k: _json_value(v) for k, v in values.items()})
    self._file.write(json.dumps(record) + "\n")
    if self._tb is not None:
      self._tb.write(int(step), values, now)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a ``metrics.jsonl`` file (a folder means ``folder/metrics.jsonl``)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      rec = json.loads(line)
      out.append(
        {k: float(v) if isinstance(v, str) and v in ("NaN", "Infinity", "-Infinity") else v
         for k, v in rec.items()}
      )
  return out
