"""experiments.oreo: the acceptance checks and the table from hand-made numbers, every preset's
config loads, the GSM8K grading, and (slow) the whole tiny preset end to end, then rerun: the
sampled data, the training runs and the evaluations are reused, not redone."""

from __future__ import annotations

import functools
import json

import pytest

from experiments import oreo
from qstar_jax.search.steps.scorers import ModelValue
from qstar_jax.search.steps.step_tree import PolicyValueParams
from qstar_jax.training.config import ConfigError, parse_config

METHODS = {"sft": [0.30, 0.30, 0.30], "rejection_sampling": [0.32, 0.34, 0.30],
           "dpo": [0.20, 0.25, 0.30], "oreo": [0.33, 0.35, 0.31], "oreo_beam": [0.30, 0.31, 0.32]}


def test_acceptance_checks_compare_seed_means():
  checks = oreo.acceptance_checks(METHODS)
  # oreo 33.0 >= rejection_sampling 32.0 >= sft 30.0; oreo_beam 31.0 < oreo 33.0.
  assert [c["met"] for c in checks] == [True, False]
  assert checks[0]["values"] == {"oreo": 33.0, "rejection_sampling": 32.0, "sft": 30.0}
  assert checks[1]["values"] == {"oreo_beam": 31.0, "oreo": 33.0}
  worse = {**METHODS, "rejection_sampling": [0.29, 0.29, 0.29]}
  assert not oreo.acceptance_checks(worse)[0]["met"]  # rejection sampling below SFT


def test_table_has_the_papers_layout_and_a_line_per_check():
  compute = {m: {"tokens_decoded": 35.0, "seconds": 1.0, "train_steps": 10.0,
                 "train_examples": 5.0} for m in METHODS}
  results = {"config": {"task": "arithmetic", "n_test_problems": 500, "seeds": [0, 1, 2]},
             "methods": METHODS, "compute": compute, "checks": oreo.acceptance_checks(METHODS),
             "data": {"0": {"samples": 8, "correct_share": 0.25, "mixed_problems": 1,
                            "pairs": 2}}}
  table = oreo.make_table(results)
  # mean ± half-range: dpo (20, 25, 30) -> 25.0 ± 5.0; the paper's GSM8K / MATH numbers beside.
  assert "| dpo | 25.0 ± 5.0 | 20.0, 25.0, 30.0 | 74.4 / 49.2 |" in table
  assert "oreo >= rejection_sampling >= sft: **met** (oreo 33.0" in table
  assert "oreo_beam >= oreo: **not met** (oreo_beam 31.0, oreo 33.0)" in table
  assert "-6.1% relative" in table  # 31 / 33 - 1


@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu"])
def test_presets_load(preset):
  cfg = parse_config(oreo.OreoExperimentConfig, [f"preset={preset}"], presets_dir=oreo.PRESETS)
  assert cfg.task == ("gsm8k" if preset == "gpu" else "arithmetic")
  assert len(cfg.seeds) >= (1 if preset == "tiny" else 3)
  with pytest.raises(ConfigError):
    parse_config(oreo.OreoExperimentConfig, [f"preset={preset}", "oreo.no_such_key=1"],
                 presets_dir=oreo.PRESETS)


def test_gsm8k_reward_grades_the_stated_answer():
  assert oreo.gsm8k_reward("3 + 4 = 7\nThe answer is 7.", "7") == 1.0
  assert oreo.gsm8k_reward("The answer is 8.", "7") == 0.0
  assert oreo.gsm8k_reward("no answer here", "7") == 0.0


@pytest.mark.slow
def test_tiny_preset_end_to_end_and_rerun_reuses_every_stage(tmp_path, capsys):
  out = tmp_path / "oreo"
  first = oreo.main(["preset=tiny", f"out={out}"])
  assert set(first["methods"]) == set(oreo.METHODS)
  assert all(len(v) == 1 and 0.0 <= v[0] <= 1.0 for v in first["methods"].values())
  assert first["compute"]["oreo"]["train_steps"] == 2
  saved = json.loads((out / "results.json").read_text())
  assert saved["methods"] == first["methods"]
  assert (out / "accuracy.png").stat().st_size > 0
  table = (out / "table.md").read_text()
  assert table.count("**met**") + table.count("**not met**") == 2
  capsys.readouterr()
  second = oreo.main(["preset=tiny", f"out={out}"])
  assert second["methods"] == first["methods"]
  # Every training run restored its final checkpoint and reports the run that trained (its
  # stored record); no evaluation was run again.
  assert second["compute"] == first["compute"]
  assert (out / "seed0" / "oreo" / "train_record.json").exists()
  assert "accuracy" not in capsys.readouterr().out.split("# OREO")[0]


def test_separate_value_model_beam_scorer_and_greedy_head():
  """oreo_separate_value: the beam scores nodes with the value model (`ModelValue` on its own
  Llama state and head); greedy's tree gets the head alone. The shared trunk: no scorer, the
  params unchanged."""
  class Task:
    graphdef = "graphdef"

    def __init__(self, value):
      self.params = PolicyValueParams(policy="policy", value=value)

  head = {"kernel": "k", "bias": "b"}
  separate = Task({"model": "value trunk", "head": head})
  scorer = oreo.oreo_beam_scorer(separate)
  assert scorer["scorer"] == ModelValue("graphdef")
  assert isinstance(scorer["scorer_params"], functools.partial)
  assert scorer["scorer_params"].args == ("value trunk", head)
  assert oreo._policy_head(separate.params) == PolicyValueParams(policy="policy", value=head)
  shared = Task(head)
  assert oreo.oreo_beam_scorer(shared) == {}
  assert oreo._policy_head(shared.params) is shared.params
