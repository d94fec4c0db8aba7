"""experiments.value_search end to end (slow) and training.annotation's checks."""

import json

import numpy as np
import pytest

from experiments import value_search
from qstar_jax.data.reasoning import preference_pairs_from_annotations
from qstar_jax.envs.arithmetic import arithmetic_reward, generate_problems, policy_prompt
from qstar_jax.models.arithmetic_policy import load_arithmetic_policy
from qstar_jax.search.steps.methods import prompt_batches
from qstar_jax.search.steps.step_tree import StepSpec
from qstar_jax.training.annotation import AnnotationConfig, annotate_with_mcts


def test_prompt_batches_fill_the_last_batch_with_its_last_prompt():
  batches = list(prompt_batches([[1, 5], [1, 6, 7], [1, 8]], 2))
  assert [(start, real) for start, real, _, _ in batches] == [(0, 2), (2, 1)]
  _, _, tokens, lengths = batches[1]
  assert tokens.shape == batches[0][2].shape and lengths.tolist() == [2, 2]
  assert tokens[0, :2].tolist() == tokens[1, :2].tolist() == [1, 8]


def test_annotation_refuses_bad_input():
  policy = load_arithmetic_policy()
  spec = StepSpec(stop_ids=(policy.newline_id,), eos_ids=(policy.eos_id,), pad_id=policy.pad_id)
  common = dict(tokenizer=policy.tokenizer, spec=spec, max_depth=4)
  with pytest.raises(ValueError, match="no prompts"):
    annotate_with_mcts(policy.graphdef, policy.params, prompts=[], answers=[], **common)
  with pytest.raises(ValueError, match="1 answers for 2 prompts"):
    annotate_with_mcts(policy.graphdef, policy.params, prompts=[[1, 5], [1, 6]], answers=["3"],
                       **common)
  with pytest.raises(ValueError, match="seven"):
    annotate_with_mcts(policy.graphdef, policy.params, prompts=[[1, 5]], answers=["seven"],
                       **common)
  with pytest.raises(ValueError, match=r"values \['mystery'\]: expected a subset"):
    value_search.main(["values=[outcome,mystery]", "out=/tmp/unused"])


@pytest.mark.slow
def test_annotation_q_values_are_outcome_estimates():
  """Terminal siblings' Q equals the verifier's grade of their solution; every Q in [0, 1]."""
  policy = load_arithmetic_policy()
  spec = StepSpec(stop_ids=(policy.newline_id,), eos_ids=(policy.eos_id,), max_step_tokens=24,
                  pad_id=policy.pad_id)
  problems = generate_problems(3, 3, split="train", start=20000)
  prompts = [policy.prompt_ids(policy_prompt(p.question)) for p in problems]
  ann = annotate_with_mcts(policy.graphdef, policy.params, tokenizer=policy.tokenizer, spec=spec,
                           prompts=prompts, answers=[str(p.answer) for p in problems],
                           max_depth=6, cfg=AnnotationConfig(num_actions=3, num_simulations=8,
                                                             batch=2), seed=1)
  assert [r["index"] for r in ann.records] == [0, 1, 2]
  checked = 0
  for record, problem in zip(ann.records, problems, strict=True):
    assert record["prompt_ids"] == prompts[record["index"]]
    for depth in record["depths"]:
      for sib in depth["siblings"]:
        assert sib["q"] is None or 0.0 <= sib["q"] <= 1.0
        if sib["terminal"] and sib["q"] is not None:  # Q of a terminal edge = its reward
          prefix = "".join(s["text"] for s in record["trajectory"][:depth["depth"]])
          assert sib["q"] == arithmetic_reward(prefix + sib["text"], problem)
          checked += 1
  assert checked > 0
  preference_pairs_from_annotations(ann.records)  # pairs exist (raises when none)


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path):
  argv = ["preset=tiny", f"out={tmp_path}", "values=[step_dpo,prm,oreo]", "methods=[best_of_n]"]
  results = value_search.main(argv)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["values"]) == {"step_dpo", "prm", "oreo"}
  for value in ("step_dpo", "prm", "oreo"):
    entry = saved["values"][value]["best_of_n"]
    assert entry["n_problems"] == 8 and 0.0 <= entry["accuracy"] <= 1.0
    assert (tmp_path / "values" / value / "model" / "params.npz").is_file()
  assert set(saved["baselines"]) == {"greedy", "majority"}
  assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000
  assert "| step_dpo | best_of_n |" in (tmp_path / "table.md").read_text()
  # A rerun reuses every stage (no training, no evaluation) and gives the same results.
  again = value_search.main(argv)
  assert again["values"] == results["values"] and again["training"] == results["training"]
  trained = np.load(tmp_path / "values" / "step_dpo" / "model" / "params.npz")
  ref = np.load(load_arithmetic_policy().path / "params.npz")
  assert any(not np.array_equal(trained[n], ref[n]) for n in trained.files
             if n.startswith("policy."))
