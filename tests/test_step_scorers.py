"""Node scorers of the step searches: path tokens, the step-DPO Q-value, the verifier reward.

References: paths are rebuilt on the host from the prompt ids and `node_step_ids` of each
ancestor; Q-values by a plain `apply` forward over the exact host-built sequence and
`losses.lm.token_log_probs`; rewards by `envs.arithmetic.arithmetic_reward` of the decoded text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_search_fixtures import SAMPLING, TINY_SPEC, make_prompts, tiny_policy

from qstar_jax.envs.arithmetic import (
  arithmetic_reward,
  generate_problems,
  policy_prompt,
  stated_answer_reward,
)
from qstar_jax.losses.lm import token_log_probs
from qstar_jax.models.arithmetic_policy import load_arithmetic_policy
from qstar_jax.models.llama import apply, apply_hidden
from qstar_jax.search.steps import lm_searches
from qstar_jax.search.steps.lm_mcts import mcts_annotations, mcts_step_search
from qstar_jax.search.steps.methods import pad_prompts
from qstar_jax.search.steps.scorers import (
  LogRatioQ,
  ModelValue,
  PathLogRatio,
  StepVerifier,
  VerifierReward,
  encode_answers,
  model_value_params,
  path_tokens,
  q_model_value_params,
  scored_expand,
  step_verifier_value_params,
  verifier_value_params,
  zero_value,
)
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  StepSpec,
  node_step_ids,
  node_token_ids,
)

PROMPT_LENGTHS = (3, 6)
MAX_DEPTH = 3
BETA = 0.5


@pytest.fixture(scope="module")
def tiny():
  return tiny_policy()


@pytest.fixture(scope="module")
def searched(tiny):
  """Q-guided search scored by LogRatioQ, pruned candidates kept: a tree of depth 0..3 with
  4 candidates per round, for prompts of two lengths."""
  graphdef, params = tiny
  _, other = tiny_policy(1)
  tokens, lengths = make_prompts(PROMPT_LENGTHS, width=8, seed=4)
  value = q_model_value_params(params.policy, other.policy, tokens, lengths)
  search = functools.partial(
    lm_searches.q_guided_search, PolicyValueParams(policy=params.policy, value=value),
    graphdef=graphdef, prompt_tokens=tokens, prompt_lengths=lengths, spec=TINY_SPEC,
    sampling=SAMPLING, num_candidates=4, max_depth=MAX_DEPTH, release_pruned=False,
    value_fn=zero_value)
  before = lm_searches.trace_count("q_guided_search")
  result = search(jax.random.key(2), expand_fn=scored_expand(LogRatioQ(graphdef, beta=BETA)))
  search(jax.random.key(3), expand_fn=scored_expand(LogRatioQ(graphdef, beta=BETA)))
  traces = lm_searches.trace_count("q_guided_search") - before
  nodes = np.flatnonzero(np.asarray(result.tree.usable))
  return result, tokens, lengths, nodes, other, traces


@jax.jit
def _plain_log_probs(params, tokens):
  """[M, L - 1] log pi(tokens[:, t + 1] | tokens[:, :t + 1]) by a plain forward (no cache)."""
  logits, _ = apply(tiny_policy()[0], params, tokens)
  return token_log_probs(logits[:, :-1], tokens[:, 1:])


def _host_path(tree, node, prompt_tokens, prompt_lengths):
  """(prompt + every step root..node as a list, index of the node's own first step token)."""
  problem = int(tree.cache.node_problem[node])
  ids = [int(i) for i in np.asarray(prompt_tokens[problem, :int(prompt_lengths[problem])])]
  ids += node_token_ids(tree, node)
  return ids, len(ids) - len(node_step_ids(tree, node))


def _reference_q(q_params, ref_params, tree, nodes, prompt_tokens, prompt_lengths, beta):
  """[M] beta * mean over each node's own step of log pi_q - log pi_ref, by plain forwards of
  the host-built sequences (padded after their end: causal, so the padding is never read)."""
  paths = [_host_path(tree, int(n), prompt_tokens, prompt_lengths) for n in nodes]
  width = max(len(ids) for ids, _ in paths)
  tokens = np.zeros((len(paths), width), np.int32)
  for row, (ids, _) in enumerate(paths):
    tokens[row, :len(ids)] = ids
  ratio = np.asarray(_plain_log_probs(q_params, jnp.asarray(tokens))
                     - _plain_log_probs(ref_params, jnp.asarray(tokens)))
  return np.asarray([beta * ratio[row, start - 1:len(ids) - 1].mean() if len(ids) > start
                     else 0.0 for row, (ids, start) in enumerate(paths)])


def test_path_tokens_equal_the_host_reconstruction(searched):
  result, tokens, lengths, nodes, _, _ = searched
  tree = result.tree
  depths = np.asarray(tree.cache.node_depth)[nodes]
  assert set(depths.tolist()) == {0, 1, 2, 3}
  width = 8 + MAX_DEPTH * TINY_SPEC.max_step_tokens
  paths = jax.jit(path_tokens, static_argnames=("width", "pad_id"))(
    tree, jnp.asarray(np.append(nodes, -1)), tokens, lengths, width=width, pad_id=7)
  for row, node in enumerate(nodes):
    ids, start = _host_path(tree, int(node), tokens, lengths)
    assert int(paths.lengths[row]) == len(ids)
    assert int(paths.step_start[row]) == start
    assert int(paths.prompt_length[row]) == PROMPT_LENGTHS[int(tree.cache.node_problem[node])]
    assert np.asarray(paths.tokens[row]).tolist() == ids + [7] * (width - len(ids))
  assert int(paths.lengths[-1]) == 0 and np.all(np.asarray(paths.tokens[-1]) == 7)


def test_log_ratio_q_equals_plain_forwards(searched):
  result, tokens, lengths, nodes, other, _ = searched
  tree = result.tree
  graphdef, params = tiny_policy()
  scorer = jax.jit(LogRatioQ(graphdef, beta=BETA))
  values = scorer(q_model_value_params(params.policy, other.policy, tokens, lengths), tree,
                  jnp.asarray(nodes))
  expected = _reference_q(params.policy, other.policy, tree, nodes, tokens, lengths, BETA)
  np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-5, atol=1e-6)
  # Roots score 0; every step has a nonzero log-ratio under two different models.
  assert np.array_equal(np.asarray(values) != 0, np.asarray(tree.cache.node_depth)[nodes] > 0)
  same = scorer(q_model_value_params(params.policy, params.policy, tokens, lengths), tree,
                jnp.asarray(nodes))
  assert np.all(np.asarray(same) == 0.0)


def test_step_alone_log_ratio_q_equals_plain_forwards_of_the_step(searched):
  """step_alone_bos: beta * mean over the step of log pi_q - log pi_ref on [bos] + the node's
  own step ids alone (host-built), whatever the prompt and the ancestors."""
  result, tokens, lengths, nodes, other, _ = searched
  tree = result.tree
  graphdef, params = tiny_policy()
  bos = 5
  values = jax.jit(LogRatioQ(graphdef, beta=BETA, step_alone_bos=bos))(
    q_model_value_params(params.policy, other.policy, tokens, lengths), tree,
    jnp.asarray(np.append(nodes, -1)))
  rows = [[bos, *node_step_ids(tree, int(n))] for n in nodes]
  host = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for row, ids in enumerate(rows):
    host[row, :len(ids)] = ids
  ratio = np.asarray(_plain_log_probs(params.policy, jnp.asarray(host))
                     - _plain_log_probs(other.policy, jnp.asarray(host)))
  expected = [BETA * ratio[row, :len(ids) - 1].mean() if len(ids) > 1 else 0.0
              for row, ids in enumerate(rows)]
  np.testing.assert_allclose(np.asarray(values[:-1]), expected, rtol=1e-5, atol=1e-6)
  assert float(values[-1]) == 0.0
  # Not the path's Q: the same nodes read with their prompt and ancestors score otherwise.
  deep = np.asarray(tree.cache.node_depth)[nodes] > 1
  path_q = _reference_q(params.policy, other.policy, tree, nodes, tokens, lengths, BETA)
  assert not np.allclose(np.asarray(values[:-1])[deep], path_q[deep], atol=1e-4)


def test_path_log_ratio_and_model_value_equal_plain_forwards(searched):
  """PathLogRatio = beta * sum of log pi_prm - log pi_ref over all solution tokens so far;
  ModelValue = head . (final-normed hidden after the node's last token); by plain forwards."""
  result, tokens, lengths, nodes, other, _ = searched
  tree = result.tree
  graphdef, params = tiny_policy()
  paths = [_host_path(tree, int(n), tokens, lengths) for n in nodes]
  width = max(len(ids) for ids, _ in paths)
  host = np.zeros((len(paths), width), np.int32)
  for row, (ids, _) in enumerate(paths):
    host[row, :len(ids)] = ids
  ratio = np.asarray(_plain_log_probs(params.policy, jnp.asarray(host))
                     - _plain_log_probs(other.policy, jnp.asarray(host)))
  prompt = [PROMPT_LENGTHS[int(tree.cache.node_problem[n])] for n in nodes]
  expected = [BETA * ratio[row, prompt[row] - 1:len(ids) - 1].sum()
              for row, (ids, _) in enumerate(paths)]
  value = q_model_value_params(params.policy, other.policy, tokens, lengths)
  got = jax.jit(PathLogRatio(graphdef, beta=BETA))(value, tree, jnp.asarray(nodes))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  assert np.array_equal(np.asarray(got) != 0, np.asarray(tree.cache.node_depth)[nodes] > 0)

  rng = np.random.default_rng(0)
  head = {"kernel": rng.normal(size=(np.asarray(tree.hidden).shape[1], 1)).astype(np.float32),
          "bias": np.array([0.25], np.float32)}
  hidden, _ = apply_hidden(graphdef, other.policy, jnp.asarray(host))
  last = np.asarray(hidden)[np.arange(len(paths)), [len(ids) - 1 for ids, _ in paths]]
  got = jax.jit(ModelValue(graphdef))(model_value_params(other.policy, head, tokens, lengths),
                                      tree, jnp.asarray(nodes))
  np.testing.assert_allclose(np.asarray(got), last @ head["kernel"][:, 0] + 0.25, rtol=1e-5,
                             atol=1e-5)
  # With the policy's own weights it reads the tree's own hidden states (linear_value's input).
  own = jax.jit(ModelValue(graphdef))(model_value_params(params.policy, head, tokens, lengths),
                                      tree, jnp.asarray(nodes))
  np.testing.assert_allclose(np.asarray(own), np.asarray(tree.hidden)[nodes] @ head["kernel"][:, 0]
                             + 0.25, rtol=1e-4, atol=1e-4)


def test_q_guided_search_keeps_the_highest_q_candidate(searched):
  result, tokens, lengths, _, other, traces = searched
  params = tiny_policy()[1]
  assert traces == 1           # equal scorers: the second search reused the program
  tree = result.tree
  parent_of = np.asarray(tree.cache.node_parent)
  usable = np.asarray(tree.usable)
  rounds = not_first = 0
  for b in range(len(PROMPT_LENGTHS)):
    path = [int(n) for n in np.asarray(tree.cache.node_path[int(result.chosen[b])]) if n >= 0]
    for parent, kept in zip(path[:-1], path[1:], strict=True):
      candidates = np.flatnonzero((parent_of == parent) & usable)
      q = _reference_q(params.policy, other.policy, tree, candidates, tokens, lengths, BETA)
      np.testing.assert_allclose(np.asarray(tree.value)[candidates], q, rtol=1e-5, atol=1e-6)
      assert kept == candidates[int(np.argmax(q))]
      rounds += 1
      not_first += kept != candidates[0]
  # The scores decide: the first-decoded candidate (what zero values would keep) is not always
  # the kept one.
  assert rounds >= 4 and not_first >= 1


def test_bad_input_raises_clear_errors(searched, tiny):
  result, tokens, lengths, nodes, _, _ = searched
  tree = result.tree
  graphdef, params = tiny
  with pytest.raises(ValueError, match="reference answer '123456' .* 6 bytes"):
    encode_answers(["12", "123456"], max_answer_chars=4)
  with pytest.raises(ValueError, match="not a number"):
    encode_answers(["twelve"])
  with pytest.raises(ValueError, match=r"width=10: expected an int >= .* = 20"):
    path_tokens(tree, jnp.asarray(nodes), tokens, lengths, width=10)
  value = q_model_value_params(params.policy, params.policy, tokens, lengths)
  del value["reference"]
  with pytest.raises(ValueError, match=r"LogRatioQ: value_params lacks \['reference'\]"):
    LogRatioQ(graphdef, beta=BETA)(value, tree, jnp.asarray(nodes))
  with pytest.raises(ValueError, match=r"VerifierReward: value_params lacks \['answers'\]"):
    VerifierReward(None)({"prompt_tokens": tokens, "prompt_lengths": lengths}, tree,
                         jnp.asarray(nodes))
  with pytest.raises(ValueError, match="beta=0"):
    LogRatioQ(graphdef, beta=0)
  assert scored_expand(LogRatioQ(graphdef, beta=BETA)) == scored_expand(
    LogRatioQ(graphdef, beta=BETA))
  assert hash(scored_expand(VerifierReward(tree))) == hash(scored_expand(VerifierReward(tree)))


# ----------------------------------------------------------------------------- verifier


class _SumTokenizer:
  """decode(ids) = "The answer is <sum(ids) % 3>.": a text that depends on every id decoded."""

  def decode(self, ids):
    return f"The answer is {sum(ids) % 3}."


def test_verifier_reward_grades_the_terminal_nodes_solutions(searched):
  result, tokens, lengths, nodes, _, _ = searched
  tree = result.tree
  references = ["1", "2"]
  tokenizer = _SumTokenizer()
  scorer = jax.jit(VerifierReward(tokenizer, max_answer_chars=4))
  values = np.asarray(scorer(verifier_value_params(tokens, lengths, references,
                                                   max_answer_chars=4),
                             tree, jnp.asarray(np.append(nodes, -1))))
  expected = [stated_answer_reward(tokenizer.decode(node_token_ids(tree, int(n))),
                                   references[int(tree.cache.node_problem[n])])
              if tree.terminal[n] else 0.0 for n in nodes]
  np.testing.assert_array_equal(values, [*expected, 0.0])
  terminal = np.asarray(tree.terminal)[nodes]
  assert 0 < values.sum() < terminal.sum()           # right and wrong terminal nodes


def _leaves_below(tree, node):
  """Usable nodes of node's subtree (itself included) that have no usable child."""
  usable = np.asarray(tree.usable)
  paths = np.asarray(tree.cache.node_path)
  below = usable & np.any(paths == node, axis=1)
  has_child = np.zeros_like(usable)
  parents = np.asarray(tree.cache.node_parent)[usable]
  has_child[parents[parents >= 0]] = True
  return np.flatnonzero(below & ~has_child)


@pytest.mark.slow
def test_verifier_reward_drives_mcts_with_outcome_rollouts():
  policy = load_arithmetic_policy()
  problems = generate_problems(11, 3, split="train")
  prompts = [policy.prompt_ids(policy_prompt(p.question, prompt_format=policy.prompt_format))
             for p in problems]
  tokens, lengths = pad_prompts(prompts, bucket=8, pad_id=policy.pad_id)
  spec = StepSpec(stop_ids=(policy.newline_id,), eos_ids=(policy.eos_id,), max_step_tokens=24,
                  pad_id=policy.pad_id)
  value = verifier_value_params(tokens, lengths, [str(p.answer) for p in problems])
  result = mcts_step_search(
    PolicyValueParams(policy=policy.params, value=value), jax.random.key(0),
    graphdef=policy.graphdef, prompt_tokens=tokens, prompt_lengths=lengths, spec=spec,
    sampling=SAMPLING.replace(temperature=1.0), num_actions=3, num_simulations=6, max_depth=7,
    value_source="rollout", expand_fn=scored_expand(VerifierReward(policy.tokenizer)),
    value_fn=zero_value)
  tree = jax.device_get(result.tree)
  values = np.asarray(tree.value)
  terminal = 0
  for node in np.flatnonzero(np.asarray(tree.usable)):
    if tree.terminal[node]:
      problem = problems[int(tree.cache.node_problem[node])]
      text = policy.tokenizer.decode(node_token_ids(tree, int(node)))
      assert values[node] == arithmetic_reward(text, problem), text
      terminal += 1
    else:
      assert values[node] == 0.0
  assert terminal >= 3 and 0 < values.sum() < terminal     # right and wrong solutions both
  checked = []
  for record in mcts_annotations(result, tokenizer=policy.tokenizer):
    for depth in record["depths"]:
      for sibling in depth["siblings"]:
        if sibling["q"] is None:
          continue
        assert 0.0 <= sibling["q"] <= 1.0
        outcomes = set(values[_leaves_below(tree, sibling["node"])].tolist())
        if len(outcomes) == 1:       # every end below it was right (1) or wrong (0)
          np.testing.assert_allclose(sibling["q"], outcomes.pop(), atol=1e-6)
          checked.append(sibling["q"])
  assert 0.0 in checked and 1.0 in checked


def test_step_verifier_is_the_product_of_per_step_probabilities(searched):
  """StepVerifier(node) = prod over the node's steps of sigmoid(head . hidden at the last token
  of [BOS] + that step alone), by plain forwards of host-built rows; roots 0."""
  result, tokens, lengths, nodes, other, _ = searched
  tree = result.tree
  graphdef, _ = tiny_policy()
  rng = np.random.default_rng(1)
  head = {"kernel": rng.normal(0.0, 0.5, (np.asarray(tree.hidden).shape[1], 1)).astype(np.float32),
          "bias": np.array([0.3], np.float32)}
  bos = 5
  value_params = step_verifier_value_params(other.policy, head)
  # The scorer reads each parent's value from the tree: fill it depth by depth as a search would.
  depth = np.asarray(tree.cache.node_depth)
  scorer = jax.jit(StepVerifier(graphdef, bos_id=bos))
  for d in range(1, MAX_DEPTH + 1):
    level = jnp.asarray(nodes[depth[nodes] == d])
    tree = tree.replace(value=tree.value.at[level].set(scorer(value_params, tree, level)))
  got = np.asarray(scorer(value_params, tree, jnp.asarray(nodes)))

  def p_step(step):
    ids = np.asarray([[bos, *step]], np.int32)
    hidden, _ = apply_hidden(graphdef, other.policy, jnp.asarray(ids))
    return 1 / (1 + np.exp(-(np.asarray(hidden)[0, -1] @ head["kernel"][:, 0] + 0.3)))

  parent = np.asarray(tree.cache.node_parent)
  for row, node in enumerate(nodes):
    expected, n = 0.0 if depth[node] == 0 else 1.0, int(node)
    while depth[n] > 0:
      expected *= p_step(node_step_ids(tree, n))
      n = int(parent[n])
    np.testing.assert_allclose(got[row], expected, rtol=1e-5, atol=1e-7)
  assert np.all((got > 0) == (depth[nodes] > 0)) and np.all(got < 1)
