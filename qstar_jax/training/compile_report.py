"""Ahead-of-time compilation of a training step or a search for a named target, and its memory.

``qstar-jax compile`` (see :mod:`qstar_jax.cli`) calls :func:`compile_report`: it builds the
target's devices, the mesh, *abstract* parameters and optimizer state with their shardings
(``jax.eval_shape`` + :func:`~qstar_jax.distributed.param_shardings` /
:func:`~qstar_jax.distributed.opt_state_shardings`: nothing is allocated), then
``jax.jit(step, in_shardings=..., out_shardings=...).lower(*abstract_args).compile()`` and reads
``compiled.memory_analysis()`` (bytes per device) and ``compiled.cost_analysis()`` (FLOPs).

Targets (:func:`parse_target`):

- ``cpu:N``: N host devices. The devices must exist in this process, which the command arranges
  by re-running itself with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and
  ``JAX_PLATFORMS=cpu`` (:func:`cpu_target_env`; XLA reads the flag once, when jax starts);
- ``tpu:v5e-8``, ``tpu:v4-32``, ``tpu:v6e-256``, ``tpu:v5p-128``, ...: the devices of the slice
  from ``jax.experimental.topologies.get_topology_desc`` (compile-only devices: needs libtpu, i.e.
  ``pip install 'jax[tpu]'``, but no TPU), or the attached TPUs when they are the target. Names
  follow Cloud TPU: v5e / v6e count chips, v4 / v5p count TensorCores (2 per chip);
- ``gpu:h100x8`` (any ``gpu:NAMExN``): the attached GPUs when at least N are visible (a CUDA
  jaxlib on the GPU host), otherwise ``get_topology_desc(platform="cuda")`` where the CUDA plugin
  supports it. Without the runtime, :class:`TargetRuntimeError` names what to install.

What is compiled (``what``):

- ``lm_pretrain``: the lm_pretrain optimizer step, ``training/lm.py::lm_loss_fn`` +
  ``training/optim.py::make_optimizer`` + ``training/train_loop.py::make_train_step`` on windows
  ``[B, T + 1]`` of a model preset (``qstar_jax.models.config.get_config``);
- ``qstar_search``: the batched puzzle Q* search (``search/puzzle/qstar.py``) of a DeepCubeA-size
  Q network over ``B`` problems split over ``data`` x ``fsdp``.

A program the target's compiler refuses for lack of device memory (``RESOURCE_EXHAUSTED``: the
TPU compiler checks HBM) gives a report with ``fits = False`` and XLA's message in ``error``
(``qstar-jax compile`` exits 3). Memory per device, as XLA reports it: ``argument`` (inputs: the shards of the parameters,
optimizer state and batch), ``output``, ``alias`` (outputs written in place of donated inputs),
``temp`` (activations, gradients, collectives' buffers) and ``generated_code``;
``peak_estimate = argument + output - alias + temp + generated_code``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qstar_jax.distributed import (
  DEFAULT_RULES,
  MeshShapeError,
  batch_shardings,
  batch_size_multiple,
  enable_compilation_cache,
  make_mesh,
  mesh_config_from,
  mesh_summary,
  param_shardings,
  replicated,
  resolve_axis_sizes,
)
from qstar_jax.envs import make_env
from qstar_jax.models import Llama
from qstar_jax.models.config import get_config
from qstar_jax.models.errors import QstarError
from qstar_jax.models.puzzle_net import PuzzleNet, PuzzleNetConfig, puzzle_net_apply_fn
from qstar_jax.search.open_list import default_table_capacity
from qstar_jax.search.puzzle.qstar import _qstar_batched
from qstar_jax.training.lm import lm_loss_fn
from qstar_jax.training.optim import OptimizerConfig, make_optimizer
from qstar_jax.training.train_loop import TrainShardings, make_train_step

__all__ = [
  "COMPILE_WHATS",
  "CompileTarget",
  "TargetRuntimeError",
  "parse_target",
  "cpu_target_env",
  "target_devices",
  "lm_pretrain_step",
  "lower_lm_pretrain",
  "lower_qstar_search",
  "memory_report",
  "compile_report",
  "format_report",
  "cache_entries",
]

COMPILE_WHATS = ("lm_pretrain", "qstar_search")

CHILD_ENV = "QSTAR_JAX_COMPILE_CHILD"   # set in the re-run `cpu:N` process

_TPU_CHIP_NAMED = {"v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}   # name counts chips
_TPU_CORE_NAMED = {"v4": "v4", "v5p": "v5"}                          # name counts cores (2/chip)


class TargetRuntimeError(QstarError, RuntimeError):
  """The target's runtime (libtpu, a CUDA jaxlib) is not installed here."""


@dataclasses.dataclass(frozen=True)
class CompileTarget:
  """A parsed ``--target``: platform, device count, and (TPU) the slice's topology."""

  spec: str                 # as given: "cpu:64", "tpu:v5e-8", "gpu:h100x8"
  platform: str             # "cpu", "tpu" or "gpu"
  num_devices: int
  topology: str = ""        # TPU: "v5e:2x4", "v4:2x2x4"; GPU: the device name ("h100")
  runtime_hint: str = ""    # what to install when the runtime is missing

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _grid_2d(chips: int) -> tuple[int, int]:
  """A near-square power-of-two grid: 8 -> 2x4, 32 -> 4x8, 256 -> 16x16."""
  x = 2 ** (int(math.log2(chips)) // 2)
  return x, chips // x


def _grid_3d(chips: int) -> tuple[int, int, int]:
  """The 3-D shape of a Cloud TPU v4 / v5p slice: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4,
  32 -> 2x4x4, 64 -> 4x4x4 (the smallest dimension doubled, the last one first)."""
  if chips <= 4:
    return (2, 2, 1)
  dims = [2, 2, 2]
  while math.prod(dims) < chips:
    i = max(j for j in range(3) if dims[j] == min(dims))
    dims[i] *= 2
  return (dims[0], dims[1], dims[2])


def parse_target(spec: str) -> CompileTarget:
  """``cpu:N`` | ``tpu:GEN-N`` (v4, v5e, v5p, v6e) | ``gpu:NAMExN`` as a :class:`CompileTarget`."""
  kind, sep, rest = str(spec).strip().partition(":")
  kind = kind.lower()
  expected = "expected cpu:N, tpu:GEN-N (e.g. tpu:v5e-8, tpu:v4-32) or gpu:NAMExN (gpu:h100x8)"
  if not sep or not rest:
    raise ValueError(f"--target {spec!r}: {expected}")
  if kind == "cpu":
    if not rest.isdigit() or int(rest) < 1:
      raise ValueError(f"--target {spec!r}: N in cpu:N must be a positive integer")
    return CompileTarget(spec, "cpu", int(rest))
  if kind == "tpu":
    match = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", rest.lower())
    if not match:
      raise ValueError(f"--target {spec!r}: {expected}")
    gen, count = match.group(1), int(match.group(2))
    hint = "pip install 'jax[tpu]' (libtpu; compiling for a slice needs no TPU attached)"
    if gen in _TPU_CHIP_NAMED:
      if count & (count - 1):
        raise ValueError(f"--target {spec!r}: {gen} slices have a power-of-two chip count")
      topo = f"{_TPU_CHIP_NAMED[gen]}:" + "x".join(map(str, _grid_2d(count)))
      return CompileTarget(spec, "tpu", count, topo, hint)
    if gen in _TPU_CORE_NAMED:
      if count < 8 or count % 8 or (count // 2) & (count // 2 - 1):
        raise ValueError(f"--target {spec!r}: {gen}-N counts TensorCores (2 per chip): N must be "
                         "8, 16, 32, ... (a power of two >= 8)")
      chips = count // 2
      topo = f"{_TPU_CORE_NAMED[gen]}:" + "x".join(map(str, _grid_3d(chips)))
      return CompileTarget(spec, "tpu", chips, topo, hint)
    raise ValueError(f"--target {spec!r}: unknown TPU generation {gen!r}; expected one of "
                     f"{sorted({*_TPU_CHIP_NAMED, *_TPU_CORE_NAMED})}")
  if kind == "gpu":
    match = re.fullmatch(r"([a-z0-9]+?)(?:x(\d+))?", rest.lower())
    if not match:
      raise ValueError(f"--target {spec!r}: {expected}")
    count = int(match.group(2) or 1)
    if count < 1:
      raise ValueError(f"--target {spec!r}: the GPU count must be >= 1")
    hint = ("pip install 'jax[cuda12]' on the GPU host (a CUDA jaxlib; AOT for GPUs that are not "
            "attached needs the CUDA plugin's topology support)")
    return CompileTarget(spec, "gpu", count, match.group(1), hint)
  raise ValueError(f"--target {spec!r}: unknown platform {kind!r}; {expected}")


def cpu_target_env(num_devices: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of the process that compiles for ``cpu:N``: ``base`` (default
  ``os.environ``) with ``--xla_force_host_platform_device_count=N`` in ``XLA_FLAGS`` (any other
  flags kept, an earlier count replaced) and ``JAX_PLATFORMS=cpu``."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env[CHILD_ENV] = "1"
  return env


def _topology_devices(target: CompileTarget, platform: str) -> list:
  from jax.experimental import topologies  # noqa: PLC0415

  kwargs: dict[str, Any] = {}
  if platform == "tpu":
    dims = [int(d) for d in target.topology.split(":")[1].split("x")]
    if len(dims) == 3:   # v4 / v5p: a full torus from 4x4x4 on
      wrap = (min(dims) >= 4,) * 3
      chip_config = "megacore"
    else:                # v5e / v6e: wrap-around links along 16-chip dimensions
      wrap = (dims[0] == 16, dims[1] == 16, False)
      chip_config = "default"
    kwargs = dict(chip_config_name=chip_config, chips_per_host_bounds=(2, 2, 1), num_slices=1,
                  wrap=wrap)
    desc = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kwargs)
  else:
    desc = topologies.get_topology_desc(topology_name=target.topology, platform="cuda")
  return list(desc.devices)


_TPU_KINDS = {"v4": ("tpu v4",), "v5e": ("tpu v5 lite", "tpu v5e"), "v5p": ("tpu v5p",),
              "v6e": ("tpu v6 lite", "tpu v6e")}


def _kind_matches(target: CompileTarget, device_kind: str) -> bool:
  """Whether an attached device is the target's kind ("TPU v5 lite" for tpu:v5e-8, "NVIDIA H100
  80GB HBM3" for gpu:h100x8), so a v5e VM never stands in for a v6e target."""
  kind = device_kind.lower()
  if target.platform == "gpu":
    return target.topology in kind.replace(" ", "")
  gen = target.spec.split(":", 1)[1].lower().rsplit("-", 1)[0].replace("v5litepod", "v5e")
  if gen == "v5p" and kind == "tpu v5":
    return True
  return any(kind.startswith(k) for k in _TPU_KINDS.get(gen, ()))


def target_devices(target: CompileTarget) -> list:
  """The devices to compile for: this process's when they are the target, else compile-only
  devices of the target's topology. Raises :class:`TargetRuntimeError` (which runtime to
  install) when neither is available."""
  if target.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) != target.num_devices:
      raise TargetRuntimeError(
        f"target {target.spec} needs {target.num_devices} CPU devices but this process has "
        f"{len(devices)}; run it as `qstar-jax compile` (which sets XLA_FLAGS="
        f"--xla_force_host_platform_device_count={target.num_devices} in a fresh process)")
    return devices
  backend = "tpu" if target.platform == "tpu" else "gpu"
  try:
    attached = jax.devices(backend)
  except RuntimeError:
    attached = []
  attached = [d for d in attached if _kind_matches(target, d.device_kind)]
  if len(attached) >= target.num_devices:
    return list(attached[:target.num_devices])
  runtime = "the TPU runtime" if target.platform == "tpu" else "a CUDA runtime"
  try:
    devices = _topology_devices(target, "tpu" if target.platform == "tpu" else "cuda")
  except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise TargetRuntimeError(
      f"target {target.spec} needs {runtime}: {target.runtime_hint}. (jax "
      f"{jax.__version__} here has backends {_backends()}; get_topology_desc said: "
      f"{first[:200]})") from None
  if len(devices) != target.num_devices:
    raise TargetRuntimeError(f"target {target.spec}: topology {target.topology} gave "
                             f"{len(devices)} devices, expected {target.num_devices}")
  return devices


def _backends() -> list[str]:
  out = []
  for name in ("cpu", "gpu", "tpu"):
    try:
      jax.devices(name)
      out.append(name)
    except RuntimeError:
      pass
  return out


# ---------------------------------------------------------------------------- what to compile


def _shard_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of ``abstract`` placed with ``shardings`` (the largest shard)."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
    shape = s.shard_shape(tuple(x.shape))
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(total)


def _tree_bytes(abstract: Any) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(abstract)))


def _checked_batch(batch: int | None, mesh) -> int:
  multiple = batch_size_multiple(mesh)
  if batch is None:
    return multiple * max(1, -(-32 // multiple))  # at least 32, a multiple of data x fsdp
  if batch < 1 or batch % multiple:
    raise MeshShapeError(f"--batch {batch} does not divide over the mesh's data x fsdp = "
                         f"{multiple} devices (mesh {dict(mesh.shape)}); use a multiple of "
                         f"{multiple}")
  return batch


def lm_pretrain_step(graphdef: nnx.GraphDef, params: Any, windows: Any, mesh: Any, *,
                     rules=DEFAULT_RULES, total_steps: int = 1000,
                     optim: OptimizerConfig | None = None,
                     remat: bool = False) -> tuple[Any, TrainShardings, Any, Any]:
  """``(optimizer, shardings, batch_sharding, step)``: lm_pretrain's optimizer
  (``make_optimizer``: clipping + AdamW with warmup + cosine) and the train loop's own sharded
  step for ``mesh``, ``make_train_step(lm_loss_fn(graphdef), optimizer, shardings=...,
  batch_sharding=...)``: ``step(params, opt_state, windows [B, T + 1], rng_key, step, None) ->
  (params, opt_state, metrics)`` with explicit in/out shardings (params and optimizer state by
  ``rules``, windows over data x fsdp) and donation. ``params`` / ``windows`` may be arrays or
  abstract (only their shapes are read)."""
  optimizer = make_optimizer(optim or OptimizerConfig(), total_steps=total_steps)
  shardings = TrainShardings.build(mesh, params, optimizer, rules=rules)
  batch_sharding = batch_shardings(windows, mesh, what="windows")
  step = make_train_step(lm_loss_fn(graphdef, remat=remat), optimizer, shardings=shardings,
                         batch_sharding=batch_sharding)
  return optimizer, shardings, batch_sharding, step


def lower_lm_pretrain(mesh, *, model: str = "tiny", batch: int | None = None,
                      seq_len: int = 128, dtype: str = "float32", rules=DEFAULT_RULES,
                      total_steps: int = 1000, remat: bool = False) -> tuple[Any, dict[str, Any]]:
  """The lm_pretrain optimizer step lowered for ``mesh`` from abstract arguments.

  :func:`lm_pretrain_step` (the train loop's sharded step with ``lm_loss_fn`` and
  ``make_optimizer``: parameters / optimizer state sharded by ``rules``, the windows over
  ``data`` x ``fsdp``, key and step replicated, parameters / optimizer state donated).
  Returns ``(lowered, info)``
  (info: model, parameter count and bytes, per-device shard bytes, batch).
  """
  if seq_len < 1:
    raise ValueError(f"--seq-len {seq_len}: expected >= 1")
  base = get_config(model)
  cfg = get_config(model, dtype=dtype, param_dtype="float32",
                   max_position_embeddings=max(base.max_position_embeddings, seq_len + 1))
  batch = _checked_batch(batch, mesh)
  abstract_model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract_model)
  windows = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
  optimizer, shardings, w_sh, step_fn = lm_pretrain_step(
    graphdef, params, windows, mesh, rules=rules, total_steps=total_steps, remat=remat)
  p_sh, o_sh = shardings.params, shardings.opt_state
  opt_state = jax.eval_shape(optimizer.init, params)
  key = jax.eval_shape(lambda: jax.random.key(0))
  step = jax.ShapeDtypeStruct((), jnp.int32)
  lowered = step_fn.lower(params, opt_state, windows, key, step, None)
  n_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
  info = {
    "model": model, "batch": batch, "seq_len": seq_len, "dtype": dtype, "remat": remat,
    "num_params": n_params, "param_bytes": _tree_bytes(params),
    "opt_state_bytes": _tree_bytes(opt_state),
    "param_bytes_per_device": _shard_bytes(params, p_sh),
    "opt_state_bytes_per_device": _shard_bytes(opt_state, o_sh),
    "batch_bytes_per_device": _shard_bytes(windows, w_sh),
  }
  return lowered, info


def lower_qstar_search(mesh, *, env_name: str = "cube3", batch: int | None = None,
                       hidden_1: int = 5000, hidden_2: int = 1000, num_blocks: int = 4,
                       batch_pops: int = 10, node_capacity: int = 200_000,
                       max_path_len: int = 64, rules=DEFAULT_RULES) -> tuple[Any, dict[str, Any]]:
  """The batched puzzle Q* search lowered for ``mesh``: ``B`` start states split over ``data`` x
  ``fsdp`` (each device searches its problems: no communication but the network's sharded
  weights), a Q network of DeepCubeA's size (``hidden_1``, ``hidden_2``, ``num_blocks``) placed by
  the puzzle rules. Returns ``(lowered, info)``."""

  env = make_env(env_name)
  batch = _checked_batch(batch, mesh)
  net_cfg = PuzzleNetConfig(input_dim=env.input_dim, num_outputs=env.num_actions,
                            hidden_1=hidden_1, hidden_2=hidden_2, num_blocks=num_blocks)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: PuzzleNet(net_cfg, rngs=nnx.Rngs(0))))
  q_fn = puzzle_net_apply_fn(graphdef, env)
  open_capacity = 2 * node_capacity
  table_capacity = default_table_capacity(node_capacity)
  state_dim = int(env.state_dim)
  states = jax.ShapeDtypeStruct((batch, state_dim), np.asarray(env.goal).dtype)
  p_sh = param_shardings(params, mesh, rules)
  s_sh = batch_shardings(states, mesh, what="start_states")
  rep = replicated(mesh)

  def qstar_search_batch(p, s, weight, max_iterations):
    return _qstar_batched(p, s, weight, max_iterations, env=env, q_fn=q_fn,
                          batch_pops=batch_pops, node_capacity=node_capacity,
                          open_capacity=open_capacity, table_capacity=table_capacity,
                          max_path_len=max_path_len, edges_per_node=env.num_actions)

  out_shape = jax.eval_shape(qstar_search_batch, params, states, jnp.float32(1.0), jnp.int32(1))
  out_sh = batch_shardings(out_shape, mesh, what="search result")
  jitted = jax.jit(qstar_search_batch, in_shardings=(p_sh, s_sh, rep, rep), out_shardings=out_sh)
  lowered = jitted.lower(params, states, jax.ShapeDtypeStruct((), jnp.float32),
                         jax.ShapeDtypeStruct((), jnp.int32))
  info = {"env": env_name, "batch": batch, "num_actions": int(env.num_actions),
          "batch_pops": batch_pops, "node_capacity": node_capacity,
          "num_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
          "param_bytes": _tree_bytes(params),
          "param_bytes_per_device": _shard_bytes(params, p_sh)}
  return lowered, info


# ------------------------------------------------------------------------------------- report


def memory_report(compiled: Any) -> dict[str, Any]:
  """``memory_analysis()`` (bytes per device) and ``cost_analysis()``'s FLOPs of a compiled
  program; fields a backend does not report are None."""
  out: dict[str, Any] = {}
  stats = None
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    stats = None
  fields = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
            "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes",
            "generated_code": "generated_code_size_in_bytes"}
  for name, attr in fields.items():
    value = getattr(stats, attr, None) if stats is not None else None
    out[f"{name}_bytes"] = int(value) if value is not None else None
  if stats is not None and all(out[f"{k}_bytes"] is not None for k in fields):
    out["peak_estimate_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                                  - out["alias_bytes"] + out["temp_bytes"]
                                  + out["generated_code_bytes"])
  else:
    out["peak_estimate_bytes"] = None
  flops = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence) and not isinstance(cost, Mapping):
      cost = cost[0] if cost else None
    if cost and cost.get("flops") is not None:
      flops = float(cost["flops"])
  except (NotImplementedError, RuntimeError, AttributeError, TypeError):
    flops = None
  out["flops"] = flops
  return out


def cache_entries(path: str | os.PathLike) -> int:
  """Files in a persistent compilation cache folder (0 if it does not exist)."""
  path = pathlib.Path(path)
  return sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def compile_report(what: str, target: CompileTarget | str, mesh: Any = None, *,
                   model: str = "tiny", batch: int | None = None, seq_len: int = 128,
                   dtype: str = "float32", env: str = "cube3",
                   compilation_cache: str = "", rules=DEFAULT_RULES,
                   remat: bool = False) -> dict[str, Any]:
  """Lower and compile ``what`` for ``target`` on the mesh ``mesh`` (a spec string such as
  ``"fsdp=-1"``, a dict or a ``MeshConfig``) without running it; returns the JSON-ready report:
  target, mesh, the program's sizes (``info``), memory per device, FLOPs, compile seconds and,
  with ``compilation_cache``, the cache entries before and after and the cache's hits and
  misses (JAX's monitoring events)."""
  if what not in COMPILE_WHATS:
    raise ValueError(f"--what {what!r}: expected one of {list(COMPILE_WHATS)}")
  target = parse_target(target) if isinstance(target, str) else target
  config = mesh_config_from(mesh)
  try:   # the mesh against the target's device count, before any runtime is needed
    resolve_axis_sizes(config, target.num_devices)
  except MeshShapeError as err:
    raise MeshShapeError(f"--mesh {_mesh_text(config)} does not fit target {target.spec} "
                         f"({target.num_devices} devices): {err}") from None
  cache_before = None
  events: list[str] = []
  if compilation_cache:   # min 0 s: even a quick compile is written, so a rerun can reuse it
    enable_compilation_cache(compilation_cache, min_compile_secs=0.0)
    cache_before = cache_entries(compilation_cache)

  def listen(event: str, **_: Any) -> None:
    if "compilation_cache" in event:
      events.append(event)

  if compilation_cache:
    jax.monitoring.register_event_listener(listen)
  try:
    return _compile(what, target, config, compilation_cache, cache_before, events,
                    model=model, batch=batch, seq_len=seq_len, dtype=dtype, env=env, rules=rules,
                    remat=remat)
  finally:
    if compilation_cache:
      jax.monitoring.unregister_event_listener(listen)


def _compile(what, target, config, compilation_cache, cache_before, events, *, model, batch,
             seq_len, dtype, env, rules, remat=False) -> dict[str, Any]:
  devices = target_devices(target)
  the_mesh = make_mesh(config, devices=devices)
  start = time.perf_counter()
  if what == "lm_pretrain":
    lowered, info = lower_lm_pretrain(the_mesh, model=model, batch=batch, seq_len=seq_len,
                                      dtype=dtype, rules=rules, remat=remat)
  else:
    lowered, info = lower_qstar_search(the_mesh, env_name=env, batch=batch, rules=rules)
  lower_s = time.perf_counter() - start
  error = None
  try:
    compiled = lowered.compile()
    memory = memory_report(compiled)
  except jax.errors.JaxRuntimeError as err:   # the target's compiler: does not fit its memory
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    error = str(err).strip().splitlines()[0]
    memory = dict.fromkeys(("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                            "generated_code_bytes", "peak_estimate_bytes", "flops"))
  compile_s = time.perf_counter() - start - lower_s
  report = {"what": what, "target": target.to_dict(), "mesh": mesh_summary(the_mesh),
            "info": info, "fits": error is None, "error": error, "memory_per_device": memory,
            "lower_s": lower_s, "compile_s": compile_s, "jax_version": jax.__version__}
  if compilation_cache:
    jax.effects_barrier()
    report["compilation_cache"] = {"dir": str(pathlib.Path(compilation_cache).absolute()),
                                   "entries_before": cache_before,
                                   "entries_after": cache_entries(compilation_cache),
                                   "hits": sum(e.endswith("cache_hits") for e in events),
                                   "misses": sum(e.endswith("cache_misses") for e in events)}
  return report


def _mesh_text(config) -> str:
  return ",".join(f"{k}={v}" for k, v in config.to_dict().items())


def _bytes(n: int | None) -> str:
  if n is None:
    return "n/a"
  for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def format_report(report: Mapping[str, Any]) -> str:
  """The report as aligned text lines (what ``qstar-jax compile`` prints without ``--json``)."""
  mem, info, mesh = report["memory_per_device"], report["info"], report["mesh"]
  axes = ", ".join(f"{k}={v}" for k, v in mesh["axes"].items())
  lines = [f"compiled {report['what']} for {report['target']['spec']} "
           f"({mesh['devices']} {mesh['platform']} devices; mesh {axes}) in "
           f"{report['compile_s']:.1f} s (lowering {report['lower_s']:.1f} s); not run"]
  if not report.get("fits", True):
    lines[0] = (f"DOES NOT FIT: {report['what']} for {report['target']['spec']} (mesh {axes}): "
                f"{report['error']}")
    lines.append("  (smaller --batch / --seq-len, more devices on fsdp / tensor, or "
                 "--dtype bfloat16)")
  for key, value in info.items():
    shown = _bytes(value) if key.endswith("bytes") or key.endswith("bytes_per_device") else value
    lines.append(f"  {key:>28}: {shown}")
  lines.append("  memory per device (XLA memory_analysis):")
  for key in ("argument", "output", "alias", "temp", "generated_code", "peak_estimate"):
    lines.append(f"  {key + '_bytes':>28}: {_bytes(mem[key + '_bytes'])}")
  flops = mem.get("flops")
  lines.append(f"  {'flops (cost_analysis)':>28}: " + (f"{flops:.4g}" if flops else "n/a"))
  if "compilation_cache" in report:
    c = report["compilation_cache"]
    lines.append(f"  {'compilation cache':>28}: {c['dir']} ({c['entries_before']} -> "
                 f"{c['entries_after']} files; {c['hits']} hits, {c['misses']} misses)")
  return "\n".join(lines)
