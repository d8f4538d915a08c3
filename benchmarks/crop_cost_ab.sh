#!/usr/bin/env bash
# crop_cost.py at two commits, each in a process of its own, alternated over ROUNDS rounds (default 2), then
# crop_cost_compare.py's table (OUT_DIR/summary.md). From the repository root, with NEW checked out and .venv
# built (or $PYTHON set); OLD is checked out in a temporary git worktree, removed at the end. Options after ROUNDS go to
# crop_cost.py (default: --reps 15 --in-step mobilenet_v2 with ../shared's weights).
#   bash benchmarks/crop_cost_ab.sh OLD NEW OUT_DIR [ROUNDS] [crop_cost.py options ...]
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash benchmarks/crop_cost_ab.sh OLD NEW OUT_DIR [ROUNDS] [crop_cost.py options ...]" >&2
    exit 2
fi
old=$1 new=$2 out=$3
rounds=${4:-2}
shift $(( $# < 4 ? $# : 4 ))
if [ "$(git rev-parse --short=7 HEAD)" != "${new:0:7}" ]; then
    echo "error: NEW ($new) must be the checked-out commit ($(git rev-parse --short=7 HEAD)): check it out first" >&2
    exit 2
fi
here=$(pwd)
py=${PYTHON:-$here/.venv/bin/python}  # $PYTHON overrides the repository's environment
if [ $# -eq 0 ]; then
    weights=$(realpath ../shared/weights/mobilenet_v2-b0353104.pth)
    set -- --reps 15 --in-step mobilenet_v2 --weights "$weights"
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
wt=$(mktemp -d)/old
git worktree add -q "$wt" "$old"
trap 'git worktree remove --force "$wt"' EXIT
for round in $(seq 1 "$rounds"); do
    (cd "$wt" && PYTHONPATH=src "$py" benchmarks/crop_cost.py "$@" --out "$out/round${round}_${old}.json" > /dev/null)
    PYTHONPATH=src "$py" benchmarks/crop_cost.py "$@" --out "$out/round${round}_${new}.json" > /dev/null
done
"$py" benchmarks/crop_cost_compare.py "$out" "$old" "$new"
