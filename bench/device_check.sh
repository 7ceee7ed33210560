#!/usr/bin/env bash
# The one command for the GPU check machine (an H200 without package registries, TensorRT,
# PyAV or mediapipe; torch + CUDA, nvcc, cmake, OpenCV): builds, checks and times the fused
# attention (torch op and TensorRT plugin), times a whole frame, then fine-tunes the shipped
# weights for the minutes left; results (report.md, report.json, the checkpoint, the attention
# dispatch table, the log) go to $OUT. Finishes in about 7.5 minutes. See docs/GPU.md.
#
#   bash bench/device_check.sh --prepare    # here first: build/device_check/ (clips, boxes, ...)
#   bash bench/device_check.sh --dry-run    # here: the steps that need no CUDA, on the CPU
#   bash bench/device_check.sh              # there, with build/device_check carried
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device_check}"
export OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"${PYTHON:-python3}" bench/device_check.py "$@" 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
