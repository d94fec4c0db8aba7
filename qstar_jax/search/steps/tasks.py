"""Ready-to-search tasks: a policy, its step definition, prompts and references, and `evaluate`.

- `arithmetic_task`: the committed small arithmetic policy (`qstar_jax/assets/arithmetic_policy`)
  with its outcome value head, on generated test problems; or with a step verifier
  (`ArithmeticTask.verifier`, `training.step_verifier`) scoring the nodes of value-guided
  methods instead of the head.
- `gsm8k_task`: a pretrained chat model (SmolLM2-135M-Instruct by default, or an HF directory)
  on GSM8K test questions, zero-shot, one reasoning step per line; no value head (values 0).
- `evaluate(task, method, budget)`: runs one search method over the task in equal batches
  (one compiled program) and grades the answers: accuracy, tokens decoded per problem, batched
  model calls, wall time (the first batch's compile included; call twice to time warm).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from qstar_jax.data.gsm8k import load_gsm8k
from qstar_jax.envs.arithmetic import generate_problems, policy_prompt
from qstar_jax.envs.grading import answers_match
from qstar_jax.models import load_pretrained
from qstar_jax.models.arithmetic_policy import load_arithmetic_policy
from qstar_jax.models.decoding import delimiter_token_ids
from qstar_jax.search.steps.methods import (
  SearchBudget,
  method_answers,
  prompt_batches,
  run_method,
)
from qstar_jax.search.steps.scorers import (
  NodeScorer,
  StepVerifier,
  scored_expand,
  step_verifier_value_params,
  zero_value,
)
from qstar_jax.search.steps.step_tree import PolicyValueParams, StepSpec

__all__ = ["VALUE_FREE_METHODS", "ArithmeticTask", "Gsm8kTask", "SearchTask", "arithmetic_task",
           "evaluate", "gsm8k_prompt", "gsm8k_task"]

GSM8K_INSTRUCTION = (
  "Solve the math problem step by step. Write one short step per line and finish with a "
  "line 'The answer is N.'\n\n")
# A step stating one of these is a finished solution (SmolLM2 tokenizes them the same way at a
# line start and after a space).
GSM8K_FINAL_TEXTS = ("The answer is", " The answer is", "the answer is")


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  n_problems: int = 500
  seed: int = 0                 # test problems generate_problems(seed, n, split="test")
  batch: int = 100
  policy: str = ""              # folder of a trained policy; "" = the committed one
  max_step_tokens: int = 24
  scales: tuple[float, ...] = (0.25, 1.0)   # budget multipliers (curves); 1.0 = the table
  # A step verifier's folder (experiments.verifier_probe writes out/step_verifier): nodes of
  # the value-guided methods are scored by `StepVerifier` with it; "" = the policy's value head.
  verifier: str = ""


@dataclasses.dataclass(frozen=True)
class Gsm8kTask:
  model: str = "smollm2"        # registered name or HF directory
  n_problems: int = 4           # first n test questions; 0 = all
  batch: int = 4
  max_step_tokens: int = 48
  max_depth: int = 10
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class SearchTask:
  """A task ready to search: its policy, step definition, prompts and grader."""

  name: str
  graphdef: nnx.GraphDef
  params: PolicyValueParams
  tokenizer: Any
  spec: StepSpec
  prompts: tuple[tuple[int, ...], ...]
  references: tuple[str, ...]
  questions: tuple[str, ...]
  batch: int
  # Scores the nodes of the value-guided methods instead of the policy's value head (see
  # `evaluate`); scorer_params(prompt_tokens [B, P], prompt_lengths [B]) -> params.value.
  scorer: NodeScorer | None = None
  scorer_params: Callable[[np.ndarray, np.ndarray], Any] | None = None


# Methods that never read a node's value: `evaluate` runs them without the task's scorer.
VALUE_FREE_METHODS = ("greedy", "majority")


def _step_verifier(folder: str, policy: Any) -> tuple[NodeScorer,
                                                     Callable[[np.ndarray, np.ndarray], Any]]:
  verifier = load_arithmetic_policy(folder)
  kind = verifier.config.get("value_training", {})
  if not isinstance(kind, dict) or kind.get("kind") != "step_verifier":
    raise ValueError(f"arithmetic.verifier={folder!r}: not a step verifier (its config.json "
                     f"value_training is {kind!r}; expected one written by "
                     "experiments.verifier_probe, kind 'step_verifier')")
  # It reads the policy's step tokens: the two must share one tokenizer.
  mine, theirs = (verifier.path / "tokenizer.model", policy.path / "tokenizer.model")
  if mine.read_bytes() != theirs.read_bytes():
    raise ValueError(f"arithmetic.verifier={folder!r}: its tokenizer ({mine}) differs from the "
                     f"policy's ({theirs}); expected a verifier trained from this policy")
  value = step_verifier_value_params(verifier.params, verifier.value_head())
  return StepVerifier(verifier.graphdef, bos_id=verifier.bos_id), lambda tokens, lengths: value


def arithmetic_task(cfg: ArithmeticTask) -> SearchTask:
  """The committed arithmetic policy (or cfg.policy) and `n_problems` test problems."""
  policy = load_arithmetic_policy(cfg.policy or None)
  params = PolicyValueParams(policy=policy.params, value=policy.value_head())
  problems = generate_problems(cfg.seed, cfg.n_problems, split="test")
  prompts = tuple(
    (policy.bos_id, *policy.tokenizer.encode(policy_prompt(p.question,
                                                           prompt_format=policy.prompt_format)))
    for p in problems)
  spec = StepSpec(stop_ids=(policy.newline_id,), eos_ids=(policy.eos_id,),
                  max_step_tokens=cfg.max_step_tokens, pad_id=policy.pad_id)
  scorer, scorer_params = (_step_verifier(cfg.verifier, policy) if cfg.verifier
                           else (None, None))
  return SearchTask(name="arithmetic", graphdef=policy.graphdef, params=params,
                    tokenizer=policy.tokenizer, spec=spec, prompts=prompts,
                    references=tuple(str(p.answer) for p in problems),
                    questions=tuple(p.question for p in problems), batch=cfg.batch,
                    scorer=scorer, scorer_params=scorer_params)


def gsm8k_prompt(tokenizer: Any, question: str) -> list[int]:
  """The zero-shot chat prompt of a GSM8K question (one step per line, a stated answer)."""
  messages = [{"role": "user", "content": GSM8K_INSTRUCTION + question}]
  return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def gsm8k_task(cfg: Gsm8kTask) -> SearchTask:
  """A pretrained chat model (no value head) on the first `n_problems` GSM8K test questions."""
  records = load_gsm8k("test")
  if cfg.n_problems:
    records = records[:cfg.n_problems]
  model, tokenizer = load_pretrained(cfg.model, dtype=cfg.dtype)
  if tokenizer is None:
    raise ValueError(f"gsm8k.model={cfg.model!r} has no tokenizer; the search needs one")
  graphdef, params = nnx.split(model)
  markers = tuple(tuple(tokenizer.encode(t)) for t in GSM8K_FINAL_TEXTS)
  spec = StepSpec(stop_ids=delimiter_token_ids(tokenizer, "\n"), eos_ids=tuple(tokenizer.eos_ids),
                  max_step_tokens=cfg.max_step_tokens, final_markers=markers)
  return SearchTask(name="gsm8k", graphdef=graphdef, params=PolicyValueParams(policy=params),
                    tokenizer=tokenizer, spec=spec,
                    prompts=tuple(tuple(gsm8k_prompt(tokenizer, r["question"]))
                                  for r in records),
                    references=tuple(r["final_answer"] for r in records),
                    questions=tuple(r["question"] for r in records), batch=cfg.batch)


def evaluate(task: SearchTask, method: str, budget: SearchBudget, *, seed: int,
             on_batch: Callable[[int], None] | None = None, scorer: NodeScorer | None = None,
             scorer_params: Callable[[np.ndarray, np.ndarray], Any] | None = None
             ) -> dict[str, Any]:
  """Runs `method` over the task's problems in batches; accuracy and compute.

  With `scorer` (a `scorers.NodeScorer`: a step-DPO Q-model, an implicit PRM, a separate value
  model) the nodes are scored by it instead of the task's value head: each batch's
  `params.value` is `scorer_params(prompt_tokens [B, P], prompt_lengths [B])` (e.g.
  `scorers.q_model_value_params` with the models bound), the policy stays the task's. Without
  one, the task's own scorer (a step verifier) scores methods that read values; greedy and
  majority run without it (`VALUE_FREE_METHODS`: their answers never depend on a value).
  """
  if (scorer is None) != (scorer_params is None):
    raise ValueError("evaluate: scorer and scorer_params go together (the scorer reads "
                     "scorer_params(prompt_tokens, prompt_lengths) as params.value)")
  if scorer is None and task.scorer is not None and method not in VALUE_FREE_METHODS:
    scorer, scorer_params = task.scorer, task.scorer_params
  extra = {} if scorer is None else {"expand_fn": scored_expand(scorer), "value_fn": zero_value}
  correct, tokens, calls, overflow, no_answer = 0, 0, 0, 0, 0
  seconds = 0.0
  texts = []
  n = len(task.prompts)
  # One width and full batches (the last filled with copies): one compiled program.
  for i, (start, real, prompt_tokens, lengths) in enumerate(
      prompt_batches(task.prompts, task.batch)):
    t0 = time.perf_counter()
    params = task.params if scorer is None else PolicyValueParams(
      policy=task.params.policy, value=scorer_params(prompt_tokens, lengths))
    result = run_method(method, params, jax.random.key(seed * 100003 + i),
                        graphdef=task.graphdef, prompt_tokens=prompt_tokens,
                        prompt_lengths=lengths, spec=task.spec, budget=budget, **extra)
    result = jax.block_until_ready(result)
    seconds += time.perf_counter() - t0
    answers = method_answers(method, result, tokenizer=task.tokenizer)[:real]
    refs = task.references[start:start + real]
    correct += sum(answers_match(a, r) for (a, _), r in zip(answers, refs, strict=True))
    no_answer += sum(a is None for a, _ in answers)
    tokens += int(np.asarray(result.tokens_decoded)[:real].sum())
    overflow += int(np.asarray(result.overflow)[:real].sum())
    calls += int(result.model_calls)
    texts.extend(t for _, t in answers)
    if on_batch is not None:
      on_batch(real)
  return {"accuracy": correct / n, "tokens_decoded": tokens / n, "model_calls": calls,
          "n_problems": n, "seconds": seconds, "tokens_per_s": tokens / seconds,
          "no_answer": no_answer, "overflow": overflow, "first_text": texts[0]}
