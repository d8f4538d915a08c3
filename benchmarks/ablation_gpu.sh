#!/usr/bin/env bash
# The BreakHis ablation sweep on one GPU, inside a 5-minute budget (settings that would not fit are skipped
# and listed). Usage, from the repository root:
#   benchmarks/ablation_gpu.sh DATA OUT [more ablation_sweep.py options]
#   benchmarks/ablation_gpu.sh .gpu/breakhis runs/ablation_gpu                 # on the GPU machine
#   benchmarks/ablation_gpu.sh ../shared/data/breakhis /tmp/abl --device cpu --tiny --settings global,fusion
# DATA: a BreakHis tree (benchmarks/make_gpu_subset.py makes the JPEG copy); the MobileNetV2 ImageNet weights
# are read from .gpu/mobilenet_v2-b0353104.pth (--weights PATH to change). Python: $PYTHON, else .venv, else python3.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 DATA OUT [ablation_sweep.py options]" >&2
    exit 2
fi
DATA=$(realpath -m "$1")
OUT=$(realpath -m "$2")
shift 2
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt" || true
start=$(date +%s)
PYTHONPATH=src "$PY" benchmarks/ablation_sweep.py "$DATA" "$OUT" "$@" > "$OUT/sweep.log" 2>&1 || {
    tail -20 "$OUT/sweep.log" >&2
    exit 1
}
grep -E "^(sweep|device):" "$OUT/sweep.log" || true
echo "wall seconds: $(( $(date +%s) - start ))"
cat "$OUT/table.txt"
