"""The search experiments end to end on a few arithmetic problems (slow: each method compiles)."""

from __future__ import annotations

import json

import pytest

from experiments import search_demo, search_scaling
from qstar_jax.search.steps import METHODS

pytestmark = pytest.mark.slow


def test_search_scaling_smoke_writes_the_issue_schema(tmp_path):
  results = search_scaling.main(["preset=smoke", f"out={tmp_path}"])
  stored = json.loads((tmp_path / "results.json").read_text())
  assert set(stored) == {"config", "tasks"} and set(stored["tasks"]) == {"arithmetic"}
  arithmetic = stored["tasks"]["arithmetic"]
  assert set(arithmetic) == set(METHODS)
  for method, entry in arithmetic.items():
    for key in ("accuracy", "tokens_decoded", "model_calls", "n_problems"):
      assert key in entry, (method, key)
    assert entry["n_problems"] == 4
    assert 0.0 <= entry["accuracy"] <= 1.0
    # Accuracy is a count of right answers out of 4 problems.
    assert round(4 * entry["accuracy"]) == pytest.approx(4 * entry["accuracy"])
    assert entry["tokens_decoded"] > 0 and entry["model_calls"] > 0
  # N samples decode more tokens than one greedy solution.
  assert arithmetic["majority"]["tokens_decoded"] > arithmetic["greedy"]["tokens_decoded"]
  assert results["tasks"]["arithmetic"]["greedy"]["accuracy"] == arithmetic["greedy"]["accuracy"]
  table = (tmp_path / "table.md").read_text()
  assert all(f"| {m} |" in table for m in METHODS)
  assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 0


def test_search_demo_arithmetic_part(tmp_path, capsys):
  summary = search_demo.main(["n_problems=4", "gsm8k=false", f"out={tmp_path}"])
  assert set(summary) == {"greedy", "majority", "mcts", "beam"}
  for entry in summary.values():
    assert 0.0 <= entry["accuracy"] <= 1.0 and entry["tokens_per_s"] > 0
  assert json.loads((tmp_path / "results.json").read_text()) == summary
  printed = capsys.readouterr().out
  assert "| greedy |" in printed and "| mcts |" in printed
  assert "scored by the step verifier (committed)" in printed
