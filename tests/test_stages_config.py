"""Stage files tied to the settings that made them (`training.results.check_stages_config`), the
policy fingerprint recorded beside them, and `models.save_trained_policy`."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from flax import nnx

from experiments import oreo, qvalue_stepdpo, value_search
from qstar_jax.models.arithmetic_policy import (
  arithmetic_policy_fingerprint,
  default_arithmetic_policy_dir,
  load_arithmetic_policy,
  save_trained_policy,
)
from qstar_jax.models.errors import CheckpointError
from qstar_jax.training import results as results_module
from qstar_jax.training.config import config_to_dict
from qstar_jax.training.results import (
  STAGES_CONFIG_FILE,
  StaleStagesError,
  check_stages_config,
  config_differences,
  evaluate_once,
  mean_spread,
)


def test_mean_spread_by_hand():
  assert mean_spread([0.30, 0.34, 0.32]) == "32.0 ± 2.0"   # mean 32, half of 34 - 30
  assert mean_spread([0.5]) == "50.0 ± 0.0"
  assert mean_spread([3.0, 5.0], scale=1.0) == "4.0 ± 1.0"
  with pytest.raises(ValueError, match="no values"):
    mean_spread([])


def test_evaluate_once_stores_each_key_once(tmp_path, monkeypatch):
  calls = []

  def fake_evaluate(task, method, budget, *, seed, **scorer):
    calls.append((task, method, budget, seed, scorer))
    return {"accuracy": 0.25, "tokens_decoded": 3.0, "first_text": "1 + 1 = 2"}

  monkeypatch.setattr(results_module, "evaluate", fake_evaluate)
  path = tmp_path / "evals.json"
  evals = {"old": {"accuracy": 1.0}}
  point = evaluate_once(evals, "seed0/x", path, "task", "beam", "budget", seed=3, scorer="s")
  assert point == {"accuracy": 0.25, "tokens_decoded": 3.0}          # first_text dropped
  assert calls == [("task", "beam", "budget", 3, {"scorer": "s"})]
  assert json.loads(path.read_text()) == {"old": {"accuracy": 1.0}, "seed0/x": point}
  again = evaluate_once(evals, "seed0/x", path, "task", "beam", "budget", seed=3)
  assert again == point and len(calls) == 1                          # kept, not redone


def test_config_differences_by_hand():
  stored = {"seed": 0, "data": {"n": 4, "t": 1.0, "gone": 1}, "same": [1, 2]}
  current = {"seed": 0, "data": {"n": 8, "t": 1.0, "new": "x"}, "same": [1, 2]}
  assert config_differences(stored, current) == [
    "data.gone: 1 -> <absent>", "data.n: 4 -> 8", 'data.new: <absent> -> "x"']
  assert config_differences(stored, stored) == []
  assert config_differences(1, 2) == ["<root>: 1 -> 2"]


def test_first_run_records_and_a_rerun_must_match(tmp_path):
  config = {"out": str(tmp_path), "seed": 0, "data": {"n": 4, "sizes": (1, 2)}, "mesh": ""}
  ignore = ("out", "mesh")
  recorded = check_stages_config(tmp_path, config, ignore=ignore)
  assert recorded == {"seed": 0, "data": {"n": 4, "sizes": [1, 2]}}
  assert json.loads((tmp_path / STAGES_CONFIG_FILE).read_text()) == recorded
  # The same settings (tuples read back as lists), and changes to ignored keys, pass.
  assert check_stages_config(tmp_path, {**config, "mesh": "fsdp=8", "out": "elsewhere"},
                             ignore=ignore) == recorded
  with pytest.raises(StaleStagesError, match=r"data\.n: 4 -> 8") as err:
    check_stages_config(tmp_path, {**config, "data": {"n": 8, "sizes": (1, 2)}}, ignore=ignore)
  assert str(tmp_path) in str(err.value) and "another out dir" in str(err.value)
  # The record is left as the stages were made.
  assert json.loads((tmp_path / STAGES_CONFIG_FILE).read_text()) == recorded
  with pytest.raises(ValueError, match=r"\['outt'\] are not keys"):
    check_stages_config(tmp_path, config, ignore=("outt",))


def _policy_copy(tmp_path):
  copy = tmp_path / "policy"
  shutil.copytree(default_arithmetic_policy_dir(), copy)
  return copy


def test_policy_fingerprint_follows_the_files(tmp_path):
  copy = _policy_copy(tmp_path)
  assert arithmetic_policy_fingerprint(copy) == arithmetic_policy_fingerprint()
  assert len(arithmetic_policy_fingerprint()) == 16
  with np.load(copy / "params.npz") as data:
    arrays = {k: data[k] for k in data.files}
  arrays["value.bias"] = arrays["value.bias"] + 1.0
  np.savez_compressed(copy / "params.npz", **arrays)
  assert arithmetic_policy_fingerprint(copy) != arithmetic_policy_fingerprint()
  (copy / "tokenizer.model").unlink()
  with pytest.raises(CheckpointError, match="lacks tokenizer.model"):
    arithmetic_policy_fingerprint(copy)


def test_save_trained_policy_round_trip(tmp_path):
  base = load_arithmetic_policy()
  head = {"kernel": np.full((base.model_config.hidden_size, 1), 0.5, np.float32),
          "bias": np.array([-1.0], np.float32)}
  folder = save_trained_policy(tmp_path / "model", base, base.params, head,
                               training={"method": "oreo", "beta": 0.03}, readme="# test\n")
  loaded = load_arithmetic_policy(folder)
  assert loaded.config["value_training"] == {"method": "oreo", "beta": 0.03}
  assert {k: v for k, v in loaded.config.items() if k != "value_training"} == base.config
  np.testing.assert_array_equal(loaded.value(np.ones((2, base.model_config.hidden_size))),
                                np.full(2, 0.5 * base.model_config.hidden_size - 1.0))
  for a, b in zip(nnx.to_flat_state(loaded.params), nnx.to_flat_state(base.params), strict=True):
    assert a[0] == b[0]
    np.testing.assert_array_equal(np.asarray(a[1][...]), np.asarray(b[1][...]))
  assert (folder / "tokenizer.model").read_bytes() == (base.path / "tokenizer.model").read_bytes()
  assert (folder / "README.md").read_text() == "# test\n"


def _stale_out(tmp_path, cfg, ignore, inputs):
  """An out dir recorded with seed/seeds changed, as a run with other settings left it."""
  other = dataclasses.replace(cfg, **({"seed": 1} if hasattr(cfg, "seed") else {}))
  recorded = {**config_to_dict(other), **inputs}
  if not hasattr(cfg, "seed"):
    recorded["max_depth"] = cfg.max_depth + 1
  check_stages_config(tmp_path, recorded, ignore=ignore)


def test_experiments_refuse_an_out_dir_made_with_other_settings(tmp_path):
  fingerprint = {"policy_fingerprint": arithmetic_policy_fingerprint()}
  cfg = value_search.ValueSearchConfig(out=str(tmp_path / "vs"))
  _stale_out(tmp_path / "vs", cfg, value_search.STAGES_IGNORE, fingerprint)
  with pytest.raises(StaleStagesError, match="seed: 1 -> 0"):
    value_search.run(cfg)
  cfg = oreo.OreoExperimentConfig(out=str(tmp_path / "oreo"))
  _stale_out(tmp_path / "oreo", cfg, ("out", "seeds", "mesh", "runtime"), fingerprint)
  with pytest.raises(StaleStagesError, match=f"max_depth: {cfg.max_depth + 1} -> "):
    oreo.run(cfg)
  cfg = qvalue_stepdpo.QValueConfig(out=str(tmp_path / "qv"))
  _stale_out(tmp_path / "qv", cfg, ("out", "seeds", "mesh", "runtime"),
             fingerprint)
  with pytest.raises(StaleStagesError, match=f"max_depth: {cfg.max_depth + 1} -> "):
    qvalue_stepdpo.run(cfg)
  # A retrained policy counts as a change too.
  cfg = value_search.ValueSearchConfig(out=str(tmp_path / "vs2"))
  check_stages_config(tmp_path / "vs2", {**config_to_dict(cfg), "policy_fingerprint": "0" * 16},
                      ignore=value_search.STAGES_IGNORE)
  with pytest.raises(StaleStagesError, match="policy_fingerprint"):
    value_search.run(cfg)
