"""experiments.quest_seeds: grouping by seed and paired gaps, checked by hand on fake run dirs."""

import json

import numpy as np
import pytest

from experiments.quest_seeds import load_runs, seed_table, trajectory_table


def _write(root, seed, losses, train=None):
  (root / "runs").mkdir(parents=True)
  (root / "results.json").write_text(json.dumps({"config": {"train": {"seed": seed}}}))
  for run, loss in losses.items():
    d = root / "runs" / f"d128_f384_l2_{run}"
    d.mkdir()
    d.joinpath("result.json").write_text(json.dumps(
        {"params": 1000, "val_loss": loss, "finite": loss is not None}))
    if train is not None:
      # metrics.jsonl with steps out of order and an eval line mixed in.
      lines = [{"step": i + 1, "train/loss": x} for i, x in enumerate(train[run])]
      # The first step appears twice, as after a resumed run: its last value counts.
      lines = ([{"step": 1, "train/loss": 99.0}] + lines[1:] + lines[:1]
               + [{"step": len(lines), "eval/loss": loss}])
      d.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_paired_gaps_by_hand(tmp_path):
  _write(tmp_path / "s0", 0, {"bf16": 3.0, "quest4": 3.3, "ste4": 3.15, "quest1": None})
  _write(tmp_path / "s1", 1, {"bf16": 2.0, "quest4": 2.1, "ste4": 2.2})
  table = load_runs([str(tmp_path / "s0"), str(tmp_path / "s1")])
  assert table[(1000, "quest4")] == {0: 3.3, 1: 2.1}
  assert (1000, "quest1") not in table  # diverged runs are left out
  text = seed_table(table)
  row = next(line for line in text.splitlines() if "| quest4 |" in line)
  # gaps +10% and +5%: mean 7.5, sd 3.54; QuEST - STE: +0.15 and -0.10 -> +0.025 ± 0.1768
  assert "+7.50 ± 3.54%" in row
  assert "+0.0250 ± 0.1768 (QuEST <= STE in 1/2)" in row


def test_eval_standard_error_by_hand():
  """With per-window losses, the QuEST - STE cell adds the largest per-seed evaluation SE."""
  table = {(1000, "bf16"): {0: 3.0, 1: 3.0}, (1000, "quest4"): {0: 3.1, 1: 3.2},
           (1000, "ste4"): {0: 3.0, 1: 3.3}}
  windows = {(1000, "quest4"): {0: np.array([3.0, 3.2, 3.1, 3.1]), 1: np.array([3.2] * 4)},
             (1000, "ste4"): {0: np.array([3.0, 3.0, 3.0, 3.0]), 1: np.array([3.3] * 4)}}
  row = next(line for line in seed_table(table, windows).splitlines() if "| quest4 |" in line)
  # seed 0: differences 0, .2, .1, .1 -> sd 0.0816, SE 0.0408; seed 1: all -0.1 -> SE 0
  assert "(QuEST <= STE in 1/2); eval SE <= 0.0408" in row


def test_duplicate_seed_and_missing_dir(tmp_path):
  _write(tmp_path / "a", 0, {"bf16": 3.0})
  _write(tmp_path / "b", 0, {"bf16": 3.1})
  with pytest.raises(ValueError, match="seed 0 of bf16"):
    load_runs([str(tmp_path / "a"), str(tmp_path / "b")])
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_runs([str(tmp_path / "nowhere")])


def test_trajectory_gaps_by_hand(tmp_path):
  train = {"bf16": [5.0, 4.0, 3.0, 2.0], "quest8": [5.1, 4.1, 3.0, 2.2],
           "quest4": [5.0, 4.0, 3.5, 2.5], "ste4": [5.2, 4.0, 3.3, 2.5]}
  _write(tmp_path / "s3", 3, {"bf16": 2.0, "quest8": 2.25, "quest4": 2.5, "ste4": 2.4}, train)
  lines = trajectory_table([str(tmp_path / "s3")], segments=2).splitlines()
  rows = {line.split(" | ")[1]: line for line in lines[2:]}
  assert set(rows) == {"quest8 - bf16", "quest4 - ste4"}
  # quest8 - bf16 per step: .1 .1 0 .2 -> halves +0.100, +0.100; final val 2.25 - 2.0
  assert "| 3 | +0.100 +0.100 | +0.2500 |" in rows["quest8 - bf16"]
  # quest4 - ste4 per step: -.2 0 .2 0 -> halves -0.100, +0.100; final val 2.5 - 2.4
  assert "| 3 | -0.100 +0.100 | +0.1000 |" in rows["quest4 - ste4"]


def test_trajectory_refuses_unequal_logs(tmp_path):
  train = {"bf16": [5.0, 4.0, 3.0], "quest8": [5.0, 4.0]}
  _write(tmp_path / "s0", 0, {"bf16": 3.0, "quest8": 3.0}, train)
  with pytest.raises(ValueError, match="logged 2 and 3 training losses"):
    trajectory_table([str(tmp_path / "s0")], segments=2)
  with pytest.raises(ValueError, match="segments=0"):
    trajectory_table([str(tmp_path / "s0")], segments=0)
