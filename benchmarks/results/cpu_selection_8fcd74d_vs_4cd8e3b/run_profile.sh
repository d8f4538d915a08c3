#!/usr/bin/env bash
# profile_step.py (mobilenet_v2 fusion, 1536x2048, batch 1) at 4cd8e3b and 8fcd74d, each in its own process,
# alternated over 2 rounds; prints each stage's time inside the inference steps ("in the step") and the
# selection's alone. From the repository root at 8fcd74d:
#   bash benchmarks/results/cpu_selection_8fcd74d_vs_4cd8e3b/run_profile.sh
set -euo pipefail
d=benchmarks/results/cpu_selection_8fcd74d_vs_4cd8e3b
here=$(pwd)
py=${PYTHON:-$here/.venv/bin/python}
weights=$(realpath ../shared/weights/mobilenet_v2-b0353104.pth)
args=(--device cpu --backbones mobilenet_v2 --size 1536x2048 --batch 1 --reps 20 --weights "mobilenet_v2=$weights")
wt=$(mktemp -d)/old
git worktree add -q "$wt" 4cd8e3b
trap 'git worktree remove --force "$wt"' EXIT
for round in 1 2; do
    (cd "$wt" && PYTHONPATH=src "$py" benchmarks/profile_step.py "${args[@]}" \
        --out "$here/$d/round${round}_4cd8e3b_profile.json" > /dev/null 2>&1)
    PYTHONPATH=src "$py" benchmarks/profile_step.py "${args[@]}" --out "$d/round${round}_8fcd74d_profile.json" \
        > /dev/null 2>&1
done
"$py" - "$d" <<'PY'
import json, pathlib, sys
stages = ["crop source", "global view", "select boxes", "crops", "rest", "global backbone", "crop backbone",
          "whole inference step"]
print("| file | " + " | ".join(stages) + " | select boxes alone |")
print("| --- " * (len(stages) + 2) + "|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("round*_profile.json")):
    st = json.loads(f.read_text())["backbones"][0]["stages"]
    print(f"| {f.name} | " + " | ".join(f"{st[s]['in_step_ms']:.2f}" for s in stages)
          + f" | {st['select boxes']['device_ms']:.2f} |")
PY
