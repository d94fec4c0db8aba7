"""experiments.oreo_value_fit (and oreo_oracle's docstring examples): the ranking metrics
against hand-computed AUCs, the value loss against a plain forward, presets and bad seeds."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import oreo_oracle, oreo_value_fit
from qstar_jax.data.reasoning import TrajectoryBatch
from qstar_jax.models.arithmetic_policy import load_arithmetic_policy
from qstar_jax.models.llama import apply_hidden
from qstar_jax.training.config import parse_config


@pytest.mark.parametrize("module", [oreo_value_fit, oreo_oracle])
def test_docstring_examples(module):
  failures, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert tried > 0 and failures == 0


def test_ranking_metrics_by_hand():
  # Problem 0: correct 0.9 over wrong 0.1, 0.3 (AUC 1); problem 1: correct 0.2 under wrong 0.8
  # (AUC 0); problem 2 has no wrong sample (left out of the within-problem mean).
  scores = np.array([0.9, 0.1, 0.3, 0.2, 0.8, 0.5])
  correct = np.array([1, 0, 0, 1, 0, 1])
  groups = np.array([0, 0, 0, 1, 1, 2])
  m = oreo_value_fit.ranking_metrics(scores, correct, groups)
  assert m["within_problem_auc"] == pytest.approx(0.5)
  # Pooled: correct (0.9, 0.2, 0.5) against wrong (0.1, 0.3, 0.8): 3 + 1 + 2 of 9 pairs won.
  assert m["pooled_auc"] == pytest.approx(6 / 9)
  assert m["best_of_n"] == pytest.approx(2 / 3)  # problems 0 and 2 pick a correct sample


def test_value_loss_is_the_mean_square_error_to_the_outcome():
  policy = load_arithmetic_policy()
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 400, size=(2, 9)).astype(np.int32)
  step_index = np.array([[-1, -1, 0, 0, 1, 1, -1, -1], [-1, 0, 0, 0, 1, 2, 2, 2]], np.int32)
  batch = TrajectoryBatch(tokens=tokens, step_index=step_index, mask=step_index >= 0,
                          rewards=np.array([1.0, 0.0], np.float32),
                          num_steps=np.array([2, 3], np.int32))
  head = {"kernel": jnp.asarray(rng.normal(size=(128, 1)) * 0.1, jnp.float32),
          "bias": jnp.asarray([0.2], jnp.float32)}
  params = {"trunk": policy.params, "head": head}
  loss, _ = oreo_value_fit.value_loss_fn(policy.graphdef)(params, batch, jax.random.key(0))
  hidden, _ = apply_hidden(policy.graphdef, policy.params, jnp.asarray(tokens[:, :-1]))
  v = np.asarray(hidden @ head["kernel"])[..., 0] + 0.2
  per_row = [np.mean((v[b][step_index[b] >= 0] - r) ** 2) for b, r in enumerate((1.0, 0.0))]
  assert float(loss) == pytest.approx(np.mean(per_row), rel=1e-5)


@pytest.mark.parametrize("preset", ["cpu", "tiny"])
def test_presets_load(preset):
  cfg = parse_config(oreo_value_fit.OreoValueFitConfig, [f"preset={preset}"],
                     presets_dir=oreo_value_fit.PRESETS)
  assert cfg.heldout_seed not in cfg.train_seeds


def test_held_out_seed_among_the_train_seeds_is_refused(tmp_path):
  cfg = oreo_value_fit.OreoValueFitConfig(out=str(tmp_path), train_seeds=(0, 1), heldout_seed=1)
  with pytest.raises(ValueError, match="heldout_seed = 1"):
    oreo_value_fit.run(cfg)
