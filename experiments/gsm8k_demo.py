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
from flax import nnx

from qstar_jax.data.gsm8k import load_gsm8k
from qstar_jax.envs.grading import answers_match, extract_final_number, states_answer
from qstar_jax.models import load_pretrained
from qstar_jax.models.decoding import SamplingConfig, delimiter_token_ids
from qstar_jax.search.steps import step_rollout
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

  def show(step: int, problem: int, ids: tuple[int, ...]) -> None:
    print(f"  step {step + 1}: {tokenizer.decode(list(ids)).strip()}", flush=True)

  rollout = step_rollout(
    graphdef, params, jax.random.key(0), prompts=[prompt_ids],
    sampling=SamplingConfig(max_new_tokens=cfg.max_step_tokens, greedy=True),
    max_steps=cfg.max_steps, step_stop_ids=delimiter_token_ids(tokenizer, "\n"),
    eos_ids=tuple(tokenizer.eos_ids), tokenizer=tokenizer,
    is_final_step=lambda ids: states_answer(tokenizer.decode(list(ids))), on_step=show)
  text = tokenizer.decode([t for step in rollout.steps[0] for t in step])
  predicted = extract_final_number(text)
  correct = answers_match(predicted, problem["final_answer"])
  # Throughput after the first call (which compiles); the second call compiles the
  # continuation program and is counted, as it always was.
  decode_seconds, tokens_after_first = sum(rollout.call_seconds[1:]), sum(rollout.call_tokens[1:])
  compile_seconds = rollout.call_seconds[0]
  tokens_per_s = tokens_after_first / decode_seconds if decode_seconds > 0 else float("nan")
  print(f"\npredicted answer: {predicted}   reference: {problem['final_answer']}   "
        f"correct: {correct}")
  print(f"decoding: {tokens_per_s:.1f} tokens/s over {tokens_after_first} tokens "
        f"(first step incl. compile: {compile_seconds:.1f}s) on {jax.devices()[0].platform}")
  results = {"config": dataclasses.asdict(cfg), "question": problem["question"],
             "steps": list(rollout.texts[0]), "predicted": predicted,
             "reference": problem["final_answer"], "correct": correct,
             "tokens_per_s": tokens_per_s, "compile_seconds": compile_seconds}
  if cfg.out:
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
  return results


if __name__ == "__main__":
  main()
