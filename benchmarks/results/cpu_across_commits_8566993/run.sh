#!/bin/bash
# The same bench_model commands at three commits, alternated, two rounds (run from the repository root; the
# worktrees go to /tmp/wt_COMMIT, beside which ../shared must resolve: ln -sfn "$PWD/../shared" /tmp/shared).
#   985437b: crops cut in strips on a thread pool whose threads got OpenMP teams of their own
#   00c3d9b: the same strips, the pool kept to one OpenMP thread
#   8566993: no strips
set -e
OUT=$PWD/benchmarks/results/cpu_across_commits_8566993
PY=${PY:-$PWD/.venv/bin/python}
W=mobilenet_v2=../shared/weights/mobilenet_v2-b0353104.pth
for c in 985437b 00c3d9b 8566993; do [ -d /tmp/wt_$c ] || git worktree add -f -q /tmp/wt_$c $c; done
for round in 1 2; do
  for c in 985437b 00c3d9b 8566993; do
    cd /tmp/wt_$c
    PYTHONPATH=src $PY benchmarks/bench_model.py --device cpu --backbones mobilenet_v2 --sizes 1536x2048 \
      --modes infer --variants fusion --batch-large 1 --warmup 3 --reps 20 --weights $W --out $OUT/a_${c}_$round.json
    PYTHONPATH=src $PY benchmarks/bench_model.py --device cpu --backbones mobilenet_v2 --sizes 460x700 \
      --modes infer --variants fusion --batch 16 --warmup 1 --reps 5 --weights $W --out $OUT/b_${c}_$round.json
    PYTHONPATH=src $PY benchmarks/bench_model.py --device cpu --backbones resnet18 --sizes 460x700 \
      --modes train --variants fusion --batch 2 --warmup 1 --reps 5 --out $OUT/c_${c}_$round.json
  done
done
