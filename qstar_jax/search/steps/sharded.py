"""The LM step searches on a device mesh: which leaves of a search are per problem, and the
jitted, sharded call every search entry point makes when it is given ``mesh=``.

What is split over the mesh's ``data`` x ``fsdp`` axes (``BATCH_AXES``), and what is not:

- per problem, split: the prompts and their lengths, the prompts' KV cache
  (``cache.prompt`` [L, B, P, Hkv, hd], split on B; the prefill runs on each device's own
  problems), the per-problem counters and overflow flags of the tree, and every leaf of the
  result indexed by problem (``chosen``, ``candidates``, ``scores``, beam histories, MCTS
  decisions and their mctx trees);
- shared, replicated: the tree's page pool (``page_keys`` / ``page_values``), the page
  refcounts and the node table with everything indexed by node slot (``hidden``, ``value``,
  ``step_tokens``, ...). Node slots and pages are allocated for the whole batch at once (a
  ``jnp.nonzero`` over one free mask), so a problem's nodes can sit anywhere in the table and
  there is no per-problem dimension to split them on; splitting the pool would mean a tree per
  device with its own node numbering, and the results (node ids, sampled tokens: the sampler
  draws one [rows, vocab] block of random bits for all problems) would differ from the
  unsharded search's. XLA's SPMD partitioner places the collectives around the shared
  allocation; the results are the unsharded ones (up to float rounding of the reductions).
- parameters: placed by the sharding rules (``param_shardings(params, mesh, rules)``;
  ``PolicyValueParams.policy`` is an ``nnx`` state of a Llama, whose paths the rules match:
  FSDP / tensor parallel; a value head ``{"kernel", "bias"}`` and a scorer's arrays match no rule
  and are replicated). The key and the traced sampling settings are replicated.

Compilation: the sharded program is built once per (search, static arguments, shardings) and
kept, so a second batch of the same shapes on the same mesh is not traced again (the searches'
trace counters count sharded traces too).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from qstar_jax.distributed import (
  DEFAULT_RULES,
  Rules,
  batch_shardings,
  batch_spec,
  param_shardings,
  put_global,
  replicated,
)
from qstar_jax.models.kv_cache import KVCache
from qstar_jax.models.tree_cache import TreeKVCache
from qstar_jax.search.steps.step_tree import StepTree

__all__ = ["by_problem", "result_shardings", "run_sharded", "step_tree_shardings"]

_JITS: dict[Any, Any] = {}


def by_problem(mesh: Mesh, dim: int = 0) -> NamedSharding:
  """Dimension ``dim`` (the problem dimension) over ``data`` x ``fsdp``, the rest whole."""
  return NamedSharding(mesh, batch_spec(dim + 1, leading=dim))


def _all(cls: type, sharding: NamedSharding, **overrides: Any) -> Any:
  """An instance of the dataclass ``cls`` with ``sharding`` in every field but ``overrides``."""
  return cls(**{f.name: overrides.get(f.name, sharding) for f in dataclasses.fields(cls)})


def step_tree_shardings(mesh: Mesh) -> StepTree:
  """A ``StepTree`` of ``NamedSharding``: per-problem leaves split (the prompts' KV on B, the
  [B] counters and overflow flags), the page pool and the node table replicated."""
  rep, b0 = replicated(mesh), by_problem(mesh)
  prompt = KVCache(keys=by_problem(mesh, 1), values=by_problem(mesh, 1), lengths=b0)
  cache = _all(TreeKVCache, rep, prompt=prompt, tokens_prefilled=b0, tokens_decoded=b0,
               overflow=b0)
  return _all(StepTree, rep, cache=cache)


def result_shardings(result_cls: type, mesh: Mesh, **fields: Any) -> Any:
  """Shardings of a ``StepSearchResult`` subclass: its tree as ``step_tree_shardings``,
  ``chosen`` / ``candidates`` / ``scores`` split on B, other fields as given in ``fields``
  (a sharding, or a prefix of one for a whole subtree)."""
  b0 = by_problem(mesh)
  return result_cls(tree=step_tree_shardings(mesh), chosen=b0, candidates=b0, scores=b0,
                    **fields)


def run_sharded(jitted: Any, params: Any, rng_key: jax.Array, prompt_tokens: jax.Array,
                prompt_lengths: jax.Array, *rest: Any, mesh: Mesh,
                rules: Rules = DEFAULT_RULES, out_shardings: Any,
                static: dict[str, Any]) -> Any:
  """``jitted(params, rng_key, prompt_tokens, prompt_lengths, *rest, **static)`` on ``mesh``.

  ``jitted``: a search's ``jax.jit`` function (its Python function is rebuilt with explicit
  ``in_shardings`` / ``out_shardings``: jit takes no keyword arguments then, so the static ones
  are bound with a partial and the jitted program is kept per static arguments). Inputs: the
  parameters by ``rules``, the prompts and lengths split on B, the key and ``rest`` (sampling
  settings, scalars) replicated; they are placed before the call (a no-op for arrays already
  placed so).

  Raises ``MeshShapeError`` (before tracing) when B does not divide over ``data`` x ``fsdp``
  (naming B and the mesh) or a parameter dimension does not divide over its axes.
  """
  prompts = batch_shardings({"prompt_tokens": prompt_tokens, "prompt_lengths": prompt_lengths},
                            mesh, what="prompt batch")
  rep = replicated(mesh)
  in_shardings = (param_shardings(params, mesh, rules), rep, prompts["prompt_tokens"],
                  prompts["prompt_lengths"], *(rep for _ in rest))
  fun = jitted.__wrapped__
  leaves, treedef = jax.tree.flatten((in_shardings, out_shardings))
  key = (fun, tuple(sorted(static.items())), treedef, tuple(leaves))
  if key not in _JITS:
    _JITS[key] = jax.jit(functools.partial(fun, **static), in_shardings=in_shardings,
                         out_shardings=out_shardings)
  args = put_global((params, rng_key, prompt_tokens, prompt_lengths, *rest), in_shardings)
  return _JITS[key](*args)

