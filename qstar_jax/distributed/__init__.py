"""Scale-out on JAX's own SPMD: a device mesh from config, sharding rules by parameter path,
batch and search-state shardings, and the multi-host runtime (see ``mesh``, ``sharding``,
``runtime``). A run that works on one CPU runs unchanged, with another mesh, on a pod slice."""

from qstar_jax.distributed.mesh import (
  AXES,
  BATCH_AXES,
  MeshConfig,
  MeshShapeError,
  make_mesh,
  mesh_config_from,
  mesh_summary,
  resolve_axis_sizes,
)
from qstar_jax.distributed.runtime import (
  RuntimeConfig,
  data_shard,
  enable_compilation_cache,
  grain_shard_options,
  initialize,
  is_main_process,
  multi_host_requested,
  setup_runtime,
)
from qstar_jax.distributed.sharding import (
  DEFAULT_RULES,
  HEAD_RULES,
  LLAMA_RULES,
  PUZZLE_RULES,
  Rules,
  batch_shardings,
  batch_size_multiple,
  batch_spec,
  leaf_path,
  opt_state_shardings,
  param_shardings,
  param_specs,
  put_batch,
  put_global,
  put_replicated,
  replicated,
  shard_params,
  spec_for,
  spec_of,
  to_host,
  under_mesh,
)

__all__ = [
  "AXES", "BATCH_AXES", "MeshConfig", "MeshShapeError", "make_mesh", "mesh_config_from",
  "mesh_summary", "resolve_axis_sizes",
  "RuntimeConfig", "data_shard", "enable_compilation_cache", "grain_shard_options", "initialize",
  "is_main_process", "multi_host_requested", "setup_runtime",
  "DEFAULT_RULES", "HEAD_RULES", "LLAMA_RULES", "PUZZLE_RULES", "Rules", "batch_shardings",
  "batch_size_multiple", "batch_spec", "leaf_path", "opt_state_shardings", "param_shardings",
  "param_specs", "put_batch", "put_global", "put_replicated", "replicated", "shard_params", "spec_for",
  "spec_of", "to_host", "under_mesh",
]
