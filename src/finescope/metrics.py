"""Evaluation metrics as pure functions: image level, patient level, calibration and bootstrap by patient.

Every function takes numpy arrays (or lists) and returns plain Python values (``float``, ``int``, ``list``,
``dict``, ``None``) that serialise to JSON as they are. Shapes use one notation: ``N`` images, ``C`` classes,
``G`` groups (patients or specimens).

- ``y_true``: (N,) integer labels in ``[0, C)``.
- ``probs``: (N, C) class probabilities, rows summing to 1.
- ``y_pred``: (N,) integer predictions, ``probs.argmax(1)`` unless given.
- ``groups``: (N,) patient/specimen ids (str).

Patient-level metrics follow the BreakHis protocol (Spanhol et al., "A Dataset for Breast Cancer
Histopathological Image Classification", IEEE TBME 2016): the patient score is the fraction of a patient's
images classified correctly and the patient recognition rate (PRR) is the mean patient score. Confidence
intervals resample patients, not images, because images of one patient are not independent.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_curve,
)

from finescope.errors import FinescopeError

ArrayLike = np.ndarray | Sequence[Any]
MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], "float | None"]

PATIENT_HOW = ("majority", "mean_prob")


# --------------------------------------------------------------------------------------------- input checks
def _labels(y: ArrayLike, name: str = "y_true") -> np.ndarray:
    """Return ``y`` as a non-empty (N,) int array."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if arr.size == 0:
        raise FinescopeError("no images to evaluate")
    return arr.astype(np.int64)


def _pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return checked (N,) label and prediction arrays of equal length."""
    yt, yp = _labels(y_true), _labels(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must have the same length")
    return yt, yp


def _probs(y_true: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return checked (N,) labels and (N, C) probabilities."""
    yt = _labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != yt.shape[0]:
        raise ValueError(f"probs must have shape (N, C) = ({yt.shape[0]}, C), got {p.shape}")
    if yt.min() < 0 or yt.max() >= p.shape[1]:
        raise ValueError(f"y_true labels must lie in [0, {p.shape[1]}), got [{yt.min()}, {yt.max()}]")
    bad = int((~np.isfinite(p).all(1)).sum())
    if bad:  # argmax of a NaN row is class 0: the metrics would score a diverged model as predicting it
        raise FinescopeError(f"the class probabilities of {bad} of {p.shape[0]} images are NaN or infinite: the model "
                             "diverged; train it again with a lower train.lr")
    return yt, p


def _group_index(groups: ArrayLike | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map (N,) group ids to (N,) indices into the sorted unique ids; ``None`` makes each image a group."""
    if groups is None:
        return np.arange(n), np.arange(n)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    uniq, idx = np.unique(g, return_inverse=True)
    return uniq, idx.ravel()


def patient_index(groups: ArrayLike, patients: ArrayLike) -> np.ndarray:
    """(N,) index of each image's patient, a (group, patient id) pair: equal ids in two groups are two patients.

    Args:
        groups: (N,) group ids (the unit a split and an interval keep whole).
        patients: (N,) patient ids within their group (BreakHis: the patient folder 22549AB of case 22549).

    Returns:
        (N,) int indices into the sorted unique pairs.
    """
    g = np.asarray(groups)
    pat = np.asarray(patients).astype(str)
    if pat.shape != g.shape:
        raise ValueError(f"patients must have shape {g.shape}, got {pat.shape}")
    gidx = np.unique(g, return_inverse=True)[1].ravel()
    # the digits of the group index, then ':' (numpy strips a trailing '\x00', which joined (1, '23') and (12, '3'))
    pairs = np.char.add(np.char.add(gidx.astype(str), ":"), pat)
    return np.unique(pairs, return_inverse=True)[1].ravel()


def _py(x: Any) -> Any:
    """Turn a numpy scalar into the matching Python scalar."""
    return x.item() if isinstance(x, np.generic) else x


# --------------------------------------------------------------------------------------------- image level
def image_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of images classified correctly.

    Args:
        y_true: (N,) true labels.
        y_pred: (N,) predicted labels.

    Returns:
        Correct images / all images.
    """
    yt, yp = _pair(y_true, y_pred)
    return float(np.mean(yt == yp))


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn ``balanced_accuracy_score``).

    Args:
        y_true: (N,) true labels.
        y_pred: (N,) predicted labels.

    Returns:
        Balanced accuracy.
    """
    yt, yp = _pair(y_true, y_pred)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected on small folds
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(yt, yp))


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> float:
    """Unweighted mean F1 over the classes that are true or predicted at least once (scikit-learn's default):
    a class predicted but never true scores 0; a class neither true nor predicted (absent from a test split
    and never guessed) is left out, as balanced accuracy and AUC leave it out, rather than scored 0.

    Args:
        y_true: (N,) true labels.
        y_pred: (N,) predicted labels.
        n_classes: C (labels must lie in 0..C-1).

    Returns:
        Macro F1.
    """
    yt, yp = _pair(y_true, y_pred)
    seen = sorted(set(yt.tolist()) | set(yp.tolist()))
    if seen and not 0 <= seen[0] <= seen[-1] < n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {seen[0]}..{seen[-1]}")
    return float(f1_score(yt, yp, labels=seen, average="macro", zero_division=0))


def confusion(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> list[list[int]]:
    """Confusion matrix, rows = true class, columns = predicted class.

    Args:
        y_true: (N,) true labels.
        y_pred: (N,) predicted labels.
        n_classes: C.

    Returns:
        (C, C) nested list of counts.
    """
    yt, yp = _pair(y_true, y_pred)
    return confusion_matrix(yt, yp, labels=list(range(n_classes))).tolist()


def per_class_recall(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> list[float | None]:
    """Recall (sensitivity) of every class.

    Args:
        y_true: (N,) true labels.
        y_pred: (N,) predicted labels.
        n_classes: C.

    Returns:
        (C,) list; ``None`` for a class absent from ``y_true``.
    """
    cm = np.asarray(confusion(y_true, y_pred, n_classes))
    support = cm.sum(1)
    return [float(cm[c, c] / support[c]) if support[c] else None for c in range(n_classes)]


def _has_both(mask: np.ndarray) -> bool:
    """True when a one-vs-rest target has positives and negatives, so that its ROC is defined."""
    return 0 < int(mask.sum()) < mask.size


def _ovr_classes(yt: np.ndarray, n_classes: int) -> list[int]:
    """Classes with a defined ROC: class 1 for binary, every class with positives and negatives otherwise."""
    candidates = [1] if n_classes == 2 else range(n_classes)
    return [c for c in candidates if _has_both(yt == c)]


def _ovr_aucs(yt: np.ndarray, p: np.ndarray) -> dict[int, float]:
    """One-vs-rest AUC of each class of :func:`_ovr_classes`, from ranks (Mann-Whitney U).

    ``AUC_c = (R_c - n_c (n_c + 1) / 2) / (n_c (N - n_c))`` with ``R_c`` the rank sum of class c's images in
    column c, ties averaged; identical to scikit-learn's ``roc_auc_score`` and fast enough to bootstrap.
    """
    classes = _ovr_classes(yt, p.shape[1])
    ranks = rankdata(p[:, classes], axis=0)  # (N, K)
    pos = yt[:, None] == np.asarray(classes)[None, :]  # (N, K)
    n_pos = pos.sum(0)
    rank_sum = (ranks * pos).sum(0)
    aucs = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (yt.size - n_pos))
    return {c: float(a) for c, a in zip(classes, aucs, strict=True)}


def auc(y_true: ArrayLike, probs: ArrayLike) -> float | None:
    """Area under the ROC curve.

    Binary (C == 2): AUC of ``probs[:, 1]``. Multiclass: macro mean of the one-vs-rest AUCs of the classes
    with both positives and negatives in ``y_true``; equals scikit-learn's ``roc_auc_score(multi_class='ovr',
    average='macro')`` when every class is present.

    Args:
        y_true: (N,) true labels.
        probs: (N, C) class probabilities.

    Returns:
        The AUC, or ``None`` when undefined (a single class in ``y_true``).
    """
    aucs = _ovr_aucs(*_probs(y_true, probs))
    return float(np.mean(list(aucs.values()))) if aucs else None


def roc_curves(
    y_true: ArrayLike, probs: ArrayLike, class_names: Sequence[str] | None = None
) -> dict[Any, dict[str, Any]]:
    """ROC curves for plotting: the positive class if binary, else one-vs-rest for each present class.

    Args:
        y_true: (N,) true labels.
        probs: (N, C) class probabilities.
        class_names: optional (C,) names used as keys; class indices otherwise.

    Returns:
        ``{class: {"fpr": [...], "tpr": [...], "auc": float}}``; empty when no curve is defined.
    """
    yt, p = _probs(y_true, probs)
    curves = {}
    for c, area in _ovr_aucs(yt, p).items():
        fpr, tpr, _ = roc_curve(yt == c, p[:, c])
        key = class_names[c] if class_names is not None else c
        curves[key] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": area}
    return curves


# --------------------------------------------------------------------------------------------- calibration
def _calibration_bins(y_true: ArrayLike, probs: ArrayLike, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per-bin confidence sum, correct count and image count on the top-class confidence.

    Bins are equal-width on [0, 1] and right-closed, ``(k / n_bins, (k + 1) / n_bins]`` (Guo et al. 2017).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    yt, p = _probs(y_true, probs)
    conf, correct = p.max(1), (p.argmax(1) == yt).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    conf_sum = np.bincount(b, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(b, weights=correct, minlength=n_bins)
    return conf_sum, correct_sum, np.bincount(b, minlength=n_bins), edges


ECE_BINS = 15  # the bins of every ECE finescope reports (and of the report's reliability diagram)


def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence (Guo et al., ICML 2017, Eq. 3).

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over ``n_bins`` equal-width bins.

    Args:
        y_true: (N,) true labels.
        probs: (N, C) class probabilities.
        n_bins: number of bins.

    Returns:
        ECE in [0, 1].
    """
    conf_sum, correct_sum, count, _ = _calibration_bins(y_true, probs, n_bins)
    return float(np.abs(correct_sum - conf_sum).sum() / count.sum())


def reliability_curve(y_true: ArrayLike, probs: ArrayLike, n_bins: int = 15) -> dict[str, list]:
    """Reliability diagram data: mean confidence and accuracy per confidence bin.

    Args:
        y_true: (N,) true labels.
        probs: (N, C) class probabilities.
        n_bins: number of equal-width bins.

    Returns:
        ``{"bin_confidence", "bin_accuracy"}`` (n_bins,) lists with ``None`` for empty bins, ``"bin_count"``
        (n_bins,) ints and ``"bin_edges"`` (n_bins + 1,) floats.
    """
    conf_sum, correct_sum, count, edges = _calibration_bins(y_true, probs, n_bins)

    def per_bin(total: np.ndarray) -> list[float | None]:
        return [float(t / n) if n else None for t, n in zip(total, count, strict=True)]

    return {
        "bin_confidence": per_bin(conf_sum),
        "bin_accuracy": per_bin(correct_sum),
        "bin_count": count.tolist(),
        "bin_edges": edges.tolist(),
    }


# --------------------------------------------------------------------------------------------- patient level
def _per_group_correct(yt: np.ndarray, yp: np.ndarray, gidx: np.ndarray, n_groups: int) -> np.ndarray:
    """(G,) patient scores: correct images / images of each group."""
    correct = np.bincount(gidx, weights=(yt == yp).astype(np.float64), minlength=n_groups)
    return correct / np.bincount(gidx, minlength=n_groups)


def patient_scores(y_true: ArrayLike, y_pred: ArrayLike, groups: ArrayLike) -> dict[Any, float]:
    """Patient score of every group: its correctly classified images / its images (Spanhol et al. 2016).

    Args:
        y_true: (N,) true labels.
        y_pred: (N,) predicted labels.
        groups: (N,) patient ids.

    Returns:
        ``{patient_id: score}``.
    """
    yt, yp = _pair(y_true, y_pred)
    uniq, gidx = _group_index(groups, yt.size)
    scores = _per_group_correct(yt, yp, gidx, uniq.size)
    return {_py(g): float(s) for g, s in zip(uniq, scores, strict=True)}


def patient_recognition_rate(y_true: ArrayLike, y_pred: ArrayLike, groups: ArrayLike) -> float:
    """Patient recognition rate: the mean of the patient scores (Spanhol et al. 2016).

    Args:
        y_true: (N,) true labels.
        y_pred: (N,) predicted labels.
        groups: (N,) patient ids.

    Returns:
        PRR in [0, 1].
    """
    return float(np.mean(list(patient_scores(y_true, y_pred, groups).values())))


def pooled_predictions(p: np.ndarray, yp: np.ndarray, idx: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The images of each of ``n`` sets (a patient's) as one prediction: (n, C) their summed class probabilities
    (the mean's argmax is the sum's) and (n,) the majority vote of their predictions ``yp`` (N,), ties broken by
    the mean probability; ``idx`` (N,): each image's set."""
    total = np.zeros((n, p.shape[1]))
    np.add.at(total, idx, p)
    votes = np.zeros((n, p.shape[1]))
    np.add.at(votes, (idx, yp), 1)
    tied = votes == votes.max(1, keepdims=True)
    return total, np.where(tied, total, -np.inf).argmax(1)


def _patient_hits(
    yt: np.ndarray, p: np.ndarray, yp: np.ndarray, gidx: np.ndarray, n_groups: int, how: str
) -> tuple[np.ndarray, np.ndarray]:
    """(G,) hits and (G,) units of each patient: a unit is a patient's images of one true class, and it is a hit
    when their single prediction is that class (see :func:`patient_accuracy`)."""
    n_classes = p.shape[1]
    units, uidx = np.unique(gidx * n_classes + yt, return_inverse=True)  # (U,) (patient, class) pairs
    total, majority = pooled_predictions(p, yp, uidx.ravel(), units.size)
    pred = total.argmax(1) if how == "mean_prob" else majority
    patient = units // n_classes
    hits = np.bincount(patient, weights=(pred == units % n_classes).astype(np.float64), minlength=n_groups)
    return hits, np.bincount(patient, minlength=n_groups).astype(np.float64)


def patient_accuracy(
    y_true: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike,
    how: str = "majority",
    y_pred: ArrayLike | None = None,
) -> float:
    """Fraction of patients whose single prediction equals the patient's label.

    Each patient's images give one prediction: with ``how="majority"`` the majority vote of the image
    predictions (ties broken by the mean probability, then by the lower class index, as an exact tie of
    probabilities is everywhere), with ``how="mean_prob"`` the argmax of the mean class
    probability over its images. A patient whose images hold several true classes has no one label: it is
    scored once per class, each time on its images of that class (a unit), and the value is hits / units. For
    data with one class per patient (BreakHis) units are patients. Taking such a patient's majority class as its
    label instead would let a model that calls all of one patient's images benign score it right even where some
    of them are malignant.

    Args:
        y_true: (N,) true labels.
        probs: (N, C) class probabilities.
        groups: (N,) patient ids.
        how: "majority" or "mean_prob".
        y_pred: (N,) image predictions for the vote; ``probs.argmax(1)`` if omitted.

    Returns:
        Patient-level accuracy.
    """
    if how not in PATIENT_HOW:
        raise ValueError(f"how must be one of {PATIENT_HOW}, got {how!r}")
    yt, p = _probs(y_true, probs)
    yp = p.argmax(1) if y_pred is None else _pair(yt, y_pred)[1]
    uniq, gidx = _group_index(groups, yt.size)
    hits, units = _patient_hits(yt, p, yp, gidx, uniq.size, how)
    return float(hits.sum() / units.sum())


# --------------------------------------------------------------------------------------------- all at once
def compute_metrics(
    y_true: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike | None = None,
    class_names: Sequence[str] | None = None,
    y_pred: ArrayLike | None = None,
) -> dict[str, Any]:
    """Every image-level metric, and the patient-level ones when ``groups`` is given.

    Args:
        y_true: (N,) true labels.
        probs: (N, C) class probabilities.
        groups: optional (N,) patient ids.
        class_names: optional (C,) names; ``"0" .. "C-1"`` otherwise.
        y_pred: optional (N,) predictions; ``probs.argmax(1)`` if omitted.

    Returns:
        A JSON-serialisable dict: image_accuracy, balanced_accuracy, macro_f1, auc, confusion_matrix,
        per_class_recall, ece, class_names, n_images, n_classes; with groups also patient_recognition_rate,
        patient_accuracy_majority, patient_accuracy_mean_prob and n_groups.

    Raises:
        FinescopeError: when there are no images.
    """
    yt, p = _probs(y_true, probs)
    n_classes = p.shape[1]
    yp = p.argmax(1) if y_pred is None else _pair(yt, y_pred)[1]
    names = [str(c) for c in range(n_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != n_classes:
        raise ValueError(f"class_names has {len(names)} names but probs has {n_classes} classes")
    out: dict[str, Any] = {
        "image_accuracy": image_accuracy(yt, yp),
        "balanced_accuracy": balanced_accuracy(yt, yp),
        "macro_f1": macro_f1(yt, yp, n_classes),
        "auc": auc(yt, p),
        "confusion_matrix": confusion(yt, yp, n_classes),
        "per_class_recall": per_class_recall(yt, yp, n_classes),
        "ece": expected_calibration_error(yt, p),
        "class_names": names,
        "n_images": int(yt.size),
        "n_classes": int(n_classes),
    }
    if groups is not None:
        out["patient_recognition_rate"] = patient_recognition_rate(yt, yp, groups)
        out["patient_accuracy_majority"] = patient_accuracy(yt, p, groups, "majority", yp)
        out["patient_accuracy_mean_prob"] = patient_accuracy(yt, p, groups, "mean_prob", yp)
        out["n_groups"] = len(np.unique(np.asarray(groups)))
    return out


# metric(y_true, probs, groups) -> float | None for every scalar output of compute_metrics
SCALAR_METRICS: dict[str, MetricFn] = {
    "image_accuracy": lambda y, p, g: image_accuracy(y, p.argmax(1)),
    "balanced_accuracy": lambda y, p, g: balanced_accuracy(y, p.argmax(1)),
    "macro_f1": lambda y, p, g: macro_f1(y, p.argmax(1), p.shape[1]),
    "auc": lambda y, p, g: auc(y, p),
    "ece": lambda y, p, g: expected_calibration_error(y, p),
    "patient_recognition_rate": lambda y, p, g: patient_recognition_rate(y, p.argmax(1), g),
    "patient_accuracy_majority": lambda y, p, g: patient_accuracy(y, p, g, "majority"),
    "patient_accuracy_mean_prob": lambda y, p, g: patient_accuracy(y, p, g, "mean_prob"),
}


def per_magnification_metrics(
    y_true: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike | None,
    magnifications: Sequence[int | None],
    class_names: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The scalar metrics of :func:`compute_metrics` (with ``n_images`` and ``n_groups``) of each magnification's
    images, as cv's summary gives them per magnification; empty unless the images have two or more.

    Args:
        y_true: (N,) true labels.
        probs: (N, C) class probabilities.
        groups: optional (N,) patient ids.
        magnifications: (N,) each image's magnification (40, 100, ...); None where unknown (left out).
        class_names: optional (C,) names.

    Returns:
        ``{"40": {metric: value}, "100": ...}`` in increasing magnification (JSON keys: text).
    """
    mags = np.array([-1 if m is None else int(m) for m in magnifications])
    known = sorted(set(mags[mags >= 0].tolist()))
    if len(known) < 2:  # one magnification: the metrics of all images are its own
        return {}
    yt, p = np.asarray(y_true), np.asarray(probs)
    g = None if groups is None else np.asarray(groups)
    out = {}
    for mag in known:
        at = mags == mag
        m = compute_metrics(yt[at], p[at], None if g is None else g[at], class_names)
        out[str(mag)] = {k: v for k, v in m.items() if k in SCALAR_METRICS or k in ("n_images", "n_groups")}
    return out


# --------------------------------------------------------------------------------------------- bootstrap
def _resolve_metric(metric: str | MetricFn) -> MetricFn:
    """Return the metric function for a name of :data:`SCALAR_METRICS` or a callable."""
    if callable(metric):
        return metric
    if metric not in SCALAR_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid names: {sorted(SCALAR_METRICS)}")
    return SCALAR_METRICS[metric]


def _draw_groups(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, G) group indices drawn with replacement, G per resample."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))


def _fast_per_group(
    metric: str | MetricFn, yt: np.ndarray, p: np.ndarray, gidx: np.ndarray, pidx: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(G,) numerator and denominator when the metric is a weighted ratio over groups, else ``None``.

    A resample that draws group g ``k_g`` times then scores ``sum_g k_g num_g / sum_g k_g den_g``; for the
    patient-level metrics ``num_g`` sums the scores (or hits) of group g's patients and ``den_g`` counts them (or
    their units: :func:`_patient_hits`).
    """
    yp = p.argmax(1)
    if metric == "image_accuracy":
        correct = np.bincount(gidx, weights=(yt == yp).astype(np.float64), minlength=n_groups)
        return correct, np.bincount(gidx, minlength=n_groups).astype(np.float64)
    n_patients = int(pidx.max()) + 1
    group_of = np.zeros(n_patients, dtype=np.int64)  # (P,) the group of each patient
    group_of[pidx] = gidx
    if metric == "patient_recognition_rate":
        per_patient, units = _per_group_correct(yt, yp, pidx, n_patients), np.ones(n_patients)
    elif metric in ("patient_accuracy_majority", "patient_accuracy_mean_prob"):
        per_patient, units = _patient_hits(yt, p, yp, pidx, n_patients, metric.removeprefix("patient_accuracy_"))
    else:
        return None
    num = np.bincount(group_of, weights=per_patient, minlength=n_groups)
    return num, np.bincount(group_of, weights=units, minlength=n_groups)


def _boot_values(
    metric: str | MetricFn, yt: np.ndarray, p: np.ndarray, gidx: np.ndarray, pidx: np.ndarray, draws: np.ndarray
) -> np.ndarray:
    """(n_boot,) metric values over the resamples in ``draws`` (NaN where the metric is undefined).

    Each drawn group becomes a distinct group of the resample, so a patient drawn twice counts twice.
    """
    n_groups = draws.shape[1]
    fast = _fast_per_group(metric, yt, p, gidx, pidx, n_groups)
    if fast is not None:
        counts = np.zeros(draws.shape)  # (n_boot, G): times each group was drawn
        np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1)
        return (counts @ fast[0]) / (counts @ fast[1])
    fn = _resolve_metric(metric)
    members = [np.flatnonzero(gidx == g) for g in range(n_groups)]
    n_patients = int(pidx.max()) + 1
    values = np.full(draws.shape[0], np.nan)
    for b, drawn in enumerate(draws):
        idx = np.concatenate([members[g] for g in drawn])
        # the patients of the j-th drawn group are j * P + their index: a group drawn twice gives distinct patients
        patients = np.concatenate([j * n_patients + pidx[members[g]] for j, g in enumerate(drawn)])
        value = fn(yt[idx], p[idx], patients)
        values[b] = np.nan if value is None else value
    return values


MIN_CI_GROUPS = 5  # fewer groups than this: no interval (bootstrap_ci's docstring says why)
# what a metric means, raised with every change of a definition, so that no summary computed before it is read back
# (cv's summary.json, in ``made_from``): 2 scores a patient of several classes once per class and counts equal
# patient ids in two groups as two patients; 3 scores a patient of several trials once per trial in pooled metrics;
# 4 makes the pooled n_groups the patients scored, as a fold's (the groups resampled: n_resampled_groups), and
# counts paired differences within DIFF_ZERO of 0 as 0 (p-values)
METRICS_VERSION = 4
MIN_CI_DEFINED = 0.5  # fraction of the resamples that must define the metric for an interval
# a difference of two metrics below this is 0: equal metrics summed over other patients differ by ~1e-16 in floats
DIFF_ZERO = 1e-12


def _ci_withheld(values: np.ndarray, n_groups: int, unit: str) -> str | None:
    """Why no interval is drawn from the (n_boot,) resampled ``values`` of ``n_groups`` groups; ``None`` when one is.

    Sets ``values`` to NaN when it says why, so that no interval, p-value or resample count rests on them.
    """
    defined = int(np.isfinite(values).sum())
    if n_groups < MIN_CI_GROUPS:
        note = f"only {n_groups} {unit}{'' if n_groups == 1 else 's'}"
    elif defined < MIN_CI_DEFINED * values.size:
        note = f"metric defined in only {defined} of {values.size} resamples"
    else:
        return None
    values[:] = np.nan
    return note


def _unit(groups: ArrayLike | None, pidx: np.ndarray, n_groups: int) -> str:
    """What one resampled group is, for a ``ci_note``: an image, a patient, or a group of patients (a case)."""
    if groups is None:
        return "image"
    return "patient" if int(pidx.max()) + 1 == n_groups else "patient group"


def _percentiles(values: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
    """Percentile interval ``[alpha/2, 1 - alpha/2]`` of the finite values."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _prepare(
    y_true: ArrayLike, probs: ArrayLike, groups: ArrayLike | None, patients: ArrayLike | None
) -> tuple[np.ndarray, ...]:
    """Checked labels, probabilities, (N,) patient indices, (N,) group indices and the unique groups.

    A patient is a (group, patient id) pair, so that equal ids in two groups are two patients; without
    ``patients`` every group is one patient, and without ``groups`` every image is a group.
    """
    yt, p = _probs(y_true, probs)
    uniq, gidx = _group_index(groups, yt.size)
    if patients is None:
        return yt, p, gidx, gidx, uniq
    return yt, p, patient_index(gidx, patients), gidx, uniq


def bootstrap_ci(
    y_true: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike | None,
    metric: str | MetricFn,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    patients: ArrayLike | None = None,
    unit: str | None = None,
) -> dict[str, Any]:
    """Percentile bootstrap confidence interval that resamples patients (clusters), not images.

    Each resample draws G patients with replacement from the G patients and keeps all their images; a
    patient drawn twice contributes its images twice and counts as two patients. Image accuracy, PRR and
    patient accuracy are computed in closed form over all resamples at once; other metrics per resample.

    Args:
        y_true: (N,) true labels.
        probs: (N, C) class probabilities.
        groups: (N,) patient ids; ``None`` makes every image its own group (the plain image bootstrap).
        metric: a scalar key of :func:`compute_metrics` (see :data:`SCALAR_METRICS`) or a function
            ``(y_true, probs, groups) -> float | None``.
        n_boot: number of resamples.
        alpha: 1 - confidence level.
        seed: seed of the resampling generator.
        patients: (N,) patient ids that the patient-level metrics score when several patients share a
            resampled group (BreakHis: the patient folders 22549AB / 22549CD of case 22549); ``groups`` if omitted.
        unit: what one group is, for ``ci_note`` ("patient"); by default "image", "patient" or "patient group" as
            ``groups`` and ``patients`` say (a patient scored once per trial is several ``patients`` of one group).

    Too few groups or too few defined resamples give no interval rather than a false one: with fewer than
    :data:`MIN_CI_GROUPS` (5) groups, or when the metric is defined in fewer than :data:`MIN_CI_DEFINED` (half)
    of the resamples (AUC is undefined in a resample that holds one class only), ``low`` and ``high`` are
    ``None`` and ``ci_note`` says why. G groups have only C(2G - 1, G) distinct resamples (3 for 2 patients, 35
    for 4), and with one patient per class every resample where AUC is defined is the data itself: the percentile
    interval of so few came out with width 0 (``low == high == value``), a certainty the data cannot give. From 5
    groups on (126 distinct resamples) intervals are reported as before, however wide.

    Returns:
        ``{"value": metric on all data, "low", "high", "n_boot": resamples the interval rests on (0 when there is
        none), "ci_note": None, or why there is no interval (e.g. "only 4 patients")}``.
    """
    yt, p, pidx, gidx, uniq = _prepare(y_true, probs, groups, patients)
    fn = _resolve_metric(metric)
    values = _boot_values(metric, yt, p, gidx, pidx, _draw_groups(uniq.size, n_boot, seed))
    note = _ci_withheld(values, uniq.size, unit or _unit(groups, pidx, uniq.size))
    low, high = _percentiles(values, alpha)
    value = fn(yt, p, pidx)
    return {
        "value": None if value is None else float(value),
        "low": low,
        "high": high,
        "n_boot": int(np.isfinite(values).sum()),
        "ci_note": note,
    }


def paired_bootstrap(
    y_true: ArrayLike,
    probs_a: ArrayLike,
    probs_b: ArrayLike,
    groups: ArrayLike | None,
    metric: str | MetricFn,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    patients: ArrayLike | None = None,
    unit: str | None = None,
) -> dict[str, Any]:
    """Patient-clustered paired bootstrap of ``metric(b) - metric(a)`` on the same images.

    Both models are scored on the same resampled patients, so the interval reflects only the difference
    between them. The two-sided p-value is twice the fraction of resampled differences on the other side of
    0 from the observed one (0 itself counted, which is conservative), capped at 1; 1 when the difference is 0.
    A difference below :data:`DIFF_ZERO` (1e-12) is 0: the float rounding of two equal metrics, not a difference.

    Args:
        y_true: (N,) true labels.
        probs_a: (N, C) probabilities of the reference model (e.g. ``global``).
        probs_b: (N, C) probabilities of the compared model (e.g. ``fusion``).
        groups: (N,) patient ids; ``None`` makes every image its own group.
        metric: as in :func:`bootstrap_ci`.
        n_boot: number of resamples.
        seed: seed of the resampling generator.
        alpha: 1 - confidence level.
        patients: as in :func:`bootstrap_ci`.
        unit: as in :func:`bootstrap_ci`.

    Returns:
        ``{"diff", "low", "high", "p_value", "n_boot", "ci_note"}``; ``diff`` is ``None`` where the metric is
        undefined; ``n_boot`` counts the resamples that define the difference (a ``p_value`` of 0 means below
        2 / ``n_boot``: no resample fell on the other side of 0);
        ``low``, ``high`` and ``p_value`` are ``None`` where :func:`bootstrap_ci` gives no interval (too few groups
        or defined resamples), and ``ci_note`` then says why (``None`` otherwise).
    """
    yt, pa, pidx, gidx, uniq = _prepare(y_true, probs_a, groups, patients)
    pb = _probs(yt, probs_b)[1]
    if pb.shape != pa.shape:
        raise ValueError(f"probs_a {pa.shape} and probs_b {pb.shape} must have the same shape")
    fn = _resolve_metric(metric)
    draws = _draw_groups(uniq.size, n_boot, seed)
    diffs = _boot_values(metric, yt, pb, gidx, pidx, draws) - _boot_values(metric, yt, pa, gidx, pidx, draws)
    diffs[np.abs(diffs) < DIFF_ZERO] = 0.0  # float rounding of equal metrics: counted at 0, as the p-value says
    # one patient: every resampled difference is the observed one, which gave p = 0; a few: a p-value of few resamples
    note = _ci_withheld(diffs, uniq.size, unit or _unit(groups, pidx, uniq.size))
    low, high = _percentiles(diffs, alpha)
    va, vb = fn(yt, pa, pidx), fn(yt, pb, pidx)
    diff = None if va is None or vb is None else float(vb - va) if abs(vb - va) >= DIFF_ZERO else 0.0
    return {"diff": diff, "low": low, "high": high, "p_value": _two_sided_p(diff, diffs),
            "n_boot": int(np.isfinite(diffs).sum()), "ci_note": note}


def _two_sided_p(diff: float | None, diffs: np.ndarray) -> float | None:
    """Twice the fraction of finite ``diffs`` on the other side of 0 from ``diff`` (or at 0), capped at 1."""
    diffs = diffs[np.isfinite(diffs)]
    if diff is None or diffs.size == 0:
        return None
    if diff == 0:
        return 1.0
    other = diffs <= 0 if diff > 0 else diffs >= 0
    return float(min(1.0, 2 * other.mean()))


# --------------------------------------------------------------------------------------------- across folds
def _is_scalar(x: Any) -> bool:
    """True for int/float values (not bool), numpy scalars included."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool | np.bool_)


def summarize_folds(per_fold: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, dict]:
    """Mean and standard deviation of scalar metrics over folds or trials.

    Args:
        per_fold: one :func:`compute_metrics` dict per fold.
        keys: metrics to summarise; every scalar key of the folds (first-seen order) if omitted.

    Returns:
        ``{key: {"mean", "std", "n"}}`` over the folds where the value is not ``None``; std uses ddof=1
        when n > 1 and is 0 for a single fold; mean and std are ``None`` when n == 0.
    """
    if keys is None:
        keys = list(dict.fromkeys(k for fold in per_fold for k, v in fold.items() if _is_scalar(v)))
    summary = {}
    for key in keys:
        vals = np.array([float(f[key]) for f in per_fold if _is_scalar(f.get(key))])
        if vals.size == 0:
            summary[key] = {"mean": None, "std": None, "n": 0}
            continue
        std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        summary[key] = {"mean": float(vals.mean()), "std": std, "n": int(vals.size)}
    return summary
