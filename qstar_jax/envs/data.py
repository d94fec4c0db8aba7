"""Loading the DeepCubeA test sets (``cube3_test.npz``, ``puzzle15_test.npz``).

The two files (68 KB, MIT, their licence beside them) ship inside the package in
``qstar_jax/envs/deepcubea/``, so a plain ``pip install`` can run the puzzle searches with no data
folder. A copy at ``data_dir()/deepcubea/<name>_test.npz`` (setting ``QSTAR_DATA_DIR``) takes
precedence when it exists.
"""

from __future__ import annotations

import functools
import importlib.resources
import pathlib
from importlib.resources.abc import Traversable

import numpy as np

from qstar_jax.data.paths import data_dir

__all__ = ["DEEPCUBEA_SETS", "deepcubea_path", "load_deepcubea"]

DEEPCUBEA_SETS = ("cube3", "puzzle15")


def deepcubea_path(name: str) -> pathlib.Path | Traversable:
  """The file of test set ``name``: ``data_dir()/deepcubea/<name>_test.npz`` when it exists,
  else the packaged copy."""
  if name not in DEEPCUBEA_SETS:
    raise ValueError(f"unknown DeepCubeA test set {name!r}; expected one of {DEEPCUBEA_SETS}")
  file_name = f"{name}_test.npz"
  local = data_dir() / "deepcubea" / file_name
  if local.is_file():
    return local
  packaged = importlib.resources.files("qstar_jax.envs") / "deepcubea" / file_name
  if not packaged.is_file():
    raise FileNotFoundError(
      f"{local} not found and the packaged copy {packaged} is missing (a broken install?); "
      "set QSTAR_DATA_DIR to a folder holding deepcubea/ or reinstall qstar-jax"
    )
  return packaged


@functools.cache
def _load_npz(path: pathlib.Path | Traversable) -> dict[str, np.ndarray]:
  with path.open("rb") as f, np.load(f) as arrays:
    return {k: arrays[k] for k in arrays.files}


def load_deepcubea(name: str) -> dict[str, np.ndarray]:
  """The DeepCubeA test set ``name`` in {"cube3", "puzzle15"} as a dict of numpy arrays.

  Keys: ``states``, ``optimal_solutions`` (-1 padded), ``optimal_lengths``, ``moves``, ``goal``,
  and for the cube ``move_perm``. Reads the file :func:`deepcubea_path` names (read once per
  path; the arrays are shared between calls, do not modify them).
  """
  return _load_npz(deepcubea_path(name))
