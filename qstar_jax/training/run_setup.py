"""What an experiment's ``main`` does before its training loops: the multi-host runtime and the
device mesh its batches fit.

Every experiment config carries ``mesh: str`` (``""``: the default mesh, all devices on ``data``;
else a spec such as ``"fsdp=8"`` or ``"data=2,tensor=4"``, see
`qstar_jax.distributed.mesh_config_from`) and ``runtime: RuntimeConfig`` (compilation cache,
multi-host). ``main`` calls :func:`setup_run` first, then hands the mesh to ``train``. Neither
key changes what a run computes (up to the float rounding of another reduction order), so both
may differ when a run resumes (:data:`MESH_CONFIG_KEYS` go into the loop's
``ignore_config_keys``): a run checkpointed on 8 devices continues on 1 or 4.

A batch (the examples of a step) is split over ``data`` x ``fsdp``: a global batch size that does
not divide over them is an error naming the config key, the size and the mesh, raised here,
before any data is read or model built. The default mesh (``mesh=""``) is the exception: on one
process it takes as many devices as every batch size divides (``gcd``), says so, and leaves the
rest idle, so that a small test preset still runs on a machine with many devices.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from qstar_jax.distributed import (
  MeshShapeError,
  RuntimeConfig,
  batch_size_multiple,
  is_main_process,
  make_mesh,
  setup_runtime,
  to_host,
)

__all__ = ["MESH_CONFIG_KEYS", "mesh_ignore_keys", "check_batch_sizes", "run_mesh", "setup_run",
           "sync_processes", "made_once", "host_local"]

T = TypeVar("T")

# Config keys that say where a run computes, not what: allowed to differ on resume.
MESH_CONFIG_KEYS = ("mesh", "runtime")


def mesh_ignore_keys(prefix: str = "") -> tuple[str, ...]:
  """:data:`MESH_CONFIG_KEYS` under a dotted ``prefix`` of the run config (``"experiment"`` ->
  ``("experiment.mesh", "experiment.runtime")``)."""
  return tuple(f"{prefix}.{k}" if prefix else k for k in MESH_CONFIG_KEYS)


def _mesh_text(mesh: Mesh) -> str:
  return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def check_batch_sizes(mesh: Mesh, batch_sizes: Mapping[str, int]) -> None:
  """Raises ``MeshShapeError`` naming the first config key whose batch size does not divide over
  the mesh's ``data`` x ``fsdp`` devices (nor over the processes, whose rows of every global
  batch are equal shares)."""
  multiple = batch_size_multiple(mesh)
  processes = jax.process_count()
  for key, size in batch_sizes.items():
    if size % multiple:
      raise MeshShapeError(
        f"{key}={size} does not divide over the mesh's data x fsdp = {multiple} devices (mesh "
        f"{_mesh_text(mesh)}, {mesh.devices.size} devices): use a multiple of {multiple}, or a "
        "mesh with fewer devices on data and fsdp (e.g. more on tensor)")
    if size % processes:
      raise MeshShapeError(
        f"{key}={size} does not divide over the {processes} processes: every process reads an "
        f"equal share of each batch; use a multiple of {processes}")


def run_mesh(spec: str, *, batch_sizes: Mapping[str, int] | None = None,
             log: Callable[[str], None] = print) -> Mesh:
  """The mesh of an experiment's ``mesh`` key, checked against its global ``batch_sizes``
  (``{"data.batch_size": 32, ...}``).

  ``spec`` non-empty: `make_mesh(spec)` over every device (a shape that does not fit the device
  count, or a batch size that does not divide over ``data`` x ``fsdp``, is a ``MeshShapeError``).
  ``spec == ""``: all devices on ``data``; on one process, when some batch size does not divide
  the device count, ``data = gcd(devices, batch sizes)`` devices only (logged).
  """
  batch_sizes = dict(batch_sizes or {})
  for key, size in batch_sizes.items():
    if size < 1:
      raise ValueError(f"{key}={size}: expected a batch size >= 1")
  if spec.strip():
    mesh = make_mesh(spec)
  else:
    devices = jax.devices()
    usable = math.gcd(len(devices), *batch_sizes.values())
    if usable == len(devices) or jax.process_count() > 1:
      mesh = make_mesh(None)
    else:
      mesh = make_mesh(None, devices=devices[:usable])
      log(f"mesh: the batch sizes {batch_sizes} do not divide over the {len(devices)} devices; "
          f"the default mesh uses data={usable} ({usable} of {len(devices)} devices). Set "
          "mesh=... (e.g. tensor=-1) to use them all.")
  check_batch_sizes(mesh, batch_sizes)
  return mesh


def setup_run(mesh: str, runtime: RuntimeConfig, *, batch_sizes: Mapping[str, int] | None = None,
              log: Callable[[str], None] = print) -> Mesh:
  """`setup_runtime(runtime)` (multi-host initialize, compilation cache: before anything touches
  the devices), then :func:`run_mesh`."""
  setup_runtime(runtime)
  return run_mesh(mesh, batch_sizes=batch_sizes, log=log)


def sync_processes(name: str) -> None:
  """On several processes: waits until every process reaches the point ``name`` (e.g. process 0
  has written a stage file the others read next). One process: returns at once."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def made_once(path: str | os.PathLike, make: Callable[[], T], load: Callable[[], T]) -> T:
  """A file every process needs, made once: ``load()`` when ``path`` exists, else ``make()`` (which
  writes ``path``) on process 0 while the others wait, then ``load()`` on them. One process:
  ``load()`` or ``make()``, as a plain cache would. All processes must call it (it synchronizes)."""
  exists = pathlib.Path(path).exists()
  sync_processes(f"made_once looked {path}")  # nobody writes before everyone has looked
  if exists:
    return load()
  value = make() if is_main_process() else None
  sync_processes(f"made_once made {path}")
  return value if is_main_process() else load()


def host_local(tree: Any) -> Any:
  """Several processes: the global arrays of ``tree`` (a trained model's parameters) gathered
  whole into every process's memory, so that what follows a training run (evaluation, saving
  on process 0) runs as on one host. One process: ``tree`` unchanged. A collective: all
  processes call it."""
  if jax.process_count() == 1:
    return tree  # stays on its devices (to_host would fetch it to numpy)
  return to_host(tree)
