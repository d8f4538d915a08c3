"""Cost of one AdamW step on a fusion model's parameters: fused (one kernel over all tensors) against foreach
(torch's default on the device) and the plain per-tensor loop.

    PYTHONPATH=src python benchmarks/optimizer_cost.py [--device cpu] [--backbones resnet18 mobilenet_v2 resnet50]

The parameters are those ``finescope.trainer.build_optimizer`` hands to AdamW (its parameter groups: weight
decay off for biases and norms), with random gradients; the three ways are timed interleaved, and the largest
difference of the parameters after the same steps is printed.
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
    ms_spread,
    parse_device,
    report_header,
    require_counts,
    run_script,
    save_report,
    summary,
    timed,
)

from finescope.config import load_config  # noqa: E402
from finescope.trainer import build_model, build_optimizer  # noqa: E402

WAYS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def measure(backbone: str, args, device: torch.device) -> dict:
    cfg = load_config(None, [f"model.backbone={backbone}", f"train.device={device.type}"])
    models, opts = {}, {}
    for way, kw in WAYS.items():
        torch.manual_seed(0)
        models[way] = build_model(cfg, 2, device)
        template = build_optimizer(models[way], cfg, device)
        groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                  for g in template.param_groups]  # its groups, without its fused / foreach choice
        opts[way] = torch.optim.AdamW(groups, lr=cfg.train.lr, **kw)
        g = torch.Generator().manual_seed(1)
        for p in models[way].parameters():  # in the parameter's layout (channels-last weights), as autograd's
            p.grad = torch.empty_like(p, device="cpu").normal_(generator=g).to(device)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.reps + 1):
        for way, opt in opts.items():
            times[way].append(timed(opt.step, device) * 1e3)
    flat = {way: torch.cat([p.detach().flatten() for p in m.parameters()]) for way, m in models.items()}
    n = sum(p.numel() for p in models["fused"].parameters())
    return {"backbone": backbone, "parameters": n, **{f"{w}_ms": summary(t[1:]) for w, t in times.items()},
            "max_diff": max(float((flat[w] - flat["foreach"]).abs().max()) for w in WAYS)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v2", "resnet50"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", help="JSON file (a .md with the table is written beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, reps=1)
    make_out_folder(p, args.out)
    device = parse_device(p, args.device)
    env = environment(device)
    rows = [measure(b, args, device) for b in args.backbones]
    env["loadavg_end"] = loadavg()

    table = markdown_table(
        ["backbone", "parameters", "fused ms", "foreach ms", "loop ms", "foreach / fused", "max abs diff"],
        [[r["backbone"], f"{r['parameters'] / 1e6:.1f} M", ms_spread(r["fused_ms"]), ms_spread(r["foreach_ms"]),
          ms_spread(r["loop_ms"]), f"{r['foreach_ms']['median'] / r['fused_ms']['median']:.2f}",
          f"{r['max_diff']:.1e}"] for r in rows])
    save_report(args.out, {"environment": env, "rows": rows}, f"{report_header(env)}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    run_script(main)  # an unknown backbone: one line
