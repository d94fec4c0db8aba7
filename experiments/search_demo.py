"""The main job in a few minutes on a CPU: reasoning searches, jitted and batched.

    python -m experiments.search_demo [n_problems=128] [gsm8k=true] [verifier=committed] [out=DIR]

1. Arithmetic word problems (test split) solved by the committed small policy with greedy
   decoding, majority@N, MCTS and value-guided beam search: accuracy, tokens decoded per
   problem and tokens/s for each (every method is one jitted program over the whole batch, on
   a tree KV cache: each prompt prefilled once, no token decoded twice). MCTS and beam read
   their values from the committed step verifier (`experiments.verifier_probe`: each reasoning
   line checked alone); `verifier=""` uses the policy's outcome value head instead, which
   cannot tell a problem's right solutions from its wrong ones (search lands below greedy).
2. One GSM8K test question searched by MCTS with SmolLM2-135M-Instruct; the search tree is
   printed (each line a reasoning step with its value; `*` marks the chosen path).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from qstar_jax.envs.grading import answers_match
from qstar_jax.search.steps.methods import SearchBudget, method_answers, pad_prompts, run_method
from qstar_jax.search.steps.result import format_tree
from qstar_jax.search.steps.tasks import (
  ArithmeticTask,
  Gsm8kTask,
  arithmetic_task,
  evaluate,
  gsm8k_task,
)
from qstar_jax.training.config import parse_config
from qstar_jax.training.progress import progress
from qstar_jax.training.results import markdown_table

COMMITTED_VERIFIER = (pathlib.Path(__file__).resolve().parent
                      / "results/cpu_2026-12-01/verifier_probe/step_verifier")


@dataclasses.dataclass(frozen=True)
class SearchDemoConfig:
  n_problems: int = 128
  methods: tuple[str, ...] = ("greedy", "majority", "mcts", "beam")
  # The budgets of `search_scaling preset=cpu` (majority@16, beam 4 x 4, MCTS 4 actions x 7
  # simulations per decision: 14-16x greedy's tokens).
  budget: SearchBudget = SearchBudget(mcts_simulations=7, max_depth=6)
  gsm8k: bool = True
  gsm8k_index: int = 0
  gsm8k_model: str = "smollm2"
  gsm8k_budget: SearchBudget = SearchBudget(mcts_actions=2, mcts_simulations=2, temperature=0.7,
                                            max_depth=4)
  gsm8k_step_tokens: int = 32
  # "committed": the step verifier in results/ (COMMITTED_VERIFIER); "" = the value head; or
  # a folder written by experiments.verifier_probe.
  verifier: str = "committed"
  seed: int = 0
  out: str | None = None


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(SearchDemoConfig, sys.argv[1:] if argv is None else argv, presets_dir=None)
  verifier = str(COMMITTED_VERIFIER) if cfg.verifier == "committed" else cfg.verifier
  task = arithmetic_task(ArithmeticTask(n_problems=cfg.n_problems, batch=cfg.n_problems,
                                        verifier=verifier))
  scored_by = ("the step verifier " + ("(committed)" if cfg.verifier == "committed" else
                                       verifier)) if verifier else "the policy's value head"
  print(f"arithmetic: {cfg.n_problems} test problems, MCTS and beam scored by {scored_by}; "
        f"e.g.\n  {task.questions[0]}\n")
  rows, summary = [], {}
  bar = progress(total=len(cfg.methods) * cfg.n_problems, desc="arithmetic", unit="problem",
                 force=True)
  for method in cfg.methods:
    bar.set_description(f"arithmetic {method}")
    # The first call compiles; the second, on the same shapes, is the one timed.
    evaluate(task, method, cfg.budget, seed=cfg.seed + 1)
    r = evaluate(task, method, cfg.budget, seed=cfg.seed, on_batch=bar.update)
    summary[method] = {k: r[k] for k in ("accuracy", "tokens_decoded", "tokens_per_s",
                                         "model_calls")}
    rows.append([method, 100 * r["accuracy"], r["tokens_decoded"], r["tokens_per_s"]])
  bar.close()
  print(markdown_table(["method", "accuracy %", "tokens / problem", "tokens/s"], rows,
                       floatfmt=".1f"))
  if cfg.gsm8k:
    summary["gsm8k"] = gsm8k_tree(cfg)
  if cfg.out:
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
  return summary


def gsm8k_tree(cfg: SearchDemoConfig) -> dict[str, Any]:
  """MCTS on one GSM8K question with SmolLM2; prints the tree and the answer."""
  budget = cfg.gsm8k_budget
  task = gsm8k_task(Gsm8kTask(model=cfg.gsm8k_model, n_problems=cfg.gsm8k_index + 1, batch=1,
                              max_depth=budget.max_depth, max_step_tokens=cfg.gsm8k_step_tokens))
  i = cfg.gsm8k_index
  print(f"\nGSM8K test #{i} with {cfg.gsm8k_model} (MCTS, {budget.mcts_actions} candidate "
        f"steps per node, {budget.mcts_simulations} simulations per step):\n  {task.questions[i]}")
  tokens, lengths = pad_prompts([task.prompts[i]])
  with progress(total=1, desc="gsm8k mcts", unit="search", force=True) as bar:
    result = jax.block_until_ready(run_method(
      "mcts", task.params, jax.random.key(cfg.seed), graphdef=task.graphdef,
      prompt_tokens=tokens, prompt_lengths=lengths, spec=task.spec, budget=budget))
    bar.update(1)
  answer, _ = method_answers("mcts", result, tokenizer=task.tokenizer)[0]
  print(format_tree(result.tree, 0, tokenizer=task.tokenizer, chosen=int(result.chosen[0])))
  correct = answers_match(answer, task.references[i])
  print(f"answer: {answer}   reference: {task.references[i]}   correct: {correct}   "
        f"tokens decoded: {int(np.asarray(result.tokens_decoded)[0])}")
  return {"answer": answer, "reference": task.references[i], "correct": bool(correct)}


if __name__ == "__main__":
  main()
