#!/usr/bin/env bash
# The accelerator checks of the project in one script, for a lent GPU machine with JAX installed
# (the lead runs it through the device tool; results land in $OUT). Sections, any subset:
#   bash experiments/gpu_checks.sh env decode quant puzzle
# Each section has its own time limit and the script goes on when one fails.
# The puzzle section reads the DeepCubeA sets from $QSTAR_DATA_DIR: on a machine without shared/
# beside the checkout, carry a copy of shared/data and point the variable at it.
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Packages the GPU image lacks travel as wheels in .whl/ (gguf, mctx).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# A source checkout without `pip install`: make `qstar_jax.kernels` resolve (the copy on the
# device machine is disposable).
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import qstar_jax.kernels" 2>/dev/null || ln -s ../kernels qstar_jax/kernels

run() {  # run NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name rc=$rc in $((SECONDS - start))s"
}

for section in "$@"; do
  case $section in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
      python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" ;;
    decode)
      run decode "${DECODE_LIMIT:-240}" python3 -m experiments.bench_decode gpu=true out="$OUT/decode" ;;
    quant)
      # XLA dumps the compiled PTX (the Pallas/Triton kernels included) so that the matrix
      # instructions can be counted: wgmma (Hopper) or mma.sync (the older, slower path).
      XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/xla_dump_quant" \
        run quant 240 python3 -m experiments.bench_quant --gpu --out "$OUT/quant.json"
      echo "=== matrix instructions in the dumped PTX (count, instruction)"
      grep -rhoE "wgmma\.mma_async[.a-z0-9_]*|mma\.sync\.aligned[.a-z0-9_]*" /tmp/xla_dump_quant \
        2>/dev/null | sort | uniq -c | sort -rn | head -12 ;;
    puzzle)
      # The short cube runs of experiments/checkpoints/train_gpu_short.sh (V, then V-distilled
      # Q heads, then the table); each network comes back as its own tarball (<16 MB each).
      run puzzle 420 bash experiments/checkpoints/train_gpu_short.sh /tmp/puzzle_gpu
      for net in /tmp/puzzle_gpu/*/model; do
        name=$(basename "$(dirname "$net")")
        tar czf "$OUT/$name.tgz" -C /tmp/puzzle_gpu "$name"
      done ;;
    *) echo "unknown section $section" ;;
  esac
done
