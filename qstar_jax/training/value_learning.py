"""Value-learning losses for the one train loop: DPO / step-level DPO, OREO, implicit PRM.

Each builder takes the ``graphdef`` of a split `qstar_jax.models.Llama` (``graphdef, params =
nnx.split(model)``, once, outside jit) and returns a pure ``loss_fn(params, batch, rng_key,
extra=None) -> (scalar loss, aux dict of scalars)`` for `qstar_jax.training.train`:

- ``params`` are what is trained (the policy, and for OREO its value model);
- ``extra`` is the frozen reference model's params (pass ``train(..., extra=reference)``): it is
  read under ``stop_gradient`` and never gets a gradient (the train loop differentiates only
  ``params`` anyway). ``extra=None`` reads precomputed reference log-probs from the batch
  instead (`with_reference_log_probs`), which saves the reference forward at every step;
- ``batch`` is a `qstar_jax.data.PairBatch` / `TrajectoryBatch` or a dict with their fields
  (the train loop stacks either). Masks are aligned with the next-token targets ``tokens[:, 1:]``
  of a decoder fed ``tokens[:, :-1]``.

The losses themselves are those of `qstar_jax.losses` (formulas there); this module only runs
the forwards and reduces the per-example values by a batch mean.

OREO's value model (``params = {"policy": Llama state, "value": {"kernel", "bias"}}``, optionally
``"value_trunk": Llama state``):

- without ``"value_trunk"`` the value head reads the policy's own final hidden states (shared
  trunk: one forward, and the layout `qstar_jax.search.steps.PolicyValueParams` and
  `linear_value` use at search time, so trained params plug into the value-guided searches);
- with ``"value_trunk"`` (a second Llama state of the same graphdef, e.g. a copy of the policy's
  weights: `oreo_params`) the head reads that model's hidden states: OREO's own setup, a separate
  value model initialised from the policy.

The value loss and the policy loss are summed in one step. The value loss's log-ratios and the
policy loss's values are targets (``stop_gradient`` in `qstar_jax.losses.oreo`), so with a
separate trunk each loss reaches only its own model: the sum's step is the critic step and the
actor step on disjoint parameters, taken together (global-norm clipping sees both). With the
shared trunk the trunk receives both gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qstar_jax.losses import (
  dpo_loss,
  implicit_prm_loss,
  implied_reward,
  oreo_policy_loss,
  oreo_value_loss,
  step_log_probs,
  token_log_probs,
)
from qstar_jax.losses.dpo import check_coefficient
from qstar_jax.losses.oreo import STEP_ALPHA, TOKEN_ALPHA
from qstar_jax.models.llama import apply, apply_hidden, apply_logits
from qstar_jax.search.steps.step_tree import linear_value

__all__ = [
  "check_reference_vocabulary",
  "dpo_loss_fn",
  "implicit_prm_loss_fn",
  "logits_vocab_size",
  "oreo_loss_fn",
  "oreo_params",
  "reference_log_probs",
  "with_reference_log_probs",
]

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

# Batch fields of the precomputed reference log-probs (`with_reference_log_probs`).
PAIR_REFERENCE_FIELDS = ("reference_chosen_log_probs", "reference_rejected_log_probs")
TRAJECTORY_REFERENCE_FIELD = "reference_log_probs"


def _field(batch: Any, name: str) -> Any:
  return batch[name] if isinstance(batch, Mapping) else getattr(batch, name)


def _as_dict(batch: Any) -> dict[str, Any]:
  if isinstance(batch, Mapping):
    return dict(batch)
  return {k: getattr(batch, k) for k in batch.__dataclass_fields__}


# --------------------------------------------------------------------------- reference model


def logits_vocab_size(graphdef: nnx.GraphDef, params: Any) -> int:
  """The number of logits a split Llama produces per position (abstract evaluation, no FLOPs)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  logits = jax.eval_shape(lambda p, t: apply(graphdef, p, t)[0], params, tokens)
  return int(logits.shape[-1])


def check_reference_vocabulary(graphdef: nnx.GraphDef, policy_params: Any,
                               reference_params: Any, *,
                               reference_graphdef: nnx.GraphDef | None = None) -> int:
  """The shared vocabulary size, or a ValueError naming both sizes when the reference model's
  logits cover another vocabulary than the policy's (log-ratios would compare unrelated tokens).

  Call it on the host before training; the loss functions repeat the check when they trace.
  """
  policy_vocab = logits_vocab_size(graphdef, policy_params)
  reference_vocab = logits_vocab_size(
    graphdef if reference_graphdef is None else reference_graphdef, reference_params)
  _check_vocab(policy_vocab, reference_vocab)
  return policy_vocab


def _check_vocab(policy_vocab: int, reference_vocab: int) -> None:
  if policy_vocab != reference_vocab:
    raise ValueError(f"reference model has a vocabulary of {reference_vocab} tokens, the policy "
                     f"{policy_vocab}: expected the same vocabulary (the same tokenizer)")


def _target_log_probs(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  return token_log_probs(logits, jnp.asarray(tokens, jnp.int32)[:, 1:], jnp.asarray(mask))


def reference_log_probs(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array,
                        mask: jax.Array) -> jax.Array:
  """Per-target log-probs ``[B, W - 1]`` float32 of ``tokens [B, W]`` under a frozen model
  (``stop_gradient``), 0 where ``mask [B, W - 1]`` is False. Traceable (no jit of its own)."""
  logits, _ = apply(graphdef, jax.lax.stop_gradient(params), jnp.asarray(tokens, jnp.int32)[:, :-1])
  return jax.lax.stop_gradient(_target_log_probs(logits, tokens, mask))


def with_reference_log_probs(graphdef: nnx.GraphDef, reference_params: Any,
                             batch: Any) -> dict[str, jax.Array]:
  """``batch`` as a dict with the reference model's log-probs added, so that a loss function
  of this module runs with ``extra=None`` (no reference forward per step).

  Pair batches get ``reference_chosen_log_probs`` / ``reference_rejected_log_probs``,
  trajectory batches ``reference_log_probs`` (each ``[B, W - 1]`` float32).
  """
  out = _as_dict(batch)
  if "chosen_tokens" in out:
    for field, kind in zip(PAIR_REFERENCE_FIELDS, ("chosen", "rejected"), strict=True):
      out[field] = reference_log_probs(graphdef, reference_params, out[f"{kind}_tokens"],
                                       out[f"{kind}_mask"])
  elif "tokens" in out:
    out[TRAJECTORY_REFERENCE_FIELD] = reference_log_probs(graphdef, reference_params,
                                                          out["tokens"], out["mask"])
  else:
    raise ValueError(f"batch fields {sorted(out)}: expected a PairBatch (chosen_tokens, ...) "
                     "or a TrajectoryBatch (tokens, ...)")
  return out


def _reference_logits(graphdef: nnx.GraphDef, extra: Any, tokens: jax.Array,
                      policy_vocab: int) -> jax.Array:
  """The frozen reference's logits ``[B, W - 1, V]`` (no gradient), vocabulary checked."""
  logits, _ = apply(graphdef, jax.lax.stop_gradient(extra), tokens[:, :-1])
  _check_vocab(policy_vocab, logits.shape[-1])
  return jax.lax.stop_gradient(logits)


def _batch_reference(batch: Any, field: str) -> jax.Array:
  """Precomputed reference log-probs from the batch (no gradient), or a ValueError."""
  try:
    value = _field(batch, field)
  except (KeyError, AttributeError):
    raise ValueError(f"no reference model (extra=None) and no {field!r} in the batch: pass "
                     "train(..., extra=reference_params) or precompute with "
                     "with_reference_log_probs") from None
  return jax.lax.stop_gradient(jnp.asarray(value, jnp.float32))


def _reference_or_batch(graphdef: nnx.GraphDef, extra: Any, batch: Any, field: str,
                        tokens: jax.Array, mask: jax.Array, policy_vocab: int) -> jax.Array:
  """Reference log-probs ``[B, W - 1]``: a forward of ``extra``, or ``batch[field]``."""
  if extra is None:
    return _batch_reference(batch, field)
  return _target_log_probs(_reference_logits(graphdef, extra, tokens, policy_vocab), tokens,
                           mask)


# ------------------------------------------------------------------------------------------- DPO


def dpo_loss_fn(graphdef: nnx.GraphDef, *, beta: float, label_smoothing: float = 0.0,
                mean_tokens: bool = False) -> LossFn:
  """DPO / step-level DPO over `PairBatch` batches: ``mean_b dpo_loss(...).loss``.

  ``params``: the policy's Llama state; ``extra``: the frozen reference's (same graphdef), or
  None with precomputed reference log-probs in the batch. Chosen and rejected run in one
  forward of ``2B`` rows. Step-level DPO (Zhai et al.) is ``mean_tokens=True`` on step pairs
  (the context masked out): then ``beta * mean_tokens(log pi - log pi_ref)`` is the step
  Q-value used for Q-guided selection.

  Aux (batch means): ``reward_margin``, ``accuracy`` (margin > 0), ``chosen_reward``,
  ``rejected_reward``.
  """
  beta = check_coefficient("beta", beta)
  eps = check_coefficient("label_smoothing", label_smoothing, maximum=0.5, include_minimum=True)

  def loss_fn(params, batch, rng_key, extra=None):
    del rng_key
    chosen = jnp.asarray(_field(batch, "chosen_tokens"), jnp.int32)
    rejected = jnp.asarray(_field(batch, "rejected_tokens"), jnp.int32)
    chosen_mask, rejected_mask = _field(batch, "chosen_mask"), _field(batch, "rejected_mask")
    if chosen.shape != rejected.shape:
      raise ValueError(f"chosen tokens {chosen.shape} and rejected tokens {rejected.shape}: "
                       "expected one shape [B, W] (pad_pairs gives both one width)")
    both = jnp.concatenate([chosen, rejected])
    both_mask = jnp.concatenate([jnp.asarray(chosen_mask), jnp.asarray(rejected_mask)])
    logits, _ = apply(graphdef, params, both[:, :-1])
    policy = _target_log_probs(logits, both, both_mask)
    if extra is None:
      reference = jnp.concatenate([_batch_reference(batch, f) for f in PAIR_REFERENCE_FIELDS])
    else:
      reference = _target_log_probs(_reference_logits(graphdef, extra, both, logits.shape[-1]),
                                    both, both_mask)
    b = chosen.shape[0]
    out = dpo_loss(policy[:b], reference[:b], chosen_mask, policy[b:], reference[b:],
                   rejected_mask, beta=beta, label_smoothing=eps, mean_tokens=mean_tokens)
    aux = {"reward_margin": out.margin.mean(), "accuracy": out.accuracy.mean(),
           "chosen_reward": out.chosen_reward.mean(),
           "rejected_reward": out.rejected_reward.mean()}
    return out.loss.mean(), aux

  return loss_fn


# ------------------------------------------------------------------------------------------ OREO


def oreo_params(policy_params: Any, value_head: Mapping[str, Any], *,
                separate_value_model: bool = False) -> dict[str, Any]:
  """The trained params of `oreo_loss_fn`: ``{"policy", "value"}``, plus ``"value_trunk"`` (a
  copy of the policy's weights, OREO's initialisation) with ``separate_value_model``.

  ``value_head``: ``{"kernel": [D, 1], "bias": [1]}`` (`qstar_jax.models.ValueHead`'s arrays).
  """
  params = {"policy": policy_params,
            "value": {"kernel": jnp.asarray(value_head["kernel"], jnp.float32),
                      "bias": jnp.asarray(value_head["bias"], jnp.float32)}}
  if separate_value_model:
    params["value_trunk"] = jax.tree.map(jnp.copy, policy_params)
  return params


def _first_token_of_step(step_index: jax.Array) -> jax.Array:
  """``[B, T]`` bool, True at the first position of each step (where the step's state is)."""
  previous = jnp.pad(step_index[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return (step_index >= 0) & (step_index != previous)


def oreo_loss_fn(graphdef: nnx.GraphDef, *, beta: float, alpha: float | None = None,
                 kl: str = "k3", step_level: bool = False,
                 max_steps: int | None = None) -> LossFn:
  """OREO over `TrajectoryBatch` batches: ``mean_b (value_loss + policy_loss)``.

  ``params``: see the module docstring (`oreo_params` builds them); ``extra``: the frozen
  reference's Llama state, or None with ``reference_log_probs`` in the batch (not with
  ``kl="exact"``, which needs the reference's full logits). The outcome reward R of each
  trajectory is ``batch.rewards``.

  Token level: action t is target token t; ``V(s_t)`` is the value head at input position t
  (the hidden state of the prefix ending just before that token). Step level (``step_level``):
  an action is a whole step, its log-prob the sum of its tokens' (`step_log_probs`, steps
  ``0 .. max_steps - 1``; default the token width, always enough), and ``V`` of a step is read
  at its first target position. ``alpha`` defaults to OREO's `TOKEN_ALPHA` / `STEP_ALPHA`; the KL
  is ``"k3"`` on the actions or ``"exact"`` over the vocabulary at every step token.

  Aux (batch means): ``value_loss``, ``policy_loss``, ``value`` (mean V over the actions).
  """
  beta = check_coefficient("beta", beta)
  alpha = (STEP_ALPHA if step_level else TOKEN_ALPHA) if alpha is None else alpha
  alpha = check_coefficient("alpha", alpha, include_minimum=True)
  if kl not in ("k3", "exact"):
    raise ValueError(f"kl = {kl!r}: expected 'k3' or 'exact'")
  if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
    raise ValueError(f"max_steps = {max_steps!r}: expected a positive int or None")

  def loss_fn(params, batch, rng_key, extra=None):
    del rng_key
    if not isinstance(params, Mapping) or not {"policy", "value"} <= set(params):
      raise ValueError("oreo_loss_fn: params must be a dict with 'policy' and 'value' (and "
                       "optionally 'value_trunk'): see oreo_params")
    tokens = jnp.asarray(_field(batch, "tokens"), jnp.int32)
    mask = jnp.asarray(_field(batch, "mask")).astype(bool)
    rewards = jnp.asarray(_field(batch, "rewards"), jnp.float32)
    hidden, _ = apply_hidden(graphdef, params["policy"], tokens[:, :-1])
    logits = apply_logits(graphdef, params["policy"], hidden)
    policy_lp = _target_log_probs(logits, tokens, mask)
    if "value_trunk" in params:
      hidden, _ = apply_hidden(graphdef, params["value_trunk"], tokens[:, :-1])
    values = linear_value(params["value"], hidden)  # [B, W - 1]: V before each target token
    ref_logits = None
    if kl == "exact" and alpha > 0:
      if extra is None:
        raise ValueError("oreo_loss_fn(kl='exact') needs the reference model as extra")
      ref_logits = _reference_logits(graphdef, extra, tokens, logits.shape[-1])
      ref_lp = _target_log_probs(ref_logits, tokens, mask)
    else:
      ref_lp = _reference_or_batch(graphdef, extra, batch, TRAJECTORY_REFERENCE_FIELD, tokens,
                                   mask, logits.shape[-1])
    action_mask = mask
    if step_level:
      step_index = jnp.asarray(_field(batch, "step_index"), jnp.int32)
      num_steps = tokens.shape[1] - 1 if max_steps is None else max_steps
      policy_lp, action_mask = step_log_probs(policy_lp, step_index, num_steps=num_steps)
      ref_lp, _ = step_log_probs(ref_lp, step_index, num_steps=num_steps)
      first = _first_token_of_step(step_index)
      values, _ = step_log_probs(jnp.where(first, values, 0.0), step_index, num_steps=num_steps)
    value_loss = oreo_value_loss(values, policy_lp, ref_lp, rewards, action_mask, beta=beta)
    policy_loss = oreo_policy_loss(values, policy_lp, ref_lp, rewards, action_mask, beta=beta,
                                   alpha=alpha, kl=kl, policy_logits=logits,
                                   reference_logits=ref_logits, logits_mask=mask)
    counted = action_mask.astype(jnp.float32)
    aux = {"value_loss": value_loss.mean(), "policy_loss": policy_loss.mean(),
           "value": (values * counted).sum() / jnp.maximum(counted.sum(), 1.0)}
    return (value_loss + policy_loss).mean(), aux

  return loss_fn


# ---------------------------------------------------------------------------------- implicit PRM


def implicit_prm_loss_fn(graphdef: nnx.GraphDef, *, beta: float) -> LossFn:
  """Implicit PRM (PRIME) over `TrajectoryBatch` batches with outcome labels ``rewards`` in
  [0, 1]: ``mean_b implicit_prm_loss(...)``.

  ``params``: the PRM's Llama state (initialised from the reference); ``extra``: the frozen
  reference's, or None with ``reference_log_probs`` in the batch. After training,
  ``beta * (log pi_psi - log pi_ref)`` per token (`qstar_jax.losses.implicit_process_rewards`)
  are the process rewards.

  Aux (batch means): ``outcome_logit`` (``z = beta * sum_t log pi_psi/pi_ref``), ``accuracy``
  (``z > 0`` agrees with ``label > 0.5``).
  """
  beta = check_coefficient("beta", beta)

  def loss_fn(params, batch, rng_key, extra=None):
    del rng_key
    tokens = jnp.asarray(_field(batch, "tokens"), jnp.int32)
    mask = jnp.asarray(_field(batch, "mask")).astype(bool)
    labels = jnp.asarray(_field(batch, "rewards"), jnp.float32)
    logits, _ = apply(graphdef, params, tokens[:, :-1])
    policy_lp = _target_log_probs(logits, tokens, mask)
    ref_lp = _reference_or_batch(graphdef, extra, batch, TRAJECTORY_REFERENCE_FIELD, tokens,
                                 mask, logits.shape[-1])
    loss = implicit_prm_loss(policy_lp, ref_lp, mask, labels, beta=beta)
    z = jax.lax.stop_gradient(implied_reward(policy_lp, ref_lp, mask, beta=beta))
    aux = {"outcome_logit": z.mean(),
           "accuracy": ((z > 0) == (labels > 0.5)).astype(jnp.float32).mean()}
    return loss.mean(), aux

  return loss_fn
