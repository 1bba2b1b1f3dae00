#!/usr/bin/env bash
# The pretraining checks of one lent-GPU call (about 9 minutes on one H100); logs and JSON in $OUT.
# Stages, in the order of STAGES (default all, in this order):
#   wheels  the carried .whl/ (made by tools/gpu_wheels.sh) into /tmp/site, unless they import
#   build   our DCNv3 kernels and JPEG decoder in place unless installed (as tools/gpu_check_ops.sh), and
#           DeepSpeed's FusedAdam by JIT, so no timed stage pays for it
#   t       pretrain bench: InternImage-T at IMG px, micro-batches T_BATCHES, checkpointing off and on
#   train   the demo pretraining through launch/pretrain.sh, shortened: the GPU training path end to
#           end (deepspeed launcher, nccl, bf16, FusedAdam, checkpoint, evaluation)
#   data    the data loader bench with DATA_WORKERS workers: images/s per core
#   h_on    pretrain bench: H_MODEL at IMG px, the largest micro-batch that fits, checkpointing on
#           (last but one: the longest and least predictable; its probes print as they finish)
#   h_off   as h_on with checkpointing off, when the budget allows
# Each stage runs under `timeout`, capped by what is left of BUDGET_S (seconds for the whole call),
# and is skipped when less than MIN_STAGE_S is left. Printed last: a table of images/s, MFU, peak
# memory and the CPU cores the loader needs to keep up.
#   device:     bash tools/gpu_check_training.sh                 (carry .whl; run timeout 600 s)
#   CPU smoke:  DEVICE_CHECK_SMOKE=1 OUT=/tmp/devcheck bash tools/gpu_check_training.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-device_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
if [ "${DEVICE_CHECK_SMOKE:-0}" = 1 ]; then
  # Every stage on the CPU in minutes: T everywhere, tiny images, fp32 (bf16 is slow on CPU), one
  # timed step, a max search over 2..4 (a micro-batch of 1 cannot train: the head's BatchNorm).
  : "${IMG:=32}" "${T_BATCHES:=2}" "${H_MODEL:=internimage_t}" "${H_START:=2}" "${H_LIMIT:=4}"
  : "${PRECISION:=fp32}" "${STEPS:=1}" "${WARMUP:=1}" "${H_STEPS:=1}" "${H_WARMUP:=1}"
  : "${TRAIN_EPOCHS:=1}" "${TRAIN_SAMPLES:=128}"
  : "${DATA_ARGS:=--workers 1 --images 8 --img-size 64 --batch-size 4 --rounds 1 --seconds 0.2}"
  : "${BUDGET_S:=3000}"
fi
: "${BUDGET_S:=560}" "${MIN_STAGE_S:=30}" "${STAGES:=wheels build t train data h_on h_off}"
: "${IMG:=224}" "${T_BATCHES:=64,128,256}" "${PRECISION:=bf16}" "${STEPS:=10}" "${WARMUP:=3}"
# H's steps take seconds at its largest micro-batch: fewer timed ones.
: "${H_MODEL:=internimage_h}" "${H_START:=32}" "${H_LIMIT:=4096}" "${H_STEPS:=6}" "${H_WARMUP:=2}"
: "${TRAIN_EPOCHS:=2}" "${TRAIN_SAMPLES:=1437}" "${DATA_WORKERS:=8}"
: "${DATA_ARGS:=--workers $DATA_WORKERS --rounds 4}" "${RUNS:=/tmp/device_check_runs}"
# DS_SKIP_CUDA_CHECK: a minor-version difference between nvcc and torch's CUDA must not stop the
# FusedAdam build.
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export DS_SKIP_CUDA_CHECK=1 PYTHON=python3
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME CAP_S LOG COMMAND...: COMMAND >> LOG under timeout min(CAP_S, budget left).
stage() {
  local name=$1 cap=$2 log=$3 left begin
  left=$(( BUDGET_S - $(elapsed) ))
  begin=$(elapsed)
  shift 3
  if [ "$left" -lt "$MIN_STAGE_S" ]; then
    note "stage $name skipped: $left s of the budget left"
    return 0
  fi
  timeout --kill-after=10 $(( cap < left ? cap : left )) "$@" >> "$log" 2>&1
  local rc=$?  # 124: stopped by the timeout
  note "stage $name rc=$rc in $(( $(elapsed) - begin )) s (at $(elapsed) s)"
}

install_wheels() {
  if python3 -c "import deepspeed, fvcore, simplejpeg, webdataset" > /dev/null 2>&1; then
    note "wheels: already importable, not installed"
    return
  fi
  # The device README's line: one version of each, no index, into a folder on PYTHONPATH.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$OUT/setup.log" 2>&1 || { note "wheels: install failed"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import deepspeed, fvcore, pydantic, simplejpeg, webdataset; print('wheels: deepspeed', deepspeed.__version__, 'pydantic', pydantic.VERSION)" 2>> "$OUT/setup.log" | tail -1 | tee -a "$SUMMARY"
  [ "${PIPESTATUS[0]}" = 0 ] || { note "wheels: installed but not importable (setup.log)"; exit 2; }
  note "wheels: installed at $(elapsed) s"
}

build() {
  python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(verbose=True)" \
    > /tmp/fused_adam.log 2>&1 &
  local fused_adam=$!
  if [ "$GPU_CHECK_BUILD" = 1 ]; then
    timeout 300 python3 setup.py build_ext --inplace >> "$OUT/setup.log" 2>&1
    note "build: ours rc=$? at $(elapsed) s"
  else
    note "build: the installed internimage package"
  fi
  wait $fused_adam
  note "build: DeepSpeed FusedAdam rc=$? at $(elapsed) s"
  cat /tmp/fused_adam.log >> "$OUT/setup.log"
  python3 -c "from internimage.ops import extension as e; print('internimage from', e.__file__); print('cuda kernel:', e.kernels_available('cuda'), e.load_error('cuda')); print('cpu kernel:', e.kernels_available('cpu'), e.load_error('cpu'))" 2>&1 | tee -a "$SUMMARY"
  if [ "${DEVICE_CHECK_SMOKE:-0}" != 1 ]; then
    python3 -c "from internimage.ops import extension as e; assert e.kernels_available('cuda')" || exit 3
  fi
}

BENCH=(python3 -m internimage.pretrain.bench --img-size "$IMG" --precision "$PRECISION")
bench_t() {
  stage t 150 "$OUT/bench.log" "${BENCH[@]}" --steps "$STEPS" --warmup "$WARMUP" \
    --model internimage_t --micro-batch "$T_BATCHES" --checkpointing both
}

# bench_h on|off CAP_S: the max search; a second one reuses the first one's multiply-add count.
bench_h() {
  local gmacs
  gmacs=$(python3 tools/gpu_report.py "$OUT" --gmacs "$H_MODEL" "$IMG")
  stage "h_$1" "$2" "$OUT/bench.log" "${BENCH[@]}" --steps "$H_STEPS" --warmup "$H_WARMUP" \
    --model "$H_MODEL" --micro-batch max --max-start "$H_START" --max-limit "$H_LIMIT" \
    --checkpointing "$1" ${gmacs:+--gmacs "$gmacs"}
}

train() {
  rm -rf "$RUNS/demo"
  stage train 120 "$OUT/train.log" bash launch/pretrain.sh configs/demo.yaml run_dir="$RUNS/demo" \
    schedule.epochs="$TRAIN_EPOCHS" data.epoch_samples="$TRAIN_SAMPLES" data.workers=4
  cp "$RUNS/demo/metrics.jsonl" "$OUT/train_metrics.jsonl" 2> /dev/null
  grep -E "eval step|Error|error:" "$OUT/train.log" | tail -5 | tee -a "$SUMMARY"
}

data_bench() {
  # shellcheck disable=SC2086  # DATA_ARGS is a list of arguments
  stage data 90 "$SUMMARY" python3 -m internimage.data.bench $DATA_ARGS --json "$OUT/data_bench.json"
}

# shellcheck source=tools/gpu_shim.sh
source tools/gpu_shim.sh
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda)"
  nproc
} > "$OUT/setup.log" 2>&1
for name in $STAGES; do
  case $name in
    wheels) install_wheels ;;
    build) build ;;
    t) bench_t ;;
    h_on) bench_h on 270 ;;
    h_off) bench_h off 240 ;;
    train) train ;;
    data) data_bench ;;
    *) note "unknown stage $name (known: wheels build t train data h_on h_off)"; exit 2 ;;
  esac
  grep -h '^{' "$OUT/bench.log" > "$OUT/bench.jsonl" 2> /dev/null
done
python3 tools/gpu_report.py "$OUT" | tee -a "$SUMMARY"
echo "done at $(elapsed) s; in $OUT:" "$OUT"/*
