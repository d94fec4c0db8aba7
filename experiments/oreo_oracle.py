"""Would OREO beat rejection sampling here if its value could check arithmetic? A diagnostic
behind `experiments.oreo`'s unmet "OREO greedy >= rejection sampling" row.

  python -m experiments.oreo_oracle [preset=cpu] out=runs/oreo_oracle

OREO's learned value does not rank one problem's solutions on the arithmetic task (the policy's
errors are wrong results, and a value fitted to a few thousand outcomes does not check them).
This replaces the learned value by an **oracle** built from the task's line checker
(`envs.arithmetic.check_steps`) and trains only OREO's policy loss (`losses.oreo_policy_loss`)
with it, so the credit assignment OREO hopes its value gives is exact:

- ``V(s_t) = oracle_value`` (a constant ``p``) for every state up to and including the first
  wrong line of a failed sample, and 0 after it (the outcome is then settled); ``p`` for every
  state of a correct sample (`oracle_values`). The reward is the sample's outcome as in OREO.
- Everything else is `experiments.oreo`'s: the same samples (``sampling.*`` and the seeds give
  the same ``out/seed{S}/samples.jsonl``), SFT = the committed policy as the frozen reference,
  the k3 KL term, and rejection sampling (`value_runs.run_sft` on the correct samples) trained
  and evaluated in the same run as the baseline, greedy on the same test problems.

Each entry of ``variants`` (``{name: {oracle_value, beta, lr, num_steps}}``) is one oracle-OREO
run per seed (batch, warmup, alpha from ``oreo``/``oreo_alpha``). Runs resume from
``out/seed{S}/{name}/``; evaluations are kept in ``out/evals.json``.

Writes ``out/results.json`` (``{"config", "methods": {method: [accuracy per seed]}, "compute",
"data"}``), ``out/table.md`` and ``out/accuracy.png``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from qstar_jax.data.reasoning import Trajectory, TrajectoryBatch, trajectory_batches
from qstar_jax.envs.arithmetic import ArithmeticProblem, check_steps
from qstar_jax.losses import oreo_policy_loss, token_log_probs
from qstar_jax.models.arithmetic_policy import arithmetic_policy_fingerprint, load_arithmetic_policy
from qstar_jax.models.llama import apply
from qstar_jax.search.steps.methods import SearchBudget
from qstar_jax.search.steps.step_tree import PolicyValueParams
from qstar_jax.search.steps.tasks import ArithmeticTask, arithmetic_task
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
  evaluate_once,
  markdown_table,
  mean_spread,
  new_figure,
  read_json,
  save_plot,
  write_results,
)
from qstar_jax.training.train_loop import train
from qstar_jax.training.value_learning import reference_log_probs
from qstar_jax.training.value_runs import WIDTH_BUCKET, ValueRunConfig, run_sft

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "oreo_oracle"


def _default_variants() -> dict[str, dict[str, float]]:
  return {"oracle": {"oracle_value": 0.5, "beta": 0.3, "lr": 1e-4, "num_steps": 100}}


@dataclasses.dataclass(frozen=True)
class OreoOracleConfig:
  out: str = "runs/oreo_oracle"
  seeds: tuple[int, ...] = (0, 1, 2)
  n_test_problems: int = 500
  eval_batch: int = 100
  max_step_tokens: int = 24
  max_depth: int = 6
  sampling: TrajectorySampling = TrajectorySampling()
  oreo_alpha: float = 0.01
  rejection_sampling: ValueRunConfig = dataclasses.field(default_factory=lambda: ValueRunConfig(
    num_steps=60, batch_size=32, checkpoint_every=20,
    optim=OptimizerConfig(lr=1e-4, warmup_steps=5, weight_decay=0.0)))
  oreo: ValueRunConfig = dataclasses.field(default_factory=lambda: ValueRunConfig(
    num_steps=100, batch_size=16, checkpoint_every=50,     # batch, warmup, checkpoints
    optim=OptimizerConfig(lr=3e-5, warmup_steps=5, weight_decay=0.0)))
  variants: dict[str, dict[str, float]] = dataclasses.field(default_factory=_default_variants)


VARIANT_KEYS = ("oracle_value", "beta", "lr", "num_steps")


def check_variants(variants: Mapping[str, Mapping[str, float]]) -> None:
  """A ValueError naming the variant and key when an entry is missing a key or out of range."""
  if not variants:
    raise ValueError("variants is empty: expected at least one {name: {oracle_value, beta, lr, "
                     "num_steps}}")
  for name, v in variants.items():
    missing = [k for k in VARIANT_KEYS if k not in v]
    if missing or set(v) - set(VARIANT_KEYS):
      raise ValueError(f"variants.{name} = {dict(v)}: expected exactly the keys {VARIANT_KEYS}")
    if not 0.0 <= float(v["oracle_value"]) <= 1.0:
      raise ValueError(f"variants.{name}.oracle_value = {v['oracle_value']}: expected in [0, 1]")
    for k in ("beta", "lr", "num_steps"):
      if not float(v[k]) > 0:
        raise ValueError(f"variants.{name}.{k} = {v[k]}: expected > 0")


def first_wrong_step(trajectory: Trajectory) -> int:
  """The index of the first wrong line of a failed arithmetic sample (`check_steps`), or -1
  for a correct sample or one whose lines all check (then its error is in none of them)."""
  if trajectory.reward > 0.5:
    return -1
  record = trajectory.problem["problem"]
  problem = ArithmeticProblem(**{f.name: record[f.name]
                                 for f in dataclasses.fields(ArithmeticProblem)})
  verdicts = check_steps("".join(trajectory.step_texts), problem)
  return verdicts.index(False) if False in verdicts else -1


def oracle_values(step_index: np.ndarray, wrong_step: np.ndarray, p: float) -> np.ndarray:
  """``[B, W - 1]`` oracle V before each target token: ``p``, and 0 for the tokens of the steps
  after ``wrong_step [B]`` (-1: none) (their state already holds the wrong line).

  Examples:
    >>> oracle_values(np.array([[-1, 0, 0, 1, 1, 2], [-1, 0, 1, 1, -1, -1]]),
    ...               np.array([0, -1]), 0.5)
    array([[0.5, 0.5, 0.5, 0. , 0. , 0. ],
           [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], dtype=float32)
  """
  wrong = np.asarray(wrong_step)[:, None]
  after = (wrong >= 0) & (np.asarray(step_index) > wrong)
  return np.where(after, 0.0, p).astype(np.float32)


def oracle_batches(trajectories: Sequence[Trajectory], wrong_steps: Sequence[int],
                   cfg: ValueRunConfig, pad_id: int, p: float):
  """`trajectory_batches` as dicts with ``values`` (`oracle_values`) beside the usual fields;
  ``wrong_steps`` holds each trajectory's `first_wrong_step`, and rows are matched to their
  trajectory by their token ids."""
  wrong = {t.ids: w for t, w in zip(trajectories, wrong_steps, strict=True)}

  def batches(start_step: int):
    for b in trajectory_batches(trajectories, batch_size=cfg.batch_size, seed=cfg.seed,
                                pad_id=pad_id, width=cfg.width, bucket=WIDTH_BUCKET,
                                start_step=start_step):
      lengths = 1 + np.argmax(np.cumsum(b.step_index >= 0, axis=1), axis=1)
      row_wrong = np.array([wrong[tuple(int(i) for i in row[:n + 1])]
                            for row, n in zip(b.tokens, lengths, strict=True)], np.int32)
      out = {f.name: getattr(b, f.name) for f in dataclasses.fields(TrajectoryBatch)}
      out["values"] = oracle_values(b.step_index, row_wrong, p)
      yield out

  return batches


def oracle_loss_fn(graphdef: Any, *, beta: float, alpha: float):
  """OREO's policy loss with ``batch["values"]`` as V (nothing else trained)."""

  def loss_fn(params, batch, rng_key, extra=None):
    del rng_key
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    mask = jnp.asarray(batch["mask"]).astype(bool)
    logits, _ = apply(graphdef, params, tokens[:, :-1])
    lp = token_log_probs(logits, tokens[:, 1:], mask)
    ref = reference_log_probs(graphdef, extra, tokens, mask)
    loss = oreo_policy_loss(jnp.asarray(batch["values"]), lp, ref, batch["rewards"], mask,
                            beta=beta, alpha=alpha)
    return loss.mean(), {}

  return loss_fn


def run(cfg: OreoOracleConfig) -> dict[str, Any]:
  check_variants(cfg.variants)
  if not cfg.seeds:
    raise ValueError("seeds is empty: expected at least one seed")
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  check_stages_config(out, {**config_to_dict(cfg),
                            "policy_fingerprint": arithmetic_policy_fingerprint(None)},
                      ignore=("out", "seeds"))
  timer = PhaseTimer()
  with timer.phase("setup"):
    policy = load_arithmetic_policy()
    test = arithmetic_task(ArithmeticTask(n_problems=cfg.n_test_problems, batch=cfg.eval_batch,
                                          max_step_tokens=cfg.max_step_tokens))
  graphdef, sft, pad_id = test.graphdef, test.params.policy, policy.pad_id
  evals_path = out / "evals.json"
  evals = read_json(evals_path) or {}
  greedy = SearchBudget(max_depth=cfg.max_depth)

  def evaluate_policy(key: str, params: Any, seed: int) -> dict[str, Any]:
    """Greedy accuracy of ``params`` on the test problems, kept in ``evals.json``."""
    task = dataclasses.replace(test, params=PolicyValueParams(policy=params,
                                                              value=test.params.value))
    with timer.phase("eval"):
      return evaluate_once(evals, key, evals_path, task, "greedy", greedy, seed=seed)

  methods: dict[str, list[float]] = {"sft": [], "rejection_sampling": [],
                                     **{f"oracle_oreo/{n}": [] for n in cfg.variants}}
  compute: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
  data: dict[str, Any] = {}
  sft_point = evaluate_policy("sft/greedy", sft, 0)

  for seed in cfg.seeds:
    seed_dir = out / f"seed{seed}"
    with timer.phase("sample"):
      trajectories = cached_trajectories(
        seed_dir / "samples.jsonl",
        lambda s=seed: sample_arithmetic_trajectories(policy, s, cfg.sampling))
    wrong = [first_wrong_step(t) for t in trajectories]
    failed = [w for w, t in zip(wrong, trajectories, strict=True) if t.reward <= 0.5]
    data[str(seed)] = {"samples": len(trajectories),
                       "correct_share": float(np.mean([t.reward for t in trajectories])),
                       "failed_with_a_wrong_line": float(np.mean([w >= 0 for w in failed]))
                       if failed else 0.0}
    methods["sft"].append(sft_point["accuracy"])
    t0 = time.perf_counter()
    with timer.phase("train"):
      result = run_sft(graphdef, sft, [t for t in trajectories if t.reward > 0.5], pad_id=pad_id,
                       cfg=dataclasses.replace(cfg.rejection_sampling, seed=seed),
                       out_dir=seed_dir / "rejection_sampling", show_progress=True)
    if result.resumed_from != result.step:  # trained here, not restored whole
      compute["rejection_sampling"].setdefault("train_seconds", []).append(
        time.perf_counter() - t0)
    point = evaluate_policy(f"seed{seed}/rejection_sampling/greedy", result.params, seed)
    methods["rejection_sampling"].append(point["accuracy"])
    for name, v in cfg.variants.items():
      run_cfg = dataclasses.replace(
        cfg.oreo, seed=seed, num_steps=int(v["num_steps"]),
        optim=dataclasses.replace(cfg.oreo.optim, lr=float(v["lr"])))
      t0 = time.perf_counter()
      with timer.phase("train"):
        result = train(
          oracle_loss_fn(graphdef, beta=float(v["beta"]), alpha=cfg.oreo_alpha), sft,
          optimizer=make_optimizer(run_cfg.optim, total_steps=run_cfg.num_steps),
          train_batches=oracle_batches(trajectories, wrong, run_cfg, pad_id,
                                       float(v["oracle_value"])),
          config=run_cfg.loop_config(), out_dir=seed_dir / name,
          run_config={"variant": dict(v), "run": config_to_dict(run_cfg),
                      "oreo_alpha": cfg.oreo_alpha},
          lr_fn=lr_schedule(run_cfg.optim, total_steps=run_cfg.num_steps), extra=sft,
          show_progress=True, progress_desc=f"oracle {name}")
      point = evaluate_policy(f"seed{seed}/{name}/greedy", result.params, seed)
      methods[f"oracle_oreo/{name}"].append(point["accuracy"])
      c = compute[f"oracle_oreo/{name}"]
      if result.resumed_from != result.step:  # trained here, not restored whole
        c.setdefault("train_seconds", []).append(time.perf_counter() - t0)
      c.setdefault("last_train_loss", []).append(float(result.last_train_loss or 0.0))
  results = {"config": config_to_dict(cfg), "methods": methods,
             "compute": {m: {k: float(np.mean(x)) for k, x in c.items()}
                         for m, c in compute.items()},
             "data": data, "evals": evals, "timings_s": timer.summary()}
  write_results(out, results=results, table_md=make_table(results))
  make_plot(out, results)
  print(make_table(results))
  return results


def make_table(results: dict[str, Any]) -> str:
  cfg, methods = results["config"], results["methods"]
  rs = float(np.mean(methods["rejection_sampling"]))
  rows = []
  for m, accs in methods.items():
    name = m.split("/", 1)[-1]
    v = cfg["variants"].get(name, {}) if m.startswith("oracle_oreo/") else {}
    settings = [f"{v[k]:g}" if k in v else "" for k in VARIANT_KEYS]
    rows.append([m, mean_spread(accs), ", ".join(f"{100 * a:.1f}" for a in accs),
                 f"{100 * (np.mean(accs) - rs):+.1f}", *settings,
                 results["compute"].get(m, {}).get("train_seconds", 0.0)])
  return "\n".join([
    f"# OREO's policy loss with an oracle value ({cfg['n_test_problems']} test problems, "
    f"seeds {cfg['seeds']})", "",
    "Greedy accuracy % after training; the oracle value is p up to the first wrong line of a "
    "failed sample and 0 after it. A diagnostic, not OREO: OREO learns its value.", "",
    markdown_table(["method", "accuracy %", "per seed", "vs rejection sampling",
                    "oracle p", "beta", "lr", "steps", "train seconds / seed"], rows,
                   floatfmt=".1f"), ""])


def make_plot(out: pathlib.Path, results: dict[str, Any]) -> None:
  fig, ax = new_figure(figsize=(8, 4.5))
  names = list(results["methods"])
  for i, m in enumerate(names):
    accs = 100 * np.asarray(results["methods"][m])
    ax.bar(i, accs.mean(), color="C1" if m.startswith("oracle") else "C0", alpha=0.6)
    ax.scatter(np.full(len(accs), i), accs, color="k", s=12, zorder=3)
  ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
  ax.set_ylabel("greedy test accuracy %")
  ax.set_title("OREO's policy loss with an oracle value vs rejection sampling")
  ax.grid(axis="y", alpha=0.3)
  save_plot(fig, out / "accuracy.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a.startswith("preset=") for a in argv):
    argv = ["preset=cpu", *argv]
  return run(parse_config(OreoOracleConfig, argv, presets_dir=PRESETS))


if __name__ == "__main__":
  main()
