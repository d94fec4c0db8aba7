"""qstar_jax.benchmarks: benchmark functions that the CLI and the experiments call."""

from qstar_jax.benchmarks.decode import (
  bench_decode,
  device_copy_bandwidth,
  gemm_floor_step_s,
  host_copy_bandwidth,
)
from qstar_jax.benchmarks.scaling import (
  MeshBenchConfig,
  bench_lm_step,
  bench_mesh,
  bench_qstar_search,
)
from qstar_jax.benchmarks.search import (
  SEARCH_METHODS,
  SearchBenchConfig,
  bench_search,
  no_prefix_reuse_expand,
  python_tree_mcts,
)

__all__ = ["SEARCH_METHODS", "MeshBenchConfig", "SearchBenchConfig", "bench_decode",
           "bench_lm_step", "bench_mesh", "bench_qstar_search", "bench_search",
           "device_copy_bandwidth", "gemm_floor_step_s", "host_copy_bandwidth",
           "no_prefix_reuse_expand", "python_tree_mcts"]
