"""A generic jitted train loop over plain pytrees, with accumulation, eval, metrics and resume.

The caller brings a pure loss ``loss_fn(params, batch, rng_key) -> (loss, aux)`` (``aux`` a
dict of scalars, may be empty), initial ``params`` (any pytree, e.g. the ``nnx.State`` of
``graphdef, params = nnx.split(model)``), an optax optimizer and a function giving the train
batches from a step on. The loop:

- jits one optimizer step (compiled once): with ``accum_steps = A`` the batch ``[B, ...]`` is
  reshaped to ``[A, B / A, ...]`` and gradients are averaged over the A micro-batches in a
  ``lax.scan``: ``g = (1/A) sum_a grad L(params, micro_a)``;
- derives the step's RNG key as ``fold_in(key(seed), step)`` (no RNG state to save);
- evaluates every ``eval_every`` steps and at the end (mean of ``eval_loss_fn`` over the
  eval batches);
- saves ``{"params", "opt_state", "step"}`` every ``checkpoint_every`` steps and at the end to
  ``out_dir/checkpoints`` through :class:`CheckpointManager` (config-checked);
- auto-resumes: rerun with the same ``out_dir`` (e.g. after a SIGKILL) and it restores the latest
  checkpoint and asks ``train_batches(start_step)`` for the batches from there on, so the run
  continues exactly as an uninterrupted one would (identical floats on the same machine);
- writes metrics (``train/loss``, ``train/lr``, ``train/steps_per_s``, ``eval/loss``, aux) to
  ``out_dir/metrics.jsonl`` (+ TensorBoard), dropping records past the resume step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qstar_jax.training.checkpoint import CheckpointManager
from qstar_jax.training.metrics import MetricsWriter
from qstar_jax.training.progress import PhaseTimer, progress

__all__ = ["TrainLoopConfig", "TrainResult", "train", "make_train_step", "make_eval_step"]

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
  num_steps: int = 1000          # optimizer steps in the whole run
  accum_steps: int = 1           # micro-batches per optimizer step (divides the batch size)
  eval_every: int = 100          # 0: only at the end
  checkpoint_every: int = 200    # 0: only at the end
  log_every: int = 10
  max_to_keep: int = 2
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainResult:
  params: Any                    # final parameters (same structure as the input)
  opt_state: Any
  step: int                      # steps done (== num_steps)
  resumed_from: int | None       # checkpoint step the run resumed from, if any
  last_train_loss: float         # loss of the last optimizer step
  eval_history: list[tuple[int, dict[str, float]]]   # (step, eval metrics)
  timings: dict[str, float]      # seconds per phase (compile, train, eval, checkpoint)
  steps_per_s: float             # this process's steady-state rate (compile excluded)


def _split_micro(batch: Any, accum_steps: int) -> Any:
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(
        f"batch dimension {x.shape[0]} is not divisible by accum_steps={accum_steps}"
      )
    return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

  return jax.tree.map(split, batch)


def make_train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  *,
  accum_steps: int = 1,
  lr_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable:
  """``step_fn(params, opt_state, batch, rng_key, step) -> (params, opt_state, metrics)``, jitted.

  Metrics: ``loss`` (mean over micro-batches), ``grad_norm`` (global norm of the averaged
  gradient), ``lr`` (when ``lr_fn`` is given) and the means of ``aux``.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(params, opt_state, batch, rng_key, step):
    if accum_steps == 1:
      (loss, aux), grads = grad_fn(params, batch, rng_key)
    else:
      micro = _split_micro(batch, accum_steps)
      keys = jax.random.split(rng_key, accum_steps)

      def body(carry, xs):
        g_sum, l_sum, a_sum = carry
        mb, key = xs
        (loss, aux), grads = grad_fn(params, mb, key)
        g_sum = jax.tree.map(jnp.add, g_sum, grads)
        a_sum = jax.tree.map(jnp.add, a_sum, aux)
        return (g_sum, l_sum + loss, a_sum), None

      first = jax.tree.map(lambda x: x[0], micro)
      aux_shape = jax.eval_shape(lambda: grad_fn(params, first, keys[0])[0][1])
      init = (
        jax.tree.map(jnp.zeros_like, params),
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
      )
      (g_sum, l_sum, a_sum), _ = jax.lax.scan(body, init, (micro, keys))
      grads = jax.tree.map(lambda g: g / accum_steps, g_sum)
      loss = l_sum / accum_steps
      aux = jax.tree.map(lambda a: a / accum_steps, a_sum)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    if lr_fn is not None:
      metrics["lr"] = lr_fn(step)
    return params, opt_state, metrics

  return jax.jit(step_fn, donate_argnums=(0, 1))


def make_eval_step(eval_loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]]) -> Callable:
  """``eval_fn(params, batch) -> {"loss": ..., **aux}``, jitted."""

  def eval_step(params, batch):
    loss, aux = eval_loss_fn(params, batch)
    return {"loss": loss, **aux}

  return jax.jit(eval_step)


def _to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """Drops records written after ``last_step`` (by a run that was killed before saving)."""
  if not path.exists():
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= last_step:
          kept.append(line)
      except (ValueError, KeyError):
        continue
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(kept))
  os.replace(tmp, path)


def _excluded(timer: PhaseTimer) -> float:
  s = timer.summary()
  return s.get("eval", 0.0) + s.get("checkpoint", 0.0)


def train(
  loss_fn: LossFn,
  params: Any,
  *,
  optimizer: optax.GradientTransformation,
  train_batches: Callable[[int], Iterator[Any]],
  config: TrainLoopConfig,
  out_dir: str | os.PathLike,
  run_config: Mapping[str, Any],
  eval_loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]] | None = None,
  eval_batches: Callable[[], Iterable[Any]] | None = None,
  lr_fn: Callable[[jax.Array], jax.Array] | None = None,
  on_eval: Callable[[int, dict[str, float]], None] | None = None,
  show_progress: bool | None = None,
) -> TrainResult:
  """Trains ``params`` for ``config.num_steps`` optimizer steps, resuming ``out_dir`` if it holds
  checkpoints of the same run.

  Args:
    loss_fn: pure ``(params, batch, rng_key) -> (scalar loss, dict of scalar aux)``.
    params: initial parameter pytree (ignored when resuming, except as the restore target).
    optimizer: optax transformation.
    train_batches: ``start_step -> iterator`` of batches for steps ``start_step, ...``; must be
      deterministic in ``start_step`` for resumed runs to match uninterrupted ones.
    config: loop settings.
    out_dir: run folder (``checkpoints/``, ``metrics.jsonl``).
    run_config: the experiment's config dict; a checkpoint folder with another config is refused
      (``CheckpointConfigMismatchError``).
    eval_loss_fn: pure ``(params, batch) -> (loss, aux)`` for evaluation (default: ``loss_fn``
      with a fixed key).
    eval_batches: ``() -> iterable`` of eval batches; None disables evaluation.
    lr_fn: step -> learning rate, logged as ``train/lr``.
    on_eval: callback ``(step, eval_metrics)``.
    show_progress: force the live progress bar on/off (default: when on a terminal).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if config.num_steps < 1:
    raise ValueError(f"num_steps={config.num_steps}: expected >= 1")
  if config.accum_steps < 1:
    raise ValueError(f"accum_steps={config.accum_steps}: expected >= 1")
  timer = PhaseTimer()
  manager = CheckpointManager(out_dir / "checkpoints", config=run_config,
                              max_to_keep=config.max_to_keep)
  opt_state = optimizer.init(params)
  start_step = 0
  resumed_from = manager.latest_step()
  if resumed_from is not None:
    with timer.phase("restore"):
      target = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
      restored = manager.restore(resumed_from, target=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype), target))
      params, opt_state = restored["params"], restored["opt_state"]
      start_step = int(restored["step"])
    if start_step != resumed_from:
      raise RuntimeError(f"checkpoint {resumed_from} holds step {start_step}")
    _truncate_metrics(out_dir / "metrics.jsonl", start_step)
    print(f"resuming {out_dir} from step {start_step}", flush=True)

  else:
    # The step donates its params/opt_state buffers: work on a copy so that the caller's arrays
    # (and a model sharing them) stay valid.
    params = jax.tree.map(jnp.copy, params)

  step_fn = make_train_step(loss_fn, optimizer, accum_steps=config.accum_steps, lr_fn=lr_fn)
  if eval_loss_fn is None:
    eval_key = jax.random.key(config.seed + 1)
    eval_loss_fn = lambda p, b: loss_fn(p, b, eval_key)  # noqa: E731
  eval_fn = make_eval_step(eval_loss_fn) if eval_batches is not None else None
  base_key = jax.random.key(config.seed)
  writer = MetricsWriter(out_dir)
  eval_history: list[tuple[int, dict[str, float]]] = []

  def run_eval(step: int) -> None:
    if eval_fn is None:
      return
    with timer.phase("eval"):
      sums: dict[str, float] = {}
      count = 0
      for batch in eval_batches():
        m = _to_host(eval_fn(params, batch))
        for k, v in m.items():
          sums[k] = sums.get(k, 0.0) + v
        count += 1
      if count == 0:
        raise ValueError("eval_batches() yielded no batches")
      means = {k: v / count for k, v in sums.items()}
    eval_history.append((step, means))
    writer.write(step, {f"eval/{k}": v for k, v in means.items()})
    if on_eval is not None:
      on_eval(step, means)

  last_loss = float("nan")  # stays NaN when the run was already complete before this call
  pending: list[tuple[int, dict[str, Any]]] = []
  steady_steps, steady_time = 0, 0.0
  bar = progress(total=config.num_steps, initial=start_step, desc="train", unit="step",
                 force=bool(show_progress))
  steady_t0 = None
  batches = train_batches(start_step)
  try:
    for step in range(start_step, config.num_steps):
      batch = next(batches)
      t0 = time.perf_counter()
      params, opt_state, metrics = step_fn(
        params, opt_state, batch, jax.random.fold_in(base_key, step), jnp.int32(step)
      )
      pending.append((step + 1, metrics))
      done = step + 1
      log_now = done % max(config.log_every, 1) == 0 or done == config.num_steps
      if step == start_step:  # first call: compile + run
        jax.block_until_ready(metrics)
        timer.add("compile", time.perf_counter() - t0)
        steady_t0 = time.perf_counter()
        excluded0 = _excluded(timer)
      if log_now:
        host = [(s, _to_host(m)) for s, m in pending]
        pending.clear()
        for s, m in host:
          writer.write(s, {f"train/{k}": v for k, v in m.items()})
        last_loss = host[-1][1]["loss"]
        bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
        if not np.isfinite(last_loss):
          raise FloatingPointError(f"train loss is {last_loss} at step {done}")
      if step > start_step:
        steady_steps += 1
      bar.update(1)
      if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
        run_eval(done)
      if config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.num_steps:
        with timer.phase("checkpoint"):
          manager.save(done, {"params": params, "opt_state": opt_state,
                              "step": jnp.asarray(done, jnp.int32)})
    jax.block_until_ready(params)
    if steady_t0 is not None:
      steady_time = time.perf_counter() - steady_t0 - (_excluded(timer) - excluded0)
    done = config.num_steps
    if start_step < done or not eval_history:
      run_eval(done)
    with timer.phase("checkpoint"):
      manager.save(done, {"params": params, "opt_state": opt_state,
                          "step": jnp.asarray(done, jnp.int32)}, force=True)
      manager.wait()
  finally:
    bar.close()
    writer.close()
    manager.close()
  timer.add("train", steady_time)
  return TrainResult(
    params=params,
    opt_state=opt_state,
    step=config.num_steps,
    resumed_from=resumed_from,
    last_train_loss=last_loss,
    eval_history=eval_history,
    timings=timer.summary(),
    steps_per_s=steady_steps / steady_time if steady_time > 0 else float("nan"),
  )
