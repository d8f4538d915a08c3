"""Where a fusion step's time goes: each stage timed alone, host (enqueue) time against device time, and the
profiler's top operators.

    PYTHONPATH=src python benchmarks/profile_step.py --device cuda --backbones resnet18 mobilenet_v2 \
        --size 460x700 --batch 16 --out OUT.json

Stages (inference, no grad, bf16 autocast on CUDA, channels-last weights, as in ``bench_model.py``): the crop
source (the image resized for the crops, when its short side is over 3x the crop side), the global view
(resize + normalise, from the source for large images as the model does), the global backbone pass, the
attention pool and global head, box selection (on CUDA replayed as its CUDA graph, and op by op), the crops
(roi_align + normalise), the crop backbone pass. ``host_ms`` is the time the Python thread needs
to issue a whole step (no synchronisation at its end); when it is close to the synchronised ``step_ms`` the
step is bound by kernel launches, not by the GPU. ``in the step`` times the same stages where the model calls them,
inside whole inference steps (its own methods wrapped with a timer, a sync at each boundary on CUDA; the crops
there without their normalisation, and the attention and head not separated, so they fall in ``rest``): a stage
timed alone repeats on inputs and memory it has just used, and can cost less than in a step. ``round robin``
times the stages alone again, once per round in turn, so that each follows another stage as in a step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocator_as_the_cli,
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    median_ms,
    parse_device,
    parse_hw,
    parse_weights,
    report_header,
    require_counts,
    run_script,
    sync,
    timed,
)

from finescope.config import ModelConfig  # noqa: E402
from finescope.engine import autocast, compute_loss  # noqa: E402
from finescope.models import create_model, network  # noqa: E402
from finescope.models.selection import select_boxes  # noqa: E402
from finescope.trainer import fused_adamw  # noqa: E402


def profile_backbone(backbone: str, size: tuple[int, int], batch: int, device: torch.device, reps: int,
                     weights: str = "") -> dict:
    """Stage and step timings of one fusion model (``weights``: a state dict for its backbone)."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", backbone=backbone, weights=weights), 2).to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, *size, generator=g).to(device)
    sizes = torch.tensor([list(size)] * batch)
    labels = torch.randint(0, 2, (batch,), generator=g).to(device)
    # as the trainer: channels-last weights on every device; fusion's input batch stays contiguous
    model = model.to(memory_format=torch.channels_last)
    size_list = sizes.tolist()
    amp = True
    model.eval()
    with torch.no_grad(), autocast(device, amp):
        out = model(images, sizes)
        sources = model._crop_sources(images, size_list)
        view, _ = model._global_view(images, size_list, sources)
        fmap = model.backbone(view)
        boxes = out.boxes
        crops = model._normalise(model._crops(images, boxes, size_list, sources))
        valid, cell_px, dev_sizes, mask = model._grid_meta(size_list, [list(view.shape[-2:])] * batch,
                                                           view.shape[-2:], fmap.shape[-2:], device)
        attn = out.attention

        def select(graph: bool):
            return select_boxes(attn, valid, dev_sizes, cell_px, model.num_crops, model.threshold,
                                model.min_box_fraction, normalise=model.selection_norm, iou_threshold=model.peak_iou,
                                padded=mask is not None, graph=graph)

        def attention():  # the grid's numbers, the attention pool and the global head
            meta = model._grid_meta(size_list, [list(view.shape[-2:])] * batch, view.shape[-2:], fmap.shape[-2:],
                                    device)
            h_n = model.instance_proj(fmap.flatten(2).transpose(1, 2))
            return meta, model.global_head(model.attention_pool(h_n, None)[0])

        stages = {
            "crop source": lambda: model._crop_sources(images, size_list),  # the image itself below 3x the crops
            "global view": lambda: model._global_view(images, size_list, sources),  # as the model: from the source
            "global backbone": lambda: model.backbone(view),
            "attention and global head": attention,
            "select boxes": lambda: select(True),
            "select boxes op by op": lambda: select(False),  # without the CUDA graph (the same on a CPU)
            "crops": lambda: model._normalise(model._crops(images, boxes, size_list, sources)),
            "crop backbone": lambda: model.backbone(crops),
            "whole inference step": lambda: model(images, sizes),
        }
        for fn in stages.values():
            fn()
        rows = {name: {"device_ms": median_ms(fn, device, reps), "host_ms": median_ms(fn, device, reps, False)}
                for name, fn in stages.items()}
        passes = rows["global backbone"]["device_ms"] + rows["crop backbone"]["device_ms"]
        for name, ms in round_robin(stages, device, reps).items():
            rows[name]["round_robin_ms"] = ms
        for name, ms in in_step_stages(model, images, sizes, device, reps).items():
            rows.setdefault(name, {})["in_step_ms"] = ms

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adamw(device.type))

    def train_step() -> None:
        with autocast(device, amp):
            loss = compute_loss(model(images, sizes), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        train_step()
    rows["whole training step"] = {"device_ms": median_ms(train_step, device, reps),
                                   "host_ms": median_ms(train_step, device, reps, False)}

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            train_step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    launches = sum(e.count for e in prof.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                      "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    return {"backbone": backbone, "stages": rows, "kernel_launches_per_train_step": launches / 3,
            "inference_step_over_passes": rows["whole inference step"]["device_ms"] / passes,
            "profile_table": table}


def round_robin(stages: dict, device: torch.device, reps: int) -> dict:
    """Median ms of each stage timed once per round, the stages in turn (``reps`` rounds): each follows another
    stage, as in a step, rather than itself."""
    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(reps):
        for name, fn in stages.items():
            times[name].append(timed(fn, device) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def in_step_stages(model, images: torch.Tensor, sizes: torch.Tensor, device: torch.device, reps: int) -> dict:
    """Median ms of each stage where the model runs it, over ``reps`` whole inference steps (its methods wrapped
    with a timer; a sync at each boundary on CUDA), the steps themselves with the timers, and ``rest``: the step
    less its timed stages (the attention pool, the heads, the normalisation of the crops, Python)."""
    times: dict[str, list[float]] = collections.defaultdict(list)
    reader = model.crop_backbone if model.crop_backbone is not None else model.backbone
    calls = [0]

    def timer(name, fn):
        def wrapped(*a, **k):
            if name is None:  # the shared backbone: its first call in a step reads the view, the second the crops
                label = "global backbone" if calls[0] % 2 == 0 or reader is not model.backbone else "crop backbone"
                calls[0] += 1
            else:
                label = name
            sync(device)
            start = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            times[label].append((time.perf_counter() - start) * 1e3)
            return out

        return wrapped

    patches = [mock.patch.object(model, "_crop_sources", timer("crop source", model._crop_sources)),
               mock.patch.object(model, "_global_view", timer("global view", model._global_view)),
               mock.patch.object(model.backbone, "forward", timer(None, model.backbone.forward)),
               mock.patch.object(network, "select_boxes_deferred",
                                 timer("select boxes", network.select_boxes_deferred)),
               mock.patch.object(model, "_crops", timer("crops", model._crops))]
    if reader is not model.backbone:
        patches.append(mock.patch.object(reader, "forward", timer("crop backbone", reader.forward)))
    with torch.no_grad(), autocast(device, True), contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        model(images, sizes)  # warm-up, not counted
        times.clear()
        calls[0] = 0
        for _ in range(reps):
            times["whole inference step"].append(timed(lambda: model(images, sizes), device) * 1e3)
    steps = times["whole inference step"]
    rest = [step - sum(v[i] for k, v in times.items() if k != "whole inference step") for i, step in enumerate(steps)]
    return {**{k: statistics.median(v) for k, v in times.items()}, "rest": statistics.median(rest)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--size", default="460x700")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--weights", nargs="*", default=[], metavar="BACKBONE=PATH",
                   help="state dicts for backbones, e.g. mobilenet_v2=../shared/weights/mobilenet_v2-b0353104.pth "
                        "(the boxes, and so the crops' cost, follow the attention they give)")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    require_counts(p, args, batch=1, reps=1)
    make_out_folder(p, args.out, md_beside=False)
    device = parse_device(p, args.device)  # these three checked before the first backbone is timed
    size = parse_hw(p, "--size", args.size)
    weights = parse_weights(p, args.weights)
    allocator_as_the_cli()
    results = {"environment": environment(device), "size": args.size, "batch": args.batch,
               "backbones": [profile_backbone(b, size, args.batch, device, args.reps, weights.get(b, ""))
                             for b in args.backbones]}
    results["environment"]["loadavg_end"] = loadavg()
    print(report_header(results["environment"]))  # what the tables below were measured on, and how
    for r in results["backbones"]:
        print(f"\n## {r['backbone']} {args.size} batch {args.batch}: kernel launches per training step "
              f"{r['kernel_launches_per_train_step']:.0f}; inference step / the two backbone passes (stages "
              f"timed alone) {r['inference_step_over_passes']:.3f}\n")
        def ms(v: dict, key: str) -> str:
            return f"{v[key]:.2f}" if key in v else "-"

        print(markdown_table(["stage", "device ms", "host ms", "round robin ms", "in the step ms"],
                             [[k, ms(v, "device_ms"), ms(v, "host_ms"), ms(v, "round_robin_ms"), ms(v, "in_step_ms")]
                              for k, v in r["stages"].items()]))
        print(r["profile_table"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    run_script(main)  # an unknown backbone, unreadable weights: one line
