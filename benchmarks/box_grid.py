"""How many of the smallest boxes roi_align reads at one sample per bin, with and without ``snap_boxes``.

A box of the smallest side spans ``local_size`` pixels of its crop source only up to float rounding, and
roi_align's adaptive grid takes ``ceil(side / local_size)`` samples per bin. For each image size: random boxes
grown to the smallest side by the selection's own arithmetic (``_grow_and_clip``), scaled to the crop source as
``FineScopeNet._crops`` scales them, and counted by the samples per bin roi_align takes, before and after
``finescope.models.align.snap_boxes``; and how many of them ``crop_align`` cuts as shifts on the CPU.

    PYTHONPATH=src python benchmarks/box_grid.py --out benchmarks/results/cpu_box_grid.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    parse_hw,
    report_header,
    require_counts,
    save_report,
)

from finescope.config import ModelConfig  # noqa: E402
from finescope.models import align, create_model  # noqa: E402
from finescope.models.selection import _grow_and_clip  # noqa: E402

SIZES = ["1536x2048", "1944x2592", "2048x2048", "1200x1600", "3000x4000", "1040x1388", "460x700"]


def count(model, h: int, w: int, boxes: int, seed: int) -> dict:
    """Fractions of ``boxes`` random smallest boxes of an ``h`` x ``w`` image read at one sample per bin."""
    L = model.local_size
    s = model.crop_scale(h, w)
    sh, sw = (max(1, round(h * s)), max(1, round(w * s))) if s < 1 else (h, w)
    g = torch.Generator().manual_seed(seed)
    side = model.min_box_fraction * min(h, w)
    centre = (torch.rand(1, boxes, 2, generator=g) * torch.tensor([w, h])).transpose(1, 2)  # (1, 2, boxes) x, y
    lo, hi = _grow_and_clip(centre, centre, torch.tensor([side]), torch.tensor([[[w], [h]]], dtype=torch.float32))
    scale = torch.tensor([sw / w, sh / h] * 2)
    rois = torch.cat([torch.zeros(boxes, 1), torch.cat([lo, hi], dim=1)[0].t() * scale], dim=1)

    def one_sample(r: torch.Tensor) -> float:
        ok = (align._grid(r[:, 2], r[:, 4], L) == 1) & (align._grid(r[:, 1], r[:, 3], L) == 1)
        return float(ok.float().mean())

    snapped = align.snap_boxes(rois, L)
    unit_y = align._unit_taps(snapped[:, 2], snapped[:, 4], L, sh)[-1]
    unit = unit_y & align._unit_taps(snapped[:, 1], snapped[:, 3], L, sw)[-1]
    return {"size": f"{h}x{w}", "source": f"{sh}x{sw}", "side_px": (snapped[:, 3] - snapped[:, 1]).max().item(),
            "one_sample_before": one_sample(rois), "one_sample_after": one_sample(snapped),
            "shifts": float(unit.float().mean())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=SIZES, help="HxW of the full-resolution images")
    p.add_argument("--boxes", type=int, default=1000, help="random smallest boxes per size")
    p.add_argument("--local-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file (a .md table beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, boxes=1, local_size=1)
    make_out_folder(p, args.out)
    sizes = [parse_hw(p, "--sizes", size) for size in args.sizes]
    model = create_model(ModelConfig(variant="fusion", backbone="tiny", local_size=args.local_size), 2)
    rows = [count(model, *size, args.boxes, args.seed) for size in sizes]
    env = environment(torch.device("cpu"))
    env["loadavg_end"] = loadavg()
    table = markdown_table(
        ["image", "crop source", "snapped side px", "one sample per bin, before", "after snap_boxes",
         "cut as shifts on the CPU"],
        [[r["size"], r["source"], f"{r['side_px']:g}", f"{r['one_sample_before']:.0%}", f"{r['one_sample_after']:.0%}",
          f"{r['shifts']:.0%}"] for r in rows])
    save_report(args.out, {"environment": env, "settings": vars(args), "rows": rows},
                f"{report_header(env)}\n\n{table}\n")
    return {"rows": rows}


if __name__ == "__main__":
    main()
