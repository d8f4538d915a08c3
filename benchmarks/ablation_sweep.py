"""The BreakHis ablation sweep: every setting trained and tested on the SAME patient-grouped trials.

    PYTHONPATH=src python benchmarks/ablation_sweep.py DATA OUT [--device cuda] [--budget-s 240]
    PYTHONPATH=src python benchmarks/ablation_sweep.py DATA OUT --device cpu --tiny      # a smoke test
    PYTHONPATH=src python benchmarks/ablation_sweep.py --summarize-only OUT --n-boot 2000  # recompute later

Settings run in the priority order of SETTINGS; a setting is skipped (and reported as skipped) when the time
left in ``--budget-s`` is less than the slowest setting so far took, so the sweep ends inside its budget.
Each setting is a ``finescope cv`` folder ``OUT/settings/<name>`` (resumable) on the folds of
``OUT/splits.json``. ``OUT/predictions.csv`` holds the out-of-fold rows of every setting (``variant`` = the
setting's name); ``OUT/summary.json`` compares every setting with ``global`` by a patient-clustered paired
bootstrap; ``OUT/sweep.json`` records the device, versions, settings, seconds and skips; the table is printed last.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import torch

from finescope.config import Config, load_config
from finescope.cv import Protocol, load_protocol, make_folds, run_cv, save_cv_splits
from finescope.data import load_samples
from finescope.errors import FinescopeError
from finescope.oof import summarize_predictions

CONFIG = Path(__file__).resolve().parents[1] / "src" / "finescope" / "configs" / "breakhis_protocol.yaml"

# (name, variant, overrides) in priority order: the baselines, the paper's method, then what might make it pay
SETTINGS: list[tuple[str, str, list[str]]] = [
    ("global", "global", []),
    ("fusion", "fusion", ["model.selection_norm=max"]),  # method.md's normalisation (the default until e63d9d0)
    ("fusion-minmax", "fusion", ["model.selection_norm=minmax"]),  # the demo's fix for flat maps (the default since)
    ("attention", "attention", []),
    ("fusion-native", "fusion", ["model.min_box_fraction=0.487"]),  # 224 px boxes read at 224: no zoom
    ("fusion-evidence", "fusion", ["model.select_from=evidence"]),
    ("fusion-stagewise", "fusion", ["train.crop_warmup_epochs=HALF"]),
    ("fusion-separate", "fusion", ["model.crop_backbone=separate"]),
    ("fusion-mean", "fusion", ["model.predict_with=mean"]),
    ("fusion-k2", "fusion", ["model.num_crops=2"]),
    ("fusion-nols", "fusion", ["train.label_smoothing=0"]),
]
# run only when named in --settings: colour jitter on the CPU data path costs seconds per image
# (benchmarks/augment_cost.py), far more than the 5-minute budget allows
EXTRA_SETTINGS: list[tuple[str, str, list[str]]] = [
    ("fusion-colour", "fusion", ["data.augment=microscopy"]),
    ("fusion-strongaug", "fusion", ["data.augment=strong"]),
    ("global-strongaug", "global", ["data.augment=strong"]),
]

TINY = ["model.backbone=tiny", "model.weights=", "model.global_size=64", "model.local_size=48",
        "model.num_crops=2", "train.batch_size=8", "data.num_workers=0", "data.augment=geometric"]


def base_config(args: argparse.Namespace) -> tuple[Config, Protocol]:
    """The ``full`` profile of breakhis_protocol.yaml on DATA with the sweep's epochs, trials and device.

    Augmentation is ``geometric``: the colour jitter of ``microscopy`` would make the CPU data path, not the GPU,
    the bottleneck (benchmarks/augment_cost.py).
    """
    sets = [f"data.root={args.data}", f"model.weights={args.weights}", f"train.device={args.device}",
            f"train.epochs={args.epochs}", f"data.num_workers={args.workers}", "train.patience=100",
            "data.augment=geometric"]
    if args.tiny:
        sets += TINY
    return load_protocol(CONFIG, "full", sets, {"trials": args.trials, "n_boot": args.n_boot})


def setting_config(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with a setting's overrides (``HALF`` = half the epochs)."""
    half = str(max(1, cfg.train.epochs // 2)) if cfg.train.epochs > 1 else "0"
    from finescope.config import to_dict

    return load_config(base=to_dict(cfg), overrides=[o.replace("HALF", half) for o in overrides])


def combine(out: Path, done: list[str]) -> Path:
    """All settings' out-of-fold rows in one predictions.csv, the setting's name in ``variant``."""
    rows, header = [], None
    for name in done:
        with (out / "settings" / name / "predictions.csv").open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames
            rows += [{**r, "variant": name} for r in reader]
    path = out / "predictions.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def table(summary: dict, seconds: dict[str, float]) -> str:
    """Pooled PRR and image accuracy with intervals, and the paired difference to ``global``."""
    diffs = {c["variant"]: c["metrics"] for c in summary["comparisons"]}
    lines = [f"{'setting':18s} {'PRR [95% CI]':24s} {'img acc [95% CI]':24s} {'dPRR vs global [95% CI]':26s}"
             f" {'d img acc [95% CI]':26s} {'s':>5s}"]
    for name, s in summary["variants"].items():
        metrics = ("patient_recognition_rate", "image_accuracy")
        cells = [_ci(s["pooled"][m]["value"], s["pooled"][m], "") for m in metrics]
        for m in metrics:
            d = diffs.get(name, {}).get(m)
            cells.append(_ci(d["diff"], d, "+") if d else "reference")
        lines.append(f"{name:18s} {cells[0]:24s} {cells[1]:24s} {cells[2]:26s} {cells[3]:26s} "
                     f"{seconds.get(name, float('nan')):5.0f}")
    return "\n".join(lines)


def _ci(value: float | None, d: dict, sign: str) -> str:
    """``value [low, high]``; ``sign='+'`` prints the sign of differences."""
    if value is None or d["low"] is None:
        return "n/a"
    return f"{value:{sign}.3f} [{d['low']:{sign}.3f}, {d['high']:{sign}.3f}]"


def summarize(out: Path, done: list[str], seconds: dict, n_boot: int, write_html: bool = True) -> str:
    summary = summarize_predictions(combine(out, done), reference="global", n_boot=n_boot)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if write_html:
        try:
            from finescope.report import write_report
        except ImportError as e:  # matplotlib missing on the GPU machine: the table is what matters
            print(f"sweep: no report.html ({e})", flush=True)
        else:
            write_report(out)
    return table(summary, seconds)


def sweep(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = Path(args.out)
    cfg, protocol = base_config(args)
    sample_set = load_samples(cfg.data)
    splits = out / "splits.json"
    if not splits.is_file():
        save_cv_splits(splits, make_folds(sample_set, protocol, cfg.seed, cfg.data.val_fraction), sample_set,
                       extra={"seed": cfg.seed, "trials": protocol.trials})
    wanted = args.settings.split(",") if args.settings else [s[0] for s in SETTINGS]
    known = {s[0]: s for s in SETTINGS + EXTRA_SETTINGS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"ablation_sweep: unknown setting '{unknown[0]}'; choose from {', '.join(known)}")
    chosen = [known[w] for w in wanted]
    done, skipped, seconds = [], [], {}
    for name, variant, overrides in chosen:
        left = args.budget_s - (time.perf_counter() - start)
        if seconds and left < 1.2 * max(seconds.values()):
            skipped.append(name)
            continue
        t0 = time.perf_counter()
        p = Protocol(variants=(variant,), trials=protocol.trials, test_fraction=protocol.test_fraction,
                     per_magnification=protocol.per_magnification, n_boot=50)
        run_cv(setting_config(cfg, overrides), p, out / "settings" / name, splits_file=str(splits),
               progress=False, report=False)
        seconds[name] = time.perf_counter() - t0
        done.append(name)
        print(f"sweep: {name} done in {seconds[name]:.0f} s", flush=True)
    record = {"device": _device(cfg), "torch": torch.__version__, "python": platform.python_version(),
              "argv": sys.argv, "settings": {n: o for n, _, o in chosen}, "seconds": seconds, "skipped": skipped,
              "train_seconds_total": time.perf_counter() - start}
    (out / "sweep.json").write_text(json.dumps(record, indent=2))
    text = summarize(out, done, seconds, args.n_boot, write_html=not args.no_report)
    (out / "table.txt").write_text(text + "\n")
    print(f"device: {record['device']}; skipped (time budget): {', '.join(skipped) or 'none'}")
    print(text)


def _device(cfg: Config) -> str:
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="BreakHis ablation sweep on identical patient-grouped trials")
    parser.add_argument("data", nargs="?", help="BreakHis folder (official tree; PNG or JPEG)")
    parser.add_argument("out", nargs="?", help="output folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", default=".gpu/mobilenet_v2-b0353104.pth")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=210.0, help="stop starting settings after this")
    parser.add_argument("--n-boot", type=int, default=300)
    parser.add_argument("--settings", default="", help="comma-separated settings, in this order (default: all "
                        "of SETTINGS): " + ",".join(s[0] for s in SETTINGS + EXTRA_SETTINGS))
    parser.add_argument("--tiny", action="store_true", help="tiny backbone and sizes (CPU smoke test)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html (saves a few seconds)")
    parser.add_argument("--summarize-only", metavar="OUT", help="recompute summary/table of a finished sweep")
    args = parser.parse_args(argv)
    if args.summarize_only:
        out = Path(args.summarize_only)
        if not (out / "sweep.json").is_file():
            parser.error(f"--summarize-only: no sweep.json in '{out}'; give the OUT folder of a finished sweep")
        rec = json.loads((out / "sweep.json").read_text())
        print(summarize(out, list(rec["seconds"]), rec["seconds"], args.n_boot))
        return 0
    if not args.data or not args.out:
        parser.error("give DATA and OUT (or --summarize-only OUT)")
    try:
        sweep(args)
    except FinescopeError as e:
        print(f"ablation_sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
