"""``finescope explain``: explain many images, measure faithfulness, write figures, galleries and numbers.

Writes into the output folder::

    index.html            the gallery (opens from disk; sortable by confidence, correctness, class)
    images/NNNN_*.png     one panel per image: image, one overlay per method, the crops
    evidence/<class>/     the most-attended crops of the images predicted as each class
    faithfulness.json     deletion/insertion AUCs per method, for the model-free ``detail`` map and for random
                          orders; hit rate, pointing game; the model settings changed with ``--set``
    faithfulness.png      the mean deletion and insertion curves
    results.csv           one row per image

The figures are drawn in a hidden folder beside them and replace an earlier run's only once all are there, the
gallery written last: a run that fails or is interrupted leaves the earlier run's folder as it was. The run holds
a lock on that folder (``.lock``, with its pid and host): the next run removes the folders of runs that are gone,
and refuses to start while another run writes into the same folder.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from finescope.checkpoint import evaluated_suffix
from finescope.errors import SKIP_ADVICE, FinescopeError, FinescopeWarning
from finescope.explain import faithfulness as fa
from finescope.explain.core import explain_loaded
from finescope.explain.evidence import EvidenceCollector, safe_name
from finescope.explain.inputs import (
    Inputs,
    path_inputs,
    run_dir_of,
    size_notes,
    split_inputs,
    training_images,
)
from finescope.explain.maps import NORMALISATIONS, map_peak
from finescope.explain.methods import CamExplainer, resolve_methods
from finescope.explain.overlay import save_explanation_figure, save_figure
from finescope.files import EXPLAIN_FIGURES, atomic_open, json_text, write_bytes, write_text
from finescope.progress import Progress


@dataclass(frozen=True)
class ExplainSettings:
    """Options of ``finescope explain`` (the CLI flags of the same names)."""

    methods: tuple[str, ...] = ("auto",)  # auto = attention (if the model has it), gradcam, gradcam++
    normalise: str = "max"  # max | percentile: display scale of each map
    percentile: float = 99.0
    faithfulness: bool = True  # deletion / insertion curves (the slow part)
    steps: int = 10  # T steps of the curves
    grid: int = 16  # blocks along the image's short side
    baseline: str = "blur"  # blur | mean: what removed blocks become
    random_repeats: int = 1  # random block orders per image (the baseline is a mean over images)
    target: str = "true"  # true | predicted: the class the CAMs and the curves follow
    tolerance: float = 15.0  # pointing game tolerance in pixels (Zhang et al. 2016)
    top: int = 16  # crops per class in the evidence gallery; mistakes shown
    limit: int = 0  # explain at most this many images, spread evenly over the list (0 = all)
    seed: int = 0

    def check(self) -> None:
        if self.normalise not in NORMALISATIONS:
            raise FinescopeError(f"--normalise '{self.normalise}' is unknown; choose one of: {', '.join(NORMALISATIONS)}")
        if self.baseline not in fa.BASELINES:
            raise FinescopeError(f"--baseline '{self.baseline}' is unknown; choose one of: {', '.join(fa.BASELINES)}")
        if self.target not in ("true", "predicted"):
            raise FinescopeError(f"--target '{self.target}' is unknown; choose true or predicted")
        for name in ("grid", "random_repeats", "top"):
            if getattr(self, name) < 1:
                raise FinescopeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps < 2:  # one step holds only the image and the baseline, the same for every map
            raise FinescopeError(f"--steps must be at least 2 (1 step only compares the image with the baseline, "
                                 f"the same curve for every map), got {self.steps}")
        if self.limit < 0:
            raise FinescopeError(f"--limit must be >= 0 (0: every image), got {self.limit}")
        if not 0 < self.percentile <= 100:
            raise FinescopeError(f"--percentile must be in (0, 100], got {self.percentile}")
        if not self.tolerance >= 0 or self.tolerance == float("inf"):  # nan: no map hits, inf: every map does
            raise FinescopeError(f"--tolerance must be >= 0 pixels, got {self.tolerance}")


def settings_options(settings: ExplainSettings) -> list[str]:
    """The ``finescope explain`` flags that give ``settings`` where they are not the defaults, e.g.
    ``['--no-faithfulness', '--limit', '50']``: what the command that makes an explanation again repeats."""
    default, options = ExplainSettings(), []
    for name, value in asdict(settings).items():
        if name == "seed" or value == getattr(default, name):  # seed: no flag
            continue
        if name == "faithfulness":
            options.append("--no-faithfulness")
        else:
            flag = "--method" if name == "methods" else f"--{name.replace('_', '-')}"
            options += [flag, *map(str, value if isinstance(value, tuple) else [value])]
    return options


@dataclass
class _Context:
    """Everything the per-image step needs."""

    model: torch.nn.Module
    cfg: object
    class_names: list[str]
    methods: list[str]
    cams: CamExplainer
    settings: ExplainSettings
    out: Path
    train_sizes: set
    evidence: EvidenceCollector


CONTROLS = ("detail", "random")  # measured like the methods, knowing nothing of the model


def _faithfulness(ctx: _Context, expl, index: int, image: torch.Tensor, baseline: torch.Tensor,
                  detail: torch.Tensor) -> dict:
    """Deletion / insertion AUCs of every method, of the ``detail`` map and of random orders for one image."""
    from finescope.engine import autocast

    s, train = ctx.settings, ctx.cfg.train
    # in the precision of the prediction (train.amp, train.cpu_amp), so that each curve starts at its p_target
    with autocast(next(ctx.model.parameters()).device, train.amp, train.cpu_amp):
        curves = fa.map_curves(ctx.model, image, {**expl.maps, "detail": detail}, expl.target, baseline, s.grid,
                               s.steps, s.random_repeats, seed=s.seed * 100003 + index,
                               predict_with=ctx.cfg.model.predict_with)
    row = {}
    for m, c in curves.items():
        row[f"{m}_deletion_auc"] = fa.curve_auc(c["deletion"])
        row[f"{m}_insertion_auc"] = fa.curve_auc(c["insertion"])
    return {"row": row, "curves": {m: {k: v.tolist() for k, v in c.items()} for m, c in curves.items()}}


def _ground_truth(ctx: _Context, expl, cells: list, detail: torch.Tensor) -> dict:
    """Hit rate of the boxes, their coverage, and the pointing game of every map and of ``detail``, for one
    image."""
    row: dict = {"n_cells": len(cells)}
    if expl.boxes is not None:
        row["hits"], _ = fa.hit_count(expl.boxes, cells)
        cover = fa.box_coverage(expl.boxes, tuple(expl.image.shape[-2:]))
        row["box_union_fraction"], row["box_largest_fraction"] = cover["union"], cover["largest"]
    for m, heat in {**expl.maps, "detail": detail}.items():
        row[f"{m}_pointing"] = fa.pointing_hit(heat, cells, ctx.settings.tolerance)  # None for a flat map
    return row


def _flat_maps(maps: dict[str, torch.Tensor]) -> dict:
    """``{method}_flat: True`` for each flat map (no maximum: :func:`~finescope.explain.maps.map_peak`)."""
    return {f"{m}_flat": True for m, heat in maps.items() if map_peak(heat) is None}


UNREADABLE, TOO_THIN = "unreadable", "too long and thin for the model's view"  # why explain skips an image


class _Skipped(FinescopeError):
    """An image explain skips for another reason than being unreadable; ``kind`` says which, in a few words."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _explain_one(ctx: _Context, index: int, item) -> dict:
    """Explain, measure and draw one readable image; returns its result row (and curves)."""
    from finescope.data.dataset import check_view_side, read_image
    from finescope.trainer import view_image_side

    image = read_image(item.path, ctx.cfg.data.bit_depth)
    try:
        check_view_side(item.path, tuple(image.shape[-2:]), view_image_side(ctx.cfg))
    except FinescopeError as e:
        raise _Skipped(str(e), TOO_THIN) from None
    train = ctx.cfg.train
    expl = explain_loaded(ctx.model, image, ctx.methods, ctx.class_names, ctx.cams, item.label, ctx.settings.target,
                          ctx.cfg.model.predict_with, train.amp, train.cpu_amp)
    expl.path = item.path
    m = ctx.cfg.model
    expl.notes = size_notes(tuple(image.shape[-2:]), ctx.train_sizes, m.global_size, m.local_size,
                            expl.boxes is not None)
    figure = Path("images") / f"{index:05d}_{safe_name(Path(item.name).stem)[:60]}.png"
    save_explanation_figure(expl, ctx.out / figure, ctx.settings.normalise, ctx.settings.percentile, item.cells,
                            title=item.name)
    ctx.evidence.add(ctx.model, expl, item.name, figure.as_posix())
    row = {**_base_row(expl, item, figure), **_flat_maps(expl.maps)}
    curves = None
    if not ctx.settings.faithfulness and item.cells is None:
        return {"row": row, "curves": curves}
    image = expl.image.float() / 255
    baseline = fa.baseline_image(image, ctx.settings.baseline)
    detail = fa.detail_map(image, baseline, window=max(1, round(min(image.shape[-2:]) / ctx.settings.grid)))
    row.update(_flat_maps({"detail": detail}))
    if ctx.settings.faithfulness:
        f = _faithfulness(ctx, expl, index, image, baseline, detail)
        row.update(f["row"])
        curves = f["curves"]
    if item.cells is not None:
        row.update(_ground_truth(ctx, expl, item.cells, detail))
    return {"row": row, "curves": curves}


def _base_row(expl, item, figure: Path) -> dict:
    from finescope.trainer import box_string  # written as predict writes them

    names = expl.class_names
    boxes = "" if expl.boxes is None else box_string(expl.boxes.tolist(), expl.box_mass.tolist())
    return {
        "name": item.name, "path": item.path, "figure": figure.as_posix(),
        "true": "" if item.label is None else names[item.label], "predicted": names[expl.predicted],
        "confidence": expl.confidence, "correct": expl.correct, "target": names[expl.target],
        "p_target": float(expl.probabilities[expl.target]), "boxes": boxes, "notes": " | ".join(expl.notes),
        "size": f"{expl.image.shape[2]}x{expl.image.shape[1]}",
    }


# -- aggregation -------------------------------------------------------------------------------------------
def _mean_std(values: list) -> dict:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std()) if len(v) else None, "n": int(len(v))}


def _method_summary(rows: list[dict], curves: list[dict], method: str) -> dict:
    out: dict = {}
    for mode in ("deletion", "insertion"):
        stats = _mean_std([r.get(f"{method}_{mode}_auc") for r in rows])
        out[f"{mode}_auc"], out[f"{mode}_auc_std"], out["n_images"] = stats["mean"], stats["std"], stats["n"]
        if curves:
            out[f"{mode}_curve"] = np.mean([c[method][mode] for c in curves], axis=0).round(4).tolist()
    pointing = [r[f"{method}_pointing"] for r in rows if r.get(f"{method}_pointing") is not None]
    if pointing:
        out["pointing_game"], out["pointing_n"] = float(np.mean(pointing)), len(pointing)
    flat = sum(bool(r.get(f"{method}_flat")) for r in rows)
    if flat:  # images whose map has no maximum: left out of the evidence crops
        out["flat_maps"] = flat
    left_out = sum(bool(r.get(f"{method}_flat")) and r.get("n_cells", 0) > 0 for r in rows)
    if left_out:  # ... and of the pointing game, where it scores the image (one with nuclei)
        out["pointing_flat_maps"] = left_out
    return out


def _box_summary(rows: list[dict]) -> dict | None:
    """Hit rate of the selected boxes over the true nuclei, with how much of the image the boxes cover."""
    gt = [r for r in rows if r.get("hits") is not None and r["n_cells"] > 0]
    if not gt:
        return None
    hits, cells = sum(r["hits"] for r in gt), sum(r["n_cells"] for r in gt)
    union = [r["box_union_fraction"] for r in gt]
    return {
        "hit_rate": hits / cells, "hits": hits, "cells": cells, "images": len(gt),
        "definition": "a true atypical nucleus is hit when its centre lies inside at least one of the K boxes",
        "mean_box_union_fraction": float(np.mean(union)),
        # randomly placed nuclei land in the boxes this often: each image's coverage once per nucleus, as hit_rate
        "chance_hit_rate": float(np.dot([r["n_cells"] for r in gt], union) / cells),
        "mean_largest_box_fraction": float(np.mean([r["box_largest_fraction"] for r in gt])),
        "images_with_a_box_over_half_the_image": sum(r["box_largest_fraction"] > 0.5 for r in gt),
    }


def summarise(rows: list[dict], curves: list[dict], methods: list[str], settings: ExplainSettings) -> dict:
    """The numbers of ``faithfulness.json``."""
    known = [r for r in rows if r["correct"] is not None]
    names = methods + [c for c in CONTROLS if any(k.startswith(f"{c}_") for r in rows for k in r)]
    return {
        "images": len(rows),
        "accuracy": float(np.mean([r["correct"] for r in known])) if known else None,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("top", "limit")},
        "methods": {m: _method_summary(rows, curves, m) for m in names},
        "boxes": _box_summary(rows),
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _plot_curves(path: Path, summary: dict) -> Path | None:
    """Mean deletion and insertion curves of every method and of random orders."""
    from finescope.explain.overlay import _pyplot

    methods = {m: s for m, s in summary["methods"].items() if s.get("deletion_curve")}
    if not methods:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, mode in zip(axes, ("deletion", "insertion"), strict=True):
        for m, s in methods.items():
            y = s[f"{mode}_curve"]
            ax.plot(np.linspace(0, 1, len(y)), y, "--" if m in CONTROLS else "-",
                    label=f"{m} (AUC {s[f'{mode}_auc']:.3f})")
        ax.set_xlabel(f"fraction of blocks {'removed' if mode == 'deletion' else 'revealed'}, most attended first")
        ax.set_ylabel("probability of the explained class")
        ax.set_title(f"{mode} (lower AUC is better)" if mode == "deletion" else f"{mode} (higher AUC is better)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


# -- the command -------------------------------------------------------------------------------------------
def _inputs(cfg, state, class_names, paths, split) -> Inputs:
    if paths and split:
        raise FinescopeError("give either image paths or --split, not both")
    if split:
        return split_inputs(cfg, state, class_names, split)
    if not paths:
        raise FinescopeError("nothing to explain: give image files/folders, or --split test with a run directory")
    inputs = path_inputs(list(paths), class_names, cfg)
    inputs.train_sizes, inputs.trained, inputs.split_leak = training_images(cfg, state, class_names,
                                                                            [i.path for i in inputs.items])
    return inputs


def default_out(checkpoint: str | Path, split: str | None, suffix: str = "") -> Path:
    """``RUN/explain_<split><suffix>`` (or ``RUN/explain_files<suffix>``) for a run directory, else ``explain``;
    ``suffix``: :func:`~finescope.checkpoint.evaluated_suffix` (other data, or the model with other settings)."""
    p = Path(checkpoint)
    return p / f"explain_{split or 'files'}{suffix}" if p.is_dir() else Path("explain")


# what says that a folder holds a finished explanation (trainer's warning reads results.csv's time)
_RECORDS = ("index.html", "results.csv", "faithfulness.json")
STAGE_PREFIX = ".finescope-explain-"  # the hidden folder in ``out`` where a run draws its figures
STAGE_GRACE_S = 60.0  # a stage whose lock names no run yet is one starting for this long, then a killed one's

try:
    import fcntl
except ImportError:  # Windows: no flock; every stage found is taken for a killed run's, as before
    fcntl = None


def _check_out(out: Path, paths) -> None:
    """Refuse an ``out`` that a folder to explain holds, or whose images/ or evidence/ holds one: a second run
    would explain the first one's figures. Image files given one by one are no such folder (they may be in
    ``out/images``; explain keeps them)."""
    if out.exists() and not out.is_dir():  # found before the model is read, not when the folder is made
        raise FinescopeError(f"--out '{out}' is a file, and explain writes a folder there (index.html, images/, ...): "
                             f"give a folder, e.g. --out {out.parent / 'explain'}")
    where = Path(os.path.realpath(out))
    for p in paths:
        if not Path(p).is_dir():
            continue
        folder = Path(os.path.realpath(p))
        if where.is_relative_to(folder):
            raise FinescopeError(f"the output folder '{out}' is inside '{p}', a folder to explain: a second run would "
                                 "take this run's figures (images/, evidence/) for images to explain; choose an --out "
                                 "outside it")
        for sub, _, _ in EXPLAIN_FIGURES:
            if folder.is_relative_to(where / sub):
                raise FinescopeError(f"'{p}' is inside '{out / sub}', where explain writes its figures: a second run "
                                     "would explain them; choose an --out outside it")


def _lock_stage(stage: Path):
    """Hold an exclusive lock on ``stage/.lock`` for the run (the open file: closing it, or the process's end
    however it ends, releases it) and write ``pid N on HOST`` into it; None without locks."""
    if fcntl is None:
        return None
    fh = open(stage / ".lock", "a+")  # noqa: SIM115 (held open for the run)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocking: another run's _clear_stages holds it only to look
    except OSError:  # a file system without locks
        fh.close()
        return None
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
    fh.flush()
    return fh


def _clear_stages(out: Path, own: Path) -> None:
    """Remove the hidden folders of explain runs into ``out`` that are gone (killed: their lock is free), and
    refuse while another run draws in one (its lock is held, or names no run yet and is under a minute old): both
    would publish into ``out``, each over the other's figures."""
    for old in out.glob(f"{STAGE_PREFIX}*"):
        if old == own or not old.is_dir():
            continue
        if fcntl is None:
            shutil.rmtree(old, ignore_errors=True)
            continue
        try:
            age = time.time() - old.stat().st_mtime  # before the open below, which may make the .lock
            fh = open(old / ".lock", "a+")  # noqa: SIM115 (closed below)
        except OSError:  # gone meanwhile, or not ours to open: left
            continue
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                live = False
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    continue  # no locks on this file system: whose it is is unknown, so it stays
                live = True
            fh.seek(0)
            holder = fh.read().strip()
            if live or (not holder and age < STAGE_GRACE_S):
                raise FinescopeError(f"'{out}' is being written by another finescope explain "
                                     f"({holder or 'starting'}); wait for it to end, or choose another --out")
            shutil.rmtree(old, ignore_errors=True)


def _clear_previous(out: Path, keep: set[str]) -> None:
    """Remove the figures an earlier explain run left in ``out``'s images/ and evidence/ folders. Only files
    named as explain names them go, and never one of the images to explain (``keep``, real paths): an ``--out``
    that holds the user's own images/ folder keeps it."""
    for sub, pattern, name in EXPLAIN_FIGURES:
        for png in (out / sub).glob(pattern):
            if name.fullmatch(png.name) and os.path.realpath(png) not in keep:
                png.unlink()


def _publish(stage: Path, out: Path, keep: set[str]) -> None:
    """Put the figures drawn in ``stage`` in place of an earlier run's in ``out``. The earlier gallery and tables
    go first, so that a run stopped on the way leaves none that shows figures no longer there."""
    for name in _RECORDS:
        (out / name).unlink(missing_ok=True)
    _clear_previous(out, keep)
    for png in sorted(stage.rglob("*.png")):
        target = out / png.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(png, target)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            write_bytes(target, png.read_bytes())  # images/ or evidence/ a link to another file system


def spread(items: list, limit: int) -> list:
    """At most ``limit`` items spread evenly over the list (sorted lists then keep every class); 0 = all."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))]


def _loop(ctx: _Context, inputs: Inputs, progress: bool) -> tuple[list, list, list]:
    from finescope.errors import FinescopeError as _Err

    rows, curves, skipped = [], [], []
    items = spread(inputs.items, ctx.settings.limit)
    with Progress(items, desc="explain", disable=not progress, dynamic_ncols=True) as bar:
        for i, item in enumerate(bar):
            try:
                result = _explain_one(ctx, i, item)
            except _Err as e:  # unreadable (or too thin) image: skip it, name it on stderr (as predict does), list it
                reason = str(e).splitlines()[0].removesuffix(SKIP_ADVICE)
                warnings.warn(f"skipped: {reason}", FinescopeWarning, stacklevel=2)
                skipped.append({"path": item.path, "reason": reason, "kind": getattr(e, "kind", UNREADABLE)})
                continue
            rows.append(result["row"])
            if result["curves"] is not None:
                curves.append(result["curves"])
    return rows, curves, skipped


def run_explain(checkpoint: str | Path, paths: list[str] | tuple[str, ...] = (), out: str | Path | None = None,
                split: str | None = None, settings: ExplainSettings | None = None,
                overrides: list[str] | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Explain a run's split or image files/folders and write the gallery and ``faithfulness.json``.

    Args:
        checkpoint: a run directory or checkpoint .pt.
        paths: image files and folders (searched recursively); or use ``split``.
        out: output folder (default: see :func:`default_out`).
        split: ``train``, ``val``, ``test`` or ``all`` of the run's own data; of other data (``--set
            data.root=OTHER``), every image, as ``all`` (into ``RUN/explain_all`` by default), as evaluate reads it.
        settings: see :class:`ExplainSettings`.
        overrides: ``--set`` config overrides (e.g. ``data.root=...`` when the data moved).
        device: ``auto``, ``cpu``, ``cuda``.

    Returns:
        The summary written to ``faithfulness.json`` plus ``output`` (the folder) and ``skipped``.
    """
    from finescope.data.sources import check_outside_data
    from finescope.explain.gallery import write_index
    from finescope.trainer import _absolute, data_overrides, load_trained, model_overrides

    settings = settings or ExplainSettings()
    settings.check()
    given = Path(out) if out else None
    out = given or default_out(checkpoint, split)
    _check_out(out, () if split else paths)
    model, cfg, class_names, state = load_trained(checkpoint, overrides, device)
    check_outside_data(cfg.data, out)  # its PNGs would become images of a folder source, its images/ a class
    methods = resolve_methods(model, settings.methods, cfg.model.variant)
    inputs = _inputs(cfg, state, class_names, paths, split)
    split = inputs.split if split else None  # a side of other data: all its images, as --split all's (evaluate's)
    suffix = evaluated_suffix(model_overrides(cfg, state), data_overrides(cfg, state), split)
    if not given and default_out(checkpoint, split, suffix) != out:  # named as evaluate names its files
        out = default_out(checkpoint, split, suffix)
        _check_out(out, () if split else paths)
        check_outside_data(cfg.data, out)
    keep = {os.path.realpath(item.path) for item in inputs.items}
    out.mkdir(parents=True, exist_ok=True)
    # the figures are drawn aside and replace the earlier run's only once all are there: a run that fails or is
    # interrupted leaves the earlier gallery as it was
    try:
        stage = Path(tempfile.mkdtemp(dir=out, prefix=STAGE_PREFIX))
    except OSError as e:  # name the folder the user asked for, not the hidden one
        raise type(e)(e.errno, e.strerror, str(out)) from None
    lock = None
    try:
        # killed runs' folders go; another run's live one refuses this run (looked for after taking the lock: of
        # two runs starting at once, at least one sees the other)
        lock = _lock_stage(stage)
        _clear_stages(out, stage)
        with CamExplainer(model) as cams:
            ctx = _Context(model, cfg, class_names, methods, cams, settings, stage, inputs.train_sizes,
                           EvidenceCollector(class_names, settings.top))
            rows, curves, skipped = _loop(ctx, inputs, progress)
        if not rows:
            raise FinescopeError(f"none of the {len(inputs.items)} images could be read "
                                 f"(e.g. {skipped[0]['reason']})")
        summary = summarise(rows, curves, methods, settings)
        summary.update(checkpoint=str(state["path"]), variant=cfg.model.variant, class_names=class_names,
                       source=(f"all images of {inputs.root}" if split == "all" else f"split {split} of "
                               f"{run_dir_of(state)}") if split else ", ".join(map(str, paths)),
                       skipped=skipped, model_overrides=model_overrides(cfg, state),
                       options=settings_options(settings))
        if split:  # the data read, as metrics_<split>.json records it (earlier_evaluations names it to read again)
            summary.update(data_root=_absolute(cfg.data.root), data_overrides=data_overrides(cfg, state))
        # a checkpoint trained on another split than its folder's; with --split, a group on two sides (as evaluate's)
        summary["split_leak"] = inputs.split_leak
        if not split or split == "all":  # files or all images: how many of them the model trained or validated on
            summary["trained_on"] = None if inputs.trained is None else sum(  # None: its split is not known here
                os.path.realpath(r["path"]) in inputs.trained for r in rows)
            if summary["trained_on"]:
                warnings.warn(f"{summary['trained_on']} of the {len(rows)} images explained are ones the run trained "
                              "or validated on (its splits.json): their accuracy and maps are not those of unseen "
                              "images (explain --split test of the run's own data shows unseen ones)", FinescopeWarning,
                              stacklevel=2)
        plot = _plot_curves(stage / "faithfulness.png", summary)
        evidence = ctx.evidence.save(stage)
        _publish(stage, out, keep)
        if plot is None and os.path.realpath(out / "faithfulness.png") not in keep:  # no curves: not an earlier run's
            (out / "faithfulness.png").unlink(missing_ok=True)
        write_text(out / "faithfulness.json", json_text(summary, indent=2))  # while the lock stands: no second run
        _write_csv(out / "results.csv", rows)
        write_index(out, rows, summary, evidence, methods, settings.top, plot is not None)  # last: the gallery
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if lock is not None:
            lock.close()
    return {**summary, "output": str(out)}


__all__ = ["ExplainSettings", "default_out", "run_explain", "summarise"]
