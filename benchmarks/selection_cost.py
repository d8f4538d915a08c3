"""Cost of box selection alone: milliseconds per call, tensor operations per call and convergence tests (each a
host-device sync on CUDA), for B attention maps of h x w cells.

    PYTHONPATH=src python benchmarks/selection_cost.py [--device cpu] [--batch 16] [--grid 7x11] [--reps 50]

On a GPU this step is bound by the host issuing kernels, so the operation count is what matters there; on a CPU
the time is the arithmetic too. Maps: smooth random maps (bilinear from a 3x4 grid, like a trained model's
attention) and noisy ones (a softmax over uniform noise, like an untrained model's).
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
from common import environment, markdown_table, sync  # noqa: E402

from finescope.models.selection import select_boxes  # noqa: E402

# Operations that only make a view or change nothing: no kernel on a GPU.
VIEWS = {"aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::view", "aten::view_as", "aten::select",
         "aten::expand", "aten::expand_as", "aten::reshape", "aten::transpose", "aten::flatten", "aten::t",
         "aten::unbind", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::contiguous",
         "aten::_unsafe_view", "aten::as_strided", "aten::permute", "aten::split", "aten::narrow", "aten::to"}


def maps(kind: str, batch: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "smooth":
        attn = F.interpolate(torch.rand(batch, 1, 3, 4, generator=g), size=(h, w), mode="bilinear")[:, 0]
        attn = attn / attn.sum(dim=(1, 2), keepdim=True)
    else:
        attn = torch.rand(batch, h * w, generator=g).softmax(dim=1).view(batch, h, w)
    return attn.to(device)


def measure(kind: str, args, device: torch.device) -> list:
    h, w = (int(v) for v in args.grid.split("x"))
    attn = maps(kind, args.batch, h, w, device)
    valid = torch.tensor([[h, w]] * args.batch, device=device)
    sizes = torch.tensor([[460, 700]] * args.batch, device=device)
    cell = torch.tensor([[460 / h, 700 / w]] * args.batch, device=device)
    extra = {"padded": False} if "padded" in inspect.signature(select_boxes).parameters else {}

    def call():
        return select_boxes(attn, valid, sizes, cell, 4, **extra)

    call()
    with torch.profiler.profile() as prof:
        call()
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    ops = Counter(e.name for e in top if e.name not in VIEWS)
    times = []
    for _ in range(args.reps):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return [kind, f"{statistics.median(times):.2f}", sum(ops.values()), ops.get("aten::equal", 0)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grid", default="7x11", help="h x w feature cells (7x11: resnet at BreakHis size)")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    rows = [measure(kind, args, device) for kind in ("smooth", "noisy")]
    print(f"device {env.get('gpu', env['cpu'])} ({env['device']}), torch {env['torch']}, commit {env['commit']}, "
          f"{args.batch} maps of {args.grid} cells, K=4\n`{env['command']}`\n")
    print(markdown_table(["maps", "ms per call (median)", "tensor operations", "convergence tests (syncs)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
