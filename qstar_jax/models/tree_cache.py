"""Tree KV cache: a paged key/value pool shared by the nodes of a search tree, in static shapes.

Layout. Each of B problems has a prompt, prefilled once and held densely (`prompt`, a
`KVCache` [L, B, P, Hkv, hd]). Every token after the prompt lives in a page of a shared pool
`page_keys` / `page_values` [L, Hkv, num_pages, page_len, hd] (the layout of JAX's Pallas
paged-attention ops). A node is a slot of a static node table; its `node_pages` row lists the
pages holding its whole token sequence after the prompt: suffix token j of the node is at
slot j % page_len of page `node_pages[n, j // page_len]`, at model position
`prompt.lengths[problem] + j`.

Sharing. `page_refcount[p]` counts the page-table entries pointing at page p; a page with
count 0 is free. Forking K children copies the parent's page-table row into theirs and adds 1
to every page's count: no key/value is copied. A page is written only at its node's next
slot, and only while its count is 1: appending to a node whose last, partial page is shared
(after `fork_nodes` or `copy_nodes`) first copies that one page into a fresh one (copy-on-write),
so full pages are shared forever and each node owns at most one partial page. Pruning or
resampling (`release_nodes`, `copy_nodes`) moves page-table rows and counts, never key/value data.
Pages and nodes are allocated for a whole batch at once with a masked
`jnp.nonzero(free, size=M)`.

Overflow. When no page or node slot is free, a page table is full or a node would exceed
`max_depth`, the request is not carried out and `overflow[problem]` is set; nothing is
dropped silently.

Attention (cascade inference, FlashInfer / Hydragen). A decode step for rows `nodes [B, W]`
(W rows of each problem) attends in two parts: all rows of problem b attend b's prompt in one
dense batched matmul, and each row attends its own suffix through its page table (a gather).
Each part gives a partial softmax (max m_i, sum l_i, unnormalised output a_i); the exact
result is (a_1 e^{m_1-m} + a_2 e^{m_2-m}) / (l_1 e^{m_1-m} + l_2 e^{m_2-m}), m = max(m_1, m_2).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from qstar_jax.models.kv_cache import KVCache
from qstar_jax.models.llama import apply_rotary, rotary_tables

__all__ = [
  "TreeKVCache",
  "TreeStep",
  "init_tree_cache",
  "fork_nodes",
  "release_nodes",
  "copy_nodes",
  "tree_step",
  "cascade_attention",
]


@struct.dataclass
class TreeKVCache:
  """Prompt KV per problem, a shared page pool, and the node table of a search tree."""

  prompt: KVCache                # keys/values [L, B, P, Hkv, hd]; lengths [B] int32
  page_keys: jax.Array           # [L, Hkv, num_pages, page_len, hd] compute dtype
  page_values: jax.Array         # [L, Hkv, num_pages, page_len, hd] compute dtype
  page_refcount: jax.Array       # [num_pages] int32, page-table entries pointing at the page
  node_live: jax.Array           # [N] bool, slot holds a node
  node_problem: jax.Array        # [N] int32, problem of the node
  node_parent: jax.Array         # [N] int32, -1 for roots and free slots
  node_depth: jax.Array          # [N] int32, 0 for roots
  node_start: jax.Array          # [N] int32, suffix length at creation: own step = [start, length)
  node_length: jax.Array         # [N] int32, tokens after the prompt
  node_pages: jax.Array          # [N, max_pages_per_node] int32 page table, -1 unused
  node_path: jax.Array           # [N, max_depth + 1] int32 ancestors root..self, -1 padded
  tokens_prefilled: jax.Array    # [B] int32, prompt tokens through the model
  tokens_decoded: jax.Array      # [B] int32, tokens after the prompt through the model
  peak_pages_in_use: jax.Array   # [] int32, most pages held at once (after any operation)
  overflow: jax.Array            # [B] bool, a request of the problem could not be carried out

  # Static capacities, read from the array shapes.
  num_pages = property(lambda self: self.page_keys.shape[2])
  page_len = property(lambda self: self.page_keys.shape[3])
  max_nodes = property(lambda self: self.node_live.shape[0])
  max_pages_per_node = property(lambda self: self.node_pages.shape[1])
  max_depth = property(lambda self: self.node_path.shape[1] - 1)

  @property
  def free_pages(self) -> jax.Array:
    """[num_pages] bool, pages no node holds."""
    return self.page_refcount == 0

  @property
  def node_step_length(self) -> jax.Array:
    """[N] int32, tokens of each node's own step (after its parent's tokens)."""
    return self.node_length - self.node_start

  @property
  def pages_in_use(self) -> jax.Array:
    """[] int32, pages held by at least one node."""
    return jnp.sum(self.page_refcount > 0).astype(jnp.int32)


@struct.dataclass
class TreeStep:
  """Outputs of one decode step over rows `nodes [B, W]`."""

  logits: jax.Array   # [B, W, V] float32 at the new token
  hidden: jax.Array   # [B, W, D] final-normed hidden state at the new token
  written: jax.Array  # [B, W] bool, the token went into the cache (valid and no overflow)


# ----------------------------------------------------------------------------- allocation


def _allocate(free: jax.Array, request: jax.Array) -> jax.Array:
  """Distinct free slots for the requesting entries: [M] int32, -1 where none (or no request).

  One masked `nonzero(size=M)` serves the whole batch: the r-th request (in order) gets the
  r-th free slot.
  """
  m = request.shape[0]
  free_ids = jnp.nonzero(free, size=m, fill_value=-1)[0]
  rank = jnp.clip(jnp.cumsum(request.astype(jnp.int32)) - 1, 0, m - 1)
  return jnp.where(request, free_ids[rank], -1)


def _drop_index(ids: jax.Array, size: int) -> jax.Array:
  """Negative ids -> `size` (out of bounds), for scatters with mode="drop" (JAX wraps -1)."""
  return jnp.where(ids >= 0, ids, size)


def _add_refs(refcount: jax.Array, pages: jax.Array, mask: jax.Array, delta: int) -> jax.Array:
  """refcount + delta at every page of `pages [..., MP]` whose row is in `mask [...]`."""
  held = (pages >= 0) & mask[..., None]
  idx = _drop_index(jnp.where(held, pages, -1), refcount.shape[0]).reshape(-1)
  return refcount.at[idx].add(delta, mode="drop")


def _flag(overflow: jax.Array, problems: jax.Array, failed: jax.Array) -> jax.Array:
  return overflow.at[_drop_index(jnp.where(failed, problems, -1), overflow.shape[0])].set(
      True, mode="drop")


def _with_peak(cache: TreeKVCache) -> TreeKVCache:
  return cache.replace(peak_pages_in_use=jnp.maximum(cache.peak_pages_in_use,
                                                     cache.pages_in_use))


# ----------------------------------------------------------------------------- operations


def init_tree_cache(graphdef: nnx.GraphDef, params: Any, prompt_tokens: jax.Array,
                    prompt_lengths: jax.Array, *, page_len: int, num_pages: int,
                    max_nodes: int, max_pages_per_node: int,
                    max_depth: int) -> tuple[TreeKVCache, TreeStep]:
  """Prefill B right-padded prompts and create one root node per problem (node b = problem b).

  Args:
    graphdef, params: `nnx.split` of a `Llama`.
    prompt_tokens: [B, P] int32, row b's prompt in `prompt_tokens[b, :prompt_lengths[b]]`.
    prompt_lengths: [B] int32, each >= 1.
    page_len, num_pages, max_nodes, max_pages_per_node, max_depth: static capacities.
  Returns:
    (the cache, the roots' `TreeStep` [B, 1] at each prompt's last token: the distribution of
    the first token after the prompt).
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  b, p = prompt_tokens.shape
  for name, value, low in (("page_len", page_len, 1), ("num_pages", num_pages, 1),
                           ("max_nodes", max_nodes, b), ("max_pages_per_node",
                                                         max_pages_per_node, 1),
                           ("max_depth", max_depth, 0)):
    if value < low:
      raise ValueError(f"tree cache {name}={value}: expected >= {low} (batch of {b} prompts)")
  model = nnx.merge(graphdef, params)
  config = model.config
  hidden, prompt = model.hidden_states(prompt_tokens, cache=KVCache.init(config, b, p),
                                       num_new=prompt_lengths)
  last = jnp.take_along_axis(hidden, jnp.clip(prompt_lengths - 1, 0, p - 1)[:, None, None],
                             axis=1)  # [B, 1, D]
  dtype = prompt.keys.dtype
  pool = (config.num_layers, config.num_kv_heads, num_pages, page_len, config.resolved_head_dim)
  roots = jnp.arange(max_nodes, dtype=jnp.int32) < b
  node_ids = jnp.arange(max_nodes, dtype=jnp.int32)
  path = jnp.full((max_nodes, max_depth + 1), -1, jnp.int32).at[:, 0].set(
      jnp.where(roots, node_ids, -1))
  cache = TreeKVCache(
      prompt=prompt,
      page_keys=jnp.zeros(pool, dtype), page_values=jnp.zeros(pool, dtype),
      page_refcount=jnp.zeros((num_pages,), jnp.int32),
      node_live=roots,
      node_problem=jnp.where(roots, node_ids, -1),
      node_parent=jnp.full((max_nodes,), -1, jnp.int32),
      node_depth=jnp.zeros((max_nodes,), jnp.int32),
      node_start=jnp.zeros((max_nodes,), jnp.int32),
      node_length=jnp.zeros((max_nodes,), jnp.int32),
      node_pages=jnp.full((max_nodes, max_pages_per_node), -1, jnp.int32),
      node_path=path,
      tokens_prefilled=prompt_lengths,
      tokens_decoded=jnp.zeros((b,), jnp.int32),
      peak_pages_in_use=jnp.zeros((), jnp.int32),
      overflow=jnp.zeros((b,), bool))
  step = TreeStep(logits=model.logits(last), hidden=last, written=jnp.ones((b, 1), bool))
  return cache, step


def fork_nodes(cache: TreeKVCache, parents: jax.Array, *, num_children: int,
         valid: jax.Array | None = None) -> tuple[TreeKVCache, jax.Array]:
  """K children of each parent, sharing all the parent's pages (refcount + 1, no data copy).

  A child starts with its parent's tokens (`node_start = node_length = parent's length`); its
  copy of a shared partial last page is made when it first appends (copy-on-write).

  Args:
    parents: [M] int32 live node ids, distinct or not.
    num_children: K, static.
    valid: [M] bool, rows to fork (default all).
  Returns:
    (cache, children [M, K] int32, -1 where not created: row invalid, or overflow (no free
    node slot, or depth > max_depth), which sets `overflow` for the parent's problem).
  """
  parents = jnp.asarray(parents, jnp.int32)
  m, k = parents.shape[0], num_children
  if valid is None:
    valid = jnp.ones((m,), bool)
  valid = valid & cache.node_live[parents]
  depth = cache.node_depth[parents] + 1                                  # [M]
  request = jnp.repeat(valid & (depth <= cache.max_depth), k)            # [M*K]
  children = _allocate(~cache.node_live, request)                        # [M*K]
  made = children >= 0
  src = jnp.repeat(parents, k)
  problems = cache.node_problem[src]
  failed = jnp.repeat(valid, k) & ~made
  n = cache.max_nodes
  dst = _drop_index(children, n)
  child_depth = jnp.repeat(depth, k)
  path = cache.node_path[src]
  path = jnp.where(jnp.arange(cache.max_depth + 1)[None, :] == child_depth[:, None],
                   children[:, None], path)
  length = cache.node_length[src]

  def put(field, value):
    return field.at[dst].set(value, mode="drop")

  cache = cache.replace(
      page_refcount=_add_refs(cache.page_refcount, cache.node_pages[src], made, 1),
      node_live=put(cache.node_live, True),
      node_problem=put(cache.node_problem, problems),
      node_parent=put(cache.node_parent, src),
      node_depth=put(cache.node_depth, child_depth),
      node_start=put(cache.node_start, length),
      node_length=put(cache.node_length, length),
      node_pages=put(cache.node_pages, cache.node_pages[src]),
      node_path=put(cache.node_path, path),
      overflow=_flag(cache.overflow, problems, failed))
  return _with_peak(cache), children.reshape(m, k)


def release_nodes(cache: TreeKVCache, nodes: jax.Array,
            valid: jax.Array | None = None) -> TreeKVCache:
  """Free node slots: refcount - 1 on each of their pages (pages at 0 become free).

  Children keep their own references, so releasing an interior node leaves its subtree intact.

  Args:
    nodes: [M] int32 distinct node ids (dead ones are ignored).
    valid: [M] bool, rows to release (default all).
  """
  nodes = jnp.asarray(nodes, jnp.int32)
  if valid is None:
    valid = jnp.ones(nodes.shape, bool)
  valid = valid & cache.node_live[nodes]
  dst = _drop_index(jnp.where(valid, nodes, -1), cache.max_nodes)
  return cache.replace(
      page_refcount=_add_refs(cache.page_refcount, cache.node_pages[nodes], valid, -1),
      node_live=cache.node_live.at[dst].set(False, mode="drop"),
      node_parent=cache.node_parent.at[dst].set(-1, mode="drop"),
      node_pages=cache.node_pages.at[dst].set(-1, mode="drop"),
      node_path=cache.node_path.at[dst].set(-1, mode="drop"))


def copy_nodes(cache: TreeKVCache, sources: jax.Array, targets: jax.Array,
               valid: jax.Array | None = None) -> TreeKVCache:
  """targets[i] becomes a copy of sources[i] (pruning / resampling: beam, particle filter).

  Copies page-table rows and node fields and adjusts refcounts (sources' pages + 1, targets'
  old pages - 1); no key/value data moves. A target keeps its own id at the end of its path.
  All sources are read before any target is written, so permutations are fine.

  Args:
    sources: [M] int32 live node ids.
    targets: [M] int32 distinct node ids (live: their old pages are released; or free slots).
    valid: [M] bool, rows to copy (default all).
  """
  sources = jnp.asarray(sources, jnp.int32)
  targets = jnp.asarray(targets, jnp.int32)
  if valid is None:
    valid = jnp.ones(sources.shape, bool)
  valid = valid & cache.node_live[sources]
  refcount = _add_refs(cache.page_refcount, cache.node_pages[sources], valid, 1)
  refcount = _add_refs(refcount, cache.node_pages[targets], valid & cache.node_live[targets],
                       -1)
  dst = _drop_index(jnp.where(valid, targets, -1), cache.max_nodes)
  depth = cache.node_depth[sources]
  path = cache.node_path[sources]
  path = jnp.where(jnp.arange(cache.max_depth + 1)[None, :] == depth[:, None],
                   targets[:, None], path)

  def put(field, value):
    return field.at[dst].set(value, mode="drop")

  return cache.replace(
      page_refcount=refcount,
      node_live=put(cache.node_live, True),
      node_problem=put(cache.node_problem, cache.node_problem[sources]),
      node_parent=put(cache.node_parent, cache.node_parent[sources]),
      node_depth=put(cache.node_depth, depth),
      node_start=put(cache.node_start, cache.node_start[sources]),
      node_length=put(cache.node_length, cache.node_length[sources]),
      node_pages=put(cache.node_pages, cache.node_pages[sources]),
      node_path=put(cache.node_path, path))


def _reserve_slots(cache: TreeKVCache, nodes: jax.Array, valid: jax.Array):
  """Make each row's next slot writable: a fresh page when the last page is full, a private
  copy when it is partial and shared. Returns (cache, page [R], slot [R], written [R])."""
  length = cache.node_length[nodes]
  index, slot = length // cache.page_len, length % cache.page_len
  in_table = index < cache.max_pages_per_node
  table = cache.node_pages[nodes]                                        # [R, MP]
  current = jnp.take_along_axis(table, jnp.clip(index, 0, cache.max_pages_per_node - 1)[:, None],
                                axis=1)[:, 0]
  current = jnp.where((slot > 0) & in_table, current, -1)
  shared = (current >= 0) & (cache.page_refcount[jnp.clip(current, 0)] > 1)
  need = valid & in_table & ((slot == 0) | shared)
  fresh = _allocate(cache.free_pages, need)
  written = valid & in_table & (~need | (fresh >= 0))
  copy = shared & written
  # Copy-on-write of shared partial pages: one gather and one scatter for the whole batch.
  src = jnp.clip(current, 0)
  dst = _drop_index(jnp.where(copy, fresh, -1), cache.num_pages)
  page_keys = cache.page_keys.at[:, :, dst].set(cache.page_keys[:, :, src], mode="drop")
  page_values = cache.page_values.at[:, :, dst].set(cache.page_values[:, :, src], mode="drop")
  refcount = cache.page_refcount.at[_drop_index(jnp.where(copy, current, -1),
                                                cache.num_pages)].add(-1, mode="drop")
  refcount = refcount.at[_drop_index(jnp.where(need & written, fresh, -1),
                                     cache.num_pages)].add(1, mode="drop")
  page = jnp.where(need, fresh, current)
  rows = _drop_index(jnp.where(need & written, nodes, -1), cache.max_nodes)
  node_pages = cache.node_pages.at[rows, jnp.clip(index, 0, cache.max_pages_per_node - 1)].set(
      page, mode="drop")
  problems = cache.node_problem[nodes]
  cache = cache.replace(
      page_keys=page_keys, page_values=page_values, page_refcount=refcount,
      node_pages=node_pages,
      overflow=_flag(cache.overflow, problems, valid & ~written))
  return cache, jnp.where(written, page, -1), slot, written


# ----------------------------------------------------------------------------- attention


def _partial_softmax(scores: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array,
                                                                  jax.Array]:
  """(probabilities exp(s - m) masked, m = max over unmasked (-inf if none), their sum)."""
  scores = jnp.where(mask, scores, -jnp.inf)
  top = jnp.max(scores, axis=-1)
  safe = jnp.where(jnp.isfinite(top), top, 0.0)
  probs = jnp.where(mask, jnp.exp(scores - safe[..., None]), 0.0)
  return probs, top, jnp.sum(probs, axis=-1)


def cascade_attention(q: jax.Array, prompt_keys: jax.Array, prompt_values: jax.Array,
                      prompt_lengths: jax.Array, suffix_keys: jax.Array,
                      suffix_values: jax.Array, suffix_lengths: jax.Array) -> jax.Array:
  """Grouped-query attention of one query per row over a shared prompt and a private suffix.

  softmax over [prompt_b ; suffix_bw] of q . k / sqrt(hd), computed as two partial softmaxes
  merged exactly by their log-sum-exp (module docstring); scores and softmax in float32.

  Args:
    q: [B, W, Hq, hd] (rows w of problem b).
    prompt_keys, prompt_values: [B, P, Hkv, hd]; prompt_lengths: [B] (keys p < length count).
    suffix_keys, suffix_values: [B, W, S, Hkv, hd]; suffix_lengths: [B, W].
  Returns:
    [B, W, Hq * hd] in q's dtype.
  """
  b, w, hq, hd = q.shape
  hkv = prompt_keys.shape[2]
  q32 = q.reshape(b, w, hkv, hq // hkv, hd).astype(jnp.float32)
  f32, scale = jnp.float32, 1.0 / math.sqrt(hd)
  # Prompt: one dense matmul per problem over all its rows.
  scores = jnp.einsum("bwkgd,bpkd->bwkgp", q32, prompt_keys.astype(f32)) * scale
  mask = jnp.arange(prompt_keys.shape[1])[None, :] < prompt_lengths[:, None]    # [B, P]
  probs, top1, sum1 = _partial_softmax(scores, mask[:, None, None, None, :])
  acc1 = jnp.einsum("bwkgp,bpkd->bwkgd", probs, prompt_values.astype(f32))
  # Suffix: each row over its own gathered pages.
  scores = jnp.einsum("bwkgd,bwskd->bwkgs", q32, suffix_keys.astype(f32)) * scale
  mask = jnp.arange(suffix_keys.shape[2])[None, None, :] < suffix_lengths[:, :, None]
  probs, top2, sum2 = _partial_softmax(scores, mask[:, :, None, None, :])
  acc2 = jnp.einsum("bwkgs,bwskd->bwkgd", probs, suffix_values.astype(f32))
  top = jnp.maximum(top1, top2)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w1 = jnp.where(jnp.isfinite(top1), jnp.exp(top1 - top), 0.0)
  w2 = jnp.where(jnp.isfinite(top2), jnp.exp(top2 - top), 0.0)
  denom = w1 * sum1 + w2 * sum2
  out = (w1[..., None] * acc1 + w2[..., None] * acc2) / jnp.where(denom > 0, denom, 1.0)[
      ..., None]
  return out.reshape(b, w, hq * hd).astype(q.dtype)


def _gather_pages(layer_pages: jax.Array, tables: jax.Array) -> jax.Array:
  """[Hkv, num_pages, page_len, hd] through page tables [B, W, MP] -> [B, W, MP*page_len,
  Hkv, hd] (unused entries read page 0 and are masked by the suffix length)."""
  hkv, _, page_len, hd = layer_pages.shape
  b, w, mp = tables.shape
  gathered = layer_pages[:, jnp.clip(tables, 0)]                   # [Hkv, B, W, MP, PL, hd]
  return jnp.moveaxis(gathered, 0, -2).reshape(b, w, mp * page_len, hkv, hd)


# ----------------------------------------------------------------------------- model step


def tree_step(graphdef: nnx.GraphDef, params: Any, cache: TreeKVCache, nodes: jax.Array,
              tokens: jax.Array, valid: jax.Array | None = None) -> tuple[TreeKVCache, TreeStep]:
  """Append one token to each of the rows' nodes and run the Llama layers on it.

  Row (b, w) appends `tokens[b, w]` to node `nodes[b, w]` (a node of problem b; nodes distinct)
  at position prompt_length[b] + node_length: its keys/values go into the node's pages
  (a fresh page or a copy-on-write copy when needed) and its query attends b's prompt and the
  node's suffix (`cascade_attention`). Rows that overflow (no free page, full page table) are
  not written, set `overflow[b]` and have `written` False (their outputs are meaningless).

  Args:
    graphdef, params: `nnx.split` of a `Llama`.
    nodes, tokens: [B, W] int32.
    valid: [B, W] bool, rows to run (default all).
  Returns:
    (cache, `TreeStep` [B, W] at the new tokens).
  """
  nodes = jnp.asarray(nodes, jnp.int32)
  tokens = jnp.asarray(tokens, jnp.int32)
  b, w = nodes.shape
  if valid is None:
    valid = jnp.ones((b, w), bool)
  flat_nodes = nodes.reshape(-1)
  cache, page, slot, written = _reserve_slots(cache, flat_nodes, valid.reshape(-1))
  model = nnx.merge(graphdef, params)
  config = model.config
  length = cache.node_length[nodes]                                     # [B, W]
  positions = cache.prompt.lengths[:, None] + length
  cos, sin = rotary_tables(config, positions.reshape(b * w, 1))         # [BW, 1, 1, hd]
  written_bw = written.reshape(b, w)
  tables = cache.node_pages[nodes]                                      # [B, W, MP]
  # The new token's own key/value joins its row's gathered suffix at index `length`; the pool
  # is written once after the last layer (one scatter for all layers, in place).
  rows_b, rows_w = jnp.divmod(jnp.arange(b * w), w)
  own = jnp.where(written, length.reshape(-1), cache.max_pages_per_node * cache.page_len)
  hq, hkv, hd = config.num_heads, config.num_kv_heads, config.resolved_head_dim
  new_keys, new_values = [], []
  x = model.embed(tokens)                                               # [B, W, D]
  for i, layer in enumerate(model.layers):
    attn = layer.attn
    h = layer.input_norm(x).reshape(b * w, 1, -1)
    q = apply_rotary(attn.q_proj(h).reshape(b * w, 1, hq, hd), cos, sin)
    k = apply_rotary(attn.k_proj(h).reshape(b * w, 1, hkv, hd), cos, sin)[:, 0]
    v = attn.v_proj(h).reshape(b * w, hkv, hd)
    k, v = k.astype(cache.page_keys.dtype), v.astype(cache.page_values.dtype)
    new_keys.append(k)
    new_values.append(v)
    suffix_keys = _gather_pages(cache.page_keys[i], tables).at[rows_b, rows_w, own].set(
        k, mode="drop")
    suffix_values = _gather_pages(cache.page_values[i], tables).at[rows_b, rows_w, own].set(
        v, mode="drop")
    out = cascade_attention(q.reshape(b, w, hq, hd), cache.prompt.keys[i],
                            cache.prompt.values[i], cache.prompt.lengths, suffix_keys,
                            suffix_values, length + written_bw)
    x = x + attn.o_proj(out)
    x = x + layer.mlp(layer.post_attn_norm(x))
  hidden = model.final_norm(x)
  write_page = _drop_index(page, cache.num_pages)
  # [L, BW, Hkv, hd] -> [L, Hkv, BW, hd], the layout of pool[:, :, page, slot].
  new_keys = jnp.swapaxes(jnp.stack(new_keys), 1, 2)
  new_values = jnp.swapaxes(jnp.stack(new_values), 1, 2)
  cache = cache.replace(
      page_keys=cache.page_keys.at[:, :, write_page, slot].set(new_keys, mode="drop"),
      page_values=cache.page_values.at[:, :, write_page, slot].set(new_values, mode="drop"),
      node_length=cache.node_length.at[_drop_index(jnp.where(written, flat_nodes, -1),
                                                   cache.max_nodes)].add(1, mode="drop"),
      tokens_decoded=cache.tokens_decoded + jnp.sum(written_bw, axis=1).astype(jnp.int32))
  return _with_peak(cache), TreeStep(logits=model.logits(hidden), hidden=hidden,
                                     written=written_bw)
