"""The antialiased resizes of a fusion step on the CPU: ATen's ``F.interpolate`` against ``resize_aa`` (rows first,
as one ``embedding_bag``; ``finescope.models.resize``), timed interleaved, with the largest absolute difference.

    PYTHONPATH=src python benchmarks/resize_cost.py [--reps 20] [--out OUT.json]

Cases (batch x input -> output), the resizes a step makes with the default sizes (global short side 224,
224-pixel crops, boxes of at least a third of the short side):
- the crop source of a 1536x2048 and a 2048x2048 image, and the view resized from the first one's source;
- the global view of a batch of 16 BreakHis images (460x700, no crop source at that size) and of 16 slices of a
  padded batch (the rows of a 460x700 image inside 512x768);
- the view of 4 DeFungi-sized images (500x400 -> 280x224).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocator_as_the_cli,
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    ms_spread,
    report_header,
    require_counts,
    save_report,
    summary,
    timed,
)

from finescope.models.resize import resize_aa  # noqa: E402

# name, batch, input (h, w), the stored tensor's (h, w) when the input is a slice of a padded batch, output (h, w)
CASES = [
    ("crop source 1536x2048", 1, (1536, 2048), None, (672, 896)),
    ("crop source 2048x2048", 1, (2048, 2048), None, (672, 672)),
    ("view from the 672x896 source", 1, (672, 896), None, (224, 299)),
    ("view, 16 BreakHis images", 16, (460, 700), None, (224, 341)),
    ("view, 16 BreakHis images in a padded batch", 16, (460, 700), (512, 768), (224, 341)),
    ("view, 4 DeFungi-sized images", 4, (500, 400), None, (280, 224)),
]


def measure(case: tuple, reps: int) -> dict:
    name, batch, (h, w), stored, size = case
    g = torch.Generator().manual_seed(0)
    full = torch.rand(batch, 3, *(stored or (h, w)), generator=g)
    x = full[:, :, :h, :w]
    aten = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    times: dict[str, list[float]] = {"aten": [], "resize_aa": []}
    for _ in range(reps + 1):  # interleaved; the first round is a warm-up
        times["aten"].append(timed(lambda: F.interpolate(x, size=size, mode="bilinear", antialias=True,
                                                         align_corners=False), torch.device("cpu")) * 1e3)
        times["resize_aa"].append(timed(lambda: resize_aa(x, size), torch.device("cpu")) * 1e3)
    ratios = [a / b for a, b in zip(times["aten"][1:], times["resize_aa"][1:], strict=True)]
    return {"case": name, "batch": batch, "input": f"{h}x{w}", "stored": "x".join(map(str, stored)) if stored else "",
            "output": "x".join(map(str, size)), "aten_ms": summary(times["aten"][1:]),
            "resize_aa_ms": summary(times["resize_aa"][1:]), "aten_over_resize_aa": summary(ratios),
            "max_abs_diff": float((resize_aa(x, size) - aten).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", help="JSON file (a .md with the table is written beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, reps=1)
    make_out_folder(p, args.out)
    allocator_as_the_cli()
    env = environment(torch.device("cpu"))
    rows = [measure(case, args.reps) for case in CASES]
    env["loadavg_end"] = loadavg()
    table = markdown_table(
        ["case", "B", "input", "output", "F.interpolate ms", "resize_aa ms", "F.interpolate / resize_aa",
         "max abs diff"],
        [[r["case"], r["batch"], r["input"] + (f" in {r['stored']}" if r["stored"] else ""), r["output"],
          ms_spread(r["aten_ms"]), ms_spread(r["resize_aa_ms"]),
          f"{r['aten_over_resize_aa']['median']:.2f} ({r['aten_over_resize_aa']['min']:.2f}-"
          f"{r['aten_over_resize_aa']['max']:.2f})", f"{r['max_abs_diff']:.1e}"] for r in rows])
    save_report(args.out, {"environment": env, "rows": rows}, f"{report_header(env)}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
