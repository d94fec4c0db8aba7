"""OREO (Wang et al. 2024) against SFT, rejection sampling and DPO, and OREO's value-guided
beam search, on the arithmetic task (CPU) or GSM8K (an accelerator preset).

  python -m experiments.oreo [preset=cpu] out=runs/oreo

- **SFT**: the starting policy (arithmetic: the committed policy, SFT'd on the task; gsm8k: a
  pretrained chat model, ``model=smollm2`` or an HF directory ``model=/path``).
- For each seed: ``sampling.num_samples`` solutions per train problem at temperature
  ``sampling.temperature`` with the verifier's outcomes (`sample_trajectories`, written to
  ``out/seed{S}/samples.jsonl`` and reused on rerun), then three runs from the SFT weights with
  the SFT model as the frozen reference (`qstar_jax.training.value_runs`, each in
  ``out/seed{S}/{method}/``, resumed on rerun):
  (a) ``rejection_sampling``: `run_sft` on the correct samples;
  (b) ``dpo``: `run_preference` on response-level pairs (`response_pairs`: a correct and an
  incorrect sample of one problem);
  (c) ``oreo``: `run_oreo` on all samples, policy + value head on the shared trunk (the value
  head initialised from the committed one; gsm8k: zeros), or with ``oreo_separate_value`` a
  separate value model initialised from the SFT policy (OREO's own setup: the value loss no
  longer moves the policy's trunk). Each run's compute record (steps,
  examples, seconds) is kept in its folder (``train_record.json``), so a rerun reports the
  run that trained, not the restore.
- Evaluation on test problems (`search.steps.tasks.evaluate`): greedy for every method, and
  ``oreo_beam``: OREO's value-guided step beam search (beam width B, B expansions per beam)
  with the OREO policy and its value head (``oreo_separate_value``: the value model's head on
  its own hidden states, `scorers.ModelValue`: a full-path forward per node, slower). Each
  evaluation is stored in ``out/evals.json`` as it
  finishes and skipped on rerun.
- ``out/stages_config.json`` records the settings (and, on the arithmetic task, the policy's
  fingerprint) those files were made with; a rerun into the same ``out`` with other settings
  stops with an error naming each change instead of reusing them (``seeds``, ``mesh`` and
  ``runtime`` may change).

Writes ``out/results.json`` (``{"config", "methods": {method: [accuracy per seed]},
"compute": {method: {...}}, "checks", "evals"}``), ``out/table.md`` (the paper's layout, its
GSM8K numbers beside, a line per acceptance check) and ``out/accuracy.png``.

Devices: ``mesh=`` ("" = all devices on data; e.g. ``mesh=fsdp=8``) is the mesh of the three
training runs (model and reference sharded by `qstar_jax.distributed`'s rules, each batch split
over data x fsdp: every method's ``batch_size`` must divide over them); ``runtime.*`` sets the
compilation cache and the multi-host start. Only process 0 writes; runs resume on another mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from qstar_jax.data.gsm8k import load_gsm8k
from qstar_jax.data.reasoning import Trajectory
from qstar_jax.distributed import RuntimeConfig
from qstar_jax.envs.grading import answers_match, stated_answer
from qstar_jax.models.arithmetic_policy import arithmetic_policy_fingerprint, load_arithmetic_policy
from qstar_jax.search.steps.methods import SearchBudget
from qstar_jax.search.steps.scorers import ModelValue, model_value_params
from qstar_jax.search.steps.step_tree import PolicyValueParams
from qstar_jax.search.steps.tasks import (
  ArithmeticTask,
  Gsm8kTask,
  SearchTask,
  arithmetic_task,
  gsm8k_prompt,
  gsm8k_task,
)
from qstar_jax.training.arithmetic_policy import generate_solutions
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.optim import OptimizerConfig
from qstar_jax.training.progress import PhaseTimer
from qstar_jax.training.reasoning_data import (
  TrajectorySampling,
  cached_trajectories,
  sample_arithmetic_trajectories,
  trajectories_from_generations,
)
from qstar_jax.training.results import (
  check_stages_config,
  evaluate_once,
  markdown_table,
  mean_spread,
  new_figure,
  read_json,
  save_plot,
  write_json,
  write_results,
)
from qstar_jax.training.run_setup import setup_run
from qstar_jax.training.value_learning import oreo_params
from qstar_jax.training.value_runs import (
  ValueRunConfig,
  response_pairs,
  run_oreo,
  run_preference,
  run_sft,
)

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "oreo"
METHODS = ("sft", "rejection_sampling", "dpo", "oreo", "oreo_beam")
TRAINED = ("rejection_sampling", "dpo", "oreo")
# Wang et al. 2024, Table 1 (Qwen2.5-Math-1.5B): GSM8K / MATH accuracy %; beam: relative gain.
PAPER_GSM8K = {"sft": 73.5, "rejection_sampling": 74.9, "dpo": 74.4, "oreo": 77.3}
PAPER_MATH = {"sft": 47.5, "rejection_sampling": 50.3, "dpo": 49.2, "oreo": 52.5}
PAPER_BEAM_GAIN = {"gsm8k": 11.4, "math": 17.9}


def _run_defaults(lr: float, steps: int) -> Callable[[], ValueRunConfig]:
  return lambda: ValueRunConfig(num_steps=steps, batch_size=32, checkpoint_every=50,
                                optim=OptimizerConfig(lr=lr, warmup_steps=10, weight_decay=0.0))


@dataclasses.dataclass(frozen=True)
class OreoExperimentConfig:
  out: str = "runs/oreo"
  task: str = "arithmetic"        # arithmetic | gsm8k
  model: str = ""                 # arithmetic: policy folder ("" = committed); gsm8k: name/dir
  seeds: tuple[int, ...] = (0, 1, 2)
  n_test_problems: int = 500
  eval_batch: int = 100
  max_step_tokens: int = 24
  max_depth: int = 6
  beam_width: int = 4             # oreo_beam: B beams x B expansions
  beam_temperature: float = 1.0   # oreo_beam: sampling temperature of the expansions
  sampling: TrajectorySampling = TrajectorySampling()
  dpo_beta: float = 0.1
  oreo_beta: float = 0.03
  oreo_alpha: float = 0.01
  oreo_separate_value: bool = False  # OREO's separate value model (a copy of the SFT policy)
  rejection_sampling: ValueRunConfig = dataclasses.field(default_factory=_run_defaults(1e-4, 200))
  dpo: ValueRunConfig = dataclasses.field(default_factory=_run_defaults(1e-5, 200))
  oreo: ValueRunConfig = dataclasses.field(default_factory=_run_defaults(1e-5, 200))
  # Where the training runs (may change on resume): "" = all devices on data, else "fsdp=8"...
  mesh: str = ""
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

  def batch_sizes(self) -> dict[str, int]:
    """The global batch sizes of the training runs, by config key (the mesh must divide them)."""
    return {f"{m}.batch_size": getattr(self, m).batch_size for m in TRAINED}


@dataclasses.dataclass(frozen=True)
class Setup:
  """The SFT policy, its value head and how to sample and grade train problems."""

  test: SearchTask                 # test problems; params = SFT policy + initial value head
  value_head: dict[str, Any]       # {"kernel" [D, 1], "bias" [1]}
  pad_id: int
  sample: Callable[[int], list[Trajectory]]   # seed -> trajectories on train problems


def arithmetic_setup(cfg: OreoExperimentConfig) -> Setup:
  policy = load_arithmetic_policy(cfg.model or None)
  test = arithmetic_task(ArithmeticTask(n_problems=cfg.n_test_problems, batch=cfg.eval_batch,
                                        policy=cfg.model, max_step_tokens=cfg.max_step_tokens))

  def sample(seed: int) -> list[Trajectory]:
    return sample_arithmetic_trajectories(policy, seed, cfg.sampling)

  return Setup(test=test, value_head=dict(test.params.value), pad_id=policy.pad_id,
               sample=sample)


def gsm8k_reward(text: str, reference: str) -> float:
  """1.0 when the solution states the reference answer (GSM8K grading), else 0.0."""
  return float(answers_match(stated_answer(text), reference))


def gsm8k_setup(cfg: OreoExperimentConfig) -> Setup:
  test = gsm8k_task(Gsm8kTask(model=cfg.model or "smollm2", n_problems=cfg.n_test_problems,
                              batch=cfg.eval_batch, max_step_tokens=cfg.max_step_tokens,
                              max_depth=cfg.max_depth))
  d = test.params.policy["embed_tokens"]["embedding"].value.shape[1]
  head = {"kernel": np.zeros((d, 1), np.float32), "bias": np.zeros((1,), np.float32)}
  s = cfg.sampling
  stop_ids = tuple(test.spec.stop_ids) + tuple(test.spec.eos_ids)

  def sample(seed: int) -> list[Trajectory]:
    records = load_gsm8k("train")
    order = np.random.default_rng(s.problem_seed + seed).permutation(len(records))
    chosen = [records[i] for i in order[:s.num_problems]]
    prompts = [gsm8k_prompt(test.tokenizer, r["question"]) for r in chosen
               for _ in range(s.num_samples)]
    gens = generate_solutions(test.graphdef, test.params.policy, jax.random.key(seed),
                              prompt_ids=prompts, greedy=False, temperature=s.temperature,
                              max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                              prompt_width=s.prompt_width, desc="samples")
    return trajectories_from_generations(
      prompts, gens, [r["final_answer"] for r in chosen for _ in range(s.num_samples)],
      tokenizer=test.tokenizer, stop_ids=stop_ids, reward_fn=gsm8k_reward,
      sample_keys=[(i, j) for i in range(len(chosen)) for j in range(s.num_samples)])

  return Setup(test=test, value_head=head, pad_id=test.spec.pad_id, sample=sample)


# ------------------------------------------------------------------------------------ stages


def _samples(setup: Setup, seed: int, path: pathlib.Path) -> list[Trajectory]:
  return cached_trajectories(path, lambda: setup.sample(seed))


def _train(method: str, setup: Setup, cfg: OreoExperimentConfig, seed: int,
           trajectories: list[Trajectory], out: pathlib.Path,
           mesh: Mesh | None = None) -> tuple[PolicyValueParams, dict]:
  """Trains one method of one seed (resumed from ``out``, on ``mesh``); its params and a compute
  record. OREO with ``cfg.oreo_separate_value``: ``params.value`` is ``{"model": the value
  model's Llama state, "head": its head}`` (`oreo_beam_scorer` reads it)."""
  t0 = time.perf_counter()
  graphdef, sft = setup.test.graphdef, setup.test.params.policy
  run_cfg = dataclasses.replace(getattr(cfg, method), seed=seed)
  common = dict(pad_id=setup.pad_id, cfg=run_cfg, out_dir=out, show_progress=True, mesh=mesh)
  if method == "rejection_sampling":
    data = [t for t in trajectories if t.reward > 0.5]
    result = run_sft(graphdef, sft, data, **common)
    params = PolicyValueParams(policy=result.params, value=setup.value_head)
  elif method == "dpo":
    data = response_pairs(trajectories)
    result = run_preference(graphdef, sft, data, reference_params=sft, beta=cfg.dpo_beta,
                            **common)
    params = PolicyValueParams(policy=result.params, value=setup.value_head)
  else:
    data = trajectories
    result = run_oreo(graphdef, oreo_params(sft, setup.value_head,
                                            separate_value_model=cfg.oreo_separate_value),
                      data, reference_params=sft, beta=cfg.oreo_beta, alpha=cfg.oreo_alpha,
                      **common)
    value = result.params["value"]
    if "value_trunk" in result.params:
      value = {"model": result.params["value_trunk"], "head": value}
    params = PolicyValueParams(policy=result.params["policy"], value=value)
  record_path = out / "train_record.json"
  if result.resumed_from == result.step and record_path.exists():
    return params, read_json(record_path)  # finished before: its own record
  record = {"train_examples": len(data), "train_steps": result.step,
            "batch_size": run_cfg.batch_size, "last_train_loss": result.last_train_loss,
            "train_seconds": time.perf_counter() - t0, "resumed_from": result.resumed_from,
            "steps_per_s": result.steps_per_s}
  return params, write_json(record_path, record)


def oreo_beam_scorer(task: SearchTask) -> dict[str, Any]:
  """`evaluate`'s scorer arguments for the OREO beam: none with the shared trunk (the task's
  value head on the policy's hidden states); with a separate value model (``params.value`` =
  ``{"model", "head"}``) its `ModelValue`."""
  value = task.params.value
  if not (isinstance(value, dict) and "model" in value):
    return {}
  return {"scorer": ModelValue(task.graphdef),
          "scorer_params": functools.partial(model_value_params, value["model"], value["head"])}


def _policy_head(params: PolicyValueParams) -> PolicyValueParams:
  """``params`` with a linear head as ``value`` (what greedy's tree reads, unused by it): a
  separate value model's ``{"model", "head"}`` gives its head."""
  value = params.value
  if isinstance(value, dict) and "model" in value:
    return PolicyValueParams(policy=params.policy, value=value["head"])
  return params


def acceptance_checks(methods: dict[str, list[float]]) -> list[dict[str, Any]]:
  """The issue's checks on the seed means: OREO greedy >= rejection sampling >= SFT, and
  OREO + beam >= OREO greedy; each ``{"check", "met", "values"}`` (values in %)."""
  mean = {m: 100 * float(np.mean(v)) for m, v in methods.items()}
  chains = (("oreo", "rejection_sampling", "sft"), ("oreo_beam", "oreo"))
  out = []
  for chain in chains:
    met = all(mean[a] >= mean[b] for a, b in zip(chain, chain[1:], strict=False))
    out.append({"check": " >= ".join(chain), "met": met,
                "values": {m: round(mean[m], 2) for m in chain}})
  return out


def make_table(results: dict[str, Any]) -> str:
  cfg, methods, compute = results["config"], results["methods"], results["compute"]
  n = cfg["n_test_problems"]
  rows = []
  for m in METHODS:
    if m not in methods:
      continue
    c = compute[m]
    paper = PAPER_GSM8K.get(m)
    if m == "oreo_beam":
      paper_text = f"+{PAPER_BEAM_GAIN['gsm8k']}% rel. over OREO"
    else:
      paper_text = f"{paper} / {PAPER_MATH[m]}"
    rows.append([m, mean_spread(methods[m]), ", ".join(f"{100 * a:.1f}" for a in methods[m]),
                 paper_text, c["tokens_decoded"], c.get("train_steps", 0),
                 c.get("train_examples", 0), c["seconds"]])
  md = [f"# OREO on {cfg['task']} ({n} test problems, seeds {cfg['seeds']})", "",
        "Accuracy % on the test problems: mean ± half-range over seeds, and each seed. The "
        "paper's numbers (Wang et al. 2024, Qwen2.5-Math-1.5B, GSM8K / MATH) are for reference "
        "only: another model and other tasks.", "",
        markdown_table(["method", "accuracy %", "per seed", "paper GSM8K / MATH",
                        "tokens decoded / problem", "train steps", "train examples",
                        "seconds (train + eval, per seed)"], rows, floatfmt=".1f"), ""]
  md += ["## Acceptance checks (seed means)", ""]
  for check in results["checks"]:
    values = ", ".join(f"{k} {v:.1f}" for k, v in check["values"].items())
    md.append(f"- {check['check']}: **{'met' if check['met'] else 'not met'}** ({values})")
  beam, greedy = np.mean(methods["oreo_beam"]), np.mean(methods["oreo"])
  if greedy > 0:
    md.append(f"- OREO beam vs OREO greedy: {100 * (beam / greedy - 1):+.1f}% relative "
              f"(paper: +{PAPER_BEAM_GAIN['gsm8k']}% GSM8K, +{PAPER_BEAM_GAIN['math']}% MATH)")
  data = results["data"]
  md += ["", "## Data per seed", "", markdown_table(
    ["seed", "samples", "correct share %", "problems with both outcomes", "DPO pairs"],
    [[s, d["samples"], 100 * d["correct_share"], d["mixed_problems"], d["pairs"]]
     for s, d in data.items()], floatfmt=".1f"), ""]
  return "\n".join(md)


def make_plot(out: pathlib.Path, results: dict[str, Any]) -> None:
  fig, ax = new_figure(figsize=(7, 4.5))
  methods = [m for m in METHODS if m in results["methods"]]
  for i, m in enumerate(methods):
    accs = 100 * np.asarray(results["methods"][m])
    ax.bar(i, accs.mean(), color="C0" if m != "oreo_beam" else "C1", alpha=0.6)
    ax.scatter(np.full(len(accs), i), accs, color="k", s=12, zorder=3)
  ax.set_xticks(range(len(methods)), methods, rotation=15)
  ax.set_ylabel("test accuracy %")
  ax.set_title(f"OREO on {results['config']['task']}: mean (bar) and seeds (dots)")
  ax.grid(axis="y", alpha=0.3)
  save_plot(fig, out / "accuracy.png")


def run(cfg: OreoExperimentConfig, *, mesh: Mesh | None = None) -> dict[str, Any]:
  """The experiment into ``cfg.out``; ``mesh``: the training runs' device mesh (None: one
  device; ``main`` passes the mesh of ``cfg.mesh``)."""
  if cfg.task not in ("arithmetic", "gsm8k"):
    raise ValueError(f"task = {cfg.task!r}: expected 'arithmetic' or 'gsm8k'")
  if not cfg.seeds:
    raise ValueError("seeds is empty: expected at least one seed")
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  inputs = ({"policy_fingerprint": arithmetic_policy_fingerprint(cfg.model or None)}
            if cfg.task == "arithmetic" else {})
  check_stages_config(out, {**config_to_dict(cfg), **inputs},
                      ignore=("out", "seeds", "mesh", "runtime"))
  timer = PhaseTimer()
  with timer.phase("setup"):
    setup = arithmetic_setup(cfg) if cfg.task == "arithmetic" else gsm8k_setup(cfg)
  evals_path = out / "evals.json"
  evals = read_json(evals_path) or {}
  greedy = SearchBudget(max_depth=cfg.max_depth)
  beam = SearchBudget(max_depth=cfg.max_depth, beam_width=cfg.beam_width,
                      expansions=cfg.beam_width, temperature=cfg.beam_temperature)
  methods: dict[str, list[float]] = {m: [] for m in METHODS}
  compute: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
  data: dict[str, Any] = {}

  def record(method: str, point: dict[str, Any], extra: dict[str, Any]) -> None:
    methods[method].append(point["accuracy"])
    for k, v in {"tokens_decoded": point["tokens_decoded"], "eval_seconds": point["seconds"],
                 **extra}.items():
      if isinstance(v, (int, float)) and v is not None:
        compute[method].setdefault(k, []).append(float(v))

  with timer.phase("eval"):
    sft_point = evaluate_once(evals, "sft/greedy", evals_path, setup.test, "greedy", greedy,
                              seed=0)
  for seed in cfg.seeds:
    seed_dir = out / f"seed{seed}"
    with timer.phase("sample"):
      t0 = time.perf_counter()
      trajectories = _samples(setup, seed, seed_dir / "samples.jsonl")
      sample_seconds = time.perf_counter() - t0
    rewards = np.array([t.reward for t in trajectories])
    data[str(seed)] = {"samples": len(trajectories), "correct_share": float(rewards.mean()),
                       "mixed_problems": len({r.context_ids for r in
                                              response_pairs(trajectories,
                                                             max_pairs_per_problem=1)}),
                       "pairs": len(response_pairs(trajectories)),
                       "sample_seconds": sample_seconds}
    # SFT is greedy-deterministic: the same figure for every seed.
    record("sft", sft_point, {"seconds": sft_point["seconds"]})
    for method in TRAINED:
      with timer.phase("train"):
        params, train_record = _train(method, setup, cfg, seed, trajectories,
                                      seed_dir / method, mesh)
      task = dataclasses.replace(setup.test, params=params)
      with timer.phase("eval"):
        point = evaluate_once(evals, f"seed{seed}/{method}/greedy", evals_path,
                              dataclasses.replace(task, params=_policy_head(params)), "greedy",
                              greedy, seed=seed)
        record(method, point, {**train_record,
                               "seconds": train_record["train_seconds"] + point["seconds"]})
        if method == "oreo":
          point = evaluate_once(evals, f"seed{seed}/oreo/beam", evals_path, task, "beam", beam,
                                seed=seed, **oreo_beam_scorer(task))
          record("oreo_beam", point, {**train_record, "seconds": train_record["train_seconds"]
                                      + point["seconds"]})
  results = {
    "config": config_to_dict(cfg),
    "methods": methods,
    "compute": {m: {k: float(np.mean(v)) for k, v in c.items()} for m, c in compute.items()},
    "checks": acceptance_checks(methods),
    "data": data,
    "evals": evals,
    "timings_s": timer.summary(),
  }
  write_results(out, results=results, table_md=make_table(results))
  make_plot(out, results)
  print(make_table(results))
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a.startswith("preset=") for a in argv):
    argv = ["preset=cpu", *argv]
  cfg = parse_config(OreoExperimentConfig, argv, presets_dir=PRESETS)
  return run(cfg, mesh=setup_run(cfg.mesh, cfg.runtime, batch_sizes=cfg.batch_sizes()))


if __name__ == "__main__":
  main()
