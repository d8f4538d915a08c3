"""Seconds per image of each augmentation preset on full-resolution BreakHis images (decode included).

    PYTHONPATH=src python benchmarks/augment_cost.py ../shared/data/breakhis [--n 16]

Why: colour jitter was the costliest step of the data path (torchvision's HSV hue shift, ~16 ms per 700x460
image on one core); finescope's ``ColourJitter`` applies the same jitter as one affine colour map.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import require_counts, run_script  # noqa: E402

from finescope.config import load_config  # noqa: E402
from finescope.data import ImageDataset, build_transform, load_samples  # noqa: E402
from finescope.data.transforms import PRESETS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--n", type=int, default=16)
    args = parser.parse_args()
    require_counts(parser, args, n=1)
    cfg = load_config(overrides=["data.source=breakhis", f"data.root={args.data}"])
    samples = load_samples(cfg.data).samples[: args.n]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {len(samples)} images")
    for preset in PRESETS:
        ds = ImageDataset(samples, transform=build_transform(preset, train=True))
        start = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        print(f"{preset:11s} {(time.perf_counter() - start) / len(ds):.3f} s/image")


if __name__ == "__main__":
    run_script(main)  # a missing data folder: one line
