"""Sharding rules by parameter path, and the shardings of parameters, optimizer states, batches
and search states on a :mod:`~qstar_jax.distributed.mesh` mesh.

A rule is ``(pattern, PartitionSpec)``: the first pattern that matches the end of a leaf's dotted
path (``layers.0.attn.q_proj.kernel``; ``re.search`` of ``(^|\\.)pattern$``) gives the leaf's
spec. Leaves no rule matches are replicated. Because an optax state holds trees shaped like the
parameters (``0.mu.layers.0.attn.q_proj.kernel``), the same rules shard it: Adam's moments
follow their parameters and its step count is replicated.

The transformer (``LLAMA_RULES``, weights stored ``[in, out]``)::

  embed_tokens.embedding          [V, D]       P(tensor, fsdp)
  attn.{q,k,v}_proj.kernel        [D, H*hd]    P(fsdp, tensor)   (bias [H*hd]: P(tensor))
  attn.o_proj.kernel              [H*hd, D]    P(tensor, fsdp)
  mlp.{gate,up}_proj.kernel       [D, F]       P(fsdp, tensor)
  mlp.down_proj.kernel            [F, D]       P(tensor, fsdp)
  lm_head.kernel                  [D, V]       P(fsdp, tensor)
  *norm*.scale                    [D]          replicated

so with ``tensor = 1`` every matrix is split over ``fsdp`` (ZeRO-3) and with ``fsdp = 1`` the heads
and the MLP's hidden units are split over ``tensor`` (Megatron: column-parallel in, row-parallel
out). The value/Q heads (``value_head.kernel [D, 1]``: P(fsdp, None)) and the DeepCubeA puzzle
networks (``PUZZLE_RULES``: the hidden dims over ``fsdp``/``tensor``, the one-hot input and the
action outputs whole) have their own rules; ``DEFAULT_RULES`` is all of them.

A dimension that does not divide over its axes is an error naming the leaf, the dimension and the
mesh (no silent replication).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from qstar_jax.distributed.mesh import BATCH_AXES, MeshShapeError

__all__ = [
  "Rules",
  "LLAMA_RULES",
  "HEAD_RULES",
  "PUZZLE_RULES",
  "DEFAULT_RULES",
  "leaf_path",
  "spec_for",
  "param_specs",
  "param_shardings",
  "opt_state_shardings",
  "replicated",
  "batch_spec",
  "batch_shardings",
  "batch_size_multiple",
  "shard_params",
  "put_batch",
  "put_replicated",
  "put_global",
  "to_host",
  "spec_of",
]

Rules = Sequence[tuple[str, P]]

LLAMA_RULES: Rules = (
  (r"embed_tokens\.embedding", P("tensor", "fsdp")),
  (r"attn\.(q|k|v)_proj\.kernel", P("fsdp", "tensor")),
  (r"attn\.(q|k|v)_proj\.bias", P("tensor")),
  (r"attn\.o_proj\.kernel", P("tensor", "fsdp")),
  (r"mlp\.(gate|up)_proj\.kernel", P("fsdp", "tensor")),
  (r"mlp\.down_proj\.kernel", P("tensor", "fsdp")),
  (r"lm_head\.kernel", P("fsdp", "tensor")),
  (r"[a-z_]*norm\.scale", P()),
)

HEAD_RULES: Rules = (
  (r"value_head\.kernel", P("fsdp", None)),
  (r"value_head\.bias", P()),
)

PUZZLE_RULES: Rules = (
  (r"dense_1\.kernel", P(None, "fsdp")),          # [one-hot input, hidden_1] (also blocks')
  (r"dense_2\.kernel", P("fsdp", "tensor")),      # [hidden_1, hidden_2] (blocks: [h2, h2])
  (r"head\.kernel", P("fsdp", None)),             # [hidden_2, outputs]
  (r"(dense_\d|head)\.bias", P()),
  (r"norm_\d\.(scale|bias)", P()),
)

DEFAULT_RULES: Rules = (*HEAD_RULES, *LLAMA_RULES, *PUZZLE_RULES)

_COMPILED: dict[str, re.Pattern] = {}


def _pattern(rule: str) -> re.Pattern:
  if rule not in _COMPILED:
    _COMPILED[rule] = re.compile(r"(^|\.)" + rule + r"$")
  return _COMPILED[rule]


def leaf_path(path: Sequence[Any]) -> str:
  """A tree path as dotted names (``layers.0.attn.q_proj.kernel``); nnx's ``.value`` dropped."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  if parts and parts[-1] == "value":
    parts.pop()
  return ".".join(parts)


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  names = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[n] for n in names)


def _check_divides(name: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
  if len(spec) > len(shape):
    raise MeshShapeError(f"{name} {shape}: sharding {spec} has more entries than the leaf has "
                         "dimensions")
  for dim, axes in enumerate(spec):
    size = _axis_size(mesh, axes)
    if shape[dim] % size:
      raise MeshShapeError(
        f"{name} {shape}: dimension {dim} ({shape[dim]}) does not divide over mesh axis "
        f"{axes!r} of size {size} (mesh {dict(mesh.shape)}); choose axis sizes that divide "
        "the model's dimensions")


def spec_for(name: str, shape: tuple[int, ...], rules: Rules, mesh: Mesh) -> P:
  """The ``PartitionSpec`` of the leaf ``name`` (first matching rule; replicated if none), its
  divisibility checked on ``mesh``. Scalars are always replicated."""
  if len(shape) == 0:
    return P()
  for rule, spec in rules:
    if _pattern(rule).search(name):
      _check_divides(name, shape, spec, mesh)
      return spec
  return P()


def param_specs(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """A tree of ``PartitionSpec`` shaped like ``tree`` (arrays or ``ShapeDtypeStruct``)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: spec_for(leaf_path(path), tuple(np.shape(x)), rules, mesh), tree)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """A tree of ``NamedSharding`` shaped like ``tree``: the rules' specs on ``mesh``."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(optimizer: Any, params: Any, mesh: Mesh,
                        rules: Rules = DEFAULT_RULES) -> Any:
  """Shardings of ``optimizer.init(params)``'s leaves: moments as their parameters, counts
  replicated (traced abstractly: nothing is allocated)."""
  abstract = jax.eval_shape(optimizer.init, params)
  return param_shardings(abstract, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of a leaf every device holds whole (keys, scalars, small tables)."""
  return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
  """The number the leading (batch / problem) dimension must divide by: ``data * fsdp``."""
  return _axis_size(mesh, BATCH_AXES)


def batch_spec(ndim: int, *, leading: int = 0) -> P:
  """The spec of a batch leaf: dimension ``leading`` split over ``data`` x ``fsdp``."""
  if ndim <= leading:
    return P()
  return P(*([None] * leading), BATCH_AXES)


def batch_shardings(tree: Any, mesh: Mesh, *, leading: int = 0, what: str = "batch") -> Any:
  """``NamedSharding`` per leaf of ``tree``: dimension ``leading`` (0: the batch; 1 under a
  stacked ``[K, B, ...]`` chunk) over ``data`` x ``fsdp``; leaves without it are replicated.

  Raises ``MeshShapeError`` naming the leaf and the mesh when that dimension does not divide.
  """
  multiple = batch_size_multiple(mesh)

  def one(path, x):
    shape = tuple(np.shape(x))
    if len(shape) <= leading:
      return replicated(mesh)
    if shape[leading] % multiple:
      name = leaf_path(path) or what
      raise MeshShapeError(
        f"{what} leaf {name!r} {shape}: dimension {leading} ({shape[leading]}) does not divide "
        f"over the mesh's data x fsdp = {multiple} devices (mesh {dict(mesh.shape)}); use a "
        f"batch size that is a multiple of {multiple}")
    return NamedSharding(mesh, batch_spec(len(shape), leading=leading))

  return jax.tree_util.tree_map_with_path(one, tree)


def shard_params(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """``tree`` placed on ``mesh`` by ``rules`` (arrays resharded; numpy copied once)."""
  return jax.device_put(tree, param_shardings(tree, mesh, rules))


def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) or jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Multi-host: each process holds its rows of the global batch (its grain shard).
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def put_batch(tree: Any, shardings: Any) -> Any:
  """A host batch as global arrays with ``shardings`` (from :func:`batch_shardings`). With one
  process the tree is the global batch; with several, each process passes its own rows (the
  rows its data shard yields) and the global arrays are assembled without a gather."""
  if tree is None:
    return None
  return jax.tree.map(_global_array, tree, shardings)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of ``tree`` whole on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def spec_of(x: jax.Array) -> P:
  """The ``PartitionSpec`` of an array placed with a ``NamedSharding`` (P() otherwise)."""
  sharding = getattr(x, "sharding", None)
  return sharding.spec if isinstance(sharding, NamedSharding) else P()


def put_global(tree: Any, shardings: Any) -> Any:
  """Every leaf of ``tree`` (the whole batch, the same on every process) placed with its
  sharding (``shardings``: the same tree, or a prefix of it): each device receives only its own slice (``make_array_from_callback``, which is
  correct on several hosts too, unlike ``put_batch``, which takes each process's own rows)."""

  def one(x, sharding):
    if isinstance(x, jax.Array) or jax.process_count() == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  # ``shardings`` may be a prefix of ``tree`` (one sharding for a whole subtree).
  return jax.tree.map(lambda sharding, sub: jax.tree.map(lambda x: one(x, sharding), sub),
                      shardings, tree, is_leaf=lambda x: isinstance(x, Sharding))


def to_host(tree: Any) -> Any:
  """``jax.device_get`` that also works on a multi-host run: a global array split over
  several processes is first gathered (``process_allgather``; every process gets the whole
  value), a fully addressable one is fetched as it is."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # noqa: PLC0415  (multi-host only)
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x

  return jax.device_get(jax.tree.map(one, tree))


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """``fn`` traced with ``mesh``'s abstract mesh in context (``use_abstract_mesh``), for
  ``jax.jit(under_mesh(fn, mesh), in_shardings=..., out_shardings=...)``: the model's activation
  hints (``models.llama.constrain_batch``) then keep the batch split over data x fsdp inside."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped
