"""A step verifier for the arithmetic task: a value model that checks one solution line alone.

A process reward model (PRM) in the sense of Lightman et al. ("Let's Verify Step by Step",
2023), with the step labels made automatically instead of by people: the lines of reference
solutions of train problems, half of the operation lines given a wrong result (the right one
plus a small offset, 1..9, 10 or 20 either way: the slips a small policy makes). The model is a
Llama initialised from the policy plus a linear head read at the line's last token (its
newline, or EOS for the answer line), trained by logistic regression (``sigmoid(head) =
P(line correct)``); it reads the line without its context, so it checks the arithmetic of
``a op b = c``, not whether ``a`` is the previous result. Answer lines ("The answer is N") carry
no arithmetic and are labelled correct.

`qstar_jax.search.steps.scorers.StepVerifier` scores search nodes with it: the product over the
node's steps of ``P(step correct)``.

- `step_verifier_data(seed, n_problems, split, tokenizer, ...)`: the labelled lines.
- `synthetic_step_pairs(problems, tokenizer, ...)`: the same perturbation as step preference
  pairs in the policy's context (step-DPO data in volume, `experiments.qvalue_stepdpo`).
- `train_step_verifier(policy, train, test, cfg, out_dir=...)`: the trained model and its
  held-out accuracy per line kind along training (the project's train loop: orbax checkpoints,
  auto-resume, metrics.jsonl + TensorBoard).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from qstar_jax.data.reasoning import PreferencePair
from qstar_jax.envs.arithmetic import OPERATIONS, generate_problems, parse_step
from qstar_jax.search.steps.scorers import line_logits
from qstar_jax.training.metrics import read_metrics
from qstar_jax.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from qstar_jax.training.train_loop import TrainLoopConfig, evaluate, make_eval_step
from qstar_jax.training.train_loop import train as run_train_loop

__all__ = ["LINE_OFFSETS", "StepVerifierConfig", "VerifierLines", "perturbed_result",
           "split_after", "step_verifier_data", "synthetic_step_pairs", "train_step_verifier"]

# Wrong results: the right one plus one of these (kept positive). The committed policy's own
# wrong results are mostly off by 1..9 (measured: +-1 and +-2 most often), some by 10 or 20.
LINE_OFFSETS = tuple(d for m in (*range(1, 10), 10, 20) for d in (m, -m))
ANSWER_KIND = "answer"


@dataclasses.dataclass(frozen=True)
class VerifierLines:
  """Labelled lines: ids ``[BOS] + encode(line) + [end]`` (end: newline, EOS for answer
  lines), whether each is correct, and its kind (an operation, or "answer")."""

  ids: tuple[tuple[int, ...], ...]
  correct: np.ndarray          # [L] bool
  kinds: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.ids)


def step_verifier_data(seed: int, n_problems: int, split: str, tokenizer: Any, *, bos_id: int,
                       newline_id: int, eos_id: int, wrong_fraction: float = 0.5,
                       answer_lines: bool = True) -> VerifierLines:
  """The operation lines (and, with ``answer_lines``, the answer line) of the reference
  solutions of ``generate_problems(seed, n_problems, split=split)``; each operation line's
  result replaced, with probability ``wrong_fraction`` (a stream seeded by ``(seed, split)``),
  by the right one plus an offset of `LINE_OFFSETS` that keeps it positive."""
  if not 0 <= wrong_fraction <= 1:
    raise ValueError(f"wrong_fraction={wrong_fraction}: expected in [0, 1]")
  rng = random.Random(f"qstar_jax.step_verifier.{seed}.{split}")
  ids, correct, kinds = [], [], []
  for p in generate_problems(seed, n_problems, split=split):
    for line in p.solution_steps:
      a, op, b, c = parse_step(line)
      ok = rng.random() >= wrong_fraction
      if not ok:
        c = perturbed_result(c, rng)
      ids.append((bos_id, *tokenizer.encode(f"{a} {op} {b} = {c}"), newline_id))
      correct.append(ok)
      kinds.append(op)
    if answer_lines:
      ids.append((bos_id, *tokenizer.encode(f"The answer is {p.answer}"), eos_id))
      correct.append(True)
      kinds.append(ANSWER_KIND)
  return VerifierLines(ids=tuple(ids), correct=np.array(correct, bool), kinds=tuple(kinds))


def perturbed_result(c: int, rng: random.Random) -> int:
  """A wrong result: ``c`` plus an offset of `LINE_OFFSETS` (drawn from ``rng``) keeping it > 0."""
  return c + rng.choice([d for d in LINE_OFFSETS if c + d > 0])


def split_after(ids: Sequence[int], stops: Sequence[int]) -> list[tuple[int, ...]]:
  """``ids`` cut into steps after each id in ``stops`` (kept at the step's end); a last step
  without a stop is kept too.

  >>> split_after([5, 1, 6, 7, 1, 8], (1,))
  [(5, 1), (6, 7, 1), (8,)]
  """
  stops, out, cur = set(stops), [], []
  for t in ids:
    cur.append(t)
    if t in stops:
      out.append(tuple(cur))
      cur = []
  return out + ([tuple(cur)] if cur else [])


def synthetic_step_pairs(problems: Sequence[Any], tokenizer: Any, *,
                         prompt: Callable[[str], Sequence[int]], newline_id: int,
                         seed: int) -> list[PreferencePair]:
  """Step preference pairs from reference solutions, one per operation line: the context is the
  policy's prompt and the solution's earlier lines, ``chosen`` the line, ``rejected`` the same
  line with its result perturbed (`perturbed_result`; the offsets of the policy's own slips).

  Ids are the policy's: the solution text is encoded whole (as in its SFT data) and split after
  each ``newline_id``, the perturbed solution likewise, so both steps end with the newline.
  ``record_index`` is the problem's index, ``depth`` the line's; Q-values are 1 and 0.
  """
  rng = random.Random(f"qstar_jax.synthetic_step_pairs.{seed}")
  pairs = []
  for j, p in enumerate(problems):
    context = list(prompt(p.question))
    good = split_after(tokenizer.encode(p.solution), (newline_id,))
    texts = p.solution.split("\n")
    for i, line in enumerate(p.solution_steps):
      a, op, b, c = parse_step(line)
      wrong = f"{a} {op} {b} = {perturbed_result(c, rng)}"
      bad = split_after(tokenizer.encode("\n".join([*texts[:i], wrong, *texts[i + 1:]])),
                        (newline_id,))[i]
      if good[i][-1] != newline_id or bad[-1] != newline_id:
        raise ValueError(f"problem {j} line {i}: the encoded step does not end with the "
                         f"newline id {newline_id}: {good[i]} / {bad}")
      pairs.append(PreferencePair(context_ids=tuple(context), chosen_ids=good[i],
                                  rejected_ids=bad, chosen_q=1.0, rejected_q=0.0,
                                  record_index=j, depth=i, chosen_text=line,
                                  rejected_text=wrong))
      context += good[i]
  return pairs


@dataclasses.dataclass(frozen=True)
class StepVerifierConfig:
  steps: int = 2000
  batch_size: int = 256
  eval_every: int = 250
  seed: int = 0
  optim: OptimizerConfig = OptimizerConfig(lr=3e-3, warmup_steps=50, weight_decay=0.01)
  checkpoint_every: int = 500     # 0: only at the end
  log_every: int = 50


def _pad(lines: VerifierLines, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(lines), width), pad_id, np.int32)
  for i, s in enumerate(lines.ids):
    tokens[i, :len(s)] = s
  return tokens, np.array([len(s) - 1 for s in lines.ids], np.int32)


def train_step_verifier(graphdef: Any, policy_params: Any, train: VerifierLines,
                        test: VerifierLines, cfg: StepVerifierConfig, *, hidden_size: int,
                        pad_id: int, out_dir: str | os.PathLike,
                        run_config: Mapping[str, Any] | None = None,
                        show_progress: bool | None = None,
                        max_seconds: float = 0.0) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains the verifier from the policy's Llama (a zero head: every line starts at P = 1/2) on
  the project's train loop: ``out_dir`` gets ``checkpoints/`` (orbax; a killed run rerun with
  the same arguments resumes from its last checkpoint, same batches) and ``metrics.jsonl``
  (+ TensorBoard). Batch i is ``batch_size`` lines drawn uniformly (the i-th draw of
  ``np.random.default_rng(cfg.seed)``). ``max_seconds`` > 0 stops it (checkpointed) once that
  much time has passed.

  Returns:
    (params ``{"model", "head"}``, record: ``history`` [{"step", "loss", "accuracy",
    "by_kind": {kind: accuracy}}] on ``test`` (step 0 first; ``loss`` is the test loss),
    ``seconds`` (this call's), sizes).

  Raises:
    ValueError: empty data, or a batch size, step count or evaluation period below 1.
  """
  for name in ("steps", "batch_size", "eval_every"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"{name}={getattr(cfg, name)}: expected >= 1")
  if not len(train) or not len(test):
    raise ValueError(f"{len(train)} train and {len(test)} test lines: expected some of each")
  width = max(len(s) for s in train.ids + test.ids)
  train_tokens, train_last = _pad(train, width, pad_id)
  test_tokens, test_last = _pad(test, width, pad_id)
  kinds = [k for k in (*OPERATIONS, ANSWER_KIND) if k in set(test.kinds)]
  test_batch = {"tokens": test_tokens, "last": test_last,
                "y": test.correct.astype(np.float32),
                "kind": np.array([kinds.index(k) for k in test.kinds], np.int32)}
  params = {"model": policy_params,
            "head": {"kernel": jnp.zeros((hidden_size, 1), jnp.float32),
                     "bias": jnp.zeros(1, jnp.float32)}}

  def scored(p, batch):
    logits = line_logits(graphdef, p, batch["tokens"], batch["last"])
    loss = optax.sigmoid_binary_cross_entropy(logits, batch["y"]).mean()
    return loss, (logits > 0) == (batch["y"] > 0.5)

  def loss_fn(p, batch, rng_key):
    loss, right = scored(p, batch)
    return loss, {"accuracy": jnp.mean(right)}

  def eval_loss_fn(p, batch):
    # Integer counts (exact on the host; the test set is one batch) beside float32 accuracies.
    loss, right = scored(p, batch)
    aux = {"accuracy": jnp.mean(right), "right": jnp.sum(right)}
    for j, kind in enumerate(kinds):
      mine = batch["kind"] == j
      aux[f"accuracy/{kind}"] = jnp.sum(right & mine) / jnp.sum(mine)
      aux[f"right/{kind}"] = jnp.sum(right & mine)
    return loss, aux

  def batches(start_step: int) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(cfg.seed)
    for _ in range(start_step):   # the draws of the steps already done
      rng.integers(0, len(train), cfg.batch_size)
    while True:
      rows = rng.integers(0, len(train), cfg.batch_size)
      yield {"tokens": train_tokens[rows], "last": train_last[rows],
             "y": train.correct[rows].astype(np.float32)}

  per_kind = {k: test.kinds.count(k) for k in kinds}

  def entry(step: int, means: Mapping[str, float]) -> dict[str, Any]:
    return {"step": step, "loss": float(means["loss"]),
            "accuracy": means["right"] / len(test),
            "by_kind": {k: means[f"right/{k}"] / per_kind[k] for k in kinds}}

  out_dir = pathlib.Path(out_dir)
  loop = TrainLoopConfig(num_steps=cfg.steps, eval_every=cfg.eval_every,
                         checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                         seed=cfg.seed)
  run_config = dict(run_config or {"step_verifier": dataclasses.asdict(cfg)})
  run_config["data"] = {"train_lines": len(train), "test_lines": len(test), "width": width}
  t0 = time.perf_counter()
  first = evaluate(make_eval_step(eval_loss_fn), params, [test_batch])
  result = run_train_loop(loss_fn, params, optimizer=make_optimizer(cfg.optim, total_steps=cfg.steps),
                 train_batches=batches, config=loop, out_dir=out_dir, run_config=run_config,
                 eval_loss_fn=eval_loss_fn, eval_batches=lambda: [test_batch],
                 lr_fn=lr_schedule(cfg.optim, total_steps=cfg.steps),
                 show_progress=show_progress, progress_desc="step verifier",
                 max_seconds=max_seconds)
  # The evaluations of every call (a resumed run's earlier ones too) from metrics.jsonl.
  evals = {int(r["step"]): {k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}
           for r in read_metrics(out_dir) if any(k.startswith("eval/") for k in r)}
  history = [entry(0, first)] + [entry(step, evals[step]) for step in sorted(evals)]
  return result.params, {"history": history, "seconds": time.perf_counter() - t0,
                         "resumed_from": result.resumed_from, "steps": result.step,
                         "train_lines": len(train), "test_lines": len(test),
                         "test_correct_fraction": float(test.correct.mean())}
