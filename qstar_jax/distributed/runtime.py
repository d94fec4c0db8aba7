"""Multi-host runtime: a guarded ``jax.distributed.initialize()``, which process writes, each
host's data shard, and the persistent compilation cache.

The same command runs on every host of a TPU pod slice or a GPU cluster; JAX's own SPMD does the
rest (no home-made distribution). :func:`initialize` is a no-op on one machine, so a script that
calls it first runs unchanged on a laptop, a TPU VM and a pod slice.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax

__all__ = [
  "RuntimeConfig",
  "initialize",
  "multi_host_requested",
  "is_main_process",
  "data_shard",
  "grain_shard_options",
  "enable_compilation_cache",
  "setup_runtime",
]

_INITIALIZED = False


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """Process-level settings an experiment takes from its config.

  compilation_cache: folder of JAX's persistent compilation cache ("" = off); compiled programs
    are reused across runs and hosts (point every host at the same path on a shared disk, or a
    local path per host).
  cache_min_compile_secs: only programs that took at least this long to compile are cached.
  multi_host: "auto" (initialize when the environment says so: a TPU pod slice, SLURM/Open MPI
    with several tasks, or JAX_COORDINATOR_ADDRESS set), "on" or "off".
  """

  compilation_cache: str = ""
  cache_min_compile_secs: float = 1.0
  multi_host: str = "auto"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def multi_host_requested() -> bool:
  """Whether the environment describes a multi-process run: ``JAX_COORDINATOR_ADDRESS`` set, a TPU
  pod slice (``TPU_WORKER_HOSTNAMES`` with several hosts), or SLURM / Open MPI with several
  tasks."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return True
  return _int_env("SLURM_NTASKS") > 1 or _int_env("OMPI_COMM_WORLD_SIZE") > 1


def initialize(mode: str = "auto", *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` once when a multi-host run is requested.

  ``mode``: ``"auto"`` (when :func:`multi_host_requested` or an address is given), ``"on"``
  (always; JAX detects the cluster on TPU pods, SLURM and Open MPI), ``"off"`` (never). Must run
  before anything touches the devices. Returns whether this process is (now) part of a
  multi-process run. Explicit arguments override the environment's
  (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
  """
  global _INITIALIZED
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"multi_host={mode!r}: expected 'auto', 'on' or 'off'")
  if _INITIALIZED:
    return jax.process_count() > 1
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = _int_env("JAX_NUM_PROCESSES")
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = _int_env("JAX_PROCESS_ID")
  wanted = mode == "on" or (mode == "auto" and (coordinator_address is not None
                                                or multi_host_requested()))
  if not wanted:
    return False
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  jax.distributed.initialize(**kwargs)
  _INITIALIZED = True
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0: the one that writes metrics, results and plots."""
  return jax.process_index() == 0


def data_shard() -> tuple[int, int] | None:
  """``(process_index, process_count)`` for the data pipeline's ``shard=`` (each host reads its
  rows of every global batch), or None on one process."""
  if jax.process_count() == 1:
    return None
  return (jax.process_index(), jax.process_count())


def grain_shard_options(*, drop_remainder: bool = True) -> Any:
  """``grain.sharding.ShardOptions`` of this process (grain's sharding by process index)."""
  import grain  # noqa: PLC0415  (optional dependency)

  return grain.sharding.ShardOptions(shard_index=jax.process_index(),
                                     shard_count=jax.process_count(),
                                     drop_remainder=drop_remainder)


def enable_compilation_cache(path: str | os.PathLike, *, min_compile_secs: float = 1.0) -> str:
  """Turns on JAX's persistent compilation cache in ``path`` (created); returns the path."""
  path = pathlib.Path(path).expanduser().absolute()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return str(path)


def setup_runtime(config: RuntimeConfig | None = None) -> None:
  """What an experiment's ``main`` calls first: :func:`initialize` and the compilation cache."""
  config = config or RuntimeConfig()
  initialize(config.multi_host)
  if config.compilation_cache:
    enable_compilation_cache(config.compilation_cache,
                             min_compile_secs=config.cache_min_compile_secs)
