"""CPU cost of a ``finescope cv`` protocol, from timed training and evaluation steps on real images.

    PYTHONPATH=src python benchmarks/cv_cost.py --config configs/breakhis_protocol.yaml --profile quick

For each variant, times ``--steps`` training steps (forward, loss, backward, optimizer, with the profile's
augmentation, decode included) and as many evaluation batches, in process CPU seconds (all threads) and wall
seconds. Then multiplies by the image counts of the protocol's folds (drawn exactly as ``finescope cv`` draws
them) to estimate the whole run: ``CPU seconds / cores`` is the wall time on that many dedicated cores,
assuming the work spreads over them (torch uses ``torch.get_num_threads()`` threads). CPU seconds are far less
sensitive than wall time to other processes sharing the machine, which is why they are reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import require_counts, run_script  # noqa: E402

from finescope.cv import load_protocol, make_folds  # noqa: E402
from finescope.data import load_samples  # noqa: E402
from finescope.engine import compute_loss  # noqa: E402
from finescope.trainer import build_model, build_optimizer, make_loader  # noqa: E402


def _timed(fn, steps: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call of ``fn`` over ``steps`` calls after one warm-up call."""
    fn()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def variant_cost(cfg, sample_set, indices, steps: int) -> dict[str, float]:
    """CPU and wall seconds per training image and per evaluation image of ``cfg.model.variant``."""
    device = torch.device("cpu")
    model = build_model(cfg, len(sample_set.class_names), device)
    opt = build_optimizer(model, cfg, device)
    train_iter = iter(make_loader(sample_set, indices, cfg, train=True))
    eval_iter = iter(make_loader(sample_set, indices, cfg, train=False))

    def train_step() -> None:
        batch = next(train_iter)
        model.train()
        loss = compute_loss(model(batch.model_input("cpu"), batch.sizes), batch.labels, cfg.train.aux_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def eval_step() -> None:
        batch = next(eval_iter)
        model.eval()
        model(batch.model_input("cpu"), batch.sizes)

    bs = cfg.train.batch_size
    (tc, tw), (ec, ew) = _timed(train_step, steps), _timed(eval_step, steps)
    return {"train_cpu": tc / bs, "train_wall": tw / bs, "eval_cpu": ec / bs, "eval_wall": ew / bs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/breakhis_protocol.yaml")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = parser.parse_args()
    require_counts(parser, args, steps=1)
    cfg, protocol = load_protocol(args.config, args.profile, args.overrides)
    sample_set = load_samples(cfg.data)
    folds = make_folds(sample_set, protocol, cfg.seed, cfg.data.val_fraction)
    n = {side: int(np.mean([len(f.splits[side]) for f in folds])) for side in ("train", "val", "test")}
    idx = np.random.default_rng(0).permutation(len(sample_set))[: cfg.train.batch_size * (args.steps + 1)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(folds)} folds, mean images per "
          f"fold: {n}; {cfg.train.epochs} epochs")
    total = 0.0
    for variant in protocol.variants:
        vcfg = load_protocol(args.config, args.profile, args.overrides + [f"model.variant={variant}"])[0]
        c = variant_cost(vcfg, sample_set, idx, args.steps)
        per_fold = cfg.train.epochs * (n["train"] * c["train_cpu"] + n["val"] * c["eval_cpu"]) + n["test"] * c["eval_cpu"]
        total += per_fold * len(folds)
        print(f"{variant:12s} train {c['train_cpu']:.2f} CPU-s/img ({c['train_wall']:.2f} wall)  eval "
              f"{c['eval_cpu']:.2f} CPU-s/img ({c['eval_wall']:.2f} wall)  -> {per_fold / 60:.1f} CPU-min per fold")
    print(f"whole protocol: {total / 60:.1f} CPU-min = {total / 60 / args.cores:.1f} min on {args.cores} dedicated cores")


if __name__ == "__main__":
    run_script(main)  # a wrong --config, --profile or --set: one line
