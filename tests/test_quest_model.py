"""QuEST inside the Llama: which layers are quantized, bf16 training, and the integer model
(converted weights through quantized_matmul) against the fake-quantized one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qstar_jax.quant as quant
from qstar_jax.models.config import get_config
from qstar_jax.models.decoding import decode
from qstar_jax.models.llama import Llama
from qstar_jax.models.quantized import QuantizedDense, convert_to_integer
from qstar_jax.quant import QuantConfig

# Full multi-head attention in the integer-vs-fake comparisons: with grouped KV heads, the
# o_proj input at position 0 repeats each KV head's value, so half of its Hadamard coordinates
# are exactly 0 in exact arithmetic, i.e. ties of the zero-free grid, which float rounding
# noise (different XLA fusions under jit) breaks either way. Away from such ties both paths
# compute the same codes.
MHA = dict(num_kv_heads=4)


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 9), 0, 256)


def test_only_block_projections_are_quantized(monkeypatch, tokens):
  cfg = get_config("tiny", quant=QuantConfig(4, 4), tie_word_embeddings=False)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  shapes = []
  real = quant.fake_quant_dense

  def spy(x, kernel, qcfg):
    shapes.append(tuple(kernel.shape))
    return real(x, kernel, qcfg)

  monkeypatch.setattr(quant, "fake_quant_dense", spy)
  logits = model(tokens)
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  hd = d // cfg.num_heads
  per_layer = [(d, cfg.num_heads * hd), (d, cfg.num_kv_heads * hd), (d, cfg.num_kv_heads * hd),
               (cfg.num_heads * hd, d), (d, f), (d, f), (f, d)]
  assert sorted(shapes) == sorted(per_layer * cfg.num_layers)
  assert (d, v) not in shapes  # the LM head is full precision
  # The LM head is a plain full-precision matmul of the final hidden states.
  hidden, _ = model.hidden_states(tokens)
  expected = np.asarray(hidden) @ np.asarray(model.lm_head.kernel[...])
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_bf16_quest_model_trains():
  cfg = get_config("tiny", quant=QuantConfig(2, 2), dtype="bfloat16")
  model = Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  toks = jax.random.randint(jax.random.key(2), (2, 17), 0, 256)

  def loss(p):
    logits = nnx.merge(graphdef, p)(toks[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, toks[:, 1:, None], -1).mean()

  value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in leaves)
  # The quantized projections receive gradient through the trust estimator.
  q_grad = grads["layers"][0]["attn"]["q_proj"]["kernel"][...]
  assert float(jnp.abs(q_grad.astype(jnp.float32)).max()) > 0


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (2, 2), (8, 8)])
def test_integer_model_matches_fake_quant_exactly(tokens, w_bits, a_bits):
  cfg = get_config("tiny", quant=QuantConfig(w_bits, a_bits), **MHA)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  ref = model(tokens)
  convert_to_integer(model)
  assert isinstance(model.layers[0].mlp.down_proj, QuantizedDense)
  assert model.layers[0].attn.q_proj.codes[...].dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(ref))


def test_w4a16_model_packs_int4_and_matches(tokens):
  cfg = get_config("tiny", quant=QuantConfig(4, None))
  model = Llama(cfg, rngs=nnx.Rngs(0))
  ref = model(tokens)
  convert_to_integer(model)
  codes = model.layers[1].mlp.up_proj.codes[...]
  assert codes.dtype == jnp.int8 and codes.shape == (cfg.hidden_size // 2,
                                                     cfg.intermediate_size)
  np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_integer_model_generates_like_fake_quant():
  cfg = get_config("tiny", quant=QuantConfig(4, 4), **MHA)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  prompt = jnp.asarray([[5, 17, 42, 7], [9, 3, 11, 0]], jnp.int32)
  lengths = jnp.asarray([4, 3], jnp.int32)
  graphdef, params = nnx.split(model)
  ref = decode(graphdef, params, jax.random.key(0), tokens=prompt, lengths=lengths,
               max_new_tokens=6, greedy=True)
  convert_to_integer(model)
  graphdef, params = nnx.split(model)
  out = decode(graphdef, params, jax.random.key(0), tokens=prompt, lengths=lengths,
               max_new_tokens=6, greedy=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  # Both decodes are jitted graphs; XLA may round the float parts differently by an ulp.
  np.testing.assert_allclose(np.asarray(out.log_probs), np.asarray(ref.log_probs), atol=1e-5)


@pytest.mark.slow
def test_integer_model_through_pallas_kernels(tokens):
  """The whole model on the Pallas kernels (interpret mode on CPU: slow)."""
  cfg = get_config("tiny", quant=QuantConfig(4, 4, hadamard_block=32), **MHA)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  ref = model(tokens)
  convert_to_integer(model, use_kernel=True)
  out = model(tokens)
  # A code may flip where a rotated value sits on a rounding boundary (the kernel sums
  # sigma^2 per block), so compare the logits statistically rather than bit for bit.
  err = np.abs(np.asarray(out) - np.asarray(ref))
  assert np.median(err) < 1e-5 and err.max() < 0.2 * np.abs(np.asarray(ref)).max()


def test_convert_requires_quant_config():
  model = Llama(get_config("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="config.quant is None"):
    convert_to_integer(model)
