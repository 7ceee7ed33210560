#!/usr/bin/env bash
# The one command for the GPU check machine (an H100/H200 without package registries, TensorRT,
# PyAV or mediapipe; torch + CUDA, nvcc, cmake, OpenCV): a preflight, then builds, checks and
# times the fused attention (torch op and TensorRT plugin), times a whole frame and fine-tunes
# the shipped weights for the time left. report.md and report.json are rewritten at every step,
# so a kill leaves every finished table; they go to $OUT with the checkpoint, the attention
# dispatch table and the log. Keeps to 360 s (call it with timeout_s=420). See docs/GPU.md.
#
#   bash bench/device_check.sh --prepare            # here first: build/device_check/
#   bash bench/device_check.sh --dry-run --preflight  # here: the sizes the device tool counts
#   bash bench/device_check.sh --dry-run            # here: the steps that need no CUDA, on the CPU
#   bash bench/device_check.sh                      # there, with build/device_check carried
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device_check}"
export OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"${PYTHON:-python3}" bench/device_check.py "$@" 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
