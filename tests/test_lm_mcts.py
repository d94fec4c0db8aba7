"""MCTS over LM reasoning steps: mctx bookkeeping, token accounting against the returned tree,
root Q-values against flat forwards, overflow, bad input, one compile, annotation JSONL."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_search_fixtures import SAMPLING, TINY_SPEC, make_prompts, tiny_policy

from qstar_jax.data import preference_pairs_from_annotations
from qstar_jax.search.steps import lm_mcts
from qstar_jax.search.steps.lm_mcts import (
  mcts_annotations,
  mcts_step_search,
  read_mcts_annotations,
  write_mcts_annotations,
)
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  TreeCapacity,
  node_step_ids,
  node_token_ids,
)

B, K, S, DEPTH = 3, 3, 6, 3
LENGTHS = [5, 7, 3]


@pytest.fixture(scope="module")
def tiny():
  return tiny_policy()


def search(tiny, key=0, seed=0, **overrides):
  graphdef, params = tiny
  params = overrides.pop("params", params)
  tokens, lengths = make_prompts(LENGTHS, width=8, seed=seed)
  kwargs = dict(graphdef=graphdef, prompt_tokens=tokens, prompt_lengths=lengths,
                spec=TINY_SPEC, sampling=SAMPLING, num_actions=K, num_simulations=S,
                max_depth=DEPTH)
  kwargs.update(overrides)
  return jax.device_get(mcts_step_search(params, jax.random.key(key), **kwargs))


@pytest.fixture(scope="module")
def result(tiny):
  return search(tiny)


def test_visits_sum_to_simulations_and_chosen_action_valid(result):
  visits = np.asarray(result.root_visit_counts)
  assert visits.shape == (B, K)
  np.testing.assert_array_equal(visits.sum(axis=1), [S] * B)
  actions = np.asarray(result.decision_actions[0])
  assert np.all((0 <= actions) & (actions < K))
  cands = np.asarray(result.root_candidates)
  np.testing.assert_array_equal(result.chosen, cands[np.arange(B), actions])
  assert np.all(np.asarray(result.tree.usable)[result.chosen])
  assert np.all(np.asarray(result.tree.cache.node_problem)[result.chosen] == np.arange(B))
  assert not np.any(result.overflow)


def test_fixed_key_identical_different_key_differs(tiny, result):
  again = search(tiny)
  for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  other = search(tiny, key=1)
  assert not np.array_equal(other.tree.step_tokens, result.tree.step_tokens)


def test_prefill_once_and_tokens_decoded_are_the_tree_tokens(result):
  tree = result.tree
  np.testing.assert_array_equal(result.tokens_prefilled, LENGTHS)
  live = np.asarray(tree.cache.node_live)
  problem = np.asarray(tree.cache.node_problem)
  steps = np.asarray(tree.step_length)
  for b in range(B):
    mine = live & (problem == b)
    mine[b] = False                                     # the root holds the prompt
    assert int(result.tokens_decoded[b]) == int(steps[mine].sum())
    assert steps[mine].min() >= 1                       # every created node holds its step


def test_model_expands_exactly_the_nodes_mctx_creates(result):
  """StepTree nodes = roots + K candidates per expanded node, where the expanded nodes are the
  roots and the mctx nodes the simulations created that can be extended; each mctx node is
  cand[parent's node, action] and no StepTree node appears twice in the mctx tree."""
  tree, trees, cand = result.tree, result.search_trees, np.asarray(result.step_candidates)
  live = np.asarray(tree.cache.node_live)
  problem = np.asarray(tree.cache.node_problem)
  expandable = np.asarray(tree.expandable)
  for b in range(B):
    visited = np.flatnonzero(np.asarray(trees.node_visits[0, b]) > 0)
    nodes = np.asarray(trees.embeddings[0, b])[visited]
    assert nodes[0] == b and len(set(nodes.tolist())) == len(nodes)
    for i in visited[1:]:
      parent = int(trees.parents[0, b, i])
      action = int(trees.action_from_parent[0, b, i])
      assert trees.embeddings[0, b, i] == cand[trees.embeddings[0, b, parent], action]
    expanded = 1 + int(expandable[nodes[1:]].sum())
    assert int((live & (problem == b)).sum()) == 1 + K * expanded
    # Nodes with candidates are exactly the expanded ones: none was sampled twice.
    with_candidates = np.flatnonzero(np.any(cand >= 0, axis=1) & (problem == b) & live)
    assert sorted(with_candidates.tolist()) == sorted(
      [b] + [int(n) for n in nodes[1:] if expandable[n]])
  assert len(visited) <= S + 1


def test_candidates_are_the_searched_terminal_nodes_best_first(result):
  tree, trees = result.tree, result.search_trees
  terminal = np.asarray(tree.terminal) & np.asarray(tree.usable)
  value = np.asarray(tree.value)
  for b in range(B):
    nodes = np.asarray(trees.embeddings[0, b])[np.asarray(trees.node_visits[0, b]) > 0]
    expected = sorted({int(n) for n in nodes if terminal[n]}, key=lambda n: -value[n])
    if not expected:
      expected = [int(result.chosen[b])]
    got = [int(n) for n in result.candidates[b] if n >= 0]
    assert sorted(got) == sorted(expected)
    np.testing.assert_array_equal(result.scores[b, :len(got)], value[got])
    assert np.all(np.diff(value[got]) <= 0)


def test_one_compile_for_two_batches_of_the_same_shapes(tiny, result):
  before = lm_mcts._search._cache_size()
  second = search(tiny, seed=1)
  assert lm_mcts._search._cache_size() == before
  np.testing.assert_array_equal(second.root_visit_counts.sum(axis=1), [S] * B)


def test_root_q_values_are_the_candidates_values_by_flat_forward(tiny):
  """max_depth 1: every root candidate is a leaf, so its Q-value is the value head at its
  step's last token; the value head reads hidden feature 1. Brute force: a flat causal forward
  over prompt + step for each candidate. The pool is one page short: one problem overflows,
  its failed candidate is never chosen nor visited, the others are exact."""
  graphdef, params = tiny
  feature = 1
  value = {"kernel": jnp.zeros((64, 1), jnp.float32).at[feature, 0].set(1.0),
           "bias": jnp.zeros((1,), jnp.float32)}
  capacity = TreeCapacity(max_nodes=B * (K + 1), num_pages=B * K - 1, page_len=16,
                          max_pages_per_node=2, max_depth=1)
  res = search(tiny, params=PolicyValueParams(params.policy, value), max_depth=1,
               num_simulations=K, capacity=capacity)
  model = nnx.merge(graphdef, params.policy)
  tokens, _ = make_prompts(LENGTHS, width=8)
  failed = np.asarray(res.tree.failed)
  cands = np.asarray(res.root_candidates)
  visits = np.asarray(res.root_visit_counts)
  q = np.asarray(res.root_qvalues)
  assert np.any(res.overflow)
  for b in range(B):
    ok = (cands[b] >= 0) & ~failed[np.maximum(cands[b], 0)]
    assert bool(res.overflow[b]) == (not ok.all())
    assert ok[res.decision_actions[0, b]]
    np.testing.assert_array_equal(visits[b][~ok], 0)
    brute = []
    for node in cands[b][ok]:
      seq = list(np.asarray(tokens[b, :LENGTHS[b]])) + node_token_ids(res.tree, int(node))
      hidden, _ = model.hidden_states(jnp.asarray([seq], jnp.int32))
      brute.append(float(hidden[0, -1, feature]))
    brute = np.array(brute)
    assert np.all(visits[b][ok] >= 1)
    np.testing.assert_allclose(q[b][ok], brute, atol=1e-5)
    for i in range(len(brute)):       # the root's Q ordering is the brute-force ordering
      for j in range(len(brute)):
        if brute[i] > brute[j] + 1e-4:
          assert q[b][ok][i] > q[b][ok][j]


@pytest.mark.parametrize("overrides, message", [
  (dict(num_actions=0), "num_actions=0"),
  (dict(num_simulations=0), "num_simulations=0"),
  (dict(max_depth=0), "max_depth=0"),
  (dict(policy="uct"), "policy='uct'"),
  (dict(value_source="oracle"), "value_source='oracle'"),
  (dict(episode=True, max_decisions=0), "max_decisions=0"),
  (dict(prompt_lengths=jnp.asarray([5, 0, 3], jnp.int32)), r"prompt lengths \[0\]"),
  (dict(prompt_tokens=jnp.ones((B, 300), jnp.int32),
        prompt_lengths=jnp.asarray([5, 300, 3], jnp.int32)), "max_seq_len 256"),
  (dict(prompt_tokens=jnp.ones((B, 250), jnp.int32),          # fits, but not with its steps
        prompt_lengths=jnp.asarray([5, 250, 3], jnp.int32)),
   r"prompt of 250 tokens \+ max_depth=\d+ steps .* expected <= the model's max_seq_len 256"),
])
def test_bad_input_raises_before_jit(tiny, overrides, message):
  before = lm_mcts._search._cache_size()
  with pytest.raises(ValueError, match=message):
    search(tiny, **overrides)
  assert lm_mcts._search._cache_size() == before


def test_annotations_give_step_preference_pairs(result):
  """The annotation records feed `data.preference_pairs_from_annotations`: at the root depth
  the pair is the highest- and lowest-Q visited siblings after the prompt."""
  tokens, _ = make_prompts(LENGTHS, width=8, seed=0)
  prompts = [[int(t) for t in np.asarray(tokens[b, :LENGTHS[b]])] for b in range(B)]
  records = mcts_annotations(result, prompt_ids=prompts)
  assert [r["prompt_ids"] for r in records] == prompts
  extraction = preference_pairs_from_annotations(records)
  roots = {p.record_index: p for p in extraction.pairs if p.depth == 0}
  for b in range(B):
    q = np.asarray(result.root_qvalues[b])
    visited = np.asarray(result.root_visit_counts[b]) > 0
    if visited.sum() < 2 or np.ptp(q[visited]) == 0:
      continue
    best = int(np.flatnonzero(visited)[np.argmax(q[visited])])
    worst = int(np.flatnonzero(visited)[np.argmin(q[visited])])
    pair = roots[b]
    assert list(pair.context_ids) == prompts[b]
    assert list(pair.chosen_ids) == node_step_ids(result.tree, int(result.root_candidates[b, best]))
    assert list(pair.rejected_ids) == node_step_ids(result.tree,
                                                    int(result.root_candidates[b, worst]))
    assert pair.chosen_q == pytest.approx(float(q[best]), abs=1e-6)
  assert roots, "no root pair in any problem"


class _Ids:
  """A tokenizer stub: ids as space-separated numbers."""

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def test_annotations_round_trip(result, tmp_path):
  records = mcts_annotations(result, tokenizer=_Ids(), problems=[{"id": b} for b in range(B)])
  path = write_mcts_annotations(tmp_path / "mcts.jsonl", records)
  back = read_mcts_annotations(path)
  assert back == records and len(back) == B
  tree = result.tree
  for b, rec in enumerate(back):
    assert rec["problem"] == {"id": b} and rec["chosen"] == int(result.chosen[b])
    path_nodes = [s["node"] for s in rec["trajectory"]]
    assert path_nodes[0] == rec["chosen"]
    assert rec["ids"] == node_token_ids(tree, path_nodes[-1])
    assert rec["text"] == _Ids().decode(rec["ids"])
    root = rec["depths"][0]
    assert root["parent"] == b and root["chosen"] == int(result.decision_actions[0, b])
    for sib in root["siblings"]:
      a = sib["action"]
      assert sib["node"] == int(result.root_candidates[b, a])
      assert sib["ids"] == node_step_ids(tree, sib["node"])
      assert sib["visits"] == int(result.root_visit_counts[b, a])
      if sib["visits"]:
        assert sib["q"] == pytest.approx(float(result.root_qvalues[b, a]), abs=1e-6)
      else:
        assert sib["q"] is None
    # Along the trajectory each depth's chosen sibling is the next trajectory node.
    for depth, rec_depth in enumerate(rec["depths"]):
      chosen = next(s for s in rec_depth["siblings"] if s["action"] == rec_depth["chosen"])
      assert chosen["node"] == path_nodes[depth]
      assert rec_depth["depth"] == depth


@pytest.mark.slow
def test_episode_with_rollout_values_and_muzero(tiny):
  """An episode chains its decisions (each root = the previous choice, candidates reused),
  ends at a terminal or max-depth node, and still decodes every token once."""
  res = search(tiny, episode=True, value_source="rollout", policy="muzero")
  roots = np.asarray(res.decision_roots)
  actions = np.asarray(res.decision_actions)
  cand = np.asarray(res.step_candidates)
  tree = res.tree
  for b in range(B):
    np.testing.assert_array_equal(res.decision_visit_counts[0, b].sum(), S)
    node, d = b, 0
    while d < roots.shape[0] and roots[d, b] >= 0:
      assert roots[d, b] == node
      node = cand[node, actions[d, b]]
      d += 1
    assert node == res.chosen[b]
    assert bool(tree.terminal[node]) or int(tree.cache.node_depth[node]) == DEPTH
    live = np.asarray(tree.cache.node_live) & (np.asarray(tree.cache.node_problem) == b)
    live[b] = False
    assert int(res.tokens_decoded[b]) == int(np.asarray(tree.step_length)[live].sum())
  assert not np.any(res.overflow)
