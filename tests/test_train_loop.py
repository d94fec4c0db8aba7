"""Generic train loop: matches a hand-written optax loop, accumulation, eval, resume after a crash."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qstar_jax.data.pipeline import iterate_batches
from qstar_jax.training.checkpoint import CheckpointConfigMismatchError
from qstar_jax.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from qstar_jax.training.train_loop import TrainLoopConfig, train

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 3)).astype(np.float32)
W_TRUE = np.array([[1.0], [-2.0], [0.5]], np.float32)
Y = (X @ W_TRUE + 0.1 * RNG.normal(size=(64, 1))).astype(np.float32)
DATA = [{"x": X[i], "y": Y[i]} for i in range(64)]
OPT = OptimizerConfig(lr=0.2, warmup_steps=3, total_steps=24, weight_decay=0.01, grad_clip_norm=1.0)


def init_params():
  return {"w": jnp.zeros((3, 1)), "b": jnp.zeros((1,))}


def loss_fn(params, batch, rng_key):
  del rng_key
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2), {"abs_err": jnp.mean(jnp.abs(pred - batch["y"]))}


def batches(start):
  return iterate_batches(DATA, batch_size=8, seed=3, start_step=start)


def eval_batches():
  return iterate_batches(DATA, batch_size=16, seed=0, num_steps=4, shuffle=False)


def run(out, *, num_steps=24, accum=1, batches_fn=batches, run_config=None, params=None):
  cfg = TrainLoopConfig(num_steps=num_steps, accum_steps=accum, eval_every=8, checkpoint_every=5,
                        log_every=4, seed=0)
  return train(loss_fn, init_params() if params is None else params, optimizer=make_optimizer(OPT), train_batches=batches_fn,
               config=cfg, out_dir=out, run_config=run_config or {"opt": "x", "n": num_steps},
               eval_batches=eval_batches, lr_fn=lr_schedule(OPT))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  return run(tmp_path_factory.mktemp("ref"))


def test_matches_hand_written_optax_loop(reference_run):
  tx = make_optimizer(OPT)
  params = init_params()
  state = tx.init(params)
  it = batches(0)
  for _ in range(24):
    b = next(it)
    grads = jax.grad(lambda p, b=b: loss_fn(p, b, None)[0])(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for k in params:
    np.testing.assert_allclose(reference_run.params[k], params[k], rtol=1e-6, atol=1e-7)
  # the fit improved: eval loss at the end well under the loss of the zero model
  zero_loss = float(np.mean(Y ** 2))
  assert [s for s, _ in reference_run.eval_history] == [8, 16, 24]
  assert reference_run.eval_history[-1][1]["loss"] < 0.2 * zero_loss


def test_lr_schedule_values():
  sched = lr_schedule(OPT)
  assert float(sched(0)) == pytest.approx(0.2 / 3)
  assert float(sched(2)) == pytest.approx(0.2)
  assert float(sched(3)) == pytest.approx(0.2)              # start of the cosine
  assert float(sched(24)) == pytest.approx(0.02)            # floor = min_lr_ratio * lr
  mid = 3 + 21 / 2
  assert float(sched(mid)) == pytest.approx(0.02 + 0.18 * 0.5)


def test_gradient_accumulation_equals_full_batch(tmp_path, reference_run):
  p0 = {"w": jnp.ones((3, 1)), "b": jnp.zeros((1,))}
  run(tmp_path / "from_ones", accum=4, params=p0, run_config={"p0": "ones"})
  np.testing.assert_array_equal(p0["w"], np.ones((3, 1)))  # the caller's arrays stay valid
  acc = run(tmp_path / "acc", accum=4)
  for k in acc.params:
    np.testing.assert_allclose(acc.params[k], reference_run.params[k], rtol=2e-5, atol=1e-6)


def test_resume_after_crash_is_identical(tmp_path, reference_run):
  class Crash(Exception):
    pass

  def crashing(start):
    for i, b in enumerate(batches(start)):
      if start + i == 13:
        raise Crash()
      yield b

  with pytest.raises(Crash):
    run(tmp_path, batches_fn=crashing)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [5, 10]
  resumed = run(tmp_path)
  assert resumed.resumed_from == 10
  for k in resumed.params:  # bitwise: same computations from the same restored state
    np.testing.assert_array_equal(resumed.params[k], reference_run.params[k])
  assert resumed.eval_history[-1] == reference_run.eval_history[-1]
  recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in recs if "train/loss" in r]
  assert train_steps == list(range(1, 25))  # records of the crashed tail were dropped
  # the same folder with another config is refused
  with pytest.raises(CheckpointConfigMismatchError, match="n: checkpoint has 24, current config has 30"):
    run(tmp_path, num_steps=30)
