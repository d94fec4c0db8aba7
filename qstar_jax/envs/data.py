"""Loading the DeepCubeA test sets (``cube3_test.npz``, ``puzzle15_test.npz``)."""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np


def _data_dir() -> pathlib.Path:
  try:
    from qstar_jax.data.paths import data_dir

    return data_dir()
  except ImportError:  # scaffolding not there yet: same rule as qstar_jax.data.paths
    env = os.environ.get("QSTAR_DATA_DIR")
    if env:
      return pathlib.Path(env)
    repo = pathlib.Path(__file__).resolve().parents[2]
    for cand in (repo.parent / "shared" / "data", repo / "shared" / "data"):
      if cand.exists():
        return cand
    return repo.parent / "shared" / "data"


@functools.cache
def load_deepcubea(name: str) -> dict[str, np.ndarray]:
  """The DeepCubeA test set ``name`` in {"cube3", "puzzle15"} as a dict of numpy arrays.

  Keys: ``states``, ``optimal_solutions`` (-1 padded), ``optimal_lengths``, ``moves``, ``goal``,
  and for the cube ``move_perm``. Reads ``<data_dir>/deepcubea/<name>_test.npz``.
  """
  if name not in ("cube3", "puzzle15"):
    raise ValueError(f"unknown DeepCubeA test set {name!r}; expected 'cube3' or 'puzzle15'")
  path = _data_dir() / "deepcubea" / f"{name}_test.npz"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found; set QSTAR_DATA_DIR to the folder holding "
                            "deepcubea/ (see shared/data/README.md)")
  with np.load(path) as f:
    return {k: f[k] for k in f.files}
