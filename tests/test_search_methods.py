"""search.steps.methods: dispatch by name, prompt padding, answers read on the host."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from lm_search_fixtures import TINY_SPEC, make_prompts, tiny_policy

from qstar_jax.search.steps.methods import (
  SearchBudget,
  method_answers,
  pad_prompts,
  run_method,
  stated_answer,
)
from qstar_jax.search.steps.result import format_tree, read_solutions


class DigitTokenizer:
  """Decodes ids to a text whose stated answer is (sum of ids) mod 3, or no answer when the
  solution's ids sum to a multiple of 7: a deterministic stand-in for a real tokenizer."""

  def decode(self, ids):
    ids = list(ids)
    if sum(ids) % 7 == 0:
      return "I do not know"
    return f"work {ids}\nThe answer is {sum(ids) % 3}"


@pytest.fixture(scope="module")
def majority_result():
  graphdef, params = tiny_policy()
  tokens, lengths = make_prompts([5, 8, 6], seed=3)
  budget = SearchBudget(num_samples=5, max_depth=3)
  return run_method("majority", params, jax.random.key(0), graphdef=graphdef,
                    prompt_tokens=tokens, prompt_lengths=lengths, spec=TINY_SPEC, budget=budget)


def test_majority_votes_over_the_candidates_stated_answers(majority_result):
  tok = DigitTokenizer()
  got = method_answers("majority", majority_result, tokenizer=tok)
  solutions = read_solutions(majority_result, tokenizer=tok, extract_answer=stated_answer)
  assert len(got) == 3
  for (answer, text), (_, candidates) in zip(got, solutions, strict=True):
    assert len(candidates) == 5
    stated = [stated_answer(tok.decode(c.token_ids)) for c in candidates]
    counts = collections.Counter(a for a in stated if a is not None)
    if not counts:
      assert answer is None and text is None
      continue
    best = max(counts.values())
    # The winner has the most votes; among ties, the first one stated.
    assert answer == next(a for a in stated if a is not None and counts[a] == best)
    assert stated_answer(text) == answer


def test_best_of_n_answers_with_the_chosen_solution(majority_result):
  tok = DigitTokenizer()
  got = method_answers("best_of_n", majority_result, tokenizer=tok)
  chosen = np.asarray(majority_result.chosen)
  for b, (answer, text) in enumerate(got):
    if chosen[b] < 0:
      assert (answer, text) == (None, None)
      continue
    # The chosen node is the best-valued terminal candidate, else the best-valued one.
    cands = np.asarray(majority_result.candidates[b])
    values = np.asarray(majority_result.tree.value)[cands]
    terminal = np.asarray(majority_result.tree.terminal)[cands]
    pool = np.flatnonzero(terminal) if terminal.any() else np.arange(len(cands))
    assert chosen[b] == cands[pool[np.argmax(values[pool])]]
    assert answer == stated_answer(text)


def test_format_tree_lists_every_node_of_the_problem(majority_result):
  tree = majority_result.tree
  text = format_tree(tree, 1, tokenizer=DigitTokenizer(), chosen=int(majority_result.chosen[1]))
  problem = np.asarray(tree.cache.node_problem)
  depth = np.asarray(tree.cache.node_depth)
  nodes = np.flatnonzero(np.asarray(tree.cache.node_live) & (problem == 1) & (depth > 0))
  assert len(text.splitlines()) == 1 + len(nodes)
  assert text.count("*") == int(depth[int(majority_result.chosen[1])])


def test_pad_prompts_buckets_the_width():
  tokens, lengths = pad_prompts([[1, 2, 3], [4] * 33], bucket=16, pad_id=9)
  assert tokens.shape == (2, 48)
  np.testing.assert_array_equal(lengths, [3, 33])
  np.testing.assert_array_equal(tokens[0, :4], [1, 2, 3, 9])
  with pytest.raises(ValueError, match=r"lengths \[2, 0\]"):
    pad_prompts([[1, 2], []])


def test_unknown_method_is_named():
  graphdef, params = tiny_policy()
  tokens, lengths = make_prompts([4])
  with pytest.raises(ValueError, match="method 'dfs'"):
    run_method("dfs", params, jax.random.key(0), graphdef=graphdef, prompt_tokens=tokens,
               prompt_lengths=lengths, spec=TINY_SPEC, budget=SearchBudget())
