#!/usr/bin/env bash
# Backbone input shapes and padded view pixels of a training run's real batches (benchmarks/shape_count.py):
# BreakHis 100X (../shared/data/breakhis, configs/breakhis_binary.yaml: mobilenet_v2, batch 8) and a copy of it
# cut to many sizes (--make-varied, seed 0), with and without data.one_orientation; evaluation in finescope's
# shape order and in file order; then the evaluation timed on the CPU in both orders, interleaved (ImageNet
# MobileNetV2). Run from the repository root: bash benchmarks/results/cpu_shape_count_ab38f17/run.sh
set -euo pipefail
D=benchmarks/results/cpu_shape_count_ab38f17
VARIED=${VARIED:-/tmp/finescope_varied}
W=../shared/weights/mobilenet_v2-b0353104.pth
run() { PYTHONPATH=src .venv/bin/python benchmarks/shape_count.py "$@"; }
rm -rf "$VARIED"
run --make-varied ../shared/data/breakhis "$VARIED"
for data in breakhis varied; do
  root=$([ $data = breakhis ] && echo ../shared/data/breakhis || echo "$VARIED")
  for oo in off on; do
    run --epochs 3 --multiples 1 32 64 --out $D/${data}_orientation_${oo}.json \
      --set data.root=$root data.cache=memory model.weights= data.one_orientation=$oo > $D/${data}_orientation_${oo}.md
  done
  run --epochs 1 --multiples 1 --time-eval 5 --out $D/${data}_eval_timed.json \
    --set data.root=$root data.cache=memory model.weights=$W train.device=cpu > $D/${data}_eval_timed.md
done
