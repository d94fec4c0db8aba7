"""Every training loop on a device mesh (8 simulated CPU devices): lm_pretrain, the puzzle DQN
and a value-learning run (DPO) with ``mesh=fsdp=8`` end with the loss and the parameters of the
same run without a mesh; the experiments take ``mesh=`` / ``runtime.*`` from the command line and
refuse a mesh that does not fit (naming the sizes); each process reads only its rows of a batch;
only process 0 writes results.

References: the unsharded run of the same loop (same data, same keys). A sharded step computes
the same function; only the order of the floating-point reductions differs (partial sums per
device, then a collective), so fp32 losses and parameters agree to rounding: rtol 1e-4 / atol
2e-5 over a few optimizer steps (the rounding of one step is ~1e-7 relative; Adam divides each
gradient by its own running scale, which carries that rounding into the update almost as is).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_value_learning import PAD, VOCAB, tiny_config

from qstar_jax.data.pipeline import batch_at, process_rows
from qstar_jax.data.reasoning import PreferencePair, Trajectory, trajectory_batches
from qstar_jax.distributed import MeshShapeError, RuntimeConfig, make_mesh
from qstar_jax.models.llama import init_llama
from qstar_jax.training import results as results_lib
from qstar_jax.training import run_setup
from qstar_jax.training.checkpoint import CheckpointManager, abstract_like
from qstar_jax.training.config import parse_config
from qstar_jax.training.optim import OptimizerConfig, make_optimizer
from qstar_jax.training.puzzle import NetSizes, PuzzleTrainConfig, load_puzzle_net, train_puzzle
from qstar_jax.training.value_runs import ValueRunConfig, run_preference

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 2e-5


def _assert_trees_close(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ lm_pretrain


def _lm_cfg(out):
  from experiments.lm_pretrain import PRESETS_DIR, LMPretrainConfig

  return parse_config(LMPretrainConfig, [
    "preset=tiny", f"out={out}", "data.backend=files", "loop.num_steps=3", "loop.eval_every=0",
    "loop.checkpoint_every=0", "loop.log_every=1", "data.max_eval_batches=1",
    "data.max_train_chars=20000", "data.max_val_chars=4000", "optim.warmup_steps=1"],
    presets_dir=PRESETS_DIR)


def _lm_final_params(cfg):
  from experiments.lm_pretrain import make_model

  out = pathlib.Path(cfg.out)
  _, params = nnx.split(make_model(cfg, cfg.data.seq_len + 1))
  target = {"params": params,
            "opt_state": make_optimizer(cfg.optim, total_steps=cfg.loop.num_steps).init(params),
            "step": jnp.zeros((), jnp.int32)}
  run_config = json.loads((out / "checkpoints" / "config.json").read_text())
  manager = CheckpointManager(out / "checkpoints", config=run_config)
  try:
    return manager.restore(cfg.loop.num_steps, target=abstract_like(target))["params"]
  finally:
    manager.close()


def _train_losses(out):
  lines = (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "train/loss" in r]


def test_lm_pretrain_fsdp8_matches_one_device(tmp_path):
  from experiments import lm_pretrain

  ref_cfg = _lm_cfg(tmp_path / "ref")
  ref = lm_pretrain.run(ref_cfg)
  # The same tokenizer file (the run reuses it): only the mesh differs.
  (tmp_path / "fsdp").mkdir()
  shutil.copy(tmp_path / "ref" / "tokenizer.model", tmp_path / "fsdp" / "tokenizer.model")
  cfg = _lm_cfg(tmp_path / "fsdp")
  sharded = lm_pretrain.run(cfg, mesh=make_mesh("fsdp=8"))
  assert sharded["mesh"] == {"axes": {"data": 1, "fsdp": 8, "tensor": 1}, "devices": 8,
                             "platform": "cpu"}
  assert ref["mesh"] is None
  steps, losses = zip(*_train_losses(tmp_path / "fsdp"), strict=True)
  ref_steps, ref_losses = zip(*_train_losses(tmp_path / "ref"), strict=True)
  assert steps == ref_steps == (1, 2, 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(sharded["val_loss"], ref["val_loss"], rtol=RTOL, atol=ATOL)
  _assert_trees_close(_lm_final_params(cfg), _lm_final_params(ref_cfg))


# --------------------------------------------------------------------------------- puzzle DQN


def _puzzle_cfg(out, **kw):
  base = dict(domain="puzzle8", head="q", net=NetSizes(64, 32, 1), batch_size=64,
              max_scramble_depth=4, steps=4, learning_rate=3e-3, lr_decay_rate=0.5,
              target_check_every=2, target_update_every=2, checkpoint_every=4, out=str(out))
  base.update(kw)
  return PuzzleTrainConfig(**base)


def test_puzzle_dqn_fsdp8_matches_one_device_and_resumes_on_another_mesh(tmp_path, capsys):
  quiet = lambda *_: None  # noqa: E731
  ref = train_puzzle(_puzzle_cfg(tmp_path / "ref"), log=quiet)
  # The target network (the loop's extra) is refreshed twice: sharded like the params.
  sharded = train_puzzle(_puzzle_cfg(tmp_path / "fsdp", mesh="fsdp=8"),
                         mesh=make_mesh("fsdp=8"), log=quiet)
  assert sharded["target_updates"] == ref["target_updates"] == 2
  np.testing.assert_allclose(sharded["final_loss"], ref["final_loss"], rtol=RTOL, atol=ATOL)
  ref_params = nnx.state(load_puzzle_net(tmp_path / "ref" / "model"))
  _assert_trees_close(nnx.state(load_puzzle_net(tmp_path / "fsdp" / "model")), ref_params)
  # Resumed through the experiment's command line with another mesh: no config mismatch.
  from experiments.train_puzzle import main

  summary = main(["domain=puzzle8", "head=q", "net.hidden_1=64", "net.hidden_2=32",
                  "net.num_blocks=1", "batch_size=64", "max_scramble_depth=4", "steps=6",
                  "learning_rate=3e-3", "lr_decay_rate=0.5", "target_check_every=2",
                  "target_update_every=2", "checkpoint_every=4", f"out={tmp_path / 'fsdp'}",
                  "mesh=data=8"])
  assert summary["steps"] == 6 and "resumed from step 4" in capsys.readouterr().out


def test_batch_that_does_not_divide_names_the_key_and_the_mesh_before_any_work(tmp_path):
  from experiments import lm_pretrain, quest_scaling
  from qstar_jax.training.quest_runs import QuestScalingConfig, TrainSettings

  mesh = make_mesh("fsdp=8")
  with pytest.raises(MeshShapeError, match=r"batch_size=60 .* data x fsdp = 8"):
    train_puzzle(_puzzle_cfg(tmp_path / "p", batch_size=60), mesh=mesh)
  cfg = parse_config(lm_pretrain.LMPretrainConfig, [f"out={tmp_path / 'lm'}",
                                                    "data.eval_batch_size=12"])
  with pytest.raises(MeshShapeError, match=r"data.eval_batch_size=12 .*data=1,fsdp=8,tensor=1"):
    lm_pretrain.run(cfg, mesh=mesh)
  with pytest.raises(MeshShapeError, match=r"train.batch_size=4 .* multiple of 8"):
    quest_scaling.run_experiment(QuestScalingConfig(out=str(tmp_path / "qs"),
                                                    train=TrainSettings(batch_size=4)), mesh=mesh)
  assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------- value learning


def test_dpo_run_fsdp8_matches_one_device(tmp_path):
  graphdef, policy = nnx.split(init_llama(tiny_config(), seed=0))
  rng = np.random.default_rng(1)
  reference = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(x.dtype), policy)

  def ids(n):
    return [int(t) for t in rng.integers(3, VOCAB, n)]

  pairs = [PreferencePair(context_ids=ids(c), chosen_ids=ids(w), rejected_ids=ids(r),
                          chosen_q=1.0, rejected_q=0.0)
           for c, w, r in ((3, 2, 4), (5, 3, 1), (2, 4, 3), (4, 1, 2), (3, 3, 3), (2, 2, 5))]
  cfg = ValueRunConfig(num_steps=3, batch_size=8, seed=0, checkpoint_every=0, log_every=1,
                       optim=OptimizerConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0))
  common = dict(reference_params=reference, pad_id=PAD, beta=0.5, cfg=cfg)
  ref = run_preference(graphdef, policy, pairs, out_dir=tmp_path / "ref", **common)
  mesh = make_mesh("fsdp=8")
  sharded = run_preference(graphdef, policy, pairs, out_dir=tmp_path / "fsdp", mesh=mesh,
                           **common)
  # The policy and the frozen reference both live split over the 8 devices.
  kernel = sharded.params["layers"][0]["mlp"]["up_proj"]["kernel"].value
  assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec[0] == "fsdp"
  ref_kernel = sharded.extra["layers"][0]["mlp"]["up_proj"]["kernel"].value
  assert ref_kernel.sharding.spec == kernel.sharding.spec
  np.testing.assert_allclose(sharded.last_train_loss, ref.last_train_loss, rtol=RTOL, atol=ATOL)
  _assert_trees_close(sharded.params, ref.params)
  with pytest.raises(MeshShapeError, match=r"ValueRunConfig.batch_size=4 .* data x fsdp = 8"):
    run_preference(graphdef, policy, pairs, out_dir=tmp_path / "bad", mesh=mesh,
                   **{**common, "cfg": ValueRunConfig(num_steps=1, batch_size=4)})


# ------------------------------------------------------------------- per-host rows, writers


def test_process_rows_are_the_shard_of_the_global_batch():
  rng = np.random.default_rng(0)
  trajectories = [Trajectory(prompt_ids=[3, 4], steps=[[int(t) for t in rng.integers(3, 40, 3)]],
                             reward=float(i % 2)) for i in range(10)]
  batch = next(trajectory_batches(trajectories, batch_size=8, seed=0, pad_id=PAD))
  parts = [process_rows(batch, (i, 4)) for i in range(4)]
  assert all(p.tokens.shape == (2, batch.tokens.shape[1]) for p in parts)
  for field in ("tokens", "mask", "rewards", "num_steps", "step_index"):
    np.testing.assert_array_equal(np.concatenate([getattr(p, field) for p in parts]),
                                  getattr(batch, field))
  assert process_rows(batch, None) is batch
  # The same rows the data pipeline's shard= reads from a source.
  source = np.arange(40).reshape(20, 2)
  whole = batch_at(source, 3, batch_size=8, seed=1)
  np.testing.assert_array_equal(process_rows(whole, (1, 2)),
                                batch_at(source, 3, batch_size=8, seed=1, shard=(1, 2)))
  with pytest.raises(ValueError, match="batch_size=8 divisible by count"):
    process_rows(whole, (0, 3))


def test_only_process_0_writes_results(tmp_path, monkeypatch):
  monkeypatch.setattr(results_lib, "is_main_process", lambda: False)
  assert results_lib.write_json(tmp_path / "a.json", {"x": float("nan")}) == {"x": None}
  results_lib.write_results(tmp_path / "r", results={"x": 1}, table_md="| x |")
  fig, _ = results_lib.new_figure()
  results_lib.save_plot(fig, tmp_path / "p.png")
  assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- the mesh of a run


def test_run_mesh_checks_batch_sizes_and_the_default_fits_them():
  mesh = run_setup.run_mesh("data=2,fsdp=2,tensor=2", batch_sizes={"data.batch_size": 4})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(MeshShapeError, match=r"data.batch_size=6 .* data x fsdp = 4 .*data=2"):
    run_setup.run_mesh("data=2,fsdp=2,tensor=2", batch_sizes={"data.batch_size": 6})
  with pytest.raises(MeshShapeError, match=r"3 devices but 8"):
    run_setup.run_mesh("data=3")
  assert run_setup.run_mesh("", batch_sizes={"a": 16, "b": 8}).devices.size == 8
  logs = []
  small = run_setup.run_mesh("", batch_sizes={"a": 16, "b": 4}, log=logs.append)
  assert dict(small.shape) == {"data": 4, "fsdp": 1, "tensor": 1} and "data=4" in logs[0]
  assert run_setup.mesh_ignore_keys("experiment") == ("experiment.mesh", "experiment.runtime")


EXPERIMENT_CONFIGS = [
  ("experiments.lm_pretrain", "LMPretrainConfig"),
  ("experiments.quest_scaling", "QuestScalingConfig"),
  ("experiments.train_value", "TrainValueConfig"),
  ("experiments.oreo", "OreoExperimentConfig"),
  ("experiments.qvalue_stepdpo", "QValueConfig"),
  ("experiments.value_search", "ValueSearchConfig"),
  ("experiments.train_arithmetic_policy", "ArithmeticPolicyConfig"),
  ("experiments.train_puzzle", "PuzzleTrainConfig"),
]


@pytest.mark.parametrize("module,config", EXPERIMENT_CONFIGS)
def test_every_experiment_config_takes_mesh_and_runtime(module, config):
  import importlib

  cls = getattr(importlib.import_module(module), config)
  cfg = parse_config(cls, ["mesh=data=2,tensor=4", "runtime.compilation_cache=/tmp/jit",
                           "runtime.multi_host=off"])
  assert cfg.mesh == "data=2,tensor=4"
  assert cfg.runtime == RuntimeConfig(compilation_cache="/tmp/jit", multi_host="off")


def test_experiment_cli_refuses_a_mesh_that_does_not_fit(tmp_path):
  # The 8 simulated devices of conftest reach the child through XLA_FLAGS.
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.train_puzzle", "domain=puzzle8", "mesh=data=3",
     f"out={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "MeshShapeError" in proc.stderr and "3 devices but 8" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------- two processes


_WORKER = '''
import os, sys
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
from qstar_jax.distributed import make_mesh
from qstar_jax.training.results import write_json
import test_sharded_loops as t
result = t.sft_run(out + "/run", make_mesh("fsdp=8"))  # params gathered whole on each process
np.save(f"{out}/params{pid}.npy", t.flat(result.params))
write_json(out + "/result.json", {"loss": result.last_train_loss, "written_by": pid})
'''


def sft_run(out, mesh):
  """SFT of the tiny policy on 12 trajectories, 3 steps of 8 (the two-process test's run)."""
  from qstar_jax.training.value_runs import run_sft

  graphdef, policy = nnx.split(init_llama(tiny_config(), seed=0))
  rng = np.random.default_rng(1)

  def ids(n):
    return [int(t) for t in rng.integers(3, VOCAB, n)]

  trajectories = [Trajectory(prompt_ids=ids(3), steps=[ids(2), ids(3)], reward=float(i % 2))
                  for i in range(12)]
  cfg = ValueRunConfig(num_steps=3, batch_size=8, seed=0, checkpoint_every=2, log_every=1,
                       optim=OptimizerConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0))
  return run_sft(graphdef, policy, trajectories, pad_id=PAD, cfg=cfg, out_dir=out, mesh=mesh)


def flat(params):
  return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(params)])


@pytest.mark.slow
def test_two_processes_each_read_their_rows_and_match_one_device(tmp_path):
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  (tmp_path / "worker.py").write_text(_WORKER)
  env = {**__import__("os").environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
  procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(pid), port,
                             str(tmp_path / "mh")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  ref = sft_run(tmp_path / "ref", None)
  written = json.loads((tmp_path / "mh" / "result.json").read_text())
  assert written["written_by"] == 0  # process 1 computed the same and wrote nothing
  np.testing.assert_allclose(written["loss"], ref.last_train_loss, rtol=RTOL, atol=ATOL)
  ours = [np.load(tmp_path / "mh" / f"params{pid}.npy") for pid in (0, 1)]
  np.testing.assert_array_equal(ours[0], ours[1])
  np.testing.assert_allclose(ours[0], flat(ref.params), rtol=RTOL, atol=ATOL)
