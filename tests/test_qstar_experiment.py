"""The Q*-vs-A* experiment end to end on tiny settings with the committed networks: the
results.json format of the issue, every path replays to the goal, table and plots written."""

import json

import numpy as np
import pytest

from experiments.qstar_search import main
from qstar_jax.envs import load_deepcubea, make_env

pytestmark = pytest.mark.filterwarnings("ignore")

KEYS = {"domain", "actions", "method", "states", "state_ids", "start_states", "paths",
        "solved_frac", "mean_length", "mean_nodes_generated", "mean_seconds"}


def _check_runs(results):
  for run in results["runs"]:
    assert KEYS <= set(run)
    env = make_env(run["domain"], run["actions"])
    base = make_env(run["domain"])  # paths are stored as base moves
    assert len(run["paths"]) == len(run["start_states"])
    solved = 0
    for start, path in zip(run["start_states"], run["paths"], strict=True):
      env.validate_states(np.array(start))
      if path is not None:
        solved += 1
        assert np.array_equal(base.replay(np.array(start, np.uint8), path), base.goal)
    assert run["solved_frac"] == pytest.approx(solved / len(run["paths"]))
    if run["states"] == "deepcubea":
      data = load_deepcubea(run["domain"])
      np.testing.assert_array_equal(data["states"][run["state_ids"]], run["start_states"])


def test_experiment_puzzle15_fast(tmp_path):
  """Default-suite check: one section, results format, replayed paths, table."""
  out = tmp_path / "fast"
  res = main(["sections=[deepcubea_puzzle15]", "deepcubea_puzzle15_states=2",
              "deepcubea_search.max_iterations=3", "deepcubea_search.batch_pops=2",
              "deepcubea_search.node_capacity=500", f"out={out}"])
  saved = json.loads((out / "results.json").read_text())
  assert [(r["domain"], r["actions"], r["method"]) for r in saved["runs"]] == [
      ("puzzle15", 4, "astar"), ("puzzle15", 4, "qstar")]
  assert saved["runs"][0]["state_ids"] == [0, 1]
  _check_runs(saved)
  assert all(v is None for v in res["ratios"].values())  # no cube rows: no ratios, not zeros
  assert "DeepCubeA" in (out / "table.md").read_text()


@pytest.mark.slow
def test_experiment_puzzle15_and_cube_tiny(tmp_path):
  out = tmp_path / "run"
  res = main(["sections=[ratio, deepcubea_puzzle15]", "ratio_num_states=2", "ratio_min_depth=3",
              "ratio_max_depth=4", "ratio_search.batch_pops=2", "ratio_search.max_iterations=20",
              "ratio_search.node_capacity=2000", "ratio_search_1884.batch_pops=2",
              "ratio_search_1884.max_iterations=30", "ratio_search_1884.node_capacity=120000",
              "deepcubea_puzzle15_states=2", "deepcubea_search.max_iterations=5",
              "deepcubea_search.batch_pops=4", "deepcubea_search.node_capacity=2000",
              f"out={out}"])
  saved = json.loads((out / "results.json").read_text())
  assert set(saved) >= {"config", "runs", "ratios"}
  assert set(saved["ratios"]) == {"astar_over_qstar_nodes", "astar_over_qstar_seconds",
                                  "qstar_large_over_small_nodes", "qstar_large_over_small_seconds"}
  combos = {(r["domain"], r["actions"], r["method"]) for r in saved["runs"]}
  assert combos == {("cube3", 12, "astar"), ("cube3", 12, "qstar"), ("cube3", 1884, "astar"),
                    ("cube3", 1884, "qstar"), ("puzzle15", 4, "astar"), ("puzzle15", 4, "qstar")}
  _check_runs(saved)
  # Depth 3-4 scrambles are solved by both searches with the committed cube networks.
  cube = [r for r in saved["runs"] if r["domain"] == "cube3"]
  assert all(r["solved_frac"] == 1.0 for r in cube)
  a1884 = next(r for r in cube if r["actions"] == 1884 and r["method"] == "astar")
  q1884 = next(r for r in cube if r["actions"] == 1884 and r["method"] == "qstar")
  assert a1884["mean_nodes_generated"] > 100 * q1884["mean_nodes_generated"]
  assert res["ratios"]["astar_over_qstar_nodes"] == pytest.approx(
      a1884["mean_nodes_generated"] / q1884["mean_nodes_generated"])
  table = (out / "table.md").read_text()
  assert "Headline ratios" in table and "DeepCubeA" in table
  assert (out / "ratios.png").stat().st_size > 0
