"""Language-model training on token windows: the next-token loss of a Llama graphdef and
per-window evaluation (the QuEST scaling runs built on them: `training.quest_runs`).

A window is a row of ``pack_tokens``: ``[T + 1]`` token ids; the model reads ``w[:T]`` and is
scored on ``w[1:]``. The losses themselves are `qstar_jax.losses.lm`; this module applies the
model and reduces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qstar_jax.losses.lm import mean_token_nll, token_nll
from qstar_jax.models.llama import apply

__all__ = ["lm_loss_fn", "window_mean_nll", "window_token_nll"]

# ------------------------------------------------------------------------- next-token loss


def window_token_nll(graphdef: nnx.GraphDef, *,
                     remat: bool = False) -> Callable[[Any, jax.Array], jax.Array]:
  """``fn(params, windows [B, T + 1] int) -> [B, T]`` float32 next-token losses
  ``-log softmax(f(w[:, :T]))[t, w[:, t + 1]]`` of the Llama model ``graphdef`` (``remat``: each
  block rematerialised in the backward pass, same values, less activation memory)."""

  def nll(params: Any, windows: jax.Array) -> jax.Array:
    logits, _ = apply(graphdef, params, windows[:, :-1], remat=remat)
    return token_nll(logits, windows[:, 1:])

  return nll


def lm_loss_fn(graphdef: nnx.GraphDef, *,
               remat: bool = False) -> Callable[..., tuple[jax.Array, dict]]:
  """The train loop's loss over windows: ``fn(params, windows [B, T + 1], rng_key=None) ->
  (L, {})`` with the mean next-token cross-entropy ``L = -1/(B T) sum_{b,t} log
  softmax(f(w[b, :T]))[t, w[b, t + 1]]`` (float32, nats/token). ``remat``: see
  :func:`window_token_nll`."""
  nll = window_token_nll(graphdef, remat=remat)

  def loss_fn(params: Any, batch: jax.Array, rng_key: jax.Array | None = None):
    del rng_key
    return nll(params, batch).mean(), {}

  return loss_fn


def window_mean_nll(graphdef: nnx.GraphDef, params: Any, windows: np.ndarray, *,
                    batch_size: int = 32) -> np.ndarray:
  """Mean next-token loss of each window ``[N, T + 1]``: float64 ``[N]`` (nats/token), evaluated
  ``batch_size`` windows per jitted call."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")

  def per_window(p: Any, batch: jax.Array) -> jax.Array:
    logits, _ = apply(graphdef, p, batch[:, :-1])
    return mean_token_nll(logits, batch[:, 1:])

  per_window = jax.jit(per_window)
  parts = [np.asarray(per_window(params, jnp.asarray(windows[i:i + batch_size])))
           for i in range(0, len(windows), batch_size)]
  return np.concatenate(parts).astype(np.float64)
