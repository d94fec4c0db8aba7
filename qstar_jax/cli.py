"""Command line: `qstar-jax generate ...` and `qstar-jax bench decode ...` (also `python -m qstar_jax`).

  qstar-jax generate --model SPEC --prompt TEXT [--chat] [--max-new-tokens N]
                     [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]
  qstar-jax bench decode --model SPEC --batch B --prompt-len P --new-tokens N [--json]

SPEC is what `qstar_jax.models.load_pretrained` accepts (a Hugging Face directory, a .gguf file,
a registered name such as "smollm2"), or `preset:NAME` for a randomly initialised model of a
config preset (e.g. `preset:tiny`; its tokenizer maps bytes to ids 0..255).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

__all__ = ["main", "load_model", "generate_text", "bench_decode", "ByteTokenizer"]


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255 (for `preset:` models with random weights)."""

  bos_id = None
  eos_ids: tuple[int, ...] = ()

  def __init__(self, vocab_size: int = 256):
    self.vocab_size = vocab_size

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def load_model(spec: str, dtype: str = "float32"):
  """(model, tokenizer) for a CLI model SPEC (see the module docstring)."""
  if spec.startswith("preset:"):
    from qstar_jax.models import get_config, init_llama
    config = get_config(spec[len("preset:"):], param_dtype=dtype, dtype=dtype)
    if config.vocab_size < 256:
      raise ValueError(f"preset {spec!r} has vocab_size={config.vocab_size} < 256 bytes")
    import jax
    from flax import nnx

    # Initialise on the host, then move the weights: on an H100 (jax 0.11.2) XLA:GPU was still
    # compiling the jitted random init of the SmolLM2-shaped model after 4 minutes, while the
    # host compiles it in seconds.
    with jax.default_device(jax.devices("cpu")[0]):
      graphdef, state = nnx.split(init_llama(config, seed=0))
    return nnx.merge(graphdef, jax.device_put(state, jax.devices()[0])), ByteTokenizer(
      config.vocab_size)
  from qstar_jax.models import load_pretrained
  return load_pretrained(spec, dtype=dtype)


def generate_text(model, tokenizer, prompt: str, *, chat: bool = False,
                  max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0) -> dict[str, Any]:
  """Encode `prompt` (through the chat template with `chat`), decode, and time it.

  temperature 0 means greedy. Returns prompt_ids, token_ids (stop token included), text
  (the generated ids without a trailing EOS, decoded), tokens_per_s and seconds.
  """
  import jax
  from flax import nnx

  from qstar_jax.models.decoding import decode
  from qstar_jax.models.errors import PromptError

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
  res = decode(graphdef, params, jax.random.key(seed), tokens=[prompt_ids],
               max_new_tokens=max_new_tokens, greedy=temperature <= 0,
               temperature=max(temperature, 1e-6), top_k=top_k, top_p=top_p,
               stop_token_ids=sorted(eos - set(model.config.eos_token_ids)))
  n = int(res.lengths[0])
  token_ids = [int(t) for t in res.tokens[0, :n]]
  seconds = time.perf_counter() - start
  text_ids = token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids
  return {"prompt_ids": [int(i) for i in prompt_ids], "token_ids": token_ids,
          "text": tokenizer.decode(text_ids), "tokens_per_s": n / seconds,
          "seconds": seconds}


def param_bytes(model) -> int:
  """Bytes of all parameters (what one decode step reads at least once)."""
  import jax
  from flax import nnx
  return sum(x.size * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def bench_decode(model, *, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                 seed: int = 0, tokens: Any = None) -> dict[str, Any]:
  """Greedy decode of random prompts [batch, prompt_len] for exactly `new_tokens` tokens.

  `tokens` [batch, prompt_len] overrides the random prompts. The result also holds
  `row0_tokens`, the ids generated for the first row.

  Timings are the best of `repeats` runs after a compile run:
    tokens_per_s = batch * new_tokens / (prefill + decode seconds)
    decode_tokens_per_s = batch * (new_tokens - 1) / (seconds - prefill_s)
    weight_bytes_per_s = param_bytes * (new_tokens - 1) / (seconds - prefill_s)
  (the first token comes from the prefill; each further token costs one forward step that
  reads every weight once). prefill_s is the best time of a 1-token decode.
  """
  import jax
  import numpy as np
  from flax import nnx

  from qstar_jax.models.decoding import decode

  graphdef, params = nnx.split(model)
  vocab = model.config.vocab_size
  if tokens is None:
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, prompt_len))
  tokens = np.asarray(tokens, np.int32)
  if tokens.shape != (batch, prompt_len):
    raise ValueError(f"tokens have shape {tokens.shape}, expected ({batch}, {prompt_len})")

  def run(n):
    start = time.perf_counter()
    res = decode(graphdef, params, jax.random.key(seed), tokens=tokens, max_new_tokens=n,
                 greedy=True, ignore_eos=True)
    jax.block_until_ready(res.tokens)
    return time.perf_counter() - start, res

  first, res = run(new_tokens)
  if int(np.min(res.lengths)) != new_tokens:
    raise RuntimeError(f"benchmark decoded {np.asarray(res.lengths)} tokens, "
                       f"expected {new_tokens}")
  runs = [run(new_tokens)[0] for _ in range(repeats)]
  run(1)  # compile the prefill-only program
  prefills = [run(1)[0] for _ in range(repeats)]
  seconds, prefill_s = min(runs), min(prefills)
  decode_s = max(seconds - prefill_s, 1e-9)
  nbytes = param_bytes(model)
  return {
      "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "dtype": model.config.param_dtype,
      "tokens_per_s": batch * new_tokens / seconds,
      "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
      "seconds": seconds, "prefill_s": prefill_s, "compile_s": max(first - seconds, 0.0),
      "step_ms": 1e3 * decode_s / max(new_tokens - 1, 1),
      "param_bytes": nbytes,
      "weight_bytes_per_s": nbytes * (new_tokens - 1) / decode_s,
      "device": str(jax.devices()[0].device_kind),
      "row0_tokens": [int(t) for t in np.asarray(res.tokens[0])],
  }


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
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from qstar_jax.models.errors import QstarError
  try:
    for name in ("max_new_tokens", "batch", "prompt_len", "new_tokens", "repeats"):
      value = getattr(args, name, None)
      if value is not None and value < 1:
        raise ValueError(f"--{name.replace('_', '-')}={value}: expected >= 1")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
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
    else:
      out = bench_decode(model, batch=args.batch, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, repeats=args.repeats)
      if args.json:
        print(json.dumps(out))
      else:
        for key, value in out.items():
          print(f"{key:>20}: {value:.4g}" if isinstance(value, float) else f"{key:>20}: {value}")
  except (QstarError, ValueError) as err:
    print(f"qstar-jax: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
