"""Searches on a device mesh (8 simulated CPU devices, tests/conftest.py): A* / Q* with a small
random PuzzleNet and the LM step searches (beam, MCTS, and the others in the slow tests) with
`mesh=` give the unsharded search's results, their outputs are split over problems, a second
batch of the same shapes is not traced again, and a batch that does not divide over the mesh
is refused before tracing, naming the batch and the mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from lm_search_fixtures import SAMPLING, TINY_SPEC, make_prompts, tiny_policy

from qstar_jax.distributed import BATCH_AXES, MeshShapeError, make_mesh
from qstar_jax.envs import npuzzle
from qstar_jax.models.puzzle_net import PuzzleNet, PuzzleNetConfig, puzzle_net_apply_fn
from qstar_jax.search import astar_search, qstar_search
from qstar_jax.search.steps import lm_searches as ls
from qstar_jax.search.steps.lm_mcts import mcts_step_search
from qstar_jax.search.steps.methods import SearchBudget, run_method

MESHES = ("data=8", "data=2,fsdp=4")
PROBLEMS = P(BATCH_AXES)          # a [B, ...] leaf split over data x fsdp
DECISIONS = P(None, BATCH_AXES)   # a [D, B, ...] leaf (MCTS decisions, prompt KV [L, B, ...])


@pytest.fixture(scope="module", params=MESHES)
def mesh(request):
  return make_mesh(request.param)


def assert_same(ref, got, *, float_tol: float = 0.0):
  """Every leaf equal: integers and booleans exactly, floats within `float_tol` (0: exactly).

  A sharded LM search computes the same program as the unsharded one, but XLA splits its
  matmuls by problem (other GEMM block sizes) and, under FSDP, reduces partial products over
  the fsdp shards: fp32 results differ by reduction-order rounding (a few ulps; log-probs are
  sums over a dozen tokens: ~4e-6 absolute observed), never by more."""
  ref_leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(ref))
  got_leaves = jax.tree.leaves(jax.device_get(got))
  assert len(ref_leaves) == len(got_leaves)
  for (path, a), b in zip(ref_leaves, got_leaves, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    name = jax.tree_util.keystr(path)
    assert a.shape == b.shape and a.dtype == b.dtype, name
    if a.dtype.kind == "f" and float_tol:
      np.testing.assert_allclose(b, a, rtol=float_tol, atol=float_tol, err_msg=name)
    else:
      np.testing.assert_array_equal(b, a, err_msg=name)


# ----------------------------------------------------------------------------------- puzzles
ENV = npuzzle(3)
PUZZLE_KW = dict(env=ENV, batch_pops=2, max_iterations=60, node_capacity=512, max_path_len=32)
_Q_TRACES = [0]


def _net(outputs: int, seed: int, hidden_1: int = 32):
  net = PuzzleNet(PuzzleNetConfig(input_dim=81, num_outputs=outputs, hidden_1=hidden_1,
                                  hidden_2=16, num_blocks=1), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(net)
  return puzzle_net_apply_fn(graphdef, ENV), params


Q_APPLY, Q_PARAMS = _net(4, 0)
H_APPLY, H_PARAMS = _net(1, 1)


def q_fn(params, states):   # counts its traces (one per trace of init and of the loop body)
  _Q_TRACES[0] += 1
  return Q_APPLY(params, states)


def _starts(seed: int, num: int = 8) -> np.ndarray:
  states, _ = ENV.scramble(jax.random.key(seed), num_states=num, max_depth=12, min_depth=0)
  return np.asarray(states)


@pytest.fixture(scope="module")
def puzzle_refs():
  starts = _starts(3)
  return starts, {
    "qstar": jax.device_get(qstar_search(Q_PARAMS, starts, q_fn=q_fn, **PUZZLE_KW)),
    "astar": jax.device_get(astar_search(H_PARAMS, starts, heuristic_fn=H_APPLY, **PUZZLE_KW))}


def test_qstar_sharded_equals_unsharded(puzzle_refs, mesh):
  starts, refs = puzzle_refs
  ref = refs["qstar"]
  assert ref.found.sum() >= 4 and ref.path_length.max() >= 2   # real searches, not all trivial
  got = qstar_search(Q_PARAMS, starts, q_fn=q_fn, mesh=mesh, **PUZZLE_KW)
  for leaf in jax.tree.leaves(got):
    assert leaf.sharding.spec == PROBLEMS and leaf.sharding.mesh == mesh
  # Q* pops in priority order: any float difference could reorder pops; every leaf is exact
  # (each device evaluates the same network on the same rows of its own problems).
  assert_same(ref, got)
  # A second batch of the same shape on the same mesh: no new trace.
  traces = _Q_TRACES[0]
  other = qstar_search(Q_PARAMS, _starts(4), q_fn=q_fn, mesh=mesh, **PUZZLE_KW)
  assert _Q_TRACES[0] == traces
  assert_same(qstar_search(Q_PARAMS, _starts(4), q_fn=q_fn, **PUZZLE_KW), other)


def test_astar_sharded_equals_unsharded(puzzle_refs, mesh):
  starts, refs = puzzle_refs
  got = astar_search(H_PARAMS, starts, heuristic_fn=H_APPLY, mesh=mesh, **PUZZLE_KW)
  assert got.path.sharding.spec == PROBLEMS
  assert_same(refs["astar"], got)


def test_puzzle_batch_or_params_that_do_not_divide_are_refused_before_tracing():
  traces = _Q_TRACES[0]
  with pytest.raises(MeshShapeError, match=r"\(6\).*data x fsdp = 8"):
    qstar_search(Q_PARAMS, _starts(3, num=6), q_fn=q_fn, mesh=make_mesh("data=8"), **PUZZLE_KW)
  assert _Q_TRACES[0] == traces
  # Parameters are placed by the sharding rules: a hidden size of 30 does not split 4 ways.
  apply30, params30 = _net(4, 0, hidden_1=30)
  with pytest.raises(MeshShapeError, match=r"dense_1\.kernel.*30.*fsdp"):
    qstar_search(params30, _starts(3), q_fn=apply30, mesh=make_mesh("data=2,fsdp=4"),
                 **PUZZLE_KW)


# ----------------------------------------------------------------------------- LM searches
LENGTHS = [5, 7, 3, 6, 4, 8, 2, 5]
LM_TOL = 1e-5   # fp32 reduction-order rounding only (see assert_same)


@pytest.fixture(scope="module")
def lm():
  graphdef, params = tiny_policy()
  tokens, lengths = make_prompts(LENGTHS, width=8, seed=0)
  return params, dict(graphdef=graphdef, prompt_tokens=tokens, prompt_lengths=lengths,
                      spec=TINY_SPEC, sampling=SAMPLING)


def _beam(lm, **kw):
  params, common = lm
  return ls.beam_search(params, jax.random.key(0), beam_width=2, expansions=2, max_depth=3,
                        **{**common, **kw})


def _mcts(lm, **kw):
  params, common = lm
  return mcts_step_search(params, jax.random.key(0), num_actions=2, num_simulations=3,
                          max_depth=2, **{**common, **kw})


@pytest.fixture(scope="module")
def beam_ref(lm):
  return jax.device_get(_beam(lm))


@pytest.fixture(scope="module")
def mcts_ref(lm):
  return jax.device_get(_mcts(lm))


def test_beam_search_sharded_equals_unsharded(lm, beam_ref, mesh):
  got = _beam(lm, mesh=mesh)
  for leaf in (got.chosen, got.candidates, got.scores, got.beams, got.overflow,
               got.tokens_decoded):
    assert leaf.sharding.spec == PROBLEMS
  assert got.tree.cache.prompt.keys.sharding.spec == DECISIONS
  assert got.tree.cache.page_keys.sharding.spec == P()   # the shared pool: replicated
  assert np.asarray(beam_ref.chosen).min() >= 0
  assert_same(beam_ref, got, float_tol=LM_TOL)
  # Another batch of prompts of the same shape on the same mesh: no new trace.
  before = ls.trace_count("beam_search")
  other = make_prompts(LENGTHS[::-1], width=8, seed=1)
  again = _beam(lm, mesh=mesh, prompt_tokens=other[0], prompt_lengths=other[1])
  assert ls.trace_count("beam_search") == before
  assert np.asarray(again.chosen).min() >= 0


# The sharded MCTS program takes ~10 s to compile on 2 cores: one mesh in the fast tier (both
# problem axes and FSDP parameters), the pure data-parallel one in the slow tier.
@pytest.mark.parametrize("spec", [pytest.param("data=8", marks=pytest.mark.slow),
                                  "data=2,fsdp=4"])
def test_mcts_sharded_equals_unsharded(lm, mcts_ref, spec):
  got = _mcts(lm, mesh=make_mesh(spec))
  assert got.chosen.sharding.spec == PROBLEMS
  assert got.decision_visit_counts.sharding.spec == DECISIONS
  assert got.search_trees.node_visits.sharding.spec == DECISIONS
  assert got.step_candidates.sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(mcts_ref.root_visit_counts).sum(axis=1), [3] * 8)
  # Visit counts, actions, chosen nodes and the sampled tokens exactly; Q-values and values
  # within fp32 rounding.
  assert_same(mcts_ref, got, float_tol=LM_TOL)


def test_lm_batch_that_does_not_divide_is_refused_before_tracing(lm):
  params, common = lm
  tokens, lengths = make_prompts(LENGTHS[:6], width=8, seed=0)
  mesh = make_mesh("data=8")
  before = ls.trace_count()
  with pytest.raises(MeshShapeError, match=r"\(6\).*data x fsdp = 8"):
    _beam(lm, mesh=mesh, prompt_tokens=tokens, prompt_lengths=lengths)
  assert ls.trace_count() == before
  with pytest.raises(MeshShapeError, match=r"\(6\).*data x fsdp = 8"):
    _mcts(lm, mesh=mesh, prompt_tokens=tokens, prompt_lengths=lengths)


@pytest.mark.slow  # four more programs (one per search) on one mesh
@pytest.mark.parametrize("method", ["greedy", "particle", "q_guided", "best_first"])
def test_run_method_sharded_equals_unsharded(lm, method):
  params, common = lm
  budget = SearchBudget(num_particles=2, q_candidates=2, best_first_candidates=2,
                        best_first_budget=4, max_depth=3)
  kw = {k: v for k, v in common.items() if k != "sampling"}
  ref = run_method(method, params, jax.random.key(1), budget=budget, **kw)
  got = run_method(method, params, jax.random.key(1), budget=budget,
                   mesh=make_mesh("data=2,fsdp=4"), **kw)
  assert got.chosen.sharding.spec == PROBLEMS
  assert_same(ref, got, float_tol=LM_TOL)


@pytest.mark.slow  # tensor parallel: one more program
def test_beam_search_data_tensor_mesh(lm, beam_ref):
  got = _beam(lm, mesh=make_mesh("data=4,tensor=2"))
  assert got.chosen.sharding.spec == PROBLEMS
  assert_same(beam_ref, got, float_tol=LM_TOL)


@pytest.mark.slow  # tensor parallel: problems split over data only, repeated along tensor
def test_qstar_data_tensor_mesh(puzzle_refs):
  starts, refs = puzzle_refs
  got = qstar_search(Q_PARAMS, starts, q_fn=q_fn, mesh=make_mesh("data=4,tensor=2"),
                     **PUZZLE_KW)
  assert got.found.sharding.spec == PROBLEMS
  assert_same(refs["qstar"], got)
