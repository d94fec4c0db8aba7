"""Does OREO's value, fitted to outcomes, learn to rank one problem's solutions with more
training? A diagnostic behind `experiments.oreo`'s unmet "OREO beam >= OREO greedy" row.

  python -m experiments.oreo_value_fit [preset=cpu] out=runs/oreo_value_fit

OREO's value loss with the policy at its reference (pi = pi_ref, so every log-ratio is 0) is
the regression of ``V(s_t)`` on the sample's outcome R at every state of the solution; it is
where OREO's value starts and what it fits while the policy stays near the reference. Here a
value model initialised as OREO's (a separate copy of the committed policy's trunk, the
committed value head) is trained on it over the samples of ``train_seeds`` (`experiments.oreo`'s
sampling: the same ``out/seed{S}/samples.jsonl`` files for the same settings) and scored every
``eval_every`` steps on the samples of ``heldout_seed`` (other problems) by V before each
solution's last token:

- ``within_problem_auc``: do a problem's correct samples score above its wrong ones (what a
  value-guided beam or best-of-N needs; `within_group_auc`);
- ``pooled_auc``: the same over all samples (also rewarded by telling easy problems from hard);
- ``best_of_n``: accuracy of each problem's top-scored sample, beside a random sample's
  accuracy and pass@N.

The run resumes from ``out/value/``; scores are kept in ``out/history.json``. Writes
``out/results.json`` (``{"config", "history": [{"step", ...}], "baselines", "data"}``),
``out/table.md`` and ``out/auc.png``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.data.reasoning import Trajectory, pad_trajectories, trajectory_batches
from qstar_jax.losses import oreo_value_loss
from qstar_jax.models.arithmetic_policy import arithmetic_policy_fingerprint, load_arithmetic_policy
from qstar_jax.models.llama import apply_hidden
from qstar_jax.search.steps.step_tree import linear_value
from qstar_jax.training.arithmetic_policy import binary_auc, within_group_auc
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from qstar_jax.training.progress import PhaseTimer
from qstar_jax.training.reasoning_data import (
  TrajectorySampling,
  cached_trajectories,
  sample_arithmetic_trajectories,
)
from qstar_jax.training.results import (
  check_stages_config,
  markdown_table,
  new_figure,
  read_json,
  save_plot,
  write_json,
  write_results,
)
from qstar_jax.training.train_loop import train
from qstar_jax.training.value_runs import WIDTH_BUCKET, ValueRunConfig

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "oreo_value_fit"


@dataclasses.dataclass(frozen=True)
class OreoValueFitConfig:
  out: str = "runs/oreo_value_fit"
  train_seeds: tuple[int, ...] = (0, 1)
  heldout_seed: int = 2
  sampling: TrajectorySampling = TrajectorySampling()
  run: ValueRunConfig = dataclasses.field(default_factory=lambda: ValueRunConfig(
    num_steps=3000, batch_size=32, checkpoint_every=500,
    optim=OptimizerConfig(lr=1e-4, warmup_steps=50, weight_decay=0.0)))
  eval_every: int = 500
  eval_batch: int = 256


def value_loss_fn(graphdef: Any):
  """OREO's value loss at pi = pi_ref (all log-ratios 0): mean_t (V(s_t) - R)^2 over the
  solution's states; ``params = {"trunk": Llama state, "head": {"kernel", "bias"}}``."""

  def loss_fn(params, batch, rng_key, extra=None):
    del rng_key, extra
    tokens = jnp.asarray(batch.tokens, jnp.int32)
    hidden, _ = apply_hidden(graphdef, params["trunk"], tokens[:, :-1])
    values = linear_value(params["head"], hidden)
    zeros = jnp.zeros(values.shape, jnp.float32)
    loss = oreo_value_loss(values, zeros, zeros, jnp.asarray(batch.rewards, jnp.float32),
                           jnp.asarray(batch.mask).astype(bool), beta=1.0)
    return loss.mean(), {}

  return loss_fn


def final_state_scorer(graphdef: Any, trajectories: list[Trajectory], pad_id: int,
                       batch: int):
  """``params -> [M]`` V before each trajectory's last token (its whole solution but the
  final token, e.g. EOS, read)."""
  padded = pad_trajectories(trajectories, pad_id=pad_id, bucket=WIDTH_BUCKET)
  last = np.asarray([len(t.ids) - 2 for t in trajectories], np.int32)

  @jax.jit
  def values_at(params, tokens, positions):
    hidden, _ = apply_hidden(graphdef, params["trunk"], tokens[:, :-1])
    values = linear_value(params["head"], hidden)
    return jnp.take_along_axis(values, positions[:, None], axis=1)[:, 0]

  def score(params) -> np.ndarray:
    return np.concatenate([np.asarray(values_at(params, padded.tokens[i:i + batch],
                                                last[i:i + batch]))
                           for i in range(0, len(trajectories), batch)])

  return score


def ranking_metrics(scores: np.ndarray, correct: np.ndarray,
                    groups: np.ndarray) -> dict[str, float]:
  """Within-problem and pooled AUC, and best-of-N accuracy (each group's first top score).

  Examples:
    >>> ranking_metrics(np.array([0.9, 0.1, 0.2, 0.8]), np.array([1, 0, 1, 0]),
    ...                 np.array([0, 0, 1, 1]))
    {'within_problem_auc': 0.5, 'pooled_auc': 0.75, 'best_of_n': 0.5}
  """
  correct = np.asarray(correct).astype(bool)
  best = [bool(correct[rows[np.argmax(scores[rows])]])
          for rows in (np.flatnonzero(groups == g) for g in np.unique(groups))]
  return {"within_problem_auc": within_group_auc(scores, correct, groups),
          "pooled_auc": binary_auc(scores, correct),
          "best_of_n": float(np.mean(best))}


def run(cfg: OreoValueFitConfig) -> dict[str, Any]:
  if not cfg.train_seeds or cfg.heldout_seed in cfg.train_seeds:
    raise ValueError(f"train_seeds = {cfg.train_seeds}, heldout_seed = {cfg.heldout_seed}: "
                     "expected at least one train seed and a held-out seed outside them")
  if cfg.eval_every < 1:
    raise ValueError(f"eval_every = {cfg.eval_every}: expected >= 1")
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  check_stages_config(out, {**config_to_dict(cfg),
                            "policy_fingerprint": arithmetic_policy_fingerprint(None)},
                      ignore=("out",))
  timer = PhaseTimer()
  with timer.phase("setup"):
    policy = load_arithmetic_policy()

  def samples(seed: int) -> list[Trajectory]:
    return cached_trajectories(out / f"seed{seed}" / "samples.jsonl",
                               lambda: sample_arithmetic_trajectories(policy, seed, cfg.sampling))

  with timer.phase("sample"):
    train_set = [t for s in cfg.train_seeds for t in samples(s)]
    heldout = samples(cfg.heldout_seed)
  correct = np.array([t.reward > 0.5 for t in heldout])
  groups = np.array([t.problem["problem_index"] for t in heldout])
  baselines = {"random_sample": float(correct.mean()),
               "pass_at_n": float(np.mean([correct[groups == g].any()
                                           for g in np.unique(groups)]))}
  graphdef = policy.graphdef
  score = final_state_scorer(graphdef, heldout, policy.pad_id, cfg.eval_batch)
  history_path = out / "history.json"
  history = {int(h["step"]): h for h in read_json(history_path) or []}

  def record(step: int, params: Any) -> None:
    if step not in history:
      with timer.phase("eval"):
        history[step] = {"step": step, **ranking_metrics(score(params), correct, groups)}
      write_json(history_path, [history[k] for k in sorted(history)])
      print(f"step {step}: {history[step]}", flush=True)

  params = {"trunk": jax.tree.map(jnp.copy, policy.params),
            "head": {k: jnp.asarray(v, jnp.float32) for k, v in policy.value_head().items()}}
  record(0, params)

  def on_step(step, state, metrics):
    del metrics
    if step % cfg.eval_every == 0:
      record(step, state.params)

  run_cfg = cfg.run
  with timer.phase("train"):
    result = train(
      value_loss_fn(graphdef), params,
      optimizer=make_optimizer(run_cfg.optim, total_steps=run_cfg.num_steps),
      train_batches=lambda start: trajectory_batches(
        train_set, batch_size=run_cfg.batch_size, seed=run_cfg.seed, pad_id=policy.pad_id,
        width=run_cfg.width, bucket=WIDTH_BUCKET, start_step=start),
      config=run_cfg.loop_config(), out_dir=out / "value",
      run_config={"run": config_to_dict(run_cfg), "train_seeds": list(cfg.train_seeds)},
      lr_fn=lr_schedule(run_cfg.optim, total_steps=run_cfg.num_steps), on_step=on_step,
      show_progress=True, progress_desc="value fit")
  record(result.step, result.params)
  results = {"config": config_to_dict(cfg), "history": [history[k] for k in sorted(history)],
             "baselines": baselines,
             "data": {"train_samples": len(train_set), "heldout_samples": len(heldout),
                      "heldout_problems": int(len(np.unique(groups)))},
             "timings_s": timer.summary()}
  write_results(out, results=results, table_md=make_table(results))
  make_plot(out, results)
  print(make_table(results))
  return results


def make_table(results: dict[str, Any]) -> str:
  d, b = results["data"], results["baselines"]
  rows = [[h["step"], h["within_problem_auc"], h["pooled_auc"], f"{100 * h['best_of_n']:.1f}"]
          for h in results["history"]]
  return "\n".join([
    f"# OREO's value fitted to outcomes: ranking {d['heldout_samples']} held-out samples "
    f"({d['heldout_problems']} problems), trained on {d['train_samples']}", "",
    f"A random sample is right {100 * b['random_sample']:.1f}% of the time, pass@N "
    f"{100 * b['pass_at_n']:.1f}%. Step 0: the committed policy's trunk and value head.", "",
    markdown_table(["step", "within-problem AUC", "pooled AUC", "best-of-N %"], rows,
                   floatfmt=".3f"), ""])


def make_plot(out: pathlib.Path, results: dict[str, Any]) -> None:
  fig, ax = new_figure(figsize=(7, 4.5))
  steps = [h["step"] for h in results["history"]]
  for key, label in (("within_problem_auc", "within-problem AUC"), ("pooled_auc", "pooled AUC")):
    ax.plot(steps, [h[key] for h in results["history"]], marker="o", label=label)
  ax.axhline(0.5, color="k", lw=0.8, ls=":")
  ax.set_xlabel("value-loss steps")
  ax.set_ylabel("AUC on held-out samples")
  ax.set_title("OREO's value fitted to outcomes")
  ax.legend()
  ax.grid(alpha=0.3)
  save_plot(fig, out / "auc.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a.startswith("preset=") for a in argv):
    argv = ["preset=cpu", *argv]
  return run(parse_config(OreoValueFitConfig, argv, presets_dir=PRESETS))


if __name__ == "__main__":
  main()
