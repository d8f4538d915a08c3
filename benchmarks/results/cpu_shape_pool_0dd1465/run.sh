#!/usr/bin/env bash
# data.shape_pool at 0dd1465: the shapes and padded view pixels of training batches (shape_count.py, counts), and
# training epochs timed in alternation, pool 0 and 8 (first_epoch.py: mobilenet_v2 fusion, CPU, one orientation,
# ImageNet weights), on BreakHis cut to many sizes (shape_count.py --make-varied, seed 0).
# Run from the repository root: bash benchmarks/results/cpu_shape_pool_0dd1465/run.sh
set -euo pipefail
D=benchmarks/results/cpu_shape_pool_0dd1465
VARIED=${VARIED:-/tmp/finescope_varied}
W=../shared/weights/mobilenet_v2-b0353104.pth
[ -d "$VARIED" ] || PYTHONPATH=src .venv/bin/python benchmarks/shape_count.py --make-varied ../shared/data/breakhis "$VARIED"
for pool in 0 4 8 16; do
  PYTHONPATH=src .venv/bin/python benchmarks/shape_count.py --epochs 3 --multiples 1 64 --eval-orders shape \
    --out $D/count_pool$pool.json --set data.root=$VARIED data.cache=memory model.weights= data.one_orientation=on \
    data.shape_pool=$pool > $D/count_pool$pool.md
done
for round in 1 2; do
  for pool in 0 8; do
    PYTHONPATH=src .venv/bin/python benchmarks/first_epoch.py --epochs 2 --out $D/epochs_pool${pool}_round$round.json \
      --set data.root=$VARIED data.cache=memory model.weights=$W data.one_orientation=on train.device=cpu \
      data.shape_pool=$pool > $D/epochs_pool${pool}_round$round.md
  done
done
