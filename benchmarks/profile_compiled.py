"""Where a compiled fusion inference step's time goes: the step and its backbone passes, both compiled, timed
synchronised and host-only, and the profiler's device time per kernel family.

    TORCH_LOGS=perf_hints PYTHONPATH=src python benchmarks/profile_compiled.py --device cuda \
        --backbone resnet18 --size 460x700 --batch 16 64 --mode reduce-overhead --out OUT.json
    ... --batch 16 --labelling float int32     # the labelling's float atomics against int32 ones
    ... --batch 16 --labelling float cummax    # against scans, no scatters

``bench_model.py --ablate compile-ro`` gives the ratio; this says why. With ``TORCH_LOGS=perf_hints`` inductor
logs why it skipped CUDA graphs, if it did; ``graph_launches`` counts the replays the profiler saw (0 means no
CUDA graph ran). Kernels are grouped by name into families (convolution and matmul, triton-fused, roi_align,
antialiased resize, other) so the time the fusion step adds to its passes can be attributed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment,
    make_out_folder,
    markdown_table,
    median_ms,
    parse_device,
    parse_hw,
    report_header,
    require_counts,
    run_script,
    sync,
)

from finescope.config import ModelConfig  # noqa: E402
from finescope.engine import autocast  # noqa: E402
from finescope.models import create_model, selection  # noqa: E402

FAMILIES = (("roi_align", ("roi_align",)), ("antialiased resize", ("upsample_bilinear2d_aa", "_aa_")),
            ("convolution / matmul", ("conv", "gemm", "cutlass", "sm90", "wgmma", "xmma", "cudnn", "implicit")),
            ("triton (inductor)", ("triton",)))


def _rounds(binary: torch.Tensor, first_check: int, rounds: int | None, report: bool, eight: bool, run_max):
    """``selection._connected_components``' rounds (the same arguments, labels and convergence flag), with each
    round's maxima per horizontal and per vertical run taken by ``run_max(new, dim)`` ((B, 1, H, W) int64 labels,
    dim 3 = rows, 2 = columns)."""
    B, H, W = binary.shape
    mask = binary.unsqueeze(1)
    labels = (selection._grid(H, W, binary.device)[0] * mask.float()).long()  # (B, 1, H, W)
    converged = None
    for step in range(H * W if rounds is None else rounds):
        new = (F.max_pool2d(labels.float(), 3, 1, 1).long() * mask) if eight else labels  # exact below 2^24
        for dim in (3, 2):
            new = run_max(new, dim)
        if rounds is None and step + 1 >= first_check and torch.equal(new, labels):
            break
        if report and step + 1 == rounds:
            converged = (new == labels).all()
        labels = new
    labels = labels.view(B, H, W)
    return (labels, converged) if report else labels


def int32_components(binary: torch.Tensor, first_check: int = 4, rounds: int | None = None, report: bool = False,
                     eight: bool = True):
    """``selection._connected_components`` with the run maxima scattered as int32 (the labels are integers below
    2^24, exact either way): CUDA has a native atomicMax for int32, while a float ``amax`` scatter loops on
    compare-and-swap. The same labels; ``--labelling int32`` swaps it in for an A/B."""
    mask = binary.unsqueeze(1)
    runs = {dim: selection._run_ids(mask, dim).view(-1) for dim in (3, 2)}
    n = mask.numel() + 1

    def run_max(new: torch.Tensor, dim: int) -> torch.Tensor:
        ids = runs[dim]
        return new.int().new_zeros(n).scatter_reduce_(0, ids, new.int().view(-1), "amax")[ids].view_as(new).long()

    return _rounds(binary, first_check, rounds, report, eight, run_max)


def cummax_components(binary: torch.Tensor, first_check: int = 4, rounds: int | None = None, report: bool = False,
                      eight: bool = True):
    """``selection._connected_components`` without scatters: each run's maximum from two ``cummax`` scans along
    the row (or column), forward and backward, of the labels offset by their run's id (times more than any
    label), so that a scan never carries a value into the next run. No atomics (the scatters of the labelling
    took 0.34 ms of a compiled resnet18 step on the H200 at b61e5c7); the same labels; ``--labelling cummax``
    swaps it in for an A/B."""
    mask = binary.unsqueeze(1)
    big = binary.shape[1] * binary.shape[2] + 1  # above every label
    top = mask.numel()  # above every run id
    offsets = {}
    for dim in (3, 2):
        ids = selection._run_ids(mask, dim).long()
        offsets[dim] = (ids * big, (top - ids) * big * mask)  # runs later along dim: larger forward, smaller backward

    def run_max(new: torch.Tensor, dim: int) -> torch.Tensor:
        forward, backward = offsets[dim]
        ahead = (new + forward).cummax(dim).values - forward
        behind = (new + backward).flip(dim).cummax(dim).values.flip(dim) - backward
        return torch.maximum(ahead, behind) * mask

    return _rounds(binary, first_check, rounds, report, eight, run_max)


LABELLINGS = {"float": selection._connected_components, "int32": int32_components, "cummax": cummax_components}


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def kernel_profile(fn, device: torch.device, steps: int) -> dict:
    """Device milliseconds per step by kernel family, the top kernels, and CUDA-graph replays per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    by_family: dict[str, float] = defaultdict(float)
    kernels, launches = [], 0
    for e in prof.key_averages():
        if e.key in ("cudaGraphLaunch", "cuGraphLaunch"):
            launches += e.count
        dev_us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if dev_us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            by_family[family(e.key)] += dev_us / 1e3 / steps
            kernels.append((dev_us / 1e3 / steps, e.count / steps, e.key[:90]))
    kernels.sort(reverse=True)
    return {"device_ms_by_family": dict(by_family), "device_ms_total": sum(by_family.values()),
            "graph_launches": launches / steps, "top_kernels": kernels[:25]}


def profile_batch(args, batch: int, device: torch.device) -> dict:
    """Compile (static shapes) and time the fusion step and its passes at one batch size."""
    H, W = (int(v) for v in args.size.lower().split("x"))
    cfg = ModelConfig(variant="fusion", backbone=args.backbone)
    torch.manual_seed(0)
    model = create_model(cfg, 2).to(device).eval()
    trunk = create_model(cfg, 2).backbone.to(device).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, H, W, generator=g).to(device)
    sizes = torch.tensor([[H, W]] * batch)
    view = torch.rand(batch, 3, *model.view_size(H, W), device=device)
    crops = torch.rand(batch * cfg.num_crops, 3, cfg.local_size, cfg.local_size, device=device)
    if device.type == "cuda":  # as the trainer: fusion's input batch stays contiguous (engine.input_channels_last)
        model, trunk = (m.to(memory_format=torch.channels_last) for m in (model, trunk))
        view, crops = (t.contiguous(memory_format=torch.channels_last) for t in (view, crops))
    compile_mode = None if args.mode == "none" else args.mode
    fused = torch.compile(model, mode=compile_mode, dynamic=False) if compile_mode else model
    passes = torch.compile(trunk, mode=compile_mode, dynamic=False) if compile_mode else trunk
    graphs = compile_mode == "reduce-overhead"

    def fusion_step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), autocast(device, True):
            fused(images, sizes)

    def passes_step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), autocast(device, True):
            passes(view)
            passes(crops)

    result = {"batch": batch}
    for name, fn in (("fusion", fusion_step), ("passes", passes_step)):
        start = time.perf_counter()
        for _ in range(args.warmup):
            fn()
        sync(device)
        result[name] = {"warmup_s": time.perf_counter() - start, "step_ms": median_ms(fn, device, args.reps),
                        "host_ms": median_ms(fn, device, args.reps, synced=False),
                        **kernel_profile(fn, device, 5)}
    return result


def report(args, run: dict) -> str:
    """The step table, the kernel families and the fusion step's top kernels of one batch size."""
    lines = [f"{args.backbone} {args.size} batch {run['batch']} inference, compile mode {args.mode}, "
             f"{run['labelling']} labelling", "",
             markdown_table(
                 ["step", "ms (synced)", "host ms", "device kernel ms", "CUDA graph replays", "warm-up s"],
                 [[n, f"{r['step_ms']:.2f}", f"{r['host_ms']:.2f}", f"{r['device_ms_total']:.2f}",
                   f"{r['graph_launches']:.1f}", f"{r['warmup_s']:.0f}"] for n, r in ((n, run[n]) for n in ("fusion", "passes"))]),
             ""]
    fams = sorted({f for n in ("fusion", "passes") for f in run[n]["device_ms_by_family"]})
    lines.append(markdown_table(["kernel family", "fusion ms", "passes ms"],
                                [[f, *(f"{run[n]['device_ms_by_family'].get(f, 0.0):.3f}" for n in ("fusion", "passes"))]
                                 for f in fams]))
    lines.append("\nfusion, top kernels (device ms per step, calls per step, name)")
    lines += [f"  {ms:7.3f} {calls:5.1f}  {name}" for ms, calls, name in run["fusion"]["top_kernels"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", default="460x700")
    p.add_argument("--batch", type=int, nargs="+", default=[16],
                   help="batch sizes, profiled one after the other (the fixed costs of a step weigh less in a "
                        "larger batch)")
    p.add_argument("--mode", default="reduce-overhead", choices=("none", *torch._inductor.list_mode_options()),
                   help="torch.compile mode ('none' = eager)")
    p.add_argument("--labelling", nargs="+", default=["float"], choices=sorted(LABELLINGS),
                   help="component labellings to profile one after the other: float (finescope's), int32 "
                        "(int32_components, the same labels through integer atomics) or cummax (cummax_components, "
                        "the same labels from scans, no scatters)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", help="JSON file for the results, written after each batch size")
    args = p.parse_args(argv)
    require_counts(p, args, batch=1, warmup=0, reps=1)
    make_out_folder(p, args.out, md_beside=False)
    device = parse_device(p, args.device)
    parse_hw(p, "--size", args.size)
    results = {"environment": environment(device), "args": vars(args), "runs": []}
    print(report_header(results["environment"]) + "\n", flush=True)  # first: a run cut at its limit keeps it
    for labelling in args.labelling:
        selection._connected_components = LABELLINGS[labelling]
        try:
            for batch in args.batch:
                torch.compiler.reset()  # each (labelling, batch) compiled afresh
                run = {"labelling": labelling, **profile_batch(args, batch, device)}
                results["runs"].append(run)
                print(report(args, run), flush=True)
                if args.out:  # after every run: a run cut short keeps what it measured
                    Path(args.out).write_text(json.dumps(results, indent=1))
        finally:
            selection._connected_components = LABELLINGS["float"]
    return 0


if __name__ == "__main__":
    run_script(main)  # an unknown backbone: one line
