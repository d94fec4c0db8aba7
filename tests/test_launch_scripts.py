"""experiments/launch/*.sh: bash-syntax clean, `set -euo pipefail`, usage text and exit code 2 on
bad arguments, and the command each would run (DRY_RUN=1 prints it instead of running it)."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "launch"
SCRIPTS = ("tpu_vm.sh", "tpu_pod.sh", "gpu_host.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  full_env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
  full_env.update(env)
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        timeout=30, check=False, env=full_env)


def test_shared_helpers_are_bash_clean():
  syntax = subprocess.run(["bash", "-n", str(LAUNCH / "_common.sh")], capture_output=True,
                          text=True, check=False)
  assert syntax.returncode == 0, syntax.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_bash_clean_and_prints_usage_without_arguments(script):
  path = LAUNCH / script
  assert "set -euo pipefail" in path.read_text()
  syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
  assert syntax.returncode == 0, syntax.stderr
  out = _run(script)
  assert out.returncode == 2
  assert out.stderr.startswith(f"usage: experiments/launch/{script}")
  assert "EXPERIMENT" in out.stderr and "key=value" in out.stderr


@pytest.mark.parametrize("script,prefix", [("tpu_vm.sh", ()), ("gpu_host.sh", ()),
                                           ("tpu_pod.sh", ("my-tpu", "us-central2-b"))])
def test_bad_experiment_or_override_is_refused(script, prefix):
  out = _run(script, *prefix, "no_such_experiment", DRY_RUN="1")
  assert out.returncode == 2 and "unknown experiment 'no_such_experiment'" in out.stderr
  out = _run(script, *prefix, "lm_pretrain", "preset", DRY_RUN="1")
  assert out.returncode == 2 and "'preset' is not key=value" in out.stderr


def test_single_host_scripts_run_the_experiment_module():
  for script in ("tpu_vm.sh", "gpu_host.sh"):
    out = _run(script, "lm_pretrain", "preset=tiny", "mesh=data=1,fsdp=-1", DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == ["python3", "-m", "experiments.lm_pretrain", "preset=tiny",
                                       "mesh=data=1,fsdp=-1"]


def test_pod_script_runs_the_same_command_on_every_host():
  out = _run("tpu_pod.sh", "my-tpu", "us-central2-b", "lm_pretrain", "preset=gpu",
             "out=/mnt/shared/run one", DRY_RUN="1", REPO_DIR="/opt/qstar_jax")
  assert out.returncode == 0, out.stderr
  argv = shlex.split(out.stdout)
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone",
                      "us-central2-b"]
  assert "--worker=all" in argv
  remote = argv[argv.index("--command") + 1]
  # The remote shell sees the override as one argument, spaces and all.
  assert remote.startswith("cd /opt/qstar_jax && python3 -m experiments.lm_pretrain ")
  assert shlex.split(remote.split(" && ", 1)[1])[3:] == ["preset=gpu", "out=/mnt/shared/run one"]


def test_multi_host_gpu_run_needs_the_process_ids():
  out = _run("gpu_host.sh", "lm_pretrain", DRY_RUN="1", JAX_COORDINATOR_ADDRESS="host0:1234")
  assert out.returncode == 2 and "JAX_NUM_PROCESSES" in out.stderr
  out = _run("gpu_host.sh", "lm_pretrain", DRY_RUN="1", JAX_COORDINATOR_ADDRESS="host0:1234",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2")
  assert out.returncode == 2 and "must be < JAX_NUM_PROCESSES=2" in out.stderr
  out = _run("gpu_host.sh", "lm_pretrain", DRY_RUN="1", JAX_COORDINATOR_ADDRESS="host0:1234",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  assert out.returncode == 0 and "process 1 of 2, coordinator host0:1234" in out.stderr
