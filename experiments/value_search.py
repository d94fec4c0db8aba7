"""The value-guided step searches rerun with each learned value: accuracy vs tokens in one table.

  python -m experiments.value_search [preset=cpu] out=runs/value_search

The policy is the committed arithmetic policy throughout (it samples every candidate step); only
the score of a node changes:
- `outcome`: its committed outcome-regression value head (a linear head on the policy's hidden
  state, fitted to the verifier outcome of its own samples);
- `step_dpo`: a Q-model trained by step-level DPO on MCTS-annotated sibling steps (Zhai et al.),
  `Q = beta * mean_tokens(log pi_q - log pi_ref)` of the node's step (`scorers.LogRatioQ`);
- `prm`: an implicit PRM trained on the outcome labels of N samples per problem (PRIME), the
  value of a partial solution `beta * sum of log pi_prm / pi_ref` so far (`scorers.PathLogRatio`);
- `oreo`: OREO's value model (OREO trained on the same samples, value head on its own trunk),
  read on the node's path (`scorers.ModelValue`).
Each value model is initialised from the policy; the policy is the frozen reference. Methods
(`search.steps.methods`): best-of-N by value, value-guided beam search, Q-guided selection
(K candidates per step); greedy and majority@N (no value) as baselines.

Stages (each writes its files and is skipped when they exist; a killed training run resumes
from its last checkpoint): `data/` (MCTS annotation of train problems with the verifier's
reward -> step pairs; N samples per problem with outcomes), `values/NAME/` (a value_runs run and
the trained model as an arithmetic-policy folder), `evals/` (one JSON per value and method).
`out/stages_config.json` records the settings and the policy's fingerprint the stages were made
with; a rerun into the same `out` with other settings (or a retrained policy) stops with an
error naming each change, instead of reading back stages made the old way (`values`, `methods`,
`mesh` and `runtime` may change freely).
Writes `results.json` (`{"config", "baselines": {METHOD: {...}}, "values": {VALUE: {METHOD:
{"accuracy", "tokens_decoded", "model_calls", "n_problems", "seconds", ...}}}, "data",
"training"}`), `table.md` and `accuracy_vs_tokens.png`.

Devices: `mesh=` ("" = all devices on data; e.g. `mesh=fsdp=8`) is the mesh of the value
trainings (model and reference sharded by `qstar_jax.distributed`'s rules, each batch split over
data x fsdp: every `training.*.batch_size` must divide over them); `runtime.*` sets the
compilation cache and the multi-host start. Only process 0 writes the stage files (`out` on a
disk every host sees); the other processes wait for them where they are read back.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from qstar_jax.data.reasoning import (
  PreferencePair,
  Trajectory,
  preference_pairs_from_annotations,
  read_reasoning_jsonl,
  write_reasoning_jsonl,
)
from qstar_jax.distributed import RuntimeConfig, is_main_process
from qstar_jax.envs.arithmetic import generate_problems, policy_prompt
from qstar_jax.models.arithmetic_policy import (
  ArithmeticPolicy,
  arithmetic_policy_fingerprint,
  load_arithmetic_policy,
  save_trained_policy,
)
from qstar_jax.search.steps.methods import SearchBudget
from qstar_jax.search.steps.scorers import (
  LogRatioQ,
  ModelValue,
  PathLogRatio,
  model_value_params,
  q_model_value_params,
)
from qstar_jax.search.steps.tasks import ArithmeticTask, arithmetic_task, evaluate
from qstar_jax.training.annotation import AnnotationConfig, annotate_with_mcts
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.optim import OptimizerConfig
from qstar_jax.training.reasoning_data import sample_trajectories
from qstar_jax.training.results import (
  check_stages_config,
  markdown_table,
  read_json,
  save_plot,
  write_json,
  write_results,
)
from qstar_jax.training.run_setup import setup_run, sync_processes
from qstar_jax.training.value_learning import oreo_params
from qstar_jax.training.value_runs import ValueRunConfig, run_oreo, run_preference, run_prm

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "value_search"
VALUES = ("outcome", "step_dpo", "prm", "oreo")
METHODS = ("best_of_n", "beam", "q_guided")
BASELINES = ("greedy", "majority")


def _run(steps: int, lr: float) -> ValueRunConfig:
  return ValueRunConfig(num_steps=steps, batch_size=16, checkpoint_every=50, log_every=10,
                        optim=OptimizerConfig(lr=lr, warmup_steps=10, weight_decay=0.0))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  train_start: int = 20000          # train-split problems from this index (past the SFT ones)
  annotate_problems: int = 128      # MCTS-annotated problems (step-DPO pairs)
  min_q_gap: float = 0.5            # smallest chosen - rejected Q kept (drops rollout noise)
  annotation: AnnotationConfig = dataclasses.field(
    default_factory=lambda: AnnotationConfig(num_actions=4, num_simulations=16, temperature=0.7))
  sample_problems: int = 256        # problems sampled N times (OREO, PRM)
  samples_per_problem: int = 4
  sample_temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class ValuesConfig:
  step_dpo_beta: float = 0.1
  step_dpo: ValueRunConfig = dataclasses.field(default_factory=lambda: _run(100, 1e-4))
  prm_beta: float = 0.05
  prm: ValueRunConfig = dataclasses.field(default_factory=lambda: _run(100, 1e-4))
  oreo_beta: float = 0.03
  oreo: ValueRunConfig = dataclasses.field(default_factory=lambda: _run(100, 1e-4))


@dataclasses.dataclass(frozen=True)
class ValueSearchConfig:
  out: str = "runs/value_search"
  seed: int = 0
  values: tuple[str, ...] = VALUES
  methods: tuple[str, ...] = METHODS
  task: ArithmeticTask = dataclasses.field(
    default_factory=lambda: ArithmeticTask(n_problems=200, batch=50, scales=(1.0,)))
  budget: SearchBudget = dataclasses.field(
    default_factory=lambda: SearchBudget(num_samples=8, beam_width=4, expansions=4,
                                         q_candidates=5, temperature=0.7, max_depth=6))
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  training: ValuesConfig = dataclasses.field(default_factory=ValuesConfig)
  # Where the trainings run (may change on resume): "" = all devices on data, else "fsdp=8"...
  mesh: str = ""
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

  def batch_sizes(self) -> dict[str, int]:
    """The global batch sizes of the value trainings it runs, by config key."""
    return {f"training.{v}.batch_size": getattr(self.training, v).batch_size
            for v in self.values if v != "outcome"}


# ---------------------------------------------------------------------------------- helpers

# Settings that never change a stage's files: free to differ between runs into one out dir.
STAGES_IGNORE = ("out", "values", "methods", "mesh", "runtime")


def _check(cfg: ValueSearchConfig) -> None:
  bad = [v for v in cfg.values if v not in VALUES]
  if bad:
    raise ValueError(f"values {bad}: expected a subset of {VALUES}")
  bad = [m for m in cfg.methods if m not in METHODS]
  if bad:
    raise ValueError(f"methods {bad}: expected a subset of {METHODS}")


# ---------------------------------------------------------------------------------- stages


def make_data(cfg: ValueSearchConfig, policy: ArithmeticPolicy, spec: Any,
              folder: pathlib.Path) -> dict[str, Any]:
  """Step pairs from MCTS annotation and N samples per problem (files in `folder`)."""
  d = cfg.data
  record = read_json(folder / "data.json") or {}
  if "annotation" not in record:
    problems = generate_problems(cfg.seed, d.annotate_problems, split="train",
                                 start=d.train_start)
    prompts = [policy.prompt_ids(policy_prompt(p.question, prompt_format=policy.prompt_format))
               for p in problems]
    ann = annotate_with_mcts(policy.graphdef, policy.params, tokenizer=policy.tokenizer,
                             spec=spec, prompts=prompts, answers=[str(p.answer) for p in problems],
                             max_depth=cfg.budget.max_depth, cfg=d.annotation, seed=cfg.seed,
                             problems=[{"question": p.question, "answer": str(p.answer)}
                                       for p in problems])
    extraction = preference_pairs_from_annotations(ann.records, min_q_gap=d.min_q_gap)
    if is_main_process():
      folder.mkdir(parents=True, exist_ok=True)
      (folder / "annotations.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ann.records))
      write_reasoning_jsonl(folder / "pairs.jsonl", extraction.pairs)
    record["annotation"] = {
      "problems": len(problems), "pairs": len(extraction.pairs),
      "tokens_decoded_per_problem": ann.tokens_decoded, "seconds": ann.seconds,
      **{k: getattr(extraction, k) for k in ("num_depths", "skipped_few_q", "dropped_tie",
                                             "dropped_identical", "dropped_small_gap")}}
    write_json(folder / "data.json", record)
  if "samples" not in record:
    problems = generate_problems(cfg.seed, d.sample_problems, split="train",
                                 start=d.train_start + d.annotate_problems)
    t0 = time.perf_counter()
    samples = sample_trajectories(
      policy.graphdef, policy.params, jax.random.key(cfg.seed + 1), problems=problems,
      tokenizer=policy.tokenizer, num_samples=d.samples_per_problem,
      stop_ids=policy.step_stop_ids, prompt_format=policy.prompt_format,
      temperature=d.sample_temperature)
    if is_main_process():
      write_reasoning_jsonl(folder / "samples.jsonl", samples)
    record["samples"] = {"problems": len(problems), "trajectories": len(samples),
                         "correct_fraction": float(np.mean([t.reward > 0 for t in samples])),
                         "seconds": time.perf_counter() - t0}
    write_json(folder / "data.json", record)
  sync_processes(f"value_search data {folder}")
  return record


def _save_model(folder: pathlib.Path, policy: ArithmeticPolicy, params: Any,
                head: dict[str, Any], name: str) -> ArithmeticPolicy:
  if is_main_process():
    save_trained_policy(folder, policy, params, head, training=name,
                        readme=f"# {name} model of the arithmetic policy (experiments."
                               "value_search)\n")
  sync_processes(f"value_search model {folder}")
  return load_arithmetic_policy(folder)


def train_value(name: str, cfg: ValueSearchConfig, policy: ArithmeticPolicy,
                data: pathlib.Path, folder: pathlib.Path,
                mesh: Mesh | None = None) -> tuple[ArithmeticPolicy, dict]:
  """The trained model of value `name` (loaded when `folder/model` exists; trained on `mesh`,
  None: one device) and its record."""
  record = read_json(folder / "training.json")
  if record is not None and (folder / "model" / "config.json").is_file():
    return load_arithmetic_policy(folder / "model"), record
  t = cfg.training
  head = {k: np.asarray(v) for k, v in policy.value_head().items()}
  common = dict(reference_params=policy.params, pad_id=policy.pad_id, out_dir=folder / "run",
                mesh=mesh)
  t0 = time.perf_counter()
  if name == "step_dpo":
    pairs = read_reasoning_jsonl(data / "pairs.jsonl", PreferencePair)
    result = run_preference(policy.graphdef, policy.params, pairs, beta=t.step_dpo_beta,
                            mean_tokens=True, cfg=t.step_dpo, **common)
    params, examples, run = result.params, len(pairs), t.step_dpo
  else:
    samples = read_reasoning_jsonl(data / "samples.jsonl", Trajectory)
    examples = len(samples)
    if name == "prm":
      result = run_prm(policy.graphdef, policy.params, samples, beta=t.prm_beta, cfg=t.prm,
                       **common)
      params, run = result.params, t.prm
    else:
      result = run_oreo(policy.graphdef, oreo_params(policy.params, head), samples,
                        beta=t.oreo_beta, cfg=t.oreo, **common)
      params, run = result.params["policy"], t.oreo
      head = {k: np.asarray(v) for k, v in result.params["value"].items()}
  record = {"examples": examples, "steps": run.num_steps, "final_train_loss":
            result.last_train_loss, "seconds": time.perf_counter() - t0,
            "resumed_from": result.resumed_from}
  model = _save_model(folder / "model", policy, params, head, name)
  write_json(folder / "training.json", record)
  return model, record


def scorer_for(name: str, cfg: ValueSearchConfig, policy: ArithmeticPolicy,
               model: ArithmeticPolicy) -> tuple[Any, Callable[[Any, Any], Any]]:
  """(scorer, scorer_params) of a learned value for `tasks.evaluate`."""
  t = cfg.training
  if name == "step_dpo":
    return LogRatioQ(policy.graphdef, beta=t.step_dpo_beta), (
      lambda tokens, lengths: q_model_value_params(model.params, policy.params, tokens, lengths))
  if name == "prm":
    return PathLogRatio(policy.graphdef, beta=t.prm_beta), (
      lambda tokens, lengths: q_model_value_params(model.params, policy.params, tokens, lengths))
  head = model.value_head()
  return ModelValue(policy.graphdef), (
    lambda tokens, lengths: model_value_params(model.params, head, tokens, lengths))


# ---------------------------------------------------------------------------------- outputs


def make_table(results: dict[str, Any]) -> str:
  greedy = results["baselines"].get("greedy", {})
  g_acc, g_tok = greedy.get("accuracy"), greedy.get("tokens_decoded")
  rows = [["(none)", m, 100 * r["accuracy"], r["tokens_decoded"],
           r["tokens_decoded"] / g_tok if g_tok else float("nan"), r["seconds"]]
          for m, r in results["baselines"].items()]
  for value, methods in results["values"].items():
    rows += [[value, m, 100 * r["accuracy"], r["tokens_decoded"],
              r["tokens_decoded"] / g_tok if g_tok else float("nan"), r["seconds"]]
             for m, r in methods.items()]
  n = results["config"]["task"]["n_problems"]
  md = ["# Value-guided step searches with each learned value (arithmetic task)", "",
        f"The committed policy samples every step; {n} test problems; seed "
        f"{results['config']['seed']}. Tokens: tokens the policy decoded per problem (the value "
        "models' own forwards are in the seconds, not the tokens).", "",
        markdown_table(["value", "method", "accuracy %", "tokens / problem", "x greedy tokens",
                        "seconds"], rows, floatfmt=".1f"), ""]
  if g_acc is not None:
    md += ["Against greedy (" + f"{100 * g_acc:.1f}%" + "):", ""]
    for value, methods in results["values"].items():
      best = max(methods.items(), key=lambda kv: kv[1]["accuracy"])
      md.append(f"- {value}: best {best[0]} {100 * best[1]['accuracy']:.1f}% "
                f"({100 * (best[1]['accuracy'] - g_acc):+.1f} points)")
    md.append("")
  md += ["## Data and training", "", "```", json.dumps({"data": results["data"],
                                                       "training": results["training"]},
                                                      indent=1), "```", ""]
  return "\n".join(md)


def make_plot(out: pathlib.Path, results: dict[str, Any]) -> None:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(7, 4.5))
  markers = {"best_of_n": "o", "beam": "s", "q_guided": "^"}
  for i, (value, methods) in enumerate(results["values"].items()):
    for method, r in methods.items():
      ax.scatter(r["tokens_decoded"], 100 * r["accuracy"], color=f"C{i}",
                 marker=markers.get(method, "x"), label=f"{value} / {method}")
  for j, (method, r) in enumerate(results["baselines"].items()):
    ax.axhline(100 * r["accuracy"], color="k", ls="--" if j == 0 else ":", lw=1,
               label=f"{method} ({r['tokens_decoded']:.0f} tokens)")
  ax.set_xscale("log")
  ax.set_xlabel("tokens decoded per problem")
  ax.set_ylabel("accuracy %")
  ax.set_title("value-guided searches, one learned value per colour")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  save_plot(fig, out / "accuracy_vs_tokens.png")


def run(cfg: ValueSearchConfig, *, mesh: Mesh | None = None) -> dict[str, Any]:
  """The experiment into ``cfg.out``; ``mesh``: the value trainings' device mesh (None: one
  device; ``main`` passes the mesh of ``cfg.mesh``)."""
  _check(cfg)
  out = pathlib.Path(cfg.out)
  check_stages_config(
    out, {**config_to_dict(cfg),
          "policy_fingerprint": arithmetic_policy_fingerprint(cfg.task.policy or None)},
    ignore=STAGES_IGNORE)
  task = arithmetic_task(cfg.task)
  policy = load_arithmetic_policy(cfg.task.policy or None)
  results: dict[str, Any] = {"config": config_to_dict(cfg), "baselines": {}, "values": {},
                             "data": {}, "training": {}}
  learned = [v for v in cfg.values if v != "outcome"]
  if learned:
    results["data"] = make_data(cfg, policy, task.spec, out / "data")
  for method in BASELINES:
    path = out / "evals" / f"{method}.json"
    results["baselines"][method] = read_json(path) or write_json(
      path, evaluate(task, method, cfg.budget, seed=cfg.seed))
  for value in cfg.values:
    if value == "outcome":
      extra: dict[str, Any] = {}
    else:
      model, results["training"][value] = train_value(value, cfg, policy, out / "data",
                                                      out / "values" / value, mesh)
      scorer, scorer_params = scorer_for(value, cfg, policy, model)
      extra = {"scorer": scorer, "scorer_params": scorer_params}
    results["values"][value] = {}
    for method in cfg.methods:
      path = out / "evals" / f"{value}_{method}.json"
      entry = read_json(path)
      if entry is None:
        print(f"{value} / {method} ...", flush=True)
        entry = write_json(path, evaluate(task, method, cfg.budget, seed=cfg.seed, **extra))
      results["values"][value][method] = entry
      write_results(out, results=results, table_md=make_table(results))
  make_plot(out, results)
  write_results(out, results=results, table_md=make_table(results))
  print(make_table(results))
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(ValueSearchConfig, sys.argv[1:] if argv is None else argv,
                     presets_dir=PRESETS)
  _check(cfg)
  return run(cfg, mesh=setup_run(cfg.mesh, cfg.runtime, batch_sizes=cfg.batch_sizes()))


if __name__ == "__main__":
  main()
