"""Value-learning loss functions for the train loop: each equals the `qstar_jax.losses` function
applied to log-probs of a plain forward (NNX module call + `token_log_probs`, values and step sums
by hand), the frozen reference gets no gradient, a few `train` steps lower the loss, DPO with
policy == reference is log 2, and a reference with another vocabulary is refused."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qstar_jax.data.reasoning import PreferencePair, Trajectory, pad_pairs, pad_trajectories
from qstar_jax.losses import (
  dpo_loss,
  implicit_prm_loss,
  oreo_policy_loss,
  oreo_value_loss,
  token_log_probs,
)
from qstar_jax.models import get_config
from qstar_jax.models.llama import init_llama
from qstar_jax.training.optim import OptimizerConfig, make_optimizer
from qstar_jax.training.train_loop import TrainLoopConfig, train
from qstar_jax.training.value_learning import (
  check_reference_vocabulary,
  dpo_loss_fn,
  implicit_prm_loss_fn,
  oreo_loss_fn,
  oreo_params,
  with_reference_log_probs,
)

VOCAB = 48
PAD = 0
KEY = jax.random.key(0)
precompute = jax.jit(with_reference_log_probs, static_argnums=0)


def tiny_config(vocab_size: int = VOCAB):
  return get_config("tiny", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                    num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=64,
                    eos_token_ids=())


@pytest.fixture(scope="module")
def models():
  """(graphdef, policy params, reference params) of one tiny config."""
  graphdef, policy = nnx.split(init_llama(tiny_config(), seed=0))
  # The reference: the policy's weights moved by noise (a second init would compile again).
  rng = np.random.default_rng(1)
  reference = jax.tree.map(lambda x: x + 0.2 * rng.normal(size=x.shape).astype(x.dtype), policy)
  return graphdef, policy, reference


def _ids(rng, n):
  return [int(t) for t in rng.integers(3, VOCAB, n)]


@pytest.fixture(scope="module")
def pair_batch():
  rng = np.random.default_rng(0)
  pairs = [PreferencePair(context_ids=_ids(rng, c), chosen_ids=_ids(rng, w),
                          rejected_ids=_ids(rng, r), chosen_q=1.0, rejected_q=0.0)
           for c, w, r in ((3, 2, 4), (5, 3, 1), (2, 4, 3), (4, 1, 2))]
  return pad_pairs(pairs, pad_id=PAD, bucket=4)


@pytest.fixture(scope="module")
def trajectory_batch():
  rng = np.random.default_rng(1)
  trajs = [Trajectory(prompt_ids=_ids(rng, p), steps=[_ids(rng, n) for n in steps], reward=r)
           for p, steps, r in ((3, (2, 3), 1.0), (2, (1, 2, 2), 0.0), (4, (3,), 1.0),
                               (2, (2, 1, 1), 0.0))]
  return pad_trajectories(trajs, pad_id=PAD, bucket=4)


@functools.partial(jax.jit, static_argnums=0)
def plain_log_probs(graphdef, params, tokens, mask):
  """Per-target log-probs of a plain module call (no code of the module under test)."""
  tokens = jnp.asarray(tokens)
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  return token_log_probs(logits, tokens[:, 1:], jnp.asarray(mask))


def plain_values(graphdef, params, value, tokens):
  hidden, _ = nnx.merge(graphdef, params).hidden_states(jnp.asarray(tokens)[:, :-1])
  return np.asarray(hidden) @ np.asarray(value["kernel"])[:, 0] + float(value["bias"][0])


def per_step(token_values, step_index, num_steps, *, first_only=False):
  """Sums over each step's tokens (or the value at its first token), by a Python loop."""
  out = np.zeros((step_index.shape[0], num_steps), np.float32)
  mask = np.zeros((step_index.shape[0], num_steps), bool)
  for b, t in itertools.product(*map(range, step_index.shape)):
    s = step_index[b, t]
    if s < 0 or (first_only and mask[b, s]):
      continue
    out[b, s] += np.asarray(token_values)[b, t]
    mask[b, s] = True
  return out, mask


def all_zero(tree) -> bool:
  return all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(tree))


def assert_zero_reference_grad(loss_fn, params, batch, reference):
  """d loss / d reference is exactly 0, d loss / d params is not (one jitted call)."""
  grad_fn = jax.jit(jax.grad(lambda p, r: loss_fn(p, batch, KEY, r)[0], argnums=(0, 1)))
  param_grads, reference_grads = grad_fn(params, reference)
  assert all_zero(reference_grads)
  assert not all_zero(param_grads)


# ------------------------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("mean_tokens,label_smoothing", [(False, 0.0), (True, 0.1)])
def test_dpo_loss_fn_equals_losses_dpo(models, pair_batch, mean_tokens, label_smoothing):
  graphdef, policy, reference = models
  b = pair_batch
  lp = {k: plain_log_probs(graphdef, p, getattr(b, f"{k}_tokens"), getattr(b, f"{k}_mask"))
        for k, p in (("chosen", policy), ("rejected", policy))}
  ref = {k: plain_log_probs(graphdef, reference, getattr(b, f"{k}_tokens"),
                            getattr(b, f"{k}_mask")) for k in ("chosen", "rejected")}
  expected = dpo_loss(lp["chosen"], ref["chosen"], b.chosen_mask, lp["rejected"],
                      ref["rejected"], b.rejected_mask, beta=0.3,
                      label_smoothing=label_smoothing, mean_tokens=mean_tokens)
  loss_fn = dpo_loss_fn(graphdef, beta=0.3, label_smoothing=label_smoothing,
                        mean_tokens=mean_tokens)
  loss, aux = jax.jit(loss_fn)(policy, b, KEY, reference)
  np.testing.assert_allclose(loss, expected.loss.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["reward_margin"], expected.margin.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["accuracy"], expected.accuracy.mean())
  # The precomputed reference (extra=None) gives the same loss.
  loss_pre, _ = loss_fn(policy, precompute(graphdef, reference, b), KEY)
  np.testing.assert_allclose(loss_pre, loss, rtol=1e-6)


def test_dpo_reference_gets_no_gradient(models, pair_batch):
  graphdef, policy, reference = models
  assert_zero_reference_grad(dpo_loss_fn(graphdef, beta=0.1), policy, pair_batch, reference)


def test_dpo_with_policy_as_reference_is_log_2(models, pair_batch):
  graphdef, policy, _ = models
  for mean_tokens in (False, True):
    loss, aux = dpo_loss_fn(graphdef, beta=0.1, mean_tokens=mean_tokens)(
      policy, pair_batch, KEY, policy)
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    assert float(aux["reward_margin"]) == 0.0 and float(aux["accuracy"]) == 0.0


def test_reference_with_other_vocabulary_is_refused(models, pair_batch):
  graphdef, policy, reference = models
  assert check_reference_vocabulary(graphdef, policy, reference) == VOCAB
  other_graphdef, other = nnx.split(init_llama(tiny_config(vocab_size=64), seed=2))
  with pytest.raises(ValueError, match="vocabulary of 64 tokens, the policy 48"):
    check_reference_vocabulary(graphdef, policy, other, reference_graphdef=other_graphdef)
  # A reference of the same graphdef but a wider embedding fails when the loss traces.
  with pytest.raises(ValueError, match="vocabulary of 64 tokens, the policy 48"):
    dpo_loss_fn(graphdef, beta=0.1)(policy, pair_batch, KEY, other)
  with pytest.raises(ValueError, match="no reference model"):
    dpo_loss_fn(graphdef, beta=0.1)(policy, pair_batch, KEY)


# ------------------------------------------------------------------------------------------ OREO


def oreo_expected(graphdef, params, reference, batch, *, beta, alpha, step_level):
  lp = plain_log_probs(graphdef, params["policy"], batch.tokens, batch.mask)
  ref = plain_log_probs(graphdef, reference, batch.tokens, batch.mask)
  trunk = params.get("value_trunk", params["policy"])
  values = np.where(batch.mask, plain_values(graphdef, trunk, params["value"], batch.tokens), 0.0)
  mask = batch.mask
  if step_level:
    s = batch.tokens.shape[1] - 1
    lp, mask = per_step(lp, batch.step_index, s)
    ref, _ = per_step(ref, batch.step_index, s)
    values, _ = per_step(values, batch.step_index, s, first_only=True)
  args = (jnp.asarray(values), jnp.asarray(lp), jnp.asarray(ref), batch.rewards, mask)
  return (oreo_value_loss(*args, beta=beta) + oreo_policy_loss(*args, beta=beta, alpha=alpha)
          ).mean()


@pytest.mark.parametrize("step_level,separate", [(False, False), (True, True)])
def test_oreo_loss_fn_equals_losses_oreo(models, trajectory_batch, step_level, separate):
  graphdef, policy, reference = models
  rng = np.random.default_rng(3)
  head = {"kernel": rng.normal(0, 0.3, (32, 1)), "bias": np.array([0.2])}
  params = oreo_params(policy, head, separate_value_model=separate)
  if separate:  # a value trunk that differs from the policy, so that reading it is tested
    params["value_trunk"] = reference
  expected = oreo_expected(graphdef, params, reference, trajectory_batch, beta=0.5, alpha=0.1,
                           step_level=step_level)
  loss_fn = oreo_loss_fn(graphdef, beta=0.5, alpha=0.1, step_level=step_level)
  loss, aux = jax.jit(loss_fn)(params, trajectory_batch, KEY, reference)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["value_loss"] + aux["policy_loss"], loss, rtol=1e-5)
  if separate:  # the policy loss trains the policy only, the value loss the value model only
    def part_grads(p):
      def part(q, name):
        return loss_fn(q, trajectory_batch, KEY, reference)[1][name]
      return {name: jax.grad(part)(p, name) for name in ("policy_loss", "value_loss")}
    grads = jax.jit(part_grads)(params)
    assert all_zero(grads["policy_loss"]["value"])
    assert all_zero(grads["policy_loss"]["value_trunk"])
    assert not all_zero(grads["policy_loss"]["policy"])
    assert all_zero(grads["value_loss"]["policy"])
    assert not all_zero(grads["value_loss"]["value"])
    assert not all_zero(grads["value_loss"]["value_trunk"])
  else:
    assert_zero_reference_grad(loss_fn, params, trajectory_batch, reference)


def test_oreo_exact_kl_and_precomputed_reference(models, trajectory_batch):
  graphdef, policy, reference = models
  params = oreo_params(policy, {"kernel": np.zeros((32, 1)), "bias": np.zeros(1)})
  b = trajectory_batch
  lp = plain_log_probs(graphdef, policy, b.tokens, b.mask)
  ref = plain_log_probs(graphdef, reference, b.tokens, b.mask)
  tokens = jnp.asarray(b.tokens)[:, :-1]
  logits = nnx.merge(graphdef, policy)(tokens)
  ref_logits = nnx.merge(graphdef, reference)(tokens)
  values = jnp.zeros(b.mask.shape)
  expected = (oreo_value_loss(values, lp, ref, b.rewards, b.mask, beta=0.5)
              + oreo_policy_loss(values, lp, ref, b.rewards, b.mask, beta=0.5, alpha=0.2,
                                 kl="exact", policy_logits=logits,
                                 reference_logits=ref_logits)).mean()
  loss, _ = oreo_loss_fn(graphdef, beta=0.5, alpha=0.2, kl="exact")(params, b, KEY, reference)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  k3 = oreo_loss_fn(graphdef, beta=0.5, alpha=0.2)
  loss_pre, _ = k3(params, precompute(graphdef, reference, b), KEY)
  np.testing.assert_allclose(loss_pre, k3(params, b, KEY, reference)[0], rtol=1e-6)


# ---------------------------------------------------------------------------------- implicit PRM


def test_implicit_prm_loss_fn_equals_losses_prm(models, trajectory_batch):
  graphdef, policy, reference = models
  b = trajectory_batch
  lp = plain_log_probs(graphdef, policy, b.tokens, b.mask)
  ref = plain_log_probs(graphdef, reference, b.tokens, b.mask)
  expected = implicit_prm_loss(lp, ref, b.mask, b.rewards, beta=0.05).mean()
  loss_fn = implicit_prm_loss_fn(graphdef, beta=0.05)
  loss, aux = jax.jit(loss_fn)(policy, b, KEY, reference)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  z = 0.05 * np.sum(np.asarray(lp - ref), axis=1)
  np.testing.assert_allclose(aux["accuracy"], np.mean((z > 0) == (b.rewards > 0.5)))
  assert_zero_reference_grad(loss_fn, policy, b, reference)


# ------------------------------------------------------------------------------------ train loop


def run_train(loss_fn, params, batch, reference, out_dir, *, lr=3e-2):
  opt = OptimizerConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0)
  config = TrainLoopConfig(num_steps=4, eval_every=0, checkpoint_every=0, log_every=1)
  result = train(loss_fn, params, optimizer=make_optimizer(opt, total_steps=4),
                 train_batches=lambda start: itertools.repeat(batch), config=config,
                 out_dir=out_dir, run_config={"test": "value_learning"}, extra=reference,
                 show_progress=False, log=lambda message: None)
  assert result.step == 4
  return result


def test_dpo_train_steps_lower_the_loss(models, pair_batch, tmp_path):
  graphdef, policy, reference = models
  dpo = jax.jit(dpo_loss_fn(graphdef, beta=0.5, mean_tokens=True))
  before = float(dpo(policy, pair_batch, KEY, reference)[0])
  result = run_train(dpo, policy, pair_batch, reference, tmp_path)
  after = float(dpo(result.params, pair_batch, KEY, reference)[0])
  assert after < before - 0.05, (before, after)
  for a, r in zip(jax.tree.leaves(result.extra), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(a, r)  # the frozen reference rode along untouched


def test_oreo_train_steps_lower_the_loss(models, trajectory_batch, tmp_path):
  graphdef, policy, reference = models
  oreo = oreo_loss_fn(graphdef, beta=0.5, step_level=True)
  params = oreo_params(policy, {"kernel": np.zeros((32, 1)), "bias": np.zeros(1)},
                       separate_value_model=True)
  before = float(jax.jit(oreo)(params, trajectory_batch, KEY, reference)[0])
  result = run_train(oreo, params, trajectory_batch, reference, tmp_path, lr=1e-2)
  after = float(jax.jit(oreo)(result.params, trajectory_batch, KEY, reference)[0])
  assert after < 0.8 * before, (before, after)
