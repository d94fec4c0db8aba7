"""Accuracy vs compute of every LM step search, on the arithmetic task and on GSM8K.

  python -m experiments.search_scaling [preset=cpu] out=runs/search_scaling

Methods (`qstar_jax.search.steps.methods.METHODS`): greedy, majority@N, best-of-N (value),
value-guided beam, MCTS (an episode of decisions), particle filtering, Q-guided, best-first.
- arithmetic: the committed policy (`qstar_jax/assets/arithmetic_policy`, a small Llama SFT'd
  by `experiments.train_arithmetic_policy`) and its outcome value head, on `n_problems` test
  problems; each method at every budget multiplier of `arithmetic.scales` (one curve per
  method in the plot). `arithmetic.verifier=DIR` (a step verifier written by
  `experiments.verifier_probe`) scores the value-guided methods' nodes instead of the head.
- gsm8k: a pretrained chat model (SmolLM2-135M-Instruct by default, or any HF directory) on
  `gsm8k.n_problems` test questions (`n_problems=0`: the whole test set), zero-shot, one step per
  line. It has no value head here, so node values are 0: value-guided methods reduce to
  sampling with arbitrary tie-breaks. The figures are reported whatever they are.
Compute is counted, not timed: tokens decoded per problem (every token through the model after
the prompt; the prompt is prefilled once) and batched model calls; seconds are reported apart.
Writes `out/results.json` (`{"config", "tasks": {TASK: {METHOD: {"accuracy", "tokens_decoded",
"model_calls", "n_problems", ...}}}}`), `out/table.md` and `out/accuracy_vs_tokens.png`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from qstar_jax.search.steps.methods import METHODS, SearchBudget
from qstar_jax.search.steps.tasks import (
  ArithmeticTask,
  Gsm8kTask,
  SearchTask,
  arithmetic_task,
  evaluate,
  gsm8k_task,
)
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.progress import progress
from qstar_jax.training.results import markdown_table, save_plot, write_results

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "search_scaling"


@dataclasses.dataclass(frozen=True)
class SearchScalingConfig:
  out: str = "runs/search_scaling"
  tasks: tuple[str, ...] = ("arithmetic", "gsm8k")
  methods: tuple[str, ...] = METHODS
  seed: int = 0
  # Arithmetic solutions have <= 5 steps; 80-token prompts + 6 x 24 tokens fit the 256 context.
  budget: SearchBudget = SearchBudget(max_depth=6)
  gsm8k_budget: SearchBudget = SearchBudget(num_samples=4, beam_width=2, expansions=2,
                                            num_particles=4, mcts_actions=2, mcts_simulations=2,
                                            q_candidates=2, best_first_candidates=2,
                                            best_first_budget=8, temperature=0.7, max_depth=10)
  arithmetic: ArithmeticTask = ArithmeticTask()
  gsm8k: Gsm8kTask = Gsm8kTask()


def scaled_budget(method: str, budget: SearchBudget, scale: float) -> SearchBudget:
  """The budget with the method's size multiplied by `scale` (>= 1 kept)."""
  field = {"majority": "num_samples", "best_of_n": "num_samples", "beam": "beam_width",
           "particle": "num_particles", "mcts": "mcts_simulations", "q_guided": "q_candidates",
           "best_first": "best_first_budget"}.get(method)
  if field is None or scale == 1.0:
    return budget
  return dataclasses.replace(budget, **{field: max(1, round(getattr(budget, field) * scale))})


def run_task(task: SearchTask, methods: Sequence[str], budget: SearchBudget,
             scales: Sequence[float], *, seed: int) -> dict[str, Any]:
  out: dict[str, Any] = {}
  runs = [(m, s) for m in methods for s in (scales if m != "greedy" else (1.0,))]
  bar = progress(total=len(runs) * len(task.prompts), desc=task.name, unit="problem",
                 force=True)
  for method, scale in runs:
    bar.set_description(f"{task.name} {method} x{scale:g}")
    b = scaled_budget(method, budget, scale)
    point = evaluate(task, method, b, seed=seed, on_batch=bar.update)
    point["scale"] = scale
    entry = out.setdefault(method, {"curve": []})
    entry["curve"].append(point)
    if scale == 1.0:
      entry.update({k: v for k, v in point.items() if k != "scale"})
      entry["budget"] = dataclasses.asdict(b)
  bar.close()
  for entry in out.values():
    entry["curve"].sort(key=lambda p: p["tokens_decoded"])
  return out


def value_note(task: str, config: dict[str, Any]) -> str:
  """What scored the nodes of the task's value-guided methods."""
  if task == "gsm8k":
    return "No value head: value-guided methods rank ties (values 0)."
  verifier = config.get("arithmetic", {}).get("verifier")
  if verifier:
    return (f"Values: the step verifier `{verifier}` (a PRM checking each step alone: the "
            "product over a node's steps of P(step correct)); greedy and majority read none.")
  return "Values: the policy's outcome value head (regression on its own samples' outcomes)."


def make_table(results: dict[str, Any]) -> str:
  md = ["# Accuracy vs compute of LM step searches", ""]
  for task, methods in results["tasks"].items():
    greedy = methods.get("greedy", {}).get("tokens_decoded")
    md += [f"## {task}", "", value_note(task, results["config"]), "", markdown_table(
      ["method", "accuracy %", "tokens decoded / problem", "x greedy tokens", "model calls",
       "problems", "tokens/s", "no answer", "overflow"],
      [[m, 100 * r["accuracy"], r["tokens_decoded"],
        (r["tokens_decoded"] / greedy) if greedy else float("nan"), r["model_calls"],
        r["n_problems"], r["tokens_per_s"], r["no_answer"], r["overflow"]]
       for m, r in methods.items() if "accuracy" in r], floatfmt=".1f"), ""]
  return "\n".join(md)


def make_plot(out: pathlib.Path, results: dict[str, Any]) -> None:
  import matplotlib.pyplot as plt

  tasks = results["tasks"]
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
  for ax, (task, methods) in zip(axes[0], tasks.items(), strict=True):
    for method, entry in methods.items():
      xs = [p["tokens_decoded"] for p in entry["curve"]]
      ys = [100 * p["accuracy"] for p in entry["curve"]]
      ax.plot(xs, ys, marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("tokens decoded per problem")
    ax.set_ylabel("accuracy %")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  save_plot(fig, out / "accuracy_vs_tokens.png")


def run(cfg: SearchScalingConfig) -> dict[str, Any]:
  bad = [m for m in cfg.methods if m not in METHODS]
  if bad:
    raise ValueError(f"methods {bad}: expected a subset of {METHODS}")
  bad = [t for t in cfg.tasks if t not in ("arithmetic", "gsm8k")]
  if bad:
    raise ValueError(f"tasks {bad}: expected a subset of ('arithmetic', 'gsm8k')")
  out = pathlib.Path(cfg.out)
  results: dict[str, Any] = {"config": config_to_dict(cfg), "tasks": {}}
  for name in cfg.tasks:
    if name == "arithmetic":
      task, budget, scales = arithmetic_task(cfg.arithmetic), cfg.budget, cfg.arithmetic.scales
    else:
      task = gsm8k_task(cfg.gsm8k)
      budget, scales = dataclasses.replace(cfg.gsm8k_budget, max_depth=cfg.gsm8k.max_depth), (1.0,)
    results["tasks"][name] = run_task(task, cfg.methods, budget, scales, seed=cfg.seed)
    write_results(out, results=results, table_md=make_table(results))  # kept if later killed
  make_plot(out, results)
  print(make_table(results))
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(SearchScalingConfig, sys.argv[1:] if argv is None else argv,
                     presets_dir=PRESETS)
  return run(cfg)


if __name__ == "__main__":
  main()
