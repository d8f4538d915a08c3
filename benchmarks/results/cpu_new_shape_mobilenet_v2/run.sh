#!/usr/bin/env bash
# new_shape_cost.py on the CPU, mobilenet_v2 fusion training at BreakHis size (batch 16, then 4, 8, 12, 6), with
# glibc's malloc as the command line sets it and with its defaults (FINESCOPE_MALLOC=default), alternated over
# two rounds, each a process of its own. From the repository root:
#   bash benchmarks/results/cpu_new_shape_mobilenet_v2/run.sh
set -euo pipefail
d=benchmarks/results/cpu_new_shape_mobilenet_v2
py=${PYTHON:-.venv/bin/python}
for round in 1 2; do
    PYTHONPATH=src "$py" benchmarks/new_shape_cost.py --device cpu --runs mobilenet_v2:off --batch 16 \
        --out "$d/round${round}_tuned.json" > /dev/null 2>&1
    FINESCOPE_MALLOC=default PYTHONPATH=src "$py" benchmarks/new_shape_cost.py --device cpu \
        --runs mobilenet_v2:off --batch 16 --out "$d/round${round}_default.json" > /dev/null 2>&1
done
for f in "$d"/round*.md; do echo "== $f"; sed -n '5,6p;11,12p' "$f" | tail -n +1; done
