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

Step decoding. `tree_step` writes each token into the pages as it goes. A search that decodes a
whole step of up to T tokens for K children of W parents uses the step-level path instead:
`gather_ancestors` reads the parents' suffixes from the pages once, `step_decode` runs one
token of every row into a dense per-step buffer (attending prompt, parent suffix and buffer:
one softmax over the three, each read by its own matmul in a head-major layout laid out once
per expansion), and `commit_steps` writes the finished steps into fresh pages once (one
allocation, one scatter). The token loop then never reads or writes the page pool.
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
  "StepKV",
  "gather_ancestors",
  "step_decode",
  "commit_steps",
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


def _attention_part(subscripts: str, q32: jax.Array, keys: jax.Array, values: jax.Array,
                    mask: jax.Array, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One part of a split softmax: (max m, sum l, unnormalised output a) over the part's keys.

  `subscripts` is the q.k einsum "Q,K->S" (the keys' axis last in S); a = probs . values uses
  "S,K->Q" with the same letters. Scores in float32."""
  spec_q, rest = subscripts.split(",")
  spec_k, spec_s = rest.split("->")
  scores = jnp.einsum(subscripts, q32, keys.astype(jnp.float32)) * scale
  probs, top, total = _partial_softmax(scores, mask)
  acc = jnp.einsum(f"{spec_s},{spec_k}->{spec_q}", probs, values.astype(jnp.float32))
  return top, total, acc


def _merge_parts(parts: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
  """Exact softmax output from partial softmaxes (m_i, l_i, a_i): sum a_i e^{m_i-m} / sum
  l_i e^{m_i-m}, m = max m_i (rows with no key at all give 0)."""
  top = parts[0][0]
  for part_top, _, _ in parts[1:]:
    top = jnp.maximum(top, part_top)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  denom, out = 0.0, 0.0
  for part_top, total, acc in parts:
    weight = jnp.where(jnp.isfinite(part_top), jnp.exp(part_top - top), 0.0)
    denom = denom + weight * total
    out = out + weight[..., None] * acc
  return out / jnp.where(denom > 0, denom, 1.0)[..., None]


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
  scale = 1.0 / math.sqrt(hd)
  prompt_mask = jnp.arange(prompt_keys.shape[1])[None, :] < prompt_lengths[:, None]  # [B, P]
  suffix_mask = jnp.arange(suffix_keys.shape[2])[None, None, :] < suffix_lengths[:, :, None]
  out = _merge_parts([
      # Prompt: one dense matmul per problem over all its rows.
      _attention_part("bwkgd,bpkd->bwkgp", q32, prompt_keys, prompt_values,
                      prompt_mask[:, None, None, None, :], scale),
      # Suffix: each row over its own gathered pages.
      _attention_part("bwkgd,bwskd->bwkgs", q32, suffix_keys, suffix_values,
                      suffix_mask[:, :, None, None, :], scale)])
  return out.reshape(b, w, hq * hd).astype(q.dtype)


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _gather_pages(layer_pages: jax.Array, tables: jax.Array) -> jax.Array:
  """[Hkv, num_pages, page_len, hd] through page tables [B, W, MP] -> [B, W, MP*page_len,
  Hkv, hd] (unused entries read page 0 and are masked by the suffix length)."""
  hkv, _, page_len, hd = layer_pages.shape
  b, w, mp = tables.shape
  gathered = layer_pages[:, jnp.clip(tables, 0)]                   # [Hkv, B, W, MP, PL, hd]
  return jnp.moveaxis(gathered, 0, -2).reshape(b, w, mp * page_len, hkv, hd)


# ----------------------------------------------------------------------------- model step


def _project_qkv(layer: Any, x: jax.Array, cos: jax.Array, sin: jax.Array, *, num_heads: int,
                 num_kv_heads: int, head_dim: int,
                 fused: dict[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array,
                                                                     jax.Array]:
  """A Llama block's attention inputs for one new token per row: x [..., D] (R rows) ->
  q [R, 1, Hq, hd], k [R, 1, Hkv, hd] (both rotated by cos/sin [R, 1, 1, hd]), v [R, Hkv, hd].
  `fused` (one layer of `Llama.fused_decode_weights`): q, k, v from one matmul."""
  h = layer.input_norm(x).reshape(-1, 1, x.shape[-1])
  rows = h.shape[0]
  q, k, v = layer.attn.project_qkv(h, fused)
  q = apply_rotary(q.reshape(rows, 1, num_heads, head_dim), cos, sin)
  k = apply_rotary(k.reshape(rows, 1, num_kv_heads, head_dim), cos, sin)
  return q, k, v.reshape(rows, num_kv_heads, head_dim)


def _finish_layer(layer: Any, x: jax.Array, attention_out: jax.Array,
                  fused: dict[str, jax.Array] | None = None) -> jax.Array:
  """The rest of a Llama block after attention: output projection, residual, MLP, residual."""
  x = x + layer.attn.o_proj(attention_out)
  return x + layer.mlp(layer.post_attn_norm(x), fused)


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
    q, k, v = _project_qkv(layer, x, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=hd)
    k, v = k[:, 0].astype(cache.page_keys.dtype), v.astype(cache.page_values.dtype)
    new_keys.append(k)
    new_values.append(v)
    suffix_keys = _gather_pages(cache.page_keys[i], tables).at[rows_b, rows_w, own].set(
        k, mode="drop")
    suffix_values = _gather_pages(cache.page_values[i], tables).at[rows_b, rows_w, own].set(
        v, mode="drop")
    out = cascade_attention(q.reshape(b, w, hq, hd), cache.prompt.keys[i],
                            cache.prompt.values[i], cache.prompt.lengths, suffix_keys,
                            suffix_values, length + written_bw)
    x = _finish_layer(layer, x, out)
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


# ----------------------------------------------------------------------------- step decoding


@struct.dataclass
class StepKV:
  """What the rows of one expansion attend, in dense per-layer arrays.

  W parent rows per problem, K children per parent, R = W * K child rows per problem. The
  prompts and the parents' suffixes are laid out once per expansion (`gather_ancestors`); the
  step's own new tokens go into a dense buffer, one slot per token (`step_decode`), and into
  pages only once the step is finished (`commit_steps`): the token loop never touches the pool.
  Every array is head-major ([B, Hkv, ...]), keys with hd before the key axis, values after
  it: the layouts the token loop's matmuls read directly, so a token copies no key or value.
  """

  prompt_keys: tuple[jax.Array, ...]    # per layer [B, Hkv, hd, P] the prompts (cache.prompt)
  prompt_values: tuple[jax.Array, ...]  # per layer [B, Hkv, P, hd]
  parent_keys: tuple[jax.Array, ...]    # per layer [B, Hkv, W, hd, S] parent suffixes,
  parent_values: tuple[jax.Array, ...]  # per layer [B, Hkv, W, S, hd]   S = max_pages_per_node
  parent_lengths: jax.Array             # [B, W] int32 tokens after the prompt of each parent
  keys: tuple[jax.Array, ...]           # per layer [B, Hkv, W, K, hd, T] the step's new tokens,
  values: tuple[jax.Array, ...]         # per layer [B, Hkv, W, K, T, hd]   slot t = token t

  num_children = property(lambda self: self.keys[0].shape[3])
  max_tokens = property(lambda self: self.keys[0].shape[5])


def gather_ancestors(cache: TreeKVCache, parents: jax.Array, *, num_children: int,
                     max_tokens: int) -> StepKV:
  """The prompts and the suffixes of parent rows `parents [B, W]` (node ids of problem b; -1
  or dead: empty), read once into `StepKV`'s layouts, and an empty buffer for `max_tokens` new
  tokens of each of their `num_children` children."""
  parents = jnp.asarray(parents, jnp.int32)
  b, w = parents.shape
  safe = jnp.clip(parents, 0)
  live = (parents >= 0) & cache.node_live[safe]
  tables = jnp.clip(cache.node_pages[safe], 0)                            # [B, W, MP]
  n_layers, hkv, _, page_len, hd = cache.page_keys.shape
  s = cache.max_pages_per_node * page_len
  dtype = cache.page_keys.dtype

  def suffix(pool, layer):   # [L, Hkv, P, PL, hd] -> [B, Hkv, W, S, hd] of one layer
    return jnp.moveaxis(pool[layer][:, tables].reshape(hkv, b, w, s, hd), 0, 1)

  layers = range(n_layers)
  prompt = cache.prompt                                                   # [L, B, P, Hkv, hd]
  key_buffer = jnp.zeros((b, hkv, w, num_children, hd, max_tokens), dtype)
  value_buffer = jnp.zeros((b, hkv, w, num_children, max_tokens, hd), dtype)
  return StepKV(
      prompt_keys=tuple(jnp.transpose(prompt.keys[i], (0, 2, 3, 1)) for i in layers),
      prompt_values=tuple(jnp.transpose(prompt.values[i], (0, 2, 1, 3)) for i in layers),
      parent_keys=tuple(jnp.swapaxes(suffix(cache.page_keys, i), -1, -2) for i in layers),
      parent_values=tuple(suffix(cache.page_values, i) for i in layers),
      parent_lengths=jnp.where(live, cache.node_length[safe], 0),
      keys=(key_buffer,) * n_layers, values=(value_buffer,) * n_layers)


def step_decode(graphdef: nnx.GraphDef, params: Any, cache: TreeKVCache, kv: StepKV,
                t: jax.Array, tokens: jax.Array,
                fused: list[dict[str, jax.Array]] | None = None) -> tuple[StepKV, TreeStep]:
  """Token t of every child row's step: row (b, w * K + k) feeds `tokens[b, w * K + k]` at
  position prompt_length[b] + parent_length[b, w] + t; its key/value goes into buffer slot t and
  its query attends b's prompt, its parent's suffix and its own tokens 0..t (one softmax over
  the three, each read through its own matmul). Reads `cache.prompt.lengths` only: the pool is
  not touched.

  Args:
    graphdef, params: `nnx.split` of a `Llama`.
    kv: from `gather_ancestors` (slots < t filled by earlier calls).
    t: [] int32 token index in the step (< kv.max_tokens).
    tokens: [B, W * K] int32.
    fused: `Llama.fused_decode_weights()` (built once by the caller, outside its token loop),
      or None for the separate projections.
  Returns:
    (kv, `TreeStep` [B, W * K] at the new tokens; `written` all True: nothing is written to the
    pages before `commit_steps`).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  b, hkv, w, k, hd, t_max = kv.keys[0].shape
  model = nnx.merge(graphdef, params)
  config = model.config
  hq = config.num_heads
  g = hq // hkv
  positions = cache.prompt.lengths[:, None] + kv.parent_lengths + t               # [B, W]
  cos, sin = rotary_tables(config, jnp.repeat(positions.reshape(-1), k)[:, None])  # [BWK,1,1,hd]
  scale = 1.0 / math.sqrt(hd)
  p, s = kv.prompt_keys[0].shape[-1], kv.parent_keys[0].shape[-1]
  # Scores [B, Hkv, W, K, G, P + S + T]: the prompt's keys, the parent's, the step's own.
  mask = jnp.concatenate([
      jnp.broadcast_to((jnp.arange(p)[None, :] < cache.prompt.lengths[:, None])[:, None, :],
                       (b, w, p)),
      jnp.arange(s)[None, None, :] < kv.parent_lengths[:, :, None],
      jnp.broadcast_to(jnp.arange(t_max) <= t, (b, w, t_max))], axis=-1)[:, None, :, None,
                                                                          None, :]
  keys, values = list(kv.keys), list(kv.values)
  x = model.embed(tokens)                                                       # [B, WK, D]
  for i, layer in enumerate(model.layers):
    layer_fused = None if fused is None else fused[i]
    q, new_k, new_v = _project_qkv(layer, x, cos, sin, num_heads=hq, num_kv_heads=hkv,
                                   head_dim=hd, fused=layer_fused)
    # Head-major [B, Hkv, W, K, ...]: the layout every part of the attention reads.
    new_k = jnp.transpose(new_k.reshape(b, w, k, hkv, hd), (0, 3, 1, 2, 4))
    new_v = jnp.transpose(new_v.reshape(b, w, k, hkv, hd), (0, 3, 1, 2, 4))
    keys[i] = jax.lax.dynamic_update_slice_in_dim(
        keys[i], new_k[..., None].astype(keys[i].dtype), t, axis=5)
    values[i] = jax.lax.dynamic_update_slice_in_dim(
        values[i], new_v[..., None, :].astype(values[i].dtype), t, axis=4)
    q32 = jnp.transpose(q.reshape(b, w, k, hkv, g, hd), (0, 3, 1, 2, 4, 5)).astype(jnp.float32)
    scores = jnp.concatenate([
        jnp.einsum("bhwcgd,bhdp->bhwcgp", q32, _f32(kv.prompt_keys[i])),
        jnp.einsum("bhwcgd,bhwds->bhwcgs", q32, _f32(kv.parent_keys[i])),
        jnp.einsum("bhwcgd,bhwcdt->bhwcgt", q32, _f32(keys[i]))], axis=-1) * scale
    # Every row attends at least its own token t, so the max is finite.
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    out = (jnp.einsum("bhwcgp,bhpd->bhwcgd", probs[..., :p], _f32(kv.prompt_values[i]))
           + jnp.einsum("bhwcgs,bhwsd->bhwcgd", probs[..., p:p + s], _f32(kv.parent_values[i]))
           + jnp.einsum("bhwcgt,bhwctd->bhwcgd", probs[..., p + s:], _f32(values[i])))
    out = jnp.transpose(out, (0, 2, 3, 1, 4, 5)).reshape(b, w * k, hq * hd)
    x = _finish_layer(layer, x, out.astype(x.dtype), layer_fused)
  hidden = model.final_norm(x)
  return kv.replace(keys=tuple(keys), values=tuple(values)), TreeStep(
      logits=model.logits(hidden), hidden=hidden, written=jnp.ones((b, w * k), bool))


def commit_steps(cache: TreeKVCache, kv: StepKV, children: jax.Array,
                 lengths: jax.Array) -> tuple[TreeKVCache, jax.Array]:
  """Write each child's finished step (its first lengths[b, j] buffer slots) into pages, once.

  Child j = w * K + k of problem b (just forked from parent row w: its length is the parent's)
  gets ceil((partial + n) / page_len) fresh pages, partial = its length % page_len: the first
  starts with a copy of the shared partial page's `partial` tokens (copy-on-write; the shared
  page loses the reference), the rest hold the new tokens. Pages for all rows come from one
  batched allocation and go into the pool with one scatter per pool. A row whose pages do not
  fit (no free page left for it, or a full page table) is not written and sets `overflow[b]`.

  Args:
    kv: the buffer of `step_decode`.
    children: [B, W * K] int32 node ids (-1: none).
    lengths: [B, W * K] int32 tokens decoded into the buffer (<= kv.max_tokens).
  Returns:
    (cache, committed [B, W * K] bool: the row's tokens are in its node).
  """
  children = jnp.asarray(children, jnp.int32)
  b, hkv, w, k, hd, t_max = kv.keys[0].shape
  n_layers = len(kv.keys)
  r, page_len, mp = b * w * k, cache.page_len, cache.max_pages_per_node
  flat = children.reshape(-1)
  safe = jnp.clip(flat, 0)
  n = jnp.where(flat >= 0, lengths.reshape(-1), 0)
  start = cache.node_length[safe]
  partial, first = start % page_len, start // page_len
  max_new = -(-(page_len - 1 + t_max) // page_len)                   # static pages per row
  need = jnp.where(n > 0, (partial + n + page_len - 1) // page_len, 0)
  fits = (n > 0) & (first + need <= mp)
  free_count = jnp.sum(cache.free_pages)
  ok = fits & (jnp.cumsum(jnp.where(fits, need, 0)) <= free_count)
  slot = jnp.arange(max_new)
  request = ok[:, None] & (slot[None, :] < need[:, None])            # [R, max_new]
  fresh = _allocate(cache.free_pages, request.reshape(-1)).reshape(r, max_new)
  # Row tails [L, Hkv, R, max_new * PL, hd]: the shared partial page's first `partial` tokens,
  # then the buffer's tokens.
  table = cache.node_pages[safe]                                      # [R, MP]
  old = jnp.take_along_axis(table, jnp.clip(first, 0, mp - 1)[:, None], axis=1)[:, 0]
  old = jnp.where((partial > 0) & ok, old, -1)
  pos = jnp.arange(max_new * page_len)
  src = jnp.clip(pos[None, :] - partial[:, None], 0, t_max - 1)       # [R, max_new * PL]
  keep_old = pos[None, :] < partial[:, None]

  def tail(pool, new):   # new: the buffer as [L, Hkv, T, R, hd]
    prefix = pool[:, :, jnp.clip(old, 0)]                             # [L, Hkv, R, PL, hd]
    prefix = jnp.pad(prefix, ((0, 0), (0, 0), (0, 0), (0, (max_new - 1) * page_len), (0, 0)))
    new = jnp.take_along_axis(new, src.T[None, None, :, :, None], axis=2)   # [L,Hkv,S,R,hd]
    rows = jnp.where(keep_old.T[None, None, :, :, None], jnp.moveaxis(prefix, 3, 2), new)
    rows = jnp.moveaxis(rows, 2, 3).reshape(n_layers, hkv, r * max_new, page_len, hd)
    return pool.at[:, :, _drop_index(fresh.reshape(-1), cache.num_pages)].set(rows, mode="drop")

  refcount = cache.page_refcount.at[_drop_index(fresh.reshape(-1), cache.num_pages)].add(
      1, mode="drop")
  refcount = refcount.at[_drop_index(old, cache.num_pages)].add(-1, mode="drop")
  cols = first[:, None] + slot[None, :]
  rows = _drop_index(jnp.where(request, safe[:, None], -1), cache.max_nodes)
  written = jnp.where(ok, n, 0)
  problems = jnp.repeat(jnp.arange(b, dtype=jnp.int32), w * k)
  cache = cache.replace(
      # The buffers ([L, B, Hkv, W, K, hd, T] / [..., T, hd]) as [L, Hkv, T, R, hd], once a step.
      page_keys=tail(cache.page_keys, jnp.stack(kv.keys).transpose(0, 2, 6, 1, 3, 4, 5)
                     .reshape(n_layers, hkv, t_max, r, hd)),
      page_values=tail(cache.page_values, jnp.stack(kv.values).transpose(0, 2, 5, 1, 3, 4, 6)
                       .reshape(n_layers, hkv, t_max, r, hd)),
      page_refcount=refcount,
      node_pages=cache.node_pages.at[rows, jnp.clip(cols, 0, mp - 1)].set(fresh, mode="drop"),
      node_length=cache.node_length.at[_drop_index(jnp.where(ok, flat, -1), cache.max_nodes)]
      .add(written, mode="drop"),
      tokens_decoded=cache.tokens_decoded + jnp.sum(written.reshape(b, -1), axis=1).astype(
          jnp.int32),
      overflow=_flag(cache.overflow, problems, (n > 0) & ~ok))
  return _with_peak(cache), ok.reshape(b, w * k)
