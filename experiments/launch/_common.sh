# Shared by the launch scripts (sourced, not run): argument checks and DRY_RUN.
# The sourcing script defines usage() first.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# check_args SCRIPT EXPERIMENT [key=value ...]: EXPERIMENT names experiments/EXPERIMENT.py and
# every override is key=value; otherwise a message naming the bad argument, then usage (exit 2).
check_args() {
  local script="$1" experiment="$2" arg
  shift 2
  if [[ ! "$experiment" =~ ^[a-z0-9_]+$ || ! -f "$repo/experiments/$experiment.py" ]]; then
    echo "$script: unknown experiment '$experiment' (no experiments/$experiment.py)" >&2
    usage
  fi
  for arg in "$@"; do
    [[ "$arg" == *=* ]] || { echo "$script: '$arg' is not key=value" >&2; usage; }
  done
}

# run_cmd CMD...: prints the command (DRY_RUN=1) or replaces the shell with it.
run_cmd() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
    exit 0
  fi
  exec "$@"
}
