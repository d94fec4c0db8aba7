"""Value / Q heads and the policy-value model used by value learning and search."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.llama import Llama, from_flat_params, get_flat_params


class ValueHead(nnx.Module):
  """A scalar per position: v = w . h + b, optionally squashed to (-1, 1) by tanh.

  Parameters: `kernel` [D, 1], `bias` [1], both float32 (the head is tiny and its output is a
  regression target, so it stays full precision whatever the trunk's dtype).
  """

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, use_tanh: bool = False,
               init_scale: float = 0.0):
    # Zero init by default: a fresh head predicts 0 and does not disturb early training.
    self.kernel = nnx.Param(init_scale * jax.random.normal(rngs.params(), (hidden_size, 1),
                                                           jnp.float32))
    self.bias = nnx.Param(jnp.zeros((1,), jnp.float32))
    self.use_tanh = use_tanh

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> values [...] float32."""
    v = jnp.einsum("...d,do->...o", hidden.astype(jnp.float32), self.kernel[...])[..., 0]
    v = v + self.bias[...][0]
    return jnp.tanh(v) if self.use_tanh else v


class PolicyValue(nnx.Module):
  """A policy LM with a value head.

  `shared_trunk=True`: the head reads the policy's final hidden states (one trunk, one forward).
  `shared_trunk=False`: a separate value transformer (OREO's setup), initialised from the
  policy's weights when `policy` is given, with the head on its final hidden states.

  `model(tokens [B, T])` -> (logits [B, T, V] float32, values [B, T] float32).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, shared_trunk: bool = True,
               value_tanh: bool = False, policy: Llama | None = None):
    if policy is not None and policy.config != config:
      raise ValueError("PolicyValue: the given policy's config differs from `config`: "
                       f"{policy.config} vs {config}")
    self.config = config
    self.shared_trunk = shared_trunk
    self.policy = policy if policy is not None else Llama(config, rngs=rngs)
    if shared_trunk:
      self.value_model = None
    else:
      # A copy of the policy's weights (no random init to throw away).
      self.value_model = from_flat_params(config, get_flat_params(self.policy))
    self.value_head = ValueHead(config.hidden_size, rngs=rngs, use_tanh=value_tanh)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    hidden, _ = self.policy.hidden_states(tokens)
    logits = self.policy.logits(hidden)
    return logits, self.values(tokens, policy_hidden=hidden)

  def values(self, tokens: jax.Array, *, policy_hidden: jax.Array | None = None) -> jax.Array:
    """values [B, T] float32 of every prefix tokens[:, :t+1]."""
    if self.value_model is None:
      if policy_hidden is None:
        policy_hidden, _ = self.policy.hidden_states(tokens)
      return self.value_head(policy_hidden)
    hidden, _ = self.value_model.hidden_states(tokens)
    return self.value_head(hidden)


def policy_value_apply(graphdef: nnx.GraphDef, params: Any,
                       tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pure forward of a split PolicyValue: (logits [B, T, V] float32, values [B, T] float32)."""
  return nnx.merge(graphdef, params)(tokens)


def value_apply(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array) -> jax.Array:
  """Pure value forward of a split PolicyValue: values [B, T] float32 (skips the LM head)."""
  return nnx.merge(graphdef, params).values(tokens)
