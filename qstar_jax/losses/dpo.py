"""DPO and step-level DPO through one function, and the implied reward / step Q-value.

Inputs are per-token log-probabilities ``[B, T]`` (`qstar_jax.losses.token_log_probs` of the
policy being trained and of the frozen reference model, the latter precomputed) with a mask
``[B, T]`` (bool or 0/1) that is True on the tokens of the response (whole answer for DPO, one
step for step-level DPO) and False on the prompt, the history and padding. Chosen and rejected
may have different lengths. Reference log-probs get no gradient (``stop_gradient``): the
reference model is frozen. Math is float32; functions return per-example ``[B]`` values and
the caller reduces over the batch.

The log-ratio of a response is reduced over its masked tokens by a sum (``mean_tokens=False``:
the log-ratio of the whole sequence, DPO) or by a mean (``mean_tokens=True``: the step-level
Q-value model of Zhai et al., which scores a step by its mean token log-ratio, so long and short
steps compare on one scale).

The validation helpers `check_coefficient` and `check_log_probs` are shared with
`qstar_jax.losses.oreo` and `qstar_jax.losses.prm`; they run on the host, before any tracing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["DPOLoss", "dpo_loss", "implied_reward"]


def check_coefficient(name: str, value: float, *, minimum: float = 0.0,
                      maximum: float = math.inf, include_minimum: bool = False) -> float:
  """``float(value)`` if it is a finite number in the interval, else a ValueError naming it.

  The interval is ``(minimum, maximum)`` or ``[minimum, maximum)`` with ``include_minimum``.
  Coefficients are static hyperparameters: a traced value (inside ``jit``) is a TypeError.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} is a traced array: expected a static Python number (pass it "
                    "outside jit or mark it static)")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} = {value!r}: expected a real number") from None
  above = number >= minimum if include_minimum else number > minimum
  if not (math.isfinite(number) and above and number < maximum):
    low = "[" if include_minimum else "("
    raise ValueError(f"{name} = {value!r}: expected a finite number in "
                     f"{low}{minimum:g}, {maximum:g})")
  return number


def check_log_probs(name: str, policy: jax.Array, reference: jax.Array,
                    mask: jax.Array) -> None:
  """Raise a ValueError unless policy and reference log-probs and mask share one ``[B, N]``."""
  shapes = {"policy": jnp.shape(policy), "reference": jnp.shape(reference),
            "mask": jnp.shape(mask)}
  if len(shapes["policy"]) != 2 or len(set(shapes.values())) != 1:
    raise ValueError(f"{name}: log-prob and mask shapes {shapes}: expected one shape [B, N]")


def _masked_log_ratio(policy: jax.Array, reference: jax.Array, mask: jax.Array) -> jax.Array:
  """``m_t * (log pi - sg[log pi_ref])``, ``[B, T]`` float32; `where`, so -inf padding is safe."""
  ratio = (jnp.asarray(policy, jnp.float32)
           - jax.lax.stop_gradient(jnp.asarray(reference, jnp.float32)))
  return jnp.where(jnp.asarray(mask).astype(bool), ratio, 0.0)


def _reduce(per_token: jax.Array, mask: jax.Array, mean_tokens: bool) -> jax.Array:
  total = per_token.sum(axis=-1)
  if not mean_tokens:
    return total
  count = jnp.asarray(mask).astype(jnp.float32).sum(axis=-1)
  return total / jnp.maximum(count, 1.0)


def implied_reward(policy_log_probs: jax.Array, reference_log_probs: jax.Array,
                   mask: jax.Array, *, beta: float = 0.1, mean_tokens: bool = False) -> jax.Array:
  """The reward (or step Q-value) a DPO-trained policy implies, ``beta * reduce_t(log pi -
  log pi_ref)``.

  ``reduce`` is the sum over masked tokens (DPO's implicit reward, PRIME's outcome logit) or,
  with ``mean_tokens``, their mean (Zhai et al.'s ``Q(h, a) = beta * mean_tokens(log pi -
  log pi_ref)``, the score for Q-guided selection among K candidate steps). A row with no masked
  token scores 0.

  Args:
    policy_log_probs: ``[B, T]`` per-token log pi.
    reference_log_probs: ``[B, T]`` per-token log pi_ref (no gradient flows into it).
    mask: ``[B, T]`` bool or 0/1, True on the response's (step's) tokens.
    beta: the KL coefficient, > 0.
    mean_tokens: mean instead of sum over the masked tokens.

  Returns:
    ``[B]`` float32.

  Examples:
    Token log-ratios (0.5, -0.1, 2.0), the last masked out; beta = 0.1:

    >>> lp, ref = jnp.array([[-1.0, -2.1, 0.0]]), jnp.array([[-1.5, -2.0, -2.0]])
    >>> m = jnp.array([[1, 1, 0]])
    >>> [f"{v:.4f}" for v in implied_reward(lp, ref, m, beta=0.1)]  # 0.1 * (0.5 - 0.1)
    ['0.0400']
    >>> [f"{v:.4f}" for v in implied_reward(lp, ref, m, beta=0.1, mean_tokens=True)]
    ['0.0200']

  References: Rafailov et al., "Direct preference optimization" (2023), eq. 5; Zhai et al.,
  "Enhancing decision-making for LLM agents via step-level Q-value models" (2024), the
  Q-value model and Q-guided action selection.
  """
  beta = check_coefficient("beta", beta)
  check_log_probs("implied_reward", policy_log_probs, reference_log_probs, mask)
  per_token = _masked_log_ratio(policy_log_probs, reference_log_probs, mask)
  return beta * _reduce(per_token, mask, mean_tokens)


@struct.dataclass
class DPOLoss:
  """Per-pair DPO loss and its metrics."""
  loss: jax.Array             # [B] float32, per pair; the caller averages
  chosen_reward: jax.Array    # [B] float32, implied reward of the chosen response (no gradient)
  rejected_reward: jax.Array  # [B] float32, implied reward of the rejected response (no grad)
  margin: jax.Array           # [B] float32, chosen_reward - rejected_reward (no gradient)
  accuracy: jax.Array         # [B] float32, 1.0 where margin > 0, else 0.0


def dpo_loss(policy_chosen_log_probs: jax.Array, reference_chosen_log_probs: jax.Array,
             chosen_mask: jax.Array, policy_rejected_log_probs: jax.Array,
             reference_rejected_log_probs: jax.Array, rejected_mask: jax.Array, *,
             beta: float = 0.1, label_smoothing: float = 0.0,
             mean_tokens: bool = False) -> DPOLoss:
  """DPO / step-level DPO loss of each preference pair (chosen w, rejected l).

  ``h = beta * [reduce(log pi(w) - log pi_ref(w)) - reduce(log pi(l) - log pi_ref(l))]``
  ``loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)``

  ``reduce`` sums over the masked tokens (DPO; step-level DPO in the form of Zhai et al., where
  w and l are sibling steps after the same history) or averages them (``mean_tokens``, the
  scale of the step Q-values used at selection time); ``eps = label_smoothing`` is conservative
  DPO's probability that a label is flipped (``eps = 0``: plain DPO). Identical chosen and
  rejected give ``h = 0``, the loss ``log 2`` and no gradient.

  Args:
    policy_chosen_log_probs, reference_chosen_log_probs: ``[B, Tw]`` per-token log-probs.
    chosen_mask: ``[B, Tw]``, True on the chosen response's (step's) tokens.
    policy_rejected_log_probs, reference_rejected_log_probs: ``[B, Tl]``.
    rejected_mask: ``[B, Tl]``.
    beta: > 0 (0.1 in DPO; 0.05-0.1 for step-level Q-models).
    label_smoothing: ``eps`` in ``[0, 0.5)``.
    mean_tokens: reduce the log-ratio by a mean over tokens instead of a sum.

  Returns:
    `DPOLoss` with ``[B]`` fields.

  Examples:
    One pair whose chosen log-ratio is +1 and rejected -1, beta = 0.5: ``h = 1``,
    ``loss = log(1 + e^-1)``; with ``eps = 0.1`` add ``0.1 * (log(1 + e) - log(1 + e^-1)) = 0.1``.

    >>> w, l = jnp.array([[-1.0]]), jnp.array([[-3.0]])
    >>> ref, m = jnp.array([[-2.0]]), jnp.array([[True]])
    >>> out = dpo_loss(w, ref, m, l, ref, m, beta=0.5)
    >>> [f"{v:.4f}" for v in (out.loss[0], out.margin[0], out.accuracy[0])]
    ['0.3133', '1.0000', '1.0000']
    >>> [f"{v:.4f}" for v in dpo_loss(w, ref, m, l, ref, m, beta=0.5, label_smoothing=0.1).loss]
    ['0.4133']

  References: Rafailov et al., "Direct preference optimization" (2023), eq. 7; Mitchell, "A note
  on DPO with noisy preferences" (2023, conservative DPO); Zhai et al. (2024), step-level DPO.
  """
  beta = check_coefficient("beta", beta)
  eps = check_coefficient("label_smoothing", label_smoothing, maximum=0.5, include_minimum=True)
  check_log_probs("dpo_loss (chosen)", policy_chosen_log_probs, reference_chosen_log_probs,
                  chosen_mask)
  check_log_probs("dpo_loss (rejected)", policy_rejected_log_probs,
                  reference_rejected_log_probs, rejected_mask)
  if jnp.shape(chosen_mask)[0] != jnp.shape(rejected_mask)[0]:
    raise ValueError(f"dpo_loss: {jnp.shape(chosen_mask)[0]} chosen and "
                     f"{jnp.shape(rejected_mask)[0]} rejected responses: expected one per pair")
  chosen = beta * _reduce(_masked_log_ratio(policy_chosen_log_probs, reference_chosen_log_probs,
                                            chosen_mask), chosen_mask, mean_tokens)
  rejected = beta * _reduce(_masked_log_ratio(policy_rejected_log_probs,
                                              reference_rejected_log_probs, rejected_mask),
                            rejected_mask, mean_tokens)
  h = chosen - rejected
  loss = -(1.0 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)
  margin = jax.lax.stop_gradient(h)
  return DPOLoss(loss=loss, chosen_reward=jax.lax.stop_gradient(chosen),
                 rejected_reward=jax.lax.stop_gradient(rejected), margin=margin,
                 accuracy=(margin > 0).astype(jnp.float32))
