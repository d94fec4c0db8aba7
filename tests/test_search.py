"""A* and Q* search: optimal costs with admissible heuristics at weight 1 (checked against BFS),
every returned path replayed, duplicate handling, overflow reporting, input validation."""

from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.envs import cube3, npuzzle
from qstar_jax.envs.npuzzle import _perm_table
from qstar_jax.search import astar_search, qstar_search
from qstar_jax.search import open_list as ol
from qstar_jax.search.puzzle.qstar import _sort_edges


def _bfs_distances(env, radius):
  """Exact distances of every state within ``radius`` base moves of the goal (host BFS)."""
  dist = {env.goal.tobytes(): 0}
  frontier = env.goal[None]
  perms = np.asarray(env.perms) if hasattr(env, "perms") else None
  for d in range(1, radius + 1):
    if perms is not None:
      kids = frontier[:, perms[:12]].reshape(-1, env.state_dim)
    else:
      kids = np.asarray(env.next_states(jnp.asarray(frontier))).reshape(-1, env.state_dim)
    new = []
    for k in kids:
      b = k.tobytes()
      if b not in dist:
        dist[b] = d
        new.append(k)
    frontier = np.array(new)
  return dist


def _bfs_8puzzle(env, start):
  goal = env.goal.tobytes()
  seen = {start.tobytes(): 0}
  q = deque([start])
  perm = np.asarray(_perm_table(3))
  while q:
    s = q.popleft()
    if s.tobytes() == goal:
      return seen[goal]
    b = int(np.argmax(s == 0))
    for a in range(4):
      t = s[perm[b, a]]
      if t.tobytes() not in seen:
        seen[t.tobytes()] = seen[s.tobytes()] + 1
        q.append(t)
  raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------- 8-puzzle
ENV8 = npuzzle(3)


def manhattan_h(params, states):
  return ENV8.manhattan(states)


def manhattan_q(params, states):
  """q(s, a) = c(a) + h(next(s, a)) <= c(a) + h*(next): admissible edge costs."""
  return jnp.asarray(ENV8.action_costs) + ENV8.manhattan(ENV8.next_states(states))


@pytest.fixture(scope="module")
def puzzle8_problems():
  # Long random walks give a spread of optimal costs (0..~20).
  s, _ = ENV8.scramble(jax.random.key(3), num_states=10, max_depth=100, min_depth=0)
  s = np.array(s)
  s[0] = ENV8.goal  # the start can be the goal
  return s, np.array([_bfs_8puzzle(ENV8, x) for x in s])


@pytest.mark.parametrize("method,batch_pops", [("astar", 1), ("astar", 3), ("qstar", 1),
                                               ("qstar", 4)])
def test_puzzle8_optimal(puzzle8_problems, method, batch_pops):
  starts, optimal = puzzle8_problems
  assert optimal.max() >= 12  # the test covers non-trivial problems
  kw = dict(env=ENV8, batch_pops=batch_pops, max_iterations=4000, node_capacity=8192,
            max_path_len=40)
  if method == "astar":
    r = astar_search(None, starts, heuristic_fn=manhattan_h, **kw)
  else:
    r = qstar_search(None, starts, q_fn=manhattan_q, **kw)
  assert np.all(r.found) and not np.any(r.overflow)
  np.testing.assert_array_equal(r.path_cost, optimal)
  np.testing.assert_array_equal(r.path_length, optimal)
  end = ENV8.replay(starts, np.asarray(r.path))
  assert np.all(end == ENV8.goal)
  assert int(r.nodes_generated[0]) == 0  # start is the goal: nothing generated
  assert np.all(r.network_calls == r.iterations + 1)
  if method == "qstar":
    assert np.all(r.nodes_generated == r.nodes_expanded)
  else:
    assert np.all(r.nodes_generated >= r.nodes_expanded)


# -------------------------------------------------------------------------------------- cube
CUBE = cube3()
CUBE_META = cube3(True)
RADIUS = 4


@pytest.fixture(scope="module")
def cube_table():
  """Exact distances within RADIUS quarter turns: h(s) = d(s) there, RADIUS + 1 beyond
  (admissible: a state not in the table is more than RADIUS moves away)."""
  dist = _bfs_distances(CUBE, RADIUS)
  states = np.frombuffer(b"".join(dist.keys()), np.uint8).reshape(-1, 54)
  d = np.array(list(dist.values()), np.float32)
  h = np.asarray(CUBE.hash(jnp.asarray(states)))
  order = np.lexsort((h[:, 1], h[:, 0]))
  return dist, jnp.asarray(h[order]), jnp.asarray(d[order])


def _make_pattern_fns(table):
  _, keys, dists = table

  def h(params, states):
    hs = CUBE.hash(states)
    i = jnp.clip(jnp.searchsorted(keys[:, 0], hs[:, 0]), 0, keys.shape[0] - 1)
    # h0 collisions inside the table are possible: check a few neighbours on the full pair.
    best = jnp.full(states.shape[0], RADIUS + 1.0)
    for off in range(3):
      j = jnp.clip(i + off, 0, keys.shape[0] - 1)
      hit = (keys[j, 0] == hs[:, 0]) & (keys[j, 1] == hs[:, 1])
      best = jnp.where(hit, dists[j], best)
    return best

  def q(env):
    def fn(params, states):
      kids = env.next_states(states)
      return jnp.asarray(env.action_costs) + h(params, kids.reshape(-1, 54)).reshape(kids.shape[:2])
    return fn

  return h, q(CUBE), q(CUBE_META)


@pytest.fixture(scope="module")
def cube_fns(cube_table):
  return _make_pattern_fns(cube_table)


@pytest.fixture(scope="module")
def cube_problems(cube_table):
  dist = cube_table[0]
  s, _ = CUBE.scramble(jax.random.key(5), num_states=6, max_depth=7, min_depth=3)
  s = np.asarray(s)
  # Optimal costs: BFS from each start, bounded (the scramble depth bounds the distance).
  opt = []
  for x in s:
    if x.tobytes() in dist:
      opt.append(dist[x.tobytes()])
      continue
    best = None
    frontier = {x.tobytes(): x}
    for d in range(1, 4):  # meet-in-the-middle: d + RADIUS covers depth <= 7
      kids = np.stack(list(frontier.values()))[:, np.asarray(CUBE.perms)].reshape(-1, 54)
      frontier = {k.tobytes(): k for k in kids}
      hits = [dist[b] for b in frontier if b in dist]
      if hits:
        best = d + min(hits)
        break
    opt.append(best)
  return s, np.array(opt)


@pytest.mark.parametrize("method,meta", [("astar", False), ("qstar", False), ("qstar", True),
                                         ("astar", True)])
def test_cube_optimal(cube_problems, cube_fns, method, meta):
  starts, optimal = cube_problems
  h, q12, q1884 = cube_fns
  env = CUBE_META if meta else CUBE
  if meta:  # A* at 1,884 actions generates 1,884 children per expansion: keep it small
    sel = np.nonzero(optimal <= RADIUS + 2)[0][:3]
    starts, optimal = starts[sel], optimal[sel]
    assert len(sel) >= 2
  assert optimal.min() >= 3
  kw = dict(env=env, batch_pops=2, max_iterations=500, max_path_len=12)
  if method == "astar":
    r = astar_search(None, starts, heuristic_fn=h, node_capacity=60_000 if meta else 20_000,
                     **kw)
  else:
    r = qstar_search(None, starts, q_fn=q1884 if meta else q12, node_capacity=4096, **kw)
  assert np.all(r.found) and not np.any(r.overflow)
  np.testing.assert_array_equal(r.path_cost, optimal)
  end = env.replay(starts, np.asarray(r.path))
  assert np.all(end == env.goal)
  base_paths = [env.expand_path(p) for p in np.asarray(r.path)]
  assert [len(p) for p in base_paths] == optimal.tolist()
  # Costs are optimal; the number of actions need not be minimal with meta-actions (ties
  # between one 3-move action and three 1-move actions are broken arbitrarily).


# ------------------------------------------------------------------------- tables and limits
def test_insert_duplicates_best_g_wins():
  env = ENV8
  t = ol.init_tables(9, node_capacity=8, open_capacity=8, table_capacity=16)
  s = np.asarray(env.next_states(jnp.asarray(env.goal)[None]))[0]  # 4 children (2 == goal)
  states = jnp.asarray(np.stack([s[1], s[3], s[1], s[3], s[1]]))
  g = jnp.array([5.0, 2.0, 3.0, 4.0, 9.0])
  ins = jax.jit(lambda t, states, *rest: ol.insert_nodes(t, states, env.hash(states), *rest))
  t, idx, improved = ins(t, states, g, jnp.arange(5), jnp.arange(5), jnp.ones(5, bool))
  assert int(t.num_nodes) == 2
  np.testing.assert_array_equal(improved, [False, True, True, False, False])
  assert sorted(np.asarray(t.node_g[:2]).tolist()) == [2.0, 3.0]
  # Again, later: a better g updates g, parent and action; a worse or equal one is ignored.
  t, idx2, improved2 = ins(t, states[:2], jnp.array([1.0, 2.0]), jnp.array([7, 8]),
                           jnp.array([7, 8]), jnp.ones(2, bool))
  np.testing.assert_array_equal(improved2, [True, False])
  assert int(t.num_nodes) == 2 and int(idx2[0]) == int(idx[2])
  assert float(t.node_g[idx2[0]]) == 1.0 and int(t.node_parent[idx2[0]]) == 7
  # Capacity: 8 nodes, 9 new distinct states -> exactly one counted as overflow.
  big = ol.init_tables(9, node_capacity=8, open_capacity=8, table_capacity=16)
  kids, _ = env.scramble(jax.random.key(0), num_states=64, max_depth=30)
  uniq = np.unique(np.array(kids), axis=0)[:9]
  big, idx3, imp3 = ins(big, jnp.asarray(uniq), jnp.ones(9), jnp.zeros(9, jnp.int32),
                        jnp.zeros(9, jnp.int32), jnp.ones(9, bool))
  assert int(big.num_nodes) == 8 and int(big.overflow_nodes) == 1 and int(imp3.sum()) == 8


def test_insert_takes_any_state_dtype_and_compares_full_states():
  """The tables need no environment: int32 keys with caller-made hashes. States whose hashes
  collide, inserted in separate batches, stay distinct (the probe compares the full state)."""
  t = ol.init_tables(3, node_capacity=4, open_capacity=4, table_capacity=8,
                     state_dtype=jnp.int32)
  ins = jax.jit(ol.insert_nodes)
  same_hash = jnp.array([[5, 7]], jnp.uint32)
  one = jnp.ones(1, bool)
  for i, key in enumerate([[1, 2, 70000], [1, 2, 70001], [1, 2, 70000]]):
    t, idx, improved = ins(t, jnp.array([key], jnp.int32), same_hash, jnp.array([float(i)]),
                           jnp.array([-1]), jnp.array([i]), one)
  assert t.node_states.dtype == jnp.int32 and int(t.num_nodes) == 2
  np.testing.assert_array_equal(t.node_states[:2], [[1, 2, 70000], [1, 2, 70001]])
  # The third insert is the first state again with a worse g: a beaten duplicate (index -1),
  # not stored, not improved, the stored g kept.
  assert int(idx[0]) == -1 and not bool(improved[0]) and float(t.node_g[0]) == 0.0
  # Both states sit in consecutive slots from hash_0 mod 8 = 5 (linear probing).
  np.testing.assert_array_equal(t.table[5:7], [0, 1])


def test_edges_per_node_cut_is_counted():
  """Keeping one edge per node (of 4) drops the rest of every popped node's edges: each pop
  counts one overflow_open; keeping all 4 counts none."""
  start = ENV8.scramble(jax.random.key(1), num_states=1, max_depth=20, min_depth=20)[0]
  kw = dict(env=ENV8, q_fn=manhattan_q, max_iterations=50, node_capacity=1024, max_path_len=40)
  cut = qstar_search(None, start, edges_per_node=1, **kw)
  full = qstar_search(None, start, edges_per_node=4, **kw)
  assert int(cut.nodes_expanded[0]) > 0
  assert int(cut.overflow_open[0]) == int(cut.nodes_expanded[0])
  assert int(full.overflow_open[0]) == 0


def test_open_list_pop_order_and_staleness():
  t = ol.init_tables(9, node_capacity=4, open_capacity=6, table_capacity=8)
  t = t.replace(node_g=jnp.array([0.0, 1.0, 5.0, 2.0]))
  pri = jnp.array([3.0, 1.0, 2.0, 0.5, 9.0])
  g = jnp.array([0.0, 1.0, 6.0, 2.0, 0.0])  # entry 2 has g 6 > node g 5: stale
  t = ol.push(t, pri, g, jnp.array([0, 1, 2, 3, 0]), jnp.arange(5), jnp.ones(5, bool))
  t, p, _, node, action, valid = ol.pop(t, 3)
  np.testing.assert_array_equal(p, [0.5, 1.0, 2.0])
  np.testing.assert_array_equal(node, [3, 1, 2])
  np.testing.assert_array_equal(valid, [True, True, False])
  assert float(ol.min_priority(t)) == 3.0
  t = ol.push(t, jnp.arange(5.0), jnp.zeros(5), jnp.zeros(5, jnp.int32), jnp.arange(5),
              jnp.ones(5, bool))  # 2 slots left + 3 freed = 4 free of 6... 5 pushes -> 1 dropped
  assert int(t.overflow_open) == 1


def test_search_reports_overflow(puzzle8_problems):
  starts, optimal = puzzle8_problems
  hard = starts[np.argmax(optimal)][None]
  r = astar_search(None, hard, env=ENV8, heuristic_fn=manhattan_h, max_iterations=1000,
                   node_capacity=16, max_path_len=40)
  assert not bool(r.found[0]) and int(r.overflow_nodes[0]) > 0 and bool(r.overflow[0])
  r = qstar_search(None, hard, env=ENV8, q_fn=manhattan_q, max_iterations=10,
                   node_capacity=64, open_capacity=2, max_path_len=40)
  assert int(r.overflow_open[0]) > 0 and bool(r.overflow[0])


def test_search_input_validation():
  bad = np.array([[1, 2, 3, 4, 5, 6, 8, 7, 0]])  # two tiles swapped: unsolvable
  with pytest.raises(ValueError, match="unsolvable"):
    astar_search(None, bad, env=ENV8, heuristic_fn=manhattan_h)
  good = ENV8.goal[None]
  with pytest.raises(ValueError, match="node_capacity must be a positive"):
    astar_search(None, good, env=ENV8, heuristic_fn=manhattan_h, node_capacity=0)
  with pytest.raises(ValueError, match="batch_pops must be a positive"):
    qstar_search(None, good, env=ENV8, q_fn=manhattan_q, batch_pops=0)
  with pytest.raises(ValueError, match="open_capacity"):
    qstar_search(None, good, env=ENV8, q_fn=manhattan_q, batch_pops=8, open_capacity=8)
  with pytest.raises(ValueError, match="power of two"):
    astar_search(None, good, env=ENV8, heuristic_fn=manhattan_h, table_capacity=1000,
                 node_capacity=100)
  with pytest.raises(ValueError, match="shape"):
    qstar_search(None, np.zeros((1, 16), np.uint8), env=ENV8, q_fn=manhattan_q)


def test_edges_per_node_top_k_matches_sort_prefix():
  q = jax.random.normal(jax.random.key(0), (5, 40))
  valid = jax.random.uniform(jax.random.key(1), (5, 40)) > 0.2
  full_q, full_a = _sort_edges(q, valid, 40)
  part_q, part_a = _sort_edges(q, valid, 8)
  np.testing.assert_array_equal(part_q, full_q[:, :8])
  np.testing.assert_array_equal(part_a, full_a[:, :8])
  assert np.all(np.isinf(full_q[~np.asarray(jnp.take_along_axis(valid, full_a, 1))]))
