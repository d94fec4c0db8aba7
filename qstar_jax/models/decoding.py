"""Batched KV-cache decoding: prefill + sampling loop in one jit (`lax.while_loop`).

Layout. Prompts are right-padded: `tokens [B, P]` with row b's real tokens in
`tokens[b, :lengths[b]]`. Decoding may continue from an existing `KVCache`: the new tokens are
then appended after each row's cached prefix (which is never recomputed).

Cache invariant. `DecodeResult.cache` holds the prompt and every generated token of a row
except the row's last generated token (it was sampled but never fed through the model). To
continue a row, pass that token (plus any further tokens) as the next `tokens` together with
`cache=result.cache`; the result equals decoding the concatenation from scratch.

Sampling. Per step, logits z (float32) of the last position are turned into the sampling
distribution q = softmax(filter(z / temperature)) where `filter` keeps the top-k logits and
then the smallest set of most probable tokens whose mass reaches top_p (nucleus); greedy takes
argmax z. Each token's `log_probs` is log softmax(z)[token] under the unmodified model
(temperature 1, no filtering) — the log pi used by value learning and search — and
`sample_log_probs` is log q[token].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qstar_jax.models.kv_cache import KVCache

__all__ = [
    "DecodeResult",
    "StepSamples",
    "decode",
    "decode_unchecked",
    "sample_steps",
    "delimiter_token_ids",
    "filter_logits",
    "decode_trace_count",
]

_TRACE_COUNT = 0


def decode_trace_count() -> int:
  """How many times the decoding jit has been traced (each trace is a compilation)."""
  return _TRACE_COUNT


@struct.dataclass
class DecodeResult:
  tokens: jax.Array            # [R, N] int32 generated tokens; pad_id after each row's end
  log_probs: jax.Array         # [R, N] float32 log softmax(z)[token] (model, temperature 1); 0 pad
  sample_log_probs: jax.Array  # [R, N] float32 log q[token] (sampling distribution); 0 pad
  lengths: jax.Array           # [R] int32 generated tokens per row (stop token included)
  stopped: jax.Array           # [R] bool: the row ended at a stop token (EOS / delimiter)
  cache: KVCache               # cache over prompt + generated tokens except the last one
  # R = B * num_candidates rows; candidate j of prompt b is row b * num_candidates + j.


@struct.dataclass
class StepSamples:
  tokens: jax.Array            # [B, K, N] int32 candidate steps; pad_id after each end
  log_probs: jax.Array         # [B, K, N] float32 model log-probs of the step tokens
  sample_log_probs: jax.Array  # [B, K, N] float32 log-probs under the sampling distribution
  lengths: jax.Array           # [B, K] int32 tokens per candidate step
  stopped: jax.Array           # [B, K] bool: step ended at a delimiter / EOS
  cache: KVCache               # B*K rows (row b*K + k), see the decoding cache invariant


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits: jax.Array, *, temperature: float | jax.Array = 1.0,
                  top_k: int | None = None, top_p: float | jax.Array | None = None) -> jax.Array:
  """Logits of the sampling distribution: z / temperature, then top-k, then top-p masking.

  Masked entries are -inf. top-k keeps every logit >= the k-th largest (ties at the k-th
  value are kept). top-p keeps the most probable tokens, in decreasing order, up to and
  including the first one at which their cumulative probability reaches top_p.

  Args:
    logits: [..., V] float32.
  Returns:
    [..., V] float32.
  """
  z = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  neg_inf = jnp.float32(-jnp.inf)
  if top_k is not None and top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    z = jnp.where(z >= kth, z, neg_inf)
  if top_p is not None:
    sorted_z = jnp.sort(z, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_z, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < jnp.asarray(top_p, jnp.float32)
    # The smallest kept logit; keep[..., 0] is always True.
    threshold = jnp.min(jnp.where(keep, sorted_z, jnp.inf), axis=-1, keepdims=True)
    z = jnp.where(z >= threshold, z, neg_inf)
  return z


def _sample(logits, key, *, greedy, temperature, top_k, top_p):
  """tokens [R], model log-probs [R], sampling log-probs [R] from logits [R, V]."""
  logits = logits.astype(jnp.float32)
  base = jax.nn.log_softmax(logits, axis=-1)
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample_lp = jnp.zeros(tokens.shape, jnp.float32)
  else:
    z = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    sample_lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tokens[:, None], axis=-1)[:, 0]
  lp = jnp.take_along_axis(base, tokens[:, None], axis=-1)[:, 0]
  return tokens, lp, sample_lp


# ----------------------------------------------------------------------------- the jitted loop


def _decode_impl(params, rng, tokens, lengths, cache, stop_ids, temperature, top_p, *,
                 graphdef, max_new_tokens, num_candidates, greedy, top_k, use_top_p,
                 cache_max_len, pad_id, ignore_eos, fuse_weights=True):
  global _TRACE_COUNT
  _TRACE_COUNT += 1
  model = nnx.merge(graphdef, params)
  b, p = tokens.shape
  n = max_new_tokens
  if cache is None:
    cache = KVCache.init(model.config, b, cache_max_len)
  elif cache.max_len < cache_max_len:
    cache = cache.grow(cache_max_len)
  eos = () if ignore_eos else model.config.eos_token_ids
  stop_ids = jnp.concatenate([stop_ids.astype(jnp.int32), jnp.asarray(eos or (-1,), jnp.int32)])

  # Prefill: all new tokens at once, LM head only at each row's last real token.
  hidden, cache = model.hidden_states(tokens, cache=cache, num_new=lengths)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
  logits = model.logits(last)  # [B, V]
  if num_candidates > 1:
    cache = cache.repeat(num_candidates)
    logits = jnp.repeat(logits, num_candidates, axis=0)
  r = b * num_candidates
  sample = functools.partial(_sample, greedy=greedy, temperature=temperature, top_k=top_k,
                             top_p=top_p if use_top_p else None)

  def record(state, tok, lp, slp):
    i, out, out_lp, out_slp, done, count, kv, _ = state
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    slp = jnp.where(done, 0.0, slp)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, i))
    out_slp = jax.lax.dynamic_update_slice(out_slp, slp[:, None], (0, i))
    count = count + (~done).astype(jnp.int32)
    done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    return (i + 1, out, out_lp, out_slp, done, count, kv, tok)

  state = (jnp.int32(0), jnp.full((r, n), pad_id, jnp.int32), jnp.zeros((r, n), jnp.float32),
           jnp.zeros((r, n), jnp.float32), jnp.zeros((r,), bool), jnp.zeros((r,), jnp.int32),
           _split_cache(cache), jnp.zeros((r,), jnp.int32))
  tok, lp, slp = sample(logits, jax.random.fold_in(rng, 0))
  state = record(state, tok, lp, slp)

  fused = model.fused_decode_weights() if fuse_weights else None

  def cond(state):
    return (state[0] < n) & ~jnp.all(state[4])

  def body(state):
    i, out, out_lp, out_slp, done, count, (keys, values, lens), last_tok = state
    # Rows already done do not advance: their write lands past their length (masked).
    h, keys, values, lens = model.hidden_states_layered(
        last_tok[:, None], keys, values, lens, num_new=(~done).astype(jnp.int32), fused=fused)
    tok, lp, slp = sample(model.logits(h[:, 0]), jax.random.fold_in(rng, i))
    kv = (keys, values, lens)
    return record((i, out, out_lp, out_slp, done, count, kv, last_tok), tok, lp, slp)

  _, out, out_lp, out_slp, done, count, kv, _ = jax.lax.while_loop(cond, body, state)
  cache = KVCache(keys=jnp.stack(kv[0]), values=jnp.stack(kv[1]), lengths=kv[2])
  return DecodeResult(tokens=out, log_probs=out_lp, sample_log_probs=out_slp, lengths=count,
                      stopped=done, cache=cache)


def _split_cache(cache: KVCache):
  layers = range(cache.keys.shape[0])
  return ([cache.keys[i] for i in layers], [cache.values[i] for i in layers], cache.lengths)


_decode_jit = jax.jit(
    _decode_impl,
    static_argnames=("graphdef", "max_new_tokens", "num_candidates", "greedy", "top_k",
                     "use_top_p", "cache_max_len", "pad_id", "ignore_eos", "fuse_weights"))


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def decode(graphdef: nnx.GraphDef, params: Any, rng: jax.Array, *, tokens: Any,
           lengths: Any = None, cache: KVCache | None = None, max_new_tokens: int,
           greedy: bool = False, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, stop_token_ids: Sequence[int] = (),
           num_candidates: int = 1, cache_max_len: int | None = None,
           pad_id: int = 0, ignore_eos: bool = False) -> DecodeResult:
  """Prefill `tokens` (after `cache`'s prefix, if any) and sample up to `max_new_tokens`.

  Args:
    graphdef, params: `nnx.split(model)` of a `Llama`.
    rng: PRNG key (unused when greedy).
    tokens: [B, P] int32, right-padded new tokens; row b uses tokens[b, :lengths[b]].
    lengths: [B] int32 in 1..P (default P for every row).
    cache: a cache to continue from (its prefix is attended, never recomputed), or None.
    max_new_tokens: N, static.
    greedy: argmax decoding (static); else sample with temperature / top_k (static) / top_p.
    stop_token_ids: extra stop ids (step delimiters); the config's EOS ids stop too unless
      `ignore_eos` (static; e.g. benchmarks that must decode exactly N tokens).
    num_candidates: K samples per prompt (static); rows of the result are b * K + k.
    cache_max_len: size S of the cache (static); default: cached length + P + N.
    pad_id: token written after a row has stopped.

  Raises:
    PromptError: an empty prompt row, or prompt + N longer than the model's context.
  """
  from qstar_jax.models.errors import PromptError

  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2:
    raise PromptError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
  b, p = tokens.shape
  if p == 0 or b == 0:
    raise PromptError(f"empty prompt: tokens have shape {tuple(tokens.shape)}; "
                      "expected at least one token per row")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
  if not greedy and not temperature > 0:
    raise ValueError(f"temperature={temperature}: expected > 0 (or greedy=True)")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k}: expected >= 1 or None")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p}: expected in (0, 1] or None")
  if num_candidates < 1:
    raise ValueError(f"num_candidates={num_candidates}: expected >= 1")
  lengths_np = np.full((b,), p, np.int32) if lengths is None else np.asarray(lengths, np.int32)
  if lengths_np.shape != (b,):
    raise PromptError(f"lengths has shape {lengths_np.shape}, expected ({b},)")
  if lengths_np.min() < 1:
    bad = int(np.argmin(lengths_np))
    raise PromptError(f"empty prompt: row {bad} has length {int(lengths_np[bad])}; "
                      "expected at least one token")
  if lengths_np.max() > p:
    raise PromptError(f"lengths {lengths_np.tolist()} exceed the token buffer width {p}")
  config = _config_of(graphdef, params)
  cached = 0 if cache is None else int(np.max(np.asarray(cache.lengths)))
  prompt_len = cached + int(lengths_np.max())
  context = config.max_position_embeddings
  if prompt_len > context:
    raise PromptError(f"prompt of {prompt_len} tokens (cached {cached} + new "
                      f"{int(lengths_np.max())}) is longer than the model context of "
                      f"{context} tokens")
  if prompt_len + max_new_tokens > context:
    raise PromptError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = "
                      f"{prompt_len + max_new_tokens} exceeds the model context of {context} "
                      "tokens")
  if cache_max_len is None:
    # Static upper bound of the positions written: cached prefix + P + N.
    cache_max_len = (0 if cache is None else cache.max_len) + p + max_new_tokens
  needed = prompt_len + max_new_tokens - 1
  if cache_max_len < needed or (cache is not None and cache_max_len < cache.max_len):
    raise ValueError(f"cache_max_len={cache_max_len} is too small: decoding needs "
                     f"{needed} positions (cached {cached} + prompt {int(lengths_np.max())} + "
                     f"N {max_new_tokens} - 1) and the cache already holds "
                     f"{0 if cache is None else cache.max_len}")
  stop = np.full((_bucket(max(1, len(stop_token_ids))),), -1, np.int32)
  stop[:len(stop_token_ids)] = np.asarray(list(stop_token_ids), np.int32)
  return _decode_jit(
      params, rng, tokens, jnp.asarray(lengths_np), cache, jnp.asarray(stop),
      jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p),
      graphdef=graphdef, max_new_tokens=int(max_new_tokens),
      num_candidates=int(num_candidates), greedy=bool(greedy),
      top_k=None if top_k is None else int(top_k), use_top_p=top_p is not None,
      cache_max_len=int(cache_max_len), pad_id=int(pad_id), ignore_eos=bool(ignore_eos))


_CONFIGS: dict[Any, Any] = {}


def _config_of(graphdef, params):
  # The config is a static attribute of the graph: merge once per graphdef.
  if graphdef not in _CONFIGS:
    _CONFIGS[graphdef] = nnx.merge(graphdef, params).config
  return _CONFIGS[graphdef]


def decode_unchecked(graphdef: nnx.GraphDef, params: Any, rng: jax.Array, *,
                     tokens: jax.Array, lengths: jax.Array, cache: KVCache | None,
                     stop_token_ids: jax.Array, max_new_tokens: int, cache_max_len: int,
                     greedy: bool = False, temperature: float | jax.Array = 1.0,
                     top_k: int | None = None, top_p: float | jax.Array | None = None,
                     num_candidates: int = 1, pad_id: int = 0,
                     ignore_eos: bool = False) -> DecodeResult:
  """`decode` without host-side validation, callable inside a caller's jit (e.g. a search).

  All arguments as in `decode`, except: `lengths` [B] int32 and `stop_token_ids` [n] int32
  (pad with -1) are arrays, and `cache_max_len` is required. The caller guarantees
  1 <= lengths <= P and max(cached) + max(lengths) + N - 1 <= cache_max_len <= the context.
  """
  return _decode_impl(
      params, rng, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), cache,
      jnp.asarray(stop_token_ids, jnp.int32), jnp.asarray(temperature, jnp.float32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32), graphdef=graphdef,
      max_new_tokens=int(max_new_tokens), num_candidates=int(num_candidates),
      greedy=bool(greedy), top_k=None if top_k is None else int(top_k),
      use_top_p=top_p is not None, cache_max_len=int(cache_max_len), pad_id=int(pad_id),
      ignore_eos=bool(ignore_eos))


def sample_steps(graphdef: nnx.GraphDef, params: Any, rng: jax.Array, *, tokens: Any,
                 lengths: Any = None, num_candidates: int, max_step_tokens: int,
                 cache: KVCache | None = None, stop_token_ids: Sequence[int] = (),
                 greedy: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, pad_id: int = 0,
                 cache_max_len: int | None = None) -> StepSamples:
  """From B states sample K candidate next steps each (a step ends at a stop id or EOS).

  The B states are prefilled once and their cache replicated K times.
  """
  res = decode(graphdef, params, rng, tokens=tokens, lengths=lengths, cache=cache,
               max_new_tokens=max_step_tokens, greedy=greedy, temperature=temperature,
               top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids,
               num_candidates=num_candidates, cache_max_len=cache_max_len, pad_id=pad_id)
  b, k = np.shape(tokens)[0], num_candidates
  shape3 = (b, k, max_step_tokens)
  return StepSamples(tokens=res.tokens.reshape(shape3), log_probs=res.log_probs.reshape(shape3),
                     sample_log_probs=res.sample_log_probs.reshape(shape3),
                     lengths=res.lengths.reshape(b, k), stopped=res.stopped.reshape(b, k),
                     cache=res.cache)


_DELIMITER_CACHE: dict[tuple[int, int, str], tuple[int, ...]] = {}


def delimiter_token_ids(tokenizer: Any, delimiter: str) -> tuple[int, ...]:
  """Ids of every token whose decoded text contains `delimiter` (e.g. "\\n" ends a step)."""
  if not delimiter:
    raise ValueError("delimiter must be a non-empty string")
  key = (id(tokenizer), int(tokenizer.vocab_size), delimiter)
  if key not in _DELIMITER_CACHE:
    ids = []
    for i in range(int(tokenizer.vocab_size)):
      try:
        text = tokenizer.decode([i])
      except Exception:  # ids without a printable piece (e.g. unused specials)
        continue
      if delimiter in text:
        ids.append(i)
    _DELIMITER_CACHE[key] = tuple(ids)
  return _DELIMITER_CACHE[key]
