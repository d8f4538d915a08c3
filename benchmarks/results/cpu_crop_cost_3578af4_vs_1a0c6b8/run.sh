#!/usr/bin/env bash
# crop_cost.py at 1a0c6b8 (rows first, shifts, roi_align) and at 3578af4 (two embedding_bag passes, shifts),
# each in its own process, alternated over 2 rounds. From the repository root, with 1a0c6b8 checked out in a
# worktree: git worktree add /tmp/wt_old 1a0c6b8; bash benchmarks/results/cpu_crop_cost_3578af4_vs_1a0c6b8/run.sh
set -euo pipefail
d=benchmarks/results/cpu_crop_cost_3578af4_vs_1a0c6b8
args=(--reps 15 --in-step mobilenet_v2 --weights ../shared/weights/mobilenet_v2-b0353104.pth)
for round in 1 2; do
    (cd /tmp/wt_old && PYTHONPATH=src /work/main/.venv/bin/python benchmarks/crop_cost.py "${args[@]/..\/shared/\/work\/shared}" \
        --out /work/main/$d/round${round}_1a0c6b8.json > /dev/null)
    PYTHONPATH=src .venv/bin/python benchmarks/crop_cost.py "${args[@]}" --out $d/round${round}_3578af4.json > /dev/null
done
