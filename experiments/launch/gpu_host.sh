#!/usr/bin/env bash
# One multi-GPU host (8 x H100, ...): one process that sees all the host's GPUs.
#
#   experiments/launch/gpu_host.sh EXPERIMENT [key=value ...]
#   experiments/launch/gpu_host.sh lm_pretrain preset=gpu out=runs/lm mesh=data=1,fsdp=-1
#
# Several hosts: run the same command on each, with the coordinator's address and this host's
# rank in the environment (read by qstar_jax.distributed.initialize, runtime.multi_host=auto):
#
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 gpu_host.sh ...  # host0
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 gpu_host.sh ...  # host1
#
# (under SLURM or Open MPI, srun / mpirun set the ranks and JAX detects them). `out=` must then be
# a folder every host sees. Needs `pip install -e . 'jax[cuda12]'`. Env: PYTHON (default
# python3), CUDA_VISIBLE_DEVICES (a subset of the GPUs), DRY_RUN=1 prints the command.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: experiments/launch/gpu_host.sh EXPERIMENT [key=value ...]
  EXPERIMENT  a module of experiments/ (lm_pretrain, quest_scaling, train_puzzle, oreo, ...)
  key=value   the experiment's config overrides, e.g. preset=gpu out=runs/x mesh=fsdp=8
runs `python3 -m experiments.EXPERIMENT key=value ...` once on this host (all its GPUs).
several hosts: set JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES=N and
JAX_PROCESS_ID=0..N-1 and run the same command on each host.
USAGE
  exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage ;; esac
experiment="$1"
shift
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
check_args gpu_host.sh "$experiment" "$@"
if [[ -n "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
  if [[ ! "${JAX_NUM_PROCESSES:-}" =~ ^[0-9]+$ || ! "${JAX_PROCESS_ID:-}" =~ ^[0-9]+$ ]]; then
    echo "gpu_host.sh: JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS needs JAX_NUM_PROCESSES" \
      "and JAX_PROCESS_ID (integers), got '${JAX_NUM_PROCESSES:-}' and '${JAX_PROCESS_ID:-}'" >&2
    exit 2
  fi
  if (( JAX_PROCESS_ID >= JAX_NUM_PROCESSES )); then
    echo "gpu_host.sh: JAX_PROCESS_ID=$JAX_PROCESS_ID must be < JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" >&2
    exit 2
  fi
  echo "gpu_host.sh: process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES, coordinator $JAX_COORDINATOR_ADDRESS" >&2
fi

cmd=("${PYTHON:-python3}" -m "experiments.$experiment" "$@")
cd "$repo"
run_cmd "${cmd[@]}"
