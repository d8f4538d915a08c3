"""The ``finescope`` command line: one small function per verb, each calling a library function.

User mistakes (FinescopeError) print one line on stderr and exit 2; nothing else is printed as a traceback
unless ``FINESCOPE_DEBUG=1`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import re
import select
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from finescope import __version__
from finescope.errors import FinescopeError, FinescopeWarning, Interrupted, Terminated, path_error_line
from finescope.files import json_text, write_text
from finescope.runtime import tune_allocator

# --set of a command that reads a trained model: its architecture is the checkpoint's (model.variant=global fails)
TRAINED_SET_HELP = ("override the run's config keys, one or more, e.g. --set data.root=DIR model.threshold=0.6 (a "
                    "model setting changed is recorded as model_overrides; the architecture is the checkpoint's; a "
                    "data.bit_depth other than the run's is warned about and recorded there too)")


def _add_set(p: argparse.ArgumentParser, text: str = "override config keys, one or more, e.g. --set "
             "train.epochs=5 model.variant=global") -> None:
    # one value per option as argparse sees it: main() turns "--set k=v k2=v2" into "--set=k=v --set=k2=v2"
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


def cmd_train(args: argparse.Namespace) -> int:
    from finescope import distributed as dist
    from finescope.config import load_config
    from finescope.trainer import train

    cfg = load_config(args.config, args.overrides)
    out = args.out or f"runs/{cfg.name or Path(args.config).stem}"
    args.run_dir = out  # for the message of an interruption, also while the processes wait for each other here
    with _sigterm_raises():
        dist.init_from_env(cfg.train.device)
        main_rank = dist.is_main()
        try:
            metrics = train(cfg, out, resume=args.resume, progress=not args.quiet)
        finally:
            dist.cleanup()
    if main_rank:
        print(f"run written to {out}")
        if metrics:
            print(_metrics_line(metrics))
    return 0


def _metrics_line(m: dict) -> str:
    keys = ("image_accuracy", "balanced_accuracy", "macro_f1", "auc", "patient_recognition_rate")
    skipped = f", {m['n_skipped']} skipped (unreadable or too small)" if m.get("n_skipped") else ""
    return ("test: " + "  ".join(f"{k} {m[k]:.4f}" for k in keys if m.get(k) is not None)
            + f"  (n={m['n_images']}{skipped})")


def _not_a_checkpoint(out: str | None, example: str, flag: str = "--out") -> None:
    """Refuse an ``--out`` that names a checkpoint or an image: evaluate and predict write JSON and CSV, and must
    never replace the model they read or an image (``predict RUN slide.png --out slide.png``); or a folder (also
    one not there yet, named with a trailing '/'), in which nothing would be written after all the work
    (``example``: a file name to suggest in it; ``flag``: the option, data's ``--json``)."""
    from finescope.data.sources import SUPPORTED_EXTENSIONS

    if out and Path(out).is_dir():  # found before the work, not when its result is written
        raise FinescopeError(f"{flag} '{out}' is a folder; give the file to write, e.g. {flag} {Path(out) / example}")
    if out and out.endswith(("/", os.sep)):  # not there yet: Path() drops the '/', and a file of that name was written
        raise FinescopeError(f"{flag} '{out}' names a folder (it ends in '/'); give the file to write, e.g. {flag} "
                             f"{Path(out) / example}")
    above = next((p for p in Path(out or ".").absolute().parents if p.exists()), None)
    if out and above is not None and not above.is_dir():  # its folder cannot be made: found before the work
        raise FinescopeError(f"{flag} '{out}': '{above}' is a file, not a folder; give the file to write in a folder")
    if out and Path(out).suffix == ".pt":
        raise FinescopeError(f"{flag} '{out}' is a checkpoint name (.pt); give a .json/.csv file to write the "
                             "results to, not the model")
    if out and Path(out).suffix.lower() in SUPPORTED_EXTENSIONS:
        raise FinescopeError(f"{flag} '{out}' is an image name ({Path(out).suffix}); give a .json/.csv file to write "
                             "the results to, not an image")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from finescope.trainer import evaluate

    _not_a_checkpoint(args.out, "results.json")
    metrics = evaluate(args.source, args.split, args.overrides, args.out, args.device)
    print(_metrics_line(metrics).replace("test:", f"{metrics['split']}:"))
    print(f"metrics written to {metrics['output']}")
    from finescope.report import report_path, write_report

    # beside the predictions, named like them: report.md for the run's test split (train's), report_val.md, ...
    predictions = Path(metrics["predictions"])
    md = report_path(predictions)
    try:
        md, page = write_report(metrics["run_dir"], predictions=predictions, split=metrics["split"],
                                data_root=metrics["data_root"], out=md, warning=metrics.get("split_leak"),
                                model_overrides=metrics["model_overrides"])
    except KeyboardInterrupt:  # the metrics are this evaluation's; a report there (.html: written last) is not
        earlier = ", and the one there is an earlier evaluation's" if md.with_suffix(".html").is_file() else ""
        raise Interrupted(f"after its metrics were written ('{metrics['output']}', {predictions.name}): its report "
                          f"({md.name}, .html) is not{earlier}; rerun the same command to write it") from None
    print(f"report written to {md} and {page}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from finescope.trainer import predict

    _not_a_checkpoint(args.out, "results.csv")
    if Path(args.out).name == "predictions.csv" and (Path(args.out).parent / "cv.json").is_file():
        raise FinescopeError(f"--out '{args.out}' is the out-of-fold predictions of the cv folder "
                             f"'{Path(args.out).parent}'; give predict another file, e.g. --out new_predictions.csv")
    own = re.fullmatch(r"predictions_(train|val|test|all)(_last)?\.csv", Path(args.out).name)
    if own and (Path(args.out).parent / "config.yaml").is_file():  # what train or evaluate wrote beside metrics
        raise FinescopeError(f"--out '{args.out}' is the {own[1]} predictions of the run '{Path(args.out).parent}' "
                             "(its reports read them); give predict another file, e.g. --out new_predictions.csv")
    out = predict(args.checkpoint, args.paths, args.out, args.overrides, args.device, args.per_patient)
    # `--out /dev/stdout | ...`: the line goes to stderr, not into the CSV a reader takes from stdout
    print(f"predictions written to {out}", file=sys.stderr if _is_stdout(out) else sys.stdout)
    if args.per_patient:
        from finescope.trainer import patients_path

        print(f"per-patient predictions written to {patients_path(out)}")
    return 0


def _is_stdout(path: str | Path) -> bool:
    """Whether ``path`` is the file behind this process's stdout (``/dev/stdout``, a pipe or a file given by '>')."""
    try:
        here, there = os.stat(path), os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no such file, or no descriptor behind sys.stdout
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def cmd_data(args: argparse.Namespace) -> int:
    from finescope.config import load_config
    from finescope.data import describe_samples, format_description, load_samples
    from finescope.trainer import min_image_side, one_class_error, view_image_side

    cfg = load_config(args.config, args.overrides)
    _not_a_checkpoint(args.json, "data.json", "--json")  # before every image is read, not when the JSON is written
    description = describe_samples(load_samples(cfg.data), read_images=not args.no_read,
                                   min_side=min_image_side(cfg), view_side=view_image_side(cfg),
                                   on_error=cfg.data.on_error, bit_depth=cfg.data.bit_depth)
    print(format_description(description))
    if args.json:  # its folder made as predict's and evaluate's --out are
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json_text(description, indent=2, default=str))
    if len(description["class_names"]) < 2:
        print(f"train would stop here: {one_class_error(cfg, description['class_names'])}")
        return 1
    failing = description.get("unreadable") or description.get("too_small") or description.get("too_thin")
    return 1 if failing and cfg.data.on_error == "raise" else 0


def cmd_models(args: argparse.Namespace) -> int:
    from finescope.models import describe_models, list_backbones

    for name, text in describe_models().items():
        print(f"{name:15s} {text}")
    print("\nbackbones: " + ", ".join(list_backbones()) + " (and any timm model with finescope[timm])")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from finescope.demo import run_demo

    with _sigterm_raises():  # a scheduler's pre-emption: one line, as train's
        run_demo(args.out, quick=args.quick, progress=not args.quiet)
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from finescope.cv import load_protocol, run_cv, sets_test_fraction

    flags = {"variants": args.variants, "folds": args.folds, "trials": args.trials,
             "test_fraction": args.test_fraction, "per_magnification": args.per_magnification,
             "reference": args.reference}
    for name in ("folds", "trials"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise FinescopeError(f"--{name} must be at least 1, got {value}")
    if args.folds and args.trials:
        raise FinescopeError(f"--folds {args.folds} and --trials {args.trials}: give one of them (k-fold, or repeated "
                             "hold-outs)")
    if args.folds:
        flags["trials"] = 0
    elif args.trials:
        flags["folds"] = 0
    cfg, protocol = load_protocol(args.config, args.profile, args.overrides, flags)
    if any(item.split("=", 1)[0].strip() == "model.variant" for item in args.overrides):  # each fold's: --variants'
        raise FinescopeError(f"cv trains each variant of --variants (here {', '.join(protocol.variants)}) and does "
                             f"not read --set model.variant={cfg.model.variant}; leave the --set out"
                             + ("" if tuple(protocol.variants) == (cfg.model.variant,)
                                else f" and give --variants {cfg.model.variant}"))
    out = args.out or f"runs/cv_{cfg.name or Path(args.config).stem}"
    given = [name for name in ("folds", "trials", "test_fraction", "per_magnification")
             if getattr(args, name) is not None]
    if sets_test_fraction(args.overrides) and "test_fraction" not in given:
        given.append("test_fraction")
    with _sigterm_raises():  # a scheduler's pre-emption: one line, as train's
        summary = run_cv(cfg, protocol, out, splits_file=args.splits or "", progress=not args.quiet, given=given)
    print(_cv_table(summary))
    print(f"cv written to {out} (summary.json, predictions.csv, report.html)")
    return 0


def _cv_table(summary: dict) -> str:
    """The pooled PRR and image accuracy of each variant with their intervals, in columns as wide as their
    widest cell (an interval too few patients leave undefined says why, at length)."""
    rows = [["variant", "PRR [95% CI]", "image acc [95% CI]"]]
    for v, s in summary["variants"].items():
        cells = [v]
        for m in ("patient_recognition_rate", "image_accuracy"):
            d = s["pooled"][m]
            low, high = ("n/a" if x is None else f"{x:.3f}" for x in (d["low"], d["high"]))  # None: too few patients
            interval = f"[n/a ({d['ci_note']})]" if d.get("ci_note") else f"[{low}, {high}]"
            cells.append(f"{d['value']:.3f} {interval}")
        rows.append(cells)
    widths = [max(16 if i == 0 else 28, *(len(r[i]) + 1 for r in rows)) for i in range(3)]
    return "\n".join(" ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_report(args: argparse.Namespace) -> int:
    from finescope.report import report_predictions, write_report

    md, page = report_predictions(args.dir, args.predictions) if args.predictions else write_report(args.dir)
    print(f"report written to {md} and {page}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from finescope.explain.gallery import skipped_text
    from finescope.explain.runner import ExplainSettings, run_explain

    settings = ExplainSettings(
        methods=tuple(args.method), normalise=args.normalise, percentile=args.percentile,
        faithfulness=not args.no_faithfulness, steps=args.steps, grid=args.grid, baseline=args.baseline,
        random_repeats=args.random_repeats, target=args.target, tolerance=args.tolerance, top=args.top,
        limit=args.limit,
    )
    summary = run_explain(args.checkpoint, args.paths, args.out, args.split, settings, args.overrides, args.device,
                          progress=not args.quiet)
    for method, m in summary["methods"].items():
        parts = []  # with --no-faithfulness, the pointing game alone (where a cells.json gives the nuclei)
        if m.get("deletion_auc") is not None:
            parts.append(f"deletion AUC {m['deletion_auc']:.3f}  insertion AUC {m['insertion_auc']:.3f}")
        if "pointing_game" in m:
            parts.append(f"pointing game {m['pointing_game']:.3f}")
        if m.get("flat_maps"):
            parts.append(f"{m['flat_maps']} flat maps (no maximum to point at)")
        if parts:
            print(f"{method:10s} " + "  ".join(parts))
    if summary.get("boxes"):
        b = summary["boxes"]
        print(f"box hit rate {b['hit_rate']:.3f} ({b['hits']}/{b['cells']} nuclei); boxes cover "
              f"{b['mean_box_union_fraction']:.1%} of the image on average (chance hit rate "
              f"{b['chance_hit_rate']:.3f}); "
              f"{b['images_with_a_box_over_half_the_image']}/{b['images']} images have a box over half the image")
    if summary["skipped"]:
        print(f"finescope: warning: {skipped_text(summary['skipped'])} (listed in the gallery)", file=sys.stderr)
    print(f"gallery: {Path(summary['output']) / 'index.html'}")
    return 0


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="attention/CAM overlays, evidence galleries and faithfulness of a model")
    p.add_argument("checkpoint", help="a run directory or a checkpoint .pt")
    p.add_argument("paths", nargs="*", help="image files and/or folders (searched recursively, less the figures "
                   "finescope wrote there: reports' and explain's), or use --split")
    p.add_argument("--split", choices=("train", "val", "test", "all"),
                   help="explain this split of the run's data; all: every image of its data or of other data "
                   "(--set data.root=OTHER), as evaluate --split all; train, val or test of other data: all its "
                   "images too, with a warning, as evaluate (into RUN/explain_all_OTHER)")
    p.add_argument("--out", help="output folder (default RUN/explain_<split>, RUN/explain_files for paths, "
                   "./explain for a .pt checkpoint; named after other data or model settings as evaluate names its "
                   "files: RUN/explain_all_OTHER for --set data.root=/data/OTHER, RUN/explain_test_threshold=0.9 for "
                   "--set model.threshold=0.9)")
    p.add_argument("--method", nargs="+", default=["auto"], metavar="NAME",
                   help="attention, gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam "
                   "(default auto: attention if the model has it, gradcam, gradcam++; auto joins other names, e.g. "
                   "auto eigencam); give the images before --method, which takes every name after it")
    p.add_argument("--normalise", default="max", choices=("max", "percentile"),
                   help="display scale of each map: its maximum, or a percentile (clipped)")
    p.add_argument("--percentile", type=float, default=99.0)
    p.add_argument("--no-faithfulness", action="store_true", help="skip the deletion/insertion curves (faster)")
    p.add_argument("--steps", type=int, default=10, help="steps of the deletion/insertion curves (at least 2)")
    p.add_argument("--grid", type=int, default=16, help="blocks along the short side for the curves")
    p.add_argument("--baseline", default="blur", choices=("blur", "mean"), help="what removed blocks become")
    p.add_argument("--random-repeats", type=int, default=1, help="random block orders per image (baseline)")
    p.add_argument("--target", default="true", choices=("true", "predicted"),
                   help="the class the CAMs and curves follow (true falls back to predicted when unknown)")
    p.add_argument("--tolerance", type=float, default=15.0, help="pointing game tolerance in pixels")
    p.add_argument("--top", type=int, default=16, help="crops per class in the evidence gallery, mistakes shown")
    p.add_argument("--limit", type=int, default=0, help="explain at most this many images, spread evenly over the list")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default auto: the run's train.device "
                   "where this machine has it, else CUDA when there is one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_set(p, TRAINED_SET_HELP)
    p.set_defaults(func=cmd_explain)


def build_parser() -> argparse.ArgumentParser:
    from finescope.config import shipped_configs

    config_help = f"experiment YAML file, or a shipped config's name ({', '.join(shipped_configs())})"
    parser = argparse.ArgumentParser(
        prog="finescope",
        description="Fine-grained microscopy classification with gated attention and high-resolution crops "
        "(Fan et al., MICCAI 2020).",
        epilog="environment: FINESCOPE_DEBUG=1 prints full tracebacks instead of one-line errors; "
        "FINESCOPE_MALLOC=default leaves glibc's malloc as it is (by default freed large blocks stay in the "
        "heap for the next step: faster CPU steps, a higher resident peak).",
    )
    parser.add_argument("--version", action="version", version=f"finescope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a trained model on its test split or on other data")
    p.add_argument("source", help="a run directory or a checkpoint .pt")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="split of the run's own data, also moved (other data, via --set data.root=..., is evaluated "
                        "whole: 'all')")
    p.add_argument("--out", help="metrics JSON path (default RUN_DIR/metrics_<split>.json; "
                   "metrics_<split>_last.json for RUN_DIR/checkpoints/last.pt; other data or model settings are "
                   "named after it, e.g. metrics_all_hospital_b.json for --set data.root=/data/hospital_b, "
                   "metrics_test_threshold=0.9.json for --set model.threshold=0.9); the predictions go beside it, "
                   "M.json's as M_predictions.csv (a .csv, .tsv, .md or .html name is refused)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default auto: the run's train.device "
                   "where this machine has it, else CUDA when there is one)")
    _add_set(p, TRAINED_SET_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict image files or folders; one CSV row per image")
    p.add_argument("checkpoint", help="a run directory or a checkpoint .pt")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively, less the figures "
                   "finescope wrote there: reports' and explain's)")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default predictions.csv)")
    p.add_argument("--per-patient", action="store_true",
                   help="also one row per patient into OUT_patients.csv beside OUT, a file (not /dev/stdout; e.g. "
                   "predictions_patients.csv): its images' "
                   "mean class probabilities, their argmax (predicted) and the majority vote of their predictions "
                   "(majority); the patient is the one the file names say (BreakHis), else the group found as in "
                   "training (an image right in a class folder: its own), else the folder the images lie in")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default auto: the run's train.device "
                   "where this machine has it, else CUDA when there is one)")
    _add_set(p, TRAINED_SET_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="count images per class, group and magnification; list unreadable files")
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--json", help="also write the description as JSON")
    p.add_argument("--no-read", action="store_true", help="do not decode every image (faster, no size check)")
    _add_set(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("cv", help="patient-level cross-validation of several variants on the same splits")
    p.add_argument("--config", required=True, help=f"{config_help}; may hold protocol: and profiles: sections")
    p.add_argument("--profile", default="", help="a profile of the config file, e.g. quick or full")
    p.add_argument("--variants", help="comma-separated variants, e.g. global,attention,fusion")
    p.add_argument("--folds", type=int, help="grouped, stratified k-fold with K folds")
    p.add_argument("--trials", type=int, help="repeated random hold-outs of --test-fraction of the groups")
    p.add_argument("--test-fraction", type=float, help="fraction of each class's groups held out per trial "
                   "(--set data.test_fraction=F says the same)")
    p.add_argument("--per-magnification", action=argparse.BooleanOptionalAction, default=None,
                   help="separate folds and runs per magnification (--no-per-magnification: all together)")
    p.add_argument("--reference", help="the variant the others are compared with (default: the first)")
    p.add_argument("--splits", help="reuse the folds of a cv splits.json: its folds, as they are, set the protocol "
                   "and whether they are per magnification (--folds, --trials, --test-fraction or "
                   "--[no-]per-magnification that contradict them are refused)")
    p.add_argument("--out", help="cv directory (default runs/cv_<config name>); rerun to resume")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    _add_set(p, "override config keys, one or more, e.g. --set train.epochs=5 model.backbone=resnet18 (the "
             "variants are --variants')")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("report", help="write report.md and a self-contained report.html for a cv or run folder")
    p.add_argument("dir", help="a finescope cv directory or a training run directory")
    p.add_argument("--predictions", metavar="FILE",
                   help="report this predictions CSV of the run (absolute, or from the working folder or RUN, e.g. "
                   "predictions_all_OTHER.csv of evaluate --set data.root=/data/OTHER), written where evaluate writes "
                   "its report (report_all_OTHER.md beside it); default: predictions_test.csv, else the first of evaluate's "
                   "predictions_<split>.csv in the order test (last.pt's), val, train, all")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("models", help="list the model variants and backbones")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="synthetic set: train global and fusion, compare, draw attention overlays")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    p.set_defaults(func=cmd_demo)
    _add_explain(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """A FinescopeError raised in a DataLoader worker arrives wrapped with a traceback: keep its message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        text = text.split("FinescopeError: ", 1)[-1]
    return text.splitlines()[0] if text else type(err).__name__


OUT_ELSEWHERE = ("evaluate", "explain", "predict")  # commands that read a run and write beside it unless --out
_CONFIG_KEY = re.compile(r"[A-Za-z_][\w.]*=")  # the start of a --set item: a key, not a path holding '='


def _one_set_each(argv: list[str]) -> list[str]:
    """``argv`` with every ``--set k=v k2=v2 ...`` written as ``--set=k=v --set=k2=v2``, in place: one
    option token per override, so that nothing around them changes meaning (a path after them stays a path, an
    option before them keeps its own list). The items of a ``--set`` are the ``KEY=VALUE`` tokens after it whose
    KEY reads as a config key (``data.root``, ``seed``), so that an image path holding '=' (``in/dose=5uM.png``)
    stays a path; a ``--set`` without one stays, for argparse to refuse; nothing after ``--`` changes."""
    rest = argv[argv.index("--"):] if "--" in argv else []
    out, items = [], False
    for token in argv[:len(argv) - len(rest)]:
        if token == "--set":
            out.append(token)
            items = True
        elif items and _CONFIG_KEY.match(token):
            if out[-1] == "--set":
                out.pop()
            out.append(f"--set={token}")
        else:
            items = False
            out.append(token)
    return out + rest


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted, 141 the reader of its output
    closed the pipe, 143 train, cv or demo stopped by SIGTERM)."""
    try:
        try:
            status = _main(argv)
        except SystemExit:  # --help, --version, a usage error: argparse has printed its text
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # here, not in Python's flush at exit, a reader that has gone meets a handler
        return status
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        _stdout_to_devnull()  # `finescope data | head`: end quietly, with the status of a SIGPIPE death, as others do
        return 141


def _main(argv: list[str] | None) -> int:
    """:func:`main` itself: parse ``argv`` and run the command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(_one_set_each(list(sys.argv[1:] if argv is None else argv)))
    if extra and isinstance(getattr(args, "paths", None), list) and not any(e.startswith("-") for e in extra):
        args.paths += extra  # image paths given after options (argparse ends a '*' positional at the first option)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    tune_allocator()  # glibc keeps freed tensors' memory for the next step (finescope.runtime)
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8, as stderr prints it
    debug = os.environ.get("FINESCOPE_DEBUG") == "1"
    with warnings.catch_warnings():  # the settings below end with the command (main may be called in-process)
        if not debug:
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
        with _sigterm_restored():
            return _run(args, debug)


def _show_warning(otherwise, message, category, filename, lineno, file=None, line=None) -> None:
    """Print a :class:`FinescopeWarning` as one line, as the CLI prints errors; any other warning by ``otherwise``
    (what ``warnings.showwarning`` was)."""
    if issubclass(category, FinescopeWarning):
        _say(f"finescope: warning: {message}", sys.stderr if file is None else file)
    else:
        otherwise(message, category, filename, lineno, file, line)


def _say(line: str, file=None) -> None:
    """Write one line to stderr (or ``file``) in a single write, so that the lines of torchrun's processes, which
    share that stream, never run into each other."""
    file = sys.stderr if file is None else file
    file.write(line + "\n")
    file.flush()


def _launch(name: str, default: int) -> int:
    """What torchrun says in the environment (``RANK``: this process's rank, ``WORLD_SIZE``: the number of
    processes); ``default`` without torchrun or when it is not a number. Read from the environment: when an
    error is reported the process group may be gone."""
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        return default


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no descriptor behind sys.stdout
        return False


def _stdout_to_devnull() -> None:
    """Point stdout's descriptor at /dev/null, so that Python's flush at exit does not write to the closed pipe
    again (another traceback, 'Exception ignored ... BrokenPipeError')."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _has_checkpoint(args: argparse.Namespace) -> bool:
    """Whether the run that ``train`` was writing has a ``last.pt`` to ``--resume`` from."""
    run_dir = getattr(args, "run_dir", None)
    return bool(run_dir) and (Path(run_dir) / "checkpoints" / "last.pt").is_file()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """A SIGTERM inside raises :class:`~finescope.errors.Terminated`, so that the process says in one line why it
    stops and how to go on (it died without a word; checkpoints are written whole, so last.pt stays the last finished
    epoch's); after, until :func:`_sigterm_restored` ends, SIGTERM is ignored, so that it does not cut short the
    line of an error met first (a process that lost another in a collective)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once
        raise Terminated

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def _sigterm_restored() -> Iterator[None]:
    """The process's own SIGTERM handler back when the command ends (main may be called in-process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _then(args: argparse.Namespace, where: bool = False) -> str:
    """What to do after a run stopped: resume it, or start it again when no epoch had finished; with ``where``
    the checkpoint kept is named."""
    if not _has_checkpoint(args):
        return "no epoch had finished: start it again (without --resume)"
    kept = f" ('{Path(args.run_dir) / 'checkpoints' / 'last.pt'}')" if where else ""
    return f"the run's last checkpoint is kept{kept}: continue it with the same command and --resume"


def _lost_process(e: BaseException, args: argparse.Namespace, world: int, rank: int) -> str | None:
    """The line of a process of a torchrun run that gloo's collective told of another process gone (its
    connection closed) or silent for the process group's timeout; None for any other error. Of more than 2
    processes, gloo's error names a socket address, not the rank (which would take a collective of its own, or
    gloo's rendezvous records, to map): torchrun's report names the process that ended first, its 'Root Cause'."""
    other = f" (rank {1 - rank})" if world == 2 else ""
    if "by peer" in str(e):
        which = "see its error or exit status" if world == 2 else "torchrun's report says which, under 'Root Cause'"
        what = f"another process of the run{other} stopped ({which}), so this one stopped too"
    elif "Timed out waiting" in str(e) or "Application timeout" in str(e):
        from finescope.distributed import TIMEOUT_MINUTES

        minutes = f"{TIMEOUT_MINUTES:g} minutes"
        what = (f"another process of the run{other} did not answer for {minutes} (it stopped, or its machine is "
                "unreachable), so this one stopped")
    else:
        return None
    return f"{what}; {_then(args)}"


# what continues a command that was stopped (Ctrl-C, SIGTERM)
_AGAIN = {"train": "continue it with the same command and --resume", "cv": "rerun the same command to resume its folds",
          "demo": "rerun the same command to continue"}


def _run(args: argparse.Namespace, debug: bool) -> int:
    """Run the parsed command; a user error is one line on stderr and exit status 2. Under torchrun each failing
    process says so, the ranks other than 0 with their rank; an interruption is reported by rank 0 alone."""
    rank = _launch("RANK", 0)
    error = "finescope: error: " if rank == 0 else f"finescope: error (rank {rank}): "
    if args.command != "train" and _launch("WORLD_SIZE", 1) > 1:  # each process would do the whole job, write the same files
        _say(f"{error}finescope {args.command} runs in one process; run it without torchrun (train is the command "
             "that shares its work between processes; WORLD_SIZE is set in this environment)")
        return 2
    try:
        return args.func(args)
    except Terminated as e:
        held = str(e) if args.command == "train" else ""  # the trainer says what the run holds, as for Ctrl-C
        if _launch("WORLD_SIZE", 1) <= 1:
            then = _then(args, where=True) if args.command == "train" else _AGAIN[args.command]
            _say(f"finescope: stopped by SIGTERM {held}" if held else
                 f"finescope: stopped by SIGTERM (a scheduler's pre-emption or time limit, or a kill); {then}")
        else:
            _say(f"{error}stopped by SIGTERM (torchrun sends it to every process of the run when one of them ends, "
                 f"or when it is stopped itself: its report says which)" + (f" {held}" if held else f"; {_then(args)}"))
        return 143  # 128 + SIGTERM, as a shell reports a process the signal ended
    except FinescopeError as e:
        if debug:
            raise
        _say(f"{error}{_one_line(e)}")
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted) and args.command in ("train", "evaluate"):  # they say what was written
            if rank == 0:
                _say(f"finescope: interrupted {e}")
            return 130
        again = _AGAIN.get(args.command, "")
        if getattr(args, "run_dir", None) and not _has_checkpoint(args):
            again = "no epoch had finished: start it again (without --resume)"
        elif args.command == "train" and not getattr(args, "run_dir", None):  # still reading the config
            again = "nothing was written: run the same command again"
        if rank == 0:
            _say("finescope: interrupted" + (f"; {again}" if again else ""))
        return 130
    except OSError as e:  # a wrong path, a name too long, a full disk: the system's words, the file, what to do
        if debug or not (e.filename or e.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f": '{e.filename}'" if e.filename else ""
            again = "; rerun with --resume" if _has_checkpoint(args) else "; rerun"
            _say(f"{error}{e.strerror}{where}; free some space{again} (files already written are complete)")
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # a run folder one may read, not write
            elsewhere = ", or write the outputs elsewhere with --out" if args.command in OUT_ELSEWHERE else ""
            _say(f"{error}{e.strerror}: '{e.filename}'; check its permissions{elsewhere}")
        else:
            _say(f"{error}{path_error_line(e)}")
        return 2
    except Exception as e:
        lost = _lost_process(e, args, _launch("WORLD_SIZE", 1), rank) if _launch("WORLD_SIZE", 1) > 1 else None
        if not debug and lost:  # gloo: a process it waited for
            _say(f"{error}{lost}")
            return 2
        if debug or "FinescopeError" not in str(e):
            raise
        _say(f"{error}{_one_line(e)}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
