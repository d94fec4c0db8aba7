"""Search benchmark (`qstar-jax bench search`): the jitted LM step searches against baselines.

What is timed. Every timing is the best of `repeats` runs after one compile run (whose extra
time is reported apart as `compile_s`); every ratio divides two timings of the same process
and the same prompts. For `--method mcts` (B problems, K candidate steps per node, S
simulations):

- `speedup_vs_python`: against `python_tree_mcts`, the reference repos' design: one Python
  tree per problem (a dict of nodes, PUCT selection and backup in Python) that calls one jitted
  model function per node expansion (prefill the node's whole token sequence, decode its K
  candidate steps, read them back to the host).
- `prefix_reuse_speedup`: against the same jitted search with `no_prefix_reuse_expand`, an
  expansion that re-prefills every parent from its full token sequence (prompt + path) into a
  dense KV cache instead of reading the tree cache.
- `overhead_vs_decode`: the search's time over plain batched decoding (`models.decode`,
  `ignore_eos`) of the same number of tokens at the same rows per forward.
- `batching_gain`: B x the time of that plain decoding for one problem's rows over its time for
  all B problems' rows: how much batching problems buys on this device for the model's own
  work. A batched search can beat a per-problem one by about this, plus the per-call overhead
  the per-problem one pays; on a CPU the model's compute grows with the rows (the gain stays
  far below B), on an accelerator it barely does (the gain nears B).
- `bookkeeping_fraction`: the search's time with `constant_step_expand` (constant steps, no
  model call after the prompts' prefill) less the time of that prefill alone (`init_step_tree`
  on the same prompts: model work every search does once, not tree bookkeeping), over the real
  search's time. `stub_fraction` keeps the stub's whole time over the search's (prefill
  included), `prefill_seconds` the prefill's.
- `value_overhead`: (t_on - t_off) / t_off with the value head on and off (`params.value`
  None).
- `recompiles`: backend compilations while a second batch of different problems of the same
  shapes is searched (0 expected).

A baseline too slow at full size runs fewer problems / simulations (`baseline_batch`,
`baseline_simulations`): the ratio then compares rates per node expansion (problems *
(simulations + 1), the root's expansion included), and the baseline's own sizes are in the JSON.

Steps. With random weights no step delimiter is ever likely, so by default (`stops="ignore"`)
the step stop id is -1, a token no model samples: every step is exactly `step_tokens` tokens
and every method does a fixed, known amount of work. With `stops="newline"` (a real tokenizer)
steps end at the tokenizer's newline ids, as a real search does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qstar_jax.data.gsm8k import load_gsm8k
from qstar_jax.models.decoding import SamplingConfig, decode, decode_unchecked
from qstar_jax.models.tree_cache import TreeKVCache, fork_nodes
from qstar_jax.search.steps.lm_mcts import mcts_step_search
from qstar_jax.search.steps.lm_searches import beam_search, particle_filter, sample_solutions
from qstar_jax.search.steps.step_tree import (
  PolicyValueParams,
  StepSpec,
  StepTree,
  ValueFn,
  expand_steps,
  init_step_tree,
  linear_value,
  step_contains,
  tree_capacity,
)

__all__ = [
  "SEARCH_METHODS",
  "SearchBenchConfig",
  "bench_search",
  "bench_prompts",
  "bench_step_spec",
  "constant_step_expand",
  "count_compiles",
  "no_prefix_reuse_expand",
  "python_tree_mcts",
  "random_value_head",
]

SEARCH_METHODS = ("mcts", "beam", "best_of_n", "particle")
NEVER_SAMPLED_ID = -1   # a stop id no model samples: steps run to max_step_tokens
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# ----------------------------------------------------------------------------- inputs


def bench_step_spec(step_tokens: int, *, stop_ids: Sequence[int] = (),
                    eos_ids: Sequence[int] = ()) -> StepSpec:
  """Steps of exactly `step_tokens` tokens when `stop_ids` and `eos_ids` are empty (the stop id
  is `NEVER_SAMPLED_ID`); otherwise steps end at those ids as in a real search."""
  stops = tuple(stop_ids) if (stop_ids or eos_ids) else (NEVER_SAMPLED_ID,)
  return StepSpec(stop_ids=stops, eos_ids=tuple(eos_ids), max_step_tokens=step_tokens)


def random_value_head(hidden_size: int, seed: int = 0) -> dict[str, jax.Array]:
  """A random linear value head {"kernel" [D, 1], "bias" [1]} (`linear_value`'s arrays): its
  cost, not its values, is what the benchmark measures."""
  rng = np.random.default_rng(seed)
  return {"kernel": jnp.asarray(rng.normal(0.0, hidden_size ** -0.5, (hidden_size, 1)),
                                jnp.float32),
          "bias": jnp.zeros((1,), jnp.float32)}


def bench_prompts(batch: int, prompt_len: int, *, vocab_size: int, tokenizer: Any = None,
                  offset: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """B prompts of exactly `prompt_len` tokens: (tokens [B, P] int32, lengths [B] int32).

  Without a tokenizer: random ids in [vocab_size // 4, vocab_size) (clear of the special ids).
  With one: few-shot GSM8K prompts: train problems with their worked solutions, then test
  problem `offset + b`'s question; the few-shot part grows until the prompt reaches P tokens
  and the front is cut so the question stays at the end. `offset` picks other problems (the
  second batch of the recompile check).
  """
  if tokenizer is None:
    rng = np.random.default_rng(seed + offset)
    tokens = rng.integers(vocab_size // 4, vocab_size, (batch, prompt_len)).astype(np.int32)
    return tokens, np.full((batch,), prompt_len, np.int32)
  train, test = load_gsm8k("train"), load_gsm8k("test")
  shots = [f"Question: {r['question']}\nAnswer:\n" + "\n".join(r["solution_steps"])
           + f"\nThe answer is {r['final_answer']}.\n\n" for r in train[:64]]
  rows = []
  for b in range(batch):
    question = list(tokenizer.encode(f"Question: {test[offset + b]['question']}\nAnswer:\n"))
    context: list[int] = []
    for shot in shots:
      if len(context) + len(question) >= prompt_len:
        break
      context = context + list(tokenizer.encode(shot))
    rows.append((context + question)[-prompt_len:])
  if min(len(r) for r in rows) < prompt_len:
    raise ValueError(f"prompt_len={prompt_len}: 64 few-shot examples give only "
                     f"{min(len(r) for r in rows)} tokens")
  return np.asarray(rows, np.int32), np.full((batch,), prompt_len, np.int32)


# ----------------------------------------------------------------------------- expansions


@struct.dataclass
class _Steps:
  """K decoded candidate steps for each of M parent rows, flattened to R = M * K rows."""

  tokens: jax.Array      # [R, T] int32, pad_id after the step's end
  length: jax.Array      # [R] int32
  log_prob: jax.Array    # [R] float32 model log-prob of the step (temperature 1)
  hidden: jax.Array      # [R, D] float32 state after the step's last token
  ended: jax.Array       # [R] bool the step ended at a stop or EOS id
  terminal: jax.Array    # [R] bool the step holds EOS or a final marker


def _prefill_and_decode(policy: Any, rng_key: jax.Array, tokens: jax.Array,
                        lengths: jax.Array, *, graphdef: nnx.GraphDef, spec: StepSpec,
                        sampling: SamplingConfig, num_children: int) -> _Steps:
  """Prefill each row of `tokens` [M, S] (its first lengths[m] ids) into a fresh dense cache and
  decode `num_children` steps from it; the last token is fed too, so `hidden` is the state
  after the whole step. Rows are m * K + k and token t is drawn with fold_in(rng_key, t), as in
  `expand_steps`."""
  t_max = spec.max_step_tokens
  config = sampling.replace(max_new_tokens=t_max, num_candidates=num_children, ignore_eos=True,
                            pad_id=spec.pad_id, feed_last_token=True)
  out = decode_unchecked(graphdef, policy, rng_key, tokens=tokens, lengths=lengths, cache=None,
                         stop_token_ids=jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32),
                         sampling=config, cache_max_len=tokens.shape[1] + t_max)
  within = jnp.arange(t_max)[None, :] < out.lengths[:, None]
  eos = jnp.asarray(spec.eos_ids if spec.eos_ids else (NEVER_SAMPLED_ID,), jnp.int32)
  has_eos = jnp.any(within & jnp.any(out.tokens[..., None] == eos, axis=-1), axis=1)
  return _Steps(tokens=out.tokens, length=out.lengths,
                log_prob=jnp.sum(out.log_probs, axis=1), hidden=out.last_hidden,
                ended=out.stopped,
                terminal=has_eos | step_contains(out.tokens, out.lengths, spec.final_markers))


def _store_children(params: PolicyValueParams, tree: StepTree, cache: TreeKVCache,
                    children: jax.Array, steps: _Steps, *, value_fn: ValueFn,
                    model_calls: jax.Array, tokens_prefilled: jax.Array) -> StepTree:
  """Writes decoded steps into the forked children [B, WK] (-1: none) without touching pages:
  lengths and counters move as if the tokens had gone through the tree cache."""
  b = children.shape[0]
  flat = children.reshape(-1)
  made = flat >= 0
  node = jnp.where(made, flat, tree.cache.max_nodes)
  length = jnp.where(made, steps.length, 0)
  fields = {"hidden": steps.hidden.astype(tree.hidden.dtype),
            "value": value_fn(params.value, steps.hidden), "log_prob": steps.log_prob,
            "step_tokens": steps.tokens, "terminal": steps.terminal,
            "truncated": ~steps.ended, "failed": jnp.zeros(flat.shape, bool)}
  updates = {name: getattr(tree, name).at[node].set(value, mode="drop")
             for name, value in fields.items()}
  cache = cache.replace(
    node_length=cache.node_length.at[node].add(length, mode="drop"),
    tokens_decoded=cache.tokens_decoded + jnp.sum(length.reshape(b, -1), axis=1),
    tokens_prefilled=cache.tokens_prefilled + tokens_prefilled)
  return tree.replace(cache=cache, model_calls=tree.model_calls + model_calls, **updates)


def _fork(tree: StepTree, parents: jax.Array, valid: jax.Array | None,
          num_children: int) -> tuple[jax.Array, TreeKVCache, jax.Array]:
  """(valid [B, W] after the expandable check, cache, children [B, W*K]) as expand_steps forks."""
  b, w = parents.shape
  valid = (jnp.ones((b, w), bool) if valid is None else valid) & tree.expandable[parents]
  cache, children = fork_nodes(tree.cache, parents.reshape(-1), num_children=num_children,
                               valid=valid.reshape(-1))
  return valid, cache, children.reshape(b, w * num_children)


def no_prefix_reuse_expand(params: PolicyValueParams, rng_key: jax.Array, tree: StepTree,
                           parents: jax.Array, *, graphdef: nnx.GraphDef, spec: StepSpec,
                           sampling: SamplingConfig, num_children: int,
                           valid: jax.Array | None = None, value_fn: ValueFn = linear_value,
                           prompt_tokens: Any) -> tuple[StepTree, jax.Array]:
  """`expand_steps` without prefix reuse: every parent row is prefilled from its full token
  sequence (its prompt from `prompt_tokens` [B, P], then the steps on its path) into a fresh
  dense KV cache, and its K children are decoded from there; the tree's pages are never read
  or written (children get node slots, steps, values and lengths only).

  `prompt_tokens` (host ids: the tree does not keep prompt ids) is bound with
  `functools.partial` before the function is passed as a search's `expand_fn`. The re-prefilled
  tokens are added to `tokens_prefilled`. Same keys per token as `expand_steps`, so with greedy
  sampling both give the same steps (up to float rounding between the two attention paths).
  """
  parents = jnp.asarray(parents, jnp.int32)
  b, w = parents.shape
  valid, cache, children = _fork(tree, parents, valid, num_children)
  flat = parents.reshape(-1)
  prompts = jnp.asarray(prompt_tokens, jnp.int32)
  p, t_max = prompts.shape[1], spec.max_step_tokens
  width = p + tree.cache.max_depth * t_max
  problem = jnp.clip(tree.cache.node_problem[flat], 0)
  prompt_len = tree.cache.prompt.lengths[problem]                       # [M]
  path = tree.cache.node_path[flat][:, 1:]                              # [M, D]
  step_len = jnp.where(path >= 0, tree.step_length[jnp.clip(path, 0)], 0)
  start = prompt_len[:, None] + jnp.cumsum(step_len, axis=1) - step_len  # [M, D]
  within = jnp.arange(t_max)[None, None, :] < step_len[..., None]
  where = jnp.where(within, start[..., None] + jnp.arange(t_max), width)  # [M, D, T]
  rows = jnp.arange(flat.shape[0])[:, None, None]
  seq = jnp.zeros((flat.shape[0], width), jnp.int32).at[:, :p].set(prompts[problem])
  seq = seq.at[rows, where].set(tree.step_tokens[jnp.clip(path, 0)], mode="drop")
  total = prompt_len + jnp.sum(step_len, axis=1)                        # [M]
  steps = _prefill_and_decode(params.policy, rng_key, seq, total, graphdef=graphdef, spec=spec,
                              sampling=sampling, num_children=num_children)
  tree = _store_children(
    params, tree, cache, children, steps, value_fn=value_fn,
    model_calls=1 + jnp.max(steps.length),
    tokens_prefilled=jnp.sum(jnp.where(valid, total.reshape(b, w), 0), axis=1))
  return tree, children.reshape(b, w, num_children)


def constant_step_expand(params: PolicyValueParams, rng_key: jax.Array, tree: StepTree,
                         parents: jax.Array, *, graphdef: nnx.GraphDef, spec: StepSpec,
                         sampling: SamplingConfig, num_children: int,
                         valid: jax.Array | None = None,
                         value_fn: ValueFn = linear_value) -> tuple[StepTree, jax.Array]:
  """A stub with `expand_steps`' signature that never calls the model: children are forked as
  usual and get a constant full-length step (`max_step_tokens` pad ids, log-prob -1, not
  terminal) and their parent's hidden state and value. A search run with it costs only its
  tree bookkeeping (selection, forks, backups, writes)."""
  del rng_key, graphdef, sampling, value_fn
  parents = jnp.asarray(parents, jnp.int32)
  b, w = parents.shape
  k, t_max = num_children, spec.max_step_tokens
  _, cache, children = _fork(tree, parents, valid, k)
  r = b * w * k
  hidden = jnp.repeat(tree.hidden[parents.reshape(-1)], k, axis=0).astype(jnp.float32)
  steps = _Steps(tokens=jnp.full((r, t_max), spec.pad_id, jnp.int32),
                 length=jnp.full((r,), t_max, jnp.int32), log_prob=jnp.full((r,), -1.0),
                 hidden=hidden, ended=jnp.zeros((r,), bool), terminal=jnp.zeros((r,), bool))
  parent_value = jnp.repeat(tree.value[parents.reshape(-1)], k)
  tree = _store_children(params, tree, cache, children, steps,
                         value_fn=lambda _, h: parent_value,
                         model_calls=jnp.zeros((), jnp.int32),
                         tokens_prefilled=jnp.zeros((b,), jnp.int32))
  return tree, children.reshape(b, w, k)


# ----------------------------------------------------------------------------- Python MCTS


@dataclasses.dataclass
class _PyNode:
  """One node of `python_tree_mcts`'s tree."""

  tokens: list[int]                 # every id after the prompt, root..this node
  depth: int
  value: float                      # value head at the node's state
  terminal: bool
  prior: np.ndarray | None = None   # [K] softmax of the candidates' step log-probs
  candidates: list[tuple[list[int], float, bool]] | None = None  # (ids, value, terminal)
  children: dict[int, int] = dataclasses.field(default_factory=dict)  # action -> node id
  visits: int = 0
  value_sum: float = 0.0


@dataclasses.dataclass(frozen=True)
class PythonMctsResult:
  """What `python_tree_mcts` returns for B problems."""

  root_visits: np.ndarray           # [B, K] int visits of each root action
  model_calls: int                  # jitted model calls (one per node expansion)
  tokens_decoded: int               # candidate-step tokens decoded
  tokens_prefilled: int             # prompt + path tokens prefilled (every call re-prefills)


def _node_fn(params: PolicyValueParams, rng_key: jax.Array, tokens: jax.Array,
             lengths: jax.Array, *, graphdef: nnx.GraphDef, spec: StepSpec,
             sampling: SamplingConfig, num_children: int, value_fn: ValueFn):
  steps = _prefill_and_decode(params.policy, rng_key, tokens, lengths, graphdef=graphdef,
                              spec=spec, sampling=sampling, num_children=num_children)
  return steps.tokens, steps.length, steps.log_prob, value_fn(params.value, steps.hidden), \
    steps.terminal


_node_fn_jit = jax.jit(_node_fn, static_argnames=("graphdef", "spec", "sampling",
                                                  "num_children", "value_fn"))


def python_tree_mcts(params: PolicyValueParams, rng_key: jax.Array, *, graphdef: nnx.GraphDef,
                     prompt_tokens: Any, prompt_lengths: Any, spec: StepSpec,
                     sampling: SamplingConfig, num_actions: int, num_simulations: int,
                     max_depth: int, value_fn: ValueFn = linear_value,
                     pb_c: float = 1.25) -> PythonMctsResult:
  """MCTS as the reference repos run it: per problem a Python dict of nodes, PUCT selection and
  backup in Python, and one call of a jitted model function per node expansion that prefills
  the node's whole token sequence (prompt + path, padded to a fixed width so it compiles once)
  and decodes its K candidate steps with their values, read back to the host.

  A simulation descends by PUCT (Q + pb_c * P * sqrt(N_parent) / (1 + N_child), Q = 0 for
  unvisited actions) until it picks an action whose node does not exist yet (created from the
  parent's candidate; expanded by one model call unless terminal or at `max_depth`), a terminal
  node, or a node at `max_depth`; that leaf's value is backed up along the path. The root is
  expanded before the first simulation.
  """
  prompt_tokens = np.asarray(prompt_tokens, np.int32)
  prompt_lengths = np.asarray(prompt_lengths, np.int32)
  width = prompt_tokens.shape[1] + max_depth * spec.max_step_tokens
  static = {"graphdef": graphdef, "spec": spec, "sampling": sampling,
            "num_children": num_actions, "value_fn": value_fn}
  counters = {"calls": 0, "decoded": 0, "prefilled": 0}

  def expand(node: _PyNode, prompt: np.ndarray, key: jax.Array) -> None:
    seq = np.zeros((1, width), np.int32)
    ids = list(prompt) + node.tokens
    seq[0, :len(ids)] = ids
    out = jax.device_get(_node_fn_jit(params, key, jnp.asarray(seq),
                                      jnp.asarray([len(ids)], jnp.int32), **static))
    tokens, lengths, log_probs, values, terminal = out
    counters["calls"] += 1
    counters["decoded"] += int(np.sum(lengths))
    counters["prefilled"] += len(ids)
    node.candidates = [([int(t) for t in tokens[k, :lengths[k]]], float(values[k]),
                        bool(terminal[k])) for k in range(num_actions)]
    prior = np.exp(log_probs - np.max(log_probs))
    node.prior = prior / np.sum(prior)

  visits = np.zeros((prompt_tokens.shape[0], num_actions), np.int64)
  for b in range(prompt_tokens.shape[0]):
    prompt = prompt_tokens[b, :prompt_lengths[b]]
    problem_key = jax.random.fold_in(rng_key, b)
    nodes = {0: _PyNode(tokens=[], depth=0, value=0.0, terminal=False)}
    expand(nodes[0], prompt, jax.random.fold_in(problem_key, 0))
    for sim in range(num_simulations):
      node, path = nodes[0], [nodes[0]]
      while True:
        q = np.array([nodes[node.children[a]].value_sum / nodes[node.children[a]].visits
                      if a in node.children and nodes[node.children[a]].visits else 0.0
                      for a in range(num_actions)])
        n = np.array([nodes[node.children[a]].visits if a in node.children else 0
                      for a in range(num_actions)])
        action = int(np.argmax(q + pb_c * node.prior * math.sqrt(node.visits + 1) / (1 + n)))
        if action in node.children:
          node = nodes[node.children[action]]
          path.append(node)
          if node.terminal or node.depth >= max_depth:
            break
          continue
        ids, value, terminal = node.candidates[action]
        child = _PyNode(tokens=node.tokens + ids, depth=node.depth + 1, value=value,
                        terminal=terminal)
        node.children[action] = len(nodes)
        nodes[len(nodes)] = child
        path.append(child)
        if not terminal and child.depth < max_depth:
          expand(child, prompt, jax.random.fold_in(problem_key, sim + 1))
        break
      leaf_value = path[-1].value
      for visited in path:
        visited.visits += 1
        visited.value_sum += leaf_value
    root = nodes[0]
    for action, child in root.children.items():
      visits[b, action] = nodes[child].visits
  return PythonMctsResult(root_visits=visits, model_calls=counters["calls"],
                          tokens_decoded=counters["decoded"],
                          tokens_prefilled=counters["prefilled"])


# ----------------------------------------------------------------------------- timing


class count_compiles:
  """Context manager counting XLA backend compilations (any jit) while it is open."""

  def __init__(self):
    self.count = 0

  def _listener(self, event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == _COMPILE_EVENT:
      self.count += 1

  def __enter__(self) -> count_compiles:
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc: Any) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listener)


def _timed(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
  """Best of `repeats` runs of fn (blocked on its outputs) after a compile run."""

  def once():
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out

  first, out = once()
  best = min(once()[0] for _ in range(repeats))
  return {"seconds": best, "compile_s": max(first - best, 0.0), "out": out}


# ----------------------------------------------------------------------------- the benchmark


@dataclasses.dataclass(frozen=True)
class SearchBenchConfig:
  """Sizes of one `bench_search` run (see the module docstring for what each ratio means).

  `candidates` K is MCTS's actions per node, the beam width and the expansions per beam,
  best-of-N's N and the particle count; `simulations` S is MCTS's only. `baseline_batch` /
  `baseline_simulations` (default: batch / simulations) size the Python-tree and
  no-prefix-reuse baselines; `prompts` is "random" (random ids) or "gsm8k" (few-shot GSM8K,
  needs a tokenizer); `stops` is "ignore" (steps of exactly `step_tokens` tokens) or
  "newline" (steps end at the tokenizer's newline ids, solutions at the model's EOS).
  """

  method: str = "mcts"
  batch: int = 16
  candidates: int = 4
  simulations: int = 16
  prompt_len: int = 32
  step_tokens: int = 8
  max_depth: int = 4
  repeats: int = 3
  seed: int = 0
  baseline_batch: int | None = None
  baseline_simulations: int | None = None
  prompts: str = "random"
  stops: str = "ignore"

  def check(self) -> None:
    if self.method not in SEARCH_METHODS:
      raise ValueError(f"method={self.method!r}: expected one of {SEARCH_METHODS}")
    for name in ("batch", "candidates", "simulations", "prompt_len", "step_tokens", "max_depth",
                 "repeats", "baseline_batch", "baseline_simulations"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}={value}: expected >= 1")
    if self.baseline_batch is not None and self.baseline_batch > self.batch:
      raise ValueError(f"baseline_batch={self.baseline_batch}: expected <= batch={self.batch}")
    if self.prompts not in ("random", "gsm8k"):
      raise ValueError(f"prompts={self.prompts!r}: expected 'random' or 'gsm8k'")
    if self.stops not in ("ignore", "newline"):
      raise ValueError(f"stops={self.stops!r}: expected 'ignore' or 'newline'")

  def rows_per_problem(self) -> int:
    """Rows of one problem in each batched forward of the search."""
    return self.candidates ** 2 if self.method == "beam" else self.candidates


def _search_call(config: SearchBenchConfig, *, graphdef: nnx.GraphDef, spec: StepSpec,
                 sampling: SamplingConfig, expand_fn: Callable, simulations: int) -> Callable:
  """fn(params, rng_key, tokens, lengths) -> StepSearchResult of `config.method`."""
  k, common = config.candidates, {"graphdef": graphdef, "spec": spec, "sampling": sampling,
                                  "max_depth": config.max_depth, "expand_fn": expand_fn}
  sizes = {"mcts": (mcts_step_search, {"num_actions": k, "num_simulations": simulations}),
           "beam": (beam_search, {"beam_width": k, "expansions": k}),
           "best_of_n": (sample_solutions, {"num_samples": k}),
           "particle": (particle_filter, {"num_particles": k})}
  search, method_sizes = sizes[config.method]

  def call(params, rng_key, tokens, lengths):
    return search(params, rng_key, prompt_tokens=tokens, prompt_lengths=lengths, **common,
                  **method_sizes)

  return call


def bench_search(model: Any, config: SearchBenchConfig, *, tokenizer: Any = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Runs `config.method` and its baselines on one batch of prompts; returns the JSON dict.

  `model` is a `Llama` (a random linear value head of its width is added); `tokenizer` is
  needed for `prompts="gsm8k"` and `stops="newline"`; `log` receives one line per finished
  phase (name, best seconds, compile seconds). Every `*_seconds` value is the best of
  `config.repeats` runs after a compile run; each ratio is computed from two of them.
  """
  config.check()
  if (config.prompts == "gsm8k" or config.stops == "newline") and tokenizer is None:
    raise ValueError(f"prompts={config.prompts!r}, stops={config.stops!r} need a tokenizer")
  graphdef, policy = nnx.split(model)
  model_config = model.config
  params = PolicyValueParams(policy=policy, value=random_value_head(model_config.hidden_size))
  stop_ids: tuple[int, ...] = ()
  if config.stops == "newline":
    stop_ids = tuple(i for i in range(model_config.vocab_size)
                     if "\n" in tokenizer.decode([i]))
  spec = bench_step_spec(config.step_tokens, stop_ids=stop_ids,
                         eos_ids=model_config.eos_token_ids if config.stops == "newline" else ())
  sampling = SamplingConfig(max_new_tokens=1)
  b, k, s = config.batch, config.candidates, config.simulations
  text = tokenizer if config.prompts == "gsm8k" else None
  tokens, lengths = bench_prompts(b, config.prompt_len, vocab_size=model_config.vocab_size,
                                  tokenizer=text, seed=config.seed)
  tokens2, lengths2 = bench_prompts(b, config.prompt_len, vocab_size=model_config.vocab_size,
                                    tokenizer=text, offset=b, seed=config.seed)
  key = jax.random.key(config.seed)
  device = {name: jnp.asarray(a) for name, a in
            (("tokens", tokens), ("lengths", lengths), ("tokens2", tokens2),
             ("lengths2", lengths2))}

  def timed(name, fn):
    out = _timed(fn, config.repeats)
    if log is not None:
      log(f"{name}: {out['seconds']:.3f} s (compile {out['compile_s']:.1f} s)")
    return out

  def timed_search(name, search_params, expand_fn, *, problems=b, simulations=s):
    call = _search_call(config, graphdef=graphdef, spec=spec, sampling=sampling,
                        expand_fn=expand_fn, simulations=simulations)
    return timed(name, lambda: call(search_params, key, device["tokens"][:problems],
                                    device["lengths"][:problems]))

  from_steps = expand_steps
  main = timed_search("search", params, from_steps)
  result = main["out"]
  seconds = main["seconds"]
  tokens_decoded = int(np.sum(np.asarray(result.tokens_decoded)))
  out: dict[str, Any] = {
    "method": config.method, "batch": b, "candidates": k, "prompt_len": config.prompt_len,
    "step_tokens": config.step_tokens, "max_depth": config.max_depth,
    "simulations": s if config.method == "mcts" else None, "repeats": config.repeats,
    "prompts": config.prompts, "stops": config.stops,
    "device": str(jax.devices()[0].device_kind),
    "seconds": seconds, "compile_s": main["compile_s"], "tokens_decoded": tokens_decoded,
    "tokens_prefilled": int(np.sum(np.asarray(result.tokens_prefilled))),
    "model_calls": int(np.asarray(result.model_calls)),
    "overflow": int(np.sum(np.asarray(result.overflow))),
    "tokens_per_s": tokens_decoded / seconds,
    "simulations_per_s": b * s / seconds if config.method == "mcts" else None,
  }

  # Plain batched decoding of the same tokens at the same rows per forward; the same decoding
  # for one problem's rows (what batching B problems buys on this device).
  rows = config.rows_per_problem()
  new_tokens = max(1, math.ceil(tokens_decoded / (b * rows)))
  sampling_plain = SamplingConfig(max_new_tokens=new_tokens, num_candidates=rows, ignore_eos=True)

  def plain_decode(problems: int) -> jax.Array:
    return decode(graphdef, policy, key, tokens=device["tokens"][:problems],
                  lengths=lengths[:problems], model_config=model_config,
                  sampling=sampling_plain).tokens

  dec = timed("decode", lambda: plain_decode(b))
  one = timed("decode, one problem", lambda: plain_decode(1))
  decode_tokens = b * rows * new_tokens
  out.update({"decode_seconds": dec["seconds"], "decode_tokens": decode_tokens,
              "decode_rows": b * rows,
              "overhead_vs_decode": (seconds / tokens_decoded) / (dec["seconds"] / decode_tokens),
              "decode_one_problem_seconds": one["seconds"],
              "batching_gain": b * one["seconds"] / dec["seconds"]})

  # The same search: value head off; constant stub (no model call).
  off = timed_search("value head off", params.replace(value=None), from_steps)
  stub = timed_search("constant stub", params, constant_step_expand)
  # The prompts' prefill alone (a one-node-per-problem pool: the model work, not the pool).
  prefill_capacity = tree_capacity(b, nodes_per_problem=1, max_depth=config.max_depth,
                                   max_step_tokens=spec.max_step_tokens)
  prefill_fn = jax.jit(functools.partial(init_step_tree, graphdef=graphdef,
                                         capacity=prefill_capacity, spec=spec))
  prefill = timed("prompt prefill", lambda: prefill_fn(
    params, prompt_tokens=device["tokens"], prompt_lengths=device["lengths"]).hidden)
  out.update({"value_off_seconds": off["seconds"],
              "value_overhead": (seconds - off["seconds"]) / off["seconds"],
              "stub_seconds": stub["seconds"], "prefill_seconds": prefill["seconds"],
              "stub_fraction": stub["seconds"] / seconds,
              "bookkeeping_fraction": max(stub["seconds"] - prefill["seconds"], 0.0) / seconds})

  # Baselines at (possibly) reduced sizes, compared per node expansion.
  bb = config.baseline_batch or b
  bs = config.baseline_simulations or s
  per_problem = (lambda sims: sims + 1) if config.method == "mcts" else (lambda sims: 1)
  expansions, base_expansions = b * per_problem(s), bb * per_problem(bs)
  reuse_off = timed_search(
    "no prefix reuse", params, functools.partial(no_prefix_reuse_expand, prompt_tokens=tokens[:bb]), problems=bb,
    simulations=bs)
  out.update({"no_prefix_reuse_seconds": reuse_off["seconds"],
              "no_prefix_reuse_batch": bb,
              "no_prefix_reuse_simulations": bs if config.method == "mcts" else None,
              "prefix_reuse_speedup": _rate_ratio(seconds, expansions, reuse_off["seconds"],
                                                  base_expansions)})
  if config.method == "mcts":
    python = timed("python-tree mcts", lambda: python_tree_mcts(
      params, key, graphdef=graphdef, prompt_tokens=tokens[:bb], prompt_lengths=lengths[:bb],
      spec=spec, sampling=sampling, num_actions=k, num_simulations=bs,
      max_depth=config.max_depth))
    out.update({"python_seconds": python["seconds"], "python_batch": bb,
                "python_simulations": bs, "python_model_calls": python["out"].model_calls,
                "speedup_vs_python": _rate_ratio(seconds, expansions, python["seconds"],
                                                 base_expansions)})

  # A second batch of different problems with the same shapes must not compile anything.
  call = _search_call(config, graphdef=graphdef, spec=spec, sampling=sampling,
                      expand_fn=from_steps, simulations=s)
  key2 = jax.random.key(config.seed + 1)
  jax.block_until_ready(key2)
  with count_compiles() as compiles:
    jax.block_until_ready(call(params, key2, device["tokens2"], device["lengths2"]))
  out["recompiles"] = compiles.count
  return out


def _rate_ratio(seconds: float, units: int, base_seconds: float, base_units: int) -> float:
  """(units / seconds) / (base_units / base_seconds): how many times faster per unit of work."""
  return (units / seconds) / (base_units / base_seconds)
