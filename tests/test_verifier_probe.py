"""experiments.verifier_probe: its metrics by hand, its line data, and the tiny preset end to
end."""

import json
import shutil

import jax
import numpy as np
import pytest

from experiments import verifier_probe
from qstar_jax.envs.arithmetic import generate_problems, parse_step
from qstar_jax.models.arithmetic_policy import default_arithmetic_policy_dir, load_arithmetic_policy
from qstar_jax.models.tokenizer import train_sentencepiece
from qstar_jax.search.steps.methods import SearchBudget
from qstar_jax.search.steps.scorers import StepVerifier
from qstar_jax.search.steps.tasks import ArithmeticTask, arithmetic_task, evaluate
from qstar_jax.training.checkpoint import CheckpointConfigMismatchError
from qstar_jax.training.step_verifier import (
  LINE_OFFSETS,
  StepVerifierConfig,
  step_verifier_data,
  synthetic_step_pairs,
  train_step_verifier,
)


def test_sample_metrics_by_hand():
  # Two problems, three samples each. Problem 0: the one correct sample ("7") scores lowest,
  # but two wrong samples disagree ("5", "6") while the correct answer has the largest weight.
  scores = np.array([0.1, 0.9, 0.8, 0.7, 0.2, 0.3])
  correct = np.array([True, False, False, True, False, True])
  groups = np.array([0, 0, 0, 1, 1, 1])
  answers = ["7", "5", "6", "3", "4", "3"]
  weights = np.array([1.0, 0.6, 0.6, 0.1, 0.5, 0.1])
  m = verifier_probe.sample_metrics(scores, correct, groups, answers, weights, ["7", "3"])
  # AUC per problem: problem 0 -> 0/2 pairs, problem 1 -> 1 (0.7 > 0.2) and 1 (0.3 > 0.2): 1.
  assert m["within_problem_auc"] == 0.5
  # Best-of-N: problem 0 picks 0.9 (wrong), problem 1 picks 0.7 (right).
  assert m["best_of_n"] == 0.5
  # Weighted majority: "7" 1.0 > "5"/"6" 0.6; "4" 0.5 > "3" 0.2.
  assert m["weighted_majority"] == 0.5
  m = verifier_probe.sample_metrics(scores, correct, groups, answers, np.ones(6), ["7", "3"])
  assert m["weighted_majority"] == 1.0   # plain majority: "7" first of a tie; "3" twice


def test_line_data_labels_and_balance():
  policy = load_arithmetic_policy()
  kw = dict(bos_id=policy.bos_id, newline_id=policy.newline_id, eos_id=policy.eos_id)
  lines = step_verifier_data(0, 200, "train", policy.tokenizer, **kw)
  problems = generate_problems(0, 200, split="train")
  assert len(lines) == sum(p.num_steps + 1 for p in problems)
  again = step_verifier_data(0, 200, "train", policy.tokenizer, **kw)
  assert again.ids == lines.ids and np.array_equal(again.correct, lines.correct)
  ops = np.array(lines.kinds) != "answer"
  assert 0.4 < lines.correct[ops].mean() < 0.6 and lines.correct[~ops].all()
  for seq, ok, kind in zip(lines.ids, lines.correct, lines.kinds, strict=True):
    assert seq[0] == policy.bos_id
    text = policy.tokenizer.decode(seq[1:-1])
    if kind == "answer":
      assert seq[-1] == policy.eos_id and text.startswith("The answer is ")
      continue
    assert seq[-1] == policy.newline_id
    a, op, b, c = parse_step(text)
    assert op == kind and c > 0
    right = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    assert (c == right) == ok
    if not ok:
      assert c - right in LINE_OFFSETS
  with pytest.raises(ValueError, match="wrong_fraction=1.5"):
    step_verifier_data(0, 2, "train", policy.tokenizer, wrong_fraction=1.5, **kw)


def test_synthetic_step_pairs_perturb_one_result_in_the_policy_context():
  policy = load_arithmetic_policy()
  tok = policy.tokenizer
  problems = generate_problems(3, 30, split="train")

  def prompt(q):
    return [policy.bos_id, *tok.encode(f"Q: {q}\n")]

  pairs = synthetic_step_pairs(problems, tok, prompt=prompt, newline_id=policy.newline_id, seed=0)
  assert len(pairs) == sum(p.num_steps for p in problems)
  again = synthetic_step_pairs(problems, tok, prompt=prompt, newline_id=policy.newline_id, seed=0)
  assert [(p.chosen_ids, p.rejected_ids) for p in again] == [(p.chosen_ids, p.rejected_ids)
                                                            for p in pairs]
  by_problem = {}
  for pair in pairs:
    by_problem.setdefault(pair.record_index, []).append(pair)
  for j, problem_pairs in by_problem.items():
    p = problems[j]
    full = tok.encode(p.solution)
    for i, pair in enumerate(problem_pairs):
      assert pair.depth == i
      # Context: the prompt, then the solution's ids up to this line, as the SFT data has them.
      earlier = list(pair.context_ids[len(prompt(p.question)):])
      assert list(pair.context_ids[:len(prompt(p.question))]) == prompt(p.question)
      assert earlier + list(pair.chosen_ids) == full[:len(earlier) + len(pair.chosen_ids)]
      assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == policy.newline_id
      a, op, b, c = parse_step(tok.decode(list(pair.chosen_ids[:-1])))
      a2, op2, b2, c2 = parse_step(tok.decode(list(pair.rejected_ids[:-1])))
      assert (a, op, b, c) == parse_step(p.solution_steps[i])
      assert (a2, op2, b2) == (a, op, b) and c2 - c in LINE_OFFSETS and c2 > 0


def test_step_verifier_stopped_and_rerun_equals_uninterrupted(tmp_path):
  policy = load_arithmetic_policy()
  kw = dict(bos_id=policy.bos_id, newline_id=policy.newline_id, eos_id=policy.eos_id)
  train = step_verifier_data(1, 16, "train", policy.tokenizer, **kw)
  test = step_verifier_data(0, 4, "test", policy.tokenizer, **kw)
  cfg = StepVerifierConfig(steps=4, batch_size=8, eval_every=2, checkpoint_every=1)
  args = (policy.graphdef, policy.params, train, test, cfg)
  common = dict(hidden_size=policy.model_config.hidden_size, pad_id=policy.pad_id)
  full_params, full = train_step_verifier(*args, **common, out_dir=tmp_path / "full")
  assert full["resumed_from"] is None and [h["step"] for h in full["history"]] == [0, 2, 4]
  # max_seconds ~ 0: the run stops (and checkpoints) after its first step, as a kill would.
  _, cut = train_step_verifier(*args, **common, out_dir=tmp_path / "cut", max_seconds=1e-9)
  assert cut["steps"] == 1
  params, resumed = train_step_verifier(*args, **common, out_dir=tmp_path / "cut")
  assert resumed["resumed_from"] == 1 and resumed["steps"] == 4
  for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The history is read back from metrics.jsonl: the evaluations before the stop are kept.
  at = {h["step"]: h for h in resumed["history"]}
  assert sorted(at) == [0, 1, 2, 4]
  for h in full["history"]:
    assert at[h["step"]] == h
  # The folder belongs to this run: other settings are refused.
  with pytest.raises(CheckpointConfigMismatchError, match="batch_size"):
    train_step_verifier(policy.graphdef, policy.params, train, test,
                        StepVerifierConfig(steps=4, batch_size=4, eval_every=2), **common,
                        out_dir=tmp_path / "cut")


def test_tiny_preset_end_to_end(tmp_path):
  results = verifier_probe.main(["preset=tiny", f"out={tmp_path}"])
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["samples"]["n_problems"] == 4
  base = results["samples"]["baselines"]
  for r in results["samples"]["scores"].values():
    # No selection beats a perfect verifier.
    assert r["best_of_n"] <= base["pass_at_n"] and r["weighted_majority"] <= base["pass_at_n"]
  assert base["random_sample"] <= base["pass_at_n"]
  assert set(results["samples"]["scores"]) == set(verifier_probe.SCORES)
  history = results["lines"]["history"]
  assert [h["step"] for h in history] == [0, 2, 4]
  # Before training the zero head says "wrong" to every line.
  assert abs(history[0]["accuracy"] - (1 - results["lines"]["test_correct_fraction"])) < 1e-9
  assert (tmp_path / "table.md").is_file() and (tmp_path / "line_accuracy.png").is_file()
  verifier = load_arithmetic_policy(tmp_path / "step_verifier")
  assert verifier.config["value_training"]["kind"] == "step_verifier"


def test_search_tasks_score_value_guided_methods_with_a_step_verifier(tmp_path):
  verifier_probe.main(["preset=tiny", f"out={tmp_path}"])
  folder = str(tmp_path / "step_verifier")
  task = arithmetic_task(ArithmeticTask(n_problems=4, batch=4, verifier=folder))
  plain = arithmetic_task(ArithmeticTask(n_problems=4, batch=4))
  assert isinstance(task.scorer, StepVerifier) and plain.scorer is None
  budget = SearchBudget(num_samples=2, max_depth=6)
  keys = ("accuracy", "tokens_decoded", "model_calls", "no_answer", "first_text")
  own = evaluate(task, "best_of_n", budget, seed=0)
  explicit = evaluate(plain, "best_of_n", budget, seed=0, scorer=task.scorer,
                      scorer_params=task.scorer_params)
  assert {k: own[k] for k in keys} == {k: explicit[k] for k in keys}
  # Greedy never reads a value: the same run with or without the verifier.
  g1, g2 = evaluate(task, "greedy", budget, seed=0), evaluate(plain, "greedy", budget, seed=0)
  assert {k: g1[k] for k in keys} == {k: g2[k] for k in keys}
  with pytest.raises(ValueError, match="not a step verifier"):
    arithmetic_task(ArithmeticTask(n_problems=4, batch=4,
                                   verifier=str(default_arithmetic_policy_dir())))
  # A verifier of another tokenizer would misread the policy's step tokens.
  other = tmp_path / "other_verifier"
  shutil.copytree(folder, other)
  train_sentencepiece("1 + 2 = 3\nThe answer is 3\nAnn has 4 apples.\n" * 50,
                      vocab_size=290, model_prefix=tmp_path / "other")
  shutil.copy(tmp_path / "other.model", other / "tokenizer.model")
  with pytest.raises(ValueError, match="tokenizer .* differs from the policy's"):
    arithmetic_task(ArithmeticTask(n_problems=4, batch=4, verifier=str(other)))
