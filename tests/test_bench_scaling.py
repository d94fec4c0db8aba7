"""`qstar_jax.benchmarks.scaling.bench_mesh` on the 8 simulated CPU devices (tests/conftest.py):
the report's keys, positive finite ratios t_8 / t_1, and that the 8-device programs really ran
on 8 devices (outputs on 8 devices; under fsdp one device holds 1/8 of the largest parameter)
and computed what the 1-device program computed."""

from __future__ import annotations

import math

import jax
import pytest

from qstar_jax.benchmarks import MeshBenchConfig, bench_mesh
from qstar_jax.training.compile_report import lm_pretrain_step

TINY = dict(model="tiny", batch=8, seq_len=8, num_devices=8, repeats=1, search_env="puzzle8",
            search_batch=8, search_iterations=3, search_batch_pops=2, search_node_capacity=128,
            search_hidden=(64, 32), search_scramble_depth=4)


def _check_runs(part: dict, meshes: tuple[str, ...]) -> None:
  runs, ratios = part["runs"], part["ratios"]
  assert set(runs) == {"1", *meshes} and set(ratios) == set(meshes)
  for name, ratio in ratios.items():
    assert math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(runs[name]["median_s"] / runs["1"]["median_s"])
  assert runs["1"]["devices_used"] == 1 and runs["1"]["mesh"]["devices"] == 1
  for name in meshes:
    assert runs[name]["devices_used"] == 8 and runs[name]["mesh"]["devices"] == 8
    assert all(t > 0 for t in runs[name]["times_s"]) and len(runs[name]["times_s"]) == 1


def _check_lm(out: dict, meshes: tuple[str, ...]) -> None:
  _check_runs(out["lm_pretrain"], meshes)
  lm = out["lm_pretrain"]["runs"]
  assert lm["1"]["largest_param_fraction_per_device"] == 1.0
  assert lm["fsdp=8"]["largest_param_fraction_per_device"] == 1 / 8   # sharded 8 ways
  if "data=8" in lm:
    assert lm["data=8"]["largest_param_fraction_per_device"] == 1.0   # replicated
  # Same init, same batch: the first step's loss differs only by float32 reduction order.
  assert out["lm_pretrain"]["max_first_loss_diff"] < 1e-5


def _check_search(out: dict, meshes: tuple[str, ...]) -> None:
  _check_runs(out["qstar_search"], meshes)
  # The searches' paths (integers) are exactly the 1-device ones.
  assert out["qstar_search"]["same_results_as_1_device"] is True


def _check_header(out: dict) -> None:
  assert out["platform"] == "cpu" and out["num_devices"] == 8
  assert "not a speedup of N chips" in out["note"]


# The fast tier benches each program on one 8-device mesh (each compile takes seconds here);
# the slow test runs both meshes for both programs, as `qstar-jax bench mesh` does.


def test_bench_mesh_lm_step_one_vs_eight_devices():
  assert len(jax.devices()) == 8
  out = bench_mesh(MeshBenchConfig(**TINY, search=False, lm_axes=("fsdp",)),
                   lm_step=lm_pretrain_step)
  _check_header(out)
  _check_lm(out, ("fsdp=8",))
  assert "qstar_search" not in out


def test_bench_mesh_qstar_search_one_vs_eight_devices():
  out = bench_mesh(MeshBenchConfig(**TINY, lm=False, search_axes=("data",)),
                   lm_step=lm_pretrain_step)
  _check_header(out)
  _check_search(out, ("data=8",))
  assert "lm_pretrain" not in out


@pytest.mark.slow
def test_bench_mesh_fsdp_and_data_meshes_for_both_programs():
  out = bench_mesh(MeshBenchConfig(**TINY), lm_step=lm_pretrain_step)
  _check_header(out)
  _check_lm(out, ("fsdp=8", "data=8"))
  _check_search(out, ("fsdp=8", "data=8"))


def test_bench_mesh_rejects_a_batch_that_does_not_split():
  with pytest.raises(ValueError, match="batch=12: expected a positive multiple of num_devices=8"):
    bench_mesh(MeshBenchConfig(batch=12), lm_step=lm_pretrain_step)
