"""Puzzle environments: the DeepCubeA test sets' optimal solutions replay to the goal with the
project's moves; meta-actions, n-puzzle semantics, hashing, encoding, scrambles, validation."""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.data.paths import data_dir
from qstar_jax.envs import cube3, deepcubea_path, load_deepcubea, make_env, npuzzle
from qstar_jax.envs import data as envs_data
from qstar_jax.envs.cube import _cubies


@pytest.fixture(scope="module")
def cube_data():
  return load_deepcubea("cube3")


@pytest.fixture(scope="module")
def p15_data():
  return load_deepcubea("puzzle15")


def test_cube_optimal_solutions_reach_goal(cube_data):
  env = cube3()
  states = env.validate_states(cube_data["states"])
  assert states.shape == (1000, 54)
  end = env.replay(states, cube_data["optimal_solutions"])
  assert np.all(end == env.goal)
  # Not trivially true: the start states are not the goal, and half a solution is not enough.
  assert not np.any(np.all(states == env.goal, axis=1))
  half = np.where(np.arange(22)[None] < cube_data["optimal_lengths"][:, None] // 2,
                  cube_data["optimal_solutions"], -1)
  assert not np.any(np.all(env.replay(states, half) == env.goal, axis=1))


def test_cube_solutions_as_meta_actions(cube_data):
  """Group each optimal solution into triples of quarter turns = one 1,884-space action each."""
  env = cube3(True)
  sols = cube_data["optimal_solutions"][:200].astype(int)
  lens = cube_data["optimal_lengths"][:200]
  rows = []
  for sol, n in zip(sols, lens, strict=True):
    moves = sol[:n].tolist()
    acts = []
    for i in range(0, n, 3):
      chunk = moves[i:i + 3]
      acts.append(env.sequences.index(tuple(chunk)))
    rows.append(acts + [-1] * (8 - len(acts)))
  acts = np.array(rows)
  assert np.all(env.replay(cube_data["states"][:200], acts) == env.goal)
  for a_row, n in zip(acts, lens, strict=True):
    assert env.path_cost(a_row) == n
    assert len(env.expand_path(a_row)) == n


def test_puzzle15_optimal_solutions_reach_goal(p15_data):
  env = npuzzle(4)
  states = env.validate_states(p15_data["states"])
  end = env.replay(states, p15_data["optimal_solutions"])
  assert np.all(end == env.goal)
  assert np.array_equal(env.goal, p15_data["goal"])


def test_meta_action_table():
  env = cube3(True)
  assert env.num_actions == 1884
  costs = env.action_costs
  assert (costs == 1).sum() == 12 and (costs == 2).sum() == 144 and (costs == 3).sum() == 1728
  base = cube3()
  s, _ = base.scramble(jax.random.key(3), num_states=4, max_depth=20)
  children = np.asarray(jax.jit(env.next_states)(s))  # [4, 1884, 54]
  s = np.asarray(s)
  base_perm = load_deepcubea("cube3")["move_perm"]
  for a in range(1884):
    ref = s
    for m in env.sequences[a]:  # numpy reference: apply the quarter turns one by one
      ref = ref[:, base_perm[m]]
    np.testing.assert_array_equal(children[:, a], ref)
  some = jnp.array([0, 11, 12 + 5 * 12 + 7, 1883])
  np.testing.assert_array_equal(env.step(jnp.asarray(s[:4]), some), children[np.arange(4), some])
  # U-1 then U1 is the identity: a meta-action that changes nothing is marked invalid.
  ident = env.sequences.index((0, 1))
  assert not bool(env.valid_action_mask(s)[0, ident])
  assert int(env.valid_action_mask(s)[0].sum()) < 1884


def test_cube_moves_are_invertible_and_of_order_four():
  env = cube3()
  s, _ = env.scramble(jax.random.key(0), num_states=3, max_depth=15)
  for a in range(0, 12, 2):  # (X-1, X1) pairs
    back = env.step(env.step(s, jnp.full((3,), a)), jnp.full((3,), a + 1))
    np.testing.assert_array_equal(back, s)
    four = s
    for _ in range(4):
      four = env.step(four, jnp.full((3,), a))
    np.testing.assert_array_equal(four, s)


def test_npuzzle_move_semantics():
  env = npuzzle(3)
  goal = jnp.asarray(env.goal)  # 1 2 3 / 4 5 6 / 7 8 _
  # D: the tile above the blank (6) moves down; R: the tile left of the blank (8) moves right.
  np.testing.assert_array_equal(env.step(goal, jnp.int32(1)), [1, 2, 3, 4, 5, 0, 7, 8, 6])
  np.testing.assert_array_equal(env.step(goal, jnp.int32(3)), [1, 2, 3, 4, 5, 6, 7, 0, 8])
  # U and L have no tile below / right of the blank: the state is unchanged and marked invalid.
  np.testing.assert_array_equal(env.step(goal, jnp.int32(0)), goal)
  np.testing.assert_array_equal(env.valid_action_mask(goal), [False, True, False, True])
  kids = env.next_states(goal[None])[0]
  for a in range(4):
    np.testing.assert_array_equal(kids[a], env.step(goal, jnp.int32(a)))
  # Manhattan distance: one move from the goal is 1.
  assert float(env.manhattan(env.step(goal, jnp.int32(1)))) == 1.0
  assert float(env.manhattan(goal)) == 0.0


def test_hash_and_encoding():
  env = cube3()
  s, _ = env.scramble(jax.random.key(1), num_states=512, max_depth=25)
  s = np.asarray(s)
  uniq, idx = np.unique(s, axis=0, return_index=True)
  h = np.asarray(env.hash(jnp.asarray(uniq)))
  assert h.dtype == np.uint32 and h.shape == (len(uniq), 2)
  assert len({tuple(r) for r in h}) == len(uniq)  # no collision among distinct states
  assert len(set(h[:, 0].tolist())) > len(uniq) - 3
  np.testing.assert_array_equal(env.hash(jnp.asarray(s[:5])), env.hash(jnp.asarray(s[:5].copy())))
  x = env.encode(jnp.asarray(s[:3]))
  assert x.shape == (3, 324)
  np.testing.assert_allclose(x.reshape(3, 54, 6).sum(-1), 1.0)
  np.testing.assert_array_equal(np.argmax(x.reshape(3, 54, 6), -1), s[:3] // 9)
  p = npuzzle(4)
  assert p.encode(jnp.asarray(p.goal)[None]).shape == (1, 256)


def test_scramble_depths():
  env = cube3()
  s, d = env.scramble(jax.random.key(2), num_states=300, max_depth=6, min_depth=1)
  d = np.asarray(d)
  assert d.min() >= 1 and d.max() <= 6 and len(set(d.tolist())) == 6
  one = np.asarray(s)[d == 1]
  # Every depth-1 scramble is one quarter turn from the goal.
  kids = env.goal[load_deepcubea("cube3")["move_perm"]]
  assert all(any(np.array_equal(o, k) for k in kids) for o in one)
  env.validate_states(s)
  p = npuzzle(4)
  ps, _ = p.scramble(jax.random.key(0), num_states=50, max_depth=80)
  p.validate_states(ps)


def _twist_corner(state):
  c = _cubies()["corners"][0]
  s = state.copy()
  s[c[0]], s[c[1]], s[c[2]] = state[c[2]], state[c[0]], state[c[1]]
  return s


def test_cube_validation_errors():
  env = cube3()
  goal = env.goal.copy()
  with pytest.raises(ValueError, match="shape"):
    env.validate_states(goal[:53])
  with pytest.raises(ValueError, match="not a permutation"):
    bad = goal.copy()
    bad[3] = 5
    env.validate_states(bad)
  with pytest.raises(ValueError, match="corner twist"):
    env.validate_states(_twist_corner(goal))
  e = _cubies()["edges"][0]
  flipped = goal.copy()
  flipped[e[0]], flipped[e[1]] = goal[e[1]], goal[e[0]]
  with pytest.raises(ValueError, match="edge flip"):
    env.validate_states(flipped)
  e2 = _cubies()["edges"][1]
  swapped = goal.copy()
  swapped[e[0]], swapped[e2[0]] = goal[e2[0]], goal[e[0]]
  swapped[e[1]], swapped[e2[1]] = goal[e2[1]], goal[e[1]]
  with pytest.raises(ValueError, match="parities"):
    env.validate_states(swapped)
  c = _cubies()["corners"][0]
  mirrored = goal.copy()
  mirrored[c[1]], mirrored[c[2]] = goal[c[2]], goal[c[1]]
  with pytest.raises(ValueError, match="mirrored|physical"):
    env.validate_states(mirrored)
  centre = goal.copy()
  centre[4], centre[13] = goal[13], goal[4]
  with pytest.raises(ValueError, match="centre"):
    env.validate_states(centre)
  # Twisting two corners in opposite directions is legal (reachable): no error.
  twisted = _twist_corner(_twist_corner(_twist_corner(goal)))
  np.testing.assert_array_equal(twisted, goal)
  with pytest.raises(ValueError, match="unknown action id 12"):
    env.replay(goal, [0, 12])
  with pytest.raises(ValueError, match="unknown action id"):
    cube3(True).validate_actions([1884])


def test_cube_invariants_hold_on_random_move_sequences():
  """Every state reachable by moves validates; each single sticker corruption is rejected."""
  env = cube3()
  s, _ = env.scramble(jax.random.key(7), num_states=20, max_depth=40)
  s = env.validate_states(s)
  for row in s[:5]:
    with pytest.raises(ValueError):
      env.validate_states(_twist_corner(row))


def test_npuzzle_validation_errors():
  env = npuzzle(4)
  goal = env.goal.copy()
  swapped = goal.copy()
  swapped[0], swapped[1] = goal[1], goal[0]
  with pytest.raises(ValueError, match="unsolvable"):
    env.validate_states(swapped)
  with pytest.raises(ValueError, match="not a permutation"):
    env.validate_states(np.array([1] * 16))
  with pytest.raises(ValueError, match="shape"):
    env.validate_states(np.arange(9))
  with pytest.raises(ValueError, match="unknown action id 4"):
    env.validate_actions([0, 4])
  with pytest.raises(ValueError, match="unknown domain"):
    make_env("cube4")
  with pytest.raises(ValueError, match="12 or 1884"):
    make_env("cube3", 13)
  # Solvable: swapping two tiles AND moving the blank one step is reachable.
  env8 = npuzzle(3)
  # Swapping two tiles (odd) and moving the blank one cell (odd) keeps parity 0 != distance 1.
  unsolvable = np.array([2, 1, 3, 4, 5, 6, 7, 0, 8])
  with pytest.raises(ValueError, match="unsolvable"):
    env8.validate_states(unsolvable)
  env8.validate_states(np.array([1, 2, 3, 4, 5, 6, 7, 0, 8]))
  assert list(itertools.islice(env8.action_names, 4)) == ["U", "D", "L", "R"]


PACKAGED = pathlib.Path(envs_data.__file__).parent / "deepcubea"


def test_deepcubea_sets_ship_in_the_package(tmp_path, monkeypatch):
  """With an empty QSTAR_DATA_DIR the packaged copies are read: the same bytes as the shared
  data (checked against it where that folder exists) and the licence beside them."""
  shared = data_dir() / "deepcubea"
  monkeypatch.setenv("QSTAR_DATA_DIR", str(tmp_path))
  for name, count in (("cube3", 1000), ("puzzle15", 500)):
    packaged = deepcubea_path(name)
    assert pathlib.Path(str(packaged)).parent == PACKAGED
    assert load_deepcubea(name)["states"].shape[0] == count
    if (shared / packaged.name).is_file():
      assert packaged.read_bytes() == (shared / packaged.name).read_bytes()
  assert "MIT License" in (PACKAGED / "LICENSE").read_text()


def test_deepcubea_data_dir_copy_overrides_the_packaged_one(tmp_path, monkeypatch):
  (tmp_path / "deepcubea").mkdir()
  full = load_deepcubea("puzzle15")
  np.savez(tmp_path / "deepcubea" / "puzzle15_test.npz", **{**full, "states": full["states"][:3]})
  monkeypatch.setenv("QSTAR_DATA_DIR", str(tmp_path))
  assert deepcubea_path("puzzle15") == tmp_path / "deepcubea" / "puzzle15_test.npz"
  np.testing.assert_array_equal(load_deepcubea("puzzle15")["states"], full["states"][:3])
  with pytest.raises(ValueError, match="puzzle24"):
    deepcubea_path("puzzle24")
