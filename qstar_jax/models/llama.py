"""Llama-family decoder (Llama, SmolLM2, Qwen2) in Flax NNX, with a KV-cache forward.

Parameter layout (flat dotted names, kernels stored [in, out] so that y = x @ kernel):

  embed_tokens.embedding                 [V, D]
  layers.{i}.input_norm.scale            [D]
  layers.{i}.attn.{q,k,v}_proj.kernel    [D, H*hd]   (+ .bias [H*hd] when attention_bias)
  layers.{i}.attn.o_proj.kernel          [Hq*hd, D]
  layers.{i}.post_attn_norm.scale        [D]
  layers.{i}.mlp.{gate,up}_proj.kernel   [D, F]
  layers.{i}.mlp.down_proj.kernel        [F, D]
  final_norm.scale                       [D]
  lm_head.kernel                         [D, V]      (absent when tie_word_embeddings)

The block is the Hugging Face Llama block:
  h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
  y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))
with RMSNorm n(x) = x * rsqrt(mean(x^2) + eps) * scale (computed in float32) and rotary
embeddings in the rotate_half layout (dimension j pairs with j + hd/2).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qstar_jax import quant as quant_lib
from qstar_jax.models.config import (
  LlamaConfig,
  flat_param_shapes,  # noqa: F401  (re-exported: its former home)
)
from qstar_jax.models.errors import ShapeMismatchError, check_tensor_names
from qstar_jax.models.kv_cache import KVCache

_INIT_STDDEV = 0.02
# The mesh axes a batch is split over: qstar_jax.distributed.BATCH_AXES (a lower layer cannot
# import it; tests/test_distributed.py checks that the two agree).
BATCH_AXES = ("data", "fsdp")


def constrain_batch(x: jax.Array) -> jax.Array:
  """``x`` [B, ...] marked as split over the batch axes of the mesh in context, if any.

  The sharded train step traces with its mesh in context (``distributed.under_mesh``); there the residual stream is
  pinned to "rows over data x fsdp, features whole", so that XLA's partitioner keeps the
  activations split by example and gathers weights (FSDP) instead of gathering activations
  over the batch (which it otherwise may choose for the weight gradients, replicating the
  activations on every device: 2.7x the temp memory of a data-parallel step measured on
  llama-10m, fsdp=8). No mesh in context (every single-device path): ``x`` unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  size = math.prod(mesh.shape[a] for a in axes)
  if size <= 1 or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
  return (_INIT_STDDEV * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); QuEST fake-quantized when `quant` is set."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
               config: LlamaConfig, quantized: bool, rngs: nnx.Rngs):
    pdt = jnp.dtype(config.param_dtype)
    self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), pdt))
    self.bias = nnx.Param(jnp.zeros((out_features,), pdt)) if use_bias else None
    self.quant = config.quant if quantized else None
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    if self.quant is not None:
      y = quant_lib.fake_quant_dense(x, kernel, self.quant).astype(self.dtype)
    else:
      y = x @ kernel
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * scale, normalised in float32 (HF Llama style)."""

  def __init__(self, dim: int, *, config: LlamaConfig):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(config.param_dtype)))
    self.eps = float(config.rms_norm_eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    in_dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(in_dtype) * x32.astype(in_dtype)


class Embedding(nnx.Module):
  def __init__(self, vocab_size: int, dim: int, *, config: LlamaConfig, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs, (vocab_size, dim), jnp.dtype(config.param_dtype)))


# ----------------------------------------------------------------------------- rotary


def rotary_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [hd/2] float32, with Llama-3 or linear scaling from the config."""
  hd = config.resolved_head_dim
  exponents = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
  inv_freq = (1.0 / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
  if config.rope_scaling is None:
    return inv_freq
  scaling = dict(config.rope_scaling)
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type == "default":
    return inv_freq
  factor = float(scaling["factor"])
  if rope_type == "linear":
    return (inv_freq / np.float32(factor)).astype(np.float32)
  # Llama 3: long wavelengths divided by `factor`, short kept, a smooth ramp in between.
  low_freq_factor = float(scaling["low_freq_factor"])
  high_freq_factor = float(scaling["high_freq_factor"])
  old_context = float(scaling["original_max_position_embeddings"])
  low_freq_wavelen = old_context / low_freq_factor
  high_freq_wavelen = old_context / high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, 1, hd] float32 for integer positions [B, T]."""
  inv_freq = jnp.asarray(rotary_inv_freq(config))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, hd] rotated: x * cos + rotate_half(x) * sin (rotate_half = [-x2, x1])."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- blocks


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query softmax attention.

  softmax_s(q_t . k_s / sqrt(hd), masked) @ v, scores and softmax in float32.

  Args:
    q: [B, T, Hq, hd]; k, v: [B, S, Hkv, hd]; mask: [B, T, S] bool (True = may attend).
  Returns:
    [B, T, Hq * hd] in q's dtype.
  """
  b, t, hq, hd = q.shape
  hkv = k.shape[2]
  if t == 1:
    return _attend_one(q, k, v, mask)
  q = q.reshape(b, t, hkv, hq // hkv, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(hd))
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
  return out.reshape(b, t, hq * hd)


def _attend_one(q, k, v, mask):
  """`attend` for one query per row (a decode step) as broadcast-multiply-reduce.

  A dot_general here makes XLA:CPU transpose the whole [B, S, Hkv, hd] cache layer into its
  preferred operand layout at every step; reductions read the cache in place (the FLOPs,
  B * Hq * S * hd, are negligible next to the weight matmuls).
  """
  b, _, hq, hd = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  q32 = q.reshape(b, 1, hkv, g, hd).astype(jnp.float32)            # [B, 1, Hkv, G, hd]
  k32 = k.astype(jnp.float32)[:, :, :, None, :]                     # [B, S, Hkv, 1, hd]
  scores = jnp.sum(q32 * k32, axis=-1) * (1.0 / math.sqrt(hd))      # [B, S, Hkv, G]
  scores = jnp.where(mask[:, 0, :, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=1)                            # over S
  out = jnp.sum(probs[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)
  return out.reshape(b, 1, hq * hd).astype(q.dtype)                 # [B, 1, Hq*hd]


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, hd = config.hidden_size, config.resolved_head_dim
    hq, hkv = config.num_heads, config.num_kv_heads
    quantized = config.quant is not None
    bias = config.attention_bias
    self.q_proj = Dense(d, hq * hd, use_bias=bias, config=config, quantized=quantized, rngs=rngs)
    self.k_proj = Dense(d, hkv * hd, use_bias=bias, config=config, quantized=quantized,
                        rngs=rngs)
    self.v_proj = Dense(d, hkv * hd, use_bias=bias, config=config, quantized=quantized,
                        rngs=rngs)
    self.o_proj = Dense(hq * hd, d, use_bias=False, config=config, quantized=quantized,
                        rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, hd

  def project_qkv(self, x, fused=None):
    """x [..., D] -> (q [..., Hq*hd], k [..., Hkv*hd], v [..., Hkv*hd]), before rotation.

    `fused` (one layer of `Llama.fused_decode_weights`) computes them with one matmul.
    """
    if fused is None:
      return self.q_proj(x), self.k_proj(x), self.v_proj(x)
    qkv = x.astype(fused["qkv"].dtype) @ fused["qkv"]
    if "qkv_bias" in fused:
      qkv = qkv + fused["qkv_bias"]
    nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    return qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]

  def __call__(self, x, cos, sin, mask, kv_write=None, fused=None):
    """x [B, T, D] -> [B, T, D]; kv_write(k, v) -> (keys, values) attended over (cache).

    `fused` (from `Llama.fused_decode_weights`) computes q, k, v with one matmul.
    """
    b, t, _ = x.shape
    q, k, v = self.project_qkv(x, fused)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    if kv_write is not None:
      k, v = kv_write(k, v)
    return self.o_proj(attend(q, k.astype(q.dtype), v.astype(q.dtype), mask))


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    quantized = config.quant is not None
    self.gate_proj = Dense(d, f, use_bias=False, config=config, quantized=quantized, rngs=rngs)
    self.up_proj = Dense(d, f, use_bias=False, config=config, quantized=quantized, rngs=rngs)
    self.down_proj = Dense(f, d, use_bias=False, config=config, quantized=quantized, rngs=rngs)

  def __call__(self, x, fused=None):
    if fused is not None:  # gate and up with one matmul
      gate_up = x.astype(fused["gate_up"].dtype) @ fused["gate_up"]
      f = gate_up.shape[-1] // 2
      return self.down_proj(jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:])
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(config.hidden_size, config=config)
    self.attn = Attention(config, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, config=config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, cos, sin, mask, kv_write=None, fused=None):
    h = x + self.attn(self.input_norm(x), cos, sin, mask, kv_write, fused)
    return h + self.mlp(self.post_attn_norm(h), fused)


def _remat_block(layer: Block, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask: jax.Array) -> jax.Array:
  """``layer(x, ...)`` under ``jax.checkpoint`` (the block's weights enter as arguments, so their
  gradients flow as without it)."""
  graphdef, state = nnx.split(layer)

  def block(state, x, cos, sin, mask):
    return nnx.merge(graphdef, state)(x, cos, sin, mask)

  return jax.checkpoint(block)(state, x, cos, sin, mask)


class Llama(nnx.Module):
  """Llama/Qwen2 decoder. `model(tokens [B, T] int32) -> logits [B, T, V] float32`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config=config,
                                  rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config=config)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Dense(config.hidden_size, config.vocab_size, use_bias=False,
                           config=config.replace(quant=None), quantized=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    hidden, _ = self.hidden_states(tokens)
    return self.logits(hidden)

  def embed(self, tokens: jax.Array) -> jax.Array:
    table = self.embed_tokens.embedding[...]
    return jnp.take(table, tokens, axis=0).astype(jnp.dtype(self.config.dtype))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
    dtype = jnp.dtype(self.config.dtype)
    if self.lm_head is None:
      kernel = self.embed_tokens.embedding[...].astype(dtype)
      return jnp.einsum("...d,vd->...v", hidden.astype(dtype), kernel,
                        preferred_element_type=jnp.float32)
    kernel = self.lm_head.kernel[...].astype(dtype)
    return jnp.einsum("...d,dv->...v", hidden.astype(dtype), kernel,
                      preferred_element_type=jnp.float32)

  def hidden_states(self, tokens: jax.Array, *, cache: KVCache | None = None,
                    num_new: jax.Array | None = None,
                    remat: bool = False) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states [B, T, D] of `tokens`, and the updated cache.

    Without a cache: plain causal attention over `tokens` (positions 0..T-1). ``remat``: each
    block under ``jax.checkpoint``: the backward pass keeps only the blocks' inputs and recomputes
    the rest (activation memory ~ one block instead of all of them, for ~1/3 more compute);
    the values are the same.
    With a cache: token t of row b sits at position p = cache.lengths[b] + t, is written into
    the cache there and attends to cache positions <= p. Only the first `num_new[b]`
    (default T) tokens of row b count: the new lengths are cache.lengths + num_new. Writes
    past the end of the cache are dropped, so callers size it >= max(lengths) + T.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    x = constrain_batch(self.embed(tokens))
    if cache is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
      cos, sin = rotary_tables(self.config, positions)
      for layer in self.layers:
        x = constrain_batch(_remat_block(layer, x, cos, sin, mask) if remat
                            else layer(x, cos, sin, mask))
      return self.final_norm(x), None

    keys = [cache.keys[i] for i in range(self.config.num_layers)]
    values = [cache.values[i] for i in range(self.config.num_layers)]
    x, keys, values, lengths = self.hidden_states_layered(tokens, keys, values, cache.lengths,
                                                          num_new=num_new)
    return x, KVCache(keys=jnp.stack(keys), values=jnp.stack(values), lengths=lengths)

  def fused_decode_weights(self) -> list[dict[str, jax.Array]] | None:
    """Per layer, q|k|v kernels concatenated [D, (Hq + 2 Hkv) hd] (+ biases) and gate|up
    [D, 2F], in the compute dtype; None when projections are quantized.

    Built once per decode call, outside the decode loop: one matmul instead of three (two)
    per step reads the same bytes with fewer, larger kernels.
    """
    if self.config.quant is not None:
      return None
    dtype = jnp.dtype(self.config.dtype)
    out = []
    for layer in self.layers:
      attn, mlp = layer.attn, layer.mlp
      projs = (attn.q_proj, attn.k_proj, attn.v_proj)
      fused = {"qkv": jnp.concatenate([p.kernel[...].astype(dtype) for p in projs], axis=1),
               "gate_up": jnp.concatenate([mlp.gate_proj.kernel[...].astype(dtype),
                                           mlp.up_proj.kernel[...].astype(dtype)], axis=1)}
      if attn.q_proj.bias is not None:
        fused["qkv_bias"] = jnp.concatenate([p.bias[...].astype(dtype) for p in projs])
      out.append(fused)
    return out

  def hidden_states_layered(self, tokens: jax.Array, keys: list[jax.Array],
                            values: list[jax.Array], lengths: jax.Array, *,
                            num_new: jax.Array | None = None,
                            fused: list[dict[str, jax.Array]] | None = None):
    """`hidden_states` over a cache held as per-layer arrays (the decode loop's carry).

    Per-layer arrays [B, S, Hkv, hd] let XLA update each one in place inside a while loop
    (a scatter into one stacked [L, ...] array gets copied whole at every layer).

    Returns:
      (hidden [B, T, D], new keys, new values, new lengths [B]).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    x = self.embed(tokens)
    offsets = lengths.astype(jnp.int32)
    max_len = keys[0].shape[1]
    positions = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    key_pos = jnp.arange(max_len, dtype=jnp.int32)
    mask = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, S]
    cos, sin = rotary_tables(self.config, positions)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    keys, values = list(keys), list(values)
    for i, layer in enumerate(self.layers):
      def kv_write(k, v, i=i):
        # Scatter [B, T, Hkv, hd] at (b, positions[b, t]); writes past the end are dropped.
        keys[i] = keys[i].at[rows, positions].set(k.astype(keys[i].dtype), mode="drop")
        values[i] = values[i].at[rows, positions].set(v.astype(values[i].dtype), mode="drop")
        return keys[i], values[i]
      x = layer(x, cos, sin, mask, kv_write, None if fused is None else fused[i])
    if num_new is None:
      num_new = jnp.full((b,), t, jnp.int32)
    return self.final_norm(x), keys, values, offsets + jnp.asarray(num_new, jnp.int32)


# ----------------------------------------------------------------------------- functional core


def apply(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, *,
          cache: KVCache | None = None,
          num_new: jax.Array | None = None,
          remat: bool = False) -> tuple[jax.Array, KVCache | None]:
  """Pure forward: (logits [B, T, V] float32, updated cache or None).

  `graphdef, params = nnx.split(model)` once outside jit; this merges inside the trace.
  ``remat``: rematerialise each block in the backward pass (training; see ``hidden_states``).
  """
  model = nnx.merge(graphdef, params)
  hidden, cache = model.hidden_states(tokens, cache=cache, num_new=num_new, remat=remat)
  return model.logits(hidden), cache


def apply_hidden(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, *,
                 cache: KVCache | None = None,
                 num_new: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
  """Pure forward to the final-normed hidden states [B, T, D] (no LM head)."""
  model = nnx.merge(graphdef, params)
  return model.hidden_states(tokens, cache=cache, num_new=num_new)


def apply_logits(graphdef: nnx.GraphDef, params: Any, hidden: jax.Array) -> jax.Array:
  """Pure LM head: hidden [..., D] -> float32 logits [..., V]."""
  return nnx.merge(graphdef, params).logits(hidden)


# ----------------------------------------------------------------------------- flat params


def _param_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  state = nnx.state(model, nnx.Param)
  return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def get_flat_params(model: Llama) -> dict[str, np.ndarray]:
  """Dotted parameter names -> host numpy arrays (in the parameter dtype)."""
  return {name: np.asarray(var.get_value()) for name, var in _param_variables(model).items()}


def set_flat_params(model: Llama, flat: dict[str, Any]) -> None:
  """Assign all parameters from `flat` (dotted names -> arrays), cast to param_dtype.

  Everything is validated before anything is assigned (no partial load).

  Raises:
    CheckpointError: keys missing from `flat` or not in the model (both listed).
    ShapeMismatchError: a tensor whose shape differs from the model's.
  """
  variables = _param_variables(model)
  check_tensor_names(set(variables) - set(flat), set(flat) - set(variables),
                     context="parameters do not match the model layout")
  for name, var in variables.items():
    shape = tuple(np.shape(flat[name]))
    expected = tuple(var.get_value().shape)
    if shape != expected:
      raise ShapeMismatchError(
          f"tensor {name} has shape {shape}, the model config expects {expected}")
  dtype = jnp.dtype(model.config.param_dtype)
  converted = {name: jnp.asarray(flat[name], dtype=dtype) for name in variables}
  for name, var in variables.items():
    var.set_value(converted[name])


def init_llama(config: LlamaConfig, seed: int = 0) -> Llama:
  """A randomly initialised `Llama` built in one jitted call (eager init dispatches every
  op separately, which is slow on CPU). Same initialiser as the constructor; the random
  draws are not bit-identical to an eager `Llama(config, rngs=nnx.Rngs(seed))`."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed))))
  return nnx.merge(graphdef, _init_state(config, seed))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_state(config: LlamaConfig, seed: int):
  return nnx.state(Llama(config, rngs=nnx.Rngs(seed)))


def from_flat_params(config: LlamaConfig, flat: dict[str, Any]) -> Llama:
  """A `Llama` holding `flat` (validated like `set_flat_params`), without a random init."""
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  set_flat_params(model, flat)
  return model
