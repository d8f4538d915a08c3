#!/usr/bin/env bash
# mobilenet_v2 inference, fusion against its passes and global-hires, at 460x700 (batch 2) and 1536x2048 (batch 1),
# at 5c68ed1 (old) and 92c4ddc (new: valid cells from the backbone's measured grid, run lock, ...), each in its own
# process, alternated over 2 rounds. From the repository root at 92c4ddc:
#   bash benchmarks/results/cpu_mobilenet_infer_5c68ed1_vs_92c4ddc/run.sh
set -euo pipefail
d=benchmarks/results/cpu_mobilenet_infer_5c68ed1_vs_92c4ddc
here=$(pwd)
py=${PYTHON:-$here/.venv/bin/python}
weights=$(realpath ../shared/weights/mobilenet_v2-b0353104.pth)
args=(--device cpu --backbones mobilenet_v2 --sizes 460x700 1536x2048 --modes infer --variants fusion global-hires
      --batch 2 --batch-large 1 --warmup 1 --reps 5 --weights "mobilenet_v2=$weights")
wt=$(mktemp -d)/old
git worktree add -q "$wt" 5c68ed1
trap 'git worktree remove --force "$wt"' EXIT
for r in 1 2; do
    (cd "$wt" && PYTHONPATH=src "$py" benchmarks/bench_model.py "${args[@]}" --out "$here/$d/old_$r.json" > /dev/null 2>&1)
    PYTHONPATH=src "$py" benchmarks/bench_model.py "${args[@]}" --out "$d/new_$r.json" > /dev/null 2>&1
done
for f in old_1 new_1 old_2 new_2; do
    printf "%s: " $f
    grep -h "^| mobilenet_v2 | [0-9x]* | infer | [0-9.]* (" "$d/$f.md" | awk -F'|' '{printf "%s %s / %s ; ", $3, $5, $6}'
    echo
done
