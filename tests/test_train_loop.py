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
from qstar_jax.training.train_loop import NonFiniteLossError, TrainLoopConfig, train

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


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                           reference_run):
  def poisoned(start):  # the 9th step's batch holds a NaN target
    for i, b in enumerate(batches(start)):
      yield {"x": b["x"], "y": np.full_like(b["y"], np.nan)} if start + i == 8 else b

  # log_every=4, checkpoint_every=5: the NaN (record step 9) is not yet logged when step 10's
  # checkpoint falls due; that checkpoint must not be written with the NaN parameters.
  with pytest.raises(NonFiniteLossError, match=r"at step 9; .*last good checkpoint is step 5") as e:
    run(tmp_path, batches_fn=poisoned)
  assert (e.value.step, e.value.last_good_checkpoint) == (9, 5) and np.isnan(e.value.loss)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [5]
  recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs if "train/loss" in r] == list(range(1, 10))
  resumed = run(tmp_path)  # clean data again: resumes from the good checkpoint, ends as the reference
  assert resumed.resumed_from == 5
  for k in resumed.params:
    np.testing.assert_array_equal(resumed.params[k], reference_run.params[k])


def test_on_step_sees_every_step_and_its_state_is_used(tmp_path):
  seen = []

  def reset_at_6(step, state, metrics):
    seen.append((step, int(state.step), sorted(metrics)))
    if step == 6:  # the loop must continue from the returned params
      return state.replace(params=jax.tree.map(jnp.zeros_like, state.params))
    return None

  cfg = TrainLoopConfig(num_steps=10, eval_every=0, checkpoint_every=0, log_every=4, seed=0)
  result = train(loss_fn, init_params(), optimizer=make_optimizer(OPT), train_batches=batches,
                 config=cfg, out_dir=tmp_path, run_config={"hook": 1}, on_step=reset_at_6)
  assert [s for s, _, _ in seen] == list(range(1, 11))
  assert all(s == state_step for s, state_step, _ in seen)
  assert seen[0][2] == ["abs_err", "grad_norm", "loss"]
  tx = make_optimizer(OPT)
  params, it = init_params(), batches(0)
  opt_state = tx.init(params)
  for step in range(1, 11):
    b = next(it)
    grads = jax.grad(lambda p, b=b: loss_fn(p, b, None)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if step == 6:
      params = jax.tree.map(jnp.zeros_like, params)
  for k in params:
    np.testing.assert_allclose(result.params[k], params[k], rtol=1e-6, atol=1e-7)


def test_chunked_steps_match_single_steps(tmp_path, reference_run):
  seen = []
  cfg = TrainLoopConfig(num_steps=24, eval_every=8, checkpoint_every=5, log_every=4, seed=0)
  result = train(loss_fn, init_params(), optimizer=make_optimizer(OPT), train_batches=batches,
                 config=cfg, out_dir=tmp_path, run_config={"chunk": 4}, eval_batches=eval_batches,
                 lr_fn=lr_schedule(OPT), steps_per_call=4,
                 on_step=lambda step, state, metrics: seen.append(step))
  assert seen == [4, 8, 12, 16, 20, 24]
  assert [s for s, _ in result.eval_history] == [8, 16, 24]
  for k in result.params:
    np.testing.assert_allclose(result.params[k], reference_run.params[k], rtol=1e-6, atol=1e-7)
  recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs if "train/loss" in r] == [4, 8, 12, 16, 20, 24]
  # a checkpoint at the first call past each multiple of checkpoint_every, and at the end
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [20, 24]  # max_to_keep=2 of 8, 12, 16, 20, 24


def _anchored_loss(params, batch, rng_key, extra):
  """The regression loss plus a pull toward a target copy of ``w`` held in ``extra``."""
  loss, aux = loss_fn(params, batch, rng_key)
  return loss + 0.5 * jnp.sum((params["w"] - extra["w_target"]) ** 2), aux


def _refresh_every_6(step, state, metrics):
  metrics["refreshed"] = float(step % 6 == 0)
  if step % 6:
    return None
  return state.replace(extra={"w_target": state.params["w"], "count": state.extra["count"] + 1})


def _run_anchored(out, *, num_steps, max_seconds=0.0):
  cfg = TrainLoopConfig(num_steps=num_steps, eval_every=0, checkpoint_every=6, log_every=3, seed=0)
  extra = {"w_target": jnp.zeros((3, 1)), "count": jnp.zeros((), jnp.int32)}
  return train(_anchored_loss, init_params(), optimizer=make_optimizer(OPT), train_batches=batches,
               config=cfg, out_dir=out, run_config={"anchored": 1}, extra=extra,
               on_step=_refresh_every_6, steps_per_call=3, max_seconds=max_seconds,
               log=lambda *_: None)


def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path):
  full = _run_anchored(tmp_path / "full", num_steps=12)
  assert full.step == 12 and int(full.extra["count"]) == 2 and not full.stopped_early
  # Stopped after the first call of 3 steps (its checkpoint is saved), then the same command.
  part = _run_anchored(tmp_path / "part", num_steps=12, max_seconds=1e-9)
  assert part.stopped_early and part.step == 3
  resumed = _run_anchored(tmp_path / "part", num_steps=12)
  assert resumed.resumed_from == 3 and resumed.step == 12
  for k in full.params:  # bitwise: the same computations from the same restored state
    np.testing.assert_array_equal(resumed.params[k], full.params[k])
  np.testing.assert_array_equal(resumed.extra["w_target"], full.extra["w_target"])
  assert int(resumed.extra["count"]) == 2
  recs = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["train/refreshed"]) for r in recs] == [(3, 0.0), (6, 1.0), (9, 0.0), (12, 1.0)]
  # num_steps that is not a multiple of steps_per_call: the last call runs past it
  assert _run_anchored(tmp_path / "odd", num_steps=7).step == 9
