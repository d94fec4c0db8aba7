"""Step-level Q-value models (Zhai et al. 2024) on the arithmetic task: MCTS annotation ->
step-DPO Q-model -> Q-guided selection, for the policy that made the data and a second one.

  python -m experiments.qvalue_stepdpo [preset=cpu] out=runs/qvalue_stepdpo

1. Policies. A = the committed arithmetic policy (or `policy=DIR`): it generates the training
   data. B = a second, different policy (`policy_b`: by default a 2-layer Llama, half A's
   layers, SFT'd 2,000 steps with another seed by `train_arithmetic_policy`) sharing A's
   tokenizer (A's `tokenizer.model` is copied into `out/policy_b` first), so the Q-model can
   score B's steps.
2. Annotation, per seed: MCTS episodes of A on train problems (`training.annotate_with_mcts`:
   `mcts_step_search`, episode, `value_source="rollout"`) with the verifier reward as the node score (`VerifierReward`: a
   finished solution scores 1 iff it states the reference answer), so the edges' Q-values are
   Monte Carlo outcome estimates; `mcts_annotations` -> `out/seed{s}/annotations.jsonl`; step
   pairs (chosen = highest-Q sibling, rejected = lowest, `preference_pairs_from_annotations`)
   -> `out/seed{s}/pairs.jsonl`.
3. Q-model, per seed: step-DPO (`run_preference(..., mean_tokens=True)`) initialised from A,
   reference = A (frozen), on the pairs of all but a held-out share of the problems; its pair
   accuracy (Q(chosen) > Q(rejected)) on the held-out pairs is the quick diagnostic. With
   `qmodel.synthetic_problems=N` the training pairs also hold one pair per line of the
   reference solutions of N other train problems (the line vs the same line with a perturbed
   result: `training.step_verifier.synthetic_step_pairs`), labelled steps in volume; the
   held-out pairs stay MCTS pairs only. With `qmodel.context=step` (arithmetic) every pair's
   context is the BOS id alone: the Q-model reads `[BOS] + step` (a line's arithmetic checks
   without its context), about 6x fewer tokens per pair than the path.
4. Evaluation on test problems (`generate_problems(seed, n, split="test")`), per seed and
   policy: greedy, and Q-guided selection: K candidate steps sampled from the policy, the one of
   highest `Q = beta * mean_tokens(log pi_q - log pi_A)` kept (`tasks.evaluate` with the
   scorer `LogRatioQ`: `q_guided_search` with `scored_expand(LogRatioQ(...))`; with
   `qmodel.context=step`, `LogRatioQ(step_alone_bos=A's BOS)`: both models read the candidate
   step alone, as the Q-model was trained). Compute: tokens the policy decoded per problem,
   model calls, seconds (the Q-model's forwards are in the seconds).
5. `out/results.json` (`{"config", "policies": {NAME: {"greedy": [acc per seed], "q_guided":
   [...]}}, "compute", ...}`, A first), `out/table.md` (mean +- spread, relative gains, the
   paper's numbers, the acceptance checks met / not met), `out/accuracy.png`.

Every stage writes its files and is skipped when they exist; a killed step-DPO run resumes from
its last checkpoint (`out/seed{s}/qmodel`). `out/stages_config.json` records the settings (and,
on the arithmetic task, policy A's fingerprint) the stages were made with; a rerun into the same
`out` with other settings stops with an error naming each change, instead of reading back
stages made the old way (`seeds`, `mesh` and `runtime` may change: more seeds add stages).

`task=gsm8k` (preset gpu): the same stages on GSM8K train / test questions with pretrained chat
models (`gsm8k.model` = A, `gsm8k.model_b` = B, which must share A's tokenizer), zero-shot
prompts, one step per line.

Devices: `mesh=` ("" = all devices on data; e.g. `mesh=fsdp=8`) is the mesh of the trainings
(policy B's SFT and the step-DPO Q-models: model and reference sharded by
`qstar_jax.distributed`'s rules, each batch split over data x fsdp, so `qmodel.run.batch_size`
and `policy_b.data.batch_size` must divide over them); `runtime.*` sets the compilation cache and
the multi-host start. Only process 0 writes the stage files (`out` on a disk every host sees).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qstar_jax.data.gsm8k import load_gsm8k
from qstar_jax.data.reasoning import (
  PreferencePair,
  pad_pairs,
  preference_pairs_from_annotations,
  write_reasoning_jsonl,
)
from qstar_jax.distributed import RuntimeConfig, is_main_process
from qstar_jax.envs.arithmetic import generate_problems, policy_prompt
from qstar_jax.envs.grading import answers_match, stated_answer
from qstar_jax.models import load_pretrained
from qstar_jax.models.arithmetic_policy import (
  ArithmeticPolicy,
  arithmetic_policy_fingerprint,
  load_arithmetic_policy,
)
from qstar_jax.models.decoding import delimiter_token_ids
from qstar_jax.search.steps.methods import SearchBudget
from qstar_jax.search.steps.scorers import (
  LogRatioQ,
  q_model_value_params,
)
from qstar_jax.search.steps.step_tree import PolicyValueParams, StepSpec
from qstar_jax.search.steps.tasks import GSM8K_FINAL_TEXTS, SearchTask, evaluate, gsm8k_prompt
from qstar_jax.training.annotation import AnnotationConfig as MctsAnnotationConfig
from qstar_jax.training.annotation import annotate_with_mcts
from qstar_jax.training.arithmetic_policy import (
  ArithmeticPolicyConfig,
  PolicyEvalConfig,
  PolicyModelConfig,
  SFTDataConfig,
  ValueFitConfig,
  train_arithmetic_policy,
)
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.optim import OptimizerConfig
from qstar_jax.training.results import (
  check_stages_config,
  markdown_table,
  new_figure,
  read_json,
  save_plot,
  write_json,
  write_results,
)
from qstar_jax.training.run_setup import setup_run, sync_processes
from qstar_jax.training.step_verifier import synthetic_step_pairs
from qstar_jax.training.train_loop import TrainLoopConfig
from qstar_jax.training.value_learning import check_reference_vocabulary, dpo_loss_fn
from qstar_jax.training.value_runs import ValueRunConfig, run_preference

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "qvalue_stepdpo"

# Zhai et al. 2024, Phi-3-mini: relative gain of Q-guided selection over the policy alone.
PAPER_RELATIVE_GAINS = {"WebShop": 1.03, "HotPotQA": 0.75}
# Synthetic step pairs of seed s come from generate_problems(SYNTHETIC_SEED_BASE + s, ...,
# "train"): train problems drawn with another seed than the annotated ones.
SYNTHETIC_SEED_BASE = 1000
SYNTHETIC_ACCURACY_PAIRS = 2048
# The acceptance: Q-guided >= 20% relative above greedy for the data-generating policy.
TARGET_RELATIVE_GAIN = 0.20


def _policy_b_default() -> ArithmeticPolicyConfig:
  return ArithmeticPolicyConfig(
    seed=1, model=PolicyModelConfig(num_layers=2),
    data=SFTDataConfig(corrupt_fraction=0.1, batch_size=16),
    loop=TrainLoopConfig(num_steps=2000, eval_every=0, checkpoint_every=500, log_every=50),
    eval=PolicyEvalConfig(num_test_problems=64, slice_problems=64, prompt_width=96,
                          majority_problems=0),
    value=ValueFitConfig(num_problems=32, samples_per_problem=2))


@dataclasses.dataclass(frozen=True)
class AnnotationConfig:
  num_problems: int = 128         # train problems per seed (MCTS episodes of policy A)
  # generate_problems(seed, n, split="train", start=train_start): past the committed policy's
  # SFT and value-fit problems of seed 0 (16,512), so seed 0 annotates unseen problems too.
  train_start: int = 20000
  batch: int = 64                 # problems per MCTS call
  num_actions: int = 4            # K candidate steps per node
  num_simulations: int = 16       # per decision
  mcts_policy: str = "gumbel_muzero"
  temperature: float = 1.0        # candidate and rollout sampling
  max_answer_chars: int = 24
  # Pairs whose Q gap is smaller are dropped: with a few rollouts per sibling a small gap is
  # mostly Monte Carlo noise (e.g. two wrong steps at Q 1/6 and 0).
  min_q_gap: float = 0.5


@dataclasses.dataclass(frozen=True)
class QModelConfig:
  beta: float = 0.1               # step-DPO beta (also the Q scale at selection)
  holdout_fraction: float = 0.2   # share of the annotated problems whose pairs are held out
  # arithmetic: step pairs from the reference solutions of this many train problems
  # (`training.step_verifier.synthetic_step_pairs`: each line vs the same line with a perturbed
  # result) added to the MCTS pairs of the training share; 0 = MCTS pairs only.
  synthetic_problems: int = 0
  # What the Q-model reads before a step: "path" = the prompt and the earlier steps (Zhai et
  # al.'s Q(s, a)); "step" = the policy's BOS id alone, so every pair's context is (BOS,) and
  # Q-guided selection scores [BOS] + the candidate step (arithmetic: a line's arithmetic
  # checks without its context; training reads ~10 tokens per sequence instead of ~60).
  context: str = "path"
  run: ValueRunConfig = dataclasses.field(default_factory=lambda: ValueRunConfig(
    num_steps=100, batch_size=16,
    optim=OptimizerConfig(lr=1e-4, warmup_steps=15, weight_decay=0.0), checkpoint_every=50))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_problems: int = 100         # test problems per seed: generate_problems(seed, n, "test")
  batch: int = 100
  num_candidates: int = 5         # K of the Q-guided selection
  temperature: float = 0.7        # the candidates' sampling temperature


@dataclasses.dataclass(frozen=True)
class Gsm8kPolicies:
  """task=gsm8k: pretrained chat models (registered name or HF directory), zero-shot prompts."""
  model: str = "smollm2"          # policy A (generates the data; the Q-model starts from it)
  model_b: str = ""               # policy B: an HF directory with A's tokenizer (required)
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class QValueConfig:
  out: str = "runs/qvalue_stepdpo"
  seeds: tuple[int, ...] = (0, 1, 2)
  task: str = "arithmetic"        # or "gsm8k" (train / test questions of GSM8K)
  policy: str = ""                # arithmetic: policy A's folder; "" = the committed policy
  gsm8k: Gsm8kPolicies = Gsm8kPolicies()
  policy_b: ArithmeticPolicyConfig = dataclasses.field(default_factory=_policy_b_default)
  max_depth: int = 6              # steps per solution at most (annotation and evaluation)
  max_step_tokens: int = 16
  annotation: AnnotationConfig = AnnotationConfig()
  qmodel: QModelConfig = QModelConfig()
  eval: EvalConfig = EvalConfig()
  # Where policy B's SFT and the Q-models train (may change on resume): "" = all devices on
  # data, else e.g. "fsdp=8" (policy_b.mesh / policy_b.runtime are not read: these are).
  mesh: str = ""
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

  def batch_sizes(self) -> dict[str, int]:
    """The global batch sizes of its trainings, by config key (the mesh must divide them)."""
    sizes = {"qmodel.run.batch_size": self.qmodel.run.batch_size}
    if self.task == "arithmetic":
      sizes["policy_b.data.batch_size"] = self.policy_b.data.batch_size
    return sizes


# ------------------------------------------------------------------------------------- helpers


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation; 0 for a single value)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("mean_spread: expected at least one value")
  return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def relative_gain(new: float, base: float) -> float:
  """(new - base) / base; NaN when base is 0."""
  return (new - base) / base if base else float("nan")


def holdout_split(pairs: Sequence[PreferencePair], *, num_records: int, fraction: float,
                  seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
  """(train, held-out) pairs: the pairs of a seeded `fraction` of the annotation records
  (problems) are held out, so no held-out context was trained on."""
  if not 0 <= fraction < 1:
    raise ValueError(f"holdout_fraction={fraction}: expected in [0, 1)")
  held = set(np.random.default_rng(seed).permutation(num_records)[:round(fraction * num_records)]
             .tolist())
  train = [p for p in pairs if p.record_index not in held]
  heldout = [p for p in pairs if p.record_index in held]
  if not train:
    raise ValueError(f"no training pair left after holding out {len(held)} of {num_records} "
                     "problems: lower qmodel.holdout_fraction or annotate more problems")
  return train, heldout


def acceptance_checks(policies: Mapping[str, Mapping[str, Sequence[float]]]) -> list[dict]:
  """The issue's checks on the per-seed accuracies (first policy = the data generator):
  Q-guided mean >= (1 + 20%) x greedy mean for it, Q-guided mean > greedy mean for the others."""
  checks = []
  for i, (name, acc) in enumerate(policies.items()):
    greedy, _ = mean_spread(acc["greedy"])
    guided, _ = mean_spread(acc["q_guided"])
    gain = relative_gain(guided, greedy)
    if i == 0:
      target = f"Q-guided >= {1 + TARGET_RELATIVE_GAIN:.2f} x greedy for {name} (data policy)"
      met = guided >= (1 + TARGET_RELATIVE_GAIN) * greedy
    else:
      target = f"Q-guided > greedy for {name} (transfer)"
      met = guided > greedy
    checks.append({"policy": name, "check": target, "met": bool(met), "greedy": greedy,
                   "q_guided": guided, "relative_gain": gain})
  return checks


def make_table(results: Mapping[str, Any]) -> str:
  """table.md: accuracy per policy and method (mean +- std over seeds), gains, compute, the
  paper's numbers and the acceptance checks."""
  seeds = results["config"]["seeds"]
  rows = []
  for name, acc in results["policies"].items():
    for method in ("greedy", "q_guided"):
      mean, spread = mean_spread(acc[method])
      comp = results["compute"][name][method]
      rows.append([name, method, f"{100 * mean:.1f} ± {100 * spread:.1f}",
                   " / ".join(f"{100 * a:.1f}" for a in acc[method]),
                   comp["tokens_decoded"], comp["model_calls"], comp["seconds"]])
  md = ["# Step-level Q-value model (step-DPO) on the arithmetic task", "",
        f"Seeds {seeds}; {results['config']['eval']['num_problems']} test problems per seed "
        "(a different test set per seed); mean ± sample std over seeds.", "",
        markdown_table(["policy", "method", "accuracy %", "per seed %", "tokens decoded / problem",
                        "model calls / seed", "seconds / seed"], rows, floatfmt=".1f"), "",
        "## Relative gain of Q-guided selection over greedy", ""]
  gains = [[c["policy"], f"{100 * c['greedy']:.1f}", f"{100 * c['q_guided']:.1f}",
            f"{100 * c['relative_gain']:+.1f}%"] for c in results["checks"]]
  md += [markdown_table(["policy", "greedy %", "Q-guided %", "relative gain"], gains), "",
         "Paper (Zhai et al. 2024, Phi-3-mini): "
         + ", ".join(f"{k} {100 * v:+.0f}% relative" for k, v in PAPER_RELATIVE_GAINS.items())
         + ".", "", "## Acceptance checks (issue 12)", ""]
  md += [f"- {c['check']}: **{'met' if c['met'] else 'not met'}** (greedy {100 * c['greedy']:.1f}%, "
         f"Q-guided {100 * c['q_guided']:.1f}%, {100 * c['relative_gain']:+.1f}% relative)"
         for c in results["checks"]]
  md += ["", "## Data and Q-model per seed", ""]
  md += [markdown_table(
    ["seed", "annotated problems", "MCTS pairs (train / held out)", "synthetic pairs",
     "dropped ties", "MCTS tokens / problem", "annotation s", "DPO steps", "DPO s",
     "held-out pair accuracy %", "MCTS train pair accuracy %", "synthetic pair accuracy %"],
    [[s["seed"], s["annotation"]["num_problems"],
      f"{s['qmodel']['train_pairs'] - s['qmodel'].get('synthetic_pairs', 0)} / "
      f"{s['qmodel']['heldout_pairs']}", s["qmodel"].get("synthetic_pairs", 0),
      s["qmodel"]["pairs"]["dropped_tie"], f"{s['annotation']['tokens_decoded']:.0f}",
      f"{s['annotation']['seconds']:.0f}", s["qmodel"]["steps"], f"{s['qmodel']['seconds']:.0f}",
      _pct(s["qmodel"]["heldout_pair_accuracy"]), _pct(s["qmodel"]["train_pair_accuracy"]),
      _pct(s["qmodel"].get("synthetic_pair_accuracy"))]
     for s in results["seeds"]])]
  stages = results["compute"].get("stage_seconds")
  if stages:
    md += ["", "Compute, seconds as each stage ran (compilation included): " + ", ".join(
      f"{k.replace('_', ' ')} {v:.0f} s" for k, v in stages.items() if k != "total")
      + f"; total {stages['total']:.0f} s ({stages['total'] / 60:.1f} min)."]
  held = [s["qmodel"]["heldout_pair_accuracy"] for s in results["seeds"]]
  held = [h for h in held if h is not None and h == h]
  if held:
    n_held = np.mean([s["qmodel"]["heldout_pairs"] for s in results["seeds"]])
    md += ["", f"Held-out pair accuracy of the Q-models (Q(chosen) > Q(rejected) on the pairs of "
           f"problems not trained on; 50% = chance): {100 * np.mean(held):.1f}% mean over "
           f"seeds, {n_held:.0f} held-out pairs per seed."]
  return "\n".join(md)


def _pct(x: float | None) -> str:
  return "n/a" if x is None or x != x else f"{100 * x:.1f}"


def make_plot(out: pathlib.Path, results: Mapping[str, Any]) -> None:
  fig, ax = new_figure(figsize=(6, 4))
  names = list(results["policies"])
  for j, method in enumerate(("greedy", "q_guided")):
    means = [100 * mean_spread(results["policies"][n][method])[0] for n in names]
    spreads = [100 * mean_spread(results["policies"][n][method])[1] for n in names]
    xs = np.arange(len(names)) + (j - 0.5) * 0.35
    ax.bar(xs, means, width=0.35, yerr=spreads, capsize=4, label=method)
    for i, n in enumerate(names):
      ax.scatter([xs[i]] * len(results["policies"][n][method]),
                 [100 * a for a in results["policies"][n][method]], color="k", s=8, zorder=3)
  ax.set_xticks(np.arange(len(names)), names)
  ax.set_ylabel("test accuracy %")
  k = results["config"]["eval"]["num_candidates"]
  ax.set_title(f"greedy vs Q-guided (K = {k}), step-DPO Q-model")
  ax.legend()
  ax.grid(alpha=0.3, axis="y")
  save_plot(fig, out / "accuracy.png")


# ---------------------------------------------------------------------------------- the stages


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class StepPolicy:
  """A policy as the stages use it: its split Llama, tokenizer, step definition and prompts."""
  name: str
  graphdef: nnx.GraphDef
  params: Any
  tokenizer: Any
  spec: StepSpec
  prompt: Callable[[str], list[int]]   # question -> prompt ids
  bos_id: int | None = None            # the id a step-alone Q-model reads before a step
  train_seconds: float | None = None   # what training it here cost (policy B), if it was


def _arithmetic_policy(tag: str, policy: ArithmeticPolicy, cfg: QValueConfig, *,
                       train_seconds: float | None = None) -> StepPolicy:
  c = policy.model_config
  return StepPolicy(
    name=f"{tag} ({c.num_layers} layers, width {c.hidden_size})", graphdef=policy.graphdef,
    params=policy.params, tokenizer=policy.tokenizer,
    spec=StepSpec(stop_ids=(policy.newline_id,), eos_ids=(policy.eos_id,),
                  max_step_tokens=cfg.max_step_tokens, pad_id=policy.pad_id),
    prompt=lambda q: [policy.bos_id, *policy.tokenizer.encode(
      policy_prompt(q, prompt_format=policy.prompt_format))],
    bos_id=policy.bos_id,
    train_seconds=train_seconds)


def _pretrained_policy(tag: str, spec: str, cfg: QValueConfig) -> StepPolicy:
  model, tokenizer = load_pretrained(spec, dtype=cfg.gsm8k.dtype)
  if tokenizer is None:
    raise ValueError(f"gsm8k model {spec!r} has no tokenizer; the search needs one")
  graphdef, params = nnx.split(model)
  markers = tuple(tuple(tokenizer.encode(t)) for t in GSM8K_FINAL_TEXTS)
  pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else 0
  step = StepSpec(stop_ids=delimiter_token_ids(tokenizer, "\n"),
                  eos_ids=tuple(tokenizer.eos_ids), max_step_tokens=cfg.max_step_tokens,
                  final_markers=markers, pad_id=pad)
  c = model.config
  return StepPolicy(name=f"{tag} ({pathlib.Path(spec).name}, {c.num_layers} layers)",
                    graphdef=graphdef, params=params, tokenizer=tokenizer, spec=step,
                    prompt=lambda q: gsm8k_prompt(tokenizer, q))


def load_policies(cfg: QValueConfig, out: pathlib.Path, *,
                  mesh: Mesh | None = None) -> tuple[StepPolicy, StepPolicy]:
  """(A, B) of the task; arithmetic B is trained (on `mesh`) into `out/policy_b` once (A's
  tokenizer copied there first), then loaded. B's vocabulary must be A's (the Q-model scores B's
  steps)."""
  if cfg.task == "arithmetic":
    a = load_arithmetic_policy(cfg.policy or None)
    folder = out / "policy_b"
    if not (folder / "config.json").is_file():
      if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a.path / "tokenizer.model", folder / "tokenizer.model")
      sync_processes(f"qvalue_stepdpo tokenizer {folder}")
      train_arithmetic_policy(dataclasses.replace(cfg.policy_b, out=str(folder), install=False),
                              command=f"experiments.qvalue_stepdpo policy_b (out={folder})",
                              mesh=mesh)
      sync_processes(f"qvalue_stepdpo policy_b {folder}")
    b = load_arithmetic_policy(folder)
    policy_a = _arithmetic_policy("A", a, cfg)
    policy_b = _arithmetic_policy("B", b, cfg, train_seconds=b.config.get("wall_time_s"))
  elif cfg.task == "gsm8k":
    if not cfg.gsm8k.model_b:
      raise ValueError("task=gsm8k needs gsm8k.model_b=HF_DIR: a second policy that shares "
                       f"policy A's ({cfg.gsm8k.model}) tokenizer")
    policy_a = _pretrained_policy("A", cfg.gsm8k.model, cfg)
    policy_b = _pretrained_policy("B", cfg.gsm8k.model_b, cfg)
  else:
    raise ValueError(f"task={cfg.task!r}: expected 'arithmetic' or 'gsm8k'")
  check_reference_vocabulary(policy_b.graphdef, policy_b.params, policy_a.params,
                             reference_graphdef=policy_a.graphdef)
  return policy_a, policy_b


def task_problems(cfg: QValueConfig, seed: int, count: int, split: str) -> list[Problem]:
  """arithmetic: `generate_problems(seed, count, split=split)` (train from
  `annotation.train_start`); gsm8k: a seeded sample of `count` questions of the split."""
  if cfg.task == "arithmetic":
    start = cfg.annotation.train_start if split == "train" else 0
    return [Problem(p.question, str(p.answer))
            for p in generate_problems(seed, count, split=split, start=start)]
  records = load_gsm8k(split)
  order = np.random.default_rng(seed).permutation(len(records))[:count]
  return [Problem(records[i]["question"], records[i]["final_answer"]) for i in order]


def annotate(cfg: QValueConfig, policy: StepPolicy, seed: int,
             folder: pathlib.Path) -> dict[str, Any]:
  """MCTS annotation (`training.annotate_with_mcts`) of `annotation.num_problems` train
  problems into `folder/annotations.jsonl`; returns the stage's record (counts, compute)."""
  done = read_json(folder / "annotation.json")
  if done is not None:
    return done
  a = cfg.annotation
  problems = task_problems(cfg, seed, a.num_problems, "train")
  result = annotate_with_mcts(
    policy.graphdef, policy.params, tokenizer=policy.tokenizer, spec=policy.spec,
    prompts=[policy.prompt(p.question) for p in problems],
    answers=[p.answer for p in problems], max_depth=cfg.max_depth, seed=seed,
    cfg=MctsAnnotationConfig(num_actions=a.num_actions, num_simulations=a.num_simulations,
                             temperature=a.temperature, mcts_policy=a.mcts_policy,
                             batch=a.batch, max_answer_chars=a.max_answer_chars),
    problems=[{"question": p.question, "answer": p.answer} for p in problems],
    desc=f"annotate seed {seed}")
  _write_jsonl(folder / "annotations.jsonl", result.records)
  sync_processes(f"qvalue_stepdpo annotations {folder}")
  solved = [_solves(r, p) for r, p in zip(result.records, problems, strict=True)]
  return write_json(folder / "annotation.json", {
    "num_problems": len(problems), "best_trajectory_accuracy": float(np.mean(solved)),
    "tokens_decoded": result.tokens_decoded, "overflow": result.overflow,
    "seconds": result.seconds})


def step_pairs(cfg: QValueConfig, folder: pathlib.Path) -> tuple[list[PreferencePair],
                                                                 dict[str, int]]:
  """The step pairs of the seed's annotations (rewritten to `pairs.jsonl`) and the counts of
  what was looked at and dropped (cheap: redone on every run, so `min_q_gap` may change)."""
  records = [json.loads(line) for line in (folder / "annotations.jsonl").read_text().splitlines()
             if line.strip()]
  extraction = preference_pairs_from_annotations(records, min_q_gap=cfg.annotation.min_q_gap)
  if is_main_process():
    write_reasoning_jsonl(folder / "pairs.jsonl", extraction.pairs)
  counts = {k: getattr(extraction, k) for k in (
    "num_depths", "skipped_few_q", "dropped_tie", "dropped_identical", "dropped_small_gap")}
  return list(extraction.pairs), {"num_pairs": len(extraction.pairs), **counts}


def _solves(record: Mapping[str, Any], problem: Problem) -> bool:
  answer = stated_answer(record.get("text") or "")
  return answer is not None and answers_match(answer, problem.answer)


def _write_jsonl(path: pathlib.Path, records: Sequence[Mapping[str, Any]]) -> None:
  if not is_main_process():
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  with tmp.open("w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  tmp.replace(path)


def pair_accuracy(graphdef: nnx.GraphDef, params: Any, reference_params: Any,
                  pairs: Sequence[PreferencePair], *, beta: float, pad_id: int,
                  batch_size: int = 64) -> float:
  """Share of pairs whose step-DPO margin is positive, i.e. Q(chosen) > Q(rejected) under the
  Q-model (`dpo_loss_fn`'s `accuracy`, mean_tokens=True); NaN for no pairs."""
  if not pairs:
    return float("nan")
  loss_fn = jax.jit(dpo_loss_fn(graphdef, beta=beta, mean_tokens=True))
  width = max(len(p.context_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
  hits = 0.0
  for start in range(0, len(pairs), batch_size):   # a full batch and a last one: two programs
    chunk = pairs[start:start + batch_size]
    _, aux = loss_fn(params, pad_pairs(chunk, pad_id=pad_id, width=-(-width // 16) * 16), None,
                     reference_params)
    hits += float(aux["accuracy"]) * len(chunk)
  return hits / len(pairs)


def step_alone(pairs: Sequence[PreferencePair], policy: StepPolicy) -> list[PreferencePair]:
  """The pairs with context ``(policy.bos_id,)``: what a ``qmodel.context=step`` Q-model reads."""
  if policy.bos_id is None:
    raise ValueError(f"policy {policy.name!r} has no bos_id: a step-alone Q-model "
                     "(qmodel.context=step) reads [BOS] + step")
  return [dataclasses.replace(p, context_ids=(policy.bos_id,)) for p in pairs]


def check_qmodel_context(cfg: QValueConfig) -> None:
  """qmodel.context is "path", or "step" on the arithmetic task (one line checks alone)."""
  if cfg.qmodel.context not in ("path", "step"):
    raise ValueError(f"qmodel.context={cfg.qmodel.context!r}: expected 'path' or 'step'")
  if cfg.qmodel.context == "step" and cfg.task != "arithmetic":
    raise ValueError(f"qmodel.context='step' with task={cfg.task!r}: a step read without its "
                     "context is a Q-value on the arithmetic task only (a line's arithmetic "
                     "checks alone); use qmodel.context=path")


def train_qmodel(cfg: QValueConfig, policy: StepPolicy, seed: int, folder: pathlib.Path,
                 annotation: Mapping[str, Any], *,
                 mesh: Mesh | None = None) -> tuple[Any, dict[str, Any]]:
  """(Q-model params, record): step-DPO of a copy of A against A (frozen) on the pairs of the
  non-held-out problems; rerunning restores the run's last checkpoint (and continues it)."""
  q = cfg.qmodel
  pairs, counts = step_pairs(cfg, folder)
  train_pairs, heldout = holdout_split(pairs, num_records=annotation["num_problems"],
                                       fraction=q.holdout_fraction, seed=seed)
  if q.context == "step":
    train_pairs, heldout = step_alone(train_pairs, policy), step_alone(heldout, policy)
  synthetic: list[PreferencePair] = []
  mcts_train = train_pairs
  if q.synthetic_problems:
    if cfg.task != "arithmetic":
      raise ValueError(f"qmodel.synthetic_problems={q.synthetic_problems}: synthetic step pairs "
                       f"exist for task=arithmetic only (task={cfg.task!r})")
    synthetic = synthetic_step_pairs(
      generate_problems(SYNTHETIC_SEED_BASE + seed, q.synthetic_problems, split="train"),
      policy.tokenizer, prompt=policy.prompt, newline_id=policy.spec.stop_ids[0], seed=seed)
    if q.context == "step":
      synthetic = step_alone(synthetic, policy)
    train_pairs = [*train_pairs, *synthetic]
  t0 = time.perf_counter()
  # A copy: the train loop's updates must never touch the reference's buffers.
  result = run_preference(
    policy.graphdef, jax.tree.map(np.array, policy.params), train_pairs,
    reference_params=policy.params, pad_id=policy.spec.pad_id, beta=q.beta, mean_tokens=True,
    cfg=dataclasses.replace(q.run, seed=seed), out_dir=folder / "qmodel", mesh=mesh)
  seconds = time.perf_counter() - t0
  record = read_json(folder / "qmodel.json")
  if record is None:
    accuracy = functools.partial(pair_accuracy, policy.graphdef, result.params, policy.params,
                                 beta=q.beta, pad_id=policy.spec.pad_id)
    record = write_json(folder / "qmodel.json", {
      "pairs": counts, "synthetic_pairs": len(synthetic), "train_pairs": len(train_pairs),
      "heldout_pairs": len(heldout), "steps": result.step,
      "resumed_from": result.resumed_from, "last_train_loss": result.last_train_loss,
      "seconds": seconds, "steps_per_s": result.steps_per_s,
      # Train accuracy on the MCTS pairs; the synthetic ones on a fixed share of at most
      # SYNTHETIC_ACCURACY_PAIRS (scoring all of them would take minutes).
      "heldout_pair_accuracy": accuracy(heldout), "train_pair_accuracy": accuracy(mcts_train),
      "synthetic_pair_accuracy": accuracy(synthetic[:SYNTHETIC_ACCURACY_PAIRS]),
      "reference_pair_accuracy_heldout": pair_accuracy(
        policy.graphdef, policy.params, policy.params, heldout, beta=q.beta,
        pad_id=policy.spec.pad_id)})
  return result.params, record


def evaluate_policy(cfg: QValueConfig, policy: StepPolicy, seed: int, *,
                    q_graphdef: nnx.GraphDef, q_params: Any, reference_params: Any,
                    q_bos_id: int | None = None) -> dict[str, dict[str, float]]:
  """Greedy and Q-guided accuracy of `policy` on the seed's test problems, with compute
  (`tasks.evaluate`; Q-guided scores its candidates with the Q-model, `LogRatioQ`; a
  ``qmodel.context=step`` Q-model reads ``[q_bos_id] + step``: the Q-model's policy's BOS)."""
  e = cfg.eval
  if cfg.qmodel.context == "step" and q_bos_id is None:
    raise ValueError("qmodel.context='step' needs q_bos_id (the BOS id the Q-model read before "
                     "each step in training); got None")
  problems = task_problems(cfg, seed, e.num_problems, "test")
  task = SearchTask(
    name=cfg.task, graphdef=policy.graphdef, params=PolicyValueParams(policy=policy.params),
    tokenizer=policy.tokenizer, spec=policy.spec,
    prompts=tuple(tuple(policy.prompt(p.question)) for p in problems),
    references=tuple(p.answer for p in problems),
    questions=tuple(p.question for p in problems), batch=e.batch)
  budget = SearchBudget(q_candidates=e.num_candidates, temperature=e.temperature,
                        max_depth=cfg.max_depth)
  out = {}
  for method in ("greedy", "q_guided"):
    scorer = {} if method == "greedy" else dict(
      scorer=LogRatioQ(q_graphdef, beta=cfg.qmodel.beta, mean_tokens=True,
                       step_alone_bos=q_bos_id if cfg.qmodel.context == "step" else None),
      scorer_params=functools.partial(q_model_value_params, q_params, reference_params))
    point = evaluate(task, method, budget, seed=seed, **scorer)
    out[method] = {k: point[k] for k in ("accuracy", "tokens_decoded", "model_calls", "seconds",
                                         "overflow", "n_problems", "no_answer")}
  return out


def run(cfg: QValueConfig, *, mesh: Mesh | None = None) -> dict[str, Any]:
  """The experiment into ``cfg.out``; ``mesh``: the device mesh of its trainings (policy B's SFT,
  the Q-models; None: one device; ``main`` passes the mesh of ``cfg.mesh``)."""
  if not cfg.seeds:
    raise ValueError("seeds=[]: expected at least one seed")
  check_qmodel_context(cfg)
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  inputs = ({"policy_fingerprint": arithmetic_policy_fingerprint(cfg.policy or None)}
            if cfg.task == "arithmetic" else {})
  check_stages_config(out, {**config_to_dict(cfg), **inputs},
                      ignore=("out", "seeds", "mesh", "runtime"))
  t_start = time.perf_counter()
  policy_a, policy_b = load_policies(cfg, out, mesh=mesh)
  policies = {policy_a.name: policy_a, policy_b.name: policy_b}
  per_seed, evals = [], []
  for seed in cfg.seeds:
    folder = out / f"seed{seed}"
    annotation = annotate(cfg, policy_a, seed, folder)
    evaluation = read_json(folder / "eval.json")
    qmodel = read_json(folder / "qmodel.json")
    if evaluation is None or qmodel is None:
      q_params, qmodel = train_qmodel(cfg, policy_a, seed, folder, annotation, mesh=mesh)
      evaluation = write_json(folder / "eval.json", {
        name: evaluate_policy(cfg, p, seed, q_graphdef=policy_a.graphdef, q_params=q_params,
                              reference_params=policy_a.params, q_bos_id=policy_a.bos_id)
        for name, p in policies.items()})
    per_seed.append({"seed": seed, "annotation": annotation, "qmodel": qmodel})
    evals.append(evaluation)
  results = {"config": config_to_dict(cfg), "policies": {}, "compute": {}, "seeds": per_seed}
  for name in policies:
    results["policies"][name] = {m: [ev[name][m]["accuracy"] for ev in evals]
                                 for m in ("greedy", "q_guided")}
    results["compute"][name] = {
      m: {k: float(np.mean([ev[name][m][k] for ev in evals]))
          for k in ("tokens_decoded", "model_calls", "seconds", "overflow")}
      for m in ("greedy", "q_guided")}
  results["compute"]["annotation_tokens_decoded_per_problem"] = float(np.mean(
    [s["annotation"]["tokens_decoded"] for s in per_seed]))
  stages = {"policy_b_train": policy_b.train_seconds or 0.0,
            "annotation": sum(s["annotation"]["seconds"] for s in per_seed),
            "step_dpo": sum(s["qmodel"]["seconds"] for s in per_seed),
            "evaluation": sum(ev[n][m]["seconds"] for ev in evals for n in policies
                              for m in ("greedy", "q_guided"))}
  # Seconds of each stage as recorded when it ran (a rerun that reads the stages' files adds
  # only this invocation's seconds, reported apart).
  results["compute"]["stage_seconds"] = {**stages, "total": sum(stages.values())}
  results["compute"]["this_invocation_seconds"] = time.perf_counter() - t_start
  results["checks"] = acceptance_checks(results["policies"])
  write_results(out, results=results, table_md=make_table(results))
  make_plot(out, results)
  print(make_table(results))
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(QValueConfig, sys.argv[1:] if argv is None else argv, presets_dir=PRESETS)
  return run(cfg, mesh=setup_run(cfg.mesh, cfg.runtime, batch_sizes=cfg.batch_sizes()))


if __name__ == "__main__":
  main()
