"""Training puzzle heuristics: deep approximate value iteration (V, for A*) and deep Q-learning
(Q, for Q*), on backward scrambles of the goal.

Every step draws ``batch_size`` states scrambled ``1..max_scramble_depth`` random base moves from
the goal and regresses the network onto Bellman targets computed with a frozen target network:
``V``: ``y = min_a [c(a) + V_target(next(s, a))]``; ``Q``: ``y(s, a) = c(a) +
min_a' q_target(next(s, a), a')`` (0 beyond a goal; see ``qstar_jax.losses.dqn``). For large action
spaces (the cube's 1,884 actions) each state gets targets for ``sampled_actions`` uniformly drawn
actions only (one target-network call per (state, action)), the other outputs get no gradient.
The target network is refreshed with the online one when the mean loss of the last
``target_check_every`` steps falls below ``target_loss_threshold``, or after
``target_update_every`` steps, whichever comes first (DeepCubeA's rule plus a cap).

Training runs on the one train loop (``training/train_loop.py``): steps run
``target_check_every`` at a time in one jitted ``lax.scan``, the target network rides in the
loop state's ``extra`` and its refresh is the loop's ``on_step`` hook; resume, metrics, progress
and checkpoints are the loop's. The data of step ``t`` is a function of ``(seed, t)`` only, so a
resumed run reproduces an uninterrupted one.

On a device mesh (``train_puzzle(cfg, mesh=...)``; the experiment's ``mesh`` key) the network,
its Adam moments and the target network are placed by the puzzle rules of
`qstar_jax.distributed` (hidden dims over ``fsdp`` / ``tensor``), and the scrambled states of
each step, drawn inside the jitted step, are split over ``data`` x ``fsdp`` (``batch_size`` must
divide over them): every device scrambles and evaluates its share of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qstar_jax.distributed import RuntimeConfig, batch_spec, is_main_process
from qstar_jax.envs import make_env
from qstar_jax.envs.puzzle import PuzzleEnv
from qstar_jax.losses.dqn import (
  q_learning_targets,
  q_targets_from_value,
  squared_td_error,
  value_iteration_targets,
)
from qstar_jax.models.params import count_params
from qstar_jax.models.puzzle_net import PuzzleNet, PuzzleNetConfig
from qstar_jax.training.checkpoint import load_model, save_model
from qstar_jax.training.config import config_to_dict
from qstar_jax.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from qstar_jax.training.run_setup import check_batch_sizes, host_local, mesh_ignore_keys
from qstar_jax.training.train_loop import TrainLoopConfig, TrainState, train


@dataclasses.dataclass(frozen=True)
class NetSizes:
  hidden_1: int = 5000
  hidden_2: int = 1000
  num_blocks: int = 4
  layer_norm: bool = True


@dataclasses.dataclass(frozen=True)
class PuzzleTrainConfig:
  domain: str = "puzzle15"  # cube3 | puzzle8 | puzzle15 | puzzle24
  actions: int = 0  # 0: the domain's base moves; cube3: 12 or 1884
  head: str = "value"  # value (V for A*) | q (per-action Q for Q*)
  net: NetSizes = NetSizes()
  batch_size: int = 1000
  max_scramble_depth: int = 30
  steps: int = 10_000
  learning_rate: float = 1e-3
  lr_decay_rate: float = 0.1  # multiplied into the learning rate over ``steps`` (exponential)
  sampled_actions: int = 0  # Q head: actions with a target per state; 0 = all
  # Q head: "" = deep Q-learning (bootstrap on min_a' q_target); a path to a trained value
  # network (train_puzzle head=value, its out/model) = targets c(a) + V(next) from that network.
  value_target: str = ""
  target_update_every: int = 1000
  target_loss_threshold: float = 0.05
  target_check_every: int = 50
  checkpoint_every: int = 500
  max_seconds: float = 0.0  # > 0: stop (checkpoint + export) after this much wall time
  seed: int = 0
  out: str = ""
  # Where it runs (may change on resume): "" = all devices on data, else e.g. "fsdp=8".
  mesh: str = ""
  runtime: RuntimeConfig = RuntimeConfig()


def env_for(cfg: PuzzleTrainConfig) -> PuzzleEnv:
  return make_env(cfg.domain, cfg.actions or None)


def net_config_for(cfg: PuzzleTrainConfig, env: PuzzleEnv) -> PuzzleNetConfig:
  if cfg.head not in ("value", "q"):
    raise ValueError(f"head must be 'value' or 'q', got {cfg.head!r}")
  return PuzzleNetConfig(input_dim=env.input_dim,
                         num_outputs=1 if cfg.head == "value" else env.num_actions,
                         hidden_1=cfg.net.hidden_1, hidden_2=cfg.net.hidden_2,
                         num_blocks=cfg.net.num_blocks, layer_norm=cfg.net.layer_norm)


def _check(cfg: PuzzleTrainConfig, env: PuzzleEnv) -> None:
  for name in ("batch_size", "max_scramble_depth", "steps", "target_check_every",
               "target_update_every", "checkpoint_every"):
    if getattr(cfg, name) <= 0:
      raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
  if cfg.sampled_actions < 0 or cfg.sampled_actions > env.num_actions:
    raise ValueError(f"sampled_actions must be in 0..{env.num_actions}, got {cfg.sampled_actions}")
  if not cfg.out:
    raise ValueError("out=DIR is required")


def optimizer_config(cfg: PuzzleTrainConfig) -> OptimizerConfig:
  """Adam (no weight decay, no clipping) with ``lr * lr_decay_rate ** (t / steps)``."""
  return OptimizerConfig(lr=cfg.learning_rate, warmup_steps=0, total_steps=cfg.steps,
                         schedule="exponential", min_lr_ratio=cfg.lr_decay_rate, weight_decay=0.0,
                         b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=None)


def make_loss_fn(cfg: PuzzleTrainConfig, env: PuzzleEnv, graphdef: nnx.GraphDef, *,
                 mesh: Mesh | None = None):
  """``loss(params, batch, rng_key, extra) -> (mean squared Bellman error, {})`` for the loop.

  ``batch`` is unused (None): the states are scrambled from ``rng_key``; ``extra`` holds the
  target network (``extra["target_params"]``). With ``mesh`` the states are constrained to the
  batch sharding (split over ``data`` x ``fsdp``), so each device works on its rows.
  """
  apply = lambda params, states: nnx.merge(graphdef, params)(env.encode(states))  # noqa: E731
  if cfg.value_target:
    if cfg.head != "q":
      raise ValueError("value_target is only used with head=q")
    v_model = load_puzzle_net(cfg.value_target)
    if v_model.config.num_outputs != 1 or v_model.config.input_dim != env.input_dim:
      raise ValueError(f"value_target {cfg.value_target} is not a value network for {env.name} "
                       f"(config {v_model.config})")
    v_graphdef, v_params = nnx.split(v_model)
    v_apply = lambda params, states: nnx.merge(v_graphdef, params)(env.encode(states))  # noqa: E731
  num_actions = env.num_actions
  m = cfg.sampled_actions or num_actions

  def bellman_error(params, target_params, key):
    key_s, key_a = jax.random.split(key)
    states, _ = env.scramble(key_s, num_states=cfg.batch_size, max_depth=cfg.max_scramble_depth)
    if mesh is not None:
      states = jax.lax.with_sharding_constraint(
        states, NamedSharding(mesh, batch_spec(states.ndim)))
    if cfg.head == "value":
      y = value_iteration_targets(target_params, states, env=env, value_fn=apply)
      return jnp.mean(squared_td_error(apply(params, states), y))
    if m == num_actions:
      actions = jnp.broadcast_to(jnp.arange(num_actions), (cfg.batch_size, num_actions))
    else:
      actions = jax.random.randint(key_a, (cfg.batch_size, m), 0, num_actions)
    if cfg.value_target:
      y = q_targets_from_value(v_params, states, actions, env=env, value_fn=v_apply)
    else:
      y = q_learning_targets(target_params, states, actions, env=env, q_fn=apply)
    q = jnp.take_along_axis(apply(params, states), actions, axis=1)
    # A move off the n-puzzle board is a self-loop whose target would bootstrap on itself: skip.
    valid = jnp.take_along_axis(env.valid_action_mask(states), actions, axis=1)
    err = squared_td_error(q, y)
    return jnp.sum(jnp.where(valid, err, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

  def loss_fn(params, batch, rng_key, extra):
    del batch
    return bellman_error(params, extra["target_params"], rng_key), {}

  return loss_fn


def make_target_refresh(cfg: PuzzleTrainConfig):
  """The loop's ``on_step`` hook: after each chunk of ``target_check_every`` steps, copies the
  online network into the target when the chunk's mean loss is below ``target_loss_threshold``
  or ``target_update_every`` steps have passed since the last copy; logs ``target_updates`` and
  ``target_refreshed``."""

  def refresh(step: int, state: TrainState, metrics: dict[str, float]) -> TrainState:
    extra = state.extra
    since = step - int(extra["last_target_update"])
    refreshed = metrics["loss"] < cfg.target_loss_threshold or since >= cfg.target_update_every
    if refreshed:
      extra = {"target_params": state.params,
               "last_target_update": jnp.asarray(step, jnp.int32),
               "target_updates": extra["target_updates"] + 1}
    metrics["target_updates"] = float(extra["target_updates"])
    metrics["target_refreshed"] = float(refreshed)
    return state.replace(extra=extra)

  return refresh


def train_puzzle(cfg: PuzzleTrainConfig, *, mesh: Mesh | None = None,
                 log=print) -> dict[str, Any]:
  """Trains on the train loop (resumable from ``out/checkpoints``, also onto another mesh),
  exports ``out/model``.

  ``mesh``: the device mesh of the loop (None: one device; the experiment passes the mesh of
  ``cfg.mesh``). Returns a summary dict (final loss, steps, target updates, seconds).
  """
  env = env_for(cfg)
  _check(cfg, env)
  if mesh is not None:
    check_batch_sizes(mesh, {"batch_size": cfg.batch_size})
  out = pathlib.Path(cfg.out)
  net_cfg = net_config_for(cfg, env)
  model = PuzzleNet(net_cfg, rngs=nnx.Rngs(cfg.seed))
  graphdef, params = nnx.split(model)
  opt_cfg = optimizer_config(cfg)
  extra = {"target_params": params, "last_target_update": jnp.zeros((), jnp.int32),
           "target_updates": jnp.zeros((), jnp.int32)}
  loop_cfg = TrainLoopConfig(num_steps=cfg.steps, eval_every=0,
                             checkpoint_every=cfg.checkpoint_every,
                             log_every=cfg.target_check_every, max_to_keep=3, seed=cfg.seed)
  t0 = time.time()
  result = train(
    make_loss_fn(cfg, env, graphdef, mesh=mesh), params, optimizer=make_optimizer(opt_cfg),
    train_batches=None, config=loop_cfg, out_dir=out, run_config=config_to_dict(cfg),
    lr_fn=lr_schedule(opt_cfg), extra=extra, on_step=make_target_refresh(cfg),
    steps_per_call=cfg.target_check_every, max_seconds=cfg.max_seconds,
    ignore_config_keys=("out", "steps", "checkpoint_every", "max_seconds", *mesh_ignore_keys()),
    metrics_prefix="", progress_desc=f"{env.name}/{cfg.head}", log=log, mesh=mesh,
  )
  params = host_local(result.params)  # several processes: whole on each (saved by process 0)
  if is_main_process():
    save_model(out / "model", nnx.merge(graphdef, params), config=net_cfg, overwrite=True)
  summary = {"domain": env.name, "head": cfg.head, "steps": result.step,
             "final_loss": result.last_train_loss,
             "target_updates": int(result.extra["target_updates"]), "seconds": time.time() - t0,
             "num_params": count_params(params)}
  if is_main_process():
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
  log(json.dumps(summary))
  return summary


def load_puzzle_net(path: str | pathlib.Path) -> PuzzleNet:
  """Loads a network exported by ``train_puzzle`` (``out/model``)."""
  return load_model(path, model_cls=PuzzleNet)


def evaluate_greedy(apply_fn, params, env: PuzzleEnv, states: np.ndarray, *,
                    max_steps: int) -> np.ndarray:
  """Fraction-free helper: solves by following argmin_a [c(a) + V(next)] (or argmin q) greedily;
  returns per-state solved bools. Used for quick training diagnostics."""
  s = jnp.asarray(states)

  @functools.partial(jax.jit)
  def run(s):
    def body(i, s):
      out = apply_fn(params, env.next_states(s).reshape(-1, env.state_dim))
      v = out.reshape(s.shape[0], env.num_actions) + jnp.asarray(env.action_costs)
      a = jnp.argmin(jnp.where(env.valid_action_mask(s), v, jnp.inf), axis=-1)
      return jnp.where(env.is_goal(s)[:, None], s, env.step(s, a))
    return env.is_goal(jax.lax.fori_loop(0, max_steps, body, s))

  return np.asarray(run(s))
