"""Results of an experiment: ``results.json`` (indented, NaN-safe), ``table.md``, PNG plots.

On a multi-host run only process 0 writes (`qstar_jax.distributed.is_main_process`); the other
processes compute the same values and skip the files, so ``out`` is one folder on a disk every
host sees (as the orbax checkpoints need anyway) and resumed stages read what process 0 wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from qstar_jax.distributed import is_main_process

__all__ = ["write_results", "save_plot", "markdown_table", "to_jsonable", "read_json", "write_json"]


def to_jsonable(value: Any) -> Any:
  """Plain JSON types: NaN/inf become ``null``/strings, arrays become lists, dataclasses dicts."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, pathlib.PurePath):
    return str(value)
  if hasattr(value, "tolist") and callable(value.tolist):  # numpy / jax arrays and scalars
    return to_jsonable(value.tolist())
  if isinstance(value, float):
    if math.isnan(value):
      return None
    if math.isinf(value):
      return "Infinity" if value > 0 else "-Infinity"
  return value


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value stored at ``path``, or None when there is no such file (a stage not done)."""
  path = pathlib.Path(path)
  return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: str | os.PathLike, value: Any) -> Any:
  """Writes ``to_jsonable(value)`` (indented, NaN -> null) atomically (a temporary file, then a
  rename: a killed run never leaves half a file) and returns what `read_json` will read. Only
  process 0 writes; every process gets the value."""
  value = to_jsonable(value)
  if not is_main_process():
    return value
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")
  os.replace(tmp, path)
  return value


def write_results(out_dir: str | os.PathLike, *, results: Mapping[str, Any], table_md: str) -> None:
  """Writes ``out_dir/results.json`` (indented; NaN -> null) and ``out_dir/table.md`` (process 0
  only)."""
  if not is_main_process():
    return
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / "results.json.tmp"
  with open(tmp, "w") as f:
    json.dump(to_jsonable(results), f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(tmp, out / "results.json")
  text = table_md if table_md.endswith("\n") else table_md + "\n"
  (out / "table.md").write_text(text)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, floatfmt: str = ".4f") -> str:
  """A GitHub markdown table; floats formatted with ``floatfmt``."""

  def cell(v: Any) -> str:
    if isinstance(v, float):
      return format(v, floatfmt)
    return str(v)

  lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  for row in rows:
    if len(row) != len(headers):
      raise ValueError(f"table row {row!r} has {len(row)} cells, expected {len(headers)}")
    lines.append("| " + " | ".join(cell(v) for v in row) + " |")
  return "\n".join(lines) + "\n"


def save_plot(fig: Any, path: str | os.PathLike, *, dpi: int = 120) -> pathlib.Path:
  """Saves a matplotlib figure as PNG (Agg backend; process 0 only) and closes it."""
  import matplotlib

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  path = pathlib.Path(path)
  if is_main_process():
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return path


def new_figure(*args: Any, **kwargs: Any):
  """``plt.subplots`` on the Agg backend (no display needed)."""
  import matplotlib

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  return plt.subplots(*args, **kwargs)


__all__.append("new_figure")
