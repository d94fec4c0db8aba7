"""qstar_jax.losses.lm against numpy references; qstar_jax.training.lm's model-facing wrappers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from qstar_jax.losses import mean_token_nll, sequence_log_probs, token_log_probs, token_nll
from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.llama import Llama, apply
from qstar_jax.training.lm import lm_loss_fn, window_mean_nll, window_token_nll

# B = 2, T = 3, V = 3.
LOGITS = np.array([[[2.0, 1.0, 0.0], [0.5, -1.0, 3.0], [0.0, 0.0, 0.0]],
                   [[-2.0, 4.0, 1.0], [1.0, 1.0, -3.0], [10.0, -10.0, 0.0]]], np.float32)
TARGETS = np.array([[0, 2, 1], [1, 0, 1]], np.int32)
MASK = np.array([[False, True, True], [True, True, False]])


def _log_softmax64(z: np.ndarray) -> np.ndarray:
  z = z.astype(np.float64)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _picked64(z: np.ndarray, y: np.ndarray) -> np.ndarray:
  return np.take_along_axis(_log_softmax64(z), y[..., None], -1)[..., 0]


def test_by_hand_tiny_vocabulary():
  # Row 0, position 0: logits (2, 1, 0), target 0: 2 - log(e^2 + e + 1).
  lp = np.asarray(token_log_probs(LOGITS, TARGETS))
  assert lp[0, 0] == pytest.approx(2 - np.log(np.e**2 + np.e + 1), abs=1e-6)
  assert lp[0, 2] == pytest.approx(-np.log(3), abs=1e-6)  # uniform over three
  np.testing.assert_allclose(lp, _picked64(LOGITS, TARGETS), atol=1e-6)
  np.testing.assert_allclose(np.asarray(token_nll(LOGITS, TARGETS)), -_picked64(LOGITS, TARGETS),
                             atol=1e-6)
  # Row 1, position 2: target -10 against 10: about -20 nats, no underflow to -inf.
  assert lp[1, 2] == pytest.approx(-20.0, abs=1e-4)


def test_mask_honoured():
  ref = _picked64(LOGITS, TARGETS)
  lp = np.asarray(token_log_probs(LOGITS, TARGETS, MASK))
  np.testing.assert_allclose(lp, np.where(MASK, ref, 0.0), atol=1e-6)
  np.testing.assert_allclose(np.asarray(sequence_log_probs(LOGITS, TARGETS, MASK)),
                             (ref * MASK).sum(-1), atol=1e-6)
  np.testing.assert_allclose(np.asarray(mean_token_nll(LOGITS, TARGETS, MASK)),
                             [-ref[0, 1:].mean(), -ref[1, :2].mean()], atol=1e-6)
  np.testing.assert_allclose(np.asarray(mean_token_nll(LOGITS, TARGETS)), -ref.mean(-1),
                             atol=1e-6)
  # 0/1 integer masks act like booleans; an example with nothing counted scores 0.
  np.testing.assert_array_equal(np.asarray(token_nll(LOGITS, TARGETS, MASK.astype(np.int32))),
                                np.asarray(token_nll(LOGITS, TARGETS, MASK)))
  empty = np.zeros_like(MASK)
  np.testing.assert_array_equal(np.asarray(mean_token_nll(LOGITS, TARGETS, empty)), [0.0, 0.0])


def test_masked_banned_token_gives_no_nan():
  z = LOGITS.copy()
  z[0, 0, 0] = -np.inf  # position (0, 0) targets token 0, which is banned but masked out
  nll = token_nll(z, TARGETS, MASK)
  assert np.all(np.isfinite(np.asarray(nll))) and float(nll[0, 0]) == 0.0
  grad = jax.grad(lambda x: token_nll(x, TARGETS, MASK).sum())(jnp.asarray(z))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_float32_under_bf16_logits():
  # Large logits of a wide vocabulary: a bfloat16 log_softmax keeps ~3 significant digits.
  rng = np.random.default_rng(0)
  z16 = jnp.asarray(rng.normal(0.0, 8.0, (2, 4, 512)), jnp.bfloat16)
  y = jnp.asarray(rng.integers(0, 512, (2, 4)), jnp.int32)
  out = token_log_probs(z16, y)
  assert out.dtype == jnp.float32
  ref = _picked64(np.asarray(z16.astype(jnp.float32)), np.asarray(y))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-5)
  in_bf16 = np.take_along_axis(np.asarray(jax.nn.log_softmax(z16, -1).astype(jnp.float32)),
                               np.asarray(y)[..., None], -1)[..., 0]
  assert np.abs(in_bf16 - ref).max() > 1e-2  # what the float32 computation avoids


def test_gradient():
  y, m = jnp.asarray(TARGETS), jnp.asarray(MASK)
  check_grads(lambda z: token_nll(z, y, m), (jnp.asarray(LOGITS),), order=1, modes=("rev",),
              eps=1e-2)
  # d(-log softmax(z)[y]) / dz = softmax(z) - onehot(y), zero at masked positions.
  grad = np.asarray(jax.grad(lambda z: token_nll(z, y, m).sum())(jnp.asarray(LOGITS)))
  expect = np.exp(_log_softmax64(LOGITS)) - np.eye(3)[TARGETS]
  np.testing.assert_allclose(grad, expect * MASK[..., None], atol=1e-6)


def test_shape_errors_name_the_shapes():
  with pytest.raises(ValueError, match=r"targets have shape \(2, 2\), logits \(2, 3, 3\)"):
    token_nll(LOGITS, TARGETS[:, :2])
  with pytest.raises(ValueError, match="mask has shape"):
    token_nll(LOGITS, TARGETS, MASK[:1])
  with pytest.raises(ValueError, match="integer token ids"):
    token_nll(LOGITS, TARGETS.astype(np.float32))


def _tiny_model():
  cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, max_position_embeddings=16)
  return nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))


def test_window_losses_match_optax_cross_entropy():
  """The wrappers against the cross-entropy lm_pretrain used before (optax)."""
  graphdef, params = _tiny_model()
  windows = np.random.default_rng(1).integers(0, 32, (5, 9)).astype(np.int32)

  @jax.jit
  def forward(p, w):  # one compile for the reference and both wrappers
    return (apply(graphdef, p, w[:, :-1])[0], window_token_nll(graphdef)(p, w),
            lm_loss_fn(graphdef)(p, w))

  logits, per_token, (loss, aux) = forward(params, jnp.asarray(windows))
  ref = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]))
  np.testing.assert_allclose(np.asarray(per_token), ref, rtol=1e-6)
  assert aux == {} and float(loss) == pytest.approx(float(ref.mean()), rel=1e-6)
  # Per window, in batches of 2 (the last one shorter): the same means as one batch of 5.
  per_window = window_mean_nll(graphdef, params, windows, batch_size=2)
  assert per_window.dtype == np.float64 and per_window.shape == (5,)
  np.testing.assert_allclose(per_window, ref.mean(-1), rtol=1e-6)
