"""qstar_jax.benchmarks: benchmark functions that the CLI and the experiments call."""

from qstar_jax.benchmarks.decode import (
  bench_decode,
  device_copy_bandwidth,
  gemm_floor_step_s,
  host_copy_bandwidth,
)

__all__ = ["bench_decode", "device_copy_bandwidth", "gemm_floor_step_s", "host_copy_bandwidth"]
