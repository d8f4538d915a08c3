#!/usr/bin/env bash
# One-shot GPU check (under 8 minutes on one H100/H200: every stage has its own time limit, and gpu_check.py
# skips what would run past its 465 s budget).
#   bash benchmarks/gpu_check.sh [OUT_DIR] [extra gpu_check.py options, e.g. --device cpu --quick]
# Results go to $OUT when set (else OUT_DIR, else ./gpu_check_out); the short table is printed last.
# Expects .gpu/breakhis (BreakHis tree, JPEG copy) and .gpu/mobilenet_v2-b0353104.pth next to the repository
# root, or --data / --weights pointing elsewhere. Needs torch, torchvision (and timm is not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-${1:-gpu_check_out}}"
if [[ $# -gt 0 && "$1" != --* ]]; then shift; fi
mkdir -p "$out"
export PYTHONPATH=src
timeout 475 python3 benchmarks/gpu_check.py "$out" "$@" 2>&1 | tee "$out/gpu_check.log" | tail -n 40
