"""DAVI / DQN targets against an independent numpy computation, training reduces the Bellman
error toward the true distances, a resumed run reproduces an uninterrupted one, and training on
the shared train loop gives the numbers of the former stand-alone puzzle loop."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qstar_jax.envs import cube3, npuzzle
from qstar_jax.envs.npuzzle import _perm_table
from qstar_jax.losses import q_learning_targets, value_iteration_targets
from qstar_jax.models.puzzle_net import PuzzleNet, PuzzleNetConfig
from qstar_jax.training.optim import lr_schedule, make_optimizer
from qstar_jax.training.puzzle import (
  NetSizes,
  PuzzleTrainConfig,
  load_puzzle_net,
  optimizer_config,
  train_puzzle,
)

ENV = npuzzle(3)


def _np_manhattan(s):
  d = 0
  for i, v in enumerate(s):
    if v:
      g = int(v) - 1
      d += abs(i // 3 - g // 3) + abs(i % 3 - g % 3)
  return d


def _np_children(s):
  b = int(np.argmax(s == 0))
  table = _perm_table(3)
  return [(a, s[table[b, a]]) for a in range(4) if not np.array_equal(s[table[b, a]], s)]


@pytest.fixture(scope="module")
def states():
  s, _ = ENV.scramble(jax.random.key(0), num_states=16, max_depth=12)
  s = np.array(s)
  s[0] = ENV.goal
  s[1] = ENV.goal[_perm_table(3)[8, 1]]  # one move from the goal
  return s


def test_value_iteration_targets_match_numpy(states):
  y = value_iteration_targets(None, jnp.asarray(states), env=ENV,
                              value_fn=lambda p, x: ENV.manhattan(x))
  ref = []
  for s in states:
    if np.array_equal(s, ENV.goal):
      ref.append(0.0)
      continue
    ref.append(min(1.0 + (0.0 if np.array_equal(c, ENV.goal) else _np_manhattan(c))
                   for _, c in _np_children(s)))
  np.testing.assert_allclose(y, ref)
  assert float(y[1]) == 1.0


def test_q_learning_targets_match_numpy(states):
  q_of = lambda p, x: 10.0 + ENV.manhattan(x)[:, None] + jnp.arange(4.0)  # noqa: E731
  actions = jnp.asarray(np.tile([0, 1, 2, 3], (len(states), 1)))
  y = q_learning_targets(None, jnp.asarray(states), actions, env=ENV, q_fn=q_of)
  table = _perm_table(3)
  for i, s in enumerate(states):
    for a in range(4):
      c = s[table[int(np.argmax(s == 0)), a]]
      valid_next = [a2 for a2, _ in _np_children(c)]
      inner = 0.0 if np.array_equal(c, ENV.goal) else min(10.0 + _np_manhattan(c) + a2
                                                          for a2 in valid_next)
      assert float(y[i, a]) == pytest.approx(1.0 + inner)


def test_q_targets_meta_actions_cost():
  env = cube3(True)
  goal = jnp.asarray(env.goal)[None]
  acts = jnp.array([[0, 12, 200, 1883]])
  y = q_learning_targets(None, goal, acts, env=env, q_fn=lambda p, x: jnp.zeros((x.shape[0], 1884)))
  # c(a) + min q = c(a) unless the action returns to the goal (U-1 U1 at id 12 + 1 = 13 would).
  np.testing.assert_allclose(y, [[1.0, 2.0, 3.0, 3.0]])


def _tiny_cfg(out, **kw):
  base = dict(domain="puzzle8", head="value", net=NetSizes(64, 32, 1), batch_size=128,
              max_scramble_depth=4, steps=150, learning_rate=3e-3, lr_decay_rate=0.5,
              target_check_every=50, target_update_every=50, checkpoint_every=50, out=str(out))
  base.update(kw)
  return PuzzleTrainConfig(**base)


def test_resume_reproduces_uninterrupted_run(tmp_path):
  full = train_puzzle(_tiny_cfg(tmp_path / "full"), log=lambda *_: None)
  # "Killed" after the first chunk of 50 steps (max_seconds tiny), then rerun: resumes at 50.
  part = train_puzzle(_tiny_cfg(tmp_path / "part", max_seconds=1e-9), log=lambda *_: None)
  assert part["steps"] == 50
  logs = []
  resumed = train_puzzle(_tiny_cfg(tmp_path / "part"), log=logs.append)
  assert any("resumed from step 50" in m for m in logs)
  assert resumed["steps"] == 150 and full["steps"] == 150
  a = nnx.state(load_puzzle_net(tmp_path / "full" / "model"))
  b = nnx.state(load_puzzle_net(tmp_path / "part" / "model"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [50, 100, 150]
  # DAVI learned something: V(one move from the goal) moved toward the true distance 1.
  model = load_puzzle_net(tmp_path / "full" / "model")
  one = ENV.next_states(jnp.asarray(ENV.goal)[None])[0, jnp.array([1, 3])]
  v = model(ENV.encode(one))
  assert np.all(np.abs(np.asarray(v) - 1.0) < 0.5), v
  assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_config_errors(tmp_path):
  from experiments.train_puzzle import main

  with pytest.raises(ValueError, match="head must be"):
    train_puzzle(_tiny_cfg(tmp_path / "x", head="policy"))
  with pytest.raises(ValueError, match="sampled_actions"):
    train_puzzle(_tiny_cfg(tmp_path / "y", head="q", sampled_actions=5))
  with pytest.raises(ValueError, match="no_such_key"):
    main(["no_such_key=1", f"out={tmp_path}"])


def test_puzzle_net_heads():
  cfg = PuzzleNetConfig(input_dim=81, num_outputs=4, hidden_1=16, hidden_2=8, num_blocks=2)
  q = PuzzleNet(cfg, rngs=nnx.Rngs(0))(jnp.ones((3, 81)))
  assert q.shape == (3, 4) and q.dtype == jnp.float32
  v = PuzzleNet(PuzzleNetConfig(input_dim=81, num_outputs=1, hidden_1=16, hidden_2=8,
                                num_blocks=0), rngs=nnx.Rngs(0))(jnp.ones((3, 81)))
  assert v.shape == (3,)
  with pytest.raises(ValueError, match="positive"):
    PuzzleNet(PuzzleNetConfig(input_dim=0), rngs=nnx.Rngs(0))


def test_optimizer_is_adam_with_exponential_decay():
  """The puzzle's OptimizerConfig gives the updates of optax.adam(optax.exponential_decay(...)),
  the optimizer the puzzle trainer used before it ran on the shared loop (bitwise)."""
  cfg = _tiny_cfg("unused", steps=40, learning_rate=3e-3, lr_decay_rate=0.5)
  ours = make_optimizer(optimizer_config(cfg))
  ref = optax.adam(optax.exponential_decay(3e-3, transition_steps=40, decay_rate=0.5))
  for t in (0, 1, 17, 40, 55):  # past `steps` too: a last chunk may run beyond it
    assert float(lr_schedule(optimizer_config(cfg))(t)) == float(
      optax.exponential_decay(3e-3, transition_steps=40, decay_rate=0.5)(t))
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  s_ours, s_ref = ours.init(params), ref.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    u_ours, s_ours = ours.update(grads, s_ours, params)
    u_ref, s_ref = ref.update(grads, s_ref, params)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref), strict=True):
      np.testing.assert_array_equal(a, b)


# Recorded with the stand-alone puzzle loop (its own resume/metrics/make_optimizer, commit
# c4f360d) before puzzle training moved onto training/train_loop.py: per-chunk mean losses,
# target refreshes, and checksums of the final parameters (float64 sum, sum of |x|, dot with
# default_rng(0).normal over the leaves concatenated in tree order).
BEFORE_LOOP = {
  "value": dict(
    cfg=dict(head="value", steps=15, target_check_every=5, target_update_every=10,
             target_loss_threshold=0.34),
    losses=[0.34664812684059143, 0.03962360695004463, 0.33677908778190613],
    refreshed=[0.0, 1.0, 1.0],  # step 5: loss above 0.34 and under 10 steps; 15: by the loss
    checksum=[34.54861644234916, 228.54389238076692, -8.591766541306665],
  ),
  "q": dict(
    cfg=dict(head="q", sampled_actions=2, steps=20, target_check_every=5, target_update_every=10,
             target_loss_threshold=0.6),
    losses=[0.9750028848648071, 0.662858247756958, 0.4225035309791565, 0.28745147585868835],
    refreshed=[0.0, 1.0, 1.0, 1.0],  # step 10 by the cap of 10 steps, 15 and 20 by the loss
    checksum=[35.60673723146101, 236.47909337591045, 2.9717259453137537],
  ),
}


@pytest.mark.parametrize("name", ["value", pytest.param("q", marks=pytest.mark.slow)])
def test_numbers_match_the_former_puzzle_loop(tmp_path, name):
  rec = BEFORE_LOOP[name]
  cfg = PuzzleTrainConfig(domain="puzzle8", net=NetSizes(16, 8, 1), batch_size=32,
                          max_scramble_depth=4, learning_rate=3e-3, lr_decay_rate=0.5,
                          checkpoint_every=10, out=str(tmp_path), **rec["cfg"])
  summary = train_puzzle(cfg, log=lambda *_: None)
  metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose([m["loss"] for m in metrics], rec["losses"], rtol=1e-6)
  assert [m["target_refreshed"] for m in metrics] == rec["refreshed"]
  assert summary["target_updates"] == sum(rec["refreshed"])
  leaves = jax.tree.leaves(nnx.state(load_puzzle_net(tmp_path / "model")))
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
  projection = np.random.default_rng(0).normal(size=flat.size)
  np.testing.assert_allclose([flat.sum(), np.abs(flat).sum(), flat @ projection], rec["checksum"],
                             rtol=1e-6, atol=1e-6)


COMMITTED = sorted(p.parent for p in
                   (pathlib.Path(__file__).parent.parent / "experiments" / "checkpoints").glob(
                     "*/train_summary.json"))


@pytest.mark.parametrize("run_dir", COMMITTED, ids=lambda p: p.name)
def test_committed_nets_load(run_dir):
  summary = json.loads((run_dir / "train_summary.json").read_text())
  model = load_puzzle_net(run_dir / "model")
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model))) == summary["num_params"]
  assert (model.config.num_outputs == 1) == (summary["head"] == "value")
  out = model(jnp.zeros((2, model.config.input_dim)))
  assert np.all(np.isfinite(np.asarray(out)))
