"""Progress bars with rates (tqdm) and a phase timer.

``progress`` shows a live bar on a terminal (or when ``force=True``) and always prints one
summary line at the end: ``desc: N unit in S s (R unit/s)``, so logs of batch jobs keep the rate.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress", "Progress", "PhaseTimer"]


class Progress(tqdm):
  """tqdm that prints a one-line summary with the mean rate when it closes (even if disabled)."""

  def __init__(self, iterable: Any = None, *args: Any, desc: str = "", unit: str = "it",
               initial: int = 0, summary: bool = True, summary_file: Any = None, **kwargs: Any):
    self._summary = summary
    self._summary_file = summary_file
    self._summary_done = False
    self._label = desc.rstrip(": ") or "progress"
    self._unit_name = unit
    self._count = 0  # items processed in this run (not counting ``initial``)
    self._t_start = time.perf_counter()
    super().__init__(iterable, *args, desc=desc, unit=unit, initial=initial, **kwargs)

  def __iter__(self):
    try:
      for item in super().__iter__():
        if self.disable:
          self._count += 1
        yield item
    finally:
      if self.disable:
        self.close()

  def update(self, n: float = 1) -> bool | None:
    if self.disable:
      self._count += n
    return super().update(n)

  def close(self) -> None:
    if not self._summary_done and self._summary and hasattr(self, "_label"):
      self._summary_done = True
      elapsed = time.perf_counter() - self._t_start
      count = self._count if self.disable else self.n - getattr(self, "initial", 0)
      rate = count / elapsed if elapsed > 0 else float("nan")
      postfix = getattr(self, "postfix", None) if not self.disable else None
      super().close()
      print(
        f"{self._label}: {count:g} {self._unit_name} in {elapsed:.1f} s "
        f"({rate:.2f} {self._unit_name}/s)" + (f" [{postfix}]" if postfix else ""),
        file=self._summary_file or sys.stderr,
        flush=True,
      )
      return
    super().close()


def progress(
  iterable: Iterable | None = None,
  *,
  total: int | None = None,
  desc: str = "",
  unit: str = "it",
  force: bool = False,
  initial: int = 0,
  **kwargs: Any,
) -> Progress:
  """A progress bar with rates; disabled unless stderr is a TTY or ``force``.

  Args:
    iterable: optional iterable to wrap (``total`` is taken from ``len`` when it has one).
    total: number of items expected.
    desc: label.
    unit: item unit for the rate (``"step"``, ``"tok"``).
    force: show the live bar even when not on a terminal.
    initial: starting count (a resumed run).
  """
  disable = not (force or sys.stderr.isatty())
  return Progress(
    iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial,
    dynamic_ncols=True, **kwargs,
  )


class PhaseTimer:
  """Accumulates wall time per named phase.

  Example::

    timer = PhaseTimer()
    with timer.phase("compile"):
      ...
    timer.summary()  # {"compile": 1.23}
  """

  def __init__(self) -> None:
    self._totals: dict[str, float] = collections.OrderedDict()
    self._counts: dict[str, int] = collections.Counter()

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - t0)

  def add(self, name: str, seconds: float) -> None:
    self._totals[name] = self._totals.get(name, 0.0) + float(seconds)
    self._counts[name] += 1

  def summary(self) -> dict[str, float]:
    """Seconds spent in each phase (summed over its entries), in first-seen order."""
    return dict(self._totals)

  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  def format(self) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in self._totals.items())
