"""KV-cache decoding against brute-force full recomputation (`model(full_sequence)`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qstar_jax.models import (
  ValueHead,
  apply,
  apply_hidden,
  flat_param_shapes,
  from_flat_params,
  get_config,
)
from qstar_jax.models.decoding import (
  SamplingConfig,
  decode,
  decode_trace_count,
  decode_unchecked,
  delimiter_token_ids,
  filter_logits,
  model_config_of,
  sample_steps,
)
from qstar_jax.models.errors import PromptError

WIDTH = 40  # brute-force buffer width (one compile)


@pytest.fixture(scope="module")
def model():
  config = get_config("tiny", eos_token_ids=())
  rng = np.random.default_rng(0)
  flat = {}
  for name, shape in flat_param_shapes(config).items():
    if name.endswith(".scale"):
      flat[name] = np.ones(shape, np.float32)
    elif name == "embed_tokens.embedding":
      flat[name] = rng.standard_normal(shape).astype(np.float32)
    else:
      flat[name] = (0.15 * rng.standard_normal(shape)).astype(np.float32)
  return from_flat_params(config, flat)


@pytest.fixture(scope="module")
def split(model):
  return nnx.split(model)


_forward = jax.jit(lambda g, p, t: apply(g, p, t)[0], static_argnums=0)


def brute_force_log_probs(split, sequences):
  """log softmax of the logits at every position, recomputed from scratch: [R, WIDTH, V]."""
  graphdef, params = split
  buf = np.zeros((len(sequences), WIDTH), np.int32)
  for r, seq in enumerate(sequences):
    buf[r, :len(seq)] = seq
  logits = np.asarray(_forward(graphdef, params, jnp.asarray(buf)), np.float64)
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)


def prompts(batch, width, lengths, seed=0):
  rng = np.random.default_rng(seed)
  tokens = np.full((batch, width), 3, np.int32)  # right padding with junk (not 0)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.integers(0, 256, n)
  return tokens


def check_against_brute_force(split, tokens, lengths, res, *, greedy):
  out = np.asarray(res.tokens)
  gen_lengths = np.asarray(res.lengths)
  seqs = [list(tokens[r, :lengths[r]]) + list(out[r, :gen_lengths[r]]) for r in range(len(out))]
  ref = brute_force_log_probs(split, seqs)
  for r, seq in enumerate(seqs):
    for j in range(gen_lengths[r]):
      pos = lengths[r] + j - 1  # logits at pos predict token pos + 1
      tok = seq[pos + 1]
      np.testing.assert_allclose(res.log_probs[r, j], ref[r, pos, tok], atol=2e-4)
      if greedy:
        assert tok == int(np.argmax(ref[r, pos])), (r, j)
  return ref, seqs


def test_greedy_matches_brute_force_with_per_row_lengths(split):
  graphdef, params = split
  lengths = np.array([6, 3, 1])
  tokens = prompts(3, 7, lengths)
  res = decode(graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths,
               max_new_tokens=8, greedy=True)
  assert res.tokens.shape == (3, 8) and res.log_probs.dtype == jnp.float32
  np.testing.assert_array_equal(res.lengths, [8, 8, 8])
  # The cache holds prompt + generated tokens except the last one.
  np.testing.assert_array_equal(res.cache.lengths, lengths + 7)
  assert not np.any(res.stopped)
  np.testing.assert_array_equal(res.sample_log_probs, 0.0)
  check_against_brute_force(split, tokens, lengths, res, greedy=True)
  # Greedy decoding of each row alone gives the same tokens (rows are independent).
  # Greedy decoding of a row does not depend on the other rows of the batch.
  moved = np.roll(tokens, 1, axis=0)
  again = decode(graphdef, params, jax.random.key(0), tokens=moved,
                 lengths=np.roll(lengths, 1), max_new_tokens=8, greedy=True)
  np.testing.assert_array_equal(again.tokens, np.roll(np.asarray(res.tokens), 1, axis=0))


@pytest.mark.parametrize("kwargs", [dict(temperature=0.7, top_k=5),
                                    dict(temperature=1.3, top_p=0.8)])
def test_sampling_log_probs_against_hand_computed_distribution(split, kwargs):
  graphdef, params = split
  lengths = np.array([5, 2, 7])
  tokens = prompts(3, 7, lengths, seed=1)
  res = decode(graphdef, params, jax.random.key(3), tokens=tokens, lengths=lengths,
               max_new_tokens=8, **kwargs)
  ref, seqs = check_against_brute_force(split, tokens, lengths, res, greedy=False)
  for r in range(3):
    for j in range(8):
      pos = lengths[r] + j - 1
      z = ref[r, pos] / kwargs["temperature"]
      order = np.argsort(-z)
      if "top_k" in kwargs:
        keep = order[:kwargs["top_k"]]
      else:
        probs = np.exp(z[order] - z.max())
        probs /= probs.sum()
        n_keep = int(np.searchsorted(np.cumsum(probs), kwargs["top_p"]) + 1)
        keep = order[:n_keep]
      tok = seqs[r][pos + 1]
      assert tok in keep
      q = np.exp(z[keep] - z[keep].max())
      q /= q.sum()
      np.testing.assert_allclose(res.sample_log_probs[r, j], np.log(q[list(keep).index(tok)]),
                                 atol=2e-4)


def test_filter_logits_hand_computed():
  z = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]], jnp.float32))
  inf = -np.inf
  np.testing.assert_array_equal(
      np.isfinite(filter_logits(z, top_k=2)), [[False, True, False, True]])
  # top-p 0.6: 0.4 (< 0.6) then 0.3 reaches 0.7 -> keep {0.4, 0.3}.
  np.testing.assert_array_equal(
      np.isfinite(filter_logits(z, top_p=0.6)), [[False, True, False, True]])
  # top-p 0.4 exactly: the first token alone reaches it.
  np.testing.assert_array_equal(
      np.isfinite(filter_logits(z, top_p=0.4)), [[False, True, False, False]])
  np.testing.assert_array_equal(np.isfinite(filter_logits(z, top_p=1.0)), [[True] * 4])
  out = filter_logits(z, temperature=2.0, top_k=3)
  np.testing.assert_allclose(out, [[inf, np.log(0.4) / 2, np.log(0.2) / 2, np.log(0.3) / 2]],
                             rtol=1e-6)


def test_stop_tokens_end_rows(split):
  graphdef, params = split
  lengths = np.array([4, 4, 7])
  tokens = prompts(3, 7, lengths, seed=2)
  free = decode(graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths,
                max_new_tokens=8, greedy=True)
  stop = int(free.tokens[0, 2])
  res = decode(graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths,
               max_new_tokens=8, greedy=True, stop_token_ids=[stop], pad_id=0)
  for r in range(3):
    row = list(np.asarray(free.tokens[r]))
    n = row.index(stop) + 1 if stop in row else 8
    assert int(res.lengths[r]) == n
    assert bool(res.stopped[r]) == (stop in row)
    np.testing.assert_array_equal(res.tokens[r, :n], free.tokens[r, :n])
    np.testing.assert_array_equal(res.tokens[r, n:], 0)
    np.testing.assert_array_equal(res.log_probs[r, n:], 0.0)
    assert int(res.cache.lengths[r]) == lengths[r] + n - 1
  assert int(res.lengths[0]) == 3


def test_continue_from_cache_equals_decoding_from_scratch(split):
  graphdef, params = split
  lengths = np.array([5, 2, 7])
  tokens = prompts(3, 7, lengths, seed=4)
  first = decode(graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths,
                 max_new_tokens=8, greedy=True)
  extra = np.random.default_rng(5).integers(0, 256, (3, 2)).astype(np.int32)
  # Continue: the pending last generated token, then two new tokens.
  cont_tokens = np.concatenate([np.asarray(first.tokens[:, -1:]), extra], axis=1)
  cont = decode(graphdef, params, jax.random.key(1), tokens=cont_tokens,
                cache=first.cache, max_new_tokens=5, greedy=True)
  full = np.zeros((3, 17), np.int32)
  full_lengths = lengths + 8 + 2
  for b in range(3):
    seq = list(tokens[b, :lengths[b]]) + list(np.asarray(first.tokens[b])) + list(extra[b])
    full[b, :len(seq)] = seq
  scratch = decode(graphdef, params, jax.random.key(1), tokens=full, lengths=full_lengths,
                   max_new_tokens=5, greedy=True)
  np.testing.assert_array_equal(cont.tokens, scratch.tokens)
  np.testing.assert_allclose(cont.log_probs, scratch.log_probs, atol=1e-4)
  np.testing.assert_array_equal(cont.cache.lengths, scratch.cache.lengths)


def test_sample_steps_k_candidates(split):
  graphdef, params = split
  lengths = np.array([3, 6])
  tokens = prompts(2, 6, lengths, seed=6)
  steps = sample_steps(graphdef, params, jax.random.key(7), tokens=tokens, lengths=lengths,
                       num_candidates=3, max_step_tokens=5, temperature=1.0)
  assert steps.tokens.shape == (2, 3, 5) and steps.lengths.shape == (2, 3)
  assert steps.cache.keys.shape[1] == 6
  flat_tokens = np.repeat(tokens, 3, axis=0)
  flat_lengths = np.repeat(lengths, 3)

  class Flat:
    pass

  res = Flat()
  res.tokens = np.asarray(steps.tokens).reshape(6, 5)
  res.lengths = np.asarray(steps.lengths).reshape(6)
  res.log_probs = np.asarray(steps.log_probs).reshape(6, 5)
  check_against_brute_force(split, flat_tokens, flat_lengths, res, greedy=False)
  # Independent samples per candidate: not all three candidates of a state are identical.
  toks = np.asarray(steps.tokens)
  assert any(len({tuple(toks[b, k]) for k in range(3)}) > 1 for b in range(2))


def test_same_shapes_do_not_recompile(split):
  graphdef, params = split
  kwargs = dict(max_new_tokens=8, temperature=0.9, top_k=5)
  decode(graphdef, params, jax.random.key(0), tokens=prompts(3, 7, [5, 1, 2]),
         lengths=[5, 1, 2], **kwargs)
  before = decode_trace_count()
  for seed in range(3):
    decode(graphdef, params, jax.random.key(seed), tokens=prompts(3, 7, [2, 4, 7], seed=seed),
           lengths=[2 + seed, 4, 7], stop_token_ids=[seed],
           **{**kwargs, "temperature": 0.5 + seed})
  assert decode_trace_count() == before
  # (test_decode_unchecked_inside_a_callers_jit checks that a new trace is counted.)


def test_prompt_errors_name_values(split):
  graphdef, params = split
  with pytest.raises(PromptError, match="empty prompt.*shape \\(1, 0\\)"):
    decode(graphdef, params, jax.random.key(0), tokens=np.zeros((1, 0), np.int32),
           max_new_tokens=2)
  with pytest.raises(PromptError, match="row 1 has length 0"):
    decode(graphdef, params, jax.random.key(0), tokens=np.zeros((2, 3), np.int32),
           lengths=[3, 0], max_new_tokens=2)
  with pytest.raises(PromptError, match="prompt of 300 tokens.*context of 256"):
    decode(graphdef, params, jax.random.key(0), tokens=np.zeros((1, 300), np.int32),
           max_new_tokens=2)
  with pytest.raises(PromptError, match="max_new_tokens=60 = 260 exceeds the model context"):
    decode(graphdef, params, jax.random.key(0), tokens=np.zeros((1, 200), np.int32),
           max_new_tokens=60)
  with pytest.raises(ValueError, match="temperature=0.0: expected > 0"):
    decode(graphdef, params, jax.random.key(0), tokens=np.zeros((1, 3), np.int32),
           max_new_tokens=2, temperature=0.0)
  with pytest.raises(ValueError, match="top_p=1.5"):
    decode(graphdef, params, jax.random.key(0), tokens=np.zeros((1, 3), np.int32),
           max_new_tokens=2, top_p=1.5)


def test_delimiter_token_ids():
  class Toy:
    vocab_size = 5
    pieces = ["a", "b\n", "\n\n", "c", "d"]

    def decode(self, ids):
      return "".join(self.pieces[i] for i in ids)

  assert delimiter_token_ids(Toy(), "\n") == (1, 2)
  assert delimiter_token_ids(Toy(), "\n\n") == (2,)
  with pytest.raises(ValueError):
    delimiter_token_ids(Toy(), "")


def test_decode_unchecked_inside_a_callers_jit(split):
  graphdef, params = split
  lengths = np.array([6, 3, 1])
  tokens = prompts(3, 7, lengths)
  ref = decode(graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths,
               max_new_tokens=8, greedy=True)

  @jax.jit
  def search_like(params, tokens, lengths):
    res = decode_unchecked(graphdef, params, jax.random.key(0), tokens=tokens,
                           lengths=lengths, cache=None, stop_token_ids=jnp.full((1,), -1),
                           sampling=SamplingConfig(max_new_tokens=8, greedy=True),
                           cache_max_len=15)
    return res.tokens, res.cache.lengths

  before = decode_trace_count()
  out, cache_lengths = search_like(params, jnp.asarray(tokens), jnp.asarray(lengths))
  assert decode_trace_count() == before + 1  # the trace counter is live
  np.testing.assert_array_equal(out, ref.tokens)
  np.testing.assert_array_equal(cache_lengths, ref.cache.lengths)


@pytest.mark.parametrize("feed_last_token", [False, True])
def test_last_hidden_equals_flat_forward_and_value_head(split, feed_last_token):
  """last_hidden is the flat forward's final-normed hidden state at the row's last fed token:
  the last generated token with feed_last_token, the one before it otherwise."""
  graphdef, params = split
  lengths = np.array([6, 3, 1])
  tokens = prompts(3, 7, lengths, seed=8)
  free = decode(graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths,
                max_new_tokens=6, greedy=True)
  stop = int(free.tokens[1, 1])  # row 1 stops after 2 tokens (maybe others too)
  res = decode(graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths,
               sampling=SamplingConfig(max_new_tokens=6, greedy=True,
                                       feed_last_token=feed_last_token),
               stop_token_ids=[stop])
  np.testing.assert_array_equal(res.tokens, decode(
      graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths, max_new_tokens=6,
      greedy=True, stop_token_ids=[stop]).tokens)
  gen = np.asarray(res.lengths)
  assert gen[1] == 2 and gen.max() > 2
  buf = np.zeros((3, WIDTH), np.int32)
  for r in range(3):
    seq = list(tokens[r, :lengths[r]]) + list(np.asarray(res.tokens[r, :gen[r]]))
    buf[r, :len(seq)] = seq
  hidden, _ = jax.jit(apply_hidden, static_argnums=0)(graphdef, params, jnp.asarray(buf))
  last = lengths + gen - (1 if feed_last_token else 2)  # index of the last fed token
  flat = np.asarray(hidden)[np.arange(3), last]
  assert res.last_hidden.dtype == jnp.float32
  np.testing.assert_allclose(res.last_hidden, flat, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(res.cache.lengths, last + 1)
  head = ValueHead(get_config("tiny").hidden_size, rngs=nnx.Rngs(0), init_scale=0.5)
  np.testing.assert_allclose(head(res.last_hidden), head(jnp.asarray(flat)), atol=1e-5, rtol=0)


def test_feed_last_token_cache_continues_with_new_tokens_only(split):
  graphdef, params = split
  lengths = np.array([5, 2])
  tokens = prompts(2, 7, lengths, seed=9)
  fed = decode(graphdef, params, jax.random.key(0), tokens=tokens, lengths=lengths,
               max_new_tokens=4, greedy=True, feed_last_token=True)
  extra = np.asarray([[7, 8], [9, 10]], np.int32)
  cont = decode(graphdef, params, jax.random.key(0), tokens=extra, cache=fed.cache,
                max_new_tokens=3, greedy=True)
  full = np.zeros((2, 13), np.int32)
  for b in range(2):
    seq = list(tokens[b, :lengths[b]]) + list(np.asarray(fed.tokens[b])) + list(extra[b])
    full[b, :len(seq)] = seq
  scratch = decode(graphdef, params, jax.random.key(0), tokens=full,
                   lengths=lengths + 4 + 2, max_new_tokens=3, greedy=True)
  np.testing.assert_array_equal(cont.tokens, scratch.tokens)
  np.testing.assert_allclose(cont.last_hidden, scratch.last_hidden, atol=1e-5, rtol=0)


def test_sampling_config_is_one_static_argument(split):
  """A sampling config is hashable; its traced fields (temperature, top_p) reuse the program,
  and fields given both ways are refused."""
  graphdef, params = split
  config = SamplingConfig(max_new_tokens=3, temperature=0.7, top_p=0.9)
  assert hash(config) == hash(SamplingConfig(max_new_tokens=3, temperature=0.7, top_p=0.9))
  decode(graphdef, params, jax.random.key(0), tokens=prompts(1, 4, [4]), sampling=config)
  before = decode_trace_count()
  steps = sample_steps(graphdef, params, jax.random.key(1), tokens=prompts(1, 4, [4]),
                       sampling=config.replace(temperature=1.9, top_p=0.3))
  assert decode_trace_count() == before
  assert steps.last_hidden.shape == (1, 1, get_config("tiny").hidden_size)
  with pytest.raises(TypeError, match="not both"):
    decode(graphdef, params, jax.random.key(0), tokens=prompts(1, 4, [4]), sampling=config,
           greedy=True)


def test_model_config_of_reads_the_graph(model, split):
  graphdef, params = split
  assert model_config_of(graphdef, params) == model.config
  other = get_config("tiny", num_layers=1, eos_token_ids=(5,))
  assert model_config_of(*nnx.split(from_flat_params(other, {
      name: np.zeros(shape, np.float32) for name, shape in flat_param_shapes(other).items()
  }))) == other
