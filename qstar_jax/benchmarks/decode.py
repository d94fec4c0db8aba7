"""Decode-speed benchmark functions, shared by `qstar-jax bench decode` and
`experiments.bench_decode`: batched greedy decode throughput of a model, and the hardware
references it is compared with (copy bandwidth, the GEMM-only floor of a decode step)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.decoding import SamplingConfig, decode
from qstar_jax.models.llama import Llama
from qstar_jax.models.params import param_bytes

__all__ = ["bench_decode", "host_copy_bandwidth", "device_copy_bandwidth", "gemm_floor_step_s"]


def bench_decode(model: Llama, *, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
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
  graphdef, params = nnx.split(model)
  config = model.config
  vocab = config.vocab_size
  if tokens is None:
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, prompt_len))
  tokens = np.asarray(tokens, np.int32)
  if tokens.shape != (batch, prompt_len):
    raise ValueError(f"tokens have shape {tokens.shape}, expected ({batch}, {prompt_len})")

  def run(n):
    start = time.perf_counter()
    res = decode(graphdef, params, jax.random.key(seed), tokens=tokens, model_config=config,
                 sampling=SamplingConfig(max_new_tokens=n, greedy=True, ignore_eos=True))
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


def host_copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
  """Bytes read + written per second of a large numpy copy (best of `repeats`)."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)
  best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
  return 2 * src.nbytes / best


def device_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
  """Bytes read + written per second of a large device-to-device jnp copy (best of repeats)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a * 2.0)  # one read + one write per element, not elided
  jax.block_until_ready(copy(x))
  best = min(_timed(lambda: jax.block_until_ready(copy(x))) for _ in range(repeats))
  return 2 * x.nbytes / best


def gemm_floor_step_s(config: LlamaConfig, batch: int, repeats: int = 5) -> dict[str, float]:
  """Time of the matmuls alone of one batch-`batch` decode step, fp32, on this backend.

  One jitted chain of exactly the step's weight matmuls — per layer `[B, D] @ [D, q+k+v]`,
  `[B, Hq hd] @ [Hq hd, D]`, `[B, D] @ [D, 2F]`, `[B, F] @ [F, D]`, then the LM head
  `[B, D] @ [D, V]` — with distinct random weights of the model's shapes (so, like a real step,
  every weight byte is streamed from memory once), and nothing else: no attention over the
  cache, no norms, no sampling. Any decoder that computes these products with this backend's
  GEMMs needs at least this long per step, so `batch / seconds` bounds its tokens/s. Best of
  `repeats`.
  """
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  hd = config.head_dim or d // config.num_heads
  qkv, attn = (config.num_heads + 2 * config.num_kv_heads) * hd, config.num_heads * hd
  key = jax.random.key(0)
  shapes = [(d, qkv), (attn, d), (d, 2 * f), (f, d)] * config.num_layers + [(d, v)]
  weights = [jax.random.normal(k, s, jnp.float32) * 0.02
             for k, s in zip(jax.random.split(key, len(shapes)), shapes, strict=True)]

  @jax.jit
  def step(x, ws):
    h = x
    for i in range(config.num_layers):
      w_qkv, w_o, w_gu, w_d = ws[4 * i:4 * i + 4]
      a = (h @ w_qkv)[:, :attn]              # chained, so no product can be skipped
      h = h + a @ w_o
      g = h @ w_gu
      h = h + g[:, :f] @ w_d
    return h @ ws[-1]

  x = jnp.ones((batch, d), jnp.float32)
  jax.block_until_ready(step(x, weights))
  best = min(_timed(lambda: jax.block_until_ready(step(x, weights))) for _ in range(repeats))
  flops = 2 * batch * sum(a * b for a, b in shapes)
  return {"seconds": best, "gflop": flops / 1e9, "gflop_per_s": flops / best / 1e9,
          "tokens_per_s_bound": batch / best}


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start
