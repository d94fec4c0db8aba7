"""Orbax checkpoints: run manager (resume, abstract restore, config check) and model save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qstar_jax.models import Llama, get_config
from qstar_jax.models.errors import CheckpointError
from qstar_jax.training.checkpoint import (
  CheckpointConfigMismatchError,
  CheckpointManager,
  load_model,
  save_model,
)


def _state(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "params": {"w": jax.random.normal(k1, (3, 5)), "b": jax.random.normal(k2, (5,)).astype(jnp.bfloat16)},
    "step": jnp.asarray(seed, jnp.int32),
  }


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_manager_round_trip_resume_latest_and_abstract_target(tmp_path):
  config = {"model": {"layers": 2}, "lr": 0.1}
  with CheckpointManager(tmp_path / "ck", config=config, max_to_keep=2) as mgr:
    assert mgr.latest_step() is None
    for step in (10, 20, 30):
      mgr.save(step, _state(step))
    mgr.wait()
    assert mgr.all_steps() == [20, 30]  # max_to_keep=2 dropped step 10
  # A new manager over the same folder (a rerun after a crash) resumes at the latest step.
  with CheckpointManager(tmp_path / "ck", config=config) as mgr:
    assert mgr.latest_step() == 30
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
    restored = mgr.restore(target=abstract)
    _assert_tree_equal(restored, _state(30))
    assert isinstance(restored["params"]["w"], jax.Array)
    _assert_tree_equal(mgr.restore(20, target=_state(0)), _state(20))  # concrete target
    with pytest.raises(FileNotFoundError, match="step 10.*available: \\[20, 30\\]"):
      mgr.restore(10, target=abstract)
  meta = (tmp_path / "ck" / "meta.json").read_text()
  assert '"qstar_jax_version": "' in meta


def test_manager_refuses_other_config_naming_keys(tmp_path):
  CheckpointManager(tmp_path, config={"model": {"layers": 2}, "lr": 0.1, "out": "a"}).close()
  with pytest.raises(CheckpointConfigMismatchError) as info:
    CheckpointManager(tmp_path, config={"model": {"layers": 4}, "lr": 0.1, "out": "a", "new": 1})
  msg = str(info.value)
  assert "model.layers: checkpoint has 2, current config has 4" in msg
  assert "new: checkpoint has '<missing>', current config has 1" in msg
  assert "lr" not in msg
  assert isinstance(info.value, CheckpointError)
  # Keys declared irrelevant may differ.
  CheckpointManager(tmp_path, config={"model": {"layers": 2}, "lr": 0.1, "out": "b"},
                    ignore_keys=("out",)).close()


@pytest.fixture(scope="module")
def tiny_model():
  return Llama(get_config("tiny", num_layers=1), rngs=nnx.Rngs(3))


def test_save_load_model_round_trip_with_opt_state(tmp_path, tiny_model):
  params = nnx.state(tiny_model, nnx.Param)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
  save_model(tmp_path / "m", tiny_model, opt_state=opt_state)

  loaded = load_model(tmp_path / "m")  # config and class read from the checkpoint
  assert loaded.config == tiny_model.config
  _assert_tree_equal(nnx.state(loaded, nnx.Param), params)
  tokens = jnp.array([[1, 2, 3, 4]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(tiny_model(tokens)))

  abstract_opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), opt_state)
  loaded2, opt2 = load_model(tmp_path / "m", config=tiny_model.config, opt_state_target=abstract_opt)
  _assert_tree_equal(opt2, opt_state)
  assert type(opt2) is type(opt_state)
  _assert_tree_equal(nnx.state(loaded2, nnx.Param), params)


def test_load_model_refuses_config_mismatch(tmp_path, tiny_model):
  save_model(tmp_path / "m", tiny_model)
  with pytest.raises(CheckpointConfigMismatchError, match="hidden_size: checkpoint has 64, current config has 32"):
    load_model(tmp_path / "m", config=get_config("tiny", num_layers=1, hidden_size=32))
  with pytest.raises(FileExistsError):
    save_model(tmp_path / "m", tiny_model)
  with pytest.raises(ValueError, match="no optimizer state"):
    load_model(tmp_path / "m", opt_state_target={"x": jnp.zeros(2)})
