#!/usr/bin/env bash
# One-shot GPU check (under 8 minutes on one H100/H200: every stage has its own time limit, and gpu_check.py
# skips what would run past its 465 s budget).
#   bash benchmarks/gpu_check.sh [OUT_DIR] [extra gpu_check.py options, e.g. --device cpu --quick]
# Results go to $OUT when set (else OUT_DIR, else gpu_check_out in the repository root); the short table is
# printed last. A relative OUT_DIR, --data or --weights is read from the folder it is run from.
# Expects .gpu/breakhis (BreakHis tree, JPEG copy) and .gpu/mobilenet_v2-b0353104.pth in the repository root, or
# --data / --weights pointing elsewhere; make them with
#   python benchmarks/make_gpu_subset.py ../shared/data/breakhis .gpu/breakhis
#   cp ../shared/weights/mobilenet_v2-b0353104.pth .gpu/
# Needs torch and torchvision (timm is not needed); runs .venv/bin/python when there is one, else python3
# ($PYTHON overrides both).
set -euo pipefail
dir_arg=""
if [[ $# -gt 0 && "$1" != -* ]]; then dir_arg=$1; shift; fi  # OUT_DIR, when the first argument is not an option
out="${OUT:-${dir_arg:-}}"
if [[ -n "$out" && "$out" != /* ]]; then out="$PWD/$out"; fi  # relative to where it was run from
args=()  # --data and --weights too: gpu_check.py reads paths from the repository root
while [[ $# -gt 0 ]]; do
    opt=$1 value=""
    shift
    case $opt in
        --data=*|--weights=*) value=${opt#*=}; opt=${opt%%=*} ;;
        --data|--weights) if [[ $# -eq 0 ]]; then args+=("$opt"); continue; fi; value=$1; shift ;;
        *) args+=("$opt"); continue ;;
    esac
    if [[ -n "$value" && "$value" != /* ]]; then value="$PWD/$value"; fi
    args+=("$opt" "$value")
done
set -- ${args[@]+"${args[@]}"}
cd "$(dirname "$0")/.."
out="${out:-gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH=src
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the repository's environment where there is one (make test creates it), else python3
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
timeout 475 "$PY" benchmarks/gpu_check.py "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
