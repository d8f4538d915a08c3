"""Cost of cutting the crops alone: one torchvision roi_align call against ``crop_align`` (on the CPU two
``embedding_bag`` passes per box, or a shift), on the crop sources a fusion step cuts them from.

    PYTHONPATH=src python benchmarks/crop_cost.py [--device cpu] [--reps 10] [--out FILE.json]

The crops of ``FineScopeNet._crops`` (K = 4 of 224 px, boxes scaled to the crop source, which at 460x700 is the
image and at 1536x2048 the image resized to 672x896), for three kinds of boxes: the smallest a model selects (a
third of the short side), random sides between that and the whole image, and the whole image (what an untrained
model's flat attention selects). The two ways are timed interleaved and compared per repetition. The largest
difference between ``crop_align``'s crops and one call's is printed too (float rounding).

With ``--in-step BACKBONE`` a second table times the crops inside whole fusion inference steps (channels-last
weights, as the trainer sets them; the boxes the model selects; ``--weights`` for local weights), and the steps.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocator_as_the_cli,
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    ms_spread,
    parse_device,
    parse_hw,
    report_header,
    require_counts,
    run_script,
    save_report,
    summary,
    sync,
    timed,
)

from finescope.config import ModelConfig  # noqa: E402
from finescope.models import create_model, network  # noqa: E402


def one_call(source: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    return roi_align(source, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def make_boxes(kind: str, batch: int, k: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """(batch, k, 4) boxes in full-resolution pixels."""
    m = min(h, w) / 3
    if kind == "whole":
        return torch.tensor([0.0, 0.0, w, h]).expand(batch, k, 4).clone()
    if kind == "smallest":
        bw = bh = torch.full((batch, k), m)
    else:
        bh = m + torch.rand(batch, k, generator=g) * (h - m)
        bw = m + torch.rand(batch, k, generator=g) * (w - m)
    x1 = torch.rand(batch, k, generator=g) * (w - bw)
    y1 = torch.rand(batch, k, generator=g) * (h - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=2)


def measure(size: tuple[int, int], batch: int, kind: str, args, device: torch.device) -> dict:
    h, w = size
    g = torch.Generator().manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", backbone="tiny", local_size=224, num_crops=4), 2).eval()
    images = torch.rand(batch, 3, h, w, generator=g).to(device)
    boxes = make_boxes(kind, batch, 4, h, w, g).to(device)
    sizes = [[h, w]] * batch
    sources = model._crop_sources(images, sizes)

    def crops():
        return model._crops(images, boxes, sizes, sources)

    def serial():
        with mock.patch.object(network, "crop_align", one_call):
            return model._crops(images, boxes, sizes, sources)

    ways = {"crop_align": crops, "one call": serial}
    diff = (crops() - serial()).abs().max().item()
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.reps):
        for key, fn in ways.items():
            times[key].append(timed(fn, device))
    source_hw = list(next(iter(sources.values()))[1].shape[-2:])
    side = float((boxes[..., 2:] - boxes[..., :2]).max())  # the longest box side, full-resolution pixels
    grid = math.ceil(side * source_hw[0] / h / 224)  # the most sample rows or columns per bin of any box
    return {"size": f"{h}x{w}", "source": "x".join(map(str, source_hw)), "batch": batch, "boxes": kind,
            "largest_grid": grid, **{f"{k.replace(' ', '_')}_ms": summary([t * 1e3 for t in v])
                                     for k, v in times.items()},
            "speedup": summary([a / b for a, b in zip(times["one call"], times["crop_align"], strict=True)]),
            "max_abs_diff": diff}


def in_step(backbone: str, size: tuple[int, int], batch: int, args, device: torch.device) -> dict:
    """The crops' milliseconds inside whole fusion inference steps, crop_align against one call, interleaved."""
    h, w = size
    torch.manual_seed(0)
    cfg = ModelConfig(variant="fusion", backbone=backbone, weights=args.weights)
    model = create_model(cfg, 2).to(device).to(memory_format=torch.channels_last).eval()
    images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    sizes = torch.tensor([[h, w]] * batch)
    crops: dict[str, list[float]] = {"crop_align": [], "one call": []}
    steps: dict[str, list[float]] = {"crop_align": [], "one call": []}

    def timing(fn, key):
        def wrapped(*a):
            sync(device)
            start = time.perf_counter()
            out = fn(*a)
            sync(device)
            crops[key].append((time.perf_counter() - start) * 1e3)
            return out

        return wrapped

    ways = (("crop_align", network.crop_align), ("one call", one_call))
    with torch.no_grad():
        for _ in range(args.reps + 2):
            for key, fn in ways:
                with mock.patch.object(network, "crop_align", timing(fn, key)):
                    steps[key].append(timed(lambda: model(images, sizes), device) * 1e3)
    crops = {k: v[2:] for k, v in crops.items()}  # the first two steps warm up
    steps = {k: v[2:] for k, v in steps.items()}
    return {"backbone": backbone, "size": f"{h}x{w}", "batch": batch,
            "crops_crop_align_ms": summary(crops["crop_align"]), "crops_one_call_ms": summary(crops["one call"]),
            "step_crop_align_ms": summary(steps["crop_align"]), "step_one_call_ms": summary(steps["one call"]),
            "step_speedup": summary([a / b for a, b in zip(steps["one call"], steps["crop_align"], strict=True)])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--cases", nargs="+", default=["460x700:2", "460x700:16", "1536x2048:1", "1536x2048:4"],
                   help="HxW:B of the full-resolution batch")
    p.add_argument("--boxes", nargs="+", default=["smallest", "random", "whole"],
                   choices=("smallest", "random", "whole"))
    p.add_argument("--in-step", metavar="BACKBONE", help="also time the crops inside fusion inference steps")
    p.add_argument("--weights", default="", help="local weights for --in-step's backbone")
    p.add_argument("--out", help="JSON file (a .md with the tables is written beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, reps=1)
    make_out_folder(p, args.out)
    device = parse_device(p, args.device)  # these checked before anything is timed
    for case in args.cases:
        if case.count(":") != 1 or not case.split(":")[1].isdigit() or int(case.split(":")[1]) < 1:
            p.error(f"--cases: '{case}' is not HxW:BATCH with a batch of 1 or more (e.g. 460x700:2)")
        parse_hw(p, "--cases", case.split(":")[0])
    if args.weights and not Path(args.weights).is_file():
        p.error(f"--weights: file '{args.weights}' not found")
    if args.in_step:  # an unknown backbone or weights that do not fit it: said now, not after the crops' table
        create_model(ModelConfig(variant="fusion", backbone=args.in_step, weights=args.weights), 2)
    allocator_as_the_cli()
    env = environment(device)
    rows = []
    for case in args.cases:
        hw, b = case.split(":")
        size = tuple(int(v) for v in hw.lower().split("x"))
        for kind in args.boxes:
            r = measure(size, int(b), kind, args, device)
            rows.append(r)
            print(f"{r['size']} B={r['batch']} {kind}: one call {r['one_call_ms']['median']:.1f} ms, crop_align "
                  f"{r['crop_align_ms']['median']:.1f} ms", flush=True)
    steps = []
    if args.in_step:
        for case in args.cases:
            hw, b = case.split(":")
            r = in_step(args.in_step, tuple(int(v) for v in hw.lower().split("x")), int(b), args, device)
            steps.append(r)
            print(f"{args.in_step} {r['size']} B={r['batch']} in a step: crops one call "
                  f"{r['crops_one_call_ms']['median']:.1f} ms, crop_align {r['crops_crop_align_ms']['median']:.1f} ms",
                  flush=True)
    env["loadavg_end"] = loadavg()

    def ratio(r):
        return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"

    table = markdown_table(
        ["input", "crop source", "B", "boxes", "most samples per bin side", "one call ms", "crop_align ms",
         "one call / crop_align", "max abs diff"],
        [[r["size"], r["source"], r["batch"], r["boxes"], r["largest_grid"], ms_spread(r["one_call_ms"]),
          ms_spread(r["crop_align_ms"]), ratio(r["speedup"]), f"{r['max_abs_diff']:.1e}"] for r in rows])
    if steps:
        table += "\n\nInside fusion inference steps (the boxes the model selects):\n\n" + markdown_table(
            ["backbone", "input", "B", "crops, one call ms", "crops, crop_align ms", "step, one call ms",
             "step, crop_align ms", "step one call / crop_align"],
            [[r["backbone"], r["size"], r["batch"], ms_spread(r["crops_one_call_ms"]),
              ms_spread(r["crops_crop_align_ms"]), ms_spread(r["step_one_call_ms"]), ms_spread(r["step_crop_align_ms"]),
              f"{r['step_speedup']['median']:.3f} ({r['step_speedup']['min']:.3f}-{r['step_speedup']['max']:.3f})"]
             for r in steps])
    save_report(args.out, {"environment": env, "rows": rows, "steps": steps}, f"{report_header(env)}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    run_script(main)  # an unknown --in-step backbone: one line
