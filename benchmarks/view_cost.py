"""Cost of the global view of a large image: resized from the image itself against from its crop source
(``FineScopeNet.view_from_source``), and how far apart the two views are.

    PYTHONPATH=src python benchmarks/view_cost.py [--device cpu] [--sizes 1536x2048 2048x2048] [--reps 20]

A fusion model with the default sizes (global short side 224, 224-pixel crops, boxes of at least a third of the
short side) makes the crop source anyway: the image resized so that its smallest box spans 224 pixels. Timed
interleaved: the view from the image (one antialiased resize of the whole image), and the view from the source
(the source made beforehand, as the step makes it for the crops). The difference is the largest absolute
difference per pixel, in [0, 1] units, on a random image and on a smooth one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    ms_spread,
    parse_device,
    parse_hw,
    report_header,
    require_counts,
    save_report,
    summary,
    timed,
)

from finescope.config import ModelConfig  # noqa: E402
from finescope.models import create_model  # noqa: E402


def measure(size: tuple[int, int], args, device: torch.device) -> dict:
    h, w = size
    model = create_model(ModelConfig(variant="fusion", backbone="tiny"), 2).to(device).eval()
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, h, w, generator=g)
    smooth = F.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(h, w), mode="bicubic").clamp(0, 1)
    sizes = [[h, w]]
    out = {"size": f"{h}x{w}", "from_source": model.view_from_source(h, w)}
    for name, image in (("noise", noise.to(device)), ("smooth", smooth.to(device))):
        sources = model._crop_sources(image, sizes)
        direct, _ = model._global_view(image, sizes)
        two_step, _ = model._global_view(image, sizes, sources)
        scale = model.norm_scale.view(-1)  # the views are normalised: back to [0, 1] units per channel
        out[f"max_diff_{name}"] = float(((direct - two_step).abs() / scale.view(1, 3, 1, 1)).max())
    image = noise.to(device)
    sources = model._crop_sources(image, sizes)
    times: dict[str, list[float]] = {"image": [], "source": [], "crop source": []}
    with torch.no_grad():
        for _ in range(args.reps + 1):
            times["image"].append(timed(lambda: model._global_view(image, sizes), device) * 1e3)
            times["source"].append(timed(lambda: model._global_view(image, sizes, sources), device) * 1e3)
            times["crop source"].append(timed(lambda: model._crop_sources(image, sizes), device) * 1e3)
    source_hw = list(next(iter(sources.values()))[1].shape[-2:])
    out.update(source="x".join(map(str, source_hw)), **{f"{k.replace(' ', '_')}_ms": summary(v[1:])
                                                         for k, v in times.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", default=["1536x2048", "2048x2048"], help="HxW of the image")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", help="JSON file (a .md with the table is written beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, reps=1)
    make_out_folder(p, args.out)
    device = parse_device(p, args.device)
    sizes = [parse_hw(p, "--sizes", s) for s in args.sizes]
    env = environment(device)
    rows = [measure(size, args, device) for size in sizes]
    env["loadavg_end"] = loadavg()

    table = markdown_table(
        ["image", "crop source", "view read from source", "view from image ms", "view from source ms",
         "crop source ms", "max abs diff, noise", "max abs diff, smooth"],
        [[r["size"], r["source"], "yes" if r["from_source"] else "no", ms_spread(r["image_ms"]),
          ms_spread(r["source_ms"]), ms_spread(r["crop_source_ms"]), f"{r['max_diff_noise']:.4f}",
          f"{r['max_diff_smooth']:.4f}"] for r in rows])
    save_report(args.out, {"environment": env, "rows": rows}, f"{report_header(env)}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
