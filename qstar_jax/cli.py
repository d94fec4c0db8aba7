"""Command line: `qstar-jax generate ...` and `qstar-jax bench decode ...` (also `python -m qstar_jax`).

  qstar-jax generate --model SPEC --prompt TEXT [--chat] [--max-new-tokens N]
                     [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]
  qstar-jax bench decode --model SPEC --batch B --prompt-len P --new-tokens N [--json]
  qstar-jax bench search --method mcts|beam|best_of_n|particle --model SPEC --batch B
                         --candidates K --simulations S --prompt-len P [--step-tokens T]
                         [--repeats R] [--json]

SPEC is what `qstar_jax.models.load_model_spec` accepts: a Hugging Face directory, a .gguf file,
a registered name such as "smollm2", or `preset:NAME` for a randomly initialised model of a
config preset (e.g. `preset:tiny`; its tokenizer maps bytes to ids 0..255).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import jax
from flax import nnx

from qstar_jax.benchmarks.decode import bench_decode
from qstar_jax.benchmarks.search import SEARCH_METHODS, SearchBenchConfig, bench_search
from qstar_jax.models.decoding import SamplingConfig, decode
from qstar_jax.models.errors import PromptError, QstarError
from qstar_jax.models.loading import PRESET_PREFIX, load_model_spec

__all__ = ["main", "generate_text"]


def generate_text(model, tokenizer, prompt: str, *, chat: bool = False,
                  max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0) -> dict[str, Any]:
  """Encode `prompt` (through the chat template with `chat`), decode, and time it.

  temperature 0 means greedy. Returns prompt_ids, token_ids (stop token included), text
  (the generated ids without a trailing EOS, decoded), tokens_per_s and seconds.
  """
  if tokenizer is None:
    raise PromptError("this model was loaded without a tokenizer; cannot encode a text prompt")
  text = prompt
  if chat:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
  prompt_ids = list(tokenizer.encode(text)) if text else []
  if not prompt_ids:
    raise PromptError(f"empty prompt: {prompt!r} encodes to no tokens; expected at least one")
  graphdef, params = nnx.split(model)
  eos = set(model.config.eos_token_ids) | set(getattr(tokenizer, "eos_ids", ()) or ())
  start = time.perf_counter()
  sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=temperature <= 0,
                            temperature=max(temperature, 1e-6), top_k=top_k, top_p=top_p)
  res = decode(graphdef, params, jax.random.key(seed), tokens=[prompt_ids], sampling=sampling,
               stop_token_ids=sorted(eos - set(model.config.eos_token_ids)),
               model_config=model.config)
  n = int(res.lengths[0])
  token_ids = [int(t) for t in res.tokens[0, :n]]
  seconds = time.perf_counter() - start
  text_ids = token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids
  return {"prompt_ids": [int(i) for i in prompt_ids], "token_ids": token_ids,
          "text": tokenizer.decode(text_ids), "tokens_per_s": n / seconds,
          "seconds": seconds}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="qstar-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  gen = sub.add_parser("generate", help="continue a prompt with a pretrained model")
  gen.add_argument("--model", required=True, help="HF dir, .gguf file, registered name, "
                   "or preset:NAME")
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  gen.add_argument("--max-new-tokens", type=int, default=64)
  gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  gen.add_argument("--top-k", type=int, default=None)
  gen.add_argument("--top-p", type=float, default=None)
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  gen.add_argument("--json", action="store_true",
                   help="print one JSON object with prompt_ids, token_ids, text")
  bench = sub.add_parser("bench", help="benchmarks")
  bench_sub = bench.add_subparsers(dest="bench_command", required=True)
  dec = bench_sub.add_parser("decode", help="batched greedy decode throughput")
  dec.add_argument("--model", required=True)
  dec.add_argument("--batch", type=int, default=1)
  dec.add_argument("--prompt-len", type=int, default=32)
  dec.add_argument("--new-tokens", type=int, default=64)
  dec.add_argument("--repeats", type=int, default=3)
  dec.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  dec.add_argument("--json", action="store_true")
  srch = bench_sub.add_parser("search", help="jitted LM step search vs its baselines "
                              "(qstar_jax.benchmarks.search)")
  srch.add_argument("--method", default="mcts", choices=SEARCH_METHODS)
  srch.add_argument("--model", required=True)
  srch.add_argument("--batch", type=int, default=16)
  srch.add_argument("--candidates", type=int, default=4, help="K: MCTS actions, beam width "
                    "and expansions, best-of-N's N, particles")
  srch.add_argument("--simulations", type=int, default=16, help="MCTS simulations")
  srch.add_argument("--prompt-len", type=int, default=32)
  srch.add_argument("--step-tokens", type=int, default=8, help="T: tokens per step")
  srch.add_argument("--max-depth", type=int, default=4, help="steps per solution at most")
  srch.add_argument("--repeats", type=int, default=3)
  srch.add_argument("--baseline-batch", type=int, default=None,
                    help="problems of the Python-tree and no-prefix-reuse baselines")
  srch.add_argument("--baseline-simulations", type=int, default=None)
  srch.add_argument("--prompts", default=None, choices=("random", "gsm8k"),
                    help="default: random ids for preset:NAME, few-shot GSM8K otherwise")
  srch.add_argument("--stops", default="ignore", choices=("ignore", "newline"),
                    help="ignore: steps of exactly --step-tokens tokens")
  srch.add_argument("--seed", type=int, default=0)
  srch.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  srch.add_argument("--json", action="store_true")
  return parser


def _search_config(args: argparse.Namespace) -> SearchBenchConfig:
  """`bench search`'s options as a `SearchBenchConfig` (prompts: random ids for preset:NAME
  models, few-shot GSM8K for pretrained ones, unless --prompts says)."""
  prompts = args.prompts or ("random" if args.model.startswith(PRESET_PREFIX) else "gsm8k")
  return SearchBenchConfig(
    method=args.method, batch=args.batch, candidates=args.candidates,
    simulations=args.simulations, prompt_len=args.prompt_len, step_tokens=args.step_tokens,
    max_depth=args.max_depth, repeats=args.repeats, seed=args.seed,
    baseline_batch=args.baseline_batch, baseline_simulations=args.baseline_simulations,
    prompts=prompts, stops=args.stops)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    for name in ("max_new_tokens", "batch", "prompt_len", "new_tokens", "repeats",
                 "candidates", "simulations", "step_tokens", "max_depth"):
      value = getattr(args, name, None)
      if value is not None and value < 1:
        raise ValueError(f"--{name.replace('_', '-')}={value}: expected >= 1")
    if getattr(args, "bench_command", None) == "search":
      search_config = _search_config(args)
      search_config.check()
    model, tokenizer = load_model_spec(args.model, dtype=args.dtype)
    if args.command == "generate":
      out = generate_text(model, tokenizer, args.prompt, chat=args.chat,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)
      if args.json:
        print(json.dumps({k: out[k] for k in ("prompt_ids", "token_ids", "text")}))
      else:
        print(out["text"])
        print(f"[{len(out['token_ids'])} tokens, {out['tokens_per_s']:.1f} tokens/s "
              "including compile]", file=sys.stderr)
    elif args.bench_command == "search":
      out = bench_search(model, search_config, tokenizer=tokenizer,
                         log=lambda line: print(f"[bench search] {line}", file=sys.stderr))
    else:
      out = bench_decode(model, batch=args.batch, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, repeats=args.repeats)
    if args.command == "bench" and args.json:
      print(json.dumps(out))
    elif args.command == "bench":
      for key, value in out.items():
        print(f"{key:>20}: {value:.4g}" if isinstance(value, float) else f"{key:>20}: {value}")
  except (QstarError, ValueError) as err:
    print(f"qstar-jax: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
