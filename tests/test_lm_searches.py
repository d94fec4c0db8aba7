"""LM step searches (sampling / best-of-N, beam, Q-guided, particle filter, best-first) against
independent references: numpy replays over the returned trees, a Python heap, flat decoding.

Each search configuration compiles once per module (module-scoped results); the tests read
those results, so the file costs one compilation per configuration.
"""

from __future__ import annotations

import heapq

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_search_fixtures import (
  EOS_ID,
  GREEDY,
  MAX_STEP_TOKENS,
  SAMPLING,
  STOP_ID,
  TINY_SPEC,
  make_prompts,
  tiny_policy,
)

from qstar_jax.models import SamplingConfig, decode
from qstar_jax.search.steps import lm_searches as ls
from qstar_jax.search.steps.result import Solution
from qstar_jax.search.steps.step_tree import TreeCapacity, node_step_ids, node_token_ids

MAX_DEPTH = 4
LENGTHS = (5, 7, 3)


@pytest.fixture(scope="module")
def policy():
  return tiny_policy()


@pytest.fixture(scope="module")
def prompts():
  return make_prompts(LENGTHS)


def _run(search, policy, prompts, key=0, **kwargs):
  graphdef, params = policy
  tokens, lengths = prompts
  kwargs.setdefault("sampling", SAMPLING)
  kwargs.setdefault("max_depth", MAX_DEPTH)
  result = search(params, jax.random.key(key), graphdef=graphdef, prompt_tokens=tokens,
                  prompt_lengths=lengths, spec=TINY_SPEC, **kwargs)
  return jax.device_get(result)


class _Tree:
  """numpy view of a returned StepTree."""

  def __init__(self, tree):
    self.raw = tree
    cache = tree.cache
    self.live = np.asarray(cache.node_live)
    self.parent = np.asarray(cache.node_parent)
    self.depth = np.asarray(cache.node_depth)
    self.problem = np.asarray(cache.node_problem)
    self.value = np.asarray(tree.value)
    self.terminal = np.asarray(tree.terminal)
    self.failed = np.asarray(tree.failed)
    self.step_length = np.asarray(tree.step_length)

  def children(self, node):
    return [int(c) for c in np.nonzero(self.live & (self.parent == node))[0]]

  def expandable(self, node, max_depth=MAX_DEPTH):
    return bool(self.live[node] and not self.failed[node] and not self.terminal[node]
                and self.depth[node] < max_depth)

  def unique_tokens(self, b):
    """Tokens of the steps of problem b's live nodes (roots have none)."""
    mine = self.live & (self.problem == b) & (self.depth > 0)
    return int(self.step_length[mine].sum())


def _check_paths_and_pages(result):
  """Every kept node's root path is live and consistent, and every page's refcount equals the
  number of live page-table entries pointing at it (copies and releases balanced)."""
  tree = _Tree(result.tree)
  cache = result.tree.cache
  path = np.asarray(cache.node_path)
  for node in np.asarray(result.candidates).reshape(-1):
    if node < 0:
      continue
    for d in range(1, tree.depth[node] + 1):
      assert tree.live[path[node, d]] and tree.depth[path[node, d]] == d
      assert tree.parent[path[node, d]] == path[node, d - 1]
    assert path[node, tree.depth[node]] == node
  pages = np.asarray(cache.node_pages)[tree.live]
  expected = np.bincount(pages[pages >= 0], minlength=cache.num_pages)
  np.testing.assert_array_equal(np.asarray(cache.page_refcount), expected)


def _choice_reference(tree, candidates, scores):
  """Best-scoring terminal candidate, else best-scoring one, else -1 (per problem)."""
  out = []
  for nodes, score in zip(candidates, scores, strict=True):
    ok = [(s, n) for n, s in zip(nodes, score, strict=True) if n >= 0 and np.isfinite(s)]
    finished = [(s, n) for s, n in ok if tree.terminal[n]]
    pool = finished or ok
    out.append(max(pool, key=lambda x: x[0])[1] if pool else -1)
  return np.array(out)


def _assert_accounting(result, tree):
  for b, length in enumerate(LENGTHS):
    assert int(result.tokens_prefilled[b]) == length
    assert int(result.tokens_decoded[b]) == tree.unique_tokens(b)


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def sampled(policy, prompts):
  return _run(ls.sample_solutions, policy, prompts, num_samples=4)


def test_sample_solutions_are_n_chains_and_best_of_n_by_value(sampled):
  tree = _Tree(sampled.tree)
  candidates = np.asarray(sampled.candidates)
  assert candidates.shape == (len(LENGTHS), 4)
  for b in range(len(LENGTHS)):
    assert sorted(tree.children(b)) == sorted(
      int(node_path_at(sampled, n, 1)) for n in candidates[b])
    assert len(set(candidates[b].tolist())) == 4
    for node in candidates[b]:
      assert tree.terminal[node] or tree.depth[node] == MAX_DEPTH
      # a chain: every node on the path has exactly one child
      for d in range(1, tree.depth[node]):
        assert len(tree.children(node_path_at(sampled, node, d))) == 1
  np.testing.assert_array_equal(sampled.scores, tree.value[candidates])
  np.testing.assert_array_equal(sampled.chosen,
                                _choice_reference(tree, candidates, sampled.scores))
  _assert_accounting(sampled, tree)


def node_path_at(result, node, depth):
  return int(np.asarray(result.tree.cache.node_path)[node, depth])


def test_fixed_key_identical_other_key_differs_one_compile(sampled, policy, prompts):
  before = ls.trace_count("sample_solutions")
  again = _run(ls.sample_solutions, policy, prompts, num_samples=4)
  other = _run(ls.sample_solutions, policy, prompts, key=1, num_samples=4)
  new_prompts = make_prompts((6, 4, 7), width=max(LENGTHS), seed=3)
  fresh = _run(ls.sample_solutions, policy, new_prompts, num_samples=4)
  assert ls.trace_count("sample_solutions") == before
  assert not np.asarray(fresh.overflow).any()
  for field in ("candidates", "scores", "chosen"):
    np.testing.assert_array_equal(getattr(again, field), getattr(sampled, field))
  np.testing.assert_array_equal(again.tree.step_tokens, sampled.tree.step_tokens)
  texts = [node_token_ids(sampled.tree, int(n)) for n in np.asarray(sampled.candidates).ravel()]
  other_texts = [node_token_ids(other.tree, int(n)) for n in np.asarray(other.candidates).ravel()]
  assert texts != other_texts


def test_greedy_is_decode_greedy(policy, prompts):
  result = _run(ls.sample_solutions, policy, prompts, num_samples=1, sampling=GREEDY)
  graphdef, params = policy
  tokens, lengths = prompts
  flat = decode(graphdef, params.policy, jax.random.key(0), tokens=tokens, lengths=lengths,
                sampling=SamplingConfig(max_new_tokens=MAX_DEPTH * MAX_STEP_TOKENS,
                                        greedy=True))
  tree = _Tree(result.tree)
  for b in range(len(LENGTHS)):
    node = int(result.chosen[b])
    ids = node_token_ids(result.tree, node)
    assert ids == np.asarray(flat.tokens[b, :len(ids)]).tolist()
    # the search stopped at the first terminal step, or at max_depth
    steps = [node_step_ids(result.tree, node_path_at(result, node, d))
             for d in range(1, tree.depth[node] + 1)]
    assert all(EOS_ID not in s for s in steps[:-1])
    assert EOS_ID in steps[-1] or tree.depth[node] == MAX_DEPTH
    assert all(s[-1] in (STOP_ID, EOS_ID) or len(s) == MAX_STEP_TOKENS for s in steps)


@pytest.mark.slow  # a configuration of its own: one more compilation
def test_overflow_is_reported_per_problem(policy, prompts):
  capacity = TreeCapacity(max_nodes=len(LENGTHS) + 10, num_pages=10, page_len=4,
                          max_pages_per_node=8, max_depth=MAX_DEPTH)
  result = _run(ls.sample_solutions, policy, prompts, num_samples=4, capacity=capacity)
  assert np.asarray(result.overflow).any()
  tree = _Tree(result.tree)
  for node in np.asarray(result.chosen):
    assert node == -1 or (tree.live[node] and not tree.failed[node])


# ----------------------------------------------------------------------------- beam


@pytest.fixture(scope="module")
def beams_full(policy, prompts):
  return _run(ls.beam_search, policy, prompts, beam_width=3, expansions=2,
              release_pruned=False)


def test_beam_keeps_top_values_each_round(beams_full):
  """Replay from the whole tree: round r's candidates are the children of round r-1's live
  beams plus its finished beams; the kept beams are the top-W values among them."""
  tree = _Tree(beams_full.tree)
  history = np.asarray(beams_full.beams)
  width, expansions = 3, 2
  for b in range(len(LENGTHS)):
    previous = [b] * width
    rounds = 0
    for r in range(MAX_DEPTH):
      live = [n for n in previous if n >= 0 and tree.expandable(n)]
      if not live:
        break
      rounds += 1
      children = [c for p in sorted(set(live)) for c in tree.children(p)]
      assert len(children) == len(live) * expansions
      finished = [n for n in previous if n >= 0 and n not in live]
      candidates = finished + children
      kept = [int(n) for n in history[b, r] if n >= 0]
      assert len(set(kept)) == len(kept) == min(width, len(candidates))
      assert set(kept) <= set(candidates)
      np.testing.assert_array_equal(np.sort(tree.value[kept]),
                                    np.sort(tree.value[candidates])[-len(kept):])
      previous = list(history[b, r])
    assert rounds >= 1 and (history[b, rounds:] == -1).all()
    np.testing.assert_array_equal(beams_full.candidates[b], history[b, rounds - 1])
    assert not any(tree.expandable(n) for n in beams_full.candidates[b] if n >= 0)
  np.testing.assert_array_equal(
    beams_full.chosen, _choice_reference(tree, beams_full.candidates, beams_full.scores))
  _assert_accounting(beams_full, tree)


@pytest.mark.slow  # a configuration of its own: one more compilation
def test_beam_release_pruned_same_beams_fewer_nodes(beams_full, policy, prompts):
  pruned = _run(ls.beam_search, policy, prompts, beam_width=3, expansions=2)
  np.testing.assert_array_equal(pruned.scores, beams_full.scores)
  np.testing.assert_array_equal(pruned.tokens_decoded, beams_full.tokens_decoded)
  for b in range(len(LENGTHS)):
    for n_full, n_pruned in zip(beams_full.candidates[b], pruned.candidates[b], strict=True):
      assert node_token_ids(beams_full.tree, int(n_full)) == node_token_ids(pruned.tree,
                                                                             int(n_pruned))
    kept = [n for n in pruned.candidates[b] if n >= 0]
    assert len(set(kept)) == len(kept)
  assert (np.asarray(pruned.tree.cache.node_live).sum()
          < np.asarray(beams_full.tree.cache.node_live).sum())
  _check_paths_and_pages(pruned)


# ----------------------------------------------------------------------------- Q-guided


def test_q_guided_keeps_argmax_value_at_each_step(policy, prompts):
  result = _run(ls.q_guided_search, policy, prompts, num_candidates=3, release_pruned=False)
  tree = _Tree(result.tree)
  for b in range(len(LENGTHS)):
    node = int(result.chosen[b])
    assert node == int(result.candidates[b, 0]) and node >= 0
    assert tree.terminal[node] or tree.depth[node] == MAX_DEPTH
    path = [node_path_at(result, node, d) for d in range(tree.depth[node] + 1)]
    for parent, child in zip(path[:-1], path[1:], strict=True):
      siblings = tree.children(parent)
      assert len(siblings) == 3
      assert tree.value[child] == tree.value[siblings].max()
    expanded = {int(p) for p in tree.parent[tree.live & (tree.problem == b)] if p >= 0}
    assert expanded == set(path[:-1])
  _assert_accounting(result, tree)


# ----------------------------------------------------------------------------- particles


_resample = jax.jit(ls.resample_ancestors, static_argnames="method")


def test_resample_systematic_on_hand_set_weights():
  weights = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.25] * 4, [0.0, 0.0, 1.0, 0.0], [0.0] * 4])
  expected = [[0, 0, 1, 1], [0, 1, 2, 3], [2, 2, 2, 2], [0, 1, 2, 3]]
  for seed in range(5):
    np.testing.assert_array_equal(
      _resample(jax.random.key(seed), weights, method="systematic"), expected)
  multinomial = _resample(jax.random.key(0), weights, method="multinomial")
  np.testing.assert_array_equal(multinomial[2:], expected[2:])
  assert set(np.asarray(multinomial[0]).tolist()) <= {0, 1}


def test_resample_counts_and_frequencies():
  rng = np.random.default_rng(0)
  weights = rng.dirichlet(np.ones(8), size=200).astype(np.float32)
  ancestors = np.asarray(_resample(jax.random.key(1), jnp.asarray(weights)))
  counts = np.stack([np.bincount(a, minlength=8) for a in ancestors])
  # systematic: each particle j drawn floor or ceil of N * w_j times
  assert (counts >= np.floor(8 * weights - 1e-4)).all()
  assert (counts <= np.ceil(8 * weights + 1e-4)).all()
  rows = jnp.tile(jnp.array([[0.7, 0.3, 0.0, 0.0]]), (2000, 1))
  draws = np.asarray(_resample(jax.random.key(2), rows, method="multinomial"))
  assert set(np.unique(draws).tolist()) <= {0, 1}
  assert abs((draws == 0).mean() - 0.7) < 0.03


@pytest.fixture(scope="module")
def particles(policy, prompts):
  return _run(ls.particle_filter, policy, prompts, num_particles=4, temperature_weights=0.5)


def test_particle_weights_normalised_and_chosen(particles):
  tree = _Tree(particles.tree)
  candidates = np.asarray(particles.candidates)
  weights = np.asarray(particles.scores)
  assert candidates.shape == (len(LENGTHS), 4) and (candidates >= 0).all()
  for b in range(len(LENGTHS)):
    assert len(set(candidates[b].tolist())) == 4
    assert abs(weights[b].sum() - 1.0) < 1e-5
    logits = tree.value[candidates[b]].astype(np.float64) / 0.5
    reference = np.exp(logits - logits.max())
    np.testing.assert_allclose(weights[b], reference / reference.sum(), rtol=1e-5, atol=1e-6)
    assert all(tree.terminal[n] or tree.depth[n] == MAX_DEPTH for n in candidates[b])
  np.testing.assert_array_equal(particles.chosen,
                                _choice_reference(tree, candidates, weights))
  _check_paths_and_pages(particles)


# ----------------------------------------------------------------------------- best-first


@pytest.fixture(scope="module")
def best_first(policy, prompts):
  return _run(ls.best_first_search, policy, prompts, num_candidates=3, expansions_budget=12,
              lam=1.0, path_cost="log_prob")


def test_best_first_pops_in_priority_order(best_first):
  """A Python heap replay over the returned tree (f = summed step log-probs + value, in
  float32 as on the device) pops the same nodes in the same order and stops at the first
  terminal pop."""
  tree = _Tree(best_first.tree)
  log_prob = np.asarray(best_first.tree.log_prob)
  popped = np.asarray(best_first.candidates)
  stopped_at_terminal = 0
  for b in range(len(LENGTHS)):
    heap = [(-tree.value[b], b, np.float32(0.0))]
    for i in range(popped.shape[1]):
      if not heap:
        assert popped[b, i] == -1
        continue
      neg_f, node, g = heapq.heappop(heap)
      assert popped[b, i] == node
      np.testing.assert_allclose(best_first.scores[b, i], -neg_f, rtol=1e-5, atol=1e-5)
      if tree.terminal[node]:
        assert best_first.chosen[b] == node and (popped[b, i + 1:] == -1).all()
        stopped_at_terminal += 1
        break
      children = tree.children(node)
      steps = [tuple(node_step_ids(best_first.tree, c)) for c in children]
      assert len(set(steps)) == len(steps)      # duplicate siblings were dropped
      for c in children:
        child_g = np.float32(g + log_prob[c])
        heapq.heappush(heap, (-np.float32(child_g + tree.value[c]), c, child_g))
  assert stopped_at_terminal >= 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("search, kwargs, message", [
  (ls.sample_solutions, dict(num_samples=0), "num_samples=0"),
  (ls.beam_search, dict(beam_width=0, expansions=2), "beam_width=0"),
  (ls.beam_search, dict(beam_width=2, expansions=0), "expansions=0"),
  (ls.q_guided_search, dict(num_candidates=0), "num_candidates=0"),
  (ls.particle_filter, dict(num_particles=0), "num_particles=0"),
  (ls.particle_filter, dict(num_particles=2, temperature_weights=0.0), "temperature_weights"),
  (ls.particle_filter, dict(num_particles=2, temperature_weights=-1.0), "temperature_weights"),
  (ls.particle_filter, dict(num_particles=2, resampling="stratified"), "resampling"),
  (ls.best_first_search, dict(num_candidates=2, expansions_budget=0), "expansions_budget=0"),
  (ls.best_first_search, dict(num_candidates=2, expansions_budget=2, path_cost="x"),
   "path_cost"),
  (ls.sample_solutions, dict(num_samples=2, max_depth=0), "max_depth=0"),
])
def test_bad_sizes_raise_before_jit(policy, prompts, search, kwargs, message):
  before = ls.trace_count()
  with pytest.raises(ValueError, match=message):
    _run(search, policy, prompts, **kwargs)
  assert ls.trace_count() == before


def test_prompt_longer_than_context_raises(policy):
  long_prompts = make_prompts((250, 3))
  with pytest.raises(ValueError, match="exceeds the model context"):
    _run(ls.sample_solutions, policy, long_prompts, num_samples=2)


# ----------------------------------------------------------------------------- host side


def _solution(answer, score):
  return Solution(node=0, token_ids=(), text=None, answer=answer, score=score, finished=True)


def test_majority_and_weighted_majority_by_hand():
  solutions = [_solution("3", 0.1), _solution("5", 0.9), _solution("3", 0.2),
               _solution(None, 5.0), _solution("5", 0.05), _solution("3", 0.1)]
  assert ls.majority_answer(solutions) == "3"                  # 3 votes to 2
  assert ls.weighted_majority_answer(solutions) == "5"         # 0.95 to 0.4
  assert ls.weighted_majority_answer(solutions, [1, 0, 1, 0, 0, 0]) == "3"
  assert ls.weighted_majority_answer(solutions[:2] + [_solution("7", float("-inf"))]) == "5"
  with pytest.raises(ValueError, match="weight -0.5 of solution 1: expected weights >= 0"):
    ls.weighted_majority_answer(solutions[:2], [1.0, -0.5])
  assert ls.majority_answer([_solution(None, 1.0)]) is None
  with pytest.raises(ValueError, match="2 solutions but 1 weights"):
    ls.weighted_majority_answer(solutions[:2], [1.0])


def test_best_of_n_by_reward_by_hand():
  solutions = [_solution("3", 0.9), _solution("5", 0.1), _solution("7", 0.5)]
  best = ls.best_of_n_by_reward(solutions, lambda s: 1.0 if s.answer == "5" else 0.0)
  assert best is solutions[1]
  assert ls.best_of_n_by_reward(solutions, lambda s: 0.0) is solutions[0]
  assert ls.best_of_n_by_reward([], lambda s: 0.0) is None
