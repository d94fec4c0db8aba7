"""OREO: value and policy losses from the soft Bellman equation, token-level and step-level.

An episode is a response of N actions ``a_0 .. a_{N-1}`` from states ``s_0 .. s_{N-1}`` with one
outcome reward R at its end (1 correct, 0 wrong) and ``V(s_N) = 0``. The KL-regularised optimum
obeys ``V(s_t) - V(s_{t+1}) = r_t - beta * log pi(a_t|s_t)/pi_ref(a_t|s_t)``, so summed to the
end of the episode ``V(s_t) = R - beta * sum_{i>=t} x_i`` with ``x_i = log pi(a_i|s_i) -
log pi_ref(a_i|s_i)``. Both losses are the mean square of that residual over the episode.

Token level: an action is a token; arrays are ``[B, T]`` (values ``V(s_t)`` read before token t,
per-token log-probs). Step level: an action is a whole step, ``log pi(step) = sum of its tokens'
log pi``; `step_log_probs` turns per-token log-probs ``[B, T]`` into per-step ones ``[B, S]``,
and the values are read once per step (before its first token). The same two loss functions take
either; only ``alpha``'s default differs (`TOKEN_ALPHA` and `STEP_ALPHA`, the paper's values).

KL regulariser of the policy loss, ``alpha * KL(pi || pi_ref)`` averaged over the counted
positions: ``kl="exact"`` sums over the vocabulary from full logits ``[B, T, V]``; ``kl="k3"``
estimates it from the taken actions only (`k3_kl`). Reference inputs get no gradient
(``stop_gradient``: the reference model is frozen). Math is float32; per-example ``[B]`` results.

References: Wang et al., "Offline reinforcement learning for LLM multi-step reasoning" (OREO,
2024): the soft Bellman equation, the value and policy objectives and the step-level variant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.losses.dpo import check_coefficient, check_log_probs

__all__ = ["BETA", "STEP_ALPHA", "TOKEN_ALPHA", "exact_kl", "k3_kl", "oreo_policy_loss",
           "oreo_value_loss", "step_log_probs"]

BETA = 0.03  # OREO's KL coefficient (the paper's default).
TOKEN_ALPHA = 0.01  # weight of the policy loss's KL regulariser, token-level actions.
STEP_ALPHA = 0.1  # the same for step-level actions.


def step_log_probs(token_log_probs: jax.Array, step_index: jax.Array, *,
                   num_steps: int) -> tuple[jax.Array, jax.Array]:
  """Per-step log-probabilities ``log pi(step_s) = sum_{t: step_index_t = s} log pi(y_t)``.

  Args:
    token_log_probs: ``[B, T]`` per-token log-probs (any float values: log-ratios also work).
    step_index: ``[B, T]`` integer, the step (0 .. num_steps-1) each token belongs to, or -1 for
      tokens of no step (prompt, padding).
    num_steps: S, static.

  Returns:
    ``([B, S] float32 sums, [B, S] bool mask)``: the mask is True where a step has a token.

  Examples:
    >>> lp = jnp.array([[-9.0, -0.5, -0.25, -1.0, -7.0]])
    >>> sums, mask = step_log_probs(lp, jnp.array([[-1, 0, 0, 1, -1]]), num_steps=3)
    >>> sums, mask
    (Array([[-0.75, -1.  ,  0.  ]], dtype=float32), Array([[ True,  True, False]], dtype=bool))
  """
  if not isinstance(num_steps, int | np.integer) or num_steps < 1:
    raise ValueError(f"num_steps = {num_steps!r}: expected a positive int")
  if jnp.shape(step_index) != jnp.shape(token_log_probs) or len(jnp.shape(step_index)) != 2:
    raise ValueError(f"step_index has shape {jnp.shape(step_index)}, token_log_probs "
                     f"{jnp.shape(token_log_probs)}: expected one shape [B, T]")
  if not jnp.issubdtype(jnp.asarray(step_index).dtype, jnp.integer):
    raise ValueError(f"step_index has dtype {jnp.asarray(step_index).dtype}: expected integers")
  if not isinstance(step_index, jax.core.Tracer):
    top = int(np.max(np.asarray(step_index), initial=-1))
    if top >= num_steps:
      raise ValueError(f"step_index holds step {top}: expected steps below num_steps = "
                       f"{num_steps} (or -1 for no step)")
  index = jnp.asarray(step_index)
  member = jax.nn.one_hot(index, num_steps, dtype=jnp.float32)  # [B, T, S]; -1 -> all zeros
  # `where` before the product: a token outside every step may hold -inf (-inf * 0 is NaN).
  values = jnp.where(index >= 0, jnp.asarray(token_log_probs, jnp.float32), 0.0)
  return jnp.einsum("bt,bts->bs", values, member), member.sum(axis=1) > 0


def _check_inputs(name: str, values: jax.Array, policy_log_probs: jax.Array,
                  reference_log_probs: jax.Array, rewards: jax.Array, mask: jax.Array) -> None:
  check_log_probs(name, policy_log_probs, reference_log_probs, mask)
  if jnp.shape(values) != jnp.shape(mask):
    raise ValueError(f"{name}: values have shape {jnp.shape(values)}: expected the mask's "
                     f"shape {jnp.shape(mask)} (one V(s_t) per action)")
  if jnp.shape(rewards) != jnp.shape(mask)[:1]:
    raise ValueError(f"{name}: rewards have shape {jnp.shape(rewards)}: expected "
                     f"{jnp.shape(mask)[:1]} (one outcome per episode)")


def _residual_parts(values, policy_log_probs, reference_log_probs, rewards, mask):
  """``(m, V - R masked, x_t, sum_{i>t} x_i)`` in float32; x = log pi - sg[log pi_ref]."""
  m = jnp.asarray(mask).astype(bool)
  x = jnp.where(m, jnp.asarray(policy_log_probs, jnp.float32)
                - jax.lax.stop_gradient(jnp.asarray(reference_log_probs, jnp.float32)), 0.0)
  later = jnp.flip(jnp.cumsum(jnp.flip(x, -1), -1), -1) - x  # sum over i > t
  base = jnp.asarray(values, jnp.float32) - jnp.asarray(rewards, jnp.float32)[:, None]
  return m, jnp.where(m, base, 0.0), x, later


def _masked_mean(per_position: jax.Array, m: jax.Array) -> jax.Array:
  count = m.astype(jnp.float32).sum(axis=-1)
  return jnp.where(m, per_position, 0.0).sum(axis=-1) / jnp.maximum(count, 1.0)


def oreo_value_loss(values: jax.Array, policy_log_probs: jax.Array,
                    reference_log_probs: jax.Array, rewards: jax.Array, mask: jax.Array, *,
                    beta: float = BETA) -> jax.Array:
  """OREO's value loss ``1/N sum_t (V(s_t) - R + beta * sg[sum_{i>=t} x_i])^2``.

  ``x_i = log pi(a_i|s_i) - log pi_ref(a_i|s_i)``; the log-ratios carry no gradient: only V is
  trained. N counts the masked actions of the episode (an episode with none scores 0).

  Args:
    values: ``[B, N]`` V(s_t), the value of the state before action t.
    policy_log_probs, reference_log_probs: ``[B, N]`` log pi(a_t|s_t), log pi_ref(a_t|s_t) per
      token (token level) or per step (step level, from `step_log_probs`).
    rewards: ``[B]`` outcome reward R of each episode.
    mask: ``[B, N]`` bool or 0/1, True on the episode's actions (False on prompt and padding).
    beta: the KL coefficient, > 0 (0.03).

  Returns:
    ``[B]`` float32.

  Examples:
    Two actions with log-ratios (1, 2), R = 1, beta = 0.5, V = (0, 0.5): residuals
    ``0 - 1 + 0.5 * 3 = 0.5`` and ``0.5 - 1 + 0.5 * 2 = 0.5``, mean square 0.25.

    >>> lp, ref = jnp.array([[-1.0, -1.0]]), jnp.array([[-2.0, -3.0]])
    >>> oreo_value_loss(jnp.array([[0.0, 0.5]]), lp, ref, jnp.array([1.0]),
    ...                 jnp.array([[True, True]]), beta=0.5)
    Array([0.25], dtype=float32)

  References: Wang et al. (OREO, 2024), the value objective.
  """
  beta = check_coefficient("beta", beta)
  _check_inputs("oreo_value_loss", values, policy_log_probs, reference_log_probs, rewards, mask)
  m, base, x, later = _residual_parts(values, policy_log_probs, reference_log_probs, rewards,
                                      mask)
  residual = base + beta * jax.lax.stop_gradient(x + later)
  return _masked_mean(jnp.square(residual), m)


def exact_kl(policy_logits: jax.Array, reference_logits: jax.Array,
             mask: jax.Array) -> jax.Array:
  """Per-example mean over masked tokens of ``KL(pi || pi_ref) = sum_v pi(v) (log pi(v) -
  log pi_ref(v))``, from full logits, log_softmax in float32.

  Args: ``policy_logits`` and ``reference_logits`` ``[B, T, V]`` (no gradient into the
  reference), ``mask [B, T]``. Returns ``[B]`` float32 (0 for a row with no masked token).

  Examples:
    pi = (1/2, 1/2), pi_ref = (1/4, 3/4): ``KL = 1/2 log 2 + 1/2 log(2/3) = 0.1438``.

    >>> kl = exact_kl(jnp.zeros((1, 1, 2)), jnp.log(jnp.array([[[1.0, 3.0]]])), jnp.ones((1, 1)))
    >>> [f"{v:.4f}" for v in kl]
    ['0.1438']
  """
  shape = jnp.shape(policy_logits)
  if len(shape) != 3 or jnp.shape(reference_logits) != shape or jnp.shape(mask) != shape[:2]:
    raise ValueError(f"exact_kl: policy logits {shape}, reference logits "
                     f"{jnp.shape(reference_logits)}, mask {jnp.shape(mask)}: expected "
                     "[B, T, V], the same [B, T, V] (same vocabulary) and [B, T]")
  log_p = jax.nn.log_softmax(jnp.asarray(policy_logits, jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(
    jax.lax.stop_gradient(jnp.asarray(reference_logits, jnp.float32)), axis=-1)
  per_token = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return _masked_mean(per_token, jnp.asarray(mask).astype(bool))


def k3_kl(policy_log_probs: jax.Array, reference_log_probs: jax.Array,
          mask: jax.Array) -> jax.Array:
  """Per-example mean over masked actions of Schulman's k3 estimate of ``KL(pi || pi_ref)``,
  ``exp(-x) - 1 + x`` with ``x = log pi(a) - log pi_ref(a)`` of the action taken.

  Sign convention: with ``r = pi_ref(a)/pi(a) = exp(-x)``, ``k3 = (r - 1) - log r``; for actions
  drawn from pi, ``E[r] = 1`` and ``E[-log r] = KL(pi || pi_ref)``, so k3 is an unbiased,
  never-negative estimate of the KL that OREO's policy loss regularises (the same direction as
  `exact_kl`). It is 0 exactly where ``pi(a) = pi_ref(a)``, and its gradient ``1 - exp(-x)``
  pulls x towards 0 from either side. On offline data drawn from another policy it is a biased
  but still non-negative penalty (``exp(x) - 1 - x`` would instead estimate ``KL(pi_ref || pi)``
  from samples of pi_ref). Works for tokens or steps (step log-ratios from `step_log_probs`).

  Args: ``[B, N]`` log-probs of the taken actions and ``mask [B, N]``. Returns ``[B]`` float32.

  Examples:
    >>> kl = k3_kl(jnp.log(jnp.array([[0.5, 0.5]])), jnp.log(jnp.array([[0.25, 0.5]])),
    ...            jnp.ones((1, 2)))
    >>> [f"{v:.4f}" for v in kl]  # x = (log 2, 0): (1/2 - 1 + log 2 + 0) / 2
    ['0.0966']

  References: J. Schulman, "Approximating KL divergence" (2020), the estimator k3.
  """
  check_log_probs("k3_kl", policy_log_probs, reference_log_probs, mask)
  m = jnp.asarray(mask).astype(bool)
  x = jnp.where(m, jnp.asarray(policy_log_probs, jnp.float32)
                - jax.lax.stop_gradient(jnp.asarray(reference_log_probs, jnp.float32)), 0.0)
  return _masked_mean(jnp.exp(-x) - 1.0 + x, m)


def oreo_policy_loss(values: jax.Array, policy_log_probs: jax.Array,
                     reference_log_probs: jax.Array, rewards: jax.Array, mask: jax.Array, *,
                     beta: float = BETA, alpha: float = TOKEN_ALPHA, kl: str = "k3",
                     policy_logits: jax.Array | None = None,
                     reference_logits: jax.Array | None = None,
                     logits_mask: jax.Array | None = None) -> jax.Array:
  """OREO's policy loss ``1/N sum_t (sg[V(s_t)] - R + beta * x_t + sg[beta * sum_{i>t} x_i])^2
  + alpha * KL(pi || pi_ref)``.

  ``x_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)``: the gradient reaches the policy only through
  each action's own log-ratio ``x_t``, the value and the later log-ratios are targets. The KL
  term is ``kl="k3"`` (`k3_kl` of the given per-action log-probs) or ``kl="exact"``
  (`exact_kl` of ``policy_logits`` and ``reference_logits`` ``[B, T, V]`` over ``logits_mask
  [B, T]``, which defaults to ``mask``; for step-level actions pass the token mask). ``alpha =
  0`` drops it.

  Args:
    values, policy_log_probs, reference_log_probs, rewards, mask: as `oreo_value_loss`.
    beta: > 0 (0.03). alpha: >= 0 (`TOKEN_ALPHA` 0.01 for tokens, `STEP_ALPHA` 0.1 for steps).
    kl: "k3" or "exact".
    policy_logits, reference_logits, logits_mask: for ``kl="exact"`` only.

  Returns:
    ``[B]`` float32.

  Examples:
    The value-loss example with V = (0, 0.5) and log-ratios (1, 2): both residuals are
    ``V_t - 1 + 0.5 * (x_t + later)`` = 0.5 again, so without the KL term the loss is 0.25.
    k3 adds ``alpha * mean(e^-1 - 1 + 1, e^-2 - 1 + 2) = 0.1 * 0.7516``.

    >>> lp, ref = jnp.array([[-1.0, -1.0]]), jnp.array([[-2.0, -3.0]])
    >>> args = (jnp.array([[0.0, 0.5]]), lp, ref, jnp.array([1.0]), jnp.array([[1, 1]]))
    >>> oreo_policy_loss(*args, beta=0.5, alpha=0.0)
    Array([0.25], dtype=float32)
    >>> [f"{v:.4f}" for v in oreo_policy_loss(*args, beta=0.5, alpha=0.1)]
    ['0.3252']

  References: Wang et al. (OREO, 2024), the policy objective and its step-level variant.
  """
  beta = check_coefficient("beta", beta)
  alpha = check_coefficient("alpha", alpha, include_minimum=True)
  if kl not in ("k3", "exact"):
    raise ValueError(f"kl = {kl!r}: expected 'k3' or 'exact'")
  has_logits = policy_logits is not None and reference_logits is not None
  if kl == "exact" and alpha > 0 and not has_logits:
    raise ValueError("kl = 'exact' needs policy_logits and reference_logits [B, T, V]")
  _check_inputs("oreo_policy_loss", values, policy_log_probs, reference_log_probs, rewards, mask)
  m, base, x, later = _residual_parts(values, policy_log_probs, reference_log_probs, rewards,
                                      mask)
  residual = jax.lax.stop_gradient(base) + beta * x + beta * jax.lax.stop_gradient(later)
  loss = _masked_mean(jnp.square(residual), m)
  if alpha == 0:
    return loss
  if kl == "k3":
    return loss + alpha * k3_kl(policy_log_probs, reference_log_probs, mask)
  return loss + alpha * exact_kl(policy_logits, reference_logits,
                                 mask if logits_mask is None else logits_mask)
