"""Where data and caches live.

``data_dir()``: env ``QSTAR_DATA_DIR``; default the ``shared/data`` folder next to the
repository (``<repo>/../shared/data``), else ``<repo>/shared/data``.
``cache_dir()``: env ``QSTAR_CACHE_DIR``; default ``~/.cache/qstar_jax``.
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["data_dir", "cache_dir", "data_file", "repo_root"]


def repo_root() -> pathlib.Path:
  """The folder holding ``qstar_jax/`` (the repository root for an editable install)."""
  return pathlib.Path(__file__).resolve().parents[2]


def data_dir() -> pathlib.Path:
  """The data folder (``QSTAR_DATA_DIR`` or the shared data next to the repository)."""
  env = os.environ.get("QSTAR_DATA_DIR")
  if env:
    return pathlib.Path(env).expanduser()
  root = repo_root()
  candidates = [root.parent / "shared" / "data", root / "shared" / "data"]
  for c in candidates:
    if c.is_dir():
      return c
  return candidates[0]


def cache_dir() -> pathlib.Path:
  """The cache folder (``QSTAR_CACHE_DIR`` or ``~/.cache/qstar_jax``), created on demand."""
  env = os.environ.get("QSTAR_CACHE_DIR")
  path = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "qstar_jax"
  path.mkdir(parents=True, exist_ok=True)
  return path


def data_file(*parts: str) -> pathlib.Path:
  """``data_dir()/parts...``; raises FileNotFoundError naming the path and the setting."""
  path = data_dir().joinpath(*parts)
  if not path.exists():
    raise FileNotFoundError(
      f"data file {path} not found; set QSTAR_DATA_DIR to the folder holding "
      f"{'/'.join(parts)} (currently {data_dir()})"
    )
  return path
