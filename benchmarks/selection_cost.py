"""Cost of box selection alone: milliseconds per call, tensor operations per call and convergence tests (each a
host-device sync on CUDA), for B attention maps of h x w cells.

    PYTHONPATH=src python benchmarks/selection_cost.py [--device cpu] [--batch 16] [--grid 7x11] [--reps 50]
        [--rounds-batches 100] [--graph on off] [--components exact grid]

On a GPU this step is bound by the host issuing kernels, so the operation count is what matters there; on a CPU
the time is the arithmetic too. Since 8fcd74d a CPU labels the components with ``scipy.ndimage.label`` in one
call: no rounds and no convergence test there, so a CPU run counts fewer operations than a GPU's. Maps: smooth
random maps (bilinear from a 3x4 grid, like a trained model's attention) and noisy ones (a softmax over uniform
noise, like an untrained model's).

Also, over ``--rounds-batches`` batches of each kind (other seeds): the rounds that the iterative labelling (a
GPU's) needs for a batch (the last one confirming that nothing changes), as a histogram, and the share of
batches that converge within ``GRAPH_ROUNDS``, the rounds a CUDA graph of the selection runs (the others select
again without it). On CUDA ``--graph on off`` times the selection with and without its CUDA graph
(interleaved); the operation count is the eager one. ``--components`` measures each way of finding the
components (``model.selection_components``; a commit from before it has only the grid's).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, parse_device, parse_hw, require_counts, sync  # noqa: E402

from finescope.models import selection  # noqa: E402
from finescope.models.selection import select_boxes  # noqa: E402

# Operations that only make a view or change nothing: no kernel on a GPU.
VIEWS = {"aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::view", "aten::view_as", "aten::select",
         "aten::expand", "aten::expand_as", "aten::reshape", "aten::transpose", "aten::flatten", "aten::t",
         "aten::unbind", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::contiguous",
         "aten::_unsafe_view", "aten::as_strided", "aten::permute", "aten::split", "aten::narrow", "aten::to"}


def maps(kind: str, batch: int, h: int, w: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "smooth":
        attn = F.interpolate(torch.rand(batch, 1, 3, 4, generator=g), size=(h, w), mode="bilinear")[:, 0]
        attn = attn / attn.sum(dim=(1, 2), keepdim=True)
    else:
        attn = torch.rand(batch, h * w, generator=g).softmax(dim=1).view(batch, h, w)
    return attn.to(device)


def inputs(attn: torch.Tensor) -> tuple:
    """select_boxes' arguments for maps of a 460x700 image, every cell valid."""
    B, h, w = attn.shape
    device = attn.device
    return (attn, torch.tensor([[h, w]] * B, device=device), torch.tensor([[460, 700]] * B, device=device),
            torch.tensor([[460 / h, 700 / w]] * B, device=device), 4)


def components_options(args) -> list[dict]:
    """select_boxes' keyword for each ``--components`` asked, or one empty one: a commit from before the option."""
    if "components" not in inspect.signature(select_boxes).parameters:
        return [{}]
    return [{"components": c} for c in dict.fromkeys(args.components)]


def measure(kind: str, args, device: torch.device, way: dict) -> list[list]:
    """Rows (maps, components, graph, ms per call, operations, syncs): one per ``--graph`` setting on CUDA, one on
    the CPU."""
    h, w = (int(v) for v in args.grid.split("x"))
    call_args = inputs(maps(kind, args.batch, h, w, device))
    params = inspect.signature(select_boxes).parameters
    extra = {"padded": False, **way} if "padded" in params else dict(way)
    graphs = args.graph if device.type == "cuda" and "graph" in params else ["off"]
    calls = {g: (lambda g=g: select_boxes(*call_args, **extra, **({"graph": g == "on"} if "graph" in params else {})))
             for g in graphs}
    for call in calls.values():
        call()
    with torch.profiler.profile() as prof:
        select_boxes(*call_args, **extra, **({"graph": False} if "graph" in params else {}))
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    ops = Counter(e.name for e in top if e.name not in VIEWS)
    times = {g: [] for g in graphs}
    for _ in range(args.reps):
        for g, call in calls.items():
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            times[g].append((time.perf_counter() - start) * 1e3)
    return [[kind, way.get("components", "grid"), g, f"{statistics.median(times[g]):.3f}", sum(ops.values()),
             ops.get("aten::equal", 0)] for g in graphs]


def rounds_needed(kind: str, args, device: torch.device, way: dict) -> list:
    """How many labelling rounds ``--rounds-batches`` batches of ``kind`` maps need, with the confirming one."""
    h, w = (int(v) for v in args.grid.split("x"))
    needed = Counter()
    for seed in range(1, args.rounds_batches + 1):
        attn, valid, sizes, cell, k = inputs(maps(kind, args.batch, h, w, device, seed))
        for rounds in range(1, 16 * h * w + 2):  # a fine grid of 16 h w cells converges within 16 h w + 1 rounds
            if bool(selection._select(attn, valid, sizes, cell, k, 0.5, 1 / 3, 4, 0.5, "minmax", False,
                                      graph_rounds=rounds, **way)[2]):
                break
        needed[rounds] += 1
    within = sum(n for r, n in needed.items() if r <= selection.GRAPH_ROUNDS) / args.rounds_batches
    return [kind, way.get("components", "grid"), " ".join(f"{r}:{n}" for r, n in sorted(needed.items())),
            f"{within:.2f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grid", default="7x11", help="h x w feature cells (7x11: resnet at BreakHis size)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--rounds-batches", type=int, default=100, help="batches for the rounds histogram (0 = none)")
    p.add_argument("--graph", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="on CUDA: time the selection with its CUDA graph, without, or both")
    p.add_argument("--components", nargs="+", default=["exact", "grid"], choices=["exact", "grid"],
                   help="how the components are found (model.selection_components): each is measured")
    args = p.parse_args(argv)
    require_counts(p, args, batch=1, reps=1, rounds_batches=0)
    device = parse_device(p, args.device)
    parse_hw(p, "--grid", args.grid)
    env = environment(device)
    ways = components_options(args)
    rows = [row for kind in ("smooth", "noisy") for way in ways for row in measure(kind, args, device, way)]
    print(f"device {env.get('gpu', env['cpu'])} ({env['device']}), torch {env['torch']}, commit {env['commit']}, "
          f"{args.batch} maps of {args.grid} cells, K=4\n`{env['command']}`\n")
    print(markdown_table(["maps", "components", "CUDA graph", "ms per call (median)", "tensor operations (eager)",
                          "convergence tests (syncs, eager)"], rows))
    if args.rounds_batches:
        print(f"\nLabelling rounds per batch of {args.batch} (rounds:batches; the last round confirms), over "
              f"{args.rounds_batches} batches; a CUDA graph runs {selection.GRAPH_ROUNDS}:\n")
        print(markdown_table(["maps", "components", "rounds needed", f"share within {selection.GRAPH_ROUNDS}"],
                             [rounds_needed(kind, args, device, way) for kind in ("smooth", "noisy") for way in ways]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
