"""`qstar-jax compile`: AOT compile of the lm_pretrain step for a device count this process does
not have (a re-run with its own XLA_FLAGS), the memory report, clear errors for a mesh that does
not fit the target and for a target whose runtime is missing, and the persistent compilation
cache (a second compile in a fresh process is served from it).

Each compile runs in a subprocess (`python -m qstar_jax compile ...`), as a user runs it.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from qstar_jax.distributed import mesh_config_from
from qstar_jax.training import compile_report as cr
from qstar_jax.training.compile_report import (
  cache_entries,
  cpu_target_env,
  parse_target,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "qstar_jax", "compile", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=180, check=False, env=env)


def test_parse_target_names_devices_and_topologies():
  assert parse_target("cpu:64").num_devices == 64
  v5e = parse_target("tpu:v5e-8")
  assert (v5e.platform, v5e.num_devices, v5e.topology) == ("tpu", 8, "v5e:2x4")
  # v4 / v5p names count TensorCores (2 per chip): v4-32 is 16 chips in a 2x2x4 slice.
  v4 = parse_target("tpu:v4-32")
  assert (v4.num_devices, v4.topology) == (16, "v4:2x2x4")
  assert parse_target("tpu:v5p-128").topology == "v5:4x4x4"
  assert parse_target("tpu:v6e-256").topology == "v6e:16x16"
  h100 = parse_target("gpu:h100x8")
  assert (h100.platform, h100.num_devices, h100.topology) == ("gpu", 8, "h100")
  # Attached devices stand in for a target only when they are its kind.
  assert cr._kind_matches(v5e, "TPU v5 lite") and not cr._kind_matches(v5e, "TPU v6 lite")
  assert cr._kind_matches(v4, "TPU v4") and not cr._kind_matches(v4, "TPU v5 lite")
  assert cr._kind_matches(h100, "NVIDIA H100 80GB HBM3")
  assert not cr._kind_matches(h100, "NVIDIA H200")
  for bad in ("cpu", "cpu:0", "tpu:v9-8", "tpu:v4-12", "fpga:3"):
    with pytest.raises(ValueError, match="--target"):
      parse_target(bad)


def test_mesh_spec_and_child_environment():
  # "fsdp=-1" means every device on fsdp (data 1), not two "rest" axes.
  assert mesh_config_from("fsdp=-1").to_dict() == {"data": 1, "fsdp": -1, "tensor": 1}
  assert mesh_config_from("data=2,tensor=-1").to_dict() == {"data": 2, "fsdp": 1, "tensor": -1}
  env = cpu_target_env(64, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo=1"})
  assert env["XLA_FLAGS"].split() == ["--foo=1", "--xla_force_host_platform_device_count=64"]
  assert env["JAX_PLATFORMS"] == "cpu"


def test_compile_for_absent_devices_reports_memory_and_reuses_the_cache(tmp_path):
  """cpu:16 (this test process has 8): the step's per-device arguments are exactly the shards
  of the parameters, the Adam state and the batch that the sharding rules give (computed from
  the abstract shapes, independently of XLA), and a second compile in a fresh process with the
  same cache folder writes nothing new and is a cache hit."""
  cache = tmp_path / "xla_cache"
  args = ("--what", "lm_pretrain", "--target", "cpu:16", "--mesh", "fsdp=-1", "--model", "tiny",
          "--seq-len", "16", "--batch", "16", "--compilation-cache", str(cache), "--json")
  first = _run(*args)
  assert first.returncode == 0, first.stderr
  report = json.loads(first.stdout)
  assert report["mesh"] == {"axes": {"data": 1, "fsdp": 16, "tensor": 1}, "devices": 16,
                            "platform": "cpu"}
  info, mem = report["info"], report["memory_per_device"]
  # fsdp=16 splits every matrix 16 ways; only the norm scales (5 x [64] float32) stay whole.
  norms = 5 * 64 * 4
  assert info["param_bytes_per_device"] == (info["param_bytes"] - norms) // 16 + norms
  # Per device: params + Adam mu/nu (+ counts) + the batch's rows + key + step, nothing more.
  expected_args = (info["param_bytes_per_device"] + info["opt_state_bytes_per_device"]
                   + info["batch_bytes_per_device"])
  assert 0 <= mem["argument_bytes"] - expected_args <= 64
  assert mem["argument_bytes"] < info["param_bytes"]          # really sharded
  assert mem["alias_bytes"] > 0                               # params / opt state donated
  assert mem["temp_bytes"] > 0 and mem["peak_estimate_bytes"] > mem["argument_bytes"]
  assert mem["flops"] is None or mem["flops"] > 0
  assert report["compilation_cache"]["entries_before"] == 0
  written = cache_entries(cache)
  assert written >= 1 and report["compilation_cache"]["entries_after"] == written

  # A fresh process (started with the 16 devices directly: the re-run step is tested above).
  second = _run(*args, env=cpu_target_env(16))
  assert second.returncode == 0, second.stderr
  cached = json.loads(second.stdout)["compilation_cache"]
  assert cached["entries_before"] == cached["entries_after"] == written == cache_entries(cache)
  assert cached["hits"] >= 1 and cached["misses"] == 0
  assert json.loads(second.stdout)["memory_per_device"]["argument_bytes"] == mem["argument_bytes"]


def test_a_mesh_that_does_not_fit_the_target_names_both():
  out = _run("--target", "cpu:64", "--mesh", "fsdp=3", "--model", "tiny")
  assert out.returncode == 2
  assert "fsdp=3" in out.stderr and "cpu:64" in out.stderr and "64 devices" in out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="libtpu is installed: the TPU target compiles here")
def test_a_tpu_target_without_libtpu_says_which_runtime_it_needs():
  out = _run("--target", "tpu:v5e-8", "--mesh", "fsdp=-1", "--model", "tiny")
  assert out.returncode == 2, out.stdout
  assert "target tpu:v5e-8 needs the TPU runtime" in out.stderr
  assert "pip install 'jax[tpu]'" in out.stderr
  assert "Traceback" not in out.stderr


def test_compile_the_puzzle_search_for_a_mesh():
  """--what qstar_search: the problems split over fsdp=8, the Q network's hidden dimensions too;
  per device the arguments are the network's shards, one problem's start state and the two
  replicated scalars (weight, max_iterations)."""
  out = _run("--what", "qstar_search", "--target", "cpu:8", "--mesh", "fsdp=-1", "--env",
             "puzzle8", "--batch", "8", "--json", env=cpu_target_env(8))
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  info, mem = report["info"], report["memory_per_device"]
  assert report["mesh"]["axes"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert (info["env"], info["batch"], info["num_actions"]) == ("puzzle8", 8, 4)
  assert info["param_bytes_per_device"] < info["param_bytes"] / 4     # sharded, not replicated
  start_state = 9  # one [9] uint8 puzzle8 state per device
  assert mem["argument_bytes"] == info["param_bytes_per_device"] + start_state + 4 + 4
  assert mem["output_bytes"] > 0 and mem["temp_bytes"] > 0


def test_a_program_the_compiler_refuses_for_memory_is_reported_not_raised(monkeypatch):
  """The TPU compiler refuses a step whose temporaries exceed HBM (RESOURCE_EXHAUSTED): the
  report says it does not fit, with XLA's message (the CLI exits 3); other errors propagate."""
  class Refused:
    def __init__(self, message):
      self.message = message

    def compile(self):
      raise jax.errors.JaxRuntimeError(self.message)

  oom = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (332.21G) exceeds available HBM (15.75G).")
  monkeypatch.setattr(cr, "lower_lm_pretrain", lambda mesh, **kw: (Refused(oom), {"batch": 8}))
  report = cr.compile_report("lm_pretrain", "cpu:8", "fsdp=-1", batch=8)
  assert report["fits"] is False and report["error"] == oom
  assert report["memory_per_device"]["temp_bytes"] is None
  assert cr.format_report(report).startswith("DOES NOT FIT: lm_pretrain for cpu:8")
  monkeypatch.setattr(cr, "lower_lm_pretrain",
                      lambda mesh, **kw: (Refused("INTERNAL: something else"), {}))
  with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
    cr.compile_report("lm_pretrain", "cpu:8", "fsdp=-1", batch=8)
