"""Where a training run's first epochs go: every step timed alone, through the trainer's own loader, model,
optimizer and step (``finescope.engine.train_one_epoch``).

    PYTHONPATH=src python benchmarks/first_epoch.py --config src/finescope/configs/breakhis_binary.yaml \
        --epochs 2 --set data.root=.gpu/breakhis train.device=cuda model.weights=.gpu/mobilenet_v2-b0353104.pth

Built as ``finescope train`` builds them (the config's split, loader with its workers and cache, model,
optimizer, loss scaling); the device is synchronised after every step, so each step's time is its own, and the
time spent waiting for the loader is kept apart. Reported per epoch: the wait for the first batch, the total
wait, the total step time, the slowest steps with their batch shapes, and the mean step time of the first step
of each batch shape against its later steps (the cost of a shape the process meets for the first time: CUDA
kernels loaded on first use, cuDNN's choice of convolution algorithm per shape, the selection's CUDA graph
captured per shape). On a GPU the trainer's first epoch took 23-26 s against under 1 s for each later one
(``benchmarks/RESULTS.md``); this says where.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocator_as_the_cli,
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    require_counts,
    run_script,
    sync,
)

from finescope.config import load_config  # noqa: E402
from finescope.engine import make_grad_scaler, train_one_epoch  # noqa: E402
from finescope.trainer import (  # noqa: E402
    _load_samples_rank0_first,
    build_model,
    build_optimizer,
    make_loader,
    resolve_device,
    resolve_splits,
    seed_everything,
)


class TimedLoader:
    """A loader whose iteration records, per step, the wait for the batch, the step's time (the device
    synchronised before and after) and the batch's image shape."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.sampler = loader.sampler
        self.records: list[dict] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            sync(self.device)
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            got = time.perf_counter()
            yield batch  # the step runs here
            sync(self.device)
            self.records.append({"wait_ms": (got - asked) * 1e3, "step_ms": (time.perf_counter() - got) * 1e3,
                                 "shape": list(batch.images.shape)})


def epoch_summary(records: list[dict], seen: set, slowest: int) -> dict:
    """Totals, the slowest steps, and first-of-a-shape against later steps (``seen``: shapes met before)."""
    first, later = [], []
    for r in records:
        key = tuple(r["shape"])
        (later if key in seen else first).append(r["step_ms"])
        seen.add(key)
    top = sorted(range(len(records)), key=lambda i: -records[i]["step_ms"])[:slowest]
    return {"steps": len(records), "first_wait_ms": records[0]["wait_ms"] if records else 0.0,
            "wait_ms": sum(r["wait_ms"] for r in records), "step_ms": sum(r["step_ms"] for r in records),
            "new_shapes": len(first), "new_shape_step_ms": statistics.mean(first) if first else None,
            "known_shape_step_ms": statistics.mean(later) if later else None,
            "slowest": [{"step": i, **records[i]} for i in top]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="src/finescope/configs/breakhis_binary.yaml")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, as finescope train --set")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--slowest", type=int, default=5, help="slowest steps listed per epoch")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    require_counts(p, args, epochs=1)
    make_out_folder(p, args.out, md_beside=False)
    allocator_as_the_cli()
    cfg = load_config(args.config, args.set)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    sample_set = _load_samples_rank0_first(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        splits = resolve_splits(cfg, sample_set, Path(run_dir), resume=False)
    model = build_model(cfg, len(sample_set.class_names), device)
    optimizer = build_optimizer(model, cfg, device)
    loader = TimedLoader(make_loader(sample_set, splits["train"], cfg, train=True), device)
    scaler = make_grad_scaler(device, cfg.train.amp)
    sync(device)
    setup_s = time.perf_counter() - start
    env = environment(device)  # the commit and load as the epochs begin
    t, seen, epochs = cfg.train, set(), []
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.records = []
        began = time.perf_counter()
        train_one_epoch(model, loader, optimizer, None, device, aux_weight=t.aux_weight, grad_clip=t.grad_clip,
                        amp=t.amp, cpu_amp=t.cpu_amp, channels_last=t.channels_last, progress=False, scaler=scaler)
        epochs.append({"epoch": epoch, "seconds": time.perf_counter() - began,
                       **epoch_summary(loader.records, seen, args.slowest)})
    env["loadavg_end"] = loadavg()
    print(f"device {env.get('gpu', env['cpu'])} ({env['device']}), torch {env['torch']}, commit {env['commit']}\n"
          f"`{env['command']}`\n\nsetup (samples, split, model, optimizer, loader): {setup_s:.2f} s\n")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    print(markdown_table(
        ["epoch", "s", "steps", "first batch wait ms", "wait ms", "step ms", "new shapes", "step ms, new shape",
         "step ms, known shape"],
        [[e["epoch"] + 1, f"{e['seconds']:.2f}", e["steps"], ms(e["first_wait_ms"]), ms(e["wait_ms"]),
          ms(e["step_ms"]), e["new_shapes"], ms(e["new_shape_step_ms"]), ms(e["known_shape_step_ms"])]
         for e in epochs]))
    print("\nslowest steps:\n")
    print(markdown_table(["epoch", "step", "ms", "wait ms", "batch shape"],
                         [[e["epoch"] + 1, s["step"], f"{s['step_ms']:.1f}", f"{s['wait_ms']:.1f}",
                           "x".join(map(str, s["shape"]))] for e in epochs for s in e["slowest"]]))
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "setup_seconds": setup_s, "epochs": epochs},
                                             indent=1))
    return 0


if __name__ == "__main__":
    run_script(main)  # a wrong --config or --set (data.root, an unknown key): one line
