#!/usr/bin/env bash
# 2 epochs of breakhis_binary.yaml on the CPU through the command line at 1a0c6b8 (crops: rows first and
# roi_align) and at 66192ab (two embedding_bag passes), each commit in its own process, alternated over two
# rounds. From the repository root: bash benchmarks/results/cpu_train_66192ab_vs_1a0c6b8/run.sh
set -euo pipefail
d=$PWD/benchmarks/results/cpu_train_66192ab_vs_1a0c6b8
PY=$PWD/.venv/bin/python
for c in 1a0c6b8 66192ab; do [ -d /tmp/wt_$c ] || git worktree add -f -q /tmp/wt_$c $c; done
ln -sfn "$PWD/../shared" /tmp/shared
for round in 1 2; do
    for c in 1a0c6b8 66192ab; do
        rm -rf /tmp/run_$c
        (cd /tmp/wt_$c && PYTHONPATH=src /usr/bin/time -f "%e s %M KB" -o $d/round${round}_$c.time $PY -m finescope \
            train --config src/finescope/configs/breakhis_binary.yaml --out /tmp/run_$c --quiet --set \
            data.root=../shared/data/breakhis train.device=cpu train.epochs=2 \
            model.weights=../shared/weights/mobilenet_v2-b0353104.pth)
        cp /tmp/run_$c/metrics.json $d/round${round}_${c}_metrics.json
    done
done
for c in 1a0c6b8 66192ab; do git worktree remove --force /tmp/wt_$c; done
