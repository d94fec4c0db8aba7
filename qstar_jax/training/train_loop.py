"""The one train loop over plain pytrees: restore, step, eval, log, and a host hook.

The caller brings a pure loss ``loss_fn(params, batch, rng_key) -> (loss, aux)`` (``aux`` a
dict of scalars, may be empty), initial ``params`` (any pytree, e.g. the ``nnx.State`` of
``graphdef, params = nnx.split(model)``), an optax optimizer and a function giving the train
batches from a step on. The loop is made of named pieces:

- **restore** (:func:`restore_state`): auto-resume. Rerun with the same ``out_dir`` (e.g. after a
  SIGKILL) and the latest checkpoint of ``out_dir/checkpoints`` is restored into the state's
  structure; ``train_batches(start_step)`` then gives the batches from there on, so the run
  continues exactly as an uninterrupted one would (identical floats on the same machine);
- **step** (:func:`make_train_step`, :func:`make_train_chunk`): one jitted optimizer step, or
  ``steps_per_call`` steps in one jitted ``lax.scan`` (compiled once). With ``accum_steps = A``
  the batch ``[B, ...]`` is reshaped to ``[A, B / A, ...]`` and gradients are averaged over the A
  micro-batches in a ``lax.scan``: ``g = (1/A) sum_a grad L(params, micro_a)``. The step's RNG
  key is ``fold_in(key(seed), step)`` (no RNG state to save);
- **eval** (:func:`evaluate`): every ``eval_every`` steps and at the end, the mean of
  ``eval_loss_fn`` over the eval batches;
- **log** (:class:`TrainLog`): metrics (``train/loss``, ``train/lr``, ``train/grad_norm``, aux,
  ``eval/...``) to ``out_dir/metrics.jsonl`` (+ TensorBoard), records past the resume step
  dropped, a progress bar with rates;
- **stop on a non-finite loss**: the metrics are checked at each log step and before each
  checkpoint; the first NaN / inf training loss raises :class:`NonFiniteLossError` naming its step
  and the last good checkpoint, which is kept (no checkpoint is ever written after a non-finite
  loss, so a rerun resumes from good parameters);
- **on_step**: a host hook called after each step (or each call of ``steps_per_call`` steps) with
  the step number, the :class:`TrainState` and the step's host metrics; it may return an updated
  state (e.g. a refreshed target network in ``extra``) and add host metrics to the record.

Checkpoints ``{"params", "opt_state", "step"}`` (+ ``"extra"`` when the state carries one) are
saved every ``checkpoint_every`` steps and at the end through :class:`CheckpointManager`
(config-checked).

**A device mesh** (``train(..., mesh=...)``, see :mod:`qstar_jax.distributed`): the params, the
optimizer state and ``extra`` are placed by the sharding rules (FSDP over ``fsdp``, tensor
parallel over ``tensor``), every batch is put as a global array split over ``data`` x ``fsdp``
(each process passes its own rows on a multi-host run), and the step is jitted with these as its
explicit in/out shardings, so XLA's SPMD partitioner inserts the collectives (per-weight
all-gathers, reduce-scattered gradients) and nothing is gathered on the host. A checkpoint is
restored into the current mesh's shardings: a run written on 8 devices resumes on 1 or 4.
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
from flax import struct
from jax.sharding import Mesh

from qstar_jax.distributed import (
  DEFAULT_RULES,
  Rules,
  batch_shardings,
  opt_state_shardings,
  param_shardings,
  put_batch,
  replicated,
  under_mesh,
)
from qstar_jax.training.checkpoint import CheckpointManager
from qstar_jax.training.metrics import MetricsWriter
from qstar_jax.training.progress import PhaseTimer, progress

__all__ = [
  "TrainLoopConfig",
  "TrainResult",
  "TrainState",
  "TrainLog",
  "TrainShardings",
  "NonFiniteLossError",
  "train",
  "make_train_step",
  "make_train_chunk",
  "make_eval_step",
  "restore_state",
  "evaluate",
]

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
OnStep = Callable[[int, "TrainState", dict[str, float]], "TrainState | None"]


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
  num_steps: int = 1000          # optimizer steps in the whole run
  accum_steps: int = 1           # micro-batches per optimizer step (divides the batch size)
  eval_every: int = 100          # 0: only at the end
  checkpoint_every: int = 200    # 0: only at the end
  log_every: int = 10
  max_to_keep: int = 2
  seed: int = 0


@struct.dataclass
class TrainState:
  """What the loop carries from step to step and checkpoints."""

  params: Any          # parameter pytree
  opt_state: Any       # the optimizer's state of ``params``
  step: jax.Array      # [] int32 optimizer steps done
  extra: Any = None    # pytree the loss reads beside the params (a target network); None: unused


@dataclasses.dataclass(frozen=True)
class TrainResult:
  params: Any                    # final parameters (same structure as the input)
  opt_state: Any
  step: int                      # steps done (num_steps, or fewer when max_seconds stopped it)
  resumed_from: int | None       # checkpoint step the run resumed from, if any
  last_train_loss: float         # loss of the last optimizer step (mean of the last call's steps)
  eval_history: list[tuple[int, dict[str, float]]]   # (step, eval metrics)
  timings: dict[str, float]      # seconds per phase (compile, train, eval, checkpoint)
  steps_per_s: float             # this process's steady-state rate (compile excluded)
  extra: Any = None              # the final ``TrainState.extra``
  stopped_early: bool = False    # max_seconds ran out before num_steps


@dataclasses.dataclass(frozen=True)
class TrainShardings:
  """Where the state lives on a mesh: ``NamedSharding`` trees shaped like the params, the
  optimizer state and ``extra`` (None when unused)."""

  mesh: Mesh
  params: Any
  opt_state: Any
  extra: Any = None
  _optimizer_init: Any = None

  @classmethod
  def build(cls, mesh: Mesh, params: Any, optimizer: optax.GradientTransformation, *,
            extra: Any = None, rules: Rules = DEFAULT_RULES) -> TrainShardings:
    """The rules' shardings of ``params``, ``optimizer.init(params)`` and ``extra`` on ``mesh``
    (raises ``MeshShapeError`` when a dimension does not divide over its axes)."""
    return cls(mesh=mesh, params=param_shardings(params, mesh, rules),
               opt_state=opt_state_shardings(optimizer, params, mesh, rules),
               extra=None if extra is None else param_shardings(extra, mesh, rules),
               _optimizer_init=optimizer.init)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return replicated(self.mesh)

  def state(self) -> TrainState:
    """The shardings as a ``TrainState`` (a prefix tree of the state: step replicated)."""
    return TrainState(params=self.params, opt_state=self.opt_state, step=self.replicated,
                      extra=self.extra)

  def place(self, params: Any, extra: Any = None) -> TrainState:
    """A fresh state on the mesh: ``params`` and ``extra`` copied into the rules' shardings (new
    buffers: the caller's arrays stay valid under donation), the optimizer state initialised in
    place (its leaves created already split), step 0."""
    params = jax.device_put(jax.tree.map(jnp.copy, params), self.params)
    if extra is not None:
      extra = jax.device_put(jax.tree.map(jnp.copy, extra), self.extra)
    opt_state = jax.jit(self._optimizer_init, out_shardings=self.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
    return TrainState(params=params, opt_state=opt_state, step=step, extra=extra)


# ----------------------------------------------------------------------------------------- step


def _split_micro(batch: Any, accum_steps: int) -> Any:
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(
        f"batch dimension {x.shape[0]} is not divisible by accum_steps={accum_steps}"
      )
    return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

  return jax.tree.map(split, batch)


def _step_body(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  *,
  accum_steps: int,
  lr_fn: Callable[[jax.Array], jax.Array] | None,
) -> Callable:
  """The un-jitted optimizer step ``(params, opt_state, batch, rng_key, step, extra)``."""

  def step_fn(params, opt_state, batch, rng_key, step, extra=None):
    loss_of = loss_fn if extra is None else (lambda p, b, k: loss_fn(p, b, k, extra))
    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
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

  return step_fn


def make_train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  *,
  accum_steps: int = 1,
  lr_fn: Callable[[jax.Array], jax.Array] | None = None,
  shardings: TrainShardings | None = None,
  batch_sharding: Any = None,
) -> Callable:
  """``step_fn(params, opt_state, batch, rng_key, step, extra=None) -> (params, opt_state,
  metrics)``, jitted (``params`` and ``opt_state`` donated).

  ``loss_fn(params, batch, rng_key)``, or ``loss_fn(params, batch, rng_key, extra)`` when
  ``extra`` is given. Metrics: ``loss`` (mean over micro-batches), ``grad_norm`` (global norm of
  the averaged gradient), ``lr`` (when ``lr_fn`` is given) and the means of ``aux``.

  With ``shardings`` the step is jitted with explicit in/out shardings: params, optimizer state
  and ``extra`` by the rules, the batch by ``batch_sharding`` (from
  :func:`~qstar_jax.distributed.batch_shardings`; None for a batch-free loss), key, step and
  metrics replicated. The step must then be called with all six arguments.
  """
  body = _step_body(loss_fn, optimizer, accum_steps=accum_steps, lr_fn=lr_fn)
  if shardings is None:
    return jax.jit(body, donate_argnums=(0, 1))
  rep = shardings.replicated
  return jax.jit(under_mesh(body, shardings.mesh), donate_argnums=(0, 1),
                 in_shardings=(shardings.params, shardings.opt_state, batch_sharding, rep, rep,
                               shardings.extra),
                 out_shardings=(shardings.params, shardings.opt_state, rep))


def make_train_chunk(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  *,
  steps_per_call: int,
  accum_steps: int = 1,
  lr_fn: Callable[[jax.Array], jax.Array] | None = None,
  shardings: TrainShardings | None = None,
  batch_sharding: Any = None,
) -> Callable:
  """``chunk(state, batches, base_key) -> (state, metrics)``, jitted (``state`` donated).

  Runs ``steps_per_call = K`` optimizer steps of :func:`make_train_step` in one ``lax.scan``:
  step ``t`` uses the key ``fold_in(base_key, t)`` and the batch ``batches[i]`` (batches stacked
  ``[K, ...]``; ``None`` when the loss draws its data from the key). Metrics are stacked ``[K]``.
  With ``shardings``: explicit in/out shardings as in :func:`make_train_step` (the stacked
  batches' sharding splits their dimension 1).
  """
  body = _step_body(loss_fn, optimizer, accum_steps=accum_steps, lr_fn=lr_fn)

  def chunk(state: TrainState, batches: Any, base_key: jax.Array):
    def one(state: TrainState, batch: Any):
      key = jax.random.fold_in(base_key, state.step)
      params, opt_state, metrics = body(state.params, state.opt_state, batch, key, state.step,
                                        state.extra)
      return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.lax.scan(one, state, batches, length=steps_per_call)

  if shardings is None:
    return jax.jit(chunk, donate_argnums=(0,))
  rep = shardings.replicated
  return jax.jit(under_mesh(chunk, shardings.mesh), donate_argnums=(0,),
                 in_shardings=(shardings.state(), batch_sharding, rep),
                 out_shardings=(shardings.state(), rep))


def make_eval_step(eval_loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]], *,
                   shardings: TrainShardings | None = None) -> Callable:
  """``eval_fn(params, batch) -> {"loss": ..., **aux}``, jitted (with ``shardings``: params by
  the rules, the batch as it was put, metrics replicated)."""

  def eval_step(params, batch):
    loss, aux = eval_loss_fn(params, batch)
    return {"loss": loss, **aux}

  if shardings is None:
    return jax.jit(eval_step)
  step = jax.jit(under_mesh(eval_step, shardings.mesh), in_shardings=(shardings.params, None),
                 out_shardings=shardings.replicated)

  def sharded_eval(params, batch):
    return step(params, put_batch(batch, batch_shardings(batch, shardings.mesh, what="eval batch")))

  return sharded_eval


# -------------------------------------------------------------------------------- restore, eval


def _global_shapes(batch: Any, leading: int) -> Any:
  """The global batch's shapes from this process's rows: on several processes each yields
  ``B / process_count`` rows of dimension ``leading`` (its data shard)."""
  count = jax.process_count()

  def one(x):
    shape = list(np.shape(x))
    if count > 1 and len(shape) > leading:
      shape[leading] *= count
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return jax.ShapeDtypeStruct(tuple(shape), dtype)

  return jax.tree.map(one, batch)


def _checkpoint_tree(state: TrainState) -> dict[str, Any]:
  """The saved layout: ``{"params", "opt_state", "step"}`` (+ ``"extra"`` when used). The step is
  a host scalar (numpy): every process holds it, so it saves on a multi-host run too."""
  tree = {"params": state.params, "opt_state": state.opt_state,
          "step": np.asarray(int(state.step), np.int32)}
  if state.extra is not None:
    tree["extra"] = state.extra
  return tree


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


def _abstract_leaf(x: Any) -> Any:
  """The restore target of a state leaf: its shape, dtype and (for a placed array) sharding, so
  that orbax reads each device's part into the current mesh, whatever mesh wrote it; a numpy
  leaf (the step) is restored as numpy."""
  if isinstance(x, np.ndarray):
    return x
  if isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype)


def restore_state(
  manager: CheckpointManager, state: TrainState
) -> tuple[TrainState, int | None]:
  """Auto-resume: ``(the latest checkpoint restored into state's structure, its step)``, or
  ``(state, None)`` when the run has no checkpoint yet. Leaves of a state placed on a mesh are
  restored with their shardings (a checkpoint from another mesh or device count reshards)."""
  latest = manager.latest_step()
  if latest is None:
    return state, None
  target = jax.tree.map(_abstract_leaf, _checkpoint_tree(state))
  restored = manager.restore(latest, target=target)
  step = int(restored["step"])
  if step != latest:
    raise RuntimeError(f"checkpoint {latest} holds step {step}")
  return TrainState(params=restored["params"], opt_state=restored["opt_state"],
                    step=jnp.asarray(step, jnp.int32), extra=restored.get("extra")), latest


def _to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def evaluate(eval_fn: Callable, params: Any, eval_batches: Iterable[Any]) -> dict[str, float]:
  """Means of ``eval_fn(params, batch)``'s metrics over ``eval_batches``."""
  sums: dict[str, float] = {}
  count = 0
  for batch in eval_batches:
    for k, v in _to_host(eval_fn(params, batch)).items():
      sums[k] = sums.get(k, 0.0) + v
    count += 1
  if count == 0:
    raise ValueError("eval_batches() yielded no batches")
  return {k: v / count for k, v in sums.items()}


# ------------------------------------------------------------------------------------------ log


class NonFiniteLossError(FloatingPointError):
  """A training loss was NaN or infinite: the run stopped (``step``: the record's step, the steps
  done when it was logged; ``last_good_checkpoint``: the step a rerun resumes from, or None)."""

  def __init__(self, message: str, *, step: int, loss: float,
               last_good_checkpoint: int | None = None):
    super().__init__(message)
    self.step, self.loss, self.last_good_checkpoint = step, loss, last_good_checkpoint


class TrainLog:
  """Train/eval metrics to ``metrics.jsonl`` (+ TensorBoard) and a progress bar.

  Train metrics stay on the device until a log step (no host sync per step), then are written
  with ``prefix`` (``"train/loss"``); the first record with a non-finite loss raises
  :class:`NonFiniteLossError` after the records up to it are written.
  """

  def __init__(self, out_dir: pathlib.Path, *, total: int, initial: int, desc: str,
               prefix: str, force_progress: bool):
    self.writer = MetricsWriter(out_dir)
    self.bar = progress(total=total, initial=initial, desc=desc, unit="step",
                        force=force_progress)
    self.prefix = prefix
    self.last_loss = float("nan")  # stays NaN when the run was complete before this call
    self._pending: list[tuple[int, Mapping[str, Any]]] = []

  def add(self, step: int, metrics: Mapping[str, Any], *, num_steps: int = 1) -> None:
    self._pending.append((step, metrics))
    self.bar.update(num_steps)

  def flush(self) -> None:
    host = [(s, _to_host(m)) for s, m in self._pending]
    self._pending.clear()
    for s, m in host:
      self.writer.write(s, {f"{self.prefix}{k}": v for k, v in m.items()})
      if not np.isfinite(m["loss"]):
        self.writer.flush()
        raise NonFiniteLossError(f"train loss is {m['loss']} at step {s}", step=s,
                                 loss=m["loss"])
    if host:
      self.last_loss = host[-1][1]["loss"]
      self.bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)

  def eval(self, step: int, means: Mapping[str, float]) -> None:
    self.writer.write(step, {f"eval/{k}": v for k, v in means.items()})

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


# ---------------------------------------------------------------------------------------- train


def _excluded(timer: PhaseTimer) -> float:
  s = timer.summary()
  return s.get("eval", 0.0) + s.get("checkpoint", 0.0)


def _crossed(every: int, before: int, after: int) -> bool:
  """Whether the steps ``before+1 .. after`` include a multiple of ``every`` (0: never)."""
  return bool(every) and after // every > before // every


def _unalias(state: TrainState) -> TrainState:
  """Copies ``extra`` leaves that are ``params`` buffers (a target network set to the online
  one): the step donates the params, which would delete them."""
  if state.extra is None:
    return state
  owned = {id(x) for x in jax.tree.leaves(state.params)}
  return state.replace(extra=jax.tree.map(lambda x: jnp.copy(x) if id(x) in owned else x,
                                          state.extra))


def _print(message: str) -> None:
  print(message, flush=True)


def train(
  loss_fn: LossFn,
  params: Any,
  *,
  optimizer: optax.GradientTransformation,
  train_batches: Callable[[int], Iterator[Any]] | None,
  config: TrainLoopConfig,
  out_dir: str | os.PathLike,
  run_config: Mapping[str, Any],
  eval_loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]] | None = None,
  eval_batches: Callable[[], Iterable[Any]] | None = None,
  lr_fn: Callable[[jax.Array], jax.Array] | None = None,
  on_eval: Callable[[int, dict[str, float]], None] | None = None,
  show_progress: bool | None = None,
  extra: Any = None,
  on_step: OnStep | None = None,
  steps_per_call: int = 1,
  max_seconds: float = 0.0,
  ignore_config_keys: tuple[str, ...] = (),
  metrics_prefix: str = "train/",
  progress_desc: str = "train",
  log: Callable[[str], None] = _print,
  mesh: Mesh | None = None,
  sharding_rules: Rules = DEFAULT_RULES,
) -> TrainResult:
  """Trains ``params`` for ``config.num_steps`` optimizer steps, resuming ``out_dir`` if it holds
  checkpoints of the same run.

  Args:
    loss_fn: pure ``(params, batch, rng_key) -> (scalar loss, dict of scalar aux)``; with
      ``extra``: ``(params, batch, rng_key, extra)``.
    params: initial parameter pytree (ignored when resuming, except as the restore target).
    optimizer: optax transformation.
    train_batches: ``start_step -> iterator`` of batches for steps ``start_step, ...``; must be
      deterministic in ``start_step`` for resumed runs to match uninterrupted ones. None: the
      loss draws its data from ``rng_key`` (its ``batch`` is None).
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
    extra: initial ``TrainState.extra`` (e.g. a target network), checkpointed with the params.
    on_step: host hook ``(step, state, metrics) -> state | None`` after each call of the step
      (``step`` = steps done, ``metrics`` = the call's host metrics, means over its steps). A
      returned state replaces the loop's; entries the hook adds to ``metrics`` are logged.
    steps_per_call: steps per jitted call (one ``lax.scan``); the run ends at the first
      multiple of it past the start at or after ``num_steps``. Each call's metrics are logged as
      one record (means over its steps).
    max_seconds: > 0: stop (checkpoint, final eval) after the call at which this much wall time
      has passed.
    ignore_config_keys: dotted ``run_config`` keys that may differ on resume (e.g. ``"out"``).
    metrics_prefix: prefix of the train metrics' names in ``metrics.jsonl``.
    progress_desc: label of the progress bar.
    log: where the resume and stop messages go.
    mesh: a device mesh (:func:`qstar_jax.distributed.make_mesh`): the state is placed by
      ``sharding_rules`` and every batch split over ``data`` x ``fsdp`` (on several processes,
      ``train_batches`` yields this process's rows of each global batch). None: one device, as
      before. The mesh may differ from the one that wrote the checkpoints being resumed.
    sharding_rules: ``(path pattern, PartitionSpec)`` rules for params, optimizer state and
      ``extra`` (default: :data:`qstar_jax.distributed.DEFAULT_RULES`).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, value in (("num_steps", config.num_steps), ("accum_steps", config.accum_steps),
                      ("steps_per_call", steps_per_call)):
    if value < 1:
      raise ValueError(f"{name}={value}: expected >= 1")
  # Shardings first: a mesh that does not divide the model fails before any file is written.
  shardings = (None if mesh is None else
               TrainShardings.build(mesh, params, optimizer, extra=extra, rules=sharding_rules))
  timer = PhaseTimer()
  manager = CheckpointManager(out_dir / "checkpoints", config=run_config,
                              max_to_keep=config.max_to_keep, ignore_keys=ignore_config_keys)
  if shardings is None:
    state = TrainState(params=params, opt_state=optimizer.init(params),
                       step=jnp.zeros((), jnp.int32), extra=extra)
  else:
    state = shardings.place(params, extra)
  resumed_from = None
  if manager.latest_step() is not None:
    with timer.phase("restore"):
      state, resumed_from = restore_state(manager, state)
    _truncate_metrics(out_dir / "metrics.jsonl", resumed_from)
    log(f"{out_dir}: resumed from step {resumed_from}")
  elif shardings is None:
    # The step donates its params/opt_state (a chunk: the whole state) buffers: work on a copy
    # so that the caller's arrays (and a model sharing them) stay valid.
    state = state.replace(params=jax.tree.map(jnp.copy, state.params),
                          extra=jax.tree.map(jnp.copy, state.extra))
  start_step = int(state.step)

  step_fn = chunk_fn = None

  def build_step(batch: Any) -> Any:
    """Jits the step (once, at the first batch: its shardings follow the batch's structure)."""
    nonlocal step_fn, chunk_fn
    batch_sharding = None
    if shardings is not None and batch is not None:
      leading = int(steps_per_call > 1)
      batch_sharding = batch_shardings(_global_shapes(batch, leading), mesh, leading=leading,
                                       what="train batch")
    kwargs = dict(accum_steps=config.accum_steps, lr_fn=lr_fn, shardings=shardings,
                  batch_sharding=batch_sharding)
    if steps_per_call == 1:
      step_fn = make_train_step(loss_fn, optimizer, **kwargs)
    else:
      chunk_fn = make_train_chunk(loss_fn, optimizer, steps_per_call=steps_per_call, **kwargs)
    return batch_sharding

  if eval_loss_fn is None:
    eval_key = jax.random.key(config.seed + 1)
    eval_loss_fn = lambda p, b: loss_fn(p, b, eval_key)  # noqa: E731
  eval_fn = (make_eval_step(eval_loss_fn, shardings=shardings) if eval_batches is not None
             else None)
  base_key = jax.random.key(config.seed)
  logger = TrainLog(out_dir, total=config.num_steps, initial=start_step, desc=progress_desc,
                    prefix=metrics_prefix, force_progress=bool(show_progress))
  eval_history: list[tuple[int, dict[str, float]]] = []

  def run_eval(step: int) -> None:
    if eval_fn is None:
      return
    logger.flush()   # raises on a non-finite loss before evaluating its parameters
    with timer.phase("eval"):
      means = evaluate(eval_fn, state.params, eval_batches())
    eval_history.append((step, means))
    logger.eval(step, means)
    if on_eval is not None:
      on_eval(step, means)

  def save(step: int, *, force: bool = False) -> None:
    logger.flush()   # raises on a non-finite loss: never checkpoint parameters after one
    with timer.phase("checkpoint"):
      manager.save(step, _checkpoint_tree(state), force=force)

  def next_batches() -> Any:
    if batches is None:
      return None
    if steps_per_call == 1:
      return next(batches)
    # On a mesh the stacked batches stay on the host until put_batch splits them over devices.
    stack = jnp.stack if shardings is None else (lambda xs: np.stack([np.asarray(x) for x in xs]))
    return jax.tree.map(lambda *xs: stack(xs), *(next(batches) for _ in range(steps_per_call)))

  steady_steps, steady_time, steady_t0, excluded0 = 0, 0.0, None, 0.0
  stopped_early = False
  batches = train_batches(start_step) if train_batches is not None else None
  step = start_step
  batch_sharding = None
  t_start = time.perf_counter()
  try:
    while step < config.num_steps:
      batch = next_batches()
      if step_fn is None and chunk_fn is None:
        batch_sharding = build_step(batch)
      if batch_sharding is not None:
        batch = put_batch(batch, batch_sharding)
      t0 = time.perf_counter()
      if steps_per_call == 1:
        params, opt_state, metrics = step_fn(
          state.params, state.opt_state, batch, jax.random.fold_in(base_key, step),
          jnp.int32(step), state.extra,
        )
        state = state.replace(params=params, opt_state=opt_state,
                              step=jnp.asarray(step + 1, jnp.int32))
      else:
        state, stacked = chunk_fn(state, batch, base_key)
        metrics = {k: jnp.mean(v) for k, v in stacked.items()}
      done = step + steps_per_call
      if step == start_step:  # first call: compile + run
        jax.block_until_ready(metrics)
        timer.add("compile", time.perf_counter() - t0)
        steady_t0 = time.perf_counter()
        excluded0 = _excluded(timer)
      else:
        steady_steps += steps_per_call
      if on_step is not None:
        metrics = _to_host(metrics)
        updated = on_step(done, state, metrics)
        if updated is not None:
          state = _unalias(updated)
      logger.add(done, metrics, num_steps=steps_per_call)
      if _crossed(max(config.log_every, 1), step, done) or done >= config.num_steps:
        logger.flush()
      if _crossed(config.eval_every, step, done) and done < config.num_steps:
        run_eval(done)
      if _crossed(config.checkpoint_every, step, done) and done < config.num_steps:
        save(done)
      step = done
      if max_seconds > 0 and time.perf_counter() - t_start > max_seconds and step < config.num_steps:
        log(f"max_seconds={max_seconds} reached at step {step}")
        stopped_early = True
        break
    logger.flush()
    jax.block_until_ready(state.params)
    if steady_t0 is not None:
      steady_time = time.perf_counter() - steady_t0 - (_excluded(timer) - excluded0)
    run_eval(step)
    save(step, force=True)
    with timer.phase("checkpoint"):
      manager.wait()
  except NonFiniteLossError as e:
    manager.wait()
    good = manager.latest_step()
    where = (f"the last good checkpoint is step {good} in {out_dir / 'checkpoints'} (kept; "
             "rerunning the same command resumes from it)" if good is not None
             else f"no checkpoint was written in {out_dir / 'checkpoints'}")
    raise NonFiniteLossError(f"{out_dir}: {e}; training stopped: {where}", step=e.step,
                             loss=e.loss, last_good_checkpoint=good) from None
  finally:
    logger.close()
    manager.close()
  timer.add("train", steady_time)
  return TrainResult(
    params=state.params,
    opt_state=state.opt_state,
    step=step,
    resumed_from=resumed_from,
    last_train_loss=logger.last_loss,
    eval_history=eval_history,
    timings=timer.summary(),
    steps_per_s=steady_steps / steady_time if steady_time > 0 else float("nan"),
    extra=state.extra,
    stopped_early=stopped_early,
  )
