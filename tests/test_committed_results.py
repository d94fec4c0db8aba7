"""The committed Q*/A* results replay: every stored path reaches the goal from its stored start,
the start states are the DeepCubeA test states named by their ids, and the reported solved %,
mean length and % optimal follow from the paths and the test sets' optimal lengths."""

import json
import pathlib

import numpy as np
import pytest

from qstar_jax.envs import load_deepcubea, make_env

ROOT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "checkpoints"
FILES = sorted(ROOT.glob("results_cpu*/*results.json"))


def test_result_files_exist():
  names = {f"{p.parent.name}/{p.name}" for p in FILES}
  assert {"results_cpu/results.json",
          "results_cpu_deepcubea/puzzle15_500_long_results.json"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_paths_replay(path):
  results = json.loads(path.read_text())
  for run in results["runs"]:
    base = make_env(run["domain"])  # paths are stored as base moves
    data = load_deepcubea(run["domain"]) if run["states"] == "deepcubea" else None
    starts = np.array(run["start_states"], np.uint8)
    if data is not None:
      np.testing.assert_array_equal(data["states"][run["state_ids"]], starts)
    solved = [i for i, m in enumerate(run["paths"]) if m is not None]
    lengths = np.array([len(run["paths"][i]) for i in solved])
    if solved:
      # One batched replay per run, the paths padded with -1 (no-op).
      padded = np.full((len(solved), int(lengths.max())), -1, np.int64)
      for row, i in enumerate(solved):
        padded[row, :lengths[row]] = run["paths"][i]
      ends = base.replay(starts[solved], padded)
      assert np.all(ends == base.goal), (path.name, run["method"])
    assert run["solved_frac"] == pytest.approx(len(solved) / len(run["paths"]))
    if solved:
      assert run["mean_length"] == pytest.approx(lengths.mean())
    if data is not None and "pct_optimal" in run:
      best = np.asarray(data["optimal_lengths"])[np.asarray(run["state_ids"])[solved]]
      assert np.all(lengths >= best)
      assert run["pct_optimal"] == pytest.approx(100 * np.sum(lengths == best) / len(run["paths"]))
