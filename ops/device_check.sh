#!/usr/bin/env bash
# One GPU session's work in one call: build our CUDA extension and the DCNv4 baseline, run the GPU
# tests (plus a memcheck pass), then the benchmarks. Logs and JSON go to $OUT (default ./device_out).
#   bash ops/device_check.sh        (from the repository root, on a machine with a GPU and nvcc)
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda)"
  nvcc --version | tail -1
} > "$OUT/env.txt" 2>&1

DCNV4_SRC=$(ls -d .dcnv4/DCNv4-*/ 2>/dev/null | head -1)
if [ -n "$DCNV4_SRC" ]; then
  (cd "$DCNV4_SRC" && python3 -m pip install -q --no-build-isolation --no-deps . > /tmp/dcnv4_build.log 2>&1; echo "dcnv4 build rc=$?" >> /tmp/dcnv4_build.log) &
  DCNV4_PID=$!
fi
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "our build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
python3 -c "from internimage.ops import extension as e; print('cuda kernel:', e.kernels_available('cuda'), e.load_error('cuda')); print('cpu kernel:', e.kernels_available('cpu'))" 2>&1 | tee -a "$OUT/build.log"

INTERNIMAGE_REQUIRE_FUSED_CUDA=1 INTERNIMAGE_REQUIRE_FUSED_CPU=1 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/ops 2>&1 | tail -40 > "$OUT/tests.log"
tail -3 "$OUT/tests.log"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider tests/ops/test_cuda_kernel.py -k "fp32 and (default or depth3 or far_outside or depth1024 or batch257 or remove_center)" > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?" | tee -a "$OUT/memcheck.log"

if [ -n "${DCNV4_PID:-}" ]; then wait "$DCNV4_PID"; tail -5 /tmp/dcnv4_build.log >> "$OUT/build.log"; fi
timeout 240 python3 -m internimage.ops.bench --device cuda --dtype bfloat16 --repeats 30 --json "$OUT/bench_cuda_bf16.json" > "$OUT/bench.log" 2>&1
echo "bench bf16 rc=$?" >> "$OUT/bench.log"
timeout 120 python3 -m internimage.ops.bench --device cuda --dtype float32 --repeats 20 --json "$OUT/bench_cuda_fp32.json" >> "$OUT/bench.log" 2>&1
echo "bench fp32 rc=$?" >> "$OUT/bench.log"
grep -v "^done" "$OUT/bench.log"
