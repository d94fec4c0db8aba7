#!/bin/bash
# Short accelerator run (about 3.5 min on one H100): trains the three cube networks (V by DAVI,
# then the 12- and 1,884-action Q heads with targets c(a) + V(next) from that V), copies them under
# experiments/checkpoints/, and reruns the Q*-vs-A* table with them.
# Usage (from the repository root): bash experiments/checkpoints/train_gpu_short.sh OUT_DIR
# OUT_DIR keeps each network's model/ (7-11 MB each), loss log and summary, and the table; the
# orbax training checkpoints (with optimizer state) are deleted to keep it small.
set -euo pipefail
OUT=${1:-/tmp/qstar_gpu_short}
mkdir -p "$OUT"
for name in cube3_v_gpu_short cube3_q12_vdistill_gpu_short cube3_q1884_vdistill_gpu_short; do
  python3 -m experiments.train_puzzle preset=$name out="$OUT/$name" 2>&1 | tail -n 3
  rm -rf "$OUT/$name/checkpoints"
  mkdir -p experiments/checkpoints/$name
  cp -r "$OUT/$name/model" "$OUT/$name/train_summary.json" "$OUT/$name/metrics.jsonl" \
    experiments/checkpoints/$name/
done
python3 -m experiments.qstar_search preset=cpu cube_value_net=cube3_v_gpu_short \
  cube_q12_net=cube3_q12_vdistill_gpu_short cube_q1884_net=cube3_q1884_vdistill_gpu_short \
  sections='[ratio, deepcubea_cube3, throughput]' ratio_min_depth=8 ratio_max_depth=14 \
  out="$OUT/table" 2>&1 | tail -n 45
