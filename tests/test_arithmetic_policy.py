"""The committed arithmetic policy (qstar_jax/assets/arithmetic_policy) and its training code."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from experiments import train_arithmetic_policy as experiment
from qstar_jax.envs import arithmetic
from qstar_jax.models.arithmetic_policy import (
  ARITHMETIC_POLICY_FILES,
  default_arithmetic_policy_dir,
  load_arithmetic_policy,
)
from qstar_jax.models.errors import CheckpointError
from qstar_jax.models.llama import apply_hidden
from qstar_jax.models.loading import load_model_spec
from qstar_jax.training import arithmetic_policy as training


@pytest.fixture(scope="module")
def policy():
  return load_arithmetic_policy()


@pytest.fixture(scope="module")
def test_slice(policy):
  """The recorded first slice of the test split."""
  cfg = policy.config
  task = {**cfg["task"], "operations": tuple(cfg["task"]["operations"])}
  problems = arithmetic.generate_problems(cfg["test_seed"], cfg["slice_problems"], split="test",
                                          config=arithmetic.ArithmeticConfig(**task))
  return problems


# --------------------------------------------------------------------------------- artifacts


def test_committed_artifacts_load_and_are_small(policy):
  folder = default_arithmetic_policy_dir()
  sizes = {name: (folder / name).stat().st_size for name in ARITHMETIC_POLICY_FILES}
  assert sum(sizes.values()) <= 8 * 2**20, sizes
  cfg = policy.config
  assert policy.prompt_format == arithmetic.POLICY_PROMPT_FORMAT == cfg["prompt_format"]
  assert policy.step_stop_ids == (policy.newline_id, policy.eos_id)
  assert (policy.bos_id, policy.eos_id, policy.pad_id) == (1, 2, 3)
  assert policy.model_config.vocab_size == policy.tokenizer.vocab_size
  assert policy.model_config.eos_token_ids == (2,)
  assert "experiments.train_arithmetic_policy" in cfg["training_command"]
  assert cfg["num_test_problems"] >= 500
  for key in ("greedy_accuracy", "greedy_accuracy_first_slice", "seed", "value_head", "task"):
    assert key in cfg, key
  kernel = policy.value_params["kernel"][...]
  assert kernel.shape == (policy.model_config.hidden_size, 1)
  hidden = np.ones((3, policy.model_config.hidden_size), np.float32)
  expected = hidden @ np.asarray(kernel)[:, 0] + float(policy.value_params["bias"][...][0])
  np.testing.assert_allclose(np.asarray(policy.value(hidden)), expected, rtol=1e-5)


def test_missing_folder_is_named(tmp_path):
  with pytest.raises(CheckpointError, match=re.escape(str(tmp_path))):
    load_arithmetic_policy(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({}))
  with pytest.raises(CheckpointError, match="params.npz"):
    load_arithmetic_policy(tmp_path)


def test_tokenizer_step_invariants(policy):
  tok = policy.tokenizer
  problems = (arithmetic.generate_problems(1, 150)
              + arithmetic.generate_problems(1, 50, split="test"))
  texts = []
  for i, p in enumerate(problems):
    prompt = arithmetic.policy_prompt(p.question)
    texts.append(prompt + p.solution)
    texts.append(prompt + arithmetic.inject_wrong_step(p, seed=i).solution)
  texts.append("The answer is 0123456789\n\n\n12 * 5 = 60\n")
  for text in texts:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]
    # "\n" is always exactly the newline token, never merged with a neighbour.
    assert ids.count(policy.newline_id) == text.count("\n")
    assert all(piece == "\n" for piece in pieces if "\n" in piece)
    # Every digit is a token of its own.
    assert all(len(piece) == 1 for piece in pieces if re.search(r"\d", piece))
  assert tok.decode([policy.newline_id]) == "\n"


# --------------------------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def greedy_slice(policy, test_slice):
  dec = policy.config["decode"]
  return training.greedy_accuracy(
    policy.graphdef, policy.params, policy.tokenizer, test_slice, batch_size=dec["batch_size"],
    prompt_width=dec["prompt_width"], max_new_tokens=dec["max_new_tokens"],
    prompt_format=policy.prompt_format)


def test_greedy_accuracy_on_the_slice_matches_the_record(policy, greedy_slice):
  accuracy, rewards = greedy_slice
  assert len(rewards) == policy.config["slice_problems"] == 64
  assert accuracy == policy.config["greedy_accuracy_first_slice"]
  assert 0.0 < accuracy < 1.0


def test_value_head_ranks_correct_solutions_above_wrong_ones(policy, test_slice):
  """Held-out problems (test split), solutions sampled at temperature 1 by the policy."""
  dec = policy.config["decode"]
  problems = test_slice[:16]
  prompts = [policy.prompt_ids(arithmetic.policy_prompt(p.question))
             for p in problems for _ in range(4)]
  gens = training.generate_solutions(
    policy.graphdef, policy.params, jax.random.key(7), prompt_ids=prompts, greedy=False,
    max_new_tokens=dec["max_new_tokens"], batch_size=dec["batch_size"],
    prompt_width=dec["prompt_width"])
  texts = [policy.tokenizer.decode([t for t in g if t != policy.eos_id]) for g in gens]
  correct = np.array([arithmetic.arithmetic_reward(t, problems[i // 4])
                      for i, t in enumerate(texts)]) > 0
  assert 0 < correct.sum() < len(correct)
  width = dec["prompt_width"] + dec["max_new_tokens"]
  tokens = np.full((len(gens), width), policy.pad_id, np.int32)
  ends = []
  for i, (p, g) in enumerate(zip(prompts, gens, strict=True)):
    tokens[i, :len(p) + len(g)] = p + g
    ends.append(training.step_end_positions(len(p), g, newline_id=policy.newline_id,
                                            eos_id=policy.eos_id)[-1])
  hidden, _ = jax.jit(lambda params, t: apply_hidden(policy.graphdef, params, t))(
    policy.params, tokens)
  values = np.asarray(policy.value(np.asarray(hidden)[np.arange(len(gens)), ends]))
  assert values[correct].mean() > values[~correct].mean()


# --------------------------------------------------------------------------------- pieces


def test_step_end_positions_by_hand():
  nl, eos = 4, 2
  # prompt of 3 tokens; "1 + 2 = 3\n" as [9, 9, 4], answer line [8, 8, 2].
  ends = training.step_end_positions(3, [9, 9, nl, 8, 8, eos], newline_id=nl, eos_id=eos)
  assert ends == [2, 5, 8]
  # A cut-off solution ends at its last token too.
  assert training.step_end_positions(3, [9, nl, 8], newline_id=nl, eos_id=eos) == [2, 4, 5]
  assert training.step_end_positions(2, [], newline_id=nl, eos_id=eos) == [1]


def test_fit_linear_value_matches_least_squares():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 5))
  y = x @ np.array([0.5, -1.0, 0.0, 2.0, 0.1]) + 0.3 + 0.01 * rng.normal(size=200)
  kernel, bias = training.fit_linear_value(x, y, ridge=0.0)
  design = np.concatenate([x, np.ones((200, 1))], axis=1)
  reference = np.linalg.lstsq(design, y, rcond=None)[0]
  np.testing.assert_allclose(kernel[:, 0], reference[:5], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bias[0], reference[5], rtol=1e-5, atol=1e-6)
  shrunk, _ = training.fit_linear_value(x, y, ridge=10.0)
  assert np.linalg.norm(shrunk) < np.linalg.norm(kernel)


def test_binary_auc_by_pair_counting():
  # Pairs (pos, neg): (3,1) (3,2) (3,3) (0.5,1) (0.5,2) (0.5,3) -> 2 + 0.5 + 0 = 2.5 of 6.
  assert training.binary_auc(np.array([3.0, 0.5, 1.0, 2.0, 3.0]),
                    np.array([1, 1, 0, 0, 0])) == pytest.approx(2.5 / 6)
  assert np.isnan(training.binary_auc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_within_group_auc_ranks_inside_each_group_only():
  # Group 0 (an easy problem): its wrong sample scores highest -> AUC 0. Group 1 (a hard one):
  # its right sample scores lowest -> AUC 0. Group 2 holds one class and is skipped. Pooled,
  # group 0's three right samples outscore group 1's three wrong ones: 9 of 16 pairs.
  scores = np.array([0.8, 0.7, 0.75, 0.9, 0.1, 0.2, 0.3, 0.15, 0.5, 0.6])
  labels = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
  assert training.within_group_auc(scores, labels, groups) == 0.0
  assert training.binary_auc(scores[:8], labels[:8]) == pytest.approx(9 / 16)
  swapped = np.where(labels == 1, 1.0, 0.0)          # a perfect ranker within every group
  assert training.within_group_auc(swapped, labels, groups) == 1.0
  assert np.isnan(training.within_group_auc(scores, np.zeros(10), groups))


def test_majority_answer():
  assert training.majority_answer(["1 + 1 = 2\nThe answer is 2", "The answer is 3",
                          "The answer is 2", "2 + 2 = 4"]) == "2"
  assert training.majority_answer(["no answer here", "3 + 4 = 7"]) is None


def test_sft_weights_cover_the_solution_and_eos(policy):
  tok = policy.tokenizer
  prompt, solution = "Q: x\nA:\n", "1 + 2 = 3\nThe answer is 3"
  tokens, weights = training.encode_sft_examples(tok, [(prompt, solution, False)], seq_len=48)
  prompt_ids, solution_ids = tok.encode(prompt), tok.encode(solution)
  n = 1 + len(prompt_ids) + len(solution_ids) + 1
  assert tokens[0, :n].tolist() == [1, *prompt_ids, *solution_ids, 2]
  assert (tokens[0, n:] == 3).all()
  # Target t + 1 is scored: the targets are exactly the solution ids and EOS.
  assert tokens[0, 1:][weights[0] > 0].tolist() == [*solution_ids, 2]
  with pytest.raises(ValueError, match="seq_len=8"):
    training.encode_sft_examples(tok, [(prompt, solution, False)], seq_len=8)


def test_sft_corpus_corrupts_the_requested_share():
  problems = arithmetic.generate_problems(3, 40)
  examples = training.build_sft_texts(problems, corrupt_fraction=0.25, seed=3)
  assert sum(c for _, _, c in examples) == 10
  for p, (prompt, solution, corrupted) in zip(problems, examples, strict=True):
    assert prompt == arithmetic.policy_prompt(p.question)
    assert arithmetic.arithmetic_reward(solution, p) == (0.0 if corrupted else 1.0)
  with pytest.raises(ValueError, match="corrupt_fraction=1.5"):
    training.build_sft_texts(problems, corrupt_fraction=1.5, seed=3)


def test_length_grouped_batches_cover_their_rows_and_resume():
  rng = np.random.default_rng(0)
  lengths = rng.integers(20, 100, size=200)
  tokens = np.full((200, 104), 3, np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = 7 + i  # row i is recognisable by its token
  weights = (tokens[:, 1:] != 3).astype(np.float32)
  stream = training.length_grouped_batches(tokens, weights, batch_size=8, seed=1)
  batches = [next(stream) for _ in range(30)]  # 25 per epoch: into the second epoch
  seen = []
  for b in batches:
    width = b["tokens"].shape[1] - 1
    assert width % 16 == 0 or width == 103
    rows = b["tokens"][:, 0] - 7
    assert (lengths[rows] <= width + 1).all()  # nothing cut off
    assert b["weights"].shape == (8, width)
    seen += rows.tolist()
  assert len(set(seen[:200])) == 200  # the first epoch visits every row once
  resumed = next(training.length_grouped_batches(tokens, weights, batch_size=8, seed=1,
                                                 start_step=27))
  np.testing.assert_array_equal(resumed["tokens"], batches[27]["tokens"])


@pytest.mark.slow
def test_tiny_training_run_writes_loadable_artifacts(tmp_path):
  record = experiment.main(["preset=tiny", f"out={tmp_path}"])
  loaded = load_arithmetic_policy(tmp_path)
  assert loaded.config["greedy_accuracy"] == record["greedy_accuracy"]
  assert loaded.config["num_test_problems"] == 16
  assert loaded.model_config.num_layers == 1
  assert loaded.step_stop_ids == (loaded.newline_id, 2)
  assert "preset=tiny" in loaded.config["training_command"]


def test_load_model_spec_arithmetic(policy):
  model, tokenizer = load_model_spec("arithmetic")
  assert model.config == policy.model_config
  assert tokenizer.vocab_size == policy.tokenizer.vocab_size
  np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]),
                                np.asarray(policy.params["embed_tokens"]["embedding"][...]))
