"""Out-of-fold predictions -> per-fold metrics, mean and std, pooled intervals and paired comparisons.

Everything in ``summary.json`` is computed from ``predictions.csv`` alone (:func:`summarize_predictions`), so a
reader can recompute any number from that file: one row per (variant, fold, test image) with the columns
``image, group, patient, magnification, true, predicted, prob_<class>..., fold, variant``.

Patient-level metrics score each ``patient`` (BreakHis: the patient folder, 22549AB, as Spanhol et al. count
patients); intervals resample ``group`` (its case number, 22549, which 22549AB and 22549CD share). A file without
the ``patient`` column scores each group as one patient.

Pooled intervals and paired comparisons resample patients (groups), not images. With repeated trials an image
appears once per trial that tests it, and a patient is scored once per trial (by that trial's model); all rows of a
patient are resampled together.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from finescope.data import SampleSet
from finescope.data.splits import _key, _match, _relative
from finescope.errors import FinescopeError
from finescope.files import ERRORS, atomic_open
from finescope.metrics import (
    SCALAR_METRICS,
    bootstrap_ci,
    compute_metrics,
    paired_bootstrap,
    patient_index,
    summarize_folds,
)

# metrics with pooled patient-clustered intervals and paired comparisons, in table order
TABLE_METRICS = (
    "patient_recognition_rate",
    "image_accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auc",
    "patient_accuracy_majority",
    "patient_accuracy_mean_prob",
    "ece",
)


def collect_predictions(out: Path, folds: list, variants: tuple[str, ...], sample_set: SampleSet,
                        data_root: str = "") -> list[dict]:
    """Read every run's ``predictions_test.csv`` into out-of-fold rows (see the module docstring). A run trained
    on another ``data.root`` than ``data_root`` (the cv's now: its data moved since) names its images under the
    root it trained on (its ``config.yaml``): they are matched by their place under it, as splits files are.

    Raises:
        FinescopeError: a run's file lacks a column or predicts an image outside its fold's test side (a run of
            other folds or other data, or an edited file), naming the run folder to delete so that it trains again.
    """
    index = {s.path: i for i, s in enumerate(sample_set.samples)}
    relative = {_key(_relative(s.path, sample_set.root)): i for i, s in enumerate(sample_set.samples)}
    names = sample_set.class_names
    rows = []
    for variant in variants:
        for fold in folds:
            path = out / "runs" / variant / fold.name / "predictions_test.csv"
            test = set(fold.splits["test"].tolist())
            then = _root_then(path.parent, sample_set, data_root)
            run_rows = _run_rows(path, names, f"delete '{path.parent}' to train {variant} on {fold.name} again")
            check_as_trained(path, run_rows)
            outside = _moved_outside(run_rows, sorted(test), sample_set, then)
            for r in run_rows:
                i = index.get(r["path"])
                if i is None and then is not None and r["path"]:  # the data moved since: the same place under the root
                    i = relative.get(_key(_relative(r["path"], then)))
                if i is None:  # a manifest's images outside its folder, moved since
                    i = outside.get(r["path"])
                if i not in test:
                    raise FinescopeError(
                        f"'{path}' predicts '{r['path']}', which is not on the test side of {fold.name} (a run of "
                        f"other folds or of data elsewhere, or an edited file); delete '{path.parent}' to train "
                        f"{variant} on {fold.name} again")
                s = sample_set.samples[i]
                rows.append({
                    "image": _relative(s.path, sample_set.root),
                    "group": s.group,
                    "patient": s.patient,
                    "magnification": s.meta.get("magnification", ""),
                    "true": names[s.label],
                    "predicted": r["predicted"],
                    **{f"prob_{n}": r[f"prob_{n}"] for n in names},
                    "fold": fold.name,
                    "variant": variant,
                })
    return rows


def check_as_trained(path: Path, rows: list[dict] | None = None) -> None:
    """Refuse a run's ``predictions_test.csv`` that ``evaluate --set model.<key>=...`` of a version before 344828e
    wrote over the fold's own (its ``model_overrides`` column; evaluate now names such files after the settings):
    the predictions of another model than the one the fold trained. ``rows``: the file's, when already read."""
    if rows is None:
        with path.open(newline="", encoding="utf-8", errors=ERRORS) as fh:
            rows = list(csv.DictReader(fh))
    changed = next((r["model_overrides"] for r in rows if r.get("model_overrides")), "")
    if changed:
        raise FinescopeError(
            f"'{path}' holds the predictions of the fold's model run with {changed} (`finescope evaluate --set`), "
            f"not of the model as trained; run `finescope evaluate {path.parent}` without those overrides to write "
            "its own predictions again (evaluate with other settings now writes files named after them)")


def _moved_outside(rows: list[dict], test: list[int], sample_set: SampleSet, then: str | None) -> dict[str, int]:
    """The images a run's ``rows`` predict that lie outside the root (a manifest's outside the CSV's folder) and
    moved since (the manifest rewritten with their new paths) -> their index in ``sample_set``: matched as splits
    files match them (by their place below the innermost folder holding them) to its fold's ``test`` side."""
    rows = [r for r in rows if r["path"]]  # an empty cell (a spreadsheet's blank row) is refused by the caller
    keys = [_key(_relative(r["path"], then or sample_set.root)) for r in rows]
    side = SampleSet([sample_set.samples[i] for i in test], sample_set.class_names, root=sample_set.root)
    where = _match(keys, side)[0]
    return {r["path"]: test[where[k]] for r, k in zip(rows, keys) if k in where}


def _root_then(run_dir: Path, sample_set: SampleSet, data_root: str) -> str | None:
    """The folder that ``sample_set.root`` was when the run in ``run_dir`` trained on another ``data.root`` than
    ``data_root`` (the one its ``config.yaml`` names), which its predictions name images under; None when it
    trained on ``data_root`` or its config cannot tell."""
    from finescope.config import read_yaml_mapping

    if not data_root or not (run_dir / "config.yaml").is_file():
        return None
    try:
        then = read_yaml_mapping(run_dir / "config.yaml").get("data", {}).get("root")
    except (FinescopeError, AttributeError):
        return None
    now = os.path.abspath(os.path.expanduser(data_root))
    if not isinstance(then, str) or not then or os.path.abspath(os.path.expanduser(then)) == now:
        return None
    # sample_set.root is data.root, or the folder of the CSV manifest it names: the same folder of the root then
    return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(then)),
                                         os.path.relpath(sample_set.root, now)))


def _run_rows(path: Path, names: list[str], fix: str) -> list[dict]:
    """The rows of a run's ``predictions_test.csv``; raise naming ``fix`` when a column or field is missing."""
    with path.open(newline="", encoding="utf-8", errors=ERRORS) as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    needed = ["path", "predicted", *[f"prob_{n}" for n in names]]
    lacking = [c for c in needed if c not in (reader.fieldnames or [])]
    if lacking:
        raise FinescopeError(f"'{path}' has no column '{lacking[0]}' (not this cv's run); {fix}")
    for line, r in enumerate(rows, start=2):
        if any(r[c] is None for c in needed):
            raise FinescopeError(f"'{path}' line {line} has fewer fields than the header; {fix}")
    return rows


def write_oof_csv(path: Path, rows: list[dict], class_names: list[str]) -> None:
    """Write out-of-fold rows with a fixed column order."""
    cols = ["image", "group", "patient", "magnification", "true", "predicted", *[f"prob_{n}" for n in class_names],
            "fold", "variant"]
    with atomic_open(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def read_oof_csv(path: str | Path) -> tuple[list[dict], list[str]]:
    """Rows and class names (from the ``prob_`` columns) of a ``predictions.csv``."""
    path = Path(path)
    if not path.is_file():
        raise FinescopeError(f"'{path}' not found; run `finescope cv` first")
    try:
        with path.open(newline="", encoding="utf-8-sig", errors=ERRORS) as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            names = [c[len("prob_"):] for c in reader.fieldnames or [] if c.startswith("prob_")]
    except (UnicodeDecodeError, csv.Error) as e:
        raise FinescopeError(f"'{path}' is not a readable CSV ({e}); {_REWRITE}") from None
    if not rows or not names:
        raise FinescopeError(f"'{path}' holds no predictions with prob_<class> columns")
    missing = [c for c in OOF_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise FinescopeError(f"'{path}' has no column '{missing[0]}' (a predictions.csv has {', '.join(OOF_COLUMNS)} "
                             f"and prob_<class> columns); {_REWRITE}")
    for line, r in enumerate(rows, start=2):
        _check_row(path, line, r, names)
    return rows, names


# what to do about a predictions.csv that is damaged or was edited by hand
_REWRITE = "write it again with the command that made it (`finescope cv`; `finescope evaluate` for a run)"
OOF_COLUMNS = ("image", "group", "magnification", "true", "predicted", "fold", "variant")


def _check_row(path: Path, line: int, r: dict, names: list[str]) -> None:
    """Raise naming the line of ``path`` when a row lacks a field or holds a class or probability that is not one."""
    where = f"'{path}' line {line}"
    if None in r or any(v is None for v in r.values()):
        raise FinescopeError(f"{where} has {'more' if None in r else 'fewer'} fields than the header; {_REWRITE}")
    for col in ("true", "predicted"):
        if r[col] not in names:
            raise FinescopeError(f"{where}: {col} class '{r[col]}' is none of the prob_ columns' classes "
                                 f"({', '.join(names)}); {_REWRITE}")
    for n in names:
        try:
            ok = 0.0 <= float(r[f"prob_{n}"]) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise FinescopeError(f"{where}: prob_{n} is '{r[f'prob_{n}']}', not a probability in [0, 1]; {_REWRITE}")
    if not (r["magnification"] == "" or r["magnification"].isdigit()):
        raise FinescopeError(f"{where}: magnification is '{r['magnification']}', neither empty nor a whole number; "
                             f"{_REWRITE}")
    if not r["fold"] or not r["variant"]:
        raise FinescopeError(f"{where} has an empty {'fold' if not r['fold'] else 'variant'}; {_REWRITE}")


def as_arrays(rows: list[dict], class_names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) labels, (N, C) probabilities and (N,) groups of some rows."""
    index = {n: i for i, n in enumerate(class_names)}
    y = np.array([index[r["true"]] for r in rows], dtype=np.int64)
    p = np.array([[float(r[f"prob_{n}"]) for n in class_names] for r in rows], dtype=np.float64)
    g = np.array([r["group"] for r in rows])
    return y, p, g


def patients_of(rows: list[dict]) -> np.ndarray:
    """(N,) patient indices of some rows: one per (group, ``patient`` column) pair, so that equal ids in two groups
    are two patients, as :func:`~finescope.metrics.bootstrap_ci` counts them; the group in a file without one.

    A patient tested in several folds (repeated trials) is one patient per fold: each trial's model scores it
    once, as it scores its images once, rather than one vote over the predictions of several models.
    """
    folds = np.unique([r["fold"] for r in rows], return_inverse=True)[1].ravel()
    # the digits of the fold index, then ':' (as patient_index joins its pairs)
    return patient_index([r["group"] for r in rows], [f"{f}:{r.get('patient') or r['group']}"
                                                      for f, r in zip(folds, rows, strict=True)])


def _n_patients(rows: list[dict]) -> int:
    """How many distinct patients some rows hold, (group, ``patient`` column) pairs, however many trials test one."""
    return len({(r["group"], r.get("patient") or r["group"]) for r in rows})


def _unit(rows: list[dict]) -> str:
    """What one group of some rows is, for a ``ci_note``: a patient, or a group of patients (a BreakHis case)."""
    return "patient" if _n_patients(rows) == len({r["group"] for r in rows}) else "patient group"


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return dict(out)


def _fold_metrics(rows: list[dict], class_names: list[str]) -> dict[str, dict]:
    """fold -> compute_metrics of that fold's rows, patient-level over their patients."""
    return {
        fold: compute_metrics(*as_arrays(fold_rows, class_names)[:2], patients_of(fold_rows), class_names)
        for (fold,), fold_rows in sorted(_by(rows, "fold").items())
    }


def _pooled(rows: list[dict], class_names: list[str], n_boot: int, seed: int) -> dict[str, dict]:
    """Each table metric over all out-of-fold rows with a patient-clustered 95% interval."""
    y, p, g = as_arrays(rows, class_names)
    patients, unit = patients_of(rows), _unit(rows)
    out = {m: bootstrap_ci(y, p, g, m, n_boot=n_boot, seed=seed, patients=patients, unit=unit) for m in TABLE_METRICS}
    cm = compute_metrics(y, p, patients, class_names)
    out["confusion_matrix"] = cm["confusion_matrix"]
    out["per_class_recall"] = cm["per_class_recall"]
    # n_groups: the patients scored, as in a fold's metrics (a patient once per fold that tests it)
    out["n_images"], out["n_groups"] = int(len(y)), cm["n_groups"]
    out["n_patients"], out["n_resampled_groups"] = _n_patients(rows), int(len(set(g.tolist())))
    return out


def _variant_summary(rows: list[dict], class_names: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    per_fold = _fold_metrics(rows, class_names)
    mags = sorted({r["magnification"] for r in rows if r["magnification"] != ""}, key=int)
    per_mag = {}
    for mag in mags:
        of_mag = [r for r in rows if r["magnification"] == mag]
        per_mag[mag] = summarize_folds(list(_fold_metrics(of_mag, class_names).values()), list(SCALAR_METRICS))
    return {
        "folds": per_fold,
        "mean_std": summarize_folds(list(per_fold.values()), list(SCALAR_METRICS)),
        "pooled": _pooled(rows, class_names, n_boot, seed),
        "per_magnification": per_mag,
    }


def compare(rows: list[dict], class_names: list[str], ref: str, other: str, n_boot: int, seed: int) -> dict:
    """``metric(other) - metric(ref)`` on the same (fold, image) rows, patient-clustered paired bootstrap."""
    a = {(r["fold"], r["image"]): r for r in rows if r["variant"] == ref}
    b = {(r["fold"], r["image"]): r for r in rows if r["variant"] == other}
    keys = sorted(set(a) & set(b))
    if not keys:
        raise FinescopeError(f"variants '{ref}' and '{other}' share no out-of-fold images to compare")
    y, pa, g = as_arrays([a[k] for k in keys], class_names)
    _, pb, _ = as_arrays([b[k] for k in keys], class_names)
    patients = patients_of([a[k] for k in keys])
    unit = _unit([a[k] for k in keys])
    out = {m: paired_bootstrap(y, pa, pb, g, m, n_boot=n_boot, seed=seed, patients=patients, unit=unit)
           for m in TABLE_METRICS}
    return {"reference": ref, "variant": other, "n_rows": len(keys), "metrics": out}


def summarize_predictions(path: str | Path, reference: str = "", n_boot: int = 1000, seed: int = 0) -> dict:
    """The cv summary computed from ``predictions.csv`` alone.

    Args:
        path: an out-of-fold ``predictions.csv``.
        reference: the variant the others are compared with (default: ``global`` if present, else the first).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{"class_names", "variants": {v: {"folds": {fold: metrics}, "mean_std": {metric: {mean, std, n}},
        "pooled": {metric: {value, low, high, n_boot}}, "per_magnification": {mag: mean_std}}},
        "comparisons": [{"reference", "variant", "metrics": {metric: {diff, low, high, p_value}}}]}``.
        ``n_groups`` is the patients the patient-level metrics scored, in a fold's metrics (as in its run's
        metrics.json) and the pooled ones alike: a patient once per fold that tests it. The pooled ones also hold
        ``n_images``, ``n_patients`` (distinct patients) and ``n_resampled_groups`` (the groups the intervals
        resample).
    """
    rows, names = read_oof_csv(path)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    ref = reference or ("global" if "global" in variants else variants[0])
    if ref not in variants:
        raise FinescopeError(f"reference variant '{ref}' has no rows in '{path}'; variants: {', '.join(variants)}")
    by_variant = _by(rows, "variant")
    summary = {
        "class_names": names,
        "reference": ref,
        "n_boot": n_boot,
        "variants": {v: _variant_summary(by_variant[(v,)], names, n_boot, seed) for v in variants},
        "comparisons": [compare(rows, names, ref, v, n_boot, seed) for v in variants if v != ref],
    }
    return summary


__all__ = ["TABLE_METRICS", "as_arrays", "collect_predictions", "compare", "patients_of", "read_oof_csv",
           "summarize_predictions", "write_oof_csv"]
