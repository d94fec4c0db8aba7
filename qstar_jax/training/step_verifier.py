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
- `train_step_verifier(policy, train, test, cfg)`: the trained model and its held-out accuracy
  per line kind along training.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qstar_jax.envs.arithmetic import OPERATIONS, generate_problems, parse_step
from qstar_jax.search.steps.scorers import line_logits
from qstar_jax.training.optim import OptimizerConfig, make_optimizer
from qstar_jax.training.progress import progress

__all__ = ["LINE_OFFSETS", "StepVerifierConfig", "VerifierLines", "step_verifier_data",
           "train_step_verifier"]

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
        c += rng.choice([d for d in LINE_OFFSETS if c + d > 0])
      ids.append((bos_id, *tokenizer.encode(f"{a} {op} {b} = {c}"), newline_id))
      correct.append(ok)
      kinds.append(op)
    if answer_lines:
      ids.append((bos_id, *tokenizer.encode(f"The answer is {p.answer}"), eos_id))
      correct.append(True)
      kinds.append(ANSWER_KIND)
  return VerifierLines(ids=tuple(ids), correct=np.array(correct, bool), kinds=tuple(kinds))


@dataclasses.dataclass(frozen=True)
class StepVerifierConfig:
  steps: int = 2000
  batch_size: int = 256
  eval_every: int = 250
  seed: int = 0
  optim: OptimizerConfig = OptimizerConfig(lr=3e-3, warmup_steps=50, weight_decay=0.01)


def _pad(lines: VerifierLines, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(lines), width), pad_id, np.int32)
  for i, s in enumerate(lines.ids):
    tokens[i, :len(s)] = s
  return tokens, np.array([len(s) - 1 for s in lines.ids], np.int32)


def train_step_verifier(graphdef: Any, policy_params: Any, train: VerifierLines,
                        test: VerifierLines, cfg: StepVerifierConfig, *, hidden_size: int,
                        pad_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains the verifier from the policy's Llama (a zero head: every line starts at P = 1/2).

  Returns:
    (params ``{"model", "head"}``, record: ``history`` [{"step", "loss", "accuracy",
    "by_kind": {kind: accuracy}}] on ``test`` (step 0 first), ``seconds``, sizes).

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
  params = {"model": policy_params,
            "head": {"kernel": jnp.zeros((hidden_size, 1), jnp.float32),
                     "bias": jnp.zeros(1, jnp.float32)}}

  def loss_fn(p, tokens, last, y):
    return optax.sigmoid_binary_cross_entropy(line_logits(graphdef, p, tokens, last), y).mean()

  tx = make_optimizer(cfg.optim, total_steps=cfg.steps)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s, tokens, last, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens, last, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  predict = jax.jit(lambda p, t, last: line_logits(graphdef, p, t, last))
  kinds = np.array(test.kinds)

  def evaluate(i: int, loss: float) -> dict[str, Any]:
    right = (np.asarray(predict(params, test_tokens, test_last)) > 0) == test.correct
    return {"step": i, "loss": loss, "accuracy": float(right.mean()),
            "by_kind": {k: float(right[kinds == k].mean())
                        for k in (*OPERATIONS, ANSWER_KIND) if (kinds == k).any()}}

  rng = np.random.default_rng(cfg.seed)
  history = [evaluate(0, float("nan"))]
  t0 = time.perf_counter()
  for i in progress(range(1, cfg.steps + 1), desc="step verifier", unit="step"):
    rows = rng.integers(0, len(train), cfg.batch_size)
    params, opt_state, loss = step(params, opt_state, train_tokens[rows], train_last[rows],
                                   train.correct[rows].astype(np.float32))
    if i % cfg.eval_every == 0 or i == cfg.steps:
      history.append(evaluate(i, float(loss)))
  return params, {"history": history, "seconds": time.perf_counter() - t0,
                  "train_lines": len(train), "test_lines": len(test),
                  "test_correct_fraction": float(test.correct.mean())}

