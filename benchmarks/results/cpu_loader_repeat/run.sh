#!/usr/bin/env bash
# Loader epochs of 1 pass against 4 passes over 64 BreakHis PNGs (2 workers, memory cache, microscopy
# augmentation), alternated over 3 rounds, each a fresh process. Run from the repository root:
#   bash benchmarks/results/cpu_loader_repeat/run.sh
set -euo pipefail
d=benchmarks/results/cpu_loader_repeat
for round in 1 2 3; do
    for r in 1 4; do
        PYTHONPATH=src .venv/bin/python benchmarks/bench_data.py --data ../shared/data/breakhis --limit 64 \
            --decode-n 2 --workers 2 --caches memory --augments microscopy --repeat $r \
            --out $d/round${round}_repeat$r.json > /dev/null
    done
done
.venv/bin/python - <<'PY'
import json, statistics
d = "benchmarks/results/cpu_loader_repeat"
rows = {(k, r): json.load(open(f"{d}/round{k}_repeat{r}.json"))["loader"][0]["images_per_s"]
        for k in (1, 2, 3) for r in (1, 4)}
ratios = [rows[k, 4] / rows[k, 1] for k in (1, 2, 3)]
lines = ["| round | 1 pass, img/s | 4 passes, img/s | 4 / 1 |", "| --- | --- | --- | --- |"]
lines += [f"| {k} | {rows[k, 1]:.1f} | {rows[k, 4]:.1f} | {rows[k, 4] / rows[k, 1]:.3f} |" for k in (1, 2, 3)]
lines.append(f"\nmedian 4 / 1: {statistics.median(ratios):.3f}")
open(f"{d}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
