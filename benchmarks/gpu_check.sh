#!/usr/bin/env bash
# GPU check of the default model, for a session with a lent GPU; about 2 minutes, at most 4.5 (kernel build 2,
# check 2.5; EXT_BUILD_TIMEOUT and GPU_CHECK_TIMEOUT change them).
#
#   bash benchmarks/gpu_check.sh          # results in $OUT (default: benchmarks/results/gpu/)
#
# Runs the torch fp16 backend (CUDA graphs, and eager), the network in fp32 on the GPU (TF32 off: the reference),
# onnxruntime CUDA / TensorRT only where installed; checks fp16 against fp32 (relative error of the denoiser output,
# Dice of a sampled phantom case) and prints the table of timings with the card named. Installs nothing. Needs python
# with torch (CUDA) and numpy; uses onnx, onnxruntime(-gpu), tensorrt, cmake + pybind11 if present. The repository
# is used in place (scripts/source-env.sh), not installed; the compiled kernels (diffseg._ext) are built with cmake +
# pybind11 when both are there. Without them only the engine timings and output errors are measured: the sampler's
# step is one of those kernels, so the sampled case (and its Dice) is skipped with the reason printed. Where
# onnxruntime-gpu is installed, the sampled case also runs with x_t kept on the GPU (the device loop) and is compared
# with the host loop.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$root/benchmarks/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
PY="${PYTHON:-$(command -v python || command -v python3)}"

echo "== card"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || echo "nvidia-smi failed"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# shellcheck source=/dev/null
source "$root/scripts/source-env.sh"
ext_dir="$root/build/srcpkg/diffseg"
echo "== compiled kernels"
if "$PY" -c "import diffseg._ext" 2>/dev/null; then
  echo "diffseg._ext imports"
elif command -v cmake >/dev/null && "$PY" -c "import pybind11" 2>/dev/null; then
  build="$root/build/gpu-ext"
  # one deadline for configure + build (the kernels are optional: the check runs without them)
  if timeout "${EXT_BUILD_TIMEOUT:-120}" bash -c 'cmake -S "$1" -B "$2" -DCMAKE_BUILD_TYPE=Release \
        -DPython_EXECUTABLE="$3" -Dpybind11_DIR="$("$3" -m pybind11 --cmakedir)" && cmake --build "$2" -j "$(nproc)"' \
        _ "$root" "$build" "$PY" > "$OUT/ext_build.log" 2>&1 \
    && cp "$build"/_ext*.so "$ext_dir/" && "$PY" -c "import diffseg._ext"; then
    echo "built diffseg._ext with cmake + pybind11"
  else
    echo "could not build diffseg._ext (see ext_build.log): engine timings only, no sampled case"
  fi
else
  echo "no cmake or no pybind11 here: diffseg._ext not built: engine timings only, no sampled case"
fi

echo "== check"
cd /tmp || exit 1  # run from outside the repository root
timeout "${GPU_CHECK_TIMEOUT:-150}" "$PY" "$root/benchmarks/gpu_check.py" --out "$OUT" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_check.py ran out of time; gpu_check.json holds the engines finished before"
echo "== done in $(( $(date +%s) - start )) s (exit $rc); results in $OUT"
exit "$rc"
