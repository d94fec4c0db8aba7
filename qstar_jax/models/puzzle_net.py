"""DeepCubeA-style residual MLP over one-hot puzzle states, with a value or a per-action Q head.

Architecture (Agostinelli et al. 2019, DeepCubeA): one-hot input -> Dense(hidden_1) -> ReLU ->
Dense(hidden_2) -> ReLU -> ``num_blocks`` residual blocks ``x + Dense(ReLU(Dense(x)))`` followed by
ReLU -> Dense(num_outputs). The paper uses batch norm after each dense layer; here layer norm
(per-example, so ``apply`` is a pure function of params and states, identical in training and in
search) takes its place. Paper size: hidden 5000 / 1000, 4 blocks.

``num_outputs = 1`` is a value network V(s) (A*'s heuristic); ``num_outputs = A`` a Q network
q(s, .) over all actions (Q*'s edge priorities).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class PuzzleNetConfig:
  input_dim: int = 324  # state_dim * one-hot symbols (cube: 54 * 6 colours)
  num_outputs: int = 1  # 1 = value head; num_actions = Q head
  hidden_1: int = 5000
  hidden_2: int = 1000
  num_blocks: int = 4
  layer_norm: bool = True

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> PuzzleNetConfig:
    return cls(**d)


class _Block(nnx.Module):
  def __init__(self, width: int, layer_norm: bool, *, rngs: nnx.Rngs):
    self.dense_1 = nnx.Linear(width, width, rngs=rngs)
    self.dense_2 = nnx.Linear(width, width, rngs=rngs)
    self.norm_1 = nnx.LayerNorm(width, rngs=rngs) if layer_norm else None
    self.norm_2 = nnx.LayerNorm(width, rngs=rngs) if layer_norm else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.dense_1(x)
    y = jax.nn.relu(self.norm_1(y) if self.norm_1 is not None else y)
    y = self.dense_2(y)
    y = self.norm_2(y) if self.norm_2 is not None else y
    return jax.nn.relu(x + y)


class PuzzleNet(nnx.Module):
  """Residual MLP: one-hot states [..., input_dim] -> [..., num_outputs] (squeezed for V)."""

  def __init__(self, config: PuzzleNetConfig, *, rngs: nnx.Rngs):
    c = config
    if min(c.input_dim, c.num_outputs, c.hidden_1, c.hidden_2) <= 0 or c.num_blocks < 0:
      raise ValueError(f"PuzzleNetConfig sizes must be positive, got {c}")
    self.config = config
    self.dense_1 = nnx.Linear(c.input_dim, c.hidden_1, rngs=rngs)
    self.dense_2 = nnx.Linear(c.hidden_1, c.hidden_2, rngs=rngs)
    self.norm_1 = nnx.LayerNorm(c.hidden_1, rngs=rngs) if c.layer_norm else None
    self.norm_2 = nnx.LayerNorm(c.hidden_2, rngs=rngs) if c.layer_norm else None
    self.blocks = nnx.List([_Block(c.hidden_2, c.layer_norm, rngs=rngs)
                            for _ in range(c.num_blocks)])
    self.head = nnx.Linear(c.hidden_2, c.num_outputs, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.dense_1(x)
    y = jax.nn.relu(self.norm_1(y) if self.norm_1 is not None else y)
    y = self.dense_2(y)
    y = jax.nn.relu(self.norm_2(y) if self.norm_2 is not None else y)
    for block in self.blocks:
      y = block(y)
    out = self.head(y).astype(jnp.float32)
    return out[..., 0] if self.config.num_outputs == 1 else out


def puzzle_net_apply_fn(graphdef: nnx.GraphDef, env) -> Any:
  """A pure ``apply(params, states [K, D]) -> V [K] or q [K, A]`` for the searches.

  Build it once per (graphdef, env) and reuse the returned function (the searches' jit caches on
  its identity).
  """

  def apply(params, states: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(env.encode(states))

  return apply
