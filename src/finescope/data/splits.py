"""Grouped, stratified splits: pure functions over ``labels`` and ``groups`` arrays.

A group (patient, case, source micrograph) is never on two sides of a split. Stratification works on groups: each
group gets its majority label, and every class's groups are shuffled and dealt separately, so every class keeps
at least one group in training and, when it has two or more groups, one in the test side.

Only ``np.random.default_rng(seed)`` draws here: sklearn's ``StratifiedGroupKFold(shuffle=True)`` gave the same
folds for every ``random_state`` on the BreakHis cases, so it is not used.

Example:
    >>> splits = split_groups(sample_set.labels, sample_set.groups, test_fraction=0.3, val_fraction=0.15, seed=0)
    >>> check_no_leak(splits, sample_set.groups)
    >>> save_splits("runs/x/splits.json", splits, sample_set)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finescope.data.records import SampleSet
from finescope.errors import FinescopeError, FinescopeWarning
from finescope.files import json_text, write_text

SIDES = ("train", "val", "test")


def _group_table(labels: Sequence[int], groups: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index the groups.

    Returns:
        ``inverse`` (n,) the group id of each sample, ``group_label`` (G,) each group's majority label (ties go
        to the smaller label) and ``group_size`` (G,) its number of samples.
    """
    labels = np.asarray(labels, dtype=np.int64)
    group_keys = np.asarray([str(g) for g in groups])
    if labels.shape != group_keys.shape:
        raise ValueError(f"labels {labels.shape} and groups {group_keys.shape} must have the same length")
    _, inverse = np.unique(group_keys, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    n_classes = int(labels.max()) + 1 if len(labels) else 1
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)  # (G, n_classes) images per group and class
    np.add.at(counts, (inverse, labels), 1)
    return inverse, counts.argmax(axis=1), counts.sum(axis=1)


def _n_take(fraction: float, n_base: int, n_avail: int, one_from: int) -> int:
    """How many of ``n_avail`` groups to take.

    ``round(fraction * n_base)`` (half up), at least 1 when ``n_avail >= one_from``, always leaving one behind.
    """
    if fraction <= 0 or n_avail < 2:
        return 0
    n = int(np.floor(fraction * n_base + 0.5))  # round half up
    if n_avail >= one_from:
        n = max(n, 1)
    return min(n, n_avail - 1)


def _check_fractions(test_fraction: float, val_fraction: float) -> None:
    for key, value in (("data.test_fraction", test_fraction), ("data.val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise FinescopeError(f"config key '{key}' is {value}; it must be in [0, 1)")
    if test_fraction + val_fraction >= 1.0:
        raise FinescopeError(
            f"data.test_fraction ({test_fraction}) + data.val_fraction ({val_fraction}) must be below 1 "
            "so that training keeps some groups"
        )


def _indices_of(group_ids: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Sorted sample indices whose group is in ``group_ids``."""
    return np.flatnonzero(np.isin(inverse, group_ids)).astype(np.int64)


def split_groups(
    labels: Sequence[int], groups: Sequence[Any], test_fraction: float, val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Split samples into train/val/test by group, stratified by each group's majority label.

    Per class, that class's groups are shuffled with ``np.random.default_rng(seed)``;
    ``round(test_fraction * n)`` go to test (at least 1 when the class has >= 2 groups), then
    ``round(val_fraction * n)`` of the rest to val (at least 1 when >= 3 remain), the rest to train. Every class
    keeps at least one training group; a class with a single group is only in train.

    Args:
        labels: (n,) class index of each sample.
        groups: (n,) group id of each sample (any hashable; compared as strings).
        test_fraction: fraction of each class's groups for test, in [0, 1).
        val_fraction: fraction of each class's groups for validation, in [0, 1); 0 gives an empty val.
        seed: the shuffle seed; other seeds give other partitions whenever more than one is possible.

    Returns:
        ``{"train": (n_train,), "val": (n_val,), "test": (n_test,)}`` sorted int64 sample indices.
    """
    _check_fractions(test_fraction, val_fraction)
    inverse, group_label, _ = _group_table(labels, groups)
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
    for c in np.unique(group_label):
        ids = rng.permutation(np.flatnonzero(group_label == c))  # this class's groups, shuffled
        n_test = _n_take(test_fraction, len(ids), len(ids), one_from=2)
        n_val = _n_take(val_fraction, len(ids), len(ids) - n_test, one_from=3)
        chosen["test"].append(ids[:n_test])
        chosen["val"].append(ids[n_test : n_test + n_val])
        chosen["train"].append(ids[n_test + n_val :])
    return {side: _indices_of(np.concatenate(ids or [[]]), inverse) for side, ids in chosen.items()}


def carve_validation(
    train_idx: np.ndarray, labels: Sequence[int], groups: Sequence[Any], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Take a grouped, stratified validation side out of the training groups only.

    Per class, ``round(val_fraction * n)`` of its training groups go to val (at least 1 when it has >= 3),
    always leaving one in train.

    Args:
        train_idx: (n_train,) sample indices of the training side.
        labels: (n,) class index of every sample.
        groups: (n,) group id of every sample.
        val_fraction: fraction of each class's training groups, in [0, 1).
        seed: the shuffle seed.

    Returns:
        ``(train_idx, val_idx)``, sorted int64 indices into the full sample list.
    """
    _check_fractions(0.0, val_fraction)
    train_idx = np.sort(np.asarray(train_idx, dtype=np.int64))
    labels, groups = np.asarray(labels), np.asarray([str(g) for g in groups])
    inverse, group_label, _ = _group_table(labels[train_idx], groups[train_idx])
    rng = np.random.default_rng(seed)
    val_groups = []
    for c in np.unique(group_label):
        ids = rng.permutation(np.flatnonzero(group_label == c))
        val_groups.append(ids[: _n_take(val_fraction, len(ids), len(ids), one_from=3)])
    is_val = np.isin(inverse, np.concatenate(val_groups or [[]]))
    return train_idx[~is_val], train_idx[is_val]


def _check_folds(k: int, group_label: np.ndarray, class_names: Sequence[str] | None) -> None:
    """Raise when there are fewer groups than folds, overall or in one class."""
    if k < 2:
        raise FinescopeError(f"--folds is {k}; k-fold cross-validation needs at least 2 folds")
    if len(group_label) < k:
        raise FinescopeError(
            f"the data has only {len(group_label)} groups, fewer than the {k} folds; use --folds {len(group_label)} or fewer"
        )
    classes, per_class = np.unique(group_label, return_counts=True)
    for c, n in zip(classes, per_class, strict=True):
        if n < k:
            name = class_names[c] if class_names is not None else str(c)
            raise FinescopeError(
                f"class '{name}' has only {n} groups, so some folds would have no test group of it; "
                f"use --folds {n} or fewer"
            )


def kfold_groups(
    labels: Sequence[int], groups: Sequence[Any], k: int, seed: int, class_names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Grouped, stratified k-fold: the test indices of each fold.

    Per class, the groups are shuffled with ``np.random.default_rng(seed)`` and each goes to the fold holding
    the fewest images of that class so far (ties: fewest images overall, then the lower fold), so each fold gets
    at least one group of every class and similar image counts.

    Args:
        labels: (n,) class index of each sample.
        groups: (n,) group id of each sample.
        k: number of folds, >= 2.
        seed: the shuffle seed.
        class_names: names used in error messages (optional).

    Returns:
        ``k`` sorted int64 arrays of test indices; together a partition of ``range(n)``.

    Raises:
        FinescopeError: fewer groups than folds, overall or in one class.
    """
    inverse, group_label, group_size = _group_table(labels, groups)
    _check_folds(k, group_label, class_names)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(group_label), dtype=np.int64)
    total = np.zeros(k, dtype=np.int64)
    for c in np.unique(group_label):
        of_class = np.zeros(k, dtype=np.int64)
        for g in rng.permutation(np.flatnonzero(group_label == c)):
            fold = int(np.lexsort((np.arange(k), total, of_class))[0])
            fold_of[g] = fold
            of_class[fold] += group_size[g]
            total[fold] += group_size[g]
    return [_indices_of(np.flatnonzero(fold_of == f), inverse) for f in range(k)]


def trial_splits(
    labels: Sequence[int], groups: Sequence[Any], n_trials: int, test_fraction: float, seed: int
) -> list[np.ndarray]:
    """Repeated random group hold-outs (Spanhol et al. 2016: 5 trials, 30% of patients for test).

    Trial ``t`` is :func:`split_groups` with :func:`trial_seed` ``(seed, t)`` and no validation side, so that
    other seeds draw other trials (with ``seed + t``, seed 1's trial 0 was seed 0's trial 1).

    Returns:
        ``n_trials`` sorted int64 arrays of test indices.
    """
    if n_trials < 1:
        raise FinescopeError(f"--trials is {n_trials}; use at least 1")
    return [split_groups(labels, groups, test_fraction, 0.0, trial_seed(seed, t))["test"] for t in range(n_trials)]


def trial_seed(seed: int, t: int) -> int:
    """The shuffle seed of trial ``t`` of ``seed``: a hash of the pair, which no other pair shares in practice."""
    return int(np.random.SeedSequence([seed, t]).generate_state(1)[0])


def check_no_leak(splits: dict[str, np.ndarray], groups: Sequence[Any]) -> None:
    """Raise when a sample or a group is on two sides.

    Args:
        splits: side name -> (n_side,) sample indices.
        groups: (n,) group id of every sample.

    Raises:
        FinescopeError: naming the first shared group (or sample) and the two sides.
    """
    groups = np.asarray([str(g) for g in groups])
    side_of: dict[str, str] = {}
    owner: dict[int, str] = {}
    for side, idx in splits.items():
        for i in np.asarray(idx, dtype=np.int64).tolist():
            if i in owner and owner[i] != side:
                raise FinescopeError(f"split leak: sample {i} is on both '{owner[i]}' and '{side}'")
            owner[i] = side
            other = side_of.setdefault(groups[i], side)
            if other != side:
                raise FinescopeError(
                    f"split leak: group '{groups[i]}' is on both '{other}' and '{side}'; "
                    "a group (patient/case/source) must stay on one side"
                )


# ---------------------------------------------------------------------------------------------- save / load


def _relative(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix() if root else Path(path).as_posix()


def _key(rel: str) -> str:
    """A relative path as splits files are matched to data by: in one Unicode normal form, so that a copy made on
    a Mac (which names 'ü' as 'u' and a combining mark) matches the split of the data Linux or Windows wrote."""
    return unicodedata.normalize("NFC", rel)


def _outside(keys: Sequence[str]) -> bool:
    """Whether any relative path leads out of its root: a manifest's image outside the CSV's folder."""
    return any(k == ".." or k.startswith("../") for k in keys)


def _below_common(keys: Sequence[str]) -> list[str]:
    """``keys`` (relative paths) relative to the innermost folder holding them all: where images outside a
    manifest's folder are named the same after they moved together (``../old/a/x.png`` -> ``a/x.png``)."""
    folders = [k.split("/")[:-1] for k in keys]
    n = 0
    while folders and all(len(f) > n and f[n] == folders[0][n] for f in folders):
        n += 1
    return ["/".join(k.split("/")[n:]) for k in keys]


def _below_listed(keys: Sequence[str], tails: set[str]) -> list[str]:
    """``keys`` (relative paths) relative to the folder below which most of them are one of ``tails`` (listed
    images by their path below the innermost folder holding them): where those moved together, whatever the data
    holds beside them (an image added outside their folder, which :func:`_below_common` of all would take in);
    a key outside that folder is named as no tail is ('/' first). Without such a folder, :func:`_below_common`."""
    found: dict[str, int] = {}
    for k in keys:
        parts = k.split("/")
        for j in range(len(parts)):
            if "/".join(parts[j:]) in tails:
                found["/".join(parts[:j])] = found.get("/".join(parts[:j]), 0) + 1
    if not found:
        return _below_common(keys)
    folder = max(found, key=lambda f: (found[f], f))
    return [k if not folder else k[len(folder) + 1:] if k.startswith(folder + "/") else "/" + k for k in keys]


def _match(listed: Sequence[str], sample_set: SampleSet) -> tuple[dict[str, int], set[str]]:
    """Where the paths a splits file lists (``_key``'d) are in ``sample_set``: listed path -> sample index, and the
    listed paths of images the source skipped. By their path relative to the root; where that leaves some
    unmatched and images lie outside it (a manifest's absolute paths outside the CSV's folder, moved since with
    the manifest rewritten), by their path below the innermost folder holding the listed ones, and the data's
    below the folder where most of those are found (:func:`_below_listed`)."""
    rel = [_key(_relative(s.path, sample_set.root)) for s in sample_set.samples]
    skipped = [_key(_relative(p, sample_set.root)) for p, _ in sample_set.skipped]
    index, gone = {p: i for i, p in enumerate(rel)}, set(skipped)
    if all(p in index or p in gone for p in listed) or not _outside([*listed, *rel, *skipped]):
        return {p: index[p] for p in listed if p in index}, gone & set(listed)
    unique = sorted(set(listed))
    theirs = dict(zip(unique, _below_common(unique)))
    mine = _below_listed(rel + skipped, set(theirs.values()))
    index, gone = {p: i for i, p in enumerate(mine[:len(rel)])}, set(mine[len(rel):])
    return ({p: index[theirs[p]] for p in unique if theirs[p] in index},
            {p for p in unique if theirs[p] in gone})


def save_splits(
    path: str | Path, splits: dict[str, np.ndarray], sample_set: SampleSet, extra: dict | None = None
) -> None:
    """Write splits as JSON with image paths relative to ``sample_set.root`` (posix) and per-side counts.

    Args:
        path: the JSON file to write (its folder is created).
        splits: side name -> sample indices into ``sample_set.samples``.
        sample_set: the samples the indices refer to.
        extra: anything else to record (seed, fractions, fold number, ...).
    """
    rel = [_relative(s.path, sample_set.root) for s in sample_set.samples]
    out = {
        "format": "finescope-splits/1",
        "class_names": list(sample_set.class_names),
        "counts": {side: len(idx) for side, idx in splits.items()},
        "summary": summarize_splits(splits, sample_set),
        "extra": extra or {},
        "splits": {
            side: [rel[i] for i in np.asarray(idx, dtype=np.int64).tolist()] for side, idx in splits.items()
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json_text(out, indent=1))


def stored_class_names(path: str | Path) -> list[str] | None:
    """The class order a splits file (a run's, a cv's or a fold's) records, None when it records none or cannot
    be read (the caller's reading of the file names what is wrong)."""
    try:
        names = json.loads(Path(path).read_text()).get("class_names")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return list(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def _read_split_lists(path: Path, own: bool = False) -> dict[str, list[str]]:
    """The ``splits`` mapping of a splits file (a run's ``own``, or one data.splits names); raise when it is
    missing or malformed."""
    fix = ("it is the run's own split: restore it from a copy, or delete it and resume, which draws it again from "
           "the run's config (the same seed and data give the same split; --resume refuses another)" if own else
           "point data.splits at a splits.json written by finescope, or leave it empty to draw new splits")
    if path.is_dir():  # a run or cv folder: its splits.json is meant
        raise FinescopeError(f"splits file '{path}' is a folder; point data.splits at a splits.json in it (e.g. "
                             f"'{path / 'splits.json'}' of a run)")
    if not path.is_file():
        raise FinescopeError(f"splits file '{path}' not found; {fix}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FinescopeError(f"splits file '{path}' is not valid JSON ({e}); {fix}") from None
    lists = raw.get("splits") if isinstance(raw, dict) else None
    if lists is None and isinstance(raw, dict) and "folds" in raw:
        raise FinescopeError(f"splits file '{path}' holds the folds of a cv run; give one fold's "
                             "folds/<fold>/splits.json from that cv folder")
    if not isinstance(lists, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in lists.values()
    ):
        raise FinescopeError(f"splits file '{path}' has no 'splits' mapping of side -> list of paths; {fix}")
    unknown = [side for side in lists if side not in SIDES]
    if unknown:  # its images would be in no side the trainer reads: left out of training and of every metric
        raise FinescopeError(f"splits file '{path}' has a side '{unknown[0]}'; name the sides "
                             f"{', '.join(SIDES)}")
    return lists


def _images(n: int, noun: str = "image") -> str:
    """'1 image', '3 images' (of ``noun``)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _fold_magnification(path: Path) -> tuple[str, int] | None:
    """(fold name, magnification) of a per-magnification cv's ``folds/<fold>/splits.json`` (its ``extra.fold``,
    e.g. ``40x_fold0``), or None for any other splits file."""
    try:
        fold = json.loads(path.read_text()).get("extra", {}).get("fold")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    found = re.fullmatch(r"(\d+)x_(fold|trial)\d+", fold) if isinstance(fold, str) else None
    return (fold, int(found.group(1))) if found else None


def load_splits(path: str | Path, sample_set: SampleSet, fix: str = "draw new splits by leaving data.splits empty",
                own: bool = False) -> dict[str, np.ndarray]:
    """Read splits written by :func:`save_splits` and match them to ``sample_set`` by relative path (images outside
    the root, moved since, by their place among each other: :func:`_match`).

    Listed images that the source skipped (``data.on_error=skip``) are dropped with a warning. ``fix`` ends the
    error when the file does not match the data (what the caller's user can do about it). A group on two sides
    is an error, except in a run's ``own`` split (evaluated, explained or resumed), which is what it is: a run
    trained when finescope grouped its data otherwise (before 46e660f a ``folder`` image was its own group) gets a
    warning that its metrics are not patient-level.

    Returns:
        side name -> sorted int64 indices into ``sample_set.samples`` (``train``, ``val``, ``test`` always present).

    Raises:
        FinescopeError: missing/invalid file, listed images not in the data, data images not listed, or a leak.
    """
    path = Path(path)
    lists = {side: [_key(p) for p in v] for side, v in _read_split_lists(path, own).items()}
    index, skipped = _match([p for v in lists.values() for p in v], sample_set)
    missing = [p for v in lists.values() for p in v if p not in index and p not in skipped]
    if missing:
        raise FinescopeError(
            f"splits file '{path}' does not match the data: {_images(len(missing), 'listed image')} "
            f"{'is' if len(missing) == 1 else 'are'} not in data.root "
            f"'{sample_set.root}', e.g. '{missing[0]}'; {fix}"
        )
    dropped = [p for v in lists.values() for p in v if p in skipped]
    if dropped:
        warnings.warn(
            f"splits file '{path}': {_images(len(dropped), 'listed image')} "
            f"{'was' if len(dropped) == 1 else 'were'} skipped as unreadable", FinescopeWarning,
            stacklevel=2
        )
    side_of: dict[str, str] = {}
    for side, v in lists.items():  # named here: check_no_leak knows the images by their index only
        for p in v:
            if side_of.setdefault(p, side) != side:
                raise FinescopeError(f"splits file '{path}' lists '{p}' on both '{side_of[p]}' and '{side}'; an image "
                                     f"belongs to one side; {fix}")
    splits = {
        side: np.array(sorted({index[p] for p in v if p in index}), dtype=np.int64)
        for side, v in lists.items()
    }
    for side in SIDES:
        splits.setdefault(side, np.zeros(0, dtype=np.int64))
    covered = set(np.concatenate(list(splits.values())).tolist())
    uncovered = [s.path for i, s in enumerate(sample_set.samples) if i not in covered]
    if uncovered:
        mag = _fold_magnification(path)  # a per-magnification cv's fold lists its magnification's images only
        what = (f"; it is fold {mag[0]} of a per-magnification cv, which holds the {mag[1]}X images only: train it "
                f"with --set data.magnifications=[{mag[1]}]" if mag else " (added since the split was made?); leave "
                "them out of the data (a CSV manifest: remove their rows)")
        raise FinescopeError(
            f"splits file '{path}' does not match the data: {_images(len(uncovered))} in data.root "
            f"{'is' if len(uncovered) == 1 else 'are'} in no split, e.g. '{uncovered[0]}'{what}, or {fix}"
        )
    if not own:
        try:
            check_no_leak_of(splits, sample_set)
        except FinescopeError as e:
            raise FinescopeError(f"splits file '{path}': {e}") from None
    elif leak := own_split_leak(splits, sample_set):
        warnings.warn(f"{path}: {leak}", FinescopeWarning, stacklevel=2)
    return splits


def _digest(lists: dict[str, list[str]], legacy: bool = False) -> str:
    """SHA-256 of the relative paths of every side; images outside the root (a manifest's outside the CSV's folder)
    by their path below the innermost folder holding them, as they are matched after a move, unless ``legacy``
    (as finescope recorded them before it matched images so)."""
    keys = sorted({p for v in lists.values() for p in v})
    name = dict(zip(keys, keys if legacy or not _outside(keys) else _below_common(keys)))
    lines = sorted({f"{side}\t{name[p]}" for side, v in lists.items() for p in v})
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def split_digest(splits: dict[str, np.ndarray], sample_set: SampleSet) -> str:
    """SHA-256 of the images (relative paths) of every side: what a checkpoint records of the split it trained on,
    so that a resume which draws it again (its ``splits.json`` gone) can tell another split from it."""
    return _digest(_named(splits, sample_set))


def split_digests(splits: dict[str, np.ndarray], sample_set: SampleSet) -> set[str]:
    """:func:`split_digest` and the one a checkpoint from before it named images outside the root by recorded:
    what a checkpoint trained on ``splits`` may record."""
    named = _named(splits, sample_set)
    return {_digest(named), _digest(named, legacy=True)}


def _named(splits: dict[str, np.ndarray], sample_set: SampleSet) -> dict[str, list[str]]:
    """side -> the relative paths of its images, as splits files are matched."""
    rel = [_key(_relative(s.path, sample_set.root)) for s in sample_set.samples]
    return {side: [rel[i] for i in np.asarray(idx, dtype=np.int64).tolist()] for side, idx in splits.items()}


def listed_digests(path: str | Path) -> set[str]:
    """:func:`split_digests` of the split a splits file lists, read from the file alone (the digests of the data it
    was saved from, whatever data is read now: of a run's own split also on other data); none when it cannot be
    read."""
    try:
        lists = _read_split_lists(Path(path), own=True)
    except FinescopeError:
        return set()
    named = {side: [_key(p) for p in v] for side, v in lists.items()}
    return {_digest(named), _digest(named, legacy=True), *_earlier_digests(Path(path))}


def _earlier_digests(path: Path) -> list[str]:
    """The digests a run's splits file recorded of its versions before a resume wrote it again
    (:func:`rewritten_digests`); none when it records none."""
    extra = json.loads(path.read_text()).get("extra")
    earlier = extra.get("earlier_digests") if isinstance(extra, dict) else None
    return [d for d in earlier if isinstance(d, str)] if isinstance(earlier, list) else []


def rewritten_digests(path: str | Path, trained: str | None, splits: dict[str, np.ndarray],
                      sample_set: SampleSet) -> list[str]:
    """What a run's splits file at ``path`` is to record when a resume writes it again from ``splits`` (images
    skipped as unreadable since dropped, names matched after a move): the digests of the file as it is now and
    of its earlier versions, when ``trained`` (the resumed checkpoint's ``split_digest``) is among them. The
    run's checkpoints of before keep their digest and still read as trained on this file's split, on other data
    too (:func:`listed_digests`). None when the file is not the split the checkpoint trained on (replaced since:
    no earlier version to vouch for)."""
    before = listed_digests(path)
    return sorted(before - split_digests(splits, sample_set)) if trained in before else []


def empty_split_error(split: str, splits: dict[str, np.ndarray], run: str | Path) -> FinescopeError:
    """The error for a run's ``split`` that holds no image (e.g. a run trained with ``data.test_fraction=0``),
    naming the sides that hold some."""
    others = [side for side in SIDES if len(splits.get(side, []))] + ["all"]
    return FinescopeError(f"the '{split}' split of {run} holds no images; give --split {' or '.join(others)}")


def check_no_leak_of(splits: dict[str, np.ndarray], sample_set: SampleSet) -> None:
    """:func:`check_no_leak` of ``sample_set``'s groups, whose error, for a group that ``data.merge_duplicates``
    joined (``113a+114a``: groups holding byte-identical images), also names the groups it joined and why."""
    try:
        check_no_leak(splits, sample_set.groups)
    except FinescopeError as e:
        joined: dict[str, set[str]] = {}
        for s in sample_set.samples:
            joined.setdefault(s.group, set()).add(str(s.meta.get("source_group", s.group)))
        group = next((g for g, of in joined.items() if len(of) > 1 and f"group '{g}' is on both" in str(e)), None)
        if group is None:
            raise
        raise FinescopeError(f"{e}; '{group}' is the data's groups {', '.join(map(repr, sorted(joined[group])))}, "
                             "joined in one by data.merge_duplicates because they hold byte-identical images: put "
                             "their images on one side") from None


def own_split_leak(splits: dict[str, np.ndarray], sample_set: SampleSet) -> str | None:
    """What is wrong with a run's own split under today's grouping (a group on two sides: the run was split
    when finescope grouped its data otherwise), or None."""
    try:
        check_no_leak(splits, sample_set.groups)
    except FinescopeError as e:
        return (f"{str(e).split(';')[0]} as finescope groups this data now (the run was split when it grouped it "
                "otherwise): its metrics are not patient-level; train it again for a split by patient")
    return None


def trained_on(path: str | Path, sample_set: SampleSet) -> str | None:
    """What of ``sample_set`` (data evaluated whole) a run trained or validated on, by its splits file ``path``:
    the images of :func:`seen_groups`; None when there are none."""
    groups = seen_groups(path, sample_set)
    hits = [s.path for s in sample_set.samples if s.group in groups]
    if not hits:
        return None
    return (f"{len(hits)} of the {len(sample_set)} images evaluated are of {len(groups)} groups (patients) with images "
            f"at the path of ones the run trained or validated on (its splits.json), e.g. '{hits[0]}': if they are "
            "the same patients, these metrics are not those of unseen ones; leave them out of the data, or evaluate "
            "the run's test split")


def seen_groups(path: str | Path, sample_set: SampleSet) -> set[str]:
    """The groups (patients) of ``sample_set`` with an image at the relative path of one on the train or val side
    of a run's splits file ``path`` (also under a root one folder above or below the run's, and a manifest's images
    outside its folder moved since, as :func:`load_splits` finds them); empty when the file cannot be read."""
    try:
        lists = _read_split_lists(Path(path), own=True)
    except FinescopeError:
        return set()
    seen = {_key(p) for side in ("train", "val") for p in lists.get(side, [])}
    tails = {p.split("/", i)[-1] for p in seen for i in range(1, p.count("/") + 1)}  # a root below the run's
    where = _match(sorted({_key(p) for v in lists.values() for p in v}), sample_set)[0]
    moved = {where[p] for p in seen if p in where}

    def was_seen(rel: str) -> bool:
        parts = rel.split("/")
        return rel in tails or any("/".join(parts[i:]) in seen for i in range(len(parts)))

    return {s.group for i, s in enumerate(sample_set.samples)
            if i in moved or was_seen(_key(_relative(s.path, sample_set.root)))}


def trained_files(path: str | Path, files: Sequence[str]) -> set[str] | None:
    """Which of ``files`` (absolute paths) lie at the place of an image on the train or val side of the splits file
    ``path`` (their path ends with its relative one, leading ``../`` dropped, or, for a manifest's images outside
    its folder, with their path below the innermost folder holding the listed ones, as :func:`_match` finds them
    moved): the images a run trained or validated on, where its data cannot be read (moved since); their real
    paths, or None when the file cannot be read."""
    try:
        lists = _read_split_lists(Path(path), own=True)
    except FinescopeError:
        return None
    listed = sorted({_key(p) for v in lists.values() for p in v})
    below = dict(zip(listed, _below_common(listed) if _outside(listed) else listed))
    seen = set()
    for p in (_key(p) for side in ("train", "val") for p in lists.get(side, [])):
        parts = p.split("/")
        seen |= {"/".join(parts[next((i for i, part in enumerate(parts) if part != ".."), len(parts)):]), below[p]}
    out = set()
    for f in files:
        parts = _key(Path(f).as_posix()).split("/")
        if any("/".join(parts[i:]) in seen for i in range(1, len(parts))):
            out.add(os.path.realpath(f))
    return out


def summarize_splits(splits: dict[str, np.ndarray], sample_set: SampleSet) -> dict:
    """Images and groups per class on each side, to rule out leakage at a glance.

    Returns:
        ``{side: {"images": n, "groups": g, "shared_groups": s, "per_class": {name: {"images": n, "groups": g}}}}``
        where ``shared_groups`` counts this side's groups that also sit on another side (0 when nothing leaks).
    """
    chosen = {
        side: [sample_set.samples[i] for i in np.asarray(idx, dtype=np.int64).tolist()]
        for side, idx in splits.items()
    }
    groups_of = {side: {s.group for s in samples} for side, samples in chosen.items()}
    out: dict[str, Any] = {}
    for side, samples in chosen.items():
        others = set().union(*(g for other, g in groups_of.items() if other != side))
        per_class = {}
        for c, name in enumerate(sample_set.class_names):
            of_c = [s for s in samples if s.label == c]
            per_class[name] = {"images": len(of_c), "groups": len({s.group for s in of_c})}
        out[side] = {
            "images": len(samples),
            "groups": len(groups_of[side]),
            "shared_groups": len(groups_of[side] & others),
            "per_class": per_class,
        }
    return out


__all__ = [
    "carve_validation",
    "check_no_leak",
    "kfold_groups",
    "empty_split_error",
    "load_splits",
    "save_splits",
    "split_groups",
    "summarize_splits",
    "trial_splits",
]
