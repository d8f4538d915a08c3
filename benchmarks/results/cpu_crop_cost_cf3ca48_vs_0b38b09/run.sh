#!/usr/bin/env bash
# crop_cost.py at 0b38b09 (the row pass over a column slice of the source, in place) and at cf3ca48 (over a
# contiguous copy of the box's rows and columns), each in its own process, alternated over 2 rounds. From the
# repository root at cf3ca48, with 0b38b09 checked out in a worktree:
#   git worktree add /tmp/wt_old 0b38b09; bash benchmarks/results/cpu_crop_cost_cf3ca48_vs_0b38b09/run.sh
#   python benchmarks/crop_cost_compare.py benchmarks/results/cpu_crop_cost_cf3ca48_vs_0b38b09 0b38b09 cf3ca48
set -euo pipefail
d=benchmarks/results/cpu_crop_cost_cf3ca48_vs_0b38b09
here=$(pwd)
weights=$(realpath ../shared/weights/mobilenet_v2-b0353104.pth)
args=(--reps 15 --in-step mobilenet_v2 --weights "$weights")
for round in 1 2; do
    (cd /tmp/wt_old && PYTHONPATH=src "$here/.venv/bin/python" benchmarks/crop_cost.py "${args[@]}" \
        --out "$here/$d/round${round}_0b38b09.json" > /dev/null)
    PYTHONPATH=src .venv/bin/python benchmarks/crop_cost.py "${args[@]}" --out $d/round${round}_cf3ca48.json > /dev/null
done
