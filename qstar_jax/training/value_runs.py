"""Resumable value-learning runs: one function per method over the one train loop.

Each ``run_*`` function checks its inputs on the host (before anything compiles), builds the
loss of `qstar_jax.training.value_learning`, the optimizer (`make_optimizer`: AdamW, warmup +
cosine, global-norm clipping; ``accum_steps`` micro-batches per step) and the deterministic
batches (`pair_batches` / `trajectory_batches`: batch ``s`` is a pure function of
``(cfg.seed, s)``), and calls `train` with ``out_dir``:

- ``run_preference``: DPO on response-level pairs, or step-level DPO (``mean_tokens=True`` on
  step pairs);
- ``run_sft``: the next-token loss on the trajectories' solution tokens (rejection sampling is
  ``run_sft`` on the correct samples);
- ``run_oreo``: OREO (``params = oreo_params(policy, value_head)``);
- ``run_prm``: implicit PRM (PRIME) with the outcome rewards as labels.

Resuming: rerunning the same call with the same ``out_dir`` (after a SIGKILL, or after
``max_seconds`` stopped it) restores the latest checkpoint and continues with the batches and
the learning-rate schedule of the whole run, so it ends with the parameters of an
uninterrupted run. The checkpoint folder is checked against ``run_config`` (default: the
method, its settings, ``cfg`` and a fingerprint of the data; `default_run_config`), so a rerun
with other settings or other data is refused instead of silently mixed.

The frozen reference model travels as the train state's ``extra`` (read under
``stop_gradient``, never updated).

``mesh`` (every ``run_*``): the device mesh of `train` (None: one device). The policy, its
optimizer state and the reference are placed by the sharding rules (the reference like the
policy), each batch is split over ``data`` x ``fsdp`` (``cfg.batch_size`` must divide over them),
and on a multi-host run each process builds only its rows of every global batch
(`qstar_jax.distributed.data_shard`). The mesh may change when a run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qstar_jax.data.pipeline import process_rows
from qstar_jax.data.reasoning import (
  PreferencePair,
  Trajectory,
  TrajectoryBatch,
  pair_batches,
  trajectory_batches,
)
from qstar_jax.distributed import data_shard
from qstar_jax.training.arithmetic_policy import sft_loss_fn
from qstar_jax.training.config import config_to_dict
from qstar_jax.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from qstar_jax.training.run_setup import check_batch_sizes, host_local, mesh_ignore_keys
from qstar_jax.training.train_loop import TrainLoopConfig, TrainResult, train
from qstar_jax.training.value_learning import (
  check_reference_vocabulary,
  dpo_loss_fn,
  implicit_prm_loss_fn,
  oreo_loss_fn,
)

__all__ = [
  "ValueRunConfig",
  "data_fingerprint",
  "default_run_config",
  "response_pairs",
  "run_oreo",
  "run_preference",
  "run_prm",
  "run_sft",
]

# Pad bucket of the batches' token width when ``cfg.width`` is None (few distinct shapes).
WIDTH_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class ValueRunConfig:
  """Settings shared by every method's run."""

  num_steps: int = 200            # optimizer steps (also the schedule's length)
  batch_size: int = 16            # examples (pairs or trajectories) per optimizer step
  seed: int = 0                   # batch order and the step keys
  optim: OptimizerConfig = dataclasses.field(
    default_factory=lambda: OptimizerConfig(lr=1e-4, warmup_steps=20, weight_decay=0.0))
  accum_steps: int = 1            # micro-batches per optimizer step (divides batch_size)
  checkpoint_every: int = 50      # 0: only at the end
  log_every: int = 10
  max_to_keep: int = 2
  width: int | None = None        # token width of the padded batches (None: the data's max)

  def loop_config(self) -> TrainLoopConfig:
    return TrainLoopConfig(num_steps=self.num_steps, accum_steps=self.accum_steps,
                           eval_every=0, checkpoint_every=self.checkpoint_every,
                           log_every=self.log_every, max_to_keep=self.max_to_keep,
                           seed=self.seed)


# ------------------------------------------------------------------------------ host checks


def _check_config(cfg: ValueRunConfig) -> None:
  for name in ("num_steps", "batch_size", "accum_steps"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"ValueRunConfig.{name} = {getattr(cfg, name)}: expected >= 1")
  if cfg.batch_size % cfg.accum_steps:
    raise ValueError(f"ValueRunConfig.batch_size = {cfg.batch_size} is not divisible by "
                     f"accum_steps = {cfg.accum_steps}")
  if cfg.width is not None and cfg.width < 2:
    raise ValueError(f"ValueRunConfig.width = {cfg.width}: expected >= 2 or None")


def _check_pairs(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
  pairs = list(pairs)
  if not pairs:
    raise ValueError("no preference pairs: expected at least one")
  for i, pair in enumerate(pairs):
    if not isinstance(pair, PreferencePair):
      raise ValueError(f"pairs[{i}] is a {type(pair).__name__}: expected a PreferencePair")
    if pair.chosen_ids == pair.rejected_ids:
      raise ValueError(f"pairs[{i}] has identical chosen and rejected ids {list(pair.chosen_ids)}"
                       ": expected two different responses (no preference otherwise)")
  return pairs


def _check_trajectories(trajectories: Sequence[Trajectory], method: str) -> list[Trajectory]:
  trajectories = list(trajectories)
  if not trajectories:
    raise ValueError(f"{method}: no trajectories: expected at least one")
  for i, traj in enumerate(trajectories):
    if not isinstance(traj, Trajectory):
      raise ValueError(f"{method}: trajectories[{i}] is a {type(traj).__name__}: expected a "
                       "Trajectory")
  return trajectories


def data_fingerprint(records: Sequence[Trajectory | PreferencePair]) -> str:
  """A sha256 (hex, 16 digits) of the records' JSON: what a checkpoint folder was trained on."""
  digest = hashlib.sha256()
  for record in records:
    digest.update(json.dumps(record.to_json(), sort_keys=True).encode())
  return digest.hexdigest()[:16]


def default_run_config(method: str, settings: Mapping[str, Any], cfg: ValueRunConfig,
                       records: Sequence[Trajectory | PreferencePair]) -> dict[str, Any]:
  """``{"method", "settings", "run": cfg as a dict, "data": {"num_examples", "fingerprint"}}``:
  what a run's checkpoint folder is checked against when no ``run_config`` is given."""
  return {"method": method, "settings": dict(settings), "run": config_to_dict(cfg),
          "data": {"num_examples": len(records), "fingerprint": data_fingerprint(records)}}


def response_pairs(trajectories: Sequence[Trajectory], *, threshold: float = 0.5,
                   max_pairs_per_problem: int | None = None) -> list[PreferencePair]:
  """Response-level preference pairs (DPO on sampled solutions): within each problem (the
  trajectories sharing one ``prompt_ids``), the k-th solution with ``reward > threshold``
  (chosen) against the k-th with ``reward <= threshold`` (rejected), ``k < min(#correct,
  #incorrect, max_pairs_per_problem)``, each in input order. The context is the prompt, each
  response all of a solution's steps; ``chosen_q`` / ``rejected_q`` are the rewards and
  ``record_index`` the chosen trajectory's index. Problems of one outcome give no pair.

  Examples:
    >>> ts = [Trajectory([1], [[5, 2]], 1.0), Trajectory([1], [[6, 2]], 0.0),
    ...       Trajectory([1], [[7, 2]], 1.0), Trajectory([3], [[5, 2]], 1.0)]
    >>> [(p.chosen_ids, p.rejected_ids) for p in response_pairs(ts)]
    [((5, 2), (6, 2))]
  """
  if max_pairs_per_problem is not None and max_pairs_per_problem < 1:
    raise ValueError(f"max_pairs_per_problem = {max_pairs_per_problem}: expected >= 1 or None")
  groups: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
  for i, traj in enumerate(trajectories):
    correct, incorrect = groups.setdefault(traj.prompt_ids, ([], []))
    (correct if traj.reward > threshold else incorrect).append(i)
  pairs = []
  for prompt, (correct, incorrect) in groups.items():
    for k, (c, r) in enumerate(zip(correct, incorrect, strict=False)):
      if max_pairs_per_problem is not None and k >= max_pairs_per_problem:
        break
      chosen, rejected = trajectories[c], trajectories[r]
      pairs.append(PreferencePair(
        context_ids=prompt, chosen_ids=chosen.ids[len(prompt):],
        rejected_ids=rejected.ids[len(prompt):], chosen_q=chosen.reward,
        rejected_q=rejected.reward, record_index=c))
  return pairs


# ------------------------------------------------------------------------------------- driver


def _run(loss_fn: Callable, params: Any, batches: Callable[[int], Iterator[Any]], *,
         cfg: ValueRunConfig, out_dir: str | os.PathLike, run_config: Mapping[str, Any],
         reference_params: Any, max_seconds: float, show_progress: bool | None,
         desc: str, mesh: Mesh | None) -> TrainResult:
  if mesh is not None:  # before anything compiles: the error names the config key
    check_batch_sizes(mesh, {"ValueRunConfig.batch_size": cfg.batch_size})
  shard = data_shard()
  if shard is not None:  # several processes: each builds its rows of every global batch
    global_batches = batches

    def batches(start_step: int) -> Iterator[Any]:
      return (process_rows(b, shard) for b in global_batches(start_step))

  total = cfg.optim.total_steps if cfg.optim.total_steps is not None else cfg.num_steps
  result = train(loss_fn, params, optimizer=make_optimizer(cfg.optim, total_steps=total),
                 train_batches=batches, config=cfg.loop_config(), out_dir=out_dir,
                 run_config=run_config, lr_fn=lr_schedule(cfg.optim, total_steps=total),
                 extra=reference_params, max_seconds=max_seconds, show_progress=show_progress,
                 progress_desc=desc, ignore_config_keys=mesh_ignore_keys(), mesh=mesh)
  if jax.process_count() == 1:
    return result
  # Several processes: the trained params whole on each (evaluation, saving on process 0).
  return dataclasses.replace(result, params=host_local(result.params))


def _trajectory_batches(trajectories: list[Trajectory], cfg: ValueRunConfig,
                        pad_id: int) -> Callable[[int], Iterator[TrajectoryBatch]]:
  def batches(start_step: int) -> Iterator[TrajectoryBatch]:
    return trajectory_batches(trajectories, batch_size=cfg.batch_size, seed=cfg.seed,
                              pad_id=pad_id, width=cfg.width, bucket=WIDTH_BUCKET,
                              start_step=start_step)

  return batches


# ----------------------------------------------------------------------------------- methods


def run_preference(
  graphdef: nnx.GraphDef, params: Any, pairs: Sequence[PreferencePair], *,
  reference_params: Any, pad_id: int, beta: float, mean_tokens: bool = False,
  label_smoothing: float = 0.0, cfg: ValueRunConfig, out_dir: str | os.PathLike,
  run_config: Mapping[str, Any] | None = None, max_seconds: float = 0.0,
  show_progress: bool | None = None, mesh: Mesh | None = None,
) -> TrainResult:
  """DPO (response-level pairs) or step-level DPO (``mean_tokens=True`` on step pairs) of the
  policy ``params`` against the frozen ``reference_params`` (`dpo_loss_fn`).

  Raises:
    ValueError: no pairs; a pair whose chosen and rejected ids are identical (named by index);
      a reference with another vocabulary; a bad ``cfg``.
  """
  pairs = _check_pairs(pairs)
  _check_config(cfg)
  check_reference_vocabulary(graphdef, params, reference_params)
  loss_fn = dpo_loss_fn(graphdef, beta=beta, label_smoothing=label_smoothing,
                        mean_tokens=mean_tokens)
  settings = {"beta": beta, "mean_tokens": mean_tokens, "label_smoothing": label_smoothing,
              "pad_id": pad_id}

  def batches(start_step: int):
    return pair_batches(pairs, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=pad_id,
                        width=cfg.width, bucket=WIDTH_BUCKET, start_step=start_step)

  return _run(loss_fn, params, batches, cfg=cfg, out_dir=out_dir,
              run_config=run_config or default_run_config("dpo", settings, cfg, pairs),
              reference_params=reference_params, max_seconds=max_seconds,
              show_progress=show_progress, mesh=mesh, desc="dpo")


def run_sft(
  graphdef: nnx.GraphDef, params: Any, trajectories: Sequence[Trajectory], *, pad_id: int,
  cfg: ValueRunConfig, out_dir: str | os.PathLike,
  run_config: Mapping[str, Any] | None = None, max_seconds: float = 0.0,
  show_progress: bool | None = None, mesh: Mesh | None = None,
) -> TrainResult:
  """Supervised fine-tuning on the trajectories' solution tokens: the mean next-token NLL over
  the step tokens (the prompt is context only), ``L = sum mask * nll / max(sum mask, 1)``.
  Rejection sampling is this run on the correct samples (reward > 0) of the policy itself.

  Raises:
    ValueError: no trajectories; a bad ``cfg``.
  """
  trajectories = _check_trajectories(trajectories, "run_sft")
  _check_config(cfg)
  nll_loss = sft_loss_fn(graphdef)

  def loss_fn(params, batch, rng_key):
    return nll_loss(params, {"tokens": batch.tokens,
                             "weights": jnp.asarray(batch.mask, jnp.float32)}, rng_key)

  return _run(loss_fn, params, _trajectory_batches(trajectories, cfg, pad_id), cfg=cfg,
              out_dir=out_dir,
              run_config=run_config or default_run_config("sft", {"pad_id": pad_id}, cfg,
                                                          trajectories),
              reference_params=None, max_seconds=max_seconds, show_progress=show_progress,
              mesh=mesh, desc="sft")


def run_oreo(
  graphdef: nnx.GraphDef, params: Mapping[str, Any], trajectories: Sequence[Trajectory], *,
  reference_params: Any, pad_id: int, beta: float = 0.03, alpha: float | None = 0.01,
  kl: str = "k3", step_level: bool = False, cfg: ValueRunConfig, out_dir: str | os.PathLike,
  run_config: Mapping[str, Any] | None = None, max_seconds: float = 0.0,
  show_progress: bool | None = None, log: Callable[[str], None] = print,
  mesh: Mesh | None = None,
) -> TrainResult:
  """OREO (`oreo_loss_fn`): the policy and its value model trained together on the
  trajectories' outcome rewards, KL-regularised towards the frozen ``reference_params``.

  ``params``: `oreo_params` (``{"policy", "value"}``, shared trunk; ``"value_trunk"`` for a
  separate value model). ``alpha`` None: OREO's default of the action level (0.01 token, 0.1
  step). Trajectories all of one outcome may run (the value still learns the level, the
  policy loss its KL and consistency terms) but carry no contrast: a message says so.

  Raises:
    ValueError: no trajectories; ``params`` not in the `oreo_params` layout; a reference with
      another vocabulary; a bad ``cfg``, ``beta``, ``alpha`` or ``kl``.
  """
  trajectories = _check_trajectories(trajectories, "run_oreo")
  _check_config(cfg)
  if not isinstance(params, Mapping) or not {"policy", "value"} <= set(params):
    raise ValueError("run_oreo: params must be a dict with 'policy' and 'value' (and optionally "
                     "'value_trunk'), as oreo_params(policy, value_head) builds them")
  check_reference_vocabulary(graphdef, params["policy"], reference_params)
  outcomes = sorted({t.reward for t in trajectories})
  if len(outcomes) == 1:
    log(f"run_oreo: all {len(trajectories)} trajectories have reward {outcomes[0]}: no contrast "
        "between outcomes, the value learns only their level")
  loss_fn = oreo_loss_fn(graphdef, beta=beta, alpha=alpha, kl=kl, step_level=step_level)
  settings = {"beta": beta, "alpha": alpha, "kl": kl, "step_level": step_level,
              "separate_value_model": "value_trunk" in params, "pad_id": pad_id}
  return _run(loss_fn, dict(params), _trajectory_batches(trajectories, cfg, pad_id), cfg=cfg,
              out_dir=out_dir,
              run_config=run_config or default_run_config("oreo", settings, cfg, trajectories),
              reference_params=reference_params, max_seconds=max_seconds,
              show_progress=show_progress, mesh=mesh, desc="oreo")


def run_prm(
  graphdef: nnx.GraphDef, params: Any, trajectories: Sequence[Trajectory], *,
  reference_params: Any, pad_id: int, beta: float, cfg: ValueRunConfig,
  out_dir: str | os.PathLike, run_config: Mapping[str, Any] | None = None,
  max_seconds: float = 0.0, show_progress: bool | None = None, mesh: Mesh | None = None,
) -> TrainResult:
  """Implicit PRM (PRIME, `implicit_prm_loss_fn`): the PRM ``params`` (initialised from the
  reference) trained by BCE of ``beta * sum_t log pi/pi_ref`` on the outcome labels (rewards
  in [0, 1]).

  Raises:
    ValueError: no trajectories; a reward outside [0, 1] (naming the trajectory); a reference
      with another vocabulary; a bad ``cfg``.
  """
  trajectories = _check_trajectories(trajectories, "run_prm")
  bad = [i for i, t in enumerate(trajectories) if not 0.0 <= t.reward <= 1.0]
  if bad:
    raise ValueError(f"run_prm: trajectories[{bad[0]}] has reward {trajectories[bad[0]].reward}"
                     ": expected an outcome label in [0, 1]")
  _check_config(cfg)
  check_reference_vocabulary(graphdef, params, reference_params)
  loss_fn = implicit_prm_loss_fn(graphdef, beta=beta)
  return _run(loss_fn, params, _trajectory_batches(trajectories, cfg, pad_id), cfg=cfg,
              out_dir=out_dir,
              run_config=run_config or default_run_config(
                "prm", {"beta": beta, "pad_id": pad_id}, cfg, trajectories),
              reference_params=reference_params, max_seconds=max_seconds,
              show_progress=show_progress, mesh=mesh, desc="prm")
