"""bench search: the baselines are functionally right and the JSON's ratios come from its timings.

References: `expand_steps` (the prefix-reusing expansion) for the no-prefix-reuse expansion; a
jaxpr with no matmul and a policy of None for the constant stub; the simulation count for the
Python-tree MCTS's root visits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_search_fixtures import GREEDY, SAMPLING, TINY_SPEC, make_prompts, tiny_policy

from qstar_jax.benchmarks.search import (
  SearchBenchConfig,
  bench_search,
  constant_step_expand,
  no_prefix_reuse_expand,
  python_tree_mcts,
)
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  expand_steps,
  init_step_tree,
  node_step_ids,
  tree_capacity,
)

B = 3
CAPACITY = tree_capacity(B, nodes_per_problem=12, max_depth=3,
                         max_step_tokens=TINY_SPEC.max_step_tokens)


@pytest.fixture(scope="module")
def policy():
  return tiny_policy()


def _two_expansions(expand_fn, graphdef, params, prompt_tokens, prompt_lengths, sampling):
  """Root -> 2 children each, then the first child -> 2 children: one jitted program."""

  @jax.jit
  def run(params, key, tokens, lengths):
    tree = init_step_tree(params, graphdef=graphdef, prompt_tokens=tokens,
                          prompt_lengths=lengths, capacity=CAPACITY, spec=TINY_SPEC)
    tree, first = expand_fn(params, key, tree, jnp.arange(B)[:, None], graphdef=graphdef,
                            spec=TINY_SPEC, sampling=sampling, num_children=2)
    tree, second = expand_fn(params, jax.random.fold_in(key, 1), tree, first[:, 0, :1],
                             graphdef=graphdef, spec=TINY_SPEC, sampling=sampling,
                             num_children=2)
    return tree, first, second

  return run(params, jax.random.key(3), prompt_tokens, prompt_lengths)


def test_no_prefix_reuse_gives_expand_steps_steps(policy):
  graphdef, params = policy
  tokens, lengths = make_prompts([5, 7, 3], width=8)
  reuse = no_prefix_reuse_expand
  ref, ref_first, ref_second = _two_expansions(expand_steps, graphdef, params, tokens, lengths,
                                               GREEDY)
  got, first, second = _two_expansions(
    functools.partial(reuse, prompt_tokens=np.asarray(tokens)), graphdef, params, tokens,
    lengths, GREEDY)
  np.testing.assert_array_equal(first, ref_first)
  np.testing.assert_array_equal(second, ref_second)
  nodes = np.concatenate([np.ravel(ref_first), np.ravel(ref_second)])
  assert np.all(nodes >= 0)
  for node in nodes:
    assert node_step_ids(got, int(node)) == node_step_ids(ref, int(node))
  np.testing.assert_array_equal(got.terminal, ref.terminal)
  np.testing.assert_array_equal(got.cache.tokens_decoded, ref.cache.tokens_decoded)
  np.testing.assert_allclose(got.value[nodes], ref.value[nodes], atol=1e-5)
  # Re-prefilled: the prompts, then each second-round parent's prompt + its own step again.
  first_len = np.asarray(ref.step_length)[np.asarray(ref_first)[:, 0, 0]]
  np.testing.assert_array_equal(got.cache.tokens_prefilled, 3 * np.asarray(lengths) + first_len)


def test_constant_stub_never_calls_the_model(policy):
  graphdef, params = policy
  tokens, lengths = make_prompts([4, 6, 2], width=6)
  tree = init_step_tree(params, graphdef=graphdef, prompt_tokens=tokens, prompt_lengths=lengths,
                        capacity=CAPACITY, spec=TINY_SPEC)
  no_model = PolicyValueParams(policy=None, value=None)   # any model call would fail on None

  def stub(tree):
    return constant_step_expand(no_model, jax.random.key(0), tree, jnp.arange(B)[:, None],
                                graphdef=graphdef, spec=TINY_SPEC, sampling=SAMPLING,
                                num_children=2)

  jaxpr = str(jax.make_jaxpr(stub)(tree))
  assert "dot_general" not in jaxpr
  new, children = jax.jit(stub)(tree)
  assert int(new.model_calls) == int(tree.model_calls)
  np.testing.assert_array_equal(children >= 0, True)
  t = TINY_SPEC.max_step_tokens
  np.testing.assert_array_equal(new.step_length[np.ravel(children)], t)
  np.testing.assert_array_equal(new.cache.tokens_decoded, 2 * t)
  np.testing.assert_array_equal(new.value[np.asarray(children)[:, 0, 0]], tree.value[:B])


def test_python_tree_mcts_visits_sum_to_simulations(policy):
  graphdef, params = policy
  tokens, lengths = make_prompts([5, 3], width=6)
  out = python_tree_mcts(params, jax.random.key(0), graphdef=graphdef, prompt_tokens=tokens,
                         prompt_lengths=lengths, spec=TINY_SPEC, sampling=SAMPLING,
                         num_actions=3, num_simulations=6, max_depth=3)
  np.testing.assert_array_equal(out.root_visits.sum(axis=1), 6)
  # One model call per expanded node: each root, then at most one per simulation.
  assert 2 < out.model_calls <= 2 * (6 + 1)
  assert out.tokens_prefilled >= 5 + 3


@pytest.mark.slow
def test_bench_search_json_ratios_come_from_its_timings(policy):
  graphdef, params = policy
  config = SearchBenchConfig(method="mcts", batch=2, candidates=2, simulations=2, prompt_len=6,
                             step_tokens=2, max_depth=2, repeats=1, baseline_batch=1)
  out = bench_search(nnx.merge(graphdef, params.policy), config)
  for key in ("simulations_per_s", "tokens_per_s", "speedup_vs_python", "prefix_reuse_speedup",
              "overhead_vs_decode", "bookkeeping_fraction", "value_overhead", "recompiles",
              "compile_s", "python_batch", "no_prefix_reuse_batch"):
    assert key in out, key
  assert out["recompiles"] == 0
  s, n = out["seconds"], out["tokens_decoded"]
  assert out["tokens_per_s"] == pytest.approx(n / s)
  assert out["simulations_per_s"] == pytest.approx(2 * 2 / s)
  assert out["stub_fraction"] == pytest.approx(out["stub_seconds"] / s)
  assert out["bookkeeping_fraction"] == pytest.approx(
    max(out["stub_seconds"] - out["prefill_seconds"], 0.0) / s)
  assert 0 < out["prefill_seconds"]
  assert out["value_overhead"] == pytest.approx((s - out["value_off_seconds"])
                                                / out["value_off_seconds"])
  assert out["overhead_vs_decode"] == pytest.approx(
    (s / n) / (out["decode_seconds"] / out["decode_tokens"]))
  assert out["batching_gain"] == pytest.approx(
    2 * out["decode_one_problem_seconds"] / out["decode_seconds"])
  # Baselines on 1 problem, compared per node expansion (problems * (simulations + 1)).
  assert out["speedup_vs_python"] == pytest.approx((2 * 3 / s) / (1 * 3 / out["python_seconds"]))
  assert out["prefix_reuse_speedup"] == pytest.approx(
    (2 * 3 / s) / (1 * 3 / out["no_prefix_reuse_seconds"]))
