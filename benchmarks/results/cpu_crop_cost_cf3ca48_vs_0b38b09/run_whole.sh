#!/usr/bin/env bash
# The case where run.sh's two rounds disagreed most (460x700, B=2, whole boxes; the smallest beside it): three
# more alternated rounds, each commit in its own process, as run.sh (0b38b09 in the worktree /tmp/wt_old), then
#   python benchmarks/crop_cost_compare.py benchmarks/results/cpu_crop_cost_cf3ca48_vs_0b38b09/whole 0b38b09 cf3ca48
set -euo pipefail
d=benchmarks/results/cpu_crop_cost_cf3ca48_vs_0b38b09/whole
mkdir -p $d
here=$(pwd)
args=(--cases 460x700:2 --boxes whole smallest --reps 15)
for round in 1 2 3; do
    (cd /tmp/wt_old && PYTHONPATH=src "$here/.venv/bin/python" benchmarks/crop_cost.py "${args[@]}" \
        --out "$here/$d/round${round}_0b38b09.json" > /dev/null)
    PYTHONPATH=src .venv/bin/python benchmarks/crop_cost.py "${args[@]}" --out $d/round${round}_cf3ca48.json > /dev/null
done
