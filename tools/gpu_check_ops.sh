#!/usr/bin/env bash
# The operator's GPU check: the installed package's kernels (or, without an installed package, a
# build in place: no pip, as a lent machine has no package index; no -j: torch's ninja builds of two
# extensions share one build file), the GPU tests and the operator benchmarks. Logs and JSON go to
# $OUT. Optional DCNv4 baseline: DCNV4=1 builds the sdist carried in .dcnv4/ first (about 6 minutes
# on 16 cores). Part of tools/validate_gpu_node.sh.
#   bash tools/gpu_check_ops.sh        (from the repository root, on a machine with a GPU)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
if [ "${DCNV4:-0}" = 1 ]; then
  (cd .dcnv4/DCNv4-*/ && python3 -m pip install -q --no-build-isolation --no-deps --no-index .) > "$OUT/dcnv4_build.log" 2>&1
fi
# shellcheck source=tools/gpu_shim.sh
source tools/gpu_shim.sh
if [ "$GPU_CHECK_BUILD" = 1 ]; then
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "our build rc=$? at $(elapsed) s" | tee -a "$OUT/build.log"
else
  echo "the installed internimage package, not built here" | tee -a "$OUT/build.log"
fi
python3 -c "from internimage.ops import extension as e; print('cuda kernel:', e.kernels_available('cuda'), e.load_error('cuda')); print('cpu kernel:', e.kernels_available('cpu'), e.load_error('cpu'))" 2>&1 | tee -a "$OUT/build.log"
python3 -c "from internimage.ops import extension as e; assert e.kernels_available('cuda')" || exit 3

INTERNIMAGE_REQUIRE_FUSED_CUDA=1 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/ops/test_cuda_kernel.py} 2>&1 | tail -60 > "$OUT/tests.log"
echo "tests done at $(elapsed) s"; tail -4 "$OUT/tests.log"

timeout 120 python3 -m internimage.ops.bench --device cuda --dtype bfloat16 --repeats 30 --json "$OUT/bench_cuda_bf16.json" > "$OUT/bench.log" 2>&1
echo "bench bf16 rc=$? at $(elapsed) s" | tee -a "$OUT/bench.log"
# Every kernel candidate x shape x {bf16, fp16}, forward and backward: what ops/candidate_table.py is set from.
timeout 180 python3 -m internimage.ops.bench --device cuda --candidates all --dtypes bfloat16,float16 --repeats 20 --json "$OUT/bench_cuda_candidates.json" >> "$OUT/bench.log" 2>&1
echo "bench candidates rc=$? at $(elapsed) s" | tee -a "$OUT/bench.log"
grep -v "^done" "$OUT/bench.log" | tail -30
