"""Answer a GSM8K test question step by step with a pretrained model.

    python -m experiments.gsm8k_demo [model=smollm2] [index=0] [max_steps=12] [out=DIR]

Each reasoning step is decoded greedily until a newline (the step delimiter) or EOS, then the
next step continues from the KV cache of everything so far (the prefix is never recomputed):
the same step abstraction the reasoning searches use. Prints each step, the extracted answer
against the reference, and decoding throughput (compilation excluded).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from qstar_jax.data.gsm8k import load_gsm8k
from qstar_jax.envs.grading import answers_match, extract_final_number, states_answer
from qstar_jax.models import load_pretrained
from qstar_jax.models.decoding import decode, delimiter_token_ids
from qstar_jax.training.config import parse_config

INSTRUCTION = (
  "Solve the math problem step by step. Write one short step per line and finish with a "
  "line 'The answer is N.'\n\n"
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  model: str = "smollm2"       # registered name, HF directory or .gguf file
  split: str = "test"
  index: int = 0               # which problem of the split
  max_steps: int = 12          # reasoning steps (lines) at most
  max_step_tokens: int = 64    # tokens per step at most
  dtype: str = "float32"
  out: str | None = None       # optional directory for results.json


@dataclasses.dataclass(frozen=True)
class StepRollout:
  steps: list[list[int]]       # token ids of each step (delimiter / EOS included)
  finished: bool               # ended at EOS (rather than at max_steps)
  decode_seconds: float        # wall time of all decode calls after the first (compiled) one
  compile_seconds: float       # wall time of the first decode call (compilation + its decoding)
  tokens_after_first: int      # tokens decoded by the calls timed in decode_seconds


def greedy_step_rollout(graphdef: nnx.GraphDef, params: Any, *, prompt_ids: list[int],
                        step_stop_ids: tuple[int, ...], eos_ids: tuple[int, ...],
                        max_steps: int, max_step_tokens: int,
                        is_final_step=None, on_step=None) -> StepRollout:
  """Greedy decoding one step at a time, each step continuing from the previous KV cache.

  Stops at EOS, after `max_steps`, or after a step for which `is_final_step(step_ids)` is true.

  Every call has the same shapes (one new token, a cache of fixed size), so it compiles once.
  """
  cache_max_len = len(prompt_ids) + max_steps * max_step_tokens
  rng = jax.random.key(0)  # unused by greedy decoding
  cache = None
  tokens = np.asarray([prompt_ids], np.int32)
  steps: list[list[int]] = []
  decode_seconds = compile_seconds = 0.0
  tokens_after_first = 0
  finished = False
  for step in range(max_steps):
    start = time.perf_counter()
    result = decode(graphdef, params, rng, tokens=tokens, cache=cache,
                    max_new_tokens=max_step_tokens, greedy=True,
                    stop_token_ids=step_stop_ids, cache_max_len=cache_max_len)
    n = int(result.lengths[0])
    ids = [int(t) for t in np.asarray(result.tokens[0, :n])]
    elapsed = time.perf_counter() - start
    if step == 0:
      compile_seconds = elapsed
    else:
      decode_seconds += elapsed
      tokens_after_first += n
    steps.append(ids)
    if on_step is not None:
      on_step(step, ids)
    # A step ends at a delimiter or at max_step_tokens; the rollout ends at EOS or a final step.
    if ids[-1] in eos_ids or (is_final_step is not None and is_final_step(ids)):
      finished = True
      break
    # Continue: the step's last token was sampled but not yet fed through the model.
    cache = result.cache
    tokens = np.asarray([[ids[-1]]], np.int32)
  return StepRollout(steps=steps, finished=finished, decode_seconds=decode_seconds,
                     compile_seconds=compile_seconds, tokens_after_first=tokens_after_first)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(DemoConfig, sys.argv[1:] if argv is None else argv, presets_dir=None)
  problem = load_gsm8k(cfg.split)[cfg.index]
  start = time.perf_counter()
  model, tokenizer = load_pretrained(cfg.model, dtype=cfg.dtype)
  load_seconds = time.perf_counter() - start
  if tokenizer is None:
    raise ValueError(f"model {cfg.model!r} has no tokenizer; the demo needs one")
  graphdef, params = nnx.split(model)
  messages = [{"role": "user", "content": INSTRUCTION + problem["question"]}]
  prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  prompt_ids = tokenizer.encode(prompt)
  print(f"[{cfg.split} #{cfg.index}] {problem['question']}\n")
  print(f"model {cfg.model}: loaded in {load_seconds:.1f}s; prompt {len(prompt_ids)} tokens\n")

  def show(step: int, ids: list[int]) -> None:
    print(f"  step {step + 1}: {tokenizer.decode(ids).strip()}", flush=True)

  rollout = greedy_step_rollout(
    graphdef, params, prompt_ids=prompt_ids,
    step_stop_ids=delimiter_token_ids(tokenizer, "\n"),
    eos_ids=tuple(model.config.eos_token_ids) + tuple(tokenizer.eos_ids),
    max_steps=cfg.max_steps, max_step_tokens=cfg.max_step_tokens,
    is_final_step=lambda ids: states_answer(tokenizer.decode(ids)), on_step=show)
  text = tokenizer.decode([t for step in rollout.steps for t in step])
  predicted = extract_final_number(text)
  correct = answers_match(predicted, problem["final_answer"])
  tokens_per_s = (rollout.tokens_after_first / rollout.decode_seconds
                  if rollout.decode_seconds > 0 else float("nan"))
  print(f"\npredicted answer: {predicted}   reference: {problem['final_answer']}   "
        f"correct: {correct}")
  print(f"decoding: {tokens_per_s:.1f} tokens/s over {rollout.tokens_after_first} tokens "
        f"(first step incl. compile: {rollout.compile_seconds:.1f}s) on {jax.devices()[0].platform}")
  results = {"config": dataclasses.asdict(cfg), "question": problem["question"],
             "steps": [tokenizer.decode(s) for s in rollout.steps], "predicted": predicted,
             "reference": problem["final_answer"], "correct": correct,
             "tokens_per_s": tokens_per_s, "compile_seconds": rollout.compile_seconds}
  if cfg.out:
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
  return results


if __name__ == "__main__":
  main()
