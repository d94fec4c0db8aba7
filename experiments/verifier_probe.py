"""Can a value tell a policy's right solutions from its wrong ones? Two probes behind the
value-guided rows of `search_scaling` and `value_search` (which stay below greedy).

  python -m experiments.verifier_probe [preset=cpu] out=runs/verifier_probe

1. **lines**: the arithmetic check every value-guided search of this task needs, alone. A step
   verifier (`training.step_verifier`: a Llama initialised from the policy plus a linear head
   at the line's last token) is trained by logistic regression to tell a correct line
   ``a op b = c`` from one whose result is off by 1..9, 10 or 20 either way (half the operation
   lines of reference solutions of train problems; answer lines count correct); its held-out
   accuracy per line kind is recorded as it trains, and the model is saved as
   `out/step_verifier` (an arithmetic-policy folder; `search_scaling arithmetic.verifier=DIR`
   searches with it).
2. **samples**: `samples.num_samples` solutions per test problem sampled from the policy; each
   scored by the policy's value head at the solution's last state (``value``), by the policy's
   mean and minimum token log-probability over the solution (``mean_log_prob``,
   ``min_log_prob``) and by the step verifier (``step_verifier``: the product over the
   solution's steps of P(step correct)). Per score: its within-problem AUC (`within_group_auc`:
   do a problem's correct samples score above its wrong ones?), the accuracy of best-of-N (the
   top-scored sample) and of weighted majority (answers' summed weights: the value clipped at
   0, the exponentiated log-probability, the verifier's product). Beside them: greedy,
   majority@N, the mean sample accuracy (a random pick) and pass@N (a perfect verifier).

Writes `out/results.json` (`{"config", "samples": {"baselines", "scores": {SCORE: {...}}},
"lines": {"history": [{"step", "loss", "accuracy", "by_kind"}], "model", ...}}`),
`out/table.md`, `out/line_accuracy.png` and `out/step_verifier/`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.envs.arithmetic import arithmetic_reward, generate_problems, policy_prompt
from qstar_jax.envs.grading import answers_match, stated_answer
from qstar_jax.models.arithmetic_policy import (
  ArithmeticPolicy,
  load_arithmetic_policy,
  save_trained_policy,
)
from qstar_jax.models.llama import apply
from qstar_jax.search.steps.result import vote
from qstar_jax.search.steps.scorers import line_logits, step_verifier_value_params
from qstar_jax.training.arithmetic_policy import (
  generate_solutions,
  hidden_states_at,
  solution_text,
  within_group_auc,
)
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.results import markdown_table, new_figure, save_plot, write_results
from qstar_jax.training.step_verifier import (
  StepVerifierConfig,
  split_after,
  step_verifier_data,
  train_step_verifier,
)

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "verifier_probe"
SCORES = ("value", "mean_log_prob", "min_log_prob", "step_verifier")


@dataclasses.dataclass(frozen=True)
class SamplesConfig:
  n_problems: int = 200           # test problems: generate_problems(seed, n, split="test")
  num_samples: int = 8
  temperature: float = 1.0
  batch_size: int = 400           # rows per decode call
  prompt_width: int = 96
  max_new_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class LinesConfig:
  train_problems: int = 30000     # train problems whose reference lines are the probe's data
  test_problems: int = 1000       # test problems: the held-out lines
  train: StepVerifierConfig = StepVerifierConfig()


@dataclasses.dataclass(frozen=True)
class VerifierProbeConfig:
  out: str = "runs/verifier_probe"
  policy: str = ""                # arithmetic policy folder; "" = the committed one
  seed: int = 0
  samples: SamplesConfig = SamplesConfig()
  lines: LinesConfig = LinesConfig()


# ---------------------------------------------------------------------------------- samples


def sample_metrics(scores: np.ndarray, correct: np.ndarray, groups: np.ndarray,
                   answers: Sequence[str | None], weights: np.ndarray,
                   references: Sequence[str]) -> dict[str, float]:
  """Within-problem AUC, best-of-N and weighted-majority accuracy of one score.

  scores, correct, groups, weights: [M] per sample (groups: its problem's index into
  references; weights >= 0 for the vote); answers: each sample's stated answer. Best-of-N takes
  a problem's first top-scored sample."""
  scores, correct, groups = np.asarray(scores), np.asarray(correct, bool), np.asarray(groups)
  best, weighted = [], []
  for g, reference in enumerate(references):
    rows = np.flatnonzero(groups == g)
    best.append(bool(correct[rows[np.argmax(scores[rows])]]))
    answer = vote([answers[i] for i in rows], [float(weights[i]) for i in rows])
    weighted.append(answer is not None and answers_match(answer, reference))
  return {"within_problem_auc": within_group_auc(scores, correct, groups),
          "best_of_n": float(np.mean(best)), "weighted_majority": float(np.mean(weighted))}


def _padded_batches(sequences: Sequence[Sequence[int]], batch: int, width: int, pad_id: int):
  """(start, chunk, tokens [batch, width]) per `batch` sequences, right-padded with pad_id (the
  last batch filled with pad rows: one compiled shape)."""
  for start in range(0, len(sequences), batch):
    chunk = sequences[start:start + batch]
    tokens = np.full((batch, width), pad_id, np.int32)
    for i, s in enumerate(chunk):
      tokens[i, :len(s)] = s
    yield start, chunk, tokens


def _token_log_probs(policy: ArithmeticPolicy, sequences: Sequence[Sequence[int]],
                     prompt_lengths: Sequence[int], *, batch: int, width: int) -> list[np.ndarray]:
  """Each sequence's log-probabilities of its generated tokens under the policy."""
  @jax.jit
  def forward(params, tokens):
    logits, _ = apply(policy.graphdef, params, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

  out = []
  for start, chunk, tokens in _padded_batches(sequences, batch, width, policy.pad_id):
    logp = np.asarray(forward(policy.params, tokens))
    out += [logp[i, prompt_lengths[start + i] - 1:len(s) - 1] for i, s in enumerate(chunk)]
  return out


def probe_samples(cfg: VerifierProbeConfig, policy: ArithmeticPolicy,
                  verifier: ArithmeticPolicy | None = None) -> dict[str, Any]:
  c = cfg.samples
  problems = generate_problems(cfg.seed, c.n_problems, split="test")
  prompts = [policy.prompt_ids(policy_prompt(p.question, prompt_format=policy.prompt_format))
             for p in problems]
  n = c.num_samples
  rows = [q for q in prompts for _ in range(n)]
  t0 = time.perf_counter()
  greedy = generate_solutions(policy.graphdef, policy.params, jax.random.key(cfg.seed),
                              prompt_ids=prompts, greedy=True, max_new_tokens=c.max_new_tokens,
                              batch_size=c.batch_size, prompt_width=c.prompt_width)
  gens = generate_solutions(policy.graphdef, policy.params, jax.random.key(cfg.seed + 1),
                            prompt_ids=rows, greedy=False, temperature=c.temperature,
                            max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                            prompt_width=c.prompt_width)
  texts = [solution_text(policy.tokenizer, g) for g in gens]
  groups = np.repeat(np.arange(len(problems)), n)
  correct = np.array([arithmetic_reward(t, problems[g]) > 0 for t, g in zip(texts, groups,
                                                                            strict=True)])
  answers = [stated_answer(t) for t in texts]
  references = [str(p.answer) for p in problems]
  sequences = [q + g for q, g in zip(rows, gens, strict=True)]
  width = c.prompt_width + c.max_new_tokens
  logp = _token_log_probs(policy, sequences, [len(q) for q in rows], batch=c.batch_size,
                          width=width)
  # The value head at the solution's last state (the hidden state after its last token).
  last = hidden_states_at(policy.graphdef, policy.params, sequences,
                          [[len(s) - 1] for s in sequences], batch_size=c.batch_size,
                          width=width)
  values = np.asarray(policy.value(np.concatenate(last)), np.float64).reshape(-1)
  mean_lp = np.array([lp.mean() if len(lp) else -np.inf for lp in logp])
  min_lp = np.array([lp.min() if len(lp) else -np.inf for lp in logp])
  by_score = {"value": (values, np.maximum(values, 0.0)),
              "mean_log_prob": (mean_lp, np.exp(mean_lp)),
              "min_log_prob": (min_lp, np.exp(min_lp))}
  if verifier is not None:
    product = verifier_scores(verifier, gens, batch=c.batch_size)
    by_score["step_verifier"] = (product, product)
  scores = {name: sample_metrics(s, correct, groups, answers, w, references)
            for name, (s, w) in by_score.items()}
  uniform = sample_metrics(np.zeros(len(texts)), correct, groups, answers,
                           np.ones(len(texts)), references)
  greedy_acc = np.mean([arithmetic_reward(solution_text(policy.tokenizer, g), p)
                        for g, p in zip(greedy, problems, strict=True)])
  return {
    "n_problems": len(problems), "num_samples": n,
    "baselines": {"greedy": float(greedy_acc), "majority": uniform["weighted_majority"],
                  "random_sample": float(correct.mean()),
                  "pass_at_n": float(np.mean([correct[groups == g].any()
                                              for g in range(len(problems))]))},
    "scores": scores, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------- lines


def probe_lines(cfg: VerifierProbeConfig, policy: ArithmeticPolicy,
                out: pathlib.Path) -> dict[str, Any]:
  """Trains the step verifier (`training.step_verifier`) and saves it as an arithmetic-policy
  folder ``out/step_verifier`` (its head: logits of ``P(line correct)``)."""
  c = cfg.lines
  kw = dict(bos_id=policy.bos_id, newline_id=policy.newline_id, eos_id=policy.eos_id)
  train = step_verifier_data(cfg.seed + 1, c.train_problems, "train", policy.tokenizer, **kw)
  test = step_verifier_data(cfg.seed, c.test_problems, "test", policy.tokenizer, **kw)
  params, record = train_step_verifier(
    policy.graphdef, policy.params, train, test, c.train,
    hidden_size=policy.model_config.hidden_size, pad_id=policy.pad_id,
    out_dir=out / "verifier_run",
    run_config={"lines": config_to_dict(c), "seed": cfg.seed, "policy": cfg.policy})
  folder = out / "step_verifier"
  save_trained_policy(folder, policy, params["model"], params["head"],
                      training={"kind": "step_verifier", "config": config_to_dict(c)},
                      readme="# Step verifier of the arithmetic policy (experiments."
                             "verifier_probe)\n\nA Llama initialised from the policy and a "
                             "linear head: logits of P(line correct) read at the last token of "
                             "[BOS] + one solution line. Score search nodes with "
                             "`qstar_jax.search.steps.scorers.StepVerifier`.\n")
  return {**record, "model": str(folder)}


def verifier_scores(verifier: ArithmeticPolicy, generations: Sequence[Sequence[int]], *,
                    batch: int) -> np.ndarray:
  """[M] the step verifier's score of each generated solution: the product over its steps
  (split after each newline / EOS) of P(step correct), as `StepVerifier` computes in a search."""
  lines, owner = [], []
  for m, gen in enumerate(generations):
    for step in split_after(gen, verifier.step_stop_ids):
      lines.append([verifier.bos_id, *step])
      owner.append(m)
  params = step_verifier_value_params(verifier.params, verifier.value_head())
  width = max(len(s) for s in lines)
  logits = jax.jit(lambda p, t, last: line_logits(verifier.graphdef, p, t, last))
  log_p = []
  for _, chunk, tokens in _padded_batches(lines, batch, width, verifier.pad_id):
    last = np.array([len(s) - 1 for s in chunk] + [0] * (batch - len(chunk)), np.int32)
    log_p += np.asarray(jax.nn.log_sigmoid(logits(params, tokens, last)))[:len(chunk)].tolist()
  total = np.zeros(len(generations))
  np.add.at(total, np.array(owner), np.array(log_p))
  return np.exp(total)


# ---------------------------------------------------------------------------------- outputs


def make_table(results: dict[str, Any]) -> str:
  s = results["samples"]
  base = s["baselines"]
  md = ["# Verifier probe (arithmetic policy)", "",
        f"## Samples: {s['n_problems']} test problems x {s['num_samples']} samples", "",
        markdown_table(["baseline", "accuracy %"],
                       [["greedy", 100 * base["greedy"]],
                        [f"majority@{s['num_samples']}", 100 * base["majority"]],
                        ["random sample", 100 * base["random_sample"]],
                        [f"pass@{s['num_samples']} (a perfect verifier)",
                         100 * base["pass_at_n"]]], floatfmt=".1f"), "",
        markdown_table(["score", "within-problem AUC", "best-of-N %", "weighted majority %"],
                       [[name, r["within_problem_auc"], 100 * r["best_of_n"],
                         100 * r["weighted_majority"]]
                        for name, r in s["scores"].items()], floatfmt=".3f"), ""]
  lines = results["lines"]
  ops = list(lines["history"][-1]["by_kind"])
  md += [f"## Lines: a value model trained to check 'a op b = c' ({lines['train_lines']} train "
         f"lines, {lines['test_lines']} held out, "
         f"{100 * lines['test_correct_fraction']:.0f}% correct)", "",
         markdown_table(["step", "held-out loss", "accuracy %", *[f"'{op}' %" for op in ops]],
                        [[h["step"], h["loss"], 100 * h["accuracy"],
                          *[100 * h["by_kind"][op] for op in ops]] for h in lines["history"]],
                        floatfmt=".3f"), ""]
  return "\n".join(md)


def make_plot(out: pathlib.Path, results: dict[str, Any]) -> None:
  fig, ax = new_figure(figsize=(6, 4))
  history = results["lines"]["history"]
  steps = [h["step"] for h in history]
  ax.plot(steps, [100 * h["accuracy"] for h in history], "k-", label="all lines")
  for op in history[-1]["by_kind"]:
    ax.plot(steps, [100 * h["by_kind"][op] for h in history], "--", label=f"'{op}' lines")
  ax.axhline(50, color="grey", lw=0.8)
  ax.set_xlabel("training step")
  ax.set_ylabel("held-out accuracy %")
  ax.set_title("value model checking one line 'a op b = c'")
  ax.legend(fontsize=8)
  save_plot(fig, out / "line_accuracy.png")


def run(cfg: VerifierProbeConfig) -> dict[str, Any]:
  out = pathlib.Path(cfg.out)
  policy = load_arithmetic_policy(cfg.policy or None)
  lines = probe_lines(cfg, policy, out)
  verifier = load_arithmetic_policy(lines["model"])
  results = {"config": config_to_dict(cfg), "samples": probe_samples(cfg, policy, verifier),
             "lines": lines}
  table = make_table(results)
  write_results(out, results=results, table_md=table)
  make_plot(out, results)
  print(table)
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return run(parse_config(VerifierProbeConfig, sys.argv[1:] if argv is None else argv,
                          presets_dir=PRESETS))


if __name__ == "__main__":
  main()
