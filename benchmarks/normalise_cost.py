"""Cost of the ImageNet normalisation of a batch of crops: ``(x - mean) / std`` against the model's one fused
multiply-add (``FineScopeNet._normalise``), interleaved, and their largest difference.

    PYTHONPATH=src python benchmarks/normalise_cost.py [--device cpu] [--crops 8] [--size 224] [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, parse_device, require_counts, require_device, sync  # noqa: E402

from finescope.config import ModelConfig  # noqa: E402
from finescope.models import create_model  # noqa: E402
from finescope.models.network import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--crops", type=int, default=8, help="B*K crops (8 = batch 2, K=4)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    require_counts(p, args, crops=1, size=1, reps=1)
    device = require_device(parse_device(p, args.device))
    model = create_model(ModelConfig(variant="fusion", backbone="resnet18"), 2).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = torch.rand(args.crops, 3, args.size, args.size, device=device)
    cases = {"(x - mean) / std": lambda: (x - mean) / std, "addcmul (the model)": lambda: model._normalise(x)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(args.reps + 2):
        for name, fn in cases.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if rep >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - start) * 1e3)
    diff = float(((x - mean) / std - model._normalise(x)).abs().max())
    env = environment(device)
    print(f"device {env.get('gpu', env['cpu'])} ({env['device']}), torch {env['torch']}, commit {env['commit']}, "
          f"{args.crops} crops of {args.size} px\n`{env['command']}`\n")
    rows = [[name, f"{statistics.median(t):.3f}", f"{min(t):.3f}-{max(t):.3f}"] for name, t in times.items()]
    print(markdown_table(["normalisation", "ms (median)", "spread"], rows))
    print(f"\nlargest difference: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
