"""What a batch shape the process has not met before costs a fusion training step, and why.

On the H200 at b61e5c7 the trainer's first epoch took 20 s, of which 19.5 s were its two steps of a new shape
(the first batch, and the last one of 4 images), against 59 ms for a step of a known shape
(``benchmarks/results/gpu_h200_b61e5c7/first_epoch.json``). This times, per backbone and autocast precision,
training steps of a fresh model as the trainer runs it (channels-last, fused AdamW, gradient clipping):

1. the model's first step (batch ``--batch``; for the first run also the process's first), then the same
   shape twice again;
2. a new batch size as it comes;
3. a new batch size with cuDNN switched off (``torch.backends.cudnn.enabled = False``), then that size again:
   if the first is cheap, the cost is cuDNN's per-shape set-up of its convolutions (a public report,
   NVIDIA/cudnn-frontend#1066, has cuDNN 9.10 compile execution plans at run time for depthwise convolutions,
   about 1.5 s more for one model's first inference there), and the second says what a step pays without cuDNN;
4. a new batch size with the selection's CUDA graph off (``model.selection_graph = False``): if this one is
   cheap, the cost is the graph's capture;
5. a new batch size under ``torch.profiler`` (host activity only), whose operations with the most host time
   are listed;
6. the median of 5 steps of a known shape (what the weights' layout costs or saves once warm), and an inference
   step (no gradients) of a new batch size, then that size again.

``--runs BACKBONE:AMP:contiguous`` keeps the weights (so the activations) contiguous instead of channels-last: on
CUDA, PyTorch sends every depthwise convolution of channels-last activations to cuDNN, whatever the precision.
``cl-dw`` and ``contiguous-dw`` run the depthwise convolutions (forward and backward) with cuDNN switched off and
leave the rest to cuDNN: at 2d64d1b on the H200 a new shape cost mobilenet_v2 in fp16 8-14 s, all of it in cuDNN
(0.2 s with cuDNN off for the whole step), and these say whether the depthwise convolutions are where it goes:
at e36b251 they were (a new batch size 86 ms against 11 s, a known step 83 against 61 ms), and the model runs
them so with ``train.cudnn_depthwise: false`` (:func:`finescope.models.backbones.depthwise_without_cudnn`).

    PYTHONPATH=src python benchmarks/new_shape_cost.py --device cuda --out /tmp/new_shape.json

Each step is timed alone, the device synchronised before and after, with the process's kernel time and minor
page faults in it (``getrusage``): a step that touches memory the process never had (the first ones, as the
heap grows to the step's peak) pays for each page there, and on a virtual machine that can take seconds. On a
CPU it runs too (no cuDNN there; the test suite runs it with the tiny backbone).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocator_as_the_cli,
    environment,
    make_out_folder,
    markdown_table,
    parse_device,
    parse_hw,
    require_counts,
    run_script,
    save_report,
    sync,
)

from finescope.config import ModelConfig  # noqa: E402
from finescope.engine import autocast, compute_loss, make_grad_scaler  # noqa: E402
from finescope.models import create_model  # noqa: E402
from finescope.models.backbones import depthwise_without_cudnn  # noqa: E402
from finescope.trainer import fused_adamw  # noqa: E402


def timed(fn, device: torch.device, host: dict | None = None) -> float:
    """Milliseconds of ``fn()``, the device synchronised before and after. With ``host``, also the process's
    kernel time in it (``system_s``) and its minor page faults (``page_faults``, each a page of memory touched
    for the first time): written there."""
    sync(device)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    sync(device)
    ms = (time.perf_counter() - start) * 1e3
    if host is not None:
        after = resource.getrusage(resource.RUSAGE_SELF)
        host.update(system_s=after.ru_stime - before.ru_stime, page_faults=after.ru_minflt - before.ru_minflt)
    return ms


def train_step(model, opt, scaler, batch: int, size: tuple[int, int], device: torch.device, amp: str,
               host: dict | None = None) -> float:
    """Milliseconds of one training step on a fresh random batch of ``batch`` images of ``size`` (``host``: as
    :func:`timed`)."""
    images = torch.rand(batch, 3, *size, device=device)
    sizes = torch.tensor([list(size)] * batch)
    labels = torch.randint(0, 2, (batch,), device=device)

    def step():
        with autocast(device, amp):
            out = model(images, sizes)
            loss = compute_loss(out, labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    return timed(step, device, host)


def top_host_ops(fn, n: int) -> list[dict]:
    """Run ``fn`` under the profiler (host activity) and return the ``n`` operations with the most self host
    time, with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [{"name": e.key, "self_host_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events]


def infer_step(model, batch: int, size: tuple[int, int], device: torch.device, amp: str, host: dict) -> float:
    """Milliseconds of one inference step (no gradients) on a fresh random batch (``host``: as :func:`timed`)."""
    images = torch.rand(batch, 3, *size, device=device)
    sizes = torch.tensor([list(size)] * batch)

    def step():
        with torch.no_grad(), autocast(device, amp):
            model(images, sizes)

    return timed(step, device, host)


def measure(backbone: str, amp: str, layout: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(variant="fusion", backbone=backbone, global_size=args.global_size, local_size=args.local_size)
    model = create_model(cfg, 2).to(device).train()
    if layout.startswith("cl"):  # as the trainer with train.channels_last (its default)
        model = model.to(memory_format=torch.channels_last)
    if layout.endswith("-dw"):
        depthwise_without_cudnn(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adamw(device.type))
    scaler = make_grad_scaler(device, amp)
    size, b = args.size, args.batch

    host: dict[str, dict] = {}

    def step(batch: int, name: str) -> float:
        host[name] = {}
        return train_step(model, opt, scaler, batch, size, device, amp, host[name])

    steps = {name: step(n, name) for name, n in
             [("first step", b), ("same shape again", b), ("third step", b), ("new batch size", b - 12)]}
    cudnn = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        steps["new batch size, cuDNN off"] = step(b - 8, "new batch size, cuDNN off")
        # what a step pays without cuDNN once warm
        steps["that size again, cuDNN off"] = step(b - 8, "that size again, cuDNN off")
    finally:
        torch.backends.cudnn.enabled = cudnn
    model.selection_graph = False
    steps["new batch size, selection graph off"] = step(b - 4, "new batch size, selection graph off")
    model.selection_graph = True
    timed: list[float] = []
    ops = top_host_ops(lambda: timed.append(step(b - 10, "new batch size, profiled")), args.top)
    steps["new batch size, profiled"] = timed[0]
    steps["that size again"] = step(b - 10, "that size again")
    # a known shape once warm, the median of 5 steps: what the layout costs or saves in steady training
    host["known shape, median of 5"] = {}
    steps["known shape, median of 5"] = statistics.median(
        train_step(model, opt, scaler, b, size, device, amp, host["known shape, median of 5"]) for _ in range(5))
    model.eval()
    for name, n in [("inference, new batch size", b - 2), ("inference, that size again", b - 2)]:
        host[name] = {}
        steps[name] = infer_step(model, n, size, device, amp, host[name])
    return {"backbone": backbone, "amp": amp, "layout": layout, "steps_ms": steps, "host": host,
            "top_host_ops": ops}


def report(result: dict) -> str:
    env = result["environment"]
    lines = [f"device {env.get('gpu', env['cpu'])} ({env['device']}), torch {env['torch']}, commit {env['commit']}",
             f"`{env['command']}`", ""]
    names = list(result["runs"][0]["steps_ms"])
    lines.append(markdown_table(["backbone", "autocast", "weights", *names],
                                [[r["backbone"], r["amp"], LAYOUTS[r["layout"]],
                                  *(f"{r['steps_ms'][k]:.0f}" for k in names)] for r in result["runs"]]))
    lines += ["", "Kernel time (s) and minor page faults (thousands) of the process in each step: memory touched for the "
              "first time is paid there", "",
              markdown_table(["backbone", "autocast", "weights", *names],
                             [[r["backbone"], r["amp"], LAYOUTS[r["layout"]], *(f"{r['host'][k]['system_s']:.2f} s, "
                                                          f"{r['host'][k]['page_faults'] / 1e3:.0f}k" for k in names)]
                              for r in result["runs"]])]
    for r in result["runs"]:
        lines += ["", f"{r['backbone']} {r['amp']} {LAYOUTS[r['layout']]}, the profiled new-shape step: operations with the most host time",
                  "", markdown_table(["operation", "self host ms", "calls"],
                                     [[o["name"], f"{o['self_host_ms']:.1f}", o["calls"]] for o in r["top_host_ops"]])]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", nargs="+", default=["mobilenet_v2:fp16", "resnet18:bf16"],
                   help="BACKBONE:AMP[:LAYOUT] (AMP as train.amp: fp16, bf16 or off; LAYOUT cl, the default, for "
                        "channels-last weights as train.channels_last, or contiguous; cl-dw or contiguous-dw run "
                        "the depthwise convolutions with cuDNN off), each a fresh model in turn")
    p.add_argument("--size", default="460x700", help="HxW of the images")
    p.add_argument("--batch", type=int, default=16,
                   help="the first batch size B; the new ones are B-12, B-8, B-4 and B-10 (B must be over 12)")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=224)
    p.add_argument("--top", type=int, default=8, help="operations listed per profiled step")
    p.add_argument("--out", help="JSON file for the results (a .md beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, global_size=1, local_size=1, top=0)
    make_out_folder(p, args.out)
    if args.batch <= 12:
        p.error("--batch must be over 12: the new batch sizes are B-12, B-8, B-4 and B-10")
    args.size = parse_hw(p, "--size", args.size)  # these checked before the first run is timed
    parse_device(p, args.device)
    args.runs = [parse_run(p, pair) for pair in args.runs]
    for backbone, _, layout in args.runs:
        cfg = ModelConfig(variant="fusion", backbone=backbone, global_size=args.global_size,
                          local_size=args.local_size)
        if layout.endswith("-dw") and not depthwise_without_cudnn(create_model(cfg, 2)):
            p.error(f"--runs: {backbone} has no depthwise convolution for LAYOUT {layout}")
    return args


LAYOUTS = {"cl": "channels-last", "contiguous": "contiguous",
           "cl-dw": "channels-last, depthwise without cuDNN", "contiguous-dw": "contiguous, depthwise without cuDNN"}


def parse_run(p: argparse.ArgumentParser, pair: str) -> tuple[str, str, str]:
    """``BACKBONE:AMP[:LAYOUT]`` as (backbone, amp, layout), or a one-line usage error."""
    parts = pair.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("fp16", "bf16", "off") or (len(parts) == 3 and
                                                                               parts[2] not in LAYOUTS):
        p.error(f"--runs: '{pair}' is not BACKBONE:AMP[:LAYOUT] (AMP fp16, bf16 or off; LAYOUT "
                f"{', '.join(LAYOUTS)})")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else "cl"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    allocator_as_the_cli()
    device = torch.device(args.device)
    result = {"environment": environment(device), "settings": {k: v for k, v in vars(args).items()}, "runs": []}
    for backbone, amp, layout in args.runs:
        result["runs"].append(measure(backbone, amp, layout, args, device))
        print(f"{backbone}:{amp}:{layout}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in result["runs"][-1]["steps_ms"].items()), flush=True)
        save_report(args.out, result, report(result))  # after each run: a time limit keeps the runs done
    return result


if __name__ == "__main__":
    run_script(main)  # an unknown backbone: one line
