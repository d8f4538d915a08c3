# second device call of this session: what the channels-last layout costs per new batch shape
set -u
DEV=${DEV:-cuda}; PY=${PY:-python3}
RUNS=${RUNS:-"mobilenet_v2:fp16:cl mobilenet_v2:fp16:contiguous mobilenet_v2:bf16:contiguous mobilenet_v2:bf16:cl resnet18:bf16:contiguous"}
mkdir -p $OUT/ns
PYTHONPATH=src timeout ${T1:-150} $PY benchmarks/new_shape_cost.py --device $DEV --runs $RUNS --out $OUT/ns/new_shape.json > $OUT/ns/new_shape.log 2>&1; echo "new_shape rc $?"
grep -E "^[a-z0-9_]+:(fp16|bf16|off):" $OUT/ns/new_shape.log
for cl in false; do
  PYTHONPATH=src timeout ${T2:-75} $PY -m finescope train --config src/finescope/configs/breakhis_binary.yaml --out /tmp/tr_$cl --quiet --set data.root=.gpu/breakhis train.device=$DEV data.cache=memory data.num_workers=${W:-15} model.weights=.gpu/mobilenet_v2-b0353104.pth train.epochs=${E:-6} train.batch_size=16 train.compile=off train.channels_last=$cl ${EXTRA:-} > $OUT/train_cl_$cl.log 2>&1; echo "train channels_last=$cl rc $?"
  tail -2 $OUT/train_cl_$cl.log; cp /tmp/tr_$cl/history.jsonl $OUT/train_cl_${cl}_history.jsonl; cp /tmp/tr_$cl/metrics.json $OUT/train_cl_${cl}_metrics.json
  python3 -c "import json;[print(r['epoch'], round(r['train_seconds'],2), r.get('val_image_accuracy')) for r in map(json.loads, open('/tmp/tr_$cl/history.jsonl'))]"
done
cat $OUT/ns/new_shape.md | head -12
