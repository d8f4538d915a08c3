#!/usr/bin/env bash
# The selection at 4cd8e3b (iterative labelling, boxes as (B, S, 4)) and 8fcd74d (scipy labelling on the CPU,
# boxes as coordinate planes), each in its own process, alternated over 3 rounds: selection_cost.py for one
# 1536x2048 image (7x10 cells) and a batch of 16 BreakHis images (7x11), and bench_model.py's mobilenet_v2 fusion
# inference at 1536x2048 (the group that missed the CPU overhead goal). From the repository root at 8fcd74d:
#   bash benchmarks/results/cpu_selection_8fcd74d_vs_4cd8e3b/run.sh
set -euo pipefail
d=benchmarks/results/cpu_selection_8fcd74d_vs_4cd8e3b
here=$(pwd)
py=${PYTHON:-$here/.venv/bin/python}
weights=$(realpath ../shared/weights/mobilenet_v2-b0353104.pth)
bench=(--device cpu --backbones mobilenet_v2 --sizes 1536x2048 --modes infer --variants fusion --batch 1 --warmup 1
       --reps 10 --weights "mobilenet_v2=$weights")
wt=$(mktemp -d)/old
git worktree add -q "$wt" 4cd8e3b
trap 'git worktree remove --force "$wt"' EXIT
run() {  # run DIR TAG ROUND
    (cd "$1" && PYTHONPATH=src "$py" benchmarks/selection_cost.py --device cpu --batch 1 --grid 7x10 --reps 300 \
        --rounds-batches 20 > "$here/$d/round$3_$2_select_b1.md" 2>/dev/null)
    (cd "$1" && PYTHONPATH=src "$py" benchmarks/selection_cost.py --device cpu --batch 16 --grid 7x11 --reps 100 \
        --rounds-batches 20 > "$here/$d/round$3_$2_select_b16.md" 2>/dev/null)
    (cd "$1" && PYTHONPATH=src "$py" benchmarks/bench_model.py "${bench[@]}" --out "$here/$d/round$3_$2_model.json" \
        > /dev/null)
}
for round in 1 2 3; do
    run "$wt" 4cd8e3b "$round"
    run "$here" 8fcd74d "$round"
done
grep -H "| off |" "$d"/round*_select_b*.md
grep -H "| mobilenet_v2 | 1536x2048 | infer | [0-9]" "$d"/round*_model.md
