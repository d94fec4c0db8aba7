"""1 device vs a mesh of N: the step time of the lm_pretrain train step and of the puzzle Q* search.

``bench_mesh`` runs, in one process and on the same inputs, each program on a one-device mesh
(``data=1`` over the first device) and on meshes of N devices (``fsdp=N``: parameters, optimizer
state and batch split, ZeRO-3; ``data=N``: batch split, parameters replicated, gradients
all-reduced; the search: problems split over ``data`` / ``fsdp``), and reports the median step
time of ``repeats`` timed calls (compile and one warm-up call excluded) and the ratios
``t_N / t_1``.

On simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) the N
"devices" are threads on the same few cores: the same total arithmetic runs on the same cores
plus the collectives, so a ratio above 1 measures the collectives' and the partitioned program's
overhead, and a ratio below 1 only that N threads keep more of the cores busy than the one-device
program; neither is the speedup of N chips. On N real chips the same program splits the work N
ways.

Each run also records how many devices its outputs live on and the fraction of the largest
parameter one device holds (1/N under fsdp, 1 under data) so the report shows that the
N-device program really ran on N devices; the lm runs' first-step losses (same init, same batch)
agree to float32 reduction-order rounding and the searches' solutions are identical.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from qstar_jax.distributed import (
  make_mesh,
  mesh_summary,
  put_batch,
)
from qstar_jax.envs import make_env
from qstar_jax.models import Llama
from qstar_jax.models.config import get_config
from qstar_jax.models.puzzle_net import PuzzleNet, PuzzleNetConfig, puzzle_net_apply_fn
from qstar_jax.search import qstar_search

__all__ = ["MeshBenchConfig", "bench_mesh", "bench_lm_step", "bench_qstar_search"]

# (graphdef, params, windows, mesh) -> (optimizer, shardings, batch_sharding, jitted step):
# qstar_jax.training.compile_report.lm_pretrain_step.
LMStepFactory = Callable[..., tuple[Any, Any, Any, Callable[..., Any]]]

CPU_NOTE = ("On simulated CPU devices the N devices are threads on this machine's {cpus} cores, "
            "so t_N / t_1 is not a speedup of N chips: a ratio > 1 is the overhead of the "
            "collectives and of the partitioned program, a ratio < 1 comes from the N threads "
            "using more of the cores than the one-device program does.")


@dataclasses.dataclass(frozen=True)
class MeshBenchConfig:
  model: str = "tiny"             # lm_pretrain: model preset (qstar_jax.models.config)
  batch: int = 16                 # windows per step; a multiple of num_devices
  seq_len: int = 64               # T (windows hold T + 1 tokens)
  num_devices: int = 8            # N: devices of the sharded meshes
  repeats: int = 5                # timed calls per run (median reported)
  lm: bool = True                 # bench the lm_pretrain step
  search: bool = True             # bench the puzzle Q* search
  search_env: str = "puzzle8"
  search_batch: int = 16          # problems; a multiple of num_devices
  search_iterations: int = 100    # max_iterations (fixed work per call)
  search_batch_pops: int = 4
  search_node_capacity: int = 2048
  search_hidden: tuple[int, int] = (256, 128)   # the Q network's hidden_1, hidden_2 (1 block)
  search_scramble_depth: int = 12
  lm_axes: tuple[str, ...] = ("fsdp", "data")       # the N-device meshes: all N on this axis
  search_axes: tuple[str, ...] = ("fsdp", "data")
  seed: int = 0

  def meshes(self, axes: tuple[str, ...] | None = None) -> dict[str, str]:
    """Run name -> mesh spec: "1" on one device, then AXIS=N for each of ``axes`` (default
    ``lm_axes``): fsdp=N and data=N."""
    n = self.num_devices
    out = {"1": "data=1"}
    for axis in self.lm_axes if axes is None else axes:
      out[f"{axis}={n}"] = f"{axis}={n}"
    return out

  def check(self, available: int) -> None:
    if self.num_devices < 2 or self.num_devices > available:
      raise ValueError(f"num_devices={self.num_devices}: expected 2..{available} (the devices "
                       "this process has; set XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                       "for simulated CPU devices)")
    for name in ("batch", "search_batch"):
      value = getattr(self, name)
      if value < 1 or value % self.num_devices:
        raise ValueError(f"{name}={value}: expected a positive multiple of num_devices="
                         f"{self.num_devices}")
    if not (self.lm or self.search):
      raise ValueError("lm=False and search=False: nothing to bench")
    if self.repeats < 1:
      raise ValueError(f"repeats={self.repeats}: expected >= 1")
    for name in ("lm_axes", "search_axes"):
      axes = getattr(self, name)
      if not axes or any(a not in ("data", "fsdp", "tensor") for a in axes):
        raise ValueError(f"{name}={axes!r}: expected a non-empty tuple of data, fsdp, tensor")


def _devices_of(tree: Any) -> int:
  return len({d for leaf in jax.tree.leaves(tree) for d in leaf.sharding.device_set})


def _largest_leaf_fraction(tree: Any) -> float:
  """Fraction of the largest leaf that one device holds."""
  leaf = max(jax.tree.leaves(tree), key=lambda x: x.size)
  return float(leaf.addressable_shards[0].data.size / leaf.size)


def _timed(call: Callable[[], Any], repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def _init(make: Callable[[], nnx.Module]) -> tuple[Any, Any]:
  """``nnx.split(make())`` with the parameters initialised in one jitted call (one compile
  instead of one per initialiser op; the same values)."""
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  params = jax.jit(lambda: nnx.state(make()))()
  return graphdef, params


@dataclasses.dataclass(frozen=True)
class _LMInputs:
  graphdef: Any
  params: Any          # host (numpy) leaves: each mesh gets its own device copy to donate
  windows: np.ndarray  # [B, T + 1] int32


def _lm_inputs(config: MeshBenchConfig) -> _LMInputs:
  base = get_config(config.model)
  cfg = get_config(config.model, max_position_embeddings=max(base.max_position_embeddings,
                                                              config.seq_len + 1))
  graphdef, params = _init(lambda: Llama(cfg, rngs=nnx.Rngs(config.seed)))
  rng = np.random.default_rng(config.seed)
  windows = rng.integers(0, cfg.vocab_size, (config.batch, config.seq_len + 1), dtype=np.int32)
  return _LMInputs(graphdef, jax.tree.map(np.asarray, params), windows)


def bench_lm_step(config: MeshBenchConfig, mesh_spec: str, devices: list,
                  lm_step: LMStepFactory, inputs: _LMInputs | None = None) -> dict[str, Any]:
  """The lm_pretrain step of ``lm_step`` on ``mesh_spec`` over ``devices`` (the train loop's
  sharded step: params / optimizer state placed by ``DEFAULT_RULES``, windows split over
  data x fsdp, explicit in/out shardings, donation); median of ``repeats`` steps after compile
  and one warm-up step."""
  inputs = inputs or _lm_inputs(config)
  mesh = make_mesh(mesh_spec, devices=devices)
  _, shardings, w_sh, jitted = lm_step(inputs.graphdef, inputs.params, inputs.windows, mesh)
  state = shardings.place(inputs.params)   # params copied onto the mesh, opt state made there
  windows = put_batch(inputs.windows, w_sh)
  key = jax.device_put(jax.random.key(config.seed), shardings.replicated)
  step0 = state.step
  start = time.perf_counter()
  compiled = jitted.lower(state.params, state.opt_state, windows, key, step0, None).compile()
  compile_s = time.perf_counter() - start
  params, opt_state, metrics = compiled(state.params, state.opt_state, windows, key, step0,
                                        None)  # warm-up
  first_loss = float(metrics["loss"])
  held = {"params": params, "opt_state": opt_state}

  def call():
    held["params"], held["opt_state"], m = compiled(held["params"], held["opt_state"], windows,
                                                    key, step0, None)
    return m["loss"]

  times = _timed(call, config.repeats)
  return {"mesh": mesh_summary(mesh), "median_s": statistics.median(times), "times_s": times,
          "compile_s": compile_s, "first_loss": first_loss,
          "devices_used": _devices_of(held["params"]),
          "largest_param_fraction_per_device": _largest_leaf_fraction(held["params"])}


@dataclasses.dataclass(frozen=True)
class _SearchInputs:
  env: Any
  params: Any
  q_fn: Callable[..., Any]
  states: np.ndarray   # [B, D] start states


def _search_inputs(config: MeshBenchConfig) -> _SearchInputs:
  env = make_env(config.search_env)
  h1, h2 = config.search_hidden
  net_cfg = PuzzleNetConfig(input_dim=env.input_dim, num_outputs=env.num_actions,
                            hidden_1=h1, hidden_2=h2, num_blocks=1)
  graphdef, params = _init(lambda: PuzzleNet(net_cfg, rngs=nnx.Rngs(config.seed)))
  states, _ = jax.jit(functools.partial(env.scramble, num_states=config.search_batch,
                                        max_depth=config.search_scramble_depth))(
    jax.random.key(config.seed))
  # One apply function for every mesh: the search's jit caches on its identity.
  return _SearchInputs(env, params, puzzle_net_apply_fn(graphdef, env), np.asarray(states))


def bench_qstar_search(config: MeshBenchConfig, mesh_spec: str, devices: list,
                       inputs: _SearchInputs | None = None) -> dict[str, Any]:
  """The puzzle Q* search (``qstar_search(..., mesh=mesh)``) of ``search_batch`` scrambles with a
  randomly initialised Q network, ``search_iterations`` iterations at most; median of
  ``repeats`` calls after compile and one warm-up call."""
  inputs = inputs or _search_inputs(config)
  mesh = make_mesh(mesh_spec, devices=devices)

  def call():
    return qstar_search(inputs.params, inputs.states, env=inputs.env, q_fn=inputs.q_fn,
                        weight=0.6, batch_pops=config.search_batch_pops,
                        max_iterations=config.search_iterations,
                        node_capacity=config.search_node_capacity, max_path_len=64, mesh=mesh)

  start = time.perf_counter()
  result = jax.block_until_ready(call())   # compile + first run
  first_s = time.perf_counter() - start
  times = _timed(call, config.repeats)
  return {"mesh": mesh_summary(mesh), "median_s": statistics.median(times), "times_s": times,
          "first_call_s": first_s, "devices_used": _devices_of(result),
          "found": int(np.asarray(result.found).sum()),
          "iterations": int(np.asarray(result.iterations).max()),
          "result": {"path": np.asarray(result.path).tolist(),
                     "path_length": np.asarray(result.path_length).tolist()}}


def _ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
  base = runs["1"]["median_s"]
  return {name: run["median_s"] / base for name, run in runs.items() if name != "1"}


def bench_mesh(config: MeshBenchConfig, *, lm_step: LMStepFactory,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Runs :func:`bench_lm_step` (and :func:`bench_qstar_search`) on each mesh of
  ``config.meshes()`` and returns the JSON-ready report with ``ratios`` ``t_N / t_1``.

  ``lm_step(graphdef, params, windows, mesh) -> (optimizer, shardings, batch_sharding, step)``
  gives the train loop's sharded lm_pretrain step for a mesh:
  ``qstar_jax.training.compile_report.lm_pretrain_step`` (the training layer sits beside the
  benchmarks, so the command line passes it in)."""
  log = log or (lambda line: None)
  devices = jax.devices()
  config.check(len(devices))
  n = config.num_devices
  out: dict[str, Any] = {"config": dataclasses.asdict(config), "platform": devices[0].platform,
                         "device_kind": devices[0].device_kind, "num_devices": n,
                         "jax_version": jax.__version__}
  if config.lm:
    runs = {}
    lm_inputs = _lm_inputs(config)
    for name, spec in config.meshes().items():
      devs = devices[:1] if name == "1" else devices[:n]
      runs[name] = bench_lm_step(config, spec, devs, lm_step, lm_inputs)
      log(f"lm_pretrain {name}: {runs[name]['median_s'] * 1e3:.2f} ms/step "
          f"(compile {runs[name]['compile_s']:.1f} s)")
    losses = [r["first_loss"] for r in runs.values()]
    out["lm_pretrain"] = {"runs": runs, "ratios": _ratios(runs),
                          "max_first_loss_diff": float(max(losses) - min(losses))}
  if config.search:
    sruns = {}
    search_inputs = _search_inputs(config)
    for name, spec in config.meshes(config.search_axes).items():
      devs = devices[:1] if name == "1" else devices[:n]
      sruns[name] = bench_qstar_search(config, spec, devs, search_inputs)
      log(f"qstar_search {name}: {sruns[name]['median_s'] * 1e3:.2f} ms/call "
          f"(first call {sruns[name]['first_call_s']:.1f} s)")
    ref = sruns["1"]["result"]
    same = all(r["result"] == ref for r in sruns.values())
    for r in sruns.values():
      r.pop("result")
    out["qstar_search"] = {"runs": sruns, "ratios": _ratios(sruns),
                           "same_results_as_1_device": same}
  if out["platform"] == "cpu":
    out["note"] = CPU_NOTE.format(cpus=os.cpu_count())
  else:
    out["note"] = (f"{n} {out['device_kind']} devices: t_N / t_1 < 1 is the speedup of "
                   "splitting the work.")
  out["ratio_definition"] = "median step time on the N-device mesh / on 1 device (same run)"
  return out
