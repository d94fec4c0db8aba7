"""Resumable value-learning runs: each method lowers its own loss (measured by the plain loss
function of `value_learning` / `sft_loss_fn` on the whole data set before and after), a run
stopped after one step and rerun ends with exactly the parameters of an uninterrupted run, a
changed setting is refused by the checkpoint folder, and bad inputs raise before any compile."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_value_learning import PAD, VOCAB, tiny_config

from qstar_jax.data.reasoning import PreferencePair, Trajectory, pad_pairs, pad_trajectories
from qstar_jax.models.llama import init_llama
from qstar_jax.training.arithmetic_policy import sft_loss_fn
from qstar_jax.training.checkpoint import CheckpointConfigMismatchError
from qstar_jax.training.optim import OptimizerConfig
from qstar_jax.training.value_learning import (
  dpo_loss_fn,
  implicit_prm_loss_fn,
  oreo_loss_fn,
  oreo_params,
)
from qstar_jax.training.value_runs import (
  ValueRunConfig,
  data_fingerprint,
  response_pairs,
  run_oreo,
  run_preference,
  run_prm,
  run_sft,
)

KEY = jax.random.key(0)
CFG = ValueRunConfig(num_steps=5, batch_size=4, seed=0, checkpoint_every=0, log_every=5,
                     optim=OptimizerConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0))


@pytest.fixture(scope="module")
def tiny_models():
  """(graphdef, policy params, reference params = the policy's moved by noise)."""
  graphdef, policy = nnx.split(init_llama(tiny_config(), seed=0))
  rng = np.random.default_rng(1)
  noise = lambda x: x + 0.1 * rng.normal(size=x.shape).astype(x.dtype)  # noqa: E731
  return graphdef, policy, jax.tree.map(noise, policy)


def _ids(rng, n):
  return [int(t) for t in rng.integers(3, VOCAB, n)]


@pytest.fixture(scope="module")
def pairs():
  rng = np.random.default_rng(0)
  return [PreferencePair(context_ids=_ids(rng, c), chosen_ids=_ids(rng, w),
                         rejected_ids=_ids(rng, r), chosen_q=1.0, rejected_q=0.0)
          for c, w, r in ((3, 2, 4), (5, 3, 1), (2, 4, 3), (4, 1, 2), (3, 3, 3), (2, 2, 5))]


@pytest.fixture(scope="module")
def trajectories():
  rng = np.random.default_rng(1)
  return [Trajectory(prompt_ids=_ids(rng, p), steps=[_ids(rng, n) for n in steps], reward=r)
          for p, steps, r in ((3, (2, 3), 1.0), (2, (1, 2, 2), 0.0), (4, (3,), 1.0),
                              (2, (2, 1, 1), 0.0), (3, (4, 2), 1.0), (2, (3, 3), 0.0))]


def _value_head(graphdef, policy):
  del graphdef
  d = policy["embed_tokens"]["embedding"].value.shape[1]
  return {"kernel": jnp.zeros((d, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}


def _loss(loss_fn, params, batch, reference=None):
  args = (params, batch, KEY) if reference is None else (params, batch, KEY, reference)
  return float(jax.jit(loss_fn)(*args)[0])


# ------------------------------------------------------------------------------ lowers its loss


def test_run_preference_lowers_the_dpo_loss(tiny_models, pairs, tmp_path):
  graphdef, policy, reference = tiny_models
  loss_fn = dpo_loss_fn(graphdef, beta=0.5)
  batch = pad_pairs(pairs, pad_id=PAD)
  before = _loss(loss_fn, policy, batch, reference)
  result = run_preference(graphdef, policy, pairs, reference_params=reference, pad_id=PAD,
                          beta=0.5, cfg=CFG, out_dir=tmp_path)
  assert result.step == CFG.num_steps and result.resumed_from is None
  assert _loss(loss_fn, result.params, batch, reference) < before - 0.05


def test_run_sft_lowers_the_solution_nll(tiny_models, trajectories, tmp_path):
  graphdef, policy, _ = tiny_models
  batch = pad_trajectories(trajectories, pad_id=PAD)
  plain = {"tokens": batch.tokens, "weights": batch.mask.astype(np.float32)}
  before = _loss(sft_loss_fn(graphdef), policy, plain)
  result = run_sft(graphdef, policy, trajectories, pad_id=PAD, cfg=CFG, out_dir=tmp_path)
  assert _loss(sft_loss_fn(graphdef), result.params, plain) < before - 0.1


@pytest.fixture(scope="module")
def oreo_run(tiny_models, trajectories, tmp_path_factory):
  """(initial params, kwargs, result) of an uninterrupted OREO run checkpointing every 2 steps."""
  graphdef, policy, reference = tiny_models
  params = oreo_params(policy, _value_head(graphdef, policy))
  kwargs = dict(reference_params=reference, pad_id=PAD, log=lambda m: None,
                cfg=dataclasses.replace(CFG, checkpoint_every=2))
  result = run_oreo(graphdef, params, trajectories, out_dir=tmp_path_factory.mktemp("oreo"),
                    **kwargs)
  return params, kwargs, result


def test_run_oreo_lowers_the_oreo_loss(tiny_models, trajectories, oreo_run):
  graphdef, _, reference = tiny_models
  params, _, result = oreo_run
  loss_fn = oreo_loss_fn(graphdef, beta=0.03, alpha=0.01)
  batch = pad_trajectories(trajectories, pad_id=PAD)
  assert set(result.params) == {"policy", "value"} and result.step == CFG.num_steps
  before = _loss(loss_fn, params, batch, reference)
  assert _loss(loss_fn, result.params, batch, reference) < before - 0.02


def test_run_prm_lowers_the_prm_loss(tiny_models, trajectories, tmp_path):
  graphdef, policy, reference = tiny_models
  loss_fn = implicit_prm_loss_fn(graphdef, beta=0.5)
  batch = pad_trajectories(trajectories, pad_id=PAD)
  before = _loss(loss_fn, reference, batch, reference)
  assert before == pytest.approx(np.log(2.0), abs=1e-6)  # pi == pi_ref: z = 0
  result = run_prm(graphdef, reference, trajectories, reference_params=reference, pad_id=PAD,
                   beta=0.5, cfg=CFG, out_dir=tmp_path)
  assert _loss(loss_fn, result.params, batch, reference) < before - 0.02


# ------------------------------------------------------------------------------------- resume


def test_stopped_and_rerun_equals_uninterrupted(tiny_models, trajectories, oreo_run, tmp_path):
  graphdef = tiny_models[0]
  params, kwargs, full = oreo_run
  # max_seconds ~ 0: the run stops (and checkpoints) after its first step.
  stopped = run_oreo(graphdef, params, trajectories, out_dir=tmp_path / "cut", max_seconds=1e-9,
                     **kwargs)
  assert stopped.stopped_early and stopped.step == 1
  resumed = run_oreo(graphdef, params, trajectories, out_dir=tmp_path / "cut", **kwargs)
  assert resumed.resumed_from == 1 and resumed.step == full.step == CFG.num_steps
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The folder belongs to this run: other settings or other data are refused.
  with pytest.raises(CheckpointConfigMismatchError, match="beta"):
    run_oreo(graphdef, params, trajectories, out_dir=tmp_path / "cut", beta=0.1, **kwargs)
  with pytest.raises(CheckpointConfigMismatchError, match="fingerprint"):
    run_oreo(graphdef, params, trajectories[:-1], out_dir=tmp_path / "cut", **kwargs)


def test_data_fingerprint_depends_on_ids_and_rewards(trajectories):
  changed = Trajectory(prompt_ids=trajectories[0].prompt_ids, steps=trajectories[0].steps,
                       reward=0.5)
  assert data_fingerprint(trajectories) == data_fingerprint(list(trajectories))
  assert data_fingerprint(trajectories) != data_fingerprint([changed, *trajectories[1:]])
  assert data_fingerprint(trajectories) != data_fingerprint(trajectories[::-1])


def test_response_pairs_match_correct_and_incorrect_samples_of_one_problem():
  a, b = (1, 9), (1, 8)  # two prompts
  rewards = {a: (1.0, 0.0, 0.0, 1.0, 1.0), b: (0.0, 0.0)}
  trajs = [Trajectory(prompt_ids=p, steps=[[10 + i, 4], [2]], reward=r)
           for p in (a, b) for i, r in enumerate(rewards[p])]
  pairs = response_pairs(trajs)
  # prompt a: correct samples 0, 3, 4 against incorrect 1, 2 in order; prompt b: one outcome.
  assert [(p.context_ids, p.chosen_ids, p.rejected_ids, p.record_index) for p in pairs] == [
    (a, (10, 4, 2), (11, 4, 2), 0), (a, (13, 4, 2), (12, 4, 2), 3)]
  assert [(p.chosen_q, p.rejected_q) for p in pairs] == [(1.0, 0.0)] * 2
  assert len(response_pairs(trajs, max_pairs_per_problem=1)) == 1
  with pytest.raises(ValueError, match="max_pairs_per_problem = 0"):
    response_pairs(trajs, max_pairs_per_problem=0)


# ---------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_before_training(tiny_models, pairs, trajectories, tmp_path):
  graphdef, policy, reference = tiny_models
  params = oreo_params(policy, _value_head(graphdef, policy))
  common = dict(pad_id=PAD, cfg=CFG, out_dir=tmp_path)
  with pytest.raises(ValueError, match="no preference pairs"):
    run_preference(graphdef, policy, [], reference_params=reference, beta=0.1, **common)
  same = PreferencePair(context_ids=[5, 6], chosen_ids=[7, 8], rejected_ids=[7, 8],
                        chosen_q=1.0, rejected_q=0.0)
  with pytest.raises(ValueError, match=r"pairs\[2\] has identical chosen and rejected"):
    run_preference(graphdef, policy, [*pairs[:2], same], reference_params=reference, beta=0.1,
                   **common)
  for run in (run_sft, run_prm):
    extra = {} if run is run_sft else {"reference_params": reference, "beta": 0.1}
    with pytest.raises(ValueError, match="no trajectories"):
      run(graphdef, policy, [], **extra, **common)
  with pytest.raises(ValueError, match="run_oreo: no trajectories"):
    run_oreo(graphdef, params, [], reference_params=reference, **common)
  with pytest.raises(ValueError, match="'policy' and 'value'"):
    run_oreo(graphdef, policy, trajectories, reference_params=reference, **common)
  bad_label = Trajectory(prompt_ids=[4], steps=[[5]], reward=2.0)
  with pytest.raises(ValueError, match=r"trajectories\[1\] has reward 2.0"):
    run_prm(graphdef, policy, [trajectories[0], bad_label], reference_params=reference,
            beta=0.1, **common)
  with pytest.raises(ValueError, match="accum_steps"):
    run_sft(graphdef, policy, trajectories, pad_id=PAD, out_dir=tmp_path,
            cfg=ValueRunConfig(batch_size=4, accum_steps=3))
  _, other = nnx.split(init_llama(tiny_config(VOCAB + 8), seed=0))
  with pytest.raises(ValueError, match=f"vocabulary of {VOCAB + 8} tokens, the policy {VOCAB}"):
    run_preference(graphdef, policy, pairs, reference_params=other, beta=0.1, **common)
  with pytest.raises(ValueError, match=f"vocabulary of {VOCAB + 8} tokens"):
    run_oreo(graphdef, params, trajectories, reference_params=other, **common)
  assert not (tmp_path / "checkpoints").exists()  # nothing was trained


@pytest.mark.slow
def test_run_oreo_with_one_outcome_runs_and_says_so(tiny_models, trajectories, tmp_path):
  graphdef, policy, reference = tiny_models
  params = oreo_params(policy, _value_head(graphdef, policy))
  correct = [t for t in trajectories if t.reward == 1.0]
  messages = []
  result = run_oreo(graphdef, params, correct, reference_params=reference, pad_id=PAD,
                    cfg=ValueRunConfig(num_steps=1, batch_size=2), out_dir=tmp_path,
                    log=messages.append)
  assert result.step == 1
  assert any("all 3 trajectories have reward 1.0" in m for m in messages)
