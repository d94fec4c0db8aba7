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
from qstar_jax.search.steps.methods import SearchBudget
from qstar_jax.search.steps.tasks import SearchTask, evaluate

__all__ = ["STAGES_CONFIG_FILE", "StaleStagesError", "check_stages_config", "config_differences",
           "evaluate_once", "markdown_table", "mean_spread", "read_json", "save_plot", "to_jsonable", "write_json",
           "write_results"]

# The file in an experiment's out dir that records the settings its stage files were made with.
STAGES_CONFIG_FILE = "stages_config.json"


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


class StaleStagesError(ValueError):
  """An out dir holds stage files made with other settings than the run's."""


def config_differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
  """``"path: stored -> current"`` for each leaf where two JSON values differ (dicts compared
  key by key, dotted paths; a key on one side only shows ``<absent>`` on the other)."""
  if isinstance(stored, Mapping) and isinstance(current, Mapping):
    out: list[str] = []
    for key in sorted(set(stored) | set(current), key=str):
      path = f"{prefix}.{key}" if prefix else str(key)
      if key not in stored:
        out.append(f"{path}: <absent> -> {json.dumps(current[key])}")
      elif key not in current:
        out.append(f"{path}: {json.dumps(stored[key])} -> <absent>")
      else:
        out += config_differences(stored[key], current[key], path)
    return out
  if stored == current:
    return []
  return [f"{prefix or '<root>'}: {json.dumps(stored)} -> {json.dumps(current)}"]


def check_stages_config(out_dir: str | os.PathLike, config: Mapping[str, Any], *,
                        ignore: Sequence[str] = ()) -> dict[str, Any]:
  """Ties an experiment's stage files to the settings that made them.

  Experiments whose stages are skipped when their files exist (data, trained models,
  evaluations) would otherwise read back, on a rerun with changed settings into the same
  ``out_dir``, files made with the old ones, and report them as the new run's. The first run
  writes ``out_dir/stages_config.json`` (``config`` as JSON, without the top-level keys in
  ``ignore``: settings that never change a stage's files, e.g. the out dir itself, the device
  mesh, which methods or seeds to run); a rerun must present the same settings.

  ``config`` may carry, besides the experiment's config, fingerprints of its inputs (e.g. the
  policy's parameters), so that a retrained input also counts as a change. An out dir made
  before this check existed (stage files, no record) is adopted: the record is written.

  Returns:
    the recorded settings.

  Raises:
    StaleStagesError: the out dir was made with other settings; the message names every
      differing setting (stored -> now) and what to do.
  """
  unknown = [k for k in ignore if k not in config]
  if unknown:
    raise ValueError(f"ignore={list(ignore)}: {unknown} are not keys of the config "
                     f"(keys: {sorted(config)})")
  current = to_jsonable({k: v for k, v in config.items() if k not in ignore})
  path = pathlib.Path(out_dir) / STAGES_CONFIG_FILE
  stored = read_json(path)
  if stored is None:
    return write_json(path, current)
  differences = config_differences(stored, current)
  if differences:
    raise StaleStagesError(
      f"{out_dir} holds stage files made with other settings ({path}); changed: "
      + "; ".join(differences) + ". Use another out dir, or delete this one to rerun every "
      "stage with the new settings.")
  return stored


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


def evaluate_once(evals: dict[str, Any], key: str, path: str | os.PathLike, task: SearchTask,
                  method: str, budget: SearchBudget, *, seed: int,
                  **scorer: Any) -> dict[str, Any]:
  """``evals[key]``: when missing, `search.steps.tasks.evaluate(task, method, budget, seed=seed,
  **scorer)`'s point (its ``first_text`` dropped), stored in ``evals`` and the whole dict written
  to ``path`` as it finishes, so a rerun of a killed experiment skips what it already has."""
  if key not in evals:
    point = evaluate(task, method, budget, seed=seed, **scorer)
    evals[key] = {k: v for k, v in point.items() if k != "first_text"}
    write_json(path, evals)
    print(f"{key}: accuracy {point['accuracy']:.3f}, {point['tokens_decoded']:.1f} tokens "
          f"decoded / problem", flush=True)
  return evals[key]


def mean_spread(values: Sequence[float], *, scale: float = 100.0) -> str:
  """``"mean ± half-range"`` of ``values * scale`` with one decimal (accuracies over seeds in %).

  Examples:
    >>> mean_spread([0.30, 0.34, 0.32])
    '32.0 ± 2.0'
  """
  a = [scale * float(v) for v in values]
  if not a:
    raise ValueError("mean_spread got no values: expected one per seed")
  return f"{sum(a) / len(a):.1f} ± {(max(a) - min(a)) / 2:.1f}"


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
