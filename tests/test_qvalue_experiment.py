"""experiments.qvalue_stepdpo: its pure helpers (fast) and the whole pipeline at preset=tiny
(slow: trains a 1-layer policy B, annotates, runs step-DPO, evaluates, then reruns from files)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from experiments import qvalue_stepdpo as qv
from qstar_jax.data.gsm8k import load_gsm8k
from qstar_jax.data.reasoning import PreferencePair
from qstar_jax.envs.arithmetic import generate_problems
from qstar_jax.training.config import parse_config


def _pair(record: int) -> PreferencePair:
  return PreferencePair(context_ids=(1, 5), chosen_ids=(7,), rejected_ids=(8,), chosen_q=1.0,
                        rejected_q=0.0, record_index=record)


def test_mean_spread_and_relative_gain_by_hand():
  mean, spread = qv.mean_spread([0.2, 0.4, 0.6])
  assert mean == pytest.approx(0.4)
  assert spread == pytest.approx(0.2)               # sqrt(((-.2)^2 + 0 + .2^2) / 2)
  assert qv.mean_spread([0.3]) == (0.3, 0.0)
  assert qv.relative_gain(0.36, 0.3) == pytest.approx(0.2)
  assert math.isnan(qv.relative_gain(0.1, 0.0))
  with pytest.raises(ValueError, match="at least one"):
    qv.mean_spread([])


def test_holdout_split_keeps_whole_problems_apart():
  pairs = [_pair(r) for r in (0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9)]
  train, held = qv.holdout_split(pairs, num_records=10, fraction=0.3, seed=0)
  held_records = {p.record_index for p in held}
  assert len(held_records) == 3                     # round(0.3 * 10) problems
  assert not held_records & {p.record_index for p in train}
  assert sorted(train + held, key=id) == sorted(pairs, key=id)
  # Deterministic in the seed.
  assert qv.holdout_split(pairs, num_records=10, fraction=0.3, seed=0)[1] == held
  with pytest.raises(ValueError, match="no training pair"):
    qv.holdout_split([_pair(0)], num_records=1, fraction=0.9, seed=0)
  with pytest.raises(ValueError, match="holdout_fraction"):
    qv.holdout_split(pairs, num_records=10, fraction=1.0, seed=0)


def test_acceptance_checks_thresholds():
  policies = {"A": {"greedy": [0.30, 0.30], "q_guided": [0.36, 0.36]},   # exactly +20%
              "B": {"greedy": [0.10, 0.20], "q_guided": [0.15, 0.15]}}   # equal means
  a, b = qv.acceptance_checks(policies)
  assert a["met"] and a["relative_gain"] == pytest.approx(0.2)
  assert not b["met"] and b["relative_gain"] == pytest.approx(0.0)
  (a,) = qv.acceptance_checks({"A": {"greedy": [0.30], "q_guided": [0.359]}})
  assert not a["met"]


def test_make_table_reports_numbers_and_checks():
  policies = {"A": {"greedy": [0.3, 0.4], "q_guided": [0.5, 0.5]},
              "B": {"greedy": [0.1, 0.1], "q_guided": [0.05, 0.05]}}
  method = {"tokens_decoded": 40.0, "model_calls": 10.0, "seconds": 1.0, "overflow": 0.0}
  seed = {"annotation": {"num_problems": 8, "tokens_decoded": 900.0, "seconds": 5.0},
          "qmodel": {"pairs": {"dropped_tie": 3}, "train_pairs": 6, "heldout_pairs": 2, "steps": 4, "seconds": 2.0,
                     "heldout_pair_accuracy": 0.5, "train_pair_accuracy": float("nan"),
                     "synthetic_pairs": 4, "synthetic_pair_accuracy": 0.75}}
  results = {"config": {"seeds": [0, 1], "eval": {"num_problems": 8, "num_candidates": 5}},
             "policies": policies,
             "compute": {n: {"greedy": method, "q_guided": method} for n in policies},
             "seeds": [{"seed": 0, **seed}, {"seed": 1, **seed}],
             "checks": qv.acceptance_checks(policies)}
  md = qv.make_table(results)
  assert "| A | greedy | 35.0 ± 7.1 | 30.0 / 40.0 |" in md      # std of (.3, .4) = .0707
  assert "+42.9%" in md                                            # .5 / .35 - 1
  assert "for A (data policy): **met**" in md
  assert "for B (transfer): **not met**" in md
  assert "+103% relative" in md and "+75% relative" in md
  assert "50.0% mean over seeds, 2 held-out pairs per seed" in md
  # 6 training pairs of which 4 synthetic: 2 MCTS pairs trained on, 2 held out.
  assert "| 0 | 8 | 2 / 2 | 4 | 3 | 900 | 5 | 4 | 2 | 50.0 | n/a | 75.0 |" in md


def test_gsm8k_path_config_and_problems(tmp_path):
  cfg = parse_config(qv.QValueConfig, ["preset=gpu"], presets_dir=qv.PRESETS)
  assert (cfg.task, cfg.gsm8k.model, cfg.max_step_tokens) == ("gsm8k", "smollm2", 48)
  with pytest.raises(ValueError, match="gsm8k.model_b=HF_DIR"):
    qv.load_policies(cfg, tmp_path)
  with pytest.raises(ValueError, match="task='chess'"):
    qv.load_policies(dataclasses.replace(cfg, task="chess"), tmp_path)
  problems = qv.task_problems(cfg, 1, 3, "test")
  records = {r["question"]: r["final_answer"] for r in load_gsm8k("test")}
  assert len({p.question for p in problems}) == 3
  assert all(records[p.question] == p.answer for p in problems)
  assert qv.task_problems(cfg, 1, 3, "test") == problems          # seeded
  assert qv.task_problems(cfg, 2, 3, "test") != problems


def test_qmodel_context_is_checked_and_step_pairs_read_bos_alone():
  cfg = qv.QValueConfig()
  qv.check_qmodel_context(cfg)
  with pytest.raises(ValueError, match="qmodel.context='window': expected 'path' or 'step'"):
    qv.check_qmodel_context(dataclasses.replace(cfg, qmodel=qv.QModelConfig(context="window")))
  step = dataclasses.replace(cfg, qmodel=qv.QModelConfig(context="step"))
  qv.check_qmodel_context(step)
  with pytest.raises(ValueError, match="qmodel.context='step' with task='gsm8k'"):
    qv.check_qmodel_context(dataclasses.replace(step, task="gsm8k"))
  with pytest.raises(ValueError, match="qmodel.context='window'"):
    qv.run(dataclasses.replace(cfg, qmodel=qv.QModelConfig(context="window")))
  pair = PreferencePair(context_ids=(1, 9, 9, 4), chosen_ids=(5, 6, 4), rejected_ids=(5, 7, 4),
                        chosen_q=1.0, rejected_q=0.0, record_index=3, depth=1)
  policy = qv.StepPolicy(name="p", graphdef=None, params=None, tokenizer=None, spec=None,
                         prompt=lambda q: [], bos_id=1)
  assert qv.step_alone([pair], policy) == [dataclasses.replace(pair, context_ids=(1,))]
  with pytest.raises(ValueError, match="policy 'p' has no bos_id"):
    qv.step_alone([pair], dataclasses.replace(policy, bos_id=None))
  with pytest.raises(ValueError, match="qmodel.context='step' needs q_bos_id"):
    qv.evaluate_policy(step, policy, 0, q_graphdef=None, q_params=None, reference_params=None)


def test_arithmetic_problems_train_start_past_the_sft_corpus():
  cfg = qv.QValueConfig()
  train = qv.task_problems(cfg, 0, 2, "train")
  expected = generate_problems(0, 2, split="train", start=cfg.annotation.train_start)
  assert [(p.question, p.answer) for p in train] == [(e.question, str(e.answer)) for e in expected]
  test = qv.task_problems(cfg, 0, 2, "test")
  assert [p.question for p in test] == [e.question for e in generate_problems(0, 2, split="test")]


@pytest.mark.slow
def test_tiny_preset_end_to_end_and_rerun_from_files(tmp_path):
  out = tmp_path / "run"
  results = qv.main(["preset=tiny", f"out={out}"])
  saved = json.loads((out / "results.json").read_text())
  names = list(saved["policies"])
  assert len(names) == 2 and names[0].startswith("A ") and names[1].startswith("B ")
  for name in names:
    for method in ("greedy", "q_guided"):
      accs = saved["policies"][name][method]
      assert len(accs) == 1 and 0.0 <= accs[0] <= 1.0
      assert saved["compute"][name][method]["tokens_decoded"] > 0
  # Q-guided samples K candidates per step: it decodes more tokens than greedy.
  assert (saved["compute"][names[0]]["q_guided"]["tokens_decoded"]
          > saved["compute"][names[0]]["greedy"]["tokens_decoded"])
  seed = saved["seeds"][0]
  assert seed["annotation"]["num_problems"] == 4
  assert seed["qmodel"]["steps"] == 2
  # The tiny preset adds the synthetic pairs of 2 train problems (one per operation line).
  synthetic = sum(p.num_steps for p in generate_problems(qv.SYNTHETIC_SEED_BASE, 2, split="train"))
  assert seed["qmodel"]["synthetic_pairs"] == synthetic
  assert seed["qmodel"]["train_pairs"] >= synthetic
  assert 0.0 <= seed["qmodel"]["synthetic_pair_accuracy"] <= 1.0
  for name in ("annotations.jsonl", "pairs.jsonl", "annotation.json", "qmodel.json",
               "eval.json"):
    assert (out / "seed0" / name).is_file()
  assert (out / "table.md").read_text().count("**met**") + (
    out / "table.md").read_text().count("**not met**") == 2
  assert (out / "accuracy.png").stat().st_size > 0
  # A rerun reads every stage from its files: the same numbers.
  again = qv.main(["preset=tiny", f"out={out}"])
  assert again["policies"] == results["policies"]
  assert again["seeds"] == results["seeds"]
