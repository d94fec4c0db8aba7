"""StepTree / expand_steps against flat recomputation, plain decoding and brute force."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_search_fixtures import (
  EOS_ID,
  GREEDY,
  MAX_STEP_TOKENS,
  PAD_ID,
  SAMPLING,
  STOP_ID,
  TINY_SPEC,
  make_prompts,
  tiny_policy,
)

from qstar_jax.models import apply, decode, sample_tokens
from qstar_jax.models.tree_cache import fork_nodes, tree_step
from qstar_jax.search.steps.step_tree import (
  StepSpec,
  TreeCapacity,
  copy_steps,
  expand_steps,
  init_step_tree,
  linear_value,
  node_token_ids,
  release_steps,
  step_contains,
  tree_capacity,
)

PAGE_LEN = 3   # small pages: most nodes end inside a partial page


@pytest.fixture(scope="module")
def policy():
  return tiny_policy()


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "spec"))
def _grow(params, key, prompts, lengths, *, graphdef, capacity, spec):
  """A depth-4 tree with forks of 3 and 2, a resample (copy) and a pruned leaf (release)."""
  expand = functools.partial(expand_steps, graphdef=graphdef, spec=spec, sampling=SAMPLING)
  b = prompts.shape[0]
  tree = init_step_tree(params, graphdef=graphdef, prompt_tokens=prompts,
                        prompt_lengths=lengths, capacity=capacity, spec=spec)
  keys = jax.random.split(key, 4)
  tree, c1 = expand(params, keys[0], tree, jnp.arange(b)[:, None], num_children=3)
  tree, c2 = expand(params, keys[1], tree, c1[:, 0, :], num_children=2)          # [B, 3, 2]
  # Resample: the last grandchild of each problem becomes a copy of its first one; the
  # second-to-last is pruned.
  g = c2.reshape(b, 6)
  tree = copy_steps(tree, g[:, 0], g[:, 5])
  tree = release_steps(tree, g[:, 4])
  tree, c3 = expand(params, keys[2], tree, g[:, jnp.array([0, 1, 5])], num_children=2)
  tree, c4 = expand(params, keys[3], tree, c3.reshape(b, 6)[:, :3], num_children=1)
  return tree


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "spec", "num_children",
                                             "sampling"))
def _one_expansion(params, key, prompts, lengths, *, graphdef, capacity, spec, num_children,
                   sampling=SAMPLING):
  """The roots' children: (tree, children [B, 1, K])."""
  tree = init_step_tree(params, graphdef=graphdef, prompt_tokens=prompts,
                        prompt_lengths=lengths, capacity=capacity, spec=spec)
  return expand_steps(params, key, tree, jnp.arange(prompts.shape[0])[:, None],
                      graphdef=graphdef, spec=spec, sampling=sampling,
                      num_children=num_children)


def _capacity(b):
  return tree_capacity(b, nodes_per_problem=40, max_depth=4, max_step_tokens=MAX_STEP_TOKENS,
                       page_len=PAGE_LEN)


def test_every_node_continues_like_a_flat_forward(policy):
  graphdef, params = policy
  prompts, lengths = make_prompts([5, 9, 7], seed=1)
  tree = _grow(params, jax.random.key(3), prompts, lengths, graphdef=graphdef,
               capacity=_capacity(3), spec=TINY_SPEC)
  live = np.flatnonzero(np.asarray(tree.usable))
  problem = np.asarray(tree.cache.node_problem)
  assert int(np.asarray(tree.cache.node_depth)[live].max()) == 4
  sequences = [list(np.asarray(prompts[problem[n], :lengths[problem[n]]]))
               + node_token_ids(tree, int(n)) for n in live]
  width = 64
  assert max(map(len, sequences)) <= width
  buf = np.zeros((len(sequences), width), np.int32)
  for r, seq in enumerate(sequences):
    buf[r, :len(seq)] = seq
  flat = np.asarray(jax.jit(lambda p, t: apply(graphdef, p, t)[0])(params.policy, buf))
  last = flat[np.arange(len(sequences)), [len(s) - 1 for s in sequences]]
  model = nnx.merge(graphdef, params.policy)
  from_tree = np.asarray(model.logits(tree.hidden[live]))
  np.testing.assert_allclose(from_tree, last, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(tree.value[live]),
                             np.asarray(linear_value(params.value, tree.hidden[live])),
                             atol=1e-6)
  assert not bool(np.asarray(tree.cache.overflow).any())


def test_each_token_goes_through_the_model_once(policy):
  graphdef, params = policy
  prompts, lengths = make_prompts([6, 4], seed=2)
  cap = _capacity(2)

  tree, c1 = _one_expansion(params, jax.random.key(0), prompts, lengths, graphdef=graphdef,
                            capacity=cap, spec=TINY_SPEC, num_children=4)
  expand = jax.jit(expand_steps, static_argnames=("graphdef", "spec", "sampling",
                                                  "num_children"))
  tree, _ = expand(params, jax.random.key(1), tree, c1[:, 0], graphdef=graphdef, spec=TINY_SPEC,
                   sampling=SAMPLING, num_children=3)
  live = np.asarray(tree.cache.node_live)
  nonroot = live & (np.asarray(tree.cache.node_depth) > 0)
  problem = np.asarray(tree.cache.node_problem)
  steps = np.asarray(tree.step_length)
  for b in range(2):
    unique = int(steps[nonroot & (problem == b)].sum())
    assert int(tree.cache.tokens_decoded[b]) == unique
    assert int(tree.cache.tokens_prefilled[b]) == int(lengths[b])
  # Pages: <= 1.1 x unique tokens / page_len + one partial page per live node.
  unique_all = int(steps[nonroot].sum())
  assert int(tree.cache.pages_in_use) <= 1.1 * unique_all / PAGE_LEN + int(live.sum())
  # Step lengths agree with the recorded tokens: a step ends at its first stop/EOS id.
  tokens = np.asarray(tree.step_tokens)
  for n in np.flatnonzero(nonroot):
    row = list(tokens[n, :steps[n]])
    ends = [i for i, t in enumerate(row) if t in (STOP_ID, EOS_ID)]
    assert (ends == [len(row) - 1]) or (not ends and len(row) == MAX_STEP_TOKENS)
    assert all(t == PAD_ID for t in tokens[n, steps[n]:])
    assert bool(tree.terminal[n]) == (EOS_ID in row)
    assert bool(tree.truncated[n]) == (not ends)
  # Batched model calls: prefill + one per token step of each expansion (<= T each).
  assert 1 < int(tree.model_calls) <= 1 + 2 * MAX_STEP_TOKENS


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLING], ids=["greedy", "sampled"])
def test_a_step_is_what_decode_samples(policy, sampling):
  """One child per root is decoded like `decode` (same key schedule, same rows): same tokens."""
  graphdef, params = policy
  prompts, lengths = make_prompts([7, 3, 5, 6], seed=4)
  cap = _capacity(4)

  key = jax.random.key(11)
  tree, c = _one_expansion(params, key, prompts, lengths, graphdef=graphdef, capacity=cap,
                           spec=TINY_SPEC, num_children=1, sampling=sampling)
  c = np.asarray(c)[:, 0, 0]
  tokens, steps = np.asarray(tree.step_tokens)[c], np.asarray(tree.step_length)[c]
  log_prob = np.asarray(tree.log_prob)[c]
  ref = decode(graphdef, params.policy, key, tokens=prompts, lengths=lengths,
               stop_token_ids=(STOP_ID, EOS_ID), sampling=sampling.replace(
                 max_new_tokens=MAX_STEP_TOKENS, pad_id=PAD_ID))
  np.testing.assert_array_equal(steps, np.asarray(ref.lengths))
  np.testing.assert_array_equal(tokens, np.asarray(ref.tokens))
  np.testing.assert_allclose(log_prob, np.asarray(ref.log_probs).sum(axis=1), atol=1e-5)
  if not sampling.greedy:
    assert steps.max() > 1   # multi-token steps were compared


def test_step_contains_matches_brute_force():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 4, (200, 7)).astype(np.int32)
  lengths = rng.integers(0, 8, 200).astype(np.int32)
  markers = ((1, 2), (3,), (0, 0, 0))
  got = np.asarray(step_contains(jnp.asarray(tokens), jnp.asarray(lengths), markers))

  def brute(row, n):
    row = list(row[:n])
    return any(row[i:i + len(m)] == list(m) for m in markers for i in range(n - len(m) + 1))

  np.testing.assert_array_equal(got, [brute(r, n) for r, n in zip(tokens, lengths, strict=True)])


def test_final_marker_makes_a_step_terminal(policy):
  graphdef, params = policy
  prompts, lengths = make_prompts([4], seed=5)
  spec = StepSpec(stop_ids=(STOP_ID,), eos_ids=(), max_step_tokens=MAX_STEP_TOKENS,
                  pad_id=PAD_ID, final_markers=((EOS_ID,),))
  tree, c = _one_expansion(params, jax.random.key(1), prompts, lengths, graphdef=graphdef,
                           capacity=_capacity(1), spec=spec, num_children=8)
  c = np.asarray(c).reshape(-1)
  tokens, steps = np.asarray(tree.step_tokens), np.asarray(tree.step_length)
  has_marker = [EOS_ID in tokens[n, :steps[n]] for n in c]
  assert any(has_marker)
  np.testing.assert_array_equal(np.asarray(tree.terminal)[c], has_marker)


def test_overflow_is_reported_per_problem_not_raised(policy):
  graphdef, params = policy
  prompts, lengths = make_prompts([4, 4], seed=6)
  # Two pages for the whole pool: most of the 2 x 6 children cannot be written.
  cap = TreeCapacity(max_nodes=14, num_pages=2, page_len=2, max_pages_per_node=4, max_depth=3)
  tree, c = _one_expansion(params, jax.random.key(0), prompts, lengths, graphdef=graphdef,
                           capacity=cap, spec=TINY_SPEC, num_children=6)
  failed = np.asarray(tree.failed)[np.asarray(c).reshape(-1)]
  assert failed.any()
  assert np.asarray(tree.cache.overflow).all()
  # A failed node is never expandable again, and is not terminal.
  assert not np.asarray(tree.expandable)[np.asarray(c).reshape(-1)][failed].any()
  assert int(tree.cache.pages_in_use) <= 2


@pytest.mark.parametrize("kwargs, match", [
  (dict(stop_ids=(), eos_ids=()), "at least one"),
  (dict(stop_ids=(1,), max_step_tokens=0), "max_step_tokens=0"),
  (dict(stop_ids=(1,), max_step_tokens=2, final_markers=((1, 2, 3),)), r"final marker \(1, 2, 3\)"),
])
def test_bad_step_spec_is_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    StepSpec(**kwargs)


def test_bad_capacity_is_named():
  with pytest.raises(ValueError, match="nodes_per_problem=0"):
    tree_capacity(2, nodes_per_problem=0, max_depth=3, max_step_tokens=4)
  with pytest.raises(ValueError, match="max_nodes=1"):
    TreeCapacity(max_nodes=1, num_pages=4, page_len=2, max_pages_per_node=2,
                 max_depth=2).check(2)


def _expand_per_token(params, rng_key, tree, parents, *, graphdef, spec, sampling,
                      num_children):
  """Reference expansion: `expand_steps` as one `tree_step` per token, each writing its token
  into the pages at once (the pre-buffer design); same key schedule, same rows."""
  b, w = parents.shape
  k, t_max = num_children, spec.max_step_tokens
  valid = tree.expandable[parents]
  cache, children = fork_nodes(tree.cache, parents.reshape(-1), num_children=k,
                               valid=valid.reshape(-1))
  children = children.reshape(b, w * k)
  r = b * w * k
  model = nnx.merge(graphdef, params.policy)
  hidden = jnp.repeat(tree.hidden[parents.reshape(-1)], k, axis=0)
  stop = jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32)
  eos = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,), jnp.int32)
  made = (children >= 0).reshape(-1)
  zeros = jnp.zeros((r,), bool)

  def body(t, carry):   # rows that ended (or all, after the last step) are masked
    cache, logits, hidden, tokens, length, log_prob, active, ended, has_eos, failed, calls = carry
    tok, lp, _ = sample_tokens(logits, jax.random.fold_in(rng_key, t), sampling)
    cache, out = tree_step(graphdef, params.policy, cache, children, tok.reshape(b, w * k),
                           valid=active.reshape(b, w * k))
    written = out.written.reshape(-1)
    fed = active & written
    is_stop = jnp.any(tok[:, None] == stop[None, :], axis=1)
    return (cache, out.logits.reshape(r, -1),
            jnp.where(fed[:, None], out.hidden.reshape(r, -1), hidden),
            tokens.at[:, t].set(jnp.where(fed, tok, spec.pad_id)), length + fed,
            log_prob + jnp.where(fed, lp, 0.0), fed & ~is_stop, ended | (fed & is_stop),
            has_eos | (fed & jnp.any(tok[:, None] == eos[None, :], axis=1)),
            failed | (active & ~written), calls + jnp.any(active).astype(jnp.int32))

  carry = (cache, model.logits(hidden), hidden, jnp.full((r, t_max), spec.pad_id, jnp.int32),
           jnp.zeros((r,), jnp.int32), jnp.zeros((r,), jnp.float32), made, zeros, zeros, zeros,
           jnp.zeros((), jnp.int32))
  cache, _, hidden, tokens, length, log_prob, _, ended, has_eos, failed, calls = (
    jax.lax.fori_loop(0, t_max, body, carry))
  terminal = has_eos | step_contains(tokens, length, spec.final_markers)
  dst = jnp.where(made, children.reshape(-1), tree.cache.max_nodes)

  def put(field, value):
    return field.at[dst].set(value, mode="drop")

  tree = tree.replace(
    cache=cache, hidden=put(tree.hidden, hidden), value=put(tree.value,
                                                            linear_value(params.value, hidden)),
    log_prob=put(tree.log_prob, log_prob), step_tokens=put(tree.step_tokens, tokens),
    terminal=put(tree.terminal, terminal & ~failed),
    truncated=put(tree.truncated, ~ended & ~failed), failed=put(tree.failed, failed),
    model_calls=tree.model_calls + calls)
  return tree, children.reshape(b, w, k)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "expand_fn"))
def _expand_greedy(params, key, tree, parents, *, graphdef, spec, expand_fn):
  return expand_fn(params, key, tree, parents, graphdef=graphdef, spec=spec, sampling=GREEDY,
                   num_children=2)


def test_step_buffer_matches_per_token_tree_steps(policy):
  """The buffered expansion (pages written once per step) against one `tree_step` per token,
  from parents of depth 0..4 of a grown tree (forks, a resample, a pruned leaf, partial pages
  of page_len 3): same steps, states, values, node lengths, page counts and token accounting.
  Greedy; the tiny policy's greedy token is STOP_ID, so only EOS ends a step here: 4 tokens."""
  graphdef, params = policy
  prompts, lengths = make_prompts([5, 9, 7], seed=1)
  tree = _grow(params, jax.random.key(3), prompts, lengths, graphdef=graphdef,
               capacity=_capacity(3), spec=TINY_SPEC)
  usable, expandable = np.asarray(tree.usable), np.asarray(tree.expandable)
  problem, depth = np.asarray(tree.cache.node_problem), np.asarray(tree.cache.node_depth)
  length = np.asarray(tree.cache.node_length)
  parents = np.zeros((3, 4), np.int32)

  def longest(b, d, mask=expandable):   # problem b's longest node of depth d, None if none
    nodes = np.flatnonzero(mask & (problem == b) & (depth == d))
    return int(nodes[np.argmax(length[nodes])]) if len(nodes) else None

  for b in range(3):   # per problem: the longest node of each depth 0..3 (or the root again)
    parents[b] = [b if longest(b, d) is None else longest(b, d) for d in range(4)]
  deepest = [b for b in range(3) if longest(b, 4, usable) is not None]
  parents[deepest[0], 3] = longest(deepest[0], 4, usable)   # a leaf at max_depth: skipped
  assert (length[parents[:, 1:]] % PAGE_LEN).any()   # shared partial pages: copy-on-write
  spec = StepSpec(stop_ids=(EOS_ID,), max_step_tokens=MAX_STEP_TOKENS, pad_id=PAD_ID)
  (new, new_children), (ref, ref_children) = (
    _expand_greedy(params, jax.random.key(4), tree, jnp.asarray(parents), graphdef=graphdef,
                   spec=spec, expand_fn=fn) for fn in (expand_steps, _expand_per_token))
  np.testing.assert_array_equal(np.asarray(new_children), np.asarray(ref_children))
  children = np.asarray(ref_children)
  assert (depth[parents[expandable[parents]]] > 0).sum() >= 6 and not expandable[
    parents[deepest[0], 3]]
  assert ((children >= 0) == expandable[parents][:, :, None]).all()
  children = children.reshape(-1)
  children = children[children >= 0]
  assert (np.asarray(ref.step_length)[children] == MAX_STEP_TOKENS).all()
  for name in ("step_tokens", "step_length", "terminal", "truncated", "failed"):
    np.testing.assert_array_equal(np.asarray(getattr(new, name))[children],
                                  np.asarray(getattr(ref, name))[children], err_msg=name)
  for name in ("hidden", "value", "log_prob"):
    np.testing.assert_allclose(np.asarray(getattr(new, name))[children],
                               np.asarray(getattr(ref, name))[children], atol=1e-5, rtol=0,
                               err_msg=name)
  live = np.asarray(ref.cache.node_live)
  np.testing.assert_array_equal(np.asarray(new.cache.node_live), live)
  for name in ("node_length", "node_start", "node_depth", "node_path"):
    np.testing.assert_array_equal(np.asarray(getattr(new.cache, name))[live],
                                  np.asarray(getattr(ref.cache, name))[live], err_msg=name)
  for name in ("tokens_decoded", "tokens_prefilled", "pages_in_use", "peak_pages_in_use",
               "overflow"):
    np.testing.assert_array_equal(np.asarray(getattr(new.cache, name)),
                                  np.asarray(getattr(ref.cache, name)), err_msg=name)
  assert int(new.model_calls) == int(ref.model_calls)
