"""Reasoning data: trajectory/pair records and JSONL, preference pairs from a hand-written MCTS
annotation, padding and masks checked by hand and through the losses' log-prob functions,
batch iterator determinism and resume."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.data.pipeline import grain_available
from qstar_jax.data.reasoning import (
  PreferencePair,
  Trajectory,
  pad_pairs,
  pad_trajectories,
  pair_batches,
  preference_pairs_from_annotations,
  read_reasoning_jsonl,
  split_steps,
  trajectory_batches,
  write_reasoning_jsonl,
)
from qstar_jax.envs import arithmetic
from qstar_jax.losses import step_log_probs, token_log_probs
from qstar_jax.models.arithmetic_policy import load_arithmetic_policy
from qstar_jax.training.arithmetic_policy import (
  BOS_ID,
  EOS_ID,
  generate_solutions,
  solution_text,
)
from qstar_jax.training.reasoning_data import (
  TrajectorySampling,
  cached_trajectories,
  sample_arithmetic_trajectories,
  sample_trajectories,
  trajectories_from_generations,
)

PAD = 3
PROMPT = [1, 30, 31]


def annotation() -> dict:
  """A record in the format of `mcts_annotations`: a two-step best trajectory (nodes 5, 8)."""
  def sib(action, node, ids, q, text=None):
    return {"action": action, "node": node, "ids": ids, "text": text, "q": q, "visits": 1,
            "log_prob": -1.0, "value": 0.0, "terminal": False}

  return {
    "index": 0, "problem": {"question": "q0"}, "chosen": 1, "overflow": False,
    "trajectory": [{"node": 5, "ids": [10, 11], "text": "s0"},
                   {"node": 8, "ids": [12, 2], "text": "s1"}],
    "ids": [10, 11, 12, 2], "text": "s0s1",
    "depths": [
      {"depth": 0, "parent": 0, "chosen": 1, "siblings": [
        sib(0, 4, [20], 0.2, "a"), sib(1, 5, [10, 11], 0.9, "b"),
        sib(2, 6, [21, 22, 23], -0.5, "c"), sib(3, 7, [24], None, "never visited")]},
      {"depth": 1, "parent": 5, "chosen": 0, "siblings": [
        sib(0, 8, [12, 2], 1.0), sib(1, 9, [13, 2], 0.0)]},
    ]}


def test_pairs_from_annotation_by_hand():
  out = preference_pairs_from_annotations([annotation()], prompt_ids=[PROMPT])
  assert (out.num_records, out.num_depths, len(out.pairs)) == (1, 2, 2)
  first, second = out.pairs
  assert first.context_ids == (1, 30, 31)
  assert (first.chosen_ids, first.rejected_ids) == ((10, 11), (21, 22, 23))
  assert (first.chosen_q, first.rejected_q) == (0.9, -0.5)   # q None (sibling 3) skipped
  assert (first.chosen_text, first.rejected_text, first.depth) == ("b", "c", 0)
  assert second.context_ids == (1, 30, 31, 10, 11)           # prompt + the trajectory's step 0
  assert (second.chosen_ids, second.rejected_ids, second.depth) == ((12, 2), (13, 2), 1)
  # prompt ids may come from the record itself
  record = dict(annotation(), prompt_ids=PROMPT)
  assert preference_pairs_from_annotations([record]).pairs == out.pairs


def test_pairs_ties_identical_gap_and_single_q():
  record = annotation()
  sibs0 = record["depths"][0]["siblings"]
  # equal highest Q: the first in sibling order is chosen
  sibs0[0]["q"] = 0.9
  out = preference_pairs_from_annotations([record], prompt_ids=[PROMPT])
  assert out.pairs[0].chosen_ids == (20,)
  # min_q_gap: depth 0 gap 1.4 kept, depth 1 gap 1.0 dropped
  out = preference_pairs_from_annotations([record], prompt_ids=[PROMPT], min_q_gap=1.2)
  assert [p.depth for p in out.pairs] == [0] and out.dropped_small_gap == 1
  # identical ids at depth 1, a tie at depth 0
  tie = copy.deepcopy(record)
  for s in tie["depths"][0]["siblings"]:
    s["q"] = None if s["q"] is None else 0.5
  tie["depths"][1]["siblings"][1]["ids"] = [12, 2]
  with pytest.raises(ValueError, match=r"1 annotation records and 2 depths.*1 ties, "
                                       r"1 identical"):
    preference_pairs_from_annotations([tie], prompt_ids=[PROMPT])
  # fewer than two siblings with a Q-value: the depth is skipped
  few = copy.deepcopy(record)
  for s in few["depths"][0]["siblings"][1:]:
    s["q"] = None
  out = preference_pairs_from_annotations([few], prompt_ids=[PROMPT])
  assert out.skipped_few_q == 1 and [p.depth for p in out.pairs] == [1]


def test_pairs_bad_input():
  with pytest.raises(ValueError, match=r"no preference pair from 0 annotation records and 0"):
    preference_pairs_from_annotations([], prompt_ids=[])
  with pytest.raises(ValueError, match="no 'prompt_ids'"):
    preference_pairs_from_annotations([annotation()])
  broken = annotation()
  broken["depths"][1]["parent"] = 4
  with pytest.raises(ValueError, match=r"record 0 depth 1: parent 4 is not the trajectory's"):
    preference_pairs_from_annotations([broken], prompt_ids=[PROMPT])
  no_ids = annotation()
  del no_ids["depths"][0]["siblings"][1]["ids"]
  with pytest.raises(ValueError, match=r"record 0 depth 0 sibling record has no 'ids'"):
    preference_pairs_from_annotations([no_ids], prompt_ids=[PROMPT])
  with pytest.raises(ValueError, match="min_q_gap"):
    preference_pairs_from_annotations([annotation()], prompt_ids=[PROMPT], min_q_gap=-1)


def test_jsonl_round_trip_and_bad_line(tmp_path):
  trajs = [Trajectory(prompt_ids=PROMPT, steps=[[10, 9], [11, 2]], reward=1.0,
                      problem={"question": "q", "answer": 3}, prompt_text="Q:",
                      step_texts=["a\n", "b"]),
           Trajectory(prompt_ids=[1], steps=[[7]], reward=0.0)]
  path = write_reasoning_jsonl(tmp_path / "t.jsonl", trajs)
  assert read_reasoning_jsonl(path) == trajs
  assert json.loads(path.read_text().splitlines()[0])["step_texts"] == ["a\n", "b"]
  pairs = preference_pairs_from_annotations([annotation()], prompt_ids=[PROMPT]).pairs
  assert tuple(read_reasoning_jsonl(write_reasoning_jsonl(tmp_path / "p.jsonl", pairs), PreferencePair)) == pairs

  lines = path.read_text().splitlines()
  (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: bad Trajectory line"):
    read_reasoning_jsonl(tmp_path / "bad.jsonl")
  (tmp_path / "bad2.jsonl").write_text("\n" + lines[0] + "\n" + json.dumps({"steps": []}) + "\n")
  with pytest.raises(ValueError, match=r"bad2.jsonl:3: .*no 'prompt_ids'"):
    read_reasoning_jsonl(tmp_path / "bad2.jsonl")
  with pytest.raises(ValueError, match=r"steps\[1\] is empty"):
    Trajectory(prompt_ids=[1], steps=[[4], []], reward=0.0)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_pad_pairs_masks_by_hand():
  pair = PreferencePair(context_ids=PROMPT, chosen_ids=[10, 11], rejected_ids=[21, 22, 23],
                        chosen_q=0.9, rejected_q=-0.5)
  batch = pad_pairs([pair], pad_id=PAD, width=8)
  np.testing.assert_array_equal(batch.chosen_tokens, [[1, 30, 31, 10, 11, 3, 3, 3]])
  np.testing.assert_array_equal(batch.chosen_mask, [[0, 0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch.rejected_tokens, [[1, 30, 31, 21, 22, 23, 3, 3]])
  np.testing.assert_array_equal(batch.rejected_mask, [[0, 0, 1, 1, 1, 0, 0]])
  np.testing.assert_allclose(batch.chosen_q, [0.9])

  # The mask picks exactly the step's tokens: logits at position t score token t + 1.
  logits = np.random.default_rng(0).normal(size=(1, 7, 32)).astype(np.float32)
  got = token_log_probs(jnp.asarray(logits), jnp.asarray(batch.rejected_tokens[:, 1:]),
                        jnp.asarray(batch.rejected_mask)).sum()
  lsm = _log_softmax(logits[0].astype(np.float64))
  want = lsm[2, 21] + lsm[3, 22] + lsm[4, 23]
  np.testing.assert_allclose(float(got), want, rtol=1e-5)

  # width from the bucket; truncation drops context from the left, keeps the step
  assert pad_pairs([pair], pad_id=PAD, bucket=4).chosen_tokens.shape == (1, 8)
  with pytest.raises(ValueError, match=r"pair 0 \(rejected\) has 6 tokens > width=5"):
    pad_pairs([pair], pad_id=PAD, width=5)
  cut = pad_pairs([pair], pad_id=PAD, width=5, truncate=True)
  np.testing.assert_array_equal(cut.rejected_tokens, [[30, 31, 21, 22, 23]])
  np.testing.assert_array_equal(cut.rejected_mask, [[0, 1, 1, 1]])
  np.testing.assert_array_equal(cut.chosen_tokens, [[1, 30, 31, 10, 11]])
  with pytest.raises(ValueError, match="width=3"):
    pad_pairs([pair], pad_id=PAD, width=3, truncate=True)


def test_pad_trajectories_step_index_by_hand():
  traj = Trajectory(prompt_ids=[1, 30], steps=[[10, 9], [11, 2]], reward=1.0)
  batch = pad_trajectories([traj, Trajectory(prompt_ids=[1], steps=[[7]], reward=0.0)],
                           pad_id=PAD, width=8)
  np.testing.assert_array_equal(batch.tokens, [[1, 30, 10, 9, 11, 2, 3, 3],
                                               [1, 7, 3, 3, 3, 3, 3, 3]])
  np.testing.assert_array_equal(batch.step_index, [[-1, 0, 0, 1, 1, -1, -1],
                                                   [0, -1, -1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(batch.mask, batch.step_index >= 0)
  np.testing.assert_array_equal(batch.rewards, [1.0, 0.0])
  np.testing.assert_array_equal(batch.num_steps, [2, 1])

  logits = np.random.default_rng(1).normal(size=(2, 7, 32)).astype(np.float32)
  lp = token_log_probs(jnp.asarray(logits), jnp.asarray(batch.tokens[:, 1:]))
  sums, has = step_log_probs(lp, jnp.asarray(batch.step_index), num_steps=2)
  lsm = _log_softmax(logits.astype(np.float64))
  want = [[lsm[0, 1, 10] + lsm[0, 2, 9], lsm[0, 3, 11] + lsm[0, 4, 2]], [lsm[1, 0, 7], 0.0]]
  np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(has, [[True, True], [True, False]])

  with pytest.raises(ValueError, match=r"trajectory 0 has 6 tokens > width=5"):
    pad_trajectories([traj], pad_id=PAD, width=5)
  cut = pad_trajectories([traj], pad_id=PAD, width=5, truncate=True)
  np.testing.assert_array_equal(cut.tokens, [[1, 30, 10, 9, 11]])
  np.testing.assert_array_equal(cut.step_index, [[-1, 0, 0, 1]])
  cut = pad_trajectories([traj], pad_id=PAD, width=4, truncate=True)
  np.testing.assert_array_equal(cut.step_index, [[-1, 0, 0]])
  assert cut.num_steps.tolist() == [1]
  with pytest.raises(ValueError, match="width=2"):
    pad_trajectories([traj], pad_id=PAD, width=2, truncate=True)


def test_split_steps():
  assert split_steps([5, 6, 9, 7, 9, 8, 2], stop_ids=[9, 2]) == [[5, 6, 9], [7, 9], [8, 2]]
  assert split_steps([5, 9, 7], stop_ids=[9, 2]) == [[5, 9], [7]]
  assert split_steps([], stop_ids=[9]) == []


def _assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    for f in x.__dataclass_fields__:
      np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


@pytest.mark.parametrize("backend", ["python", "grain"])
def test_iterators_deterministic_and_resumable(backend):
  if backend == "grain" and not grain_available():
    pytest.skip("grain not installed")
  trajs = [Trajectory(prompt_ids=[1] * (1 + i % 3), steps=[[10 + i], [2]] * (1 + i % 2),
                      reward=float(i)) for i in range(7)]
  run = lambda **kw: list(trajectory_batches(trajs, batch_size=3, seed=4, pad_id=PAD,  # noqa: E731
                                             bucket=4, backend=backend, **kw))
  full = run(num_steps=5)
  _assert_same(full, run(num_steps=5))
  _assert_same(full[2:], run(start_step=2, num_steps=3))
  assert {b.tokens.shape for b in full} == {(3, 8)}          # one width for every batch
  # every example once per epoch (7 examples: the first 7 stream positions)
  first_epoch = np.concatenate([b.rewards for b in full])[:7]
  assert sorted(first_epoch.tolist()) == [float(i) for i in range(7)]
  assert not np.array_equal(first_epoch, np.arange(7))       # shuffled (seed 4)

  pairs = preference_pairs_from_annotations([annotation()] * 3, prompt_ids=[PROMPT] * 3).pairs
  once = list(pair_batches(pairs, batch_size=2, seed=0, pad_id=PAD, num_steps=4,
                           backend=backend))
  _assert_same(once[1:], list(pair_batches(pairs, batch_size=2, seed=0, pad_id=PAD,
                                           start_step=1, num_steps=3, backend=backend)))
  assert {b.chosen_tokens.shape for b in once} == {(2, 16)}


class CharTokenizer:
  """Characters as ids ``ord(c) + 10`` (clear of BOS/EOS/PAD = 1/2/3)."""

  def encode(self, text):
    return [ord(c) + 10 for c in text]

  def decode(self, ids):
    return "".join(chr(i - 10) for i in ids)


def test_trajectories_from_generations_split_and_score():
  problem = arithmetic.generate_problem(0, 0)
  tok = CharTokenizer()
  newline = tok.encode("\n")[0]
  right = tok.encode(problem.solution) + [EOS_ID]
  wrong = tok.encode("1 + 1 = 2\nI do not know.")          # cut off: no EOS
  trajs = trajectories_from_generations(
    [[BOS_ID, 40], [BOS_ID, 40]], [right, wrong], [problem, problem], tokenizer=tok,
    stop_ids=[newline, EOS_ID], sample_keys=[(0, 0), (0, 1)])
  lines = problem.solution.split("\n")
  assert [t.reward for t in trajs] == [1.0, 0.0]
  assert trajs[0].step_texts == tuple([line + "\n" for line in lines[:-1]] + [lines[-1]])
  assert trajs[0].steps[-1][-1] == EOS_ID and trajs[0].ids == (BOS_ID, 40, *right)
  assert trajs[1].step_texts == ("1 + 1 = 2\n", "I do not know.")
  assert trajs[1].problem["sample_index"] == 1
  assert trajs[1].problem["problem"]["answer"] == problem.answer
  json.dumps(trajs[0].to_json())                                  # metadata serialisable
  with pytest.raises(ValueError, match="expected one of each per sample"):
    trajectories_from_generations([[1]], [right, wrong], [problem] * 2, tokenizer=tok,
                                  stop_ids=[newline])


def test_sample_trajectories_with_the_committed_policy():  # ~4 s: one decode compilation
  policy = load_arithmetic_policy()
  problems = arithmetic.generate_problems(0, 2, split="test")
  rng = jax.random.key(3)
  kw = dict(max_new_tokens=48, batch_size=4, prompt_width=64)
  trajs = sample_trajectories(policy.graphdef, policy.params, rng, problems=problems,
                              tokenizer=policy.tokenizer, num_samples=2,
                              stop_ids=policy.step_stop_ids, **kw)
  prompts = [policy.prompt_ids(arithmetic.policy_prompt(p.question))
             for p in problems for _ in range(2)]
  gens = generate_solutions(policy.graphdef, policy.params, rng, prompt_ids=prompts,
                            greedy=False, **kw)
  assert [t.ids for t in trajs] == [tuple(p + g) for p, g in zip(prompts, gens, strict=True)]
  want = [arithmetic.arithmetic_reward(solution_text(policy.tokenizer, g), problems[i // 2])
          for i, g in enumerate(gens)]
  assert [t.reward for t in trajs] == want
  assert [(t.problem["problem_index"], t.problem["sample_index"]) for t in trajs] == [
    (0, 0), (0, 1), (1, 0), (1, 1)]
  assert all(s[-1] in policy.step_stop_ids for t in trajs for s in t.steps[:-1])


def test_sample_arithmetic_trajectories_and_their_cache(tmp_path):
  """The experiments' sampling stage: train problems of ``problem_seed + seed`` sampled with
  key ``seed`` (the same records as `sample_trajectories` called by hand), written once and
  read back (``make`` not called again)."""
  policy = load_arithmetic_policy()
  cfg = TrajectorySampling(num_problems=2, num_samples=2, problem_seed=5, max_new_tokens=48,
                           batch_size=4, prompt_width=64)
  by_hand = sample_trajectories(
    policy.graphdef, policy.params, jax.random.key(1),
    problems=arithmetic.generate_problems(6, 2, split="train"), tokenizer=policy.tokenizer,
    num_samples=2, stop_ids=policy.step_stop_ids, max_new_tokens=48, batch_size=4,
    prompt_width=64)
  calls = []

  def make():
    calls.append(1)
    return sample_arithmetic_trajectories(policy, 1, cfg)

  path = tmp_path / "seed1" / "samples.jsonl"
  first = cached_trajectories(path, make)
  again = cached_trajectories(path, make)
  assert len(calls) == 1 and path.exists() and not path.with_suffix(".tmp").exists()
  assert [t.ids for t in first] == [t.ids for t in by_hand] == [t.ids for t in again]
  assert [t.reward for t in again] == [t.reward for t in by_hand]
