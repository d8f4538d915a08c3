"""Data-path throughput: decoders, the DataLoader alone by worker count and cache, and an end-to-end epoch.

Sections (all on the images of ``--data``: a BreakHis tree (PNG or a JPEG copy) or a class-folder set such as
DeFungi (JPEG)):

decode: seconds per image to decode with torchvision.io and with PIL, and to read back a decoded image stored
    as raw uint8 ``.npy`` (what a ``data.cache: disk`` would cost), interleaved per file.
loader: decoded and augmented uint8 images/s delivered by a training DataLoader (``--augments`` presets, batch
    ``--batch``, collate with padding, pinned memory on CUDA, persistent workers as the trainer builds it) with
    ``data.cache`` none, memory and disk (a fresh temporary folder); epoch 1 and epoch 2 are reported
    separately (the caches are filled in epoch 1; persistent workers keep a memory cache; ``--persistent on off``
    compares workers started again each epoch). ``--repeat N`` makes an epoch read every image N times: with
    many workers a short epoch is mostly their start-up (15 workers prefetch 30 batches, more than the 19 of
    296 images), and only a longer one gives what they deliver in a steady state, as in a real dataset's epochs.
    ``--loader-one-orientation`` sets ``data.one_orientation`` for the loader rows (default off, as eager
    training has it: a batch of mixed portrait and landscape images is padded to a square). With
    ``--colour-on workers device`` the presets with a colour jitter run both ways (``data.colour_on``): in the
    workers, or drawn there and applied to the batch on ``--device``, whose cost per batch is reported.
epoch: training epochs of ``fusion`` (``--epoch-backbone``) on ``--device`` through ``engine.train_one_epoch``
    with the loader and the training augmentation (``--epoch-augment``), each epoch timed (the first also starts
    the workers and fills nothing: no cache), with ``data.one_orientation`` on and off (``--one-orientation on
    off``, interleaved over ``--epoch-runs``); and the model alone on a pre-loaded batch of each orientation
    setting (what the model consumes per second; the loader rows are compared with the figure of their own
    setting, since a padded mixed batch costs the model more).

Example:
    PYTHONPATH=src python benchmarks/bench_data.py --data ../shared/data/breakhis --workers 0 1 2 --limit 64
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocator_as_the_cli,
    environment,
    loadavg,
    markdown_table,
    parse_device,
    require_counts,
    summary,
    sync,
)

from finescope.config import DataConfig, ModelConfig  # noqa: E402
from finescope.data import (  # noqa: E402
    ImageDataset,
    apply_colour,
    build_transform,
    collate_padded,
    colour_jitter,
    load_samples,
    rotates_90,
)
from finescope.data.dataset import _decode_pil, _decode_torchvision, worker_context  # noqa: E402
from finescope.errors import FinescopeError  # noqa: E402
from finescope.models.backbones import create_backbone  # noqa: E402
from finescope.trainer import fused_adamw  # noqa: E402


def find_samples(root: str, limit: int, seed: int = 0) -> list:
    """Up to ``limit`` samples of a BreakHis tree or a class-folder set, a seeded random subset."""
    source = "breakhis" if (Path(root) / "BreaKHis_v1").is_dir() else "folder"
    samples = load_samples(DataConfig(source=source, root=root)).samples
    if 0 < limit < len(samples):
        samples = random.Random(seed).sample(samples, limit)
    return samples


def bench_decode(samples: list, n: int) -> dict:
    """Seconds per image: torchvision.io, PIL, and ``np.load`` of the decoded uint8 array, interleaved."""
    times: dict[str, list[float]] = {"torchvision": [], "pil": [], "npy": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, s in enumerate(samples[:n]):
            raw = Path(tmp) / f"{i}.npy"
            np.save(raw, _decode_torchvision(Path(s.path)).numpy())
            for name, fn, arg in (("torchvision", _decode_torchvision, Path(s.path)),
                                  ("pil", _decode_pil, Path(s.path)), ("npy", np.load, raw)):
                start = time.perf_counter()
                fn(arg)
                times[name].append(time.perf_counter() - start)
    with Image.open(samples[0].path) as img:
        fmt, size = img.format, img.size
    return {"format": fmt, "size_wh": size, "n": min(n, len(samples)),
            **{k: summary(v) for k, v in times.items()}}


def make_loader(samples: list, workers: int, cache: str, batch: int, pin: bool, min_side: int = 0,
                augment: str = "microscopy", colour_on: str = "workers", persistent: bool = True,
                one_orientation: bool = False, repeat: int = 1) -> DataLoader:
    """A training loader as the trainer builds it, with persistent workers (``persistent``: as the trainer does)
    and, with ``one_orientation``, every non-square image turned to one orientation (``data.one_orientation``;
    its coin is drawn once here, as the loader's keys carry no epoch); an epoch reads every image ``repeat``
    times, in ``repeat`` shuffled passes."""
    on_device = colour_on == "device"
    dataset = ImageDataset(samples, transform=build_transform(augment, True, colour=not on_device), cache=cache,
                           min_side=min_side, colour=colour_jitter(augment, True) if on_device else None,
                           cache_dir=tempfile.mkdtemp(prefix="finescope_bench_cache_") if cache == "disk" else "",
                           one_orientation=one_orientation and rotates_90(augment))
    sampler = RandomSampler(dataset, num_samples=repeat * len(dataset), generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate_padded,
                      pin_memory=pin, drop_last=False, persistent_workers=persistent and workers > 0,
                      multiprocessing_context=worker_context(cache, workers))


def colour_ms(batch, device: torch.device, reps: int = 5) -> float:
    """Median milliseconds of applying a batch's colour maps on ``device`` (the batch already there)."""
    images = batch.images.to(device).float().div_(255.0)
    times = []
    for _ in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        apply_colour(images, batch.colour, batch.sizes)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def bench_loader(samples: list, workers: list[int], caches: list[str], batch: int, pin: bool,
                 augments: list[str], colour_ons: tuple[str, ...] = ("workers",),
                 device: torch.device | None = None, persistents: tuple[bool, ...] = (True,),
                 orientations: tuple[bool, ...] = (False,), repeat: int = 1) -> list[dict]:
    """Images/s of the loader alone for each (workers, cache, augmentation, where the colour jitter runs,
    persistent workers or not, one orientation or not), epochs 1 and 2 of ``repeat`` passes over the images;
    with the jitter on the device, also its cost there per batch. Without persistent workers each epoch starts
    its workers again (epoch 2 pays it too)."""
    rows = []
    for w, cache, augment, colour_on, persistent, one in ((w, c, a, o, p, x) for w in workers for c in caches
                                                          for a in augments for o in colour_ons for p in persistents
                                                          for x in orientations):
        if colour_on == "device" and colour_jitter(augment, True) is None:
            continue  # nothing to move
        if not persistent and w == 0:
            continue  # no workers to keep
        if one and not rotates_90(augment):
            continue  # nothing to turn
        loader = make_loader(samples, w, cache, batch, pin, augment=augment, colour_on=colour_on,
                             persistent=persistent, one_orientation=one, repeat=repeat)
        per_epoch = []
        for _ in range(2):
            start, n = time.perf_counter(), 0
            for b in loader:
                n += len(b)
            per_epoch.append(n / (time.perf_counter() - start))
        row = {"workers": w, "cache": cache, "augment": augment, "colour_on": colour_on, "persistent": persistent,
               "one_orientation": one, "repeat": repeat,
               "epoch1_images_per_s": per_epoch[0], "images_per_s": per_epoch[1], "loadavg": loadavg()}
        if colour_on == "device" and n:
            row["device_colour_ms_per_batch"] = colour_ms(b, device or torch.device("cpu"))
        rows.append(row)
        print(f"loader workers={w} cache={cache} augment={augment} colour on {colour_on} persistent {persistent} "
              f"one orientation {row['one_orientation']}: "
              f"{per_epoch[0]:.1f} / {per_epoch[1]:.1f} img/s", flush=True)
        if cache == "disk":
            shutil.rmtree(loader.dataset.cache_dir, ignore_errors=True)
        del loader
    return rows


def bench_epoch(samples: list, args, device: torch.device) -> dict:
    """Fusion training epochs through the real loop (``engine.train_one_epoch``) with the loader: ``--epochs``
    epochs of a fresh model and loader per ``--one-orientation`` setting, the settings interleaved over
    ``--epoch-runs`` runs; and the model alone on a pre-loaded batch (what it consumes per second)."""
    from finescope.engine import train_one_epoch
    from finescope.models import create_model

    cfg = ModelConfig(variant="fusion", backbone=args.epoch_backbone, global_size=args.global_size,
                      local_size=args.local_size)
    run = {"device": device, "progress": False, "grad_clip": 1.0}

    def setup(one_orientation: bool):
        torch.manual_seed(0)
        model = create_model(cfg, 2).to(device).to(memory_format=torch.channels_last)  # as the trainer
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adamw(device.type))
        loader = make_loader(samples, max(args.workers), "none", args.batch, device.type == "cuda", args.local_size,
                             augment=args.epoch_augment, one_orientation=one_orientation,
                             colour_on="device" if device.type == "cuda" else "workers")  # as data.colour_on: auto
        return model, opt, loader

    model_images_per_s = {}
    for setting in ("on", "off"):  # a mixed batch is padded to a square: more for the model to resize and read
        model, opt, loader = setup(setting == "on")
        batch = next(iter(loader))
        train_one_epoch(model, [batch], opt, None, **run)  # warm-up (the shape's first step, allocator)
        model_times = []
        for _ in range(args.model_reps):
            sync(device)
            model_times.append(train_one_epoch(model, [batch], opt, None, **run)["seconds"])
        model_images_per_s[setting] = len(batch) / statistics.median(model_times)
        del model, opt, loader
    runs = []
    for rep in range(args.epoch_runs):
        for setting in args.one_orientation:
            model, opt, loader = setup(setting == "on")
            stats = [train_one_epoch(model, loader, opt, None, **run) for _ in range(args.epochs)]
            runs.append({"one_orientation": setting, "run": rep, "images": stats[0]["images"],
                         "epoch_seconds": [s["seconds"] for s in stats],
                         "epoch_images_per_s": [s["images"] / s["seconds"] for s in stats]})
            del model, opt, loader
    return {"workers": max(args.workers), "augment": args.epoch_augment, "runs": runs,
            "model_images_per_s": model_images_per_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/breakhis")
    p.add_argument("--limit", type=int, default=64, help="images used (a seeded random subset; 0 = all)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--caches", nargs="+", default=["none", "memory"], choices=("none", "memory", "disk"))
    p.add_argument("--augments", nargs="+", default=["microscopy"],
                   choices=("none", "geometric", "microscopy", "strong"))
    p.add_argument("--colour-on", nargs="+", default=["workers"], choices=("workers", "device"),
                   help="where the colour jitter runs (data.colour_on); device = applied to the batch on --device")
    p.add_argument("--persistent", nargs="+", default=["on"], choices=("on", "off"),
                   help="persistent workers (the trainer's 'on'), or started again each epoch ('off')")
    p.add_argument("--loader-one-orientation", nargs="+", default=["off"], choices=("on", "off"),
                   help="data.one_orientation of the loader rows (default off, as in eager training)")
    p.add_argument("--repeat", type=int, default=1,
                   help="passes over the images in each loader epoch (a steady state needs several times the "
                        "batches that the workers prefetch: 2 per worker)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--decode-n", type=int, default=20, help="files in the decode comparison (0 = skip it)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--epoch-backbone", default="", help="also time fusion epochs with this backbone ('' = skip)")
    p.add_argument("--epoch-augment", default="microscopy", choices=("none", "geometric", "microscopy", "strong"),
                   help="the augmentation of the timed epochs (the trainer's default: microscopy)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run (the first starts the workers)")
    p.add_argument("--epoch-runs", type=int, default=1, help="runs per --one-orientation setting, interleaved")
    p.add_argument("--one-orientation", nargs="+", default=["on"], choices=("on", "off"),
                   help="data.one_orientation in the timed epochs: on (the trainer's default) turns every image "
                        "of an epoch to one orientation; off lets 90-degree rotations mix them in a batch")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=224)
    p.add_argument("--model-reps", type=int, default=3)
    p.add_argument("--out", help="JSON file for the results (a .md beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, workers=0, batch=1, repeat=1, epochs=1, epoch_runs=1, model_reps=1)
    if args.device != "auto":
        parse_device(p, args.device, auto=True)
    return args


def report(result: dict) -> str:
    env = result["environment"]
    lines = [f"device {env.get('gpu', env['cpu'])}, {env['cpu_count']} CPUs, torch {env['torch']}, torchvision "
             f"{env['torchvision']}, commit {env['commit']}, load {env['loadavg_start']} -> {env['loadavg_end']}",
             f"`{env['command']}`", ""]
    if "decode" in result:
        d = result["decode"]
        lines += [f"decode ({d['format']} {d['size_wh'][0]}x{d['size_wh'][1]}, {d['n']} files, ms/image median "
                  f"(min-max)): " + ", ".join(f"{k} {d[k]['median'] * 1e3:.2f} ({d[k]['min'] * 1e3:.2f}-"
                                              f"{d[k]['max'] * 1e3:.2f})" for k in ("torchvision", "pil", "npy")),
                  ""]
    rows = [[r["workers"], r["cache"], r["augment"], r.get("colour_on", "workers"),
             "yes" if r.get("persistent", True) else "no", "on" if r.get("one_orientation") else "off",
             r.get("repeat", 1), f"{r['epoch1_images_per_s']:.1f}",
             f"{r['images_per_s']:.1f}", f"{r['device_colour_ms_per_batch']:.2f}" if "device_colour_ms_per_batch" in r
             else "-"] for r in result["loader"]]
    lines.append(markdown_table(["workers", "cache", "augment", "colour on", "persistent workers", "one orientation",
                                 "passes per epoch", "epoch 1 images/s", "epoch 2 images/s",
                                 "colour on the device, ms/batch"], rows))
    if "epoch" in result:
        e = result["epoch"]
        rows = [[r["one_orientation"], r["run"], r["images"], *(f"{s:.2f} ({v:.1f})" for s, v in
                                                                zip(r["epoch_seconds"], r["epoch_images_per_s"]))]
                for r in e["runs"]]
        n = max(len(r["epoch_seconds"]) for r in e["runs"])
        lines += ["", f"fusion training epochs ({result['settings']['epoch_backbone']}, augment {e['augment']}, "
                  f"{e['workers']} workers, a fresh model and loader per run; the model alone on a loaded batch: "
                  + ", ".join(f"{v:.1f} images/s with one orientation {k}" for k, v in e["model_images_per_s"].items())
                  + ")", "",
                  markdown_table(["one orientation", "run", "images", *(f"epoch {i + 1} s (images/s)"
                                                                         for i in range(n))], rows)]
        on = {r["run"]: r["epoch_seconds"][-1] for r in e["runs"] if r["one_orientation"] == "on"}
        off = {r["run"]: r["epoch_seconds"][-1] for r in e["runs"] if r["one_orientation"] == "off"}
        paired = [off[k] / on[k] for k in on if k in off]
        if paired:
            lines += ["", f"last epoch, off / on (paired per run): median {statistics.median(paired):.3f} "
                      f"({min(paired):.3f}-{max(paired):.3f})"]
        lines += ["", loader_goal_lines(result["loader"], e["model_images_per_s"])]
    return "\n".join(lines) + "\n"


LOADER_GOAL = 1.5  # issue 5: the loader delivers at least 1.5x what fusion training consumes


def loader_goal_lines(loader: list[dict], needs: dict[str, float]) -> str:
    """Each loader row's epoch 2 images/s against what the model alone consumes on a batch of its own setting
    (one orientation on for rows with one orientation or no rotation, off otherwise), and issue 5's goal."""
    lines, met = [], 0
    for r in loader:
        need = needs.get("on" if r.get("one_orientation") or r["augment"] == "none" else "off")
        if not need:
            continue
        ratio = r["images_per_s"] / need
        met += ratio >= LOADER_GOAL
        lines.append(f"- {r['workers']} workers, cache {r['cache']}, augment {r['augment']}, colour on "
                     f"{r.get('colour_on', 'workers')}: {r['images_per_s']:.1f} img/s = {ratio:.2f}x ({need:.1f})")
    return (f"Loader, epoch 2, against what the model alone consumes (goal >= {LOADER_GOAL}x): met by {met} of "
            f"{len(lines)} rows\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.out and Path(args.out).is_dir():
        raise SystemExit(f"bench_data.py: error: --out '{args.out}': is a folder; give a JSON file name")
    if args.out and Path(args.out).suffix.lower() == ".md":  # the tables go to its .md: the JSON would be lost
        raise SystemExit(f"bench_data.py: error: --out '{args.out}': give the JSON file's name (e.g. "
                         f"{Path(args.out).with_suffix('.json')}); the tables are written beside it as .md")
    if args.out:  # an --out that cannot be written fails now, not after the timings
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"bench_data.py: error: --out '{args.out}': {e.strerror or e}") from None
    allocator_as_the_cli()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    result: dict = {"environment": environment(device), "settings": vars(args)}
    samples = find_samples(args.data, args.limit)
    if args.epoch_backbone:  # an unknown name said now, not after the loader's timings
        create_backbone(args.epoch_backbone)
    if args.decode_n > 0:
        result["decode"] = bench_decode(samples, args.decode_n)
    result["loader"] = bench_loader(samples, args.workers, args.caches, args.batch, device.type == "cuda",
                                    args.augments, tuple(args.colour_on), device,
                                    tuple(p == "on" for p in args.persistent),
                                    tuple(x == "on" for x in args.loader_one_orientation), args.repeat)
    if args.epoch_backbone:
        result["epoch"] = bench_epoch(samples, args, device)
        result["model_images_per_s"] = result["epoch"]["model_images_per_s"]
    result["environment"]["loadavg_end"] = loadavg()
    text = report(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        out.with_suffix(".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    try:
        main()
    except FinescopeError as e:  # a wrong --data, an unknown --epoch-backbone: one line, no traceback
        raise SystemExit(f"bench_data.py: error: {e}") from None
