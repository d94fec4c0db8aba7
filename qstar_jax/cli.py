"""Command line: `qstar-jax generate ...`, `qstar-jax bench ...`, `qstar-jax compile ...` (also `python -m qstar_jax`).

  qstar-jax generate --model SPEC --prompt TEXT [--chat] [--max-new-tokens N]
                     [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]
  qstar-jax bench decode --model SPEC --batch B --prompt-len P --new-tokens N [--json]
  qstar-jax bench search --method mcts|beam|best_of_n|particle --model SPEC --batch B
                         --candidates K --simulations S --prompt-len P [--step-tokens T]
                         [--repeats R] [--json]
  qstar-jax bench mesh [--model PRESET] [--batch B] [--seq-len T] [--devices N] [--repeats R]
                       [--no-search] [--json] [--out FILE]
  qstar-jax compile --target cpu:N|tpu:v5e-8|gpu:h100x8 [--what lm_pretrain|qstar_search]
                    [--mesh fsdp=-1] [--model PRESET] [--batch B] [--seq-len T]
                    [--compilation-cache DIR] [--json]

`compile` lowers and compiles a training step or a search for the target without running it and
prints its memory per device (`qstar_jax.training.compile_report`); `bench mesh` times the
lm_pretrain step and the puzzle Q* search on 1 device vs a mesh of N
(`qstar_jax.benchmarks.scaling`).

SPEC is what `qstar_jax.models.load_model_spec` accepts: a Hugging Face directory, a .gguf file,
a registered name such as "smollm2", or `preset:NAME` for a randomly initialised model of a
config preset (e.g. `preset:tiny`; its tokenizer maps bytes to ids 0..255).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
from flax import nnx

from qstar_jax.benchmarks.decode import bench_decode
from qstar_jax.benchmarks.scaling import MeshBenchConfig, bench_mesh
from qstar_jax.benchmarks.search import SEARCH_METHODS, SearchBenchConfig, bench_search
from qstar_jax.distributed import mesh_config_from, resolve_axis_sizes
from qstar_jax.models.decoding import SamplingConfig, decode
from qstar_jax.models.errors import PromptError, QstarError
from qstar_jax.models.loading import PRESET_PREFIX, load_model_spec
from qstar_jax.training import compile_report as cr

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
  mesh = bench_sub.add_parser("mesh", help="lm_pretrain step and puzzle Q* search on 1 device vs "
                              "a mesh of N (qstar_jax.benchmarks.scaling)")
  mesh.add_argument("--model", default="tiny", help="model preset (qstar_jax.models.config)")
  mesh.add_argument("--batch", type=int, default=16, help="windows per step (a multiple of N)")
  mesh.add_argument("--seq-len", type=int, default=64)
  mesh.add_argument("--devices", type=int, default=8, help="N: devices of the sharded meshes")
  mesh.add_argument("--repeats", type=int, default=5)
  mesh.add_argument("--search-env", default="puzzle8")
  mesh.add_argument("--search-batch", type=int, default=16, help="problems (a multiple of N)")
  mesh.add_argument("--search-iterations", type=int, default=100)
  mesh.add_argument("--no-search", action="store_true", help="only the lm_pretrain step")
  mesh.add_argument("--seed", type=int, default=0)
  mesh.add_argument("--json", action="store_true")
  mesh.add_argument("--out", default=None, help="also write the JSON report to this file")
  comp = sub.add_parser("compile", help="lower and compile a training step or a search for a "
                        "target (cpu:N, tpu:v5e-8, gpu:h100x8) and report its memory, without "
                        "running it")
  comp.add_argument("--target", required=True, help="cpu:N (N simulated host devices), "
                    "tpu:GEN-N (v4, v5e, v5p, v6e; needs libtpu) or gpu:NAMExN (needs CUDA)")
  comp.add_argument("--what", default="lm_pretrain", choices=cr.COMPILE_WHATS)
  comp.add_argument("--mesh", default="fsdp=-1", help="axis sizes, e.g. fsdp=-1 (default), "
                    "data=-1, data=2,tensor=4")
  comp.add_argument("--model", default="tiny", help="lm_pretrain: model preset "
                    "(tiny, llama-10m, smollm2-135m, llama-1b, ...)")
  comp.add_argument("--batch", type=int, default=None, help="windows per step (lm_pretrain) or "
                    "problems (qstar_search); default: the smallest multiple of data x fsdp "
                    ">= 32")
  comp.add_argument("--seq-len", type=int, default=128)
  comp.add_argument("--remat", action="store_true",
                    help="lm_pretrain: rematerialise each block in the backward pass")
  comp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype (parameters stay float32)")
  comp.add_argument("--env", default="cube3", help="qstar_search: puzzle (cube3, puzzle15, ...)")
  comp.add_argument("--compilation-cache", default="", metavar="DIR",
                    help="persistent compilation cache folder (RuntimeConfig.compilation_cache)")
  comp.add_argument("--json", action="store_true", help="print one JSON object")
  return parser


def _compile_command(args: argparse.Namespace, argv: list[str]) -> int:
  """`qstar-jax compile`: for cpu:N, re-runs itself with N host devices (XLA_FLAGS must be set
  before jax starts); otherwise compiles here and prints the report."""
  target = cr.parse_target(args.target)
  if target.platform == "cpu" and os.environ.get(cr.CHILD_ENV) != "1":
    config = mesh_config_from(args.mesh)
    try:
      resolve_axis_sizes(config, target.num_devices)
    except ValueError as err:
      raise type(err)(f"--mesh {args.mesh} does not fit target {target.spec} "
                      f"({target.num_devices} devices): {err}") from None
    proc = subprocess.run([sys.executable, "-m", "qstar_jax", *argv],
                          env=cr.cpu_target_env(target.num_devices), check=False)
    return proc.returncode
  report = cr.compile_report(args.what, target, args.mesh, model=args.model, batch=args.batch,
                             seq_len=args.seq_len, dtype=args.dtype, env=args.env,
                             compilation_cache=args.compilation_cache, remat=args.remat)
  print(json.dumps(report) if args.json else cr.format_report(report))
  return 0 if report["fits"] else 3


def _bench_mesh_command(args: argparse.Namespace) -> int:
  config = MeshBenchConfig(model=args.model, batch=args.batch, seq_len=args.seq_len,
                           num_devices=args.devices, repeats=args.repeats,
                           search=not args.no_search, search_env=args.search_env,
                           search_batch=args.search_batch,
                           search_iterations=args.search_iterations, seed=args.seed)
  out = bench_mesh(config, lm_step=cr.lm_pretrain_step, log=lambda line: print(f"[bench mesh] {line}", file=sys.stderr))
  text = json.dumps(out, indent=1)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  if args.json:
    print(text)
  else:
    for part in ("lm_pretrain", "qstar_search"):
      if part in out:
        ratios = ", ".join(f"{k}: {v:.3g}" for k, v in out[part]["ratios"].items())
        base = out[part]["runs"]["1"]["median_s"]
        unit = "step" if part == "lm_pretrain" else "search"
        print(f"{part:>14}: 1 device {base * 1e3:.2f} ms/{unit}; t_{config.num_devices} / t_1 "
              f"{ratios}")
    print(out["note"])
  return 0


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
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  try:
    for name in ("max_new_tokens", "batch", "prompt_len", "new_tokens", "repeats",
                 "candidates", "simulations", "step_tokens", "max_depth", "seq_len", "devices",
                 "search_batch", "search_iterations"):
      value = getattr(args, name, None)
      if value is not None and value < 1:
        raise ValueError(f"--{name.replace('_', '-')}={value}: expected >= 1")
    if args.command == "compile":
      return _compile_command(args, argv)
    if getattr(args, "bench_command", None) == "mesh":
      return _bench_mesh_command(args)
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
