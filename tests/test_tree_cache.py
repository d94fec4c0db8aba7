"""Tree KV cache against flat recomputation of every node's full token sequence."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qstar_jax.models import apply, flat_param_shapes, from_flat_params, get_config
from qstar_jax.models.llama import attend
from qstar_jax.models.tree_cache import (
  cascade_attention,
  copy_nodes,
  fork_nodes,
  init_tree_cache,
  release_nodes,
  tree_step,
)

WIDTH = 48   # flat-forward buffer width (one compile)
ROWS = 4     # rows per problem in a decode step
BATCH = 8    # rows of a fork / release call
PAGE_LEN = 4


@pytest.fixture(scope="module")
def split():
  """A tiny random float32 Llama with weights large enough that logits vary by a few units
  (the default init gives nearly uniform logits, which would hide attention errors)."""
  config = get_config("tiny", eos_token_ids=())
  rng = np.random.default_rng(0)
  flat = {name: np.ones(shape, np.float32) if name.endswith(".scale") else
          rng.normal(0.0, 1.0 if name.startswith("embed") else 0.15, shape).astype(np.float32)
          for name, shape in flat_param_shapes(config).items()}
  return nnx.split(from_flat_params(config, flat))


_forward = jax.jit(lambda g, p, t: apply(g, p, t)[0], static_argnums=0)


def flat_last_logits(split, sequences):
  """Logits [R, V] at the last token of each sequence, from a plain causal forward."""
  graphdef, params = split
  buf = np.zeros((2 * ROWS, WIDTH), np.int32)   # one shape for every call: one compile
  for r, seq in enumerate(sequences):
    buf[r, :len(seq)] = seq
  logits = np.asarray(_forward(graphdef, params, jnp.asarray(buf)))
  return logits[np.arange(len(sequences)), [len(seq) - 1 for seq in sequences]]


class Tree:
  """The cache plus a host mirror: per node its problem and suffix tokens (with unique ids)."""

  def __init__(self, split, prompts, **capacities):
    graphdef, params = split
    self.split, self.prompts = split, prompts
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for b, p in enumerate(prompts):
      tokens[b, :len(p)] = p
    init = jax.jit(functools.partial(init_tree_cache, graphdef, **capacities))
    self.cache, out = init(params, tokens, np.array([len(p) for p in prompts], np.int32))
    self.root_logits = np.asarray(out.logits[:, 0])
    self.step = jax.jit(functools.partial(tree_step, graphdef))
    self.fork = jax.jit(fork_nodes, static_argnames="num_children")
    self.release = jax.jit(release_nodes)
    self.copy = jax.jit(copy_nodes)
    self.suffix = {b: [] for b in range(len(prompts))}      # node -> [(token, unique id)]
    self.problem = {b: b for b in range(len(prompts))}
    self.next_id = 0
    self.appended = 0
    self.rng = np.random.default_rng(1)

  def sequence(self, node):
    return list(self.prompts[self.problem[node]]) + [t for t, _ in self.suffix[node]]

  def live(self):
    return sorted(self.suffix)

  def make_children(self, parents, k):
    pad = BATCH - len(parents)
    self.cache, children = self.fork(self.cache, np.array(parents + [0] * pad, np.int32),
                                     num_children=k,
                                     valid=np.array([True] * len(parents) + [False] * pad))
    children = np.asarray(children)
    assert (children[len(parents):] == -1).all()
    out = []
    for parent, row in zip(parents, children[:len(parents)], strict=True):
      for child in row:
        assert child >= 0 and child not in self.suffix
        self.suffix[int(child)] = list(self.suffix[parent])
        self.problem[int(child)] = self.problem[parent]
        out.append(int(child))
    return out

  def drop(self, nodes):
    pad = BATCH - len(nodes)
    self.cache = self.release(self.cache, np.array(nodes + [0] * pad, np.int32),
                              np.array([True] * len(nodes) + [False] * pad))
    for n in nodes:
      del self.suffix[n], self.problem[n]

  def resample(self, sources, targets):
    self.cache = self.copy(self.cache, np.array(sources, np.int32), np.array(targets, np.int32))
    copies = [(list(self.suffix[s]), self.problem[s]) for s in sources]
    for t, (suffix, problem) in zip(targets, copies, strict=True):
      self.suffix[t], self.problem[t] = suffix, problem

  def advance(self, nodes, num_tokens):
    """Append `num_tokens` random tokens to each node; every step's logits vs flat forward."""
    by_problem = [[n for n in nodes if self.problem[n] == b] for b in range(len(self.prompts))]
    for _ in range(num_tokens):
      grid = np.zeros((len(self.prompts), ROWS), np.int32)
      valid = np.zeros((len(self.prompts), ROWS), bool)
      tokens = self.rng.integers(1, 256, size=grid.shape).astype(np.int32)
      for b, row in enumerate(by_problem):
        assert len(row) <= ROWS
        grid[b, :len(row)], valid[b, :len(row)] = row, True
      self.cache, out = self.step(self.params, self.cache, grid, tokens, valid)
      assert np.array_equal(np.asarray(out.written), valid)
      for b, w in zip(*np.nonzero(valid), strict=True):
        self.suffix[int(grid[b, w])].append((int(tokens[b, w]), self.next_id))
        self.next_id += 1
        self.appended += 1
      rows = [int(grid[b, w]) for b, w in zip(*np.nonzero(valid), strict=True)]
      want = flat_last_logits(self.split, [self.sequence(n) for n in rows])
      got = np.asarray(out.logits)[valid]
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

  @property
  def params(self):
    return self.split[1]

  def check_pages(self):
    """Refcounts equal the page-table references of live nodes (brute force); pages in use
    within the DESIGN bound: 1.1 x unique live tokens / page_len + one partial page per node."""
    cache = self.cache
    tables = np.asarray(cache.node_pages)
    live = np.asarray(cache.node_live)
    assert sorted(np.nonzero(live)[0].tolist()) == self.live()
    refs = np.zeros(cache.num_pages, np.int32)
    for n in self.live():
      used = math.ceil(len(self.suffix[n]) / PAGE_LEN)
      assert (tables[n, :used] >= 0).all() and (tables[n, used:] == -1).all()
      np.add.at(refs, tables[n, :used], 1)
    np.testing.assert_array_equal(np.asarray(cache.page_refcount), refs)
    in_use = int(cache.pages_in_use)
    unique = len({i for n in self.live() for _, i in self.suffix[n]})
    assert in_use <= math.ceil(1.1 * unique / PAGE_LEN) + len(self.live())
    return in_use


CAPACITIES = dict(page_len=PAGE_LEN, num_pages=64, max_nodes=40, max_pages_per_node=6,
                  max_depth=5)


def test_tree_matches_flat_forward(split):
  prompts = [[5, 17, 200, 3, 9], [44, 1, 123]]
  tree = Tree(split, prompts, **CAPACITIES)
  np.testing.assert_allclose(tree.root_logits, flat_last_logits(split, prompts), atol=1e-5,
                             rtol=0)
  depth1 = tree.make_children([0, 1], 2)
  tree.advance(depth1, 3)                          # partial first page
  depth2 = tree.make_children(depth1, 2)           # children share the parent's partial page
  tree.advance(depth2, 3)                          # copy-on-write, then a fresh page
  tree.check_pages()
  pruned = [n for n in depth1 if tree.problem[n] == 0][0]
  pruned_children = [n for n in depth2 if n in tree.suffix and
                     tree.suffix[n][:3] == tree.suffix[pruned]]
  tree.drop([pruned] + pruned_children)            # a pruned branch: its pages return
  tree.check_pages()
  depth2 = [n for n in depth2 if n in tree.suffix]
  p1 = [n for n in depth2 if tree.problem[n] == 1]
  tree.resample([p1[0]], [p1[3]])                  # a resampled particle: a page-table copy
  tree.check_pages()
  depth3 = tree.make_children(depth2, 2)
  tree.drop(depth3[1::2])                          # prune one child of each pair
  depth3 = depth3[::2]
  tree.advance(depth3, 2)                          # new pages reuse the pruned branch's
  depth4 = tree.make_children(depth3, 2)
  tree.drop(depth4[1::2])
  depth4 = depth4[::2]
  tree.advance(depth4, 5)
  in_use = tree.check_pages()
  unshared = sum(math.ceil(len(s) / PAGE_LEN) for s in tree.suffix.values())
  assert in_use < unshared
  # A token from every live node (roots and interior nodes included), in batches of ROWS.
  for b in range(len(prompts)):
    nodes = [n for n in tree.live() if tree.problem[n] == b]
    for i in range(0, len(nodes), ROWS):
      tree.advance(nodes[i:i + ROWS], 1)
  tree.check_pages()
  cache = tree.cache
  assert int(np.asarray(cache.tokens_prefilled).sum()) == sum(map(len, prompts))
  assert int(np.asarray(cache.tokens_decoded).sum()) == tree.appended == tree.next_id
  assert not np.asarray(cache.overflow).any()
  depth = np.asarray(cache.node_depth)
  assert depth[depth4].tolist() == [4] * len(depth4)
  step_length = np.asarray(cache.node_step_length)
  assert step_length[depth4].tolist() == [5 + 1] * len(depth4)   # 5 tokens + the probe token
  path = np.asarray(cache.node_path)
  for n in depth4:
    chain = [n]
    while np.asarray(cache.node_parent)[chain[-1]] >= 0:
      chain.append(int(np.asarray(cache.node_parent)[chain[-1]]))
    assert path[n, :5].tolist() == chain[::-1]
  live = tree.live()
  for i in range(0, len(live), BATCH):
    tree.drop(live[i:i + BATCH])
  assert (np.asarray(tree.cache.page_refcount) == 0).all()
  assert int(tree.cache.pages_in_use) == 0
  assert not np.asarray(tree.cache.node_live).any()


def test_overflow_is_flagged(split):
  graphdef, params = split
  prompts = np.array([[7, 8], [9, 10]], np.int32)
  init = jax.jit(functools.partial(init_tree_cache, graphdef, page_len=2, num_pages=2,
                                   max_nodes=3, max_pages_per_node=2, max_depth=1))
  cache, _ = init(params, prompts, np.array([2, 2], np.int32))
  step = jax.jit(functools.partial(tree_step, graphdef))
  only = np.array([[True], [False]])
  for _ in range(3):                               # problem 0 takes both pages
    cache, out = step(params, cache, np.array([[0], [1]]), np.array([[3], [4]]), only)
    assert np.asarray(out.written).tolist() == only.tolist()
  assert np.asarray(cache.overflow).tolist() == [False, False]
  cache, out = step(params, cache, np.array([[0], [1]]), np.array([[3], [4]]), ~only)
  assert not np.asarray(out.written).any()         # no free page for problem 1
  assert np.asarray(cache.overflow).tolist() == [False, True]
  assert int(cache.node_length[1]) == 0 and int(cache.tokens_decoded[1]) == 0
  cache, out = step(params, cache, np.array([[0], [1]]), np.array([[3], [4]]), only)
  assert np.asarray(out.written).tolist() == [[True], [False]]
  cache, out = step(params, cache, np.array([[0], [1]]), np.array([[3], [4]]), only)
  assert not np.asarray(out.written).any()         # page table of node 0 is full
  assert np.asarray(cache.overflow).tolist() == [True, True]
  assert int(cache.node_length[0]) == 4

  fork_one = jax.jit(functools.partial(fork_nodes, num_children=1))
  cache, _ = init(params, prompts, np.array([2, 2], np.int32))
  cache, children = fork_one(cache, np.array([1, 0], np.int32))
  assert np.asarray(children).tolist() == [[2], [-1]]   # one free node slot
  assert np.asarray(cache.overflow).tolist() == [True, False]
  cache = jax.jit(release_nodes)(cache, np.array([0], np.int32))
  cache, children = fork_one(cache, np.array([2], np.int32))
  assert np.asarray(children).tolist() == [[-1]]        # max_depth = 1
  cache, children = fork_one(cache, np.array([1], np.int32))
  assert np.asarray(children).tolist() == [[0]]


def test_cascade_attention_matches_dense_attention():
  rng = np.random.default_rng(2)
  b, w, hq, hkv, hd, p, s = 2, 3, 4, 2, 8, 5, 6
  q = rng.standard_normal((b, w, hq, hd)).astype(np.float32)
  pk, pv = (rng.standard_normal((b, p, hkv, hd)).astype(np.float32) for _ in range(2))
  sk, sv = (rng.standard_normal((b, w, s, hkv, hd)).astype(np.float32) for _ in range(2))
  prompt_lengths = np.array([5, 2], np.int32)
  suffix_lengths = np.array([[6, 1, 0], [3, 0, 4]], np.int32)
  got = np.asarray(jax.jit(cascade_attention)(q, pk, pv, prompt_lengths, sk, sv, suffix_lengths))
  # Reference: one dense softmax over [prompt ; suffix] per row.
  keys = np.concatenate([np.repeat(pk[:, None], w, 1), sk], axis=2).reshape(b * w, p + s, hkv, hd)
  values = np.concatenate([np.repeat(pv[:, None], w, 1), sv], axis=2).reshape(b * w, p + s, hkv,
                                                                              hd)
  mask = np.concatenate([np.repeat((np.arange(p) < prompt_lengths[:, None])[:, None], w, 1),
                         np.arange(s) < suffix_lengths[..., None]], axis=2)
  want = np.asarray(attend(q.reshape(b * w, 1, hq, hd), keys, values,
                           mask.reshape(b * w, 1, p + s)))
  np.testing.assert_allclose(got.reshape(b * w, 1, hq * hd), want, atol=1e-6, rtol=0)
