#!/usr/bin/env bash
# Validates a GPU node for training: the DCNv3 kernels (the installed package's, or built in place
# from this checkout), the GPU tests, the operator benchmarks (every kernel candidate against the
# memory floor), and the training benchmarks (InternImage-T and -H, activation checkpointing on and
# off, the demo run through the launcher, the data loader's images/s per core), then one report.
#   bash tools/validate_gpu_node.sh                 (from the repository root; about 15 minutes)
#   OUT=DIR STAGES="t train data" bash tools/validate_gpu_node.sh    (a subset of the training stages)
# Logs and JSON: $OUT/ops and $OUT/training; the report: $OUT/report.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-gpu_node_check}
mkdir -p "$OUT"
OUT="$OUT/ops" bash tools/gpu_check_ops.sh
ops_rc=$?
OUT="$OUT/training" BUDGET_S=${BUDGET_S:-1800} bash tools/gpu_check_training.sh
training_rc=$?
{
  echo "== GPU node check: $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname)"
  cat "$OUT/ops/env.txt" 2> /dev/null
  echo "== operator (tools/gpu_check_ops.sh, rc=$ops_rc): GPU tests"
  tail -3 "$OUT/ops/tests.log" 2> /dev/null
  echo "== operator benchmarks: fastest candidate per shape"
  grep -i "fastest" "$OUT/ops/bench.log" 2> /dev/null | tail -20
  echo "== training (tools/gpu_check_training.sh, rc=$training_rc)"
  cat "$OUT/training/summary.txt" 2> /dev/null
} | tee "$OUT/report.txt"
[ "$ops_rc" = 0 ] && [ "$training_rc" = 0 ]
