#!/usr/bin/env bash
# bench_model.py, mobilenet_v2 fusion inference at 1536x2048 (the group that misses the CPU overhead goal), at
# cf3ca48 and 0e7e7c5, each in its own process, alternated over 3 rounds. From the repository root at 0e7e7c5:
#   bash benchmarks/results/cpu_mobilenet_1536_infer_0e7e7c5_vs_cf3ca48/run.sh
set -euo pipefail
d=benchmarks/results/cpu_mobilenet_1536_infer_0e7e7c5_vs_cf3ca48
here=$(pwd)
weights=$(realpath ../shared/weights/mobilenet_v2-b0353104.pth)
args=(--device cpu --backbones mobilenet_v2 --sizes 1536x2048 --modes infer --variants fusion --batch 1 --warmup 1
      --reps 10 --weights "mobilenet_v2=$weights")
wt=$(mktemp -d)/old
git worktree add -q "$wt" cf3ca48
trap 'git worktree remove --force "$wt"' EXIT
for round in 1 2 3; do
    (cd "$wt" && PYTHONPATH=src "$here/.venv/bin/python" benchmarks/bench_model.py "${args[@]}" \
        --out "$here/$d/round${round}_cf3ca48.json" > /dev/null)
    PYTHONPATH=src .venv/bin/python benchmarks/bench_model.py "${args[@]}" --out "$d/round${round}_0e7e7c5.json" > /dev/null
done
grep -H "| mobilenet_v2 | 1536x2048 | infer | [0-9]" "$d"/round*_*.md
