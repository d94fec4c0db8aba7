"""Next-token log-likelihoods of a language model's logits: pure array functions, no model.

Shapes: logits ``[B, T, V]`` where position ``t`` scores the token ``targets[:, t]``; for a
decoder fed ``tokens[:, :-1]`` that is ``targets = tokens[:, 1:]``. ``mask [B, T]`` (bool or
0/1) selects the positions that count: False for prompt tokens and padding. ``log_softmax`` is
computed in float32 whatever the logits' dtype (a bfloat16 softmax over a large vocabulary loses
about two decimal digits). Every function returns per-token ``[B, T]`` or per-example ``[B]``
values; the caller reduces over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mean_token_nll", "sequence_log_probs", "token_log_probs", "token_nll"]


def _check_shapes(logits: jax.Array, targets: jax.Array, mask: jax.Array | None) -> None:
  if logits.ndim < 2 or targets.shape != logits.shape[:-1]:
    raise ValueError(f"targets have shape {targets.shape}, logits {logits.shape}: expected "
                     "targets [B, T] and logits [B, T, V]")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets have dtype {targets.dtype}: expected integer token ids")
  if mask is not None and mask.shape != targets.shape:
    raise ValueError(f"mask has shape {mask.shape}: expected the targets' shape {targets.shape}")


def token_log_probs(logits: jax.Array, targets: jax.Array,
                    mask: jax.Array | None = None) -> jax.Array:
  """Log-probability of each target token, ``log pi(y_t | y_<t) = log_softmax(z_t)[y_t]``.

  ``log_softmax(z)[y] = z_y - max(z) - log sum_v exp(z_v - max(z))``, in float32.

  Args:
    logits: ``[B, T, V]`` next-token logits ``z`` (any float dtype).
    targets: ``[B, T]`` integer token ids ``y`` in ``[0, V)``.
    mask: optional ``[B, T]``; positions where it is False (0) are set to 0.

  Returns:
    ``[B, T]`` float32 log-probabilities (<= 0), 0 at masked-out positions.

  Examples:
    Logits (0, ln 3) over a vocabulary of two: p = (1/4, 3/4).

    >>> z = jnp.log(jnp.array([[[1.0, 3.0], [1.0, 3.0]]]))
    >>> jnp.round(jnp.exp(token_log_probs(z, jnp.array([[1, 0]]))), 4)
    Array([[0.75, 0.25]], dtype=float32)
    >>> token_log_probs(z, jnp.array([[1, 0]]), mask=jnp.array([[True, False]]))[0, 1]
    Array(0., dtype=float32)
  """
  _check_shapes(logits, targets, mask)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if mask is None:
    return picked
  # `where`, not a product: a masked-out position may hold -inf (a banned token), and
  # -inf * 0 is NaN.
  return jnp.where(mask.astype(bool), picked, 0.0)


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Per-token negative log-likelihood (cross-entropy), ``-log_softmax(z_t)[y_t]``, float32.

  Args and shapes as in `token_log_probs`; returns ``[B, T]`` (>= 0), 0 at masked-out positions.

  Examples:
    Uniform logits over a vocabulary of four cost ln 4 nats per token:

    >>> token_nll(jnp.zeros((1, 2, 4)), jnp.array([[3, 0]]))
    Array([[1.3862944, 1.3862944]], dtype=float32)

  References: the language-modelling objective of Radford et al., "Improving language
  understanding by generative pre-training" (2018), eq. 1.
  """
  return -token_log_probs(logits, targets, mask)


def sequence_log_probs(logits: jax.Array, targets: jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
  """Log-probability of each example's (masked) continuation, ``sum_t m_t log pi(y_t | y_<t)``.

  The sequence score of DPO-style losses (the prompt masked out). Returns ``[B]`` float32.

  Examples:
    Two tokens at p = 3/4 and p = 1/4, the second masked out: log(3/4).

    >>> z = jnp.log(jnp.array([[[1.0, 3.0], [1.0, 3.0]]]))
    >>> [f"{v:.4f}" for v in sequence_log_probs(z, jnp.array([[1, 0]]), mask=jnp.array([[1, 0]]))]
    ['-0.2877']
  """
  return token_log_probs(logits, targets, mask).sum(axis=-1)


def mean_token_nll(logits: jax.Array, targets: jax.Array,
                   mask: jax.Array | None = None) -> jax.Array:
  """Mean negative log-likelihood per example over its counted tokens (nats/token).

  ``L_b = -(sum_t m_bt log pi(y_bt | y_b,<t)) / max(1, sum_t m_bt)``: an example with no counted
  token gives 0. Without a mask every position counts (``mean_t``). Returns ``[B]`` float32.

  Examples:
    >>> z = jnp.log(jnp.array([[[1.0, 3.0], [1.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]]))
    >>> y = jnp.array([[1, 0], [0, 0]])
    >>> [f"{v:.4f}" for v in mean_token_nll(z, y)]  # (ln 4/3 + ln 4) / 2 and ln 2
    ['0.8370', '0.6931']
    >>> [f"{v:.4f}" for v in mean_token_nll(z, y, mask=jnp.array([[1, 0], [0, 0]]))]
    ['0.2877', '0.0000']
  """
  nll = token_nll(logits, targets, mask)
  if mask is None:
    return nll.mean(axis=-1)
  count = jnp.maximum(mask.astype(jnp.float32).sum(axis=-1), 1.0)
  return nll.sum(axis=-1) / count
