#!/usr/bin/env bash
# A TPU pod slice (v5e-32, v4-64, ...): the same command on every host of the slice.
#
#   experiments/launch/tpu_pod.sh TPU ZONE EXPERIMENT [key=value ...]
#   experiments/launch/tpu_pod.sh my-tpu us-central2-b lm_pretrain preset=gpu \
#       out=/mnt/shared/runs/lm mesh=data=1,fsdp=-1 runtime.compilation_cache=/mnt/shared/xla
#
# Runs from your workstation: `gcloud compute tpus tpu-vm ssh TPU --zone ZONE --worker=all
# --command "cd REPO_DIR && python3 -m experiments.EXPERIMENT ..."`. Each host starts one
# process; the experiment's setup calls `jax.distributed.initialize()`, which detects the slice
# (runtime.multi_host=auto), and the mesh spans every chip of every host. Each host reads its rows
# of every batch; only process 0 writes results. `out=` (checkpoints: every host writes its
# shards) and the compilation cache must be folders every host sees (a shared disk, a gcsfuse
# mount). Every host needs the same checkout at REPO_DIR with `pip install -e . 'jax[tpu]'`.
# Env: REPO_DIR (on the hosts, default ~/qstar_jax), PYTHON (default python3), PROJECT (gcloud
# --project), DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: experiments/launch/tpu_pod.sh TPU ZONE EXPERIMENT [key=value ...]
  TPU         the TPU VM name (gcloud compute tpus tpu-vm list)
  ZONE        its zone, e.g. us-central2-b
  EXPERIMENT  a module of experiments/ (lm_pretrain, quest_scaling, train_puzzle, oreo, ...)
  key=value   the experiment's config overrides, e.g. out=/mnt/shared/run mesh=data=1,fsdp=-1
runs `python3 -m experiments.EXPERIMENT key=value ...` on every host (--worker=all).
env: REPO_DIR (checkout on the hosts, default ~/qstar_jax), PYTHON, PROJECT, DRY_RUN=1
USAGE
  exit 2
}

[[ $# -ge 3 ]] || usage
case "$1" in -h|--help) usage ;; esac
tpu="$1" zone="$2" experiment="$3"
shift 3
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
check_args tpu_pod.sh "$experiment" "$@"

remote_dir="${REPO_DIR:-\$HOME/qstar_jax}"   # expanded on the host
remote="cd $remote_dir && ${PYTHON:-python3} -m experiments.$experiment"
for arg in "$@"; do
  remote+=" $(printf '%q' "$arg")"
done
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
if [[ -n "${PROJECT:-}" ]]; then
  cmd+=(--project "$PROJECT")
fi
run_cmd "${cmd[@]}"
