"""``report.md`` and a self-contained ``report.html`` for a cv directory or a single training run.

The HTML embeds every figure as a base64 PNG and has no external links, so it opens from disk in any browser
with no network. It shows: the ablation table (pooled out-of-fold metrics with patient-clustered 95% intervals
and mean +- std over folds), paired comparisons with the reference variant, the per-magnification table,
confusion matrices, ROC curves, a reliability diagram, training curves, and the split summary (images and
groups per class on each side of every fold) so that leakage can be ruled out at a glance.

Example:
    >>> md_path, html_path = write_report("runs/cv_breakhis")
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import shlex
import warnings
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from finescope.checkpoint import earlier_evaluations, json_object, read_history  # noqa: E402
from finescope.errors import FinescopeError, FinescopeWarning  # noqa: E402
from finescope.files import ERRORS, atomic_open, write_bytes, write_text  # noqa: E402
from finescope.metrics import ECE_BINS, METRICS_VERSION, MIN_CI_GROUPS, reliability_curve, roc_curves  # noqa: E402
from finescope.oof import TABLE_METRICS, _check_row, as_arrays, read_oof_csv, summarize_predictions  # noqa: E402

SHORT = {
    "patient_recognition_rate": "PRR",
    "image_accuracy": "image acc",
    "balanced_accuracy": "bal. acc",
    "macro_f1": "macro-F1",
    "auc": "AUC",
    "patient_accuracy_majority": "patient acc (majority)",
    "patient_accuracy_mean_prob": "patient acc (mean prob)",
    "ece": "ECE",
}


# ---------------------------------------------------------------------------------------------- inputs
_SIDES = ("test", "val", "train", "all")  # what evaluate's predictions_<split>.csv hold, in report RUN's order


def _is_cv(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a cv folder: a ``predictions.csv`` beside cv's ``cv.json``, or beside ``runs/`` unless
    it is ``predict``'s (its ``path`` column: a working folder where ``train`` made ``runs/`` and ``predict`` wrote
    its default ``predictions.csv``), or with cv's ``fold`` and ``variant`` columns (a ``predict`` run inside a run
    folder writes a ``predictions.csv`` too, by default, without them; a cv's own file that lost a column is named
    as damaged, not taken for a run's)."""
    import csv

    path = run_dir / "predictions.csv"
    if not path.is_file():
        return False
    if (run_dir / "cv.json").is_file():
        return True
    with path.open(newline="", encoding="utf-8-sig", errors=ERRORS) as fh:
        header = next(csv.reader(fh), [])
    return {"fold", "variant"} <= set(header) or ((run_dir / "runs").is_dir() and "path" not in header)


def _single_run_rows(run_dir: Path, predictions: Path | None, fig_dir: Path) -> tuple[Path, str, str]:
    """Turn a training run's test predictions into an out-of-fold style CSV (one variant, one fold), written
    into ``fig_dir``; with the split its name says (``predictions_<split>.csv``; 'test' otherwise) and the name of
    the metrics written with it (``val_last`` for ``predictions_val_last.csv``: ``metrics_val_last.json``)."""
    import csv

    # evaluate's own, predictions_<split>[_<checkpoint>].csv: not another file of that prefix (`predict --out
    # RUN/predictions_new.csv`), which would be reported as the run's test split. The run's own sides first (test,
    # val, train; best.pt's before last.pt's), all images (of other data: evaluate --set data.root=OTHER) last
    sides = _SIDES

    def order(p: Path) -> tuple:  # within a side the model as trained (best.pt's, last.pt's) before other settings
        side = p.stem.removeprefix("predictions_").split("_")[0]
        return sides.index(side), p.stem not in (f"predictions_{side}", f"predictions_{side}_last"), p.name

    own = sorted((p for p in run_dir.glob("predictions_*.csv")
                  if p.stem.removeprefix("predictions_").split("_")[0] in sides), key=order)
    candidates = (predictions,) if predictions else (run_dir / "predictions_test.csv", *own)
    src = next((Path(p) for p in candidates if Path(p).is_file()), None)
    if src is None and predictions:
        raise FinescopeError(f"predictions file '{predictions}' not found; give a predictions CSV that `finescope "
                             "evaluate` wrote")
    if src is None:
        raise FinescopeError(f"'{run_dir}' holds neither a cv's predictions.csv nor predictions_<split>.csv (a run: "
                             "train or evaluate writes it); give a cv or run folder")
    if not predictions:
        _warn_if_earlier(run_dir, src, src.stem.replace("predictions", "metrics", 1) + ".json")
    model = _run_config(run_dir).get("model")
    variant = model.get("variant", "model") if isinstance(model, dict) else "model"  # a label only
    with src.open(newline="", encoding="utf-8-sig", errors=ERRORS) as fh:
        reader = csv.DictReader(fh)
        probs = [c for c in reader.fieldnames or [] if c.startswith("prob_")]
        lacking = [c for c in ("path", "group", "true", "predicted") if c not in (reader.fieldnames or [])]
        if lacking:
            raise FinescopeError(f"'{src}' has no column '{lacking[0]}' (predictions_<split>.csv has path, group, "
                                 "true, predicted and prob_<class> columns); write it again with `finescope evaluate`")
        if not probs:
            raise FinescopeError(f"'{src}' has no prob_<class> columns; write it again with `finescope evaluate`")
        rows = []
        for r in reader:
            if not r["true"]:
                continue
            rows.append({"image": r["path"], "group": r["group"], "patient": r.get("patient") or r["group"],
                         "magnification": r.get("magnification") or "", "true": r["true"],  # older CSVs: none
                         "predicted": r["predicted"], **{c: r[c] for c in probs}, "fold": src.stem.split("_", 1)[-1],
                         "variant": variant})
            # checked here to name this file and its line, not the copy below that the report reads
            _check_row(src, reader.line_num, rows[-1], [c.removeprefix("prob_") for c in probs])
    if not rows:
        raise FinescopeError(f"'{src}' holds no predictions with a true class; write it again with `finescope "
                             "evaluate`")
    out = fig_dir / "predictions_oof.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["image"])
        w.writeheader()
        w.writerows(rows)
    named = src.stem.removeprefix("predictions_").split("_")[0]  # predictions_val_last.csv: last.pt's
    if not (src.stem.startswith("predictions_") and named in ("train", "val", "test", "all")):
        return out, "test", "test"
    return out, named, src.stem.removeprefix("predictions_")  # val_last: its metrics are metrics_val_last.json


def _warn_if_earlier(run_dir: Path, src: Path, metrics_name: str) -> None:
    """Warn when ``src`` holds evaluate's predictions (recorded in ``run_dir/metrics_name``) of a best.pt or
    checkpoint that the run has written again since (trained on, or stopped training on)."""
    again = earlier_evaluations(run_dir).get(metrics_name)
    if again:
        warnings.warn(f"'{src}' holds the predictions of an earlier best.pt or checkpoint of the run, written again "
                      f"since: this report shows that model's; {again} makes them again", FinescopeWarning,
                      stacklevel=3)


def report_path(predictions: Path) -> Path:
    """The report evaluate writes for ``predictions``: beside it, named like it (``report.md`` for
    ``predictions_test.csv``, ``report_val_last.md`` for ``predictions_val_last.csv``, ``M_report.md`` for
    ``M_predictions.csv`` or any other name; ``predictions_report.md`` for predict's ``predictions.csv``, which
    evaluate never writes: report.md is a run's test report)."""
    if predictions.stem == "predictions":
        return predictions.with_name("predictions_report.md")
    stem = predictions.stem.replace("predictions", "report", 1) if "predictions" in predictions.stem \
        else predictions.stem + "_report"
    return predictions.with_name(("report" if stem == "report_test" else stem) + ".md")


def given_predictions(run_dir: Path, predictions: str | Path) -> Path:
    """The file that ``report RUN --predictions FILE`` names: FILE absolute, or relative to the working folder or
    to ``run_dir`` (refused where both hold another file of that name), checked to be a finescope predictions CSV
    (evaluate's, train's or predict's columns), not a cv's out-of-fold table or another file."""
    import csv

    given = Path(predictions)
    found = [p for p in dict.fromkeys((given,) if given.is_absolute() else (given, run_dir / given)) if p.exists()]
    if len(found) == 2 and not found[0].samefile(found[1]):
        raise FinescopeError(f"--predictions '{predictions}' names both '{found[0].resolve()}' (from the working "
                             f"folder) and '{found[1]}'; give the path of the one to report")
    if not found:
        raise FinescopeError(f"--predictions '{predictions}' not found, neither from the working folder nor in "
                             f"'{run_dir}'; give a predictions CSV that `finescope evaluate` wrote, e.g. "
                             f"{run_dir / 'predictions_test.csv'}")
    path = found[0]
    home = path.resolve().parent
    if (home / "config.yaml").is_file() and home != run_dir.resolve():  # its report there would show RUN's curves
        raise FinescopeError(f"--predictions '{path}' is in the run '{home}', not '{run_dir}'; report it with that "
                             f"run: finescope report {shlex.quote(str(home))} --predictions {shlex.quote(path.name)}")
    if path.is_dir():
        raise FinescopeError(f"--predictions '{path}' is a folder; give one of the predictions_<split>.csv files "
                             "that `finescope evaluate` wrote")
    try:
        with path.open(newline="", encoding="utf-8-sig", errors=ERRORS) as fh:
            header = next(csv.reader(fh), [])
    except csv.Error:
        header = []
    if {"fold", "variant"} <= set(header) and "path" not in header and path.name == "predictions_oof.csv":
        raise FinescopeError(f"--predictions '{path}' is the copy of a run's predictions that its report is drawn "
                             "from (in the report's _files folder); give the predictions_<split>.csv beside the "
                             "report that `finescope evaluate` or `train` wrote")
    if {"fold", "variant"} <= set(header) and "path" not in header:
        raise FinescopeError(f"--predictions '{path}' is the out-of-fold predictions of a cv; report its folder "
                             f"without --predictions: finescope report {shlex.quote(str(path.parent))}")
    lacking = [c for c in ("path", "group", "true", "predicted") if c not in header]
    if lacking or not any(c.startswith("prob_") for c in header):
        missing = f"column '{lacking[0]}'" if lacking else "prob_<class> columns"
        raise FinescopeError(f"--predictions '{path}' is no finescope predictions CSV (no {missing}: evaluate's "
                             "predictions_<split>.csv has path, group, true, predicted and prob_<class> columns); "
                             "give one that `finescope evaluate` wrote")
    return path


def _metrics_of(predictions: Path) -> tuple[str, dict]:
    """The name and content of the metrics JSON that evaluate (``metrics_<split>.json``, ``M.json`` for
    ``M_predictions.csv``) or train (``metrics.json``) wrote with ``predictions``; ('', {}) where there is none."""
    stem = predictions.stem
    names = [*([stem.replace("predictions", "metrics", 1)] if "predictions" in stem else []),
             *([stem.removesuffix("_predictions")] if stem.endswith("_predictions") else []),
             *(["metrics"] if stem == "predictions_test" else [])]
    for name in names:
        recorded = json_object(predictions.with_name(name + ".json"))
        if recorded is not None:
            return name + ".json", recorded
    return "", {}


def report_predictions(run_dir: str | Path, predictions: str | Path, n_boot: int = 1000) -> tuple[Path, Path]:
    """``report RUN --predictions FILE``: the report of that predictions CSV (see :func:`given_predictions`), as
    evaluate wrote it (beside it, named by :func:`report_path`): the split, data, ``split_leak`` and
    ``model_overrides`` recorded in the metrics JSON written with it; without one, the split its name says
    (``predictions_<split>[_<checkpoint>].csv``), else all its images, not a split of the run.

    Returns:
        The paths of the Markdown and HTML reports.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinescopeError(f"'{run_dir}' is not a folder; give the run directory the predictions are of")
    path = given_predictions(run_dir, predictions)
    name, recorded = _metrics_of(path)
    named = path.stem.removeprefix("predictions_").split("_")[0] if path.stem.startswith("predictions_") else "all"
    split = recorded.get("split") if recorded.get("split") in _SIDES else named if named in _SIDES else "all"
    if name and path.parent.resolve() == run_dir.resolve():
        _warn_if_earlier(run_dir, path, name)
    root, overrides = recorded.get("data_root"), recorded.get("model_overrides")
    return write_report(run_dir, n_boot, predictions=path, split=split,
                        data_root=root if isinstance(root, str) and root else None, out=report_path(path),
                        warning=recorded.get("split_leak") or None,
                        model_overrides=overrides if isinstance(overrides, dict) else None)


def _run_config(run_dir: Path) -> dict:
    """The run's resolved ``config.yaml``; empty when missing, unreadable or no mapping."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _run_seed(run_dir: Path) -> int:
    """The ``seed`` of a run's ``config.yaml`` for its report's bootstrap, as cv's report uses its config's; 0 where
    none is recorded (or one out of the range a config allows)."""
    seed = _run_config(run_dir).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32 else 0


def _cv_summary(run_dir: Path, csv_path: Path, n_boot: int) -> dict:
    """cv's ``summary.json`` when it was computed from ``predictions.csv`` as it is now (its ``made_from`` holds the
    file's SHA-256) under today's rule for intervals (``ci_min_groups``) and metrics (``metrics_version``), else the
    summary computed again with the cv's reference, resamples and seed (``cv.json``): a damaged, older or stale
    summary (predictions.csv edited or rewritten since; intervals of width 0 from 4 patients; values of an older
    metric) never reaches the report."""
    summary = json_object(run_dir / "summary.json")
    made_from = summary.get("made_from") if isinstance(summary, dict) else None
    if (isinstance(made_from, dict) and {"class_names", "variants"} <= summary.keys()
            and made_from.get("ci_min_groups") == MIN_CI_GROUPS and made_from.get("metrics_version") == METRICS_VERSION
            and made_from.get("predictions_sha256") == hashlib.sha256(csv_path.read_bytes()).hexdigest()):
        return summary
    record = json_object(run_dir / "cv.json") or {}
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    config = settings.get("config") if isinstance(settings.get("config"), dict) else {}

    def recorded(value, default, tp, least=None):  # a value out of range (n_boot: 0) is no record either
        ok = isinstance(value, tp) and not isinstance(value, bool) and (least is None or value >= least)
        return value if ok else default

    return summarize_predictions(csv_path, recorded(record.get("reference"), "", str),
                                 recorded(record.get("n_boot"), n_boot, int, 1),
                                 recorded(config.get("seed"), 0, int, 0))


def _recorded_warning(run_dir: Path, split: str) -> str | None:
    """The ``split_leak`` that ``evaluate`` (``metrics_<split>.json``) or ``train`` (``metrics.json``, the test
    split) recorded for a run, or None."""
    for name in (f"metrics_{split}.json", *(("metrics.json",) if split == "test" else ())):
        try:
            leak = json.loads((run_dir / name).read_text()).get("split_leak")
        except (OSError, ValueError, AttributeError):
            continue
        return leak or None
    return None


def _recorded_overrides(run_dir: Path, split: str) -> dict | None:
    """The ``model_overrides`` that ``evaluate`` recorded in ``metrics_<split>.json`` of a run, or None."""
    recorded = json_object(run_dir / f"metrics_{split}.json") or {}
    return recorded.get("model_overrides") if isinstance(recorded.get("model_overrides"), dict) else None


def _recorded_data_root(run_dir: Path, split: str) -> str | None:
    """The ``data_root`` that ``evaluate`` recorded in ``metrics_<split>.json`` of a run (the data its predictions
    are of), or None."""
    root = (json_object(run_dir / f"metrics_{split}.json") or {}).get("data_root")
    return root if isinstance(root, str) and root else None


def _histories(run_dir: Path, is_cv: bool) -> dict[str, dict[str, list[dict]]]:
    """variant -> fold -> epoch rows of history.jsonl."""
    out: dict[str, dict[str, list[dict]]] = {}
    paths = sorted(run_dir.glob("runs/*/*/history.jsonl")) if is_cv else [run_dir / "history.jsonl"]
    for path in paths:
        if not path.is_file():
            continue
        rows = read_history(path)
        variant, fold = (path.parent.parent.name, path.parent.name) if is_cv else ("model", "run")
        out.setdefault(variant, {})[fold] = rows
    return out


def _split_summaries(run_dir: Path, is_cv: bool, class_names: list[str]) -> list[tuple[str, dict]]:
    """(fold name, summarize_splits output) for every fold, or the single run's split; none, with a warning, when
    ``splits.json`` is no JSON or lacks a count of the table (of a side, of one of ``class_names``)."""
    path = run_dir / "splits.json"
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if not isinstance(raw, dict):
        warnings.warn(f"'{path}' is not valid JSON: the report leaves out the split summary", FinescopeWarning,
                      stacklevel=2)
        return []
    try:
        if is_cv:
            found = [(f["name"], f["summary"]) for f in raw.get("folds", [])]
        else:
            found = [("split", raw["summary"])] if "summary" in raw else []
        split_table(found, class_names)  # every count the table shows is there
    except (KeyError, TypeError, AttributeError) as e:
        missing = f" ({e.args[0]!r} missing)" if isinstance(e, KeyError) else ""
        warnings.warn(f"'{path}' holds no split summary that finescope wrote{missing}: the report leaves out the "
                      "split summary", FinescopeWarning, stacklevel=2)
        return []
    return found


# ---------------------------------------------------------------------------------------------- figures
def _as_written(figure):
    """``figure`` drawing its text as written: a class, variant or fold name holding '$' ('cost $5 and $6') is no
    mathtext to typeset, or to fail on ('a$\\foo$' ended the report in a ParseFatalException)."""
    @functools.wraps(figure)
    def drawn(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):  # tick labels, legends and titles made inside
            return figure(*args, **kwargs)
    return drawn


def _png(fig) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a class name in Chinese: drawn as the font can, without a warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


@_as_written
def _fig_confusion(summary: dict) -> bytes:
    names = summary["class_names"]
    variants = list(summary["variants"])
    fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 3.0), squeeze=False)
    for ax, v in zip(axes[0], variants, strict=True):
        cm = np.array(summary["variants"][v]["pooled"]["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), n in np.ndenumerate(cm):
            ax.text(j, i, str(n), ha="center", va="center", color="black" if n < cm.max() / 2 else "white")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(v, fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    return _png(fig)


@_as_written
def _fig_roc(rows: list[dict], summary: dict) -> bytes:
    names = summary["class_names"]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for v in summary["variants"]:
        y, p, _ = as_arrays([r for r in rows if r["variant"] == v], names)
        curves = roc_curves(y, p, names)
        for cls, c in curves.items():
            label = f"{v} ({c['auc']:.3f})" if len(curves) == 1 else f"{v} {cls} ({c['auc']:.3f})"
            ax.plot(c["fpr"], c["tpr"], label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (AUC)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    else:  # every image of one class: no curve is defined
        ax.text(0.5, 0.5, "undefined: the images hold one class", ha="center", va="center", fontsize=8)
    return _png(fig)


@_as_written
def _fig_reliability(rows: list[dict], summary: dict) -> bytes:
    names = summary["class_names"]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for v in summary["variants"]:
        y, p, _ = as_arrays([r for r in rows if r["variant"] == v], names)
        rc = reliability_curve(y, p, n_bins=ECE_BINS)  # the bins of the ECE in its legend
        pts = [(c, a) for c, a in zip(rc["bin_confidence"], rc["bin_accuracy"], strict=True) if c is not None]
        ece = summary["variants"][v]["pooled"]["ece"]["value"]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{v} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram, {ECE_BINS} bins", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


@_as_written
def _fig_curves(histories: dict, order: list[str]) -> bytes | None:
    if not histories:
        return None
    fig, axes = plt.subplots(2, len(histories), figsize=(3.4 * len(histories), 5.0), squeeze=False)
    ranked = sorted(histories.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    for col, (variant, folds) in enumerate(ranked):
        for fold, hist in sorted(folds.items()):
            ep = [h["epoch"] + 1 for h in hist]
            axes[0][col].plot(ep, [h.get("train_loss") for h in hist], label=fold)
            val = [h.get("val_balanced_accuracy") for h in hist]
            if any(v is not None for v in val):
                axes[1][col].plot(ep, [np.nan if v is None else v for v in val], label=fold)
        axes[0][col].set_title(variant, fontsize=9)
        axes[0][col].set_ylabel("train loss", fontsize=8)
        axes[1][col].set_ylabel("val balanced acc", fontsize=8)
        axes[1][col].set_xlabel("epoch", fontsize=8)
        for ax in axes[:, col]:  # whole epochs, one tick at least (a 1-epoch run's axis spans 0.945 to 1.055)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes[0][0].legend(fontsize=6)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- tables
def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _interval(d: dict) -> str:
    """``[low, high]`` of a bootstrap result, or ``[n/a (why)]`` when it has none (e.g. "only 4 patients")."""
    if d["low"] is None and d.get("ci_note"):
        return f"[n/a ({d['ci_note']})]"
    return f"[{_fmt(d['low'])}, {_fmt(d['high'])}]"


def _mean_std(ms: dict, of: int) -> str:
    """``mean ± std`` of a ``summarize_folds`` entry, with ``, n of N folds`` when it rests on fewer than the ``of``
    folds (a metric undefined in some: the AUC of a fold of one class)."""
    fewer = f", {ms['n']} of {of} folds" if ms["n"] < of else ""
    return f"{_fmt(ms['mean'])} ± {_fmt(ms['std'])}{fewer}"


def ablation_table(summary: dict, folds: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per variant, each metric as pooled value [95% CI] and, with ``folds``, mean +- std over
    folds (and over how many, where a metric is undefined in some)."""
    header = ["variant", *[SHORT[m] for m in TABLE_METRICS]]
    rows = []
    for v, s in summary["variants"].items():
        cells = []
        for m in TABLE_METRICS:
            pooled, ms = s["pooled"][m], s["mean_std"][m]
            over_folds = f" ({_mean_std(ms, len(s['folds']))})" if folds else ""
            cells.append(f"{_fmt(pooled['value'])} {_interval(pooled)}{over_folds}")
        rows.append([v, *cells])
    return header, rows


def _p_value(d: dict, n_boot: int | None) -> str:
    """``p=0.046`` (three decimals: two put 0.046 and 0.054 both at 0.05), or ``p<0.002`` where no resample fell
    on the other side of 0, which bounds p by 2 / resamples rather than making it 0."""
    p, n = d.get("p_value"), d.get("n_boot", n_boot)  # summaries before n_boot was recorded: the cv's resamples
    if p == 0 and isinstance(n, int) and n > 0:
        return f"p<{2 / n:.3g}"
    return f"p={_fmt(p)}"


def comparison_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each variant minus the reference, difference [95% CI] (p)."""
    header = ["variant − reference", *[SHORT[m] for m in TABLE_METRICS]]
    rows = []
    for c in summary["comparisons"]:
        cells = [f"{_fmt(d['diff'], 3)} {_interval(d)} ({_p_value(d, summary.get('n_boot'))})"
                 for d in (c["metrics"][m] for m in TABLE_METRICS)]
        rows.append([f"{c['variant']} − {c['reference']}", *cells])
    return header, rows


def magnification_table(summary: dict, folds: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per variant and magnification, PRR and image accuracy mean +- std over folds (without
    ``folds``: the one run's value)."""
    header = ["variant", "magnification", "PRR", "image acc", "bal. acc", *(["folds"] if folds else [])]
    rows = []
    for v, s in summary["variants"].items():
        for mag, ms in s["per_magnification"].items():
            cells = [_mean_std(ms[m], ms["image_accuracy"]["n"]) if folds else _fmt(ms[m]["mean"])
                     for m in ("patient_recognition_rate", "image_accuracy", "balanced_accuracy")]
            rows.append([v, f"{mag}X", *cells, *([str(ms["image_accuracy"]["n"])] if folds else [])])
    return header, rows


def split_table(splits: list[tuple[str, dict]], class_names: list[str], folds: bool = True,
                ) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per fold (with ``folds``) and side, images and groups (per class) and groups shared with
    another side."""
    header = [*(["fold"] if folds else []), "side", "images", "groups", *[f"{n} img/grp" for n in class_names],
              "shared groups"]
    rows = []
    for fold, summ in splits:
        for side, s in summ.items():
            per = [f"{s['per_class'][n]['images']}/{s['per_class'][n]['groups']}" for n in class_names]
            rows.append([*([fold] if folds else []), side, str(s["images"]), str(s["groups"]), *per,
                         str(s["shared_groups"])])
    return header, rows


def _md_cell(text: str) -> str:
    """``text`` as one Markdown table cell: a class or fold name's '|' escaped (it would split the cell), with the
    '\\' that would escape it, and a line break (it would end the row) shown as a space."""
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").splitlines())


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ---------------------------------------------------------------------------------------------- assembly
_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}"
        "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "th{background:#eee}img{max-width:100%;border:1px solid #ddd;margin:0.3em 0}p.note{color:#555}")

# after load, the page records whether every embedded image decoded (read by the headless-browser test)
_CHECK_JS = ("<script>window.addEventListener('load',function(){var ok=Array.prototype.every.call("
             "document.images,function(i){return i.complete&&i.naturalWidth>0});"
             "document.body.setAttribute('data-images-ok',String(ok&&document.images.length>0));});</script>")


_SPLIT_WORDS = {"test": ("Test", "test split"), "val": ("Validation", "validation split"),
                "train": ("Training-split", "training split, the images it was trained on")}


def _blocks(run_dir: Path, summary: dict, rows: list[dict], is_cv: bool, split: str, data_root: str | None,
            ) -> list[tuple]:
    """The report as (kind, title, payload, note) blocks: kind is 'table' or 'figure'. A single run's report
    names what it was computed on: one of the run's splits, or every image of ``data_root`` (``split='all'``)."""
    names = summary["class_names"]
    prr = "PRR = patient recognition rate (Spanhol et al. 2016)."
    if is_cv:
        blocks: list[tuple] = [("table", "Ablation table", ablation_table(summary),
                                f"Pooled out-of-fold value [patient-clustered 95% bootstrap interval] (mean ± std "
                                f"over folds; 'n of N folds' where a metric is undefined in some, e.g. the AUC of a "
                                f"fold of one class). {prr}")]
    else:
        of = f" of '{data_root}'" if data_root else ""
        title, where = _SPLIT_WORDS.get(split, ("All-image", f"all {len(rows)} images{of} (not a split of the run)"))
        where = where if split == "all" else f"the run's {where}"
        blocks = [("table", f"{title} metrics", ablation_table(summary, folds=False),
                   f"On {where}: value [patient-clustered 95% bootstrap interval]. {prr}")]
    if summary["comparisons"]:
        blocks.append(("table", f"Paired comparison with '{summary['reference']}'", comparison_table(summary),
                       "Difference on the same out-of-fold images [95% interval resampling patients] "
                       "(two-sided bootstrap p). An interval containing 0 is no evidence of a difference."))
    mag = magnification_table(summary, folds=is_cv)
    if len(mag[1]) >= (1 if is_cv else 2):  # a run of one magnification: its metrics above say it all
        blocks.append(("table", "Per magnification", mag, "Mean ± std over folds." if is_cv else f"On {where}."))
    blocks.append(("figure", "Confusion matrices (out-of-fold, pooled)" if is_cv else f"Confusion matrix ({where})",
                   _fig_confusion(summary), ""))
    blocks.append(("figure", "ROC curves", _fig_roc(rows, summary), ""))
    blocks.append(("figure", "Reliability diagram", _fig_reliability(rows, summary), ""))
    histories = _histories(run_dir, is_cv)
    if is_cv:  # runs of variants a rerun with fewer --variants no longer compares are not this cv's
        histories = {v: h for v, h in histories.items() if v in summary["variants"]}
    curves = _fig_curves(histories, list(summary["variants"]))
    if curves is not None:
        blocks.append(("figure", "Training curves", curves, "One line per fold." if is_cv else ""))
    splits = _split_summaries(run_dir, is_cv, names)
    if splits and split != "all":  # the run's splits say nothing of other data
        blocks.append(("table", "Split summary", split_table(splits, names, folds=is_cv),
                       "Images/groups per class on each side; 'shared groups' counts groups also on another "
                       f"side{' of the same fold' if is_cv else ''} and must be 0 everywhere (no patient leakage). "
                       "Images skipped as unreadable (data.on_error: skip) are counted here, not in the metrics "
                       "(n_skipped in metrics.json)."))
    return blocks


def _render_md(title: str, blocks: list[tuple], fig_dir: Path) -> str:
    parts = [f"# {title}", ""]
    figures = 0  # numbered among the figures (1, 2, ...), not among the blocks: the tables before them vary
    for kind, heading, payload, note in blocks:
        parts += [f"## {heading}", ""]
        if note:
            parts += [note, ""]
        if kind == "table":
            parts += [_md_table(*payload), ""]
        else:
            figures += 1
            name = f"figure_{figures}.png"
            write_bytes(fig_dir / name, payload)  # whole or not at all, as every file of a run
            alt = heading.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")  # a data folder's name
            # percent-encoded: a space of an --out name ('new data (2)_report_files/') ends a bare link
            parts += [f"![{alt}]({quote(f'{fig_dir.name}/{name}')})", ""]
    for stale in fig_dir.glob("figure_*.png"):  # an earlier report's figures beyond this one's: not linked any more
        number = stale.stem.removeprefix("figure_")
        if number.isdigit() and int(number) > figures:
            stale.unlink(missing_ok=True)
    return "\n".join(parts)


def _render_html(title: str, blocks: list[tuple]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for i, (kind, heading, payload, note) in enumerate(blocks):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        if kind == "table":
            parts.append(_html_table(*payload, cls="ablation" if i == 0 else "data"))  # the metrics first
        else:
            data = base64.b64encode(payload).decode("ascii")
            parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>")
    parts.append(_CHECK_JS + "</body></html>")
    return "".join(parts)


def write_report(run_dir: str | Path, n_boot: int = 1000, predictions: str | Path | None = None,
                 split: str = "test", data_root: str | None = None, out: str | Path | None = None,
                 warning: str | None = None, model_overrides: dict | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (figures in ``report_files/``) and a self-contained ``report.html`` into ``run_dir``.

    Args:
        run_dir: a ``finescope cv`` directory (with ``predictions.csv``) or a training run directory (with
            ``predictions_test.csv``, after ``train`` or ``evaluate``).
        n_boot: bootstrap resamples when the summary has to be computed here (a run's always is, seeded by the
            ``seed`` of its ``config.yaml``, 0 where none; a cv's with the resamples and seed of ``cv.json``).
        predictions: for a run directory, the predictions CSV to report (default ``predictions_test.csv``, else the first
            of evaluate's: ``predictions_test_*.csv`` (another checkpoint's, e.g. last.pt's), ``predictions_val*.csv``,
            ``predictions_train*.csv``, ``predictions_all*.csv``).
        split: for a run directory, what ``predictions`` hold: the run's ``train``, ``val`` or ``test`` split, or
            ``all`` images of ``data_root`` (other data), named so in the report (``report RUN`` reads
            ``data_root`` from the ``metrics_<split>.json`` that evaluate wrote beside the predictions it found).
        out: the report's Markdown file instead of ``run_dir/report.md``; the HTML page and the figure folder
            take its name (``OUT.html``, ``OUT_files/``).
        warning: what is wrong with the run's split (e.g. patients on two sides under today's grouping), shown
            above the metrics and the split summary.
        model_overrides: ``{model key: value}`` that evaluate ran the model with instead of its trained settings,
            named above the metrics. Without ``predictions`` (``report RUN``) both are read, when not given, from
            the ``metrics_<split>.json`` beside the predictions CSV found; with them, only what is given is shown.

    Returns:
        The paths of the Markdown and HTML reports.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinescopeError(f"'{run_dir}' is not a folder; give a cv or run directory")
    md_path = Path(out) if out else run_dir / "report.md"
    html_path = md_path.with_suffix(".html")
    fig_dir = md_path.with_name(md_path.stem + "_files")
    is_cv = predictions is None and _is_cv(run_dir)  # given predictions are a run's (evaluate's), whatever is beside
    if is_cv:
        csv_path = run_dir / "predictions.csv"
    else:
        csv_path, named, recorded = _single_run_rows(run_dir, predictions, fig_dir)
        split = split if predictions is not None else named  # `report RUN` reports what the CSV it found holds
        if predictions is None and data_root is None:  # `report RUN`: the data that evaluate recorded beside it
            data_root = _recorded_data_root(run_dir, recorded)
    summary = (_cv_summary(run_dir, csv_path, n_boot) if is_cv
               else summarize_predictions(csv_path, n_boot=n_boot, seed=_run_seed(run_dir)))
    rows, _ = read_oof_csv(csv_path)
    fig_dir.mkdir(parents=True, exist_ok=True)
    title = f"finescope report: {run_dir.resolve().name}"
    blocks = _blocks(run_dir, summary, rows, is_cv, split, data_root)
    if predictions is None and not is_cv:  # `report RUN`: what evaluate or train recorded beside the CSV it found
        # (evaluate gives its own: a split_leak of None there is no leak, not one to take from another evaluation)
        warning = warning if warning is not None else _recorded_warning(run_dir, recorded)
        model_overrides = model_overrides if model_overrides is not None else _recorded_overrides(run_dir, recorded)
    if model_overrides:  # another model than the one trained: said above its metrics
        changed = " ".join(f"{k}={v}" for k, v in model_overrides.items())
        note = f"Evaluated with --set {changed}, not the model's trained settings. {blocks[0][3]}"
        blocks[0] = (*blocks[0][:3], note)
    if warning:  # above the metrics and the split summary, whose stored counts predate it
        blocks = [(k, h, p, f"Warning: {warning}. {n}" if i == 0 or h == "Split summary" else n)
                  for i, (k, h, p, n) in enumerate(blocks)]
    write_text(md_path, _render_md(title, blocks, fig_dir))
    write_text(html_path, _render_html(title, blocks))
    return md_path, html_path


__all__ = ["ablation_table", "comparison_table", "magnification_table", "report_predictions", "split_table",
           "write_report"]
