"""How much the boxes depend on the selection's grid: ``model.selection_upsample`` points per feature cell.

method.md thresholds the attention map upsampled to the whole image; finescope thresholds it on a grid of a few
points per feature cell (``model.selection_upsample``), whose cost does not grow with the image. This script
takes a trained model's attention maps of real images (one forward pass each), selects the boxes from them on
each grid asked for, and compares each grid's boxes with those of the finest one (the last of ``--upsample``;
at least as many points per cell as a cell has pixels comes closest to method.md): per box, the IoU with the
best-matching box of the finest grid. It also times the selection of a batch of those maps on each grid.
With ``--components grid exact`` it does so for both ways of finding the components
(``model.selection_components``): on the grid itself, or exactly, on the bilinear map (the grid then holds only
the components' masses and the fallback peaks). ``--peaks grid nodes`` does so for both places the fallback peaks
may be centred (``model.selection_peaks``): the grid's points, or those and the feature cells' centres. The
reference is always the finest grid's own components and points.

    PYTHONPATH=src python benchmarks/selection_grid.py runs/demo/fusion runs/demo/data --limit 120 \\
        --upsample 4 8 16 32 64 --components grid exact --peaks grid nodes \\
        --out benchmarks/results/cpu_selection_grid_demo.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    median_ms,
    parse_device,
    report_header,
    require_counts,
    run_script,
    save_report,
)

from finescope.data.dataset import read_image  # noqa: E402
from finescope.data.sources import images_in  # noqa: E402
from finescope.models import selection  # noqa: E402
from finescope.models.selection import select_boxes  # noqa: E402
from finescope.trainer import load_trained  # noqa: E402


def attention_maps(model, files: list[Path], device: torch.device) -> list[dict]:
    """The attention map, cell size and image size of each file, one forward pass each (its own batch)."""
    maps = []
    with torch.no_grad():
        for f in files:
            image = read_image(str(f))
            size = torch.tensor([list(image.shape[-2:])], device=device)
            out = model(image[None].to(device).float() / 255, size)
            if out.attention is None:
                raise SystemExit(f"selection_grid.py: error: '{f}': the model gives no attention map (a variant "
                                 "without attention); pass a run of attention, fusion or fusion-nogate")
            maps.append({"attn": out.attention.float(), "cell_px": out.cell_px, "size": size})
    return maps


def select(model, m: dict, upsample: int, components: str, peaks: str) -> torch.Tensor:
    """The (K, 4) boxes the model's selection settings give map ``m`` on a grid of ``upsample`` points per cell."""
    h, w = m["attn"].shape[-2:]
    valid = torch.tensor([[h, w]], device=m["attn"].device)
    boxes, _ = select_boxes(m["attn"], valid, m["size"], m["cell_px"], model.num_crops, model.threshold,
                            model.min_box_fraction, upsample, model.peak_iou, model.selection_norm,
                            components=components, peaks=peaks)
    return boxes[0]


def components_found(model, m: dict, upsample: int) -> int:
    """How many of the boxes the grid of ``upsample`` gives map ``m`` are components (the rest are peaks)."""
    counts, real = [], selection._component_boxes

    def counted(*args):
        out = real(*args)
        counts.append(int((out[1] > 0).sum()))
        return out

    with mock.patch.object(selection, "_component_boxes", counted):
        select(model, m, upsample, "grid", "grid")
    return min(counts[0], model.num_crops)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a trained run (its best.pt) or a checkpoint of a variant with attention")
    p.add_argument("images", nargs="+", help="image files or folders (read recursively)")
    p.add_argument("--limit", type=int, default=120, help="at most this many images, evenly spaced in file order")
    p.add_argument("--upsample", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                   help="points per feature cell; the last, with grid components, is the reference the others are "
                        "compared with")
    p.add_argument("--components", nargs="+", choices=["grid", "exact"], default=["grid"],
                   help="how the components are found (model.selection_components); each with every --upsample")
    p.add_argument("--peaks", nargs="+", choices=["nodes", "grid"], default=["nodes"],
                   help="where the fallback peaks may be centred (model.selection_peaks); each with every --components "
                        "and --upsample")
    p.add_argument("--batch", type=int, default=16, help="maps per selection call in the timing")
    p.add_argument("--reps", type=int, default=20, help="timed calls per grid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON file (a .md table beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, limit=1, batch=1, reps=1)
    if min(args.upsample) < 1:
        p.error("--upsample: every value must be >= 1")
    device = parse_device(p, args.device)
    make_out_folder(p, args.out)
    env = environment(device)
    model, cfg, _, _ = load_trained(args.run, device=str(device))
    files = [f for f, _ in images_in(args.images)]
    files = [files[round(i * (len(files) - 1) / max(1, args.limit - 1))] for i in range(min(args.limit, len(files)))]
    maps = attention_maps(model, files, device)
    reference = ("grid", "grid", args.upsample[-1])
    grids = [(c, p, u) for c in dict.fromkeys(args.components) for p in dict.fromkeys(args.peaks)
             for u in dict.fromkeys(args.upsample)]
    boxes = {g: [select(model, m, g[2], g[0], g[1]) for m in maps] for g in dict.fromkeys([*grids, reference])}
    kinds = [components_found(model, m, reference[2]) for m in maps]  # the reference's component boxes come first
    shapes = {}  # maps of one shape make a batch for the timing
    for m in maps:
        shapes.setdefault((tuple(m["attn"].shape), tuple(m["size"].tolist()[0])), []).append(m)
    batch = max(shapes.values(), key=len)[: args.batch]
    attn, cell_px, size = (torch.cat([m[k] for m in batch]) for k in ("attn", "cell_px", "size"))
    valid = torch.tensor([list(attn.shape[-2:])] * len(batch), device=device)
    rows = []
    for c, pk, u in grids:
        got = boxes[c, pk, u]
        ious = torch.cat([box_iou(a, b).amax(dim=1) for a, b in zip(got, boxes[reference], strict=True)])
        per_image = [bool((box_iou(a, b).amax(dim=1) < 0.7).any()) for a, b in zip(got, boxes[reference], strict=True)]
        found = [box_iou(r, a).amax(dim=1) >= 0.7 for a, r in zip(got, boxes[reference], strict=True)]
        missed = {"component": [int((~f[:n]).sum()) for f, n in zip(found, kinds, strict=True)],
                  "peak": [int((~f[n:]).sum()) for f, n in zip(found, kinds, strict=True)]}

        def call(u=u, c=c, pk=pk):
            return select_boxes(attn, valid, size, cell_px, model.num_crops, model.threshold, model.min_box_fraction,
                                u, model.peak_iou, model.selection_norm, components=c, peaks=pk)

        call()  # the first call of a shape (on CUDA: its graph's capture)
        rows.append({"components": c, "peaks": pk, "upsample": u, "median_iou": float(ious.median()), "mean_iou": float(ious.mean()),
                     "boxes_below_0.5": float((ious < 0.5).float().mean()),
                     "boxes_below_0.7": float((ious < 0.7).float().mean()),
                     "images_with_a_box_below_0.7": sum(per_image) / len(per_image),
                     "reference_components_missed": sum(missed["component"]), "reference_components": sum(kinds),
                     "reference_peaks_missed": sum(missed["peak"]),
                     "reference_peaks": sum(len(r) - n for r, n in zip(boxes[reference], kinds, strict=True)),
                     "ms_per_call": median_ms(call, device, args.reps)})
    env["loadavg_end"] = loadavg()
    sizes = sorted({"x".join(map(str, k[1])) for k in shapes})
    cells = statistics.median(float(m["cell_px"].max()) for m in maps)
    settings = {**{k: v for k, v in vars(args).items() if k != "images"}, "images": [str(x) for x in args.images],
                "files": len(files), "image_sizes": sizes, "median_cell_px": cells, "timed_batch": len(batch),
                "num_crops": model.num_crops, "threshold": model.threshold, "selection_norm": model.selection_norm,
                "min_box_fraction": model.min_box_fraction, "trained_selection_upsample":
                getattr(cfg.model, "selection_upsample", 4), "trained_selection_components":
                getattr(cfg.model, "selection_components", "grid"), "trained_selection_peaks":
                getattr(cfg.model, "selection_peaks", "grid")}
    table = markdown_table(
        ["components", "peaks", "points per cell", "median IoU", "mean IoU", "boxes < 0.5", "boxes < 0.7", "images with a box < 0.7",
         "reference components missed", "reference peaks missed", f"ms per call ({len(batch)} maps)"],
        [[r["components"], r["peaks"], r["upsample"], f"{r['median_iou']:.3f}", f"{r['mean_iou']:.3f}", f"{r['boxes_below_0.5']:.1%}",
          f"{r['boxes_below_0.7']:.1%}", f"{r['images_with_a_box_below_0.7']:.1%}",
          f"{r['reference_components_missed']}/{r['reference_components']}",
          f"{r['reference_peaks_missed']}/{r['reference_peaks']}", f"{r['ms_per_call']:.2f}"]
         for r in rows])
    note = (f"{len(files)} images ({', '.join(sizes[:4])}{', ...' if len(sizes) > 4 else ''}), cells of about "
            f"{cells:.0f} px; each box's IoU with the best-matching box of {reference[2]} points per cell (grid "
            "components and peaks); a reference box is missed when no box overlaps it by IoU 0.7; "
            f"K={model.num_crops}, tau={model.threshold}, {model.selection_norm}")
    save_report(args.out, {"environment": env, "settings": settings, "rows": rows},
                f"{report_header(env)}\n\n{note}\n\n{table}\n")
    return {"rows": rows, "settings": settings}


if __name__ == "__main__":
    run_script(main)
