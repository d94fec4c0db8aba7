"""Implicit process rewards (PRIME) and value regression to MCTS Q (AlphaMath).

Implicit PRM: a language model pi_psi trained only on outcome labels, by a binary cross-entropy
on its sequence-level implied reward ``beta * sum_t log pi_psi/pi_ref``, yields per-token
process rewards ``r_t = beta * log pi_psi(y_t)/pi_ref(y_t)`` for free. Inputs are per-token
log-probs ``[B, T]`` with a response mask, as in `qstar_jax.losses.dpo` (reference log-probs
precomputed, no gradient into them).

Value regression: a value head's per-step outputs ``[B, S]`` regressed on MCTS Q estimates with
a mean square over the valid steps, optionally through ``tanh`` so values live in ``(-1, 1)``
like rewards of -1/+1. Math is float32; per-example ``[B]`` (or ``[B, T]``) results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.losses.dpo import check_coefficient, check_log_probs, implied_reward

__all__ = ["PRIME_BETA", "implicit_prm_loss", "implicit_process_rewards",
           "value_regression_loss"]

PRIME_BETA = 0.05  # PRIME's implicit-PRM coefficient (its default configuration).


def implicit_process_rewards(policy_log_probs: jax.Array, reference_log_probs: jax.Array,
                             mask: jax.Array, *, beta: float = PRIME_BETA) -> jax.Array:
  """Per-token process rewards ``r_t = beta * (log pi_psi(y_t) - log pi_ref(y_t))``.

  Args: ``[B, T]`` log-probs of the implicit PRM pi_psi and of the reference, ``mask [B, T]``;
  ``beta > 0``. Returns ``[B, T]`` float32, 0 at masked-out tokens. A step's reward is the sum
  over its tokens (`qstar_jax.losses.oreo.step_log_probs` sums them).

  Examples:
    >>> r = implicit_process_rewards(jnp.array([[-1.0, -0.5]]), jnp.array([[-2.0, -0.5]]),
    ...                              jnp.array([[1, 1]]), beta=0.05)
    >>> [f"{v:.4f}" for v in r[0]]
    ['0.0500', '0.0000']

  References: Yuan et al., "Free process rewards without process labels" (2024); Cui et al.,
  "Process reinforcement through implicit rewards" (PRIME, 2025), the implicit process reward.
  """
  beta = check_coefficient("beta", beta)
  check_log_probs("implicit_process_rewards", policy_log_probs, reference_log_probs, mask)
  ratio = (jnp.asarray(policy_log_probs, jnp.float32)
           - jax.lax.stop_gradient(jnp.asarray(reference_log_probs, jnp.float32)))
  return beta * jnp.where(jnp.asarray(mask).astype(bool), ratio, 0.0)


def implicit_prm_loss(policy_log_probs: jax.Array, reference_log_probs: jax.Array,
                      mask: jax.Array, labels: jax.Array, *,
                      beta: float = PRIME_BETA) -> jax.Array:
  """Outcome binary cross-entropy of the implicit PRM, ``z = beta * sum_t m_t log pi_psi/pi_ref``
  ``loss = -(y log sigmoid(z) + (1 - y) log sigmoid(-z))``.

  Args:
    policy_log_probs, reference_log_probs: ``[B, T]`` per-token log-probs.
    mask: ``[B, T]``, True on the response's tokens.
    labels: ``[B]`` outcome, 1 correct and 0 wrong (soft labels in [0, 1] also work).
    beta: > 0 (`PRIME_BETA`, 0.05).

  Returns:
    ``[B]`` float32.

  Examples:
    Log-ratios summing to 20 with beta = 0.05 give ``z = 1``: ``log(1 + e^-1) = 0.3133`` for a
    correct response, ``log(1 + e) = 1.3133`` for a wrong one.

    >>> lp, ref = jnp.array([[-1.0, -1.0]] * 2), jnp.array([[-11.0, -11.0]] * 2)
    >>> m = jnp.ones((2, 2))
    >>> [f"{v:.4f}" for v in implicit_prm_loss(lp, ref, m, jnp.array([1.0, 0.0]), beta=0.05)]
    ['0.3133', '1.3133']

  References: PRIME (Cui et al., 2025), the implicit PRM's cross-entropy on the outcome.
  """
  z = implied_reward(policy_log_probs, reference_log_probs, mask, beta=beta)
  if jnp.shape(labels) != jnp.shape(z):
    raise ValueError(f"implicit_prm_loss: labels have shape {jnp.shape(labels)}: expected "
                     f"{jnp.shape(z)} (one outcome per response)")
  y = jnp.asarray(labels, jnp.float32)
  return -(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))


def value_regression_loss(raw_values: jax.Array, targets: jax.Array, mask: jax.Array, *,
                          tanh_head: bool = True) -> jax.Array:
  """Mean square of the value head against MCTS Q targets over the valid steps,
  ``1/S_b sum_s m_s (v_s - sg[Q_s])^2`` with ``v = tanh(raw)`` (``tanh_head``) or ``v = raw``.

  Args:
    raw_values: ``[B, S]`` the head's outputs before the tanh.
    targets: ``[B, S]`` MCTS Q estimates (in [-1, 1] with a tanh head); no gradient.
    mask: ``[B, S]`` bool or 0/1, True on valid steps; a row with none scores 0.
    tanh_head: squash the outputs with tanh.

  Returns:
    ``[B]`` float32.

  Examples:
    ``tanh(atanh(0.5)) = 0.5`` against 1.0 and ``tanh(0) = 0`` against 0.5: (0.25 + 0.25) / 2.

    >>> raw = jnp.array([[jnp.arctanh(0.5), 0.0, 3.0]])
    >>> [f"{v:.4f}" for v in value_regression_loss(raw, jnp.array([[1.0, 0.5, 9.0]]),
    ...                                             jnp.array([[1, 1, 0]]))]
    ['0.2500']

  References: Chen et al., "AlphaMath almost zero: process supervision without process"
  (2024), the value head's MSE to the MCTS Q estimates.
  """
  shapes = (jnp.shape(raw_values), jnp.shape(targets), jnp.shape(mask))
  if len(shapes[0]) != 2 or len(set(shapes)) != 1:
    raise ValueError(f"value_regression_loss: raw values, targets and mask have shapes "
                     f"{shapes}: expected one shape [B, S]")
  v = jnp.asarray(raw_values, jnp.float32)
  if tanh_head:
    v = jnp.tanh(v)
  m = jnp.asarray(mask).astype(bool)
  err = jnp.where(m, v - jax.lax.stop_gradient(jnp.asarray(targets, jnp.float32)), 0.0)
  return jnp.square(err).sum(axis=-1) / jnp.maximum(m.astype(jnp.float32).sum(axis=-1), 1.0)
