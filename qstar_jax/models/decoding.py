"""Batched KV-cache decoding: prefill + sampling loop in one jit (`lax.while_loop`).

Layout. Prompts are right-padded: `tokens [B, P]` with row b's real tokens in
`tokens[b, :lengths[b]]`. Decoding may continue from an existing `KVCache`: the new tokens are
then appended after each row's cached prefix (which is never recomputed).

Configuration. One `SamplingConfig` says how to decode (how many tokens, candidates, greedy or
sampled, filters). Its fields that shape arrays or select code (`max_new_tokens`,
`num_candidates`, `greedy`, `top_k`, whether `top_p` is set, `ignore_eos`, `pad_id`,
`feed_last_token`) are static pytree metadata, so the jitted implementation compiles once per
value; `temperature` and the `top_p` value are traced leaves, so changing them never recompiles.
`decode(..., sampling=config)` or `decode(..., max_new_tokens=8, greedy=True)` (the fields as
keywords) are equivalent.

Cache invariant. By default (`feed_last_token=False`) `DecodeResult.cache` holds the prompt and
every generated token of a row except the row's last generated token (it was sampled but never
fed through the model). To continue a row, pass that token (plus any further tokens) as the
next `tokens` together with `cache=result.cache`; the result equals decoding the concatenation
from scratch. With `feed_last_token=True` one more batched forward step feeds each row's last
token after the loop, so the cache holds every token and the next `tokens` are only new ones.

Hidden state. `last_hidden [R, D]` is the final-normed hidden state (the LM head's input, what
`qstar_jax.models.heads.ValueHead` reads) at the last token of the row that went through the
model: with `feed_last_token=True` the row's last generated token (the state after the whole
sequence, V(node)); otherwise the token before it (the last prompt token when the row generated
one token), i.e. the position whose logits sampled the last token.

Sampling. Per step, logits z (float32) of the last position are turned into the sampling
distribution q = softmax(filter(z / temperature)) where `filter` keeps the top-k logits and
then the smallest set of most probable tokens whose mass reaches top_p (nucleus); greedy takes
argmax z. Each token's `log_probs` is log softmax(z)[token] under the unmodified model
(temperature 1, no filtering) — the log pi used by value learning and search — and
`sample_log_probs` is log q[token].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.errors import PromptError
from qstar_jax.models.kv_cache import KVCache

__all__ = [
    "SamplingConfig",
    "DecodeResult",
    "StepSamples",
    "decode",
    "decode_unchecked",
    "sample_steps",
    "delimiter_token_ids",
    "filter_logits",
    "sample_tokens",
    "decode_trace_count",
    "model_config_of",
]

_TRACE_COUNT = 0


def decode_trace_count() -> int:
  """How many times the decoding jit has been traced (each trace is a compilation)."""
  return _TRACE_COUNT


@struct.dataclass
class SamplingConfig:
  """How to decode: frozen and hashable (with Python numbers in `temperature` / `top_p`).

  Static fields (pytree metadata: a new value compiles a new program) shape the arrays or pick
  the code path; `temperature` and `top_p` are traced leaves (a new value reuses the program;
  `top_p=None` vs a number is a different pytree, hence a different program).
  """

  max_new_tokens: int = struct.field(pytree_node=False)  # N tokens at most per row
  num_candidates: int = struct.field(pytree_node=False, default=1)  # K rows per prompt
  greedy: bool = struct.field(pytree_node=False, default=False)  # argmax, no sampling
  temperature: float | jax.Array = 1.0                   # [] float32 when traced
  top_k: int | None = struct.field(pytree_node=False, default=None)
  top_p: float | jax.Array | None = None                 # [] float32 when traced; None: off
  # The config's EOS ids do not stop rows (benchmarks that must decode exactly N tokens).
  ignore_eos: bool = struct.field(pytree_node=False, default=False)
  pad_id: int = struct.field(pytree_node=False, default=0)  # written after a row has stopped
  # One more batched step feeds each row's last token (cache holds every token; see module doc).
  feed_last_token: bool = struct.field(pytree_node=False, default=False)

  def check(self) -> None:
    """Raises ValueError naming the first field out of range (host-side, Python values)."""
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature}: expected > 0 (or greedy=True)")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k={self.top_k}: expected >= 1 or None")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}: expected in (0, 1] or None")
    if self.num_candidates < 1:
      raise ValueError(f"num_candidates={self.num_candidates}: expected >= 1")

  def traced(self) -> SamplingConfig:
    """The same config with `temperature` / `top_p` as float32 arrays (one jit trace for all
    their values, whether the caller passed Python floats or arrays)."""
    return self.replace(temperature=jnp.asarray(self.temperature, jnp.float32),
                        top_p=None if self.top_p is None else jnp.asarray(self.top_p,
                                                                          jnp.float32))


def _sampling_config(sampling: SamplingConfig | None, fields: dict[str, Any]) -> SamplingConfig:
  """`sampling`, or a `SamplingConfig` built from keyword fields (never both)."""
  if sampling is None:
    return SamplingConfig(**fields)
  if fields:
    raise TypeError(f"pass either sampling= or its fields as keywords, not both: got "
                    f"sampling={sampling} and {sorted(fields)}")
  return sampling


@struct.dataclass
class DecodeResult:
  tokens: jax.Array            # [R, N] int32 generated tokens; pad_id after each row's end
  log_probs: jax.Array         # [R, N] float32 log softmax(z)[token] (model, temperature 1); 0 pad
  sample_log_probs: jax.Array  # [R, N] float32 log q[token] (sampling distribution); 0 pad
  lengths: jax.Array           # [R] int32 generated tokens per row (stop token included)
  stopped: jax.Array           # [R] bool: the row ended at a stop token (EOS / delimiter)
  last_hidden: jax.Array       # [R, D] float32 final-normed hidden state, see the module doc
  cache: KVCache               # prompt + generated tokens (the last one only if feed_last_token)
  # R = B * num_candidates rows; candidate j of prompt b is row b * num_candidates + j.


@struct.dataclass
class StepSamples:
  tokens: jax.Array            # [B, K, N] int32 candidate steps; pad_id after each end
  log_probs: jax.Array         # [B, K, N] float32 model log-probs of the step tokens
  sample_log_probs: jax.Array  # [B, K, N] float32 log-probs under the sampling distribution
  lengths: jax.Array           # [B, K] int32 tokens per candidate step
  stopped: jax.Array           # [B, K] bool: step ended at a delimiter / EOS
  last_hidden: jax.Array       # [B, K, D] float32 hidden state (DecodeResult.last_hidden)
  cache: KVCache               # B*K rows (row b*K + k), see the decoding cache invariant


@struct.dataclass
class DecodeState:
  """Carry of the decode `while_loop` (R rows, N = max_new_tokens, L layers, S cache size)."""

  step: jax.Array              # [] int32 tokens sampled so far (the next column written)
  tokens: jax.Array            # [R, N] int32 sampled tokens; pad_id once a row is done
  log_probs: jax.Array         # [R, N] float32 model log-probs; 0 once done
  sample_log_probs: jax.Array  # [R, N] float32 sampling log-probs; 0 once done
  done: jax.Array              # [R] bool: the row sampled a stop token
  lengths: jax.Array           # [R] int32 tokens sampled by the row (stop token included)
  keys: list[jax.Array]        # L x [R, S, Hkv, hd] per layer, so XLA updates them in place
  values: list[jax.Array]      # L x [R, S, Hkv, hd]
  cache_lengths: jax.Array     # [R] int32 positions of the cache holding tokens
  last_token: jax.Array        # [R] int32 the row's last sampled token (not yet fed)
  last_hidden: jax.Array       # [R, D] float32 hidden state at the last token fed


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


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingConfig):
  """tokens [R], model log-probs [R], sampling log-probs [R] from logits [R, V].

  The one sampling rule of the library (decoding and the step searches): greedy argmax, or a
  draw from `filter_logits` (temperature, top-k, top-p). Model log-probs are at temperature 1.
  """
  logits = logits.astype(jnp.float32)
  base = jax.nn.log_softmax(logits, axis=-1)
  if sampling.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample_lp = jnp.zeros(tokens.shape, jnp.float32)
  else:
    z = filter_logits(logits, temperature=sampling.temperature, top_k=sampling.top_k,
                      top_p=sampling.top_p)
    tokens = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    sample_lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tokens[:, None], axis=-1)[:, 0]
  lp = jnp.take_along_axis(base, tokens[:, None], axis=-1)[:, 0]
  return tokens, lp, sample_lp


# ----------------------------------------------------------------------------- the jitted loop


def _decode_impl(params, rng, tokens, lengths, cache, stop_ids, sampling, *, graphdef,
                 cache_max_len):
  global _TRACE_COUNT
  _TRACE_COUNT += 1
  model = nnx.merge(graphdef, params)
  b, _ = tokens.shape
  n, k, pad_id = sampling.max_new_tokens, sampling.num_candidates, sampling.pad_id
  if cache is None:
    cache = KVCache.init(model.config, b, cache_max_len)
  elif cache.max_len < cache_max_len:
    cache = cache.grow(cache_max_len)
  eos = () if sampling.ignore_eos else model.config.eos_token_ids
  stop_ids = jnp.concatenate([stop_ids.astype(jnp.int32), jnp.asarray(eos or (-1,), jnp.int32)])

  # Prefill: all new tokens at once, LM head only at each row's last real token.
  hidden, cache = model.hidden_states(tokens, cache=cache, num_new=lengths)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
  logits = model.logits(last)  # [B, V]
  if k > 1:
    cache = cache.repeat(k)
    logits = jnp.repeat(logits, k, axis=0)
    last = jnp.repeat(last, k, axis=0)
  r = b * k

  def record(state: DecodeState, tok, lp, slp) -> DecodeState:
    was_done = state.done
    tok = jnp.where(was_done, pad_id, tok)
    lp = jnp.where(was_done, 0.0, lp)
    slp = jnp.where(was_done, 0.0, slp)
    column = (0, state.step)
    return state.replace(
        step=state.step + 1,
        tokens=jax.lax.dynamic_update_slice(state.tokens, tok[:, None], column),
        log_probs=jax.lax.dynamic_update_slice(state.log_probs, lp[:, None], column),
        sample_log_probs=jax.lax.dynamic_update_slice(state.sample_log_probs, slp[:, None],
                                                      column),
        lengths=state.lengths + (~was_done).astype(jnp.int32),
        done=was_done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1),
        # A done row keeps its real last token (feed_last_token feeds it after the loop).
        last_token=jnp.where(was_done, state.last_token, tok))

  fused = model.fused_decode_weights()

  def feed(state: DecodeState, active) -> tuple[DecodeState, jax.Array]:
    """One forward step of each row's last token; rows not `active` [R] do not advance
    (their write lands past their length, masked) and keep their hidden state."""
    h, keys, values, lens = model.hidden_states_layered(
        state.last_token[:, None], state.keys, state.values, state.cache_lengths,
        num_new=active.astype(jnp.int32), fused=fused)
    h = h[:, 0]
    last_hidden = jnp.where(active[:, None], h.astype(jnp.float32), state.last_hidden)
    return state.replace(keys=keys, values=values, cache_lengths=lens,
                         last_hidden=last_hidden), h

  layers = range(cache.keys.shape[0])
  state = DecodeState(
      step=jnp.int32(0), tokens=jnp.full((r, n), pad_id, jnp.int32),
      log_probs=jnp.zeros((r, n), jnp.float32), sample_log_probs=jnp.zeros((r, n), jnp.float32),
      done=jnp.zeros((r,), bool), lengths=jnp.zeros((r,), jnp.int32),
      keys=[cache.keys[i] for i in layers], values=[cache.values[i] for i in layers],
      cache_lengths=cache.lengths, last_token=jnp.zeros((r,), jnp.int32),
      last_hidden=last.astype(jnp.float32))
  state = record(state, *sample_tokens(logits, jax.random.fold_in(rng, 0), sampling))

  def cond(state: DecodeState):
    return (state.step < n) & ~jnp.all(state.done)

  def body(state: DecodeState) -> DecodeState:
    step = state.step
    state, h = feed(state, ~state.done)
    return record(state, *sample_tokens(model.logits(h), jax.random.fold_in(rng, step),
                                        sampling))

  state = jax.lax.while_loop(cond, body, state)
  if sampling.feed_last_token:
    state, _ = feed(state, jnp.ones((r,), bool))
  cache = KVCache(keys=jnp.stack(state.keys), values=jnp.stack(state.values),
                  lengths=state.cache_lengths)
  return DecodeResult(tokens=state.tokens, log_probs=state.log_probs,
                      sample_log_probs=state.sample_log_probs, lengths=state.lengths,
                      stopped=state.done, last_hidden=state.last_hidden, cache=cache)


_decode_jit = jax.jit(_decode_impl, static_argnames=("graphdef", "cache_max_len"))


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def decode(graphdef: nnx.GraphDef, params: Any, rng: jax.Array, *, tokens: Any,
           lengths: Any = None, cache: KVCache | None = None,
           stop_token_ids: Sequence[int] = (), sampling: SamplingConfig | None = None,
           cache_max_len: int | None = None, model_config: LlamaConfig | None = None,
           **sampling_fields: Any) -> DecodeResult:
  """Prefill `tokens` (after `cache`'s prefix, if any) and sample up to `max_new_tokens`.

  Args:
    graphdef, params: `nnx.split(model)` of a `Llama`.
    rng: PRNG key (unused when greedy).
    tokens: [B, P] int32, right-padded new tokens; row b uses tokens[b, :lengths[b]].
    lengths: [B] int32 in 1..P (default P for every row).
    cache: a cache to continue from (its prefix is attended, never recomputed), or None.
    stop_token_ids: extra stop ids (step delimiters); the config's EOS ids stop too unless
      `sampling.ignore_eos`.
    sampling: a `SamplingConfig`, or None and its fields as keywords (`max_new_tokens=8,
      greedy=True, ...`); rows of the result are b * num_candidates + k.
    cache_max_len: size S of the cache (static); default: cache size (or 0) + P + N.
    model_config: the model's `LlamaConfig` when the caller holds it (else read from the graph).

  Raises:
    PromptError: an empty prompt row, or prompt + N longer than the model's context.
    ValueError: a sampling field or `cache_max_len` out of range.
  """
  sampling = _sampling_config(sampling, sampling_fields)
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2:
    raise PromptError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
  b, p = tokens.shape
  if p == 0 or b == 0:
    raise PromptError(f"empty prompt: tokens have shape {tuple(tokens.shape)}; "
                      "expected at least one token per row")
  sampling.check()
  n = sampling.max_new_tokens
  lengths_np = np.full((b,), p, np.int32) if lengths is None else np.asarray(lengths, np.int32)
  if lengths_np.shape != (b,):
    raise PromptError(f"lengths has shape {lengths_np.shape}, expected ({b},)")
  if lengths_np.min() < 1:
    bad = int(np.argmin(lengths_np))
    raise PromptError(f"empty prompt: row {bad} has length {int(lengths_np[bad])}; "
                      "expected at least one token")
  if lengths_np.max() > p:
    raise PromptError(f"lengths {lengths_np.tolist()} exceed the token buffer width {p}")
  if model_config is None:
    model_config = model_config_of(graphdef, params)
  cached = 0 if cache is None else int(np.max(np.asarray(cache.lengths)))
  prompt_len = cached + int(lengths_np.max())
  context = model_config.max_position_embeddings
  if prompt_len > context:
    raise PromptError(f"prompt of {prompt_len} tokens (cached {cached} + new "
                      f"{int(lengths_np.max())}) is longer than the model context of "
                      f"{context} tokens")
  if prompt_len + n > context:
    raise PromptError(f"prompt of {prompt_len} tokens + max_new_tokens={n} = "
                      f"{prompt_len + n} exceeds the model context of {context} tokens")
  if cache_max_len is None:
    # Static upper bound of the positions written: cached prefix + P + N.
    cache_max_len = (0 if cache is None else cache.max_len) + p + n
  # The last sampled token is written to the cache only with feed_last_token.
  needed = prompt_len + n - (0 if sampling.feed_last_token else 1)
  if cache_max_len < needed or (cache is not None and cache_max_len < cache.max_len):
    raise ValueError(f"cache_max_len={cache_max_len} is too small: decoding needs "
                     f"{needed} positions (cached {cached} + prompt {int(lengths_np.max())} + "
                     f"N {n}{'' if sampling.feed_last_token else ' - 1'}) and the cache "
                     f"already holds {0 if cache is None else cache.max_len}")
  stop = np.full((_bucket(max(1, len(stop_token_ids))),), -1, np.int32)
  stop[:len(stop_token_ids)] = np.asarray(list(stop_token_ids), np.int32)
  return _decode_jit(params, rng, tokens, jnp.asarray(lengths_np), cache, jnp.asarray(stop),
                     sampling.traced(), graphdef=graphdef, cache_max_len=int(cache_max_len))


def model_config_of(graphdef: nnx.GraphDef, params: Any) -> LlamaConfig:
  """The `LlamaConfig` of a split `Llama`, read from the graph's static attributes (the root
  module's `config` comes first); falls back to merging the model (tens of ms for a 135M model),
  e.g. on a Flax version whose `GraphDef` keeps attributes elsewhere."""
  for item in getattr(graphdef, "attributes", ()):
    if isinstance(item, tuple) and len(item) == 2 and item[0] == "config":
      value = getattr(item[1], "value", None)
      if isinstance(value, LlamaConfig):
        return value
  return nnx.merge(graphdef, params).config


def decode_unchecked(graphdef: nnx.GraphDef, params: Any, rng: jax.Array, *,
                     tokens: jax.Array, lengths: jax.Array, cache: KVCache | None,
                     stop_token_ids: jax.Array, sampling: SamplingConfig,
                     cache_max_len: int) -> DecodeResult:
  """`decode` without host-side validation, callable inside a caller's jit (e.g. a search).

  All arguments as in `decode`, except: `lengths` [B] int32 and `stop_token_ids` [n] int32
  (pad with -1) are arrays, and `sampling` and `cache_max_len` are required (`temperature` /
  `top_p` may be traced arrays). The caller guarantees 1 <= lengths <= P and
  max(cached) + max(lengths) + N - 1 (N with feed_last_token) <= cache_max_len <= the context.
  """
  return _decode_impl(params, rng, jnp.asarray(tokens, jnp.int32),
                      jnp.asarray(lengths, jnp.int32), cache,
                      jnp.asarray(stop_token_ids, jnp.int32), sampling.traced(),
                      graphdef=graphdef, cache_max_len=int(cache_max_len))


def sample_steps(graphdef: nnx.GraphDef, params: Any, rng: jax.Array, *, tokens: Any,
                 lengths: Any = None, cache: KVCache | None = None,
                 stop_token_ids: Sequence[int] = (), sampling: SamplingConfig | None = None,
                 cache_max_len: int | None = None, model_config: LlamaConfig | None = None,
                 max_step_tokens: int | None = None, **sampling_fields: Any) -> StepSamples:
  """From B states sample K = num_candidates candidate next steps each (a step ends at a stop
  id or EOS, or after max_new_tokens tokens).

  Arguments as in `decode`; `max_step_tokens` is another name for the `max_new_tokens` field
  when the fields are given as keywords. The B states are prefilled once and their cache
  replicated K times.
  """
  if max_step_tokens is not None:
    sampling_fields["max_new_tokens"] = max_step_tokens
  sampling = _sampling_config(sampling, sampling_fields)
  res = decode(graphdef, params, rng, tokens=tokens, lengths=lengths, cache=cache,
               stop_token_ids=stop_token_ids, sampling=sampling, cache_max_len=cache_max_len,
               model_config=model_config)
  b, k = np.shape(tokens)[0], sampling.num_candidates
  shape3 = (b, k, sampling.max_new_tokens)
  return StepSamples(tokens=res.tokens.reshape(shape3), log_probs=res.log_probs.reshape(shape3),
                     sample_log_probs=res.sample_log_probs.reshape(shape3),
                     lengths=res.lengths.reshape(b, k), stopped=res.stopped.reshape(b, k),
                     last_hidden=res.last_hidden.reshape(b, k, -1), cache=res.cache)


def delimiter_token_ids(tokenizer: Any, delimiter: str) -> tuple[int, ...]:
  """Ids of every token whose decoded text contains `delimiter` (e.g. "\\n" ends a step).

  Decodes every id of the vocabulary (about a second for 50k ids): callers that need the ids
  repeatedly compute them once and keep them.
  """
  if not delimiter:
    raise ValueError("delimiter must be a non-empty string")
  ids = []
  for i in range(int(tokenizer.vocab_size)):
    try:
      text = tokenizer.decode([i])
    except Exception:  # ids without a printable piece (e.g. unused specials)
      continue
    if delimiter in text:
      ids.append(i)
  return tuple(ids)
