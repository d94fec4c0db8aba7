"""DAVI / DQN targets against an independent numpy computation, training reduces the Bellman
error toward the true distances, and a resumed run reproduces an uninterrupted one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qstar_jax.envs import cube3, npuzzle
from qstar_jax.envs.npuzzle import _perm_table
from qstar_jax.losses import q_learning_targets, value_iteration_targets
from qstar_jax.models.puzzle_net import PuzzleNet, PuzzleNetConfig
from qstar_jax.training.puzzle import NetSizes, PuzzleTrainConfig, load_puzzle_net, train_puzzle

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
