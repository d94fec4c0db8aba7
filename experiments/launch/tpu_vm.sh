#!/usr/bin/env bash
# One TPU VM (v5e-8, v6e-8, v4-8, ...): one process that sees all the VM's chips.
#
#   experiments/launch/tpu_vm.sh EXPERIMENT [key=value ...]
#   experiments/launch/tpu_vm.sh lm_pretrain preset=cpu out=runs/lm mesh=data=1,fsdp=-1 \
#       runtime.compilation_cache=$HOME/.cache/qstar_jax_xla
#
# Run it on the VM, in the repository (after `pip install -e . 'jax[tpu]'`). The experiment's
# `mesh=` key lays the chips out (default: all on data); `qstar-jax compile --target tpu:v5e-8`
# checks a mesh and the memory of a step before a run. Env: PYTHON (default python3),
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: experiments/launch/tpu_vm.sh EXPERIMENT [key=value ...]
  EXPERIMENT  a module of experiments/ (lm_pretrain, quest_scaling, train_puzzle, oreo, ...)
  key=value   the experiment's config overrides, e.g. preset=cpu out=runs/x mesh=fsdp=8
              runtime.compilation_cache=DIR
runs `python3 -m experiments.EXPERIMENT key=value ...` once on this TPU VM (all local chips).
USAGE
  exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage ;; esac
experiment="$1"
shift
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
check_args tpu_vm.sh "$experiment" "$@"

cmd=("${PYTHON:-python3}" -m "experiments.$experiment" "$@")
cd "$repo"
run_cmd "${cmd[@]}"
