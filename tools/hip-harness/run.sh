#!/usr/bin/env bash
# Builds the CUDA harness from the same kernels/*.hip the HIP backend embeds
# and runs it on .harness-data/ (written by
# `cargo run --example dump_hip_harness_data`). Needs nvcc and an sm_90 GPU
# (H100/H200). The log goes to $OUT/hip-harness.log when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA="${1:-.harness-data}"
BUILD="$(mktemp -d)"
LOG="${OUT:+$OUT/hip-harness.log}"
LOG="${LOG:-/dev/null}"
{
    echo "== nvcc $(nvcc --version | tail -n 1)"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
    if ! nvcc -O2 -arch=sm_90 -std=c++17 -I tools/hip-harness/include \
        -o "$BUILD/harness" tools/hip-harness/harness.cu; then
        echo "FAIL build: nvcc could not compile the kernels"
        exit 3
    fi
    echo "== run"
    "$BUILD/harness" "$DATA"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
