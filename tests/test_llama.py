"""Llama model: config, parameter layout, forward vs an independent numpy reference, KV cache."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qstar_jax.models import (
  KVCache,
  Llama,
  LlamaConfig,
  PolicyValue,
  apply,
  apply_hidden,
  flat_param_shapes,
  from_flat_params,
  get_config,
  get_flat_params,
  policy_value_apply,
  preset_names,
  set_flat_params,
)
from qstar_jax.models.errors import CheckpointError, ShapeMismatchError


def random_flat(config, seed=0, scale=0.1):
  """Random parameters with peaky logits (unit-scale embeddings, non-trivial norms)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in flat_param_shapes(config).items():
    if name.endswith(".scale"):
      flat[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    elif name == "embed_tokens.embedding":
      flat[name] = rng.standard_normal(shape).astype(np.float32)
    else:
      flat[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
  return flat


def make_model(config, seed=0):
  return from_flat_params(config, random_flat(config, seed))


_forward = jax.jit(lambda g, p, t: apply(g, p, t)[0], static_argnums=0)
_forward_cached = jax.jit(lambda g, p, t, c, n: apply(g, p, t, cache=c, num_new=n),
                          static_argnums=0)


def logits_of(model, tokens):
  graphdef, params = nnx.split(model)
  return _forward(graphdef, params, jnp.asarray(tokens))


# ----------------------------------------------------------------------------- numpy reference


def reference_inv_freq(config):
  hd = config.resolved_head_dim
  inv = np.array([1.0 / config.rope_theta ** (2 * j / hd) for j in range(hd // 2)])
  if config.rope_scaling is None:
    return inv
  s = dict(config.rope_scaling)
  out = []
  for f in inv:
    wavelen = 2 * math.pi / f
    lo = s["original_max_position_embeddings"] / s["low_freq_factor"]
    hi = s["original_max_position_embeddings"] / s["high_freq_factor"]
    if wavelen < hi:
      out.append(f)
    elif wavelen > lo:
      out.append(f / s["factor"])
    else:
      smooth = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                / (s["high_freq_factor"] - s["low_freq_factor"]))
      out.append((1 - smooth) * f / s["factor"] + smooth * f)
  return np.array(out)


def reference_logits(config, flat, tokens):
  """Plain float64 numpy Llama forward of one sequence, head by head."""
  p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
  hd, hq, hkv = config.resolved_head_dim, config.num_heads, config.num_kv_heads
  eps = config.rms_norm_eps

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale

  def rope(x, pos):  # x [hd]: pairs (j, j + hd/2)
    out = np.empty_like(x)
    for j, f in enumerate(reference_inv_freq(config)):
      c, s = math.cos(pos * f), math.sin(pos * f)
      a, b = x[j], x[j + hd // 2]
      out[j], out[j + hd // 2] = a * c - b * s, b * c + a * s
    return out

  t_len = len(tokens)
  x = p["embed_tokens.embedding"][tokens]
  for i in range(config.num_layers):
    pre = f"layers.{i}."
    h = rms(x, p[pre + "input_norm.scale"])
    proj = {}
    for name in ("q", "k", "v"):
      w = p[pre + f"attn.{name}_proj.kernel"]
      proj[name] = h @ w + (p[pre + f"attn.{name}_proj.bias"] if config.attention_bias else 0)
    attn = np.zeros((t_len, hq * hd))
    for head in range(hq):
      kv = head // (hq // hkv)
      q = [rope(proj["q"][t, head * hd:(head + 1) * hd], t) for t in range(t_len)]
      k = [rope(proj["k"][t, kv * hd:(kv + 1) * hd], t) for t in range(t_len)]
      v = proj["v"][:, kv * hd:(kv + 1) * hd]
      for t in range(t_len):
        scores = np.array([q[t] @ k[s] / math.sqrt(hd) for s in range(t + 1)])
        w = np.exp(scores - scores.max())
        w /= w.sum()
        attn[t, head * hd:(head + 1) * hd] = w @ v[:t + 1]
    x = x + attn @ p[pre + "attn.o_proj.kernel"]
    h = rms(x, p[pre + "post_attn_norm.scale"])
    gate = h @ p[pre + "mlp.gate_proj.kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ p[pre + "mlp.up_proj.kernel"])) @ p[
        pre + "mlp.down_proj.kernel"]
  x = rms(x, p["final_norm.scale"])
  head = p["embed_tokens.embedding"].T if config.tie_word_embeddings else p["lm_head.kernel"]
  return x @ head


# ----------------------------------------------------------------------------- config


def test_presets_valid_and_smollm2_shape():
  for name in preset_names():
    assert isinstance(get_config(name), LlamaConfig)
  c = get_config("smollm2-135m")
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size,
          c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (
              30, 576, 9, 3, 1536, 49152, 100000.0, True)
  # 134.5M parameters (SmolLM2-135M, embedding counted once).
  assert 134_000_000 < c.num_params() < 135_000_000


def test_config_validation_names_values():
  with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
    get_config("tiny", num_heads=6, num_kv_heads=4, hidden_size=96)
  with pytest.raises(ValueError, match="param_dtype='float8'"):
    get_config("tiny", param_dtype="float8")
  with pytest.raises(ValueError, match="hidden_size=65"):
    get_config("tiny", hidden_size=65)
  with pytest.raises(ValueError, match="unknown model preset 'nope'"):
    get_config("nope")


def test_config_dict_round_trip():
  from qstar_jax.quant import QuantConfig
  c = get_config("tiny", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64},
                 eos_token_ids=[3, 4], quant=QuantConfig(w_bits=4, a_bits=4))
  assert isinstance(c.rope_scaling, tuple) and hash(c)
  d = c.to_dict()
  import json
  assert LlamaConfig.from_dict(json.loads(json.dumps(d))) == c
  with pytest.raises(ValueError, match="unknown keys"):
    LlamaConfig.from_dict({**d, "bogus": 1})


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_flat_param_shapes_match_model(tied, bias):
  c = get_config("tiny", tie_word_embeddings=tied, attention_bias=bias)
  model = nnx.eval_shape(lambda: Llama(c, rngs=nnx.Rngs(0)))
  state = nnx.to_flat_state(nnx.state(model, nnx.Param))
  got = {".".join(map(str, k)): v.get_value().shape for k, v in state}
  assert got == flat_param_shapes(c)
  assert ("lm_head.kernel" in got) == (not tied)
  assert ("layers.1.attn.k_proj.bias" in got) == bias
  assert "layers.1.attn.o_proj.bias" not in got


def test_set_flat_params_validates_before_assigning():
  c = get_config("tiny")
  model = make_model(c, seed=5)
  before = get_flat_params(model)
  flat = random_flat(c)
  flat["layers.1.mlp.up_proj.kernel"] = np.zeros((128, 64), np.float32)
  with pytest.raises(ShapeMismatchError, match=r"layers\.1\.mlp\.up_proj\.kernel.*\(128, 64\).*"
                     r"\(64, 128\)"):
    set_flat_params(model, flat)
  flat = random_flat(c)
  del flat["final_norm.scale"]
  flat["extra.weight"] = np.zeros(3)
  with pytest.raises(CheckpointError, match=r"missing tensors \['final_norm.scale'\].*"
                     r"unexpected tensors \['extra.weight'\]"):
    set_flat_params(model, flat)
  after = get_flat_params(model)
  assert all(np.array_equal(before[k], after[k]) for k in before)  # no partial load
  good = random_flat(c, seed=3)
  set_flat_params(model, good)
  assert all(np.array_equal(good[k], v) for k, v in get_flat_params(model).items())


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("overrides", [
    dict(),  # GQA 4/2, untied
    dict(attention_bias=True, tie_word_embeddings=True, num_kv_heads=1, architecture="qwen2"),
    dict(rope_scaling=(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                       ("high_freq_factor", 4.0), ("original_max_position_embeddings", 64)),
         rope_theta=500000.0, num_kv_heads=4, head_dim=8),
])
def test_forward_matches_numpy_reference(overrides):
  c = get_config("tiny", num_layers=2, **overrides)
  flat = random_flat(c, seed=1)
  model = from_flat_params(c, flat)
  tokens = np.random.default_rng(0).integers(0, c.vocab_size, (2, 9)).astype(np.int32)
  logits = logits_of(model, tokens)
  assert logits.shape == (2, 9, c.vocab_size) and logits.dtype == jnp.float32
  for b in range(2):
    ref = reference_logits(c, flat, tokens[b])
    np.testing.assert_allclose(np.asarray(logits[b]), ref, atol=2e-4, rtol=1e-4)


def test_llama3_inv_freq_matches_piecewise_formula():
  from qstar_jax.models.llama import rotary_inv_freq
  c = get_config("tiny", head_dim=64, num_heads=4, hidden_size=64,
                 rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})
  ref = reference_inv_freq(c)
  np.testing.assert_allclose(rotary_inv_freq(c), ref, rtol=1e-5)
  # All three regimes occur at these settings.
  base = get_config("tiny", head_dim=64, rope_theta=500000.0)
  ratio = ref / reference_inv_freq(base)
  assert np.isclose(ratio[0], 1) and np.isclose(ratio[-1], 1 / 8)
  assert np.any((ratio < 0.99) & (ratio > 0.126))


def test_kv_cache_chunked_forward_matches_full():
  c = get_config("tiny")
  model = make_model(c)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, c.vocab_size, (3, 10)).astype(np.int32)
  full = np.asarray(logits_of(model, tokens))
  # Per-row split points; chunk 1 right-padded with junk, chunk 2 right-aligned per row.
  first = np.array([4, 1, 7])
  chunk1 = np.full((3, 9), 5, np.int32)  # same width as chunk 2: one compile
  for b in range(3):
    chunk1[b, :first[b]] = tokens[b, :first[b]]
  cache = KVCache.init(c, 3, 16)
  logits1, cache = _forward_cached(graphdef, params, chunk1, cache, jnp.asarray(first))
  np.testing.assert_array_equal(np.asarray(cache.lengths), first)
  chunk2 = np.full((3, 9), 7, np.int32)
  rest = 10 - first
  for b in range(3):
    chunk2[b, :rest[b]] = tokens[b, first[b]:]
  logits2, cache = _forward_cached(graphdef, params, chunk2, cache, jnp.asarray(rest))
  np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 10, 10])
  for b in range(3):
    np.testing.assert_allclose(np.asarray(logits1[b, :first[b]]), full[b, :first[b]], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits2[b, :rest[b]]), full[b, first[b]:], atol=1e-4)


def test_bfloat16_policy():
  c32 = get_config("tiny")
  cbf = get_config("tiny", param_dtype="bfloat16", dtype="bfloat16")
  flat = random_flat(c32)
  m32, mbf = from_flat_params(c32, flat), from_flat_params(cbf, flat)
  assert get_flat_params(mbf)["layers.0.mlp.up_proj.kernel"].dtype == jnp.bfloat16
  tokens = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6))
  lbf, l32 = logits_of(mbf, tokens), logits_of(m32, tokens)
  assert lbf.dtype == jnp.float32
  # bf16 has 8 mantissa bits: logits of O(10) agree to a few percent of their spread.
  spread = float(jnp.std(l32))
  assert float(jnp.max(jnp.abs(lbf - l32))) < 0.15 * spread
  assert float(jnp.max(jnp.abs(lbf - l32))) > 0  # really computed in bf16


def test_quant_hook_used_for_block_projections_only(monkeypatch):
  import qstar_jax.quant as quant
  from qstar_jax.quant import QuantConfig
  calls = []

  def fake(x, kernel, cfg):
    calls.append((kernel.shape, cfg))
    return 2.0 * (x @ kernel)

  monkeypatch.setattr(quant, "fake_quant_dense", fake, raising=False)
  qc = QuantConfig(w_bits=4, a_bits=4)
  c = get_config("tiny", num_layers=1, quant=qc)
  model = make_model(c)
  graphdef, params = nnx.split(model)
  jax.eval_shape(lambda p, t: apply(graphdef, p, t), params, jnp.zeros((1, 3), jnp.int32))
  # q, k, v, o, gate, up, down of the one block; never the LM head or embedding.
  assert sorted(s for s, _ in calls) == sorted(
      [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
  assert all(cfg is qc for _, cfg in calls)


def test_policy_value_heads():
  c = get_config("tiny")
  tokens = jnp.asarray(np.arange(10, dtype=np.int32).reshape(2, 5))
  shared = PolicyValue(c, rngs=nnx.Rngs(0), shared_trunk=True, policy=make_model(c, seed=2))
  shared.value_head.kernel[...] = jnp.asarray(
      np.random.default_rng(0).standard_normal((64, 1)), jnp.float32)
  graphdef, params = nnx.split(shared)
  logits, values = jax.jit(lambda p, t: policy_value_apply(graphdef, p, t))(params, tokens)
  pol_graphdef, pol_params = nnx.split(shared.policy)
  hidden, _ = jax.jit(lambda p, t: apply_hidden(pol_graphdef, p, t))(pol_params, tokens)
  expected = np.asarray(hidden) @ np.asarray(shared.value_head.kernel[...])[:, 0]
  np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_of(shared.policy, tokens)),
                             atol=1e-5)

  policy = make_model(c)
  sep = PolicyValue(c, rngs=nnx.Rngs(1), shared_trunk=False, value_tanh=True, policy=policy)
  pv, vv = get_flat_params(sep.policy), get_flat_params(sep.value_model)
  assert all(np.array_equal(pv[k], vv[k]) for k in pv)  # initialised from the policy
  sep.value_head.bias[...] = jnp.asarray([5.0])
  graphdef, params = nnx.split(sep)
  logits, values = jax.jit(lambda p, t: policy_value_apply(graphdef, p, t))(params, tokens)
  np.testing.assert_allclose(np.asarray(values), np.tanh(5.0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_of(policy, tokens)),
                             atol=1e-5)
  # The value model is a separate copy: changing it leaves the policy alone.
  sep.value_model.final_norm.scale[...] = sep.value_model.final_norm.scale[...] * 0
  assert float(jnp.abs(sep.policy.final_norm.scale[...]).sum()) > 0


def test_dataclass_frozen():
  c = get_config("tiny")
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.hidden_size = 3


def test_remat_gives_the_same_loss_and_gradients_with_less_memory():
  """Each block under jax.checkpoint recomputes its activations in the backward pass: the loss
  and gradients are those of the plain forward (the same ops, recomputed), and the compiled
  gradient needs less temporary memory (XLA's CPU buffer assignment; an 8-layer model)."""
  from qstar_jax.models.config import get_config
  from qstar_jax.models.llama import init_llama
  from qstar_jax.training.lm import lm_loss_fn

  cfg = dataclasses.replace(get_config("tiny"), num_layers=8, intermediate_size=256)
  graphdef, params = nnx.split(init_llama(cfg))
  windows = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 129)),
                        jnp.int32)
  results, temps = {}, {}
  for remat in (False, True):
    loss = lm_loss_fn(graphdef, remat=remat)
    grad = jax.jit(jax.value_and_grad(lambda p, w, loss=loss: loss(p, w)[0]))
    compiled = grad.lower(params, windows).compile()
    temps[remat] = compiled.memory_analysis().temp_size_in_bytes
    results[remat] = compiled(params, windows)
  (l0, g0), (l1, g1) = results[False], results[True]
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  assert temps[True] < temps[False], temps
