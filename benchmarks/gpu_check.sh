#!/usr/bin/env bash
# GPU check of the fused kernels, for a GPU machine without internet (each step capped: 200 + 120 + 150 s < 8 min):
#   1. builds the CPU and CUDA extensions (editable install, no dependency resolution, SAFEPRUNE_CUDA_ARCHS=9.0
#      unless set),
#   2. prints `python -m safeprune_engine.info`,
#   3. runs the kernel tests with CUDA tensors (every test parametrised over cpu + cuda runs its cuda cases),
#   4. runs benchmarks/fused_ops.py --device cuda.
# Results and logs go to $OUT when set, else benchmarks/results/. Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
export SAFEPRUNE_CUDA_ARCHS="${SAFEPRUNE_CUDA_ARCHS:-9.0}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
unset TRITON_INTERPRET  # real Triton on the GPU
status=0
step() { echo "== [gpu_check $(date +%T)] $*"; }

step "build (arch ${SAFEPRUNE_CUDA_ARCHS})"
if ! timeout 200 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$DEST/gpu_check_build.log" 2>&1; then
  tail -40 "$DEST/gpu_check_build.log"
  echo "build failed (log: $DEST/gpu_check_build.log)"
  exit 1
fi

step "info"
"$PY" -m safeprune_engine.info 2>&1 | tee "$DEST/gpu_check_info.txt"

step "kernel tests on the GPU"
tests=(tests/test_dispatch.py tests/test_native_build.py tests/test_ops_groupnorm_silu.py tests/test_ops_distill_loss.py)
[ -f tests/test_ops_pruned_conv.py ] && tests+=(tests/test_ops_pruned_conv.py)
# patch_unet's tests need diffusers, which a bare GPU image may lack (carry its wheel to include them)
if [ -f tests/test_patching.py ] && "$PY" -c "import diffusers" 2>/dev/null; then
  tests+=(tests/test_patching.py)
fi
timeout 120 "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$DEST/gpu_check_tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "kernel benchmark"
timeout 150 "$PY" benchmarks/fused_ops.py --device cuda --out "$DEST/fused_ops-cuda.json" 2>&1 | tee "$DEST/gpu_check_bench.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "done (status $status)"
exit "$status"
