"""How many distinct input shapes the backbone meets in a training run, for each ``model.view_multiple``.

    PYTHONPATH=src python benchmarks/shape_count.py --set data.root=../shared/data/breakhis --multiples 1 32
    PYTHONPATH=src python benchmarks/shape_count.py --make-varied ../shared/data/breakhis /tmp/varied
    PYTHONPATH=src python benchmarks/shape_count.py --set data.root=/tmp/varied --multiples 1 32

On CUDA every input shape the backbone has not met before costs cuDNN's set-up of its convolutions once per
process (mobilenet_v2 in fp16 on an H200: 7.6-14.7 s a training step, 3.4 s an inference step; resnet18 in
bf16: 0.2-0.4 s; ``benchmarks/RESULTS.md``, "At 2d64d1b"), and under ``torch.compile`` a recompilation. This
reads the run's batches as ``finescope train`` makes them (the config's split, its training loader with
augmentation for ``--epochs`` epochs, and the validation and test loaders), and counts the shapes of the
backbone's two inputs per batch: the global view (B, 3, Gh, Gw), whose size :meth:`FineScopeNet.view_size` gives
and the batch pads to its largest, and the crops (B*K, 3, L, L). Training shapes (forward and backward) and
evaluation shapes (forward only) are counted apart, the evaluation read in finescope's order (images of one
shape together, :func:`~finescope.data.dataset.shape_order`, a batch of one view shape since 5182785) and in the
split's own (fixed cuts of the evaluation batch). It also reports what the
padding and the rounding cost: the pixels of the batches' global views against those of each image's own view
with its aspect kept exactly; ``--time-eval REPS`` times the evaluation in each order with the config's model.

``--make-varied SRC DST`` writes a folder of many image sizes from a real one: each image of SRC cut to a random
height and width (between ``--min-side`` and its own), in the same layout, so that labels and patients read the
same.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, make_out_folder, markdown_table, require_counts, run_script  # noqa: E402

from finescope.config import load_config  # noqa: E402
from finescope.data.sources import find_images  # noqa: E402
from finescope.engine import predict_loader  # noqa: E402
from finescope.models import create_model  # noqa: E402
from finescope.models.network import global_view_size  # noqa: E402
from finescope.trainer import _load_samples_rank0_first, make_loader, resolve_device, resolve_splits  # noqa: E402


def make_varied(src: Path, dst: Path, min_side: int, seed: int) -> int:
    """Write each image of ``src`` cut to a random size to the same relative path under ``dst``."""
    rng = np.random.default_rng(seed)
    n = 0
    for path in find_images(src):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            w, h = im.size
            ch, cw = (int(rng.integers(min(min_side, s), s + 1)) for s in (h, w))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            im.convert("RGB").crop((left, top, left + cw, top + ch)).save(out)
        n += 1
    for extra in src.glob("*.csv"):  # a labels file travels with the images
        shutil.copy(extra, dst / extra.name)
    return n


class Tally:
    """The distinct backbone input shapes of the batches read, and their global views' pixels against those of
    each image's own view with its aspect kept exactly."""

    def __init__(self, model) -> None:
        self.model, self.shapes, self.batches, self.view, self.own = model, set(), 0, 0, 0

    def read(self, batch) -> None:
        m = self.model
        sizes = batch.sizes.tolist()
        dims = sizes if m.hires else [m.view_size(h, w) for h, w in sizes]  # global-hires: the image itself
        gh, gw = max(d[0] for d in dims), max(d[1] for d in dims)  # the batch's padded view
        self.shapes.add((len(sizes), 3, gh, gw))
        if m.num_crops:
            self.shapes.add((len(sizes) * m.num_crops, 3, m.local_size, m.local_size))
        self.view += len(sizes) * gh * gw
        self.own += sum(a * b for a, b in (sizes if m.hires else (global_view_size(h, w, m.global_size)
                                                                  for h, w in sizes)))
        self.batches += 1

    def result(self) -> dict:
        return {"batches": self.batches, "shapes": sorted(self.shapes),
                "view_pixels_vs_own": self.view / self.own if self.own else None}


def count(cfg, epochs: int, eval_orders: list[str], time_reps: int) -> dict:
    """Distinct backbone input shapes of ``epochs`` training epochs and of the evaluation splits, these read in
    each of ``eval_orders`` (``shape``: as finescope evaluates; ``file``: the split's order); with ``time_reps``,
    the median seconds of that many predictions of the evaluation splits (after one that fills the cache)."""
    model = create_model(cfg.model, 2).eval()
    sample_set = _load_samples_rank0_first(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        splits = resolve_splits(cfg, sample_set, Path(run_dir), resume=False)
    train, tally = make_loader(sample_set, splits["train"], cfg, train=True), Tally(model)
    for epoch in range(epochs):
        train.sampler.set_epoch(epoch)
        for batch in train:
            tally.read(batch)
    del train
    out = {"view_multiple": cfg.model.view_multiple, "train": tally.result(), "eval": {}}
    sides = [side for side in ("val", "test") if len(splits.get(side, []))]
    device = resolve_device(cfg.train.device)
    model.to(device)
    loaders = {}
    for order in eval_orders:
        loaders[order] = [make_loader(sample_set, splits[side], cfg, train=False) for side in sides]
        if order == "file":  # the split's order cut every eval batch, as evaluation read it before 3d27cec
            for loader in loaders[order]:
                sampler = loader.batch_sampler.sampler
                sampler.order = sampler.batch_keys = None
                sampler.set_epoch(0)
        tally = Tally(model)
        for loader in loaders[order]:
            for batch in loader:
                tally.read(batch)
        out["eval"][order] = tally.result()
    if time_reps:  # the orders interleaved (A, B, A, B, ...), after one pass of each that fills the cache
        runs = {order: [] for order in eval_orders}
        for _ in range(time_reps + 1):
            for order in eval_orders:
                began = time.perf_counter()
                for loader in loaders[order]:
                    predict_loader(model, loader, device, amp=cfg.train.amp, cpu_amp=cfg.train.cpu_amp,
                                   channels_last=cfg.train.channels_last)
                runs[order].append(time.perf_counter() - began)
        for order, seconds in runs.items():
            out["eval"][order]["seconds"] = statistics.median(seconds[1:])
            out["eval"][order]["seconds_each"] = seconds[1:]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="src/finescope/configs/breakhis_binary.yaml")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, as finescope train --set")
    p.add_argument("--multiples", nargs="+", type=int, default=[1, 32], help="model.view_multiple values")
    p.add_argument("--epochs", type=int, default=3, help="training epochs read")
    p.add_argument("--eval-orders", nargs="+", choices=("shape", "file"), default=["shape", "file"],
                   help="evaluation read in finescope's order (shape) and in the split's (file)")
    p.add_argument("--time-eval", type=int, default=0, metavar="REPS",
                   help="also time REPS predictions of the evaluation splits with the config's model and device")
    p.add_argument("--make-varied", nargs=2, metavar=("SRC", "DST"), help="write a folder of many sizes, then stop")
    p.add_argument("--min-side", type=int, default=240, help="--make-varied: smallest side cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    require_counts(p, args, epochs=1, min_side=1, multiples=1, time_eval=0)
    make_out_folder(p, args.out, md_beside=False)
    if args.make_varied:
        src, dst = (Path(v) for v in args.make_varied)
        if not src.is_dir():
            p.error(f"--make-varied: '{src}' is not a folder")
        print(f"{make_varied(src, dst, args.min_side, args.seed)} images written under {dst}")
        return 0
    rows = []
    for m in args.multiples:
        cfg = load_config(args.config, [*args.set, f"model.view_multiple={m}"])
        rows.append(count(cfg, args.epochs, args.eval_orders, args.time_eval))
    env = environment(resolve_device(cfg.train.device))
    print(f"commit {env['commit']}, {env['cpu']}, torch {env['torch']}\n`{env['command']}`\n")

    def pixels(r: dict) -> str:
        return "-" if r["view_pixels_vs_own"] is None else f"{r['view_pixels_vs_own']:.3f}"

    table = []
    for r in rows:
        table.append([r["view_multiple"], "training", r["train"]["batches"], len(r["train"]["shapes"]),
                      pixels(r["train"]), "-"])
        for order, e in r["eval"].items():
            seconds = f"{e['seconds']:.2f}" if "seconds" in e else "-"
            table.append([r["view_multiple"], f"evaluation, {order} order", e["batches"], len(e["shapes"]),
                          pixels(e), seconds])
    print(markdown_table(["model.view_multiple", "batches of", "batches", "distinct shapes",
                          "global view pixels / own", "seconds (median)"], table))
    for r in rows:
        e = r["eval"]
        if "seconds" in e.get("shape", {}) and "seconds" in e.get("file", {}):
            ratios = [a / b for a, b in zip(e["shape"]["seconds_each"], e["file"]["seconds_each"], strict=True)]
            print(f"\nview_multiple {r['view_multiple']}: evaluation seconds in shape order / in file order, paired "
                  f"per repetition: median {statistics.median(ratios):.3f} ("
                  + ", ".join(f"{v:.3f}" for v in ratios) + ")")
    for r in rows:
        parts = [("training", r["train"])] + [(f"evaluation, {o} order", e) for o, e in r["eval"].items()]
        for name, part in parts:
            print(f"\nview_multiple {r['view_multiple']}, {name}: "
                  + ", ".join("x".join(map(str, s)) for s in part["shapes"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    run_script(main)  # a wrong --config or --set (data.root, an unknown key): one line
