"""Optimizer factory: AdamW with linear warmup + cosine (or linear/exponential/constant) decay and
clipping.

Learning rate at step t (``warmup_steps = W``, ``total_steps = S``, peak ``lr``, floor
``min_lr_ratio * lr``)::

  t < W:   lr * (t + 1) / W
  cosine:  floor + (lr - floor) * (1 + cos(pi * min(1, (t - W) / (S - W)))) / 2
  linear:  lr - (lr - floor) * min(1, (t - W) / (S - W))
  exponential: lr * min_lr_ratio ** ((t - W) / (S - W))   (the floor at S, still decaying after
           it, as ``optax.exponential_decay``)
  constant: lr

Weight decay applies to parameters with 2 or more dimensions (matrices, embeddings), not to
norm scales and biases. With ``weight_decay=0``, no warmup, ``grad_clip_norm=None`` and the
exponential schedule the update is Adam with ``optax.exponential_decay`` (puzzle training uses
that, see ``training/puzzle.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import optax

__all__ = ["OptimizerConfig", "lr_schedule", "make_optimizer", "decay_mask"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr: float = 3e-4
  warmup_steps: int = 100
  total_steps: int | None = None  # schedule length; None: the run's num_steps (given to make_optimizer)
  schedule: Literal["cosine", "linear", "exponential", "constant"] = "cosine"
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float | None = 1.0   # global-norm clipping; None disables


def lr_schedule(cfg: OptimizerConfig, *, total_steps: int | None = None) -> optax.Schedule:
  """The learning-rate schedule of ``cfg`` (see the module docstring).

  ``total_steps`` is used when ``cfg.total_steps`` is None.
  """
  total = cfg.total_steps if cfg.total_steps is not None else total_steps
  if total is None:
    raise ValueError("OptimizerConfig.total_steps is None: pass total_steps= (the run's steps)")
  if cfg.lr <= 0:
    raise ValueError(f"OptimizerConfig.lr={cfg.lr}: expected > 0")
  if cfg.warmup_steps < 0 or total < 1:
    raise ValueError(
      f"OptimizerConfig warmup_steps={cfg.warmup_steps}, total_steps={total}: "
      "expected warmup_steps >= 0 and total_steps >= 1"
    )
  peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
  warmup = max(cfg.warmup_steps, 0)
  decay_steps = max(total - warmup, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = peak * (t + 1.0) / max(warmup, 1)
    frac = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
    if cfg.schedule == "cosine":
      after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    elif cfg.schedule == "linear":
      after = peak - (peak - floor) * frac
    elif cfg.schedule == "exponential":
      after = peak * jnp.power(cfg.min_lr_ratio, (t - warmup) / decay_steps)
    elif cfg.schedule == "constant":
      after = jnp.asarray(peak, jnp.float32)
    else:
      raise ValueError(f"OptimizerConfig.schedule={cfg.schedule!r}: expected "
                       "cosine/linear/exponential/constant")
    return jnp.where(t < warmup, warm, after)

  return schedule


def decay_mask(params):
  """True for leaves with ndim >= 2 (weight decay applies), False for scales and biases."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
  cfg: OptimizerConfig, *, total_steps: int | None = None
) -> optax.GradientTransformation:
  """``clip_by_global_norm -> adamw(schedule, weight decay on matrices)``."""
  parts = []
  if cfg.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(
    optax.adamw(
      lr_schedule(cfg, total_steps=total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
      mask=decay_mask,
    )
  )
  return optax.chain(*parts)
