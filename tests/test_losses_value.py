"""qstar_jax.losses.{dpo, oreo, prm} against hand arithmetic, numpy float64 references with central
finite differences, and the exact soft-optimal policy/value pair of a small tree MDP."""

from __future__ import annotations

import doctest
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.losses import dpo as dpo_module
from qstar_jax.losses import (
  dpo_loss,
  exact_kl,
  implicit_prm_loss,
  implicit_process_rewards,
  implied_reward,
  k3_kl,
  oreo_policy_loss,
  oreo_value_loss,
  step_log_probs,
  value_regression_loss,
)
from qstar_jax.losses import oreo as oreo_module
from qstar_jax.losses import prm as prm_module
from qstar_jax.losses.oreo import BETA, STEP_ALPHA, TOKEN_ALPHA


def _central_diff(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """d f / d x by central differences of a float64 numpy function."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += eps
    down[i] -= eps
    grad[i] = (f(up) - f(down)) / (2 * eps)
  return grad


def _log_sigmoid64(z):
  return -np.logaddexp(0.0, -z)


# ---------------------------------------------------------------------------------------------
# DPO / step-level DPO

# Chosen: policy (-1, -2), reference (-1.5, -2.5): token log-ratios (0.5, 0.5), sum 1, mean 0.5.
# Rejected: policy (-3, -1, -9), reference (-2, -1, 0), third token masked: log-ratios (-1, 0),
# sum -1, mean -0.5.
CHOSEN = np.array([[-1.0, -2.0]], np.float32)
CHOSEN_REF = np.array([[-1.5, -2.5]], np.float32)
CHOSEN_MASK = np.array([[True, True]])
REJECTED = np.array([[-3.0, -1.0, -9.0]], np.float32)
REJECTED_REF = np.array([[-2.0, -1.0, 0.0]], np.float32)
REJECTED_MASK = np.array([[True, True, False]])


def _dpo(**kw):
  return dpo_loss(CHOSEN, CHOSEN_REF, CHOSEN_MASK, REJECTED, REJECTED_REF, REJECTED_MASK, **kw)


def test_dpo_by_hand():
  # Sum: h = 0.1 * (1 - (-1)) = 0.2, loss = log(1 + e^-0.2) = 0.598139.
  out = _dpo(beta=0.1)
  assert float(out.loss[0]) == pytest.approx(0.5981389, abs=1e-6)
  assert float(out.chosen_reward[0]) == pytest.approx(0.1, abs=1e-7)
  assert float(out.rejected_reward[0]) == pytest.approx(-0.1, abs=1e-7)
  assert float(out.margin[0]) == pytest.approx(0.2, abs=1e-7)
  assert float(out.accuracy[0]) == 1.0
  # Mean over tokens (step-level Q scale): h = 0.1 * (0.5 - (-0.5)) = 0.1, log(1 + e^-0.1).
  assert float(_dpo(beta=0.1, mean_tokens=True).loss[0]) == pytest.approx(0.6443967, abs=1e-6)
  # Conservative DPO, eps = 0.2: 0.8 log(1 + e^-0.2) + 0.2 log(1 + e^0.2)
  # = 0.8 * 0.598139 + 0.2 * 0.798139 = 0.638139 (= loss + eps * h).
  assert float(_dpo(beta=0.1, label_smoothing=0.2).loss[0]) == pytest.approx(0.6381389, abs=1e-6)
  # Swapping chosen and rejected: h = -0.2, log(1 + e^0.2) = 0.798139, accuracy 0.
  swapped = dpo_loss(REJECTED, REJECTED_REF, REJECTED_MASK, CHOSEN, CHOSEN_REF, CHOSEN_MASK,
                     beta=0.1)
  assert float(swapped.loss[0]) == pytest.approx(0.7981389, abs=1e-6)
  assert float(swapped.accuracy[0]) == 0.0
  # The implied reward / step Q-value: 0.1 * sum (0.5, 0.5) = 0.1; mean: 0.05.
  np.testing.assert_allclose(np.asarray(implied_reward(CHOSEN, CHOSEN_REF, CHOSEN_MASK, beta=0.1,
                                                       mean_tokens=True)), [0.05], atol=1e-7)


@pytest.mark.parametrize("mean_tokens", [False, True])
def test_dpo_gradient_matches_finite_differences(mean_tokens):
  rng = np.random.default_rng(0)
  w, lose = rng.normal(-2, 1, (2, 4)), rng.normal(-2, 1, (2, 3))
  w_ref, lose_ref = rng.normal(-2, 1, (2, 4)), rng.normal(-2, 1, (2, 3))
  w_mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], bool)
  lose_mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  beta, eps = 0.7, 0.15

  def reduce(x, m):
    s = (x * m).sum(-1)
    return s / m.sum(-1) if mean_tokens else s

  def reference(w_flat):  # total loss over the batch, float64
    wp = w_flat.reshape(w.shape)
    h = beta * (reduce(wp - w_ref, w_mask) - reduce(lose - lose_ref, lose_mask))
    return float((-(1 - eps) * _log_sigmoid64(h) - eps * _log_sigmoid64(-h)).sum())

  def loss(wp):
    return dpo_loss(wp, w_ref, w_mask, lose, lose_ref, lose_mask, beta=beta, label_smoothing=eps,
                    mean_tokens=mean_tokens).loss.sum()

  w32 = w.astype(np.float32)
  assert float(loss(w32)) == pytest.approx(reference(w32.astype(np.float64)), abs=1e-6)
  grad = np.asarray(jax.grad(loss)(jnp.asarray(w32)))
  np.testing.assert_allclose(grad, _central_diff(reference, w32.astype(np.float64)), atol=1e-6)
  # Masked-out tokens get no gradient; the reference gets none either (frozen model).
  assert np.all(grad[~w_mask] == 0.0)
  ref_grad = jax.grad(
    lambda r: dpo_loss(w32, r, w_mask, lose, lose_ref, lose_mask, beta=beta).loss.sum())
  assert np.all(np.asarray(ref_grad(jnp.asarray(w_ref, jnp.float32))) == 0.0)


@pytest.mark.parametrize("mean_tokens,label_smoothing", [(True, 0.0), (False, 0.3)])
def test_step_dpo_identical_pair_is_log2_with_zero_gradient(mean_tokens, label_smoothing):
  # h = 0: -(1 - eps) log sigmoid(0) - eps log sigmoid(0) = log 2 for every eps.
  x = jnp.array([[-0.3, -2.0, -1.1], [-0.7, -0.2, -5.0]])
  ref = jnp.array([[-1.0, -1.0, -1.0], [-0.5, -3.0, -0.1]])
  mask = jnp.array([[True, True, False], [True, True, True]])

  def loss(p):
    return dpo_loss(p, ref, mask, p, ref, mask, beta=0.1, mean_tokens=mean_tokens,
                    label_smoothing=label_smoothing).loss

  np.testing.assert_array_equal(np.asarray(loss(x)), np.full(2, np.log(2.0), np.float32))
  grad = np.asarray(jax.grad(lambda p: loss(p).sum())(x))
  np.testing.assert_array_equal(grad, np.zeros_like(grad))


# ---------------------------------------------------------------------------------------------
# OREO: hand values and semi-gradients

# Two episodes padded to T = 4; position 0 is the prompt (masked). Episode 0 has 3 actions,
# episode 1 has 2 (position 3 is padding).
OREO_V = np.array([[9.0, 0.2, 0.4, 0.9], [9.0, 0.6, 0.1, 9.0]], np.float32)
OREO_LP = np.array([[0.0, -1.0, -0.5, -0.25], [0.0, -2.0, -1.0, 0.0]], np.float32)
OREO_REF = np.array([[0.0, -1.5, -0.5, -1.25], [0.0, -1.0, -2.0, 0.0]], np.float32)
OREO_MASK = np.array([[False, True, True, True], [False, True, True, False]])
OREO_R = np.array([1.0, 0.0], np.float32)


def _oreo_residuals64(v, x, frozen_x, rewards, mask, beta, *, policy):
  """Residuals of OREO's value (policy=False) or policy (True) loss, float64.

  The value loss uses the frozen log-ratios everywhere; the policy loss differentiates only the
  action's own x_t and freezes the later ones.
  """
  xm, fm = x * mask, frozen_x * mask
  later = np.cumsum(fm[:, ::-1], -1)[:, ::-1] - fm  # sum over i > t
  own = xm if policy else fm
  return (v - rewards[:, None] + beta * (own + later)) * mask


def _oreo_loss64(*args, policy):
  mask = args[4]
  res = _oreo_residuals64(*args, policy=policy)
  return ((res**2).sum(-1) / mask.sum(-1)).sum()


def test_oreo_by_hand():
  # beta = 0.5. Episode 0: x = (0.5, 0, 1); suffix sums from t: (1.5, 1, 1), R = 1.
  #   residuals V - R + beta * suffix: 0.2 - 1 + 0.75 = -0.05, 0.4 - 1 + 0.5 = -0.1,
  #   0.9 - 1 + 0.5 = 0.4 -> (0.0025 + 0.01 + 0.16) / 3 = 0.0575.
  # Episode 1: x = (-1, 1); suffix sums (0, 1), R = 0: 0.6 + 0 = 0.6, 0.1 + 0.5 = 0.6
  #   -> (0.36 + 0.36) / 2 = 0.36.
  value = oreo_value_loss(OREO_V, OREO_LP, OREO_REF, OREO_R, OREO_MASK, beta=0.5)
  np.testing.assert_allclose(np.asarray(value), [0.0575, 0.36], atol=1e-6)
  # The policy loss has the same residuals (only the gradient differs) ...
  policy = oreo_policy_loss(OREO_V, OREO_LP, OREO_REF, OREO_R, OREO_MASK, beta=0.5, alpha=0.0)
  np.testing.assert_allclose(np.asarray(policy), [0.0575, 0.36], atol=1e-6)
  # ... plus alpha * k3: episode 0, e^-x - 1 + x at x = (0.5, 0, 1): (0.106531 + 0 + 0.367879)
  # / 3 = 0.158137; episode 1 at x = (-1, 1): (0.718282 + 0.367879) / 2 = 0.543081.
  with_kl = oreo_policy_loss(OREO_V, OREO_LP, OREO_REF, OREO_R, OREO_MASK, beta=0.5, alpha=0.1)
  np.testing.assert_allclose(np.asarray(with_kl), [0.0575 + 0.0158137, 0.36 + 0.0543081],
                             atol=1e-6)
  # Defaults are the paper's: beta 0.03, alpha 0.01 (token) / 0.1 (step).
  assert (BETA, TOKEN_ALPHA, STEP_ALPHA) == (0.03, 0.01, 0.1)


def test_oreo_gradients_match_finite_differences():
  x0 = (OREO_LP - OREO_REF).astype(np.float64)
  args64 = (OREO_R.astype(np.float64), OREO_MASK.astype(np.float64), 0.5)
  v64 = OREO_V.astype(np.float64)

  # Value loss: gradient w.r.t. V by finite differences; none w.r.t. the log-probs.
  def value_ref(v):
    return _oreo_loss64(v, x0, x0, *args64, policy=False)

  def value_loss(v, lp):
    return oreo_value_loss(v, lp, OREO_REF, OREO_R, OREO_MASK, beta=0.5).sum()

  grad_v, grad_lp = jax.grad(value_loss, argnums=(0, 1))(jnp.asarray(OREO_V), jnp.asarray(OREO_LP))
  np.testing.assert_allclose(np.asarray(grad_v), _central_diff(value_ref, v64), atol=1e-6)
  assert np.all(np.asarray(grad_lp) == 0.0)

  # Policy loss: the semi-gradient (own log-ratio only; V and later log-ratios frozen at x0).
  def policy_ref(lp):
    return _oreo_loss64(v64, lp - OREO_REF, x0, *args64, policy=True)

  def policy_loss(v, lp):
    return oreo_policy_loss(v, lp, OREO_REF, OREO_R, OREO_MASK, beta=0.5, alpha=0.0).sum()

  grad_v, grad_lp = jax.grad(policy_loss, argnums=(0, 1))(jnp.asarray(OREO_V),
                                                          jnp.asarray(OREO_LP))
  np.testing.assert_allclose(np.asarray(grad_lp),
                             _central_diff(policy_ref, OREO_LP.astype(np.float64)), atol=1e-6)
  assert np.all(np.asarray(grad_v) == 0.0)


def _softmax64(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_kl_exact_and_k3_against_references():
  rng = np.random.default_rng(1)
  pol = rng.normal(0, 1.5, (2, 3, 5)).astype(np.float32)
  ref = rng.normal(0, 1.5, (2, 3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], bool)

  def exact_ref(z):
    p, q = _softmax64(z.reshape(pol.shape)), _softmax64(ref.astype(np.float64))
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    return ((kl * mask).sum(-1) / mask.sum(-1))

  np.testing.assert_allclose(np.asarray(exact_kl(pol, ref, mask)), exact_ref(pol.astype(float)),
                             atol=1e-6)
  grad = jax.grad(lambda z: exact_kl(z, ref, mask).sum())(jnp.asarray(pol))
  np.testing.assert_allclose(np.asarray(grad),
                             _central_diff(lambda z: exact_ref(z).sum(), pol.astype(float)),
                             atol=1e-6)

  # k3's sign convention: sum_a pi(a) (e^-x_a - 1 + x_a) with x_a = log pi(a) - log pi_ref(a)
  # equals KL(pi || pi_ref) exactly (sum_a pi_ref(a) = 1), so with every vocabulary entry as a
  # one-token "sample" weighted by pi, k3 averages to the exact KL.
  p, q = _softmax64(pol[0, 0].astype(float)), _softmax64(ref[0, 0].astype(float))
  per_action = np.array([float(k3_kl(np.log(p[a]).reshape(1, 1), np.log(q[a]).reshape(1, 1),
                                     np.ones((1, 1)))[0]) for a in range(5)])
  one = np.ones((1, 1), bool)
  assert (p * per_action).sum() == pytest.approx(float(exact_kl(pol[:1, :1], ref[:1, :1], one)[0]),
                                                 abs=1e-5)
  assert np.all(per_action >= 0.0)


# ---------------------------------------------------------------------------------------------
# OREO at the exact soft optimum of a small tree MDP

VOCAB, DEPTH, EOS = 3, 3, 0


def _solve_tree_mdp(beta: float, seed: int = 0):
  """Token-level tree MDP: a state is the prefix of tokens; token 0 (EOS) ends the episode, as
  does reaching DEPTH tokens; the terminal reward is a fixed random number per terminal prefix.
  Backward induction of the soft Bellman equation in float64:
  ``Q*(s, a) = R(s + a)`` if ``s + a`` is terminal, else ``V*(s + a)``;
  ``V*(s) = beta log sum_a pi_ref(a|s) exp(Q*(s, a)/beta)``;
  ``pi*(a|s) = pi_ref(a|s) exp((Q*(s, a) - V*(s))/beta)``.
  Returns every root-to-leaf trajectory as (tokens, V*(s_t), log pi*, log pi_ref, R).
  """
  rng = np.random.default_rng(seed)
  prefixes = [p for d in range(DEPTH) for p in itertools.product(range(1, VOCAB), repeat=d)]
  pi_ref = {p: rng.dirichlet(np.ones(VOCAB)) for p in prefixes}
  reward = {}
  value, pi_star = {}, {}
  for p in sorted(prefixes, key=len, reverse=True):
    q = np.zeros(VOCAB)
    for a in range(VOCAB):
      child = p + (a,)
      if a == EOS or len(child) == DEPTH:
        reward[child] = rng.uniform(0, 1)
        q[a] = reward[child]
      else:
        q[a] = value[child]
    value[p] = beta * np.log((pi_ref[p] * np.exp(q / beta)).sum())
    pi_star[p] = pi_ref[p] * np.exp((q - value[p]) / beta)
  trajectories = []
  for leaf, r in reward.items():
    states = [leaf[:t] for t in range(len(leaf))]
    trajectories.append((leaf, [value[s] for s in states],
                         [np.log(pi_star[s][a]) for s, a in zip(states, leaf, strict=True)],
                         [np.log(pi_ref[s][a]) for s, a in zip(states, leaf, strict=True)], r))
  return trajectories, pi_star


def _batch(trajectories, prompt: int = 1):
  """Pad trajectories into [B, prompt + DEPTH] arrays; prompt and padding positions hold junk."""
  b, t = len(trajectories), prompt + DEPTH
  v, lp, ref = (np.full((b, t), 7.0) for _ in range(3))
  mask = np.zeros((b, t), bool)
  rewards = np.zeros(b)
  for i, (leaf, values, log_pi, log_ref, r) in enumerate(trajectories):
    n = len(leaf)
    sl = slice(prompt, prompt + n)
    v[i, sl], lp[i, sl], ref[i, sl], mask[i, sl], rewards[i] = values, log_pi, log_ref, True, r
  return v, lp, ref, rewards, mask


@pytest.mark.parametrize("beta", [BETA, 0.5])
def test_oreo_losses_vanish_at_the_soft_optimum(beta):
  trajectories, _ = _solve_tree_mdp(beta)
  assert len(trajectories) == 1 + 2 + 4 * 3  # EOS at depth 1, 2, or any token at depth 3
  v, lp, ref, rewards, mask = _batch(trajectories)
  # The soft optimum is far from the reference (else the test could not fail).
  assert np.abs((lp - ref)[mask]).max() > 0.1
  f32 = [a.astype(np.float32) for a in (v, lp, ref, rewards)]
  value = np.asarray(oreo_value_loss(*f32, mask, beta=beta))
  policy = np.asarray(oreo_policy_loss(*f32, mask, beta=beta, alpha=0.0))
  assert value.max() <= 1e-6 and policy.max() <= 1e-6

  # Raise V*(root) by 0.1: the root residual of every episode becomes 0.1 in both losses,
  # so each episode's loss is 0.01 / (its length).
  lengths = mask.sum(-1)
  v_up = v.copy()
  v_up[:, 1] += 0.1
  f32[0] = v_up.astype(np.float32)
  np.testing.assert_allclose(np.asarray(oreo_value_loss(*f32, mask, beta=beta)), 0.01 / lengths,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(oreo_policy_loss(*f32, mask, beta=beta, alpha=0.0)),
                             0.01 / lengths, atol=1e-6)
  # With V* but the reference policy in place of pi*, the policy loss is not ~0.
  f32[0], f32[1] = v.astype(np.float32), ref.astype(np.float32)
  assert np.asarray(oreo_policy_loss(*f32, mask, beta=beta, alpha=0.0)).max() > 1e-3


def test_step_level_oreo_vanishes_at_the_soft_optimum():
  # Steps: the first two tokens of an episode form step 0, the third token step 1. Step log-probs
  # are token sums, the values are V* at each step's first token.
  trajectories, _ = _solve_tree_mdp(0.5, seed=3)
  v, lp, ref, rewards, mask = _batch(trajectories)
  step_index = np.where(mask, np.minimum(np.cumsum(mask, -1) - 1, 2) // 2, -1).astype(np.int32)
  step_lp, step_mask = step_log_probs(lp.astype(np.float32), step_index, num_steps=2)
  step_ref, ref_mask = step_log_probs(ref.astype(np.float32), step_index, num_steps=2)
  np.testing.assert_array_equal(np.asarray(step_mask), np.asarray(ref_mask))
  np.testing.assert_array_equal(np.asarray(step_mask).sum(-1), (mask.sum(-1) + 1) // 2)
  # Hand check of the sums: position 1 and 2 form step 0 of a 3-token episode.
  full = int(np.argmax(mask.sum(-1) == 3))
  assert float(step_lp[full, 0]) == pytest.approx(lp[full, 1] + lp[full, 2], abs=1e-6)
  step_v = np.where(np.asarray(step_mask), v[:, [1, 3]], 0.0).astype(np.float32)
  r32 = rewards.astype(np.float32)
  value = oreo_value_loss(step_v, step_lp, step_ref, r32, step_mask, beta=0.5)
  policy = oreo_policy_loss(step_v, step_lp, step_ref, r32, step_mask, beta=0.5, alpha=0.0)
  assert np.asarray(value).max() <= 1e-6 and np.asarray(policy).max() <= 1e-6


def test_oreo_exact_kl_term_and_masked_padding_is_safe():
  # kl="exact" adds alpha * exact_kl(logits) over logits_mask (default: the action mask).
  rng = np.random.default_rng(2)
  pol = rng.normal(0, 1, (2, 4, 3)).astype(np.float32)
  ref = rng.normal(0, 1, (2, 4, 3)).astype(np.float32)
  base = oreo_policy_loss(OREO_V, OREO_LP, OREO_REF, OREO_R, OREO_MASK, beta=0.5, alpha=0.0)
  with_kl = oreo_policy_loss(OREO_V, OREO_LP, OREO_REF, OREO_R, OREO_MASK, beta=0.5, alpha=0.1,
                             kl="exact", policy_logits=pol, reference_logits=ref)
  np.testing.assert_allclose(np.asarray(with_kl),
                             np.asarray(base) + 0.1 * np.asarray(exact_kl(pol, ref, OREO_MASK)),
                             atol=1e-6)
  # -inf log-probs and NaN values at masked positions change neither losses nor gradients.
  lp, v = OREO_LP.copy(), OREO_V.copy()
  lp[~OREO_MASK], v[~OREO_MASK] = -np.inf, np.nan

  def total(v_, lp_):
    return (oreo_value_loss(v_, lp_, OREO_REF, OREO_R, OREO_MASK, beta=0.5).sum()
            + oreo_policy_loss(v_, lp_, OREO_REF, OREO_R, OREO_MASK, beta=0.5).sum())

  clean = jax.value_and_grad(total, argnums=(0, 1))(jnp.asarray(OREO_V), jnp.asarray(OREO_LP))
  dirty = jax.value_and_grad(total, argnums=(0, 1))(jnp.asarray(v), jnp.asarray(lp))
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Implicit PRM and value regression


def test_implicit_prm_by_hand():
  lp = np.array([[-1.0, -0.5, -2.0], [-3.0, -1.0, 0.0]], np.float32)
  ref = np.array([[-2.0, -0.5, -0.5], [-1.0, -1.0, -4.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
  # Log-ratios: (1, 0, -1.5) and (-2, 0, [masked 4]); beta = 0.2.
  r = implicit_process_rewards(lp, ref, mask, beta=0.2)
  np.testing.assert_allclose(np.asarray(r), [[0.2, 0.0, -0.3], [-0.4, 0.0, 0.0]], atol=1e-7)
  # Outcome logits z = 0.2 * (-0.5) = -0.1 and 0.2 * (-2) = -0.4; labels (1, 0):
  # log(1 + e^0.1) = 0.744397, log(1 + e^-0.4) = 0.513015.
  loss = implicit_prm_loss(lp, ref, mask, np.array([1.0, 0.0], np.float32), beta=0.2)
  np.testing.assert_allclose(np.asarray(loss), [0.7443967, 0.5130153], atol=1e-6)

  def reference(lp_flat):
    z = 0.2 * ((lp_flat.reshape(lp.shape) - ref) * mask).sum(-1)
    y = np.array([1.0, 0.0])
    return float(-(y * _log_sigmoid64(z) + (1 - y) * _log_sigmoid64(-z)).sum())

  grad = jax.grad(lambda p: implicit_prm_loss(p, ref, mask, jnp.array([1.0, 0.0]),
                                              beta=0.2).sum())(jnp.asarray(lp))
  np.testing.assert_allclose(np.asarray(grad), _central_diff(reference, lp.astype(float)),
                             atol=1e-6)


def test_value_regression_by_hand_and_tanh_gradient():
  raw = np.array([[np.arctanh(0.5), 0.0, 2.0], [-1.0, 0.3, 0.0]], np.float32)
  targets = np.array([[1.0, 0.5, 0.0], [-1.0, 0.3, 0.9]], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 0]], bool)
  # tanh head: row 0: (0.5 - 1)^2 + (0 - 0.5)^2 = 0.5, / 2 = 0.25.
  # Row 1: (tanh(-1) + 1)^2 + (tanh(0.3) - 0.3)^2 = 0.238406^2 + 0.008662^2 = 0.056913, / 2.
  out = value_regression_loss(raw, targets, mask)
  np.testing.assert_allclose(np.asarray(out), [0.25, 0.0284566], atol=1e-6)
  # Linear head: row 0: (0.549306 - 1)^2 + 0.25 = 0.453125, / 2; row 1: 0 + 0 = 0.
  lin = value_regression_loss(raw, targets, mask, tanh_head=False)
  np.testing.assert_allclose(np.asarray(lin), [0.2265626, 0.0], atol=1e-6)

  def reference(raw_flat):
    err = (np.tanh(raw_flat.reshape(raw.shape)) - targets) * mask
    return float(((err**2).sum(-1) / mask.sum(-1)).sum())

  grad = jax.grad(lambda x: value_regression_loss(x, targets, mask).sum())(jnp.asarray(raw))
  np.testing.assert_allclose(np.asarray(grad), _central_diff(reference, raw.astype(float)),
                             atol=1e-6)
  tgrad = jax.grad(lambda t: value_regression_loss(raw, t, mask).sum())(jnp.asarray(targets))
  assert np.all(np.asarray(tgrad) == 0.0)  # the MCTS targets are constants


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_before_tracing():
  lp = np.zeros((2, 3), np.float32)
  mask = np.ones((2, 3), bool)
  r = np.zeros(2, np.float32)
  with pytest.raises(ValueError, match=r"beta = 0\.0: expected a finite number in \(0, inf\)"):
    dpo_loss(lp, lp, mask, lp, lp, mask, beta=0.0)
  with pytest.raises(ValueError, match="beta = -1"):
    implied_reward(lp, lp, mask, beta=-1)
  with pytest.raises(ValueError, match="beta = nan"):
    oreo_value_loss(lp, lp, lp, r, mask, beta=float("nan"))
  with pytest.raises(ValueError, match=r"label_smoothing = 0\.5: .*\[0, 0\.5\)"):
    dpo_loss(lp, lp, mask, lp, lp, mask, label_smoothing=0.5)
  with pytest.raises(ValueError, match="label_smoothing = -0.1"):
    dpo_loss(lp, lp, mask, lp, lp, mask, label_smoothing=-0.1)
  with pytest.raises(ValueError, match="alpha = -0.01"):
    oreo_policy_loss(lp, lp, lp, r, mask, alpha=-0.01)
  with pytest.raises(ValueError, match="kl = 'k2'"):
    oreo_policy_loss(lp, lp, lp, r, mask, kl="k2")
  with pytest.raises(ValueError, match="needs policy_logits"):
    oreo_policy_loss(lp, lp, lp, r, mask, kl="exact")
  with pytest.raises(ValueError, match="mask"):
    dpo_loss(lp, lp, mask[:, :2], lp, lp, mask)
  with pytest.raises(ValueError, match="2 chosen and 1 rejected"):
    dpo_loss(lp, lp, mask, lp[:1], lp[:1], mask[:1])
  with pytest.raises(ValueError, match=r"rewards have shape \(3,\)"):
    oreo_value_loss(lp, lp, lp, np.zeros(3), mask)
  with pytest.raises(ValueError, match=r"values have shape \(2, 2\)"):
    oreo_policy_loss(lp[:, :2], lp, lp, r, mask)
  with pytest.raises(ValueError, match="same vocabulary"):
    exact_kl(np.zeros((2, 3, 5)), np.zeros((2, 3, 6)), mask)
  with pytest.raises(ValueError, match="step_index holds step 2"):
    step_log_probs(lp, np.array([[0, 1, 2], [0, 0, -1]]), num_steps=2)
  with pytest.raises(ValueError, match="num_steps = 0"):
    step_log_probs(lp, np.zeros((2, 3), np.int32), num_steps=0)
  with pytest.raises(ValueError, match=r"labels have shape \(2, 1\)"):
    implicit_prm_loss(lp, lp, mask, np.zeros((2, 1)))
  with pytest.raises(ValueError, match="value_regression_loss"):
    value_regression_loss(lp, lp[:, :2], mask)
  # Inside a jit the check still fires on the static hyperparameter, while tracing, with the
  # same message; a traced beta is refused by name.
  with pytest.raises(ValueError, match="beta = 0"):
    jax.jit(lambda x: implied_reward(x, x, mask, beta=0))(lp)
  with pytest.raises(TypeError, match="beta is a traced array"):
    jax.jit(lambda x, b: implied_reward(x, x, mask, beta=b))(lp, 0.1)


@pytest.mark.parametrize("module", [dpo_module, oreo_module, prm_module],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
  """The formula docstrings' examples run and print what they show (pytest does not collect
  doctests in this project)."""
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result
