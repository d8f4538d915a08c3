"""Patient-level cross-validation and the ablation table: every variant trained and tested on the same splits.

A cross-validation directory holds::

    cv.json                  the protocol and the resolved config (a rerun must match it)
    splits.json              every fold's train/val/test images (reusable with ``--splits``)
    folds/<fold>/splits.json one fold in the trainer's splits format
    runs/<variant>/<fold>/   one training run per variant and fold (resumable: a finished fold is skipped)
    predictions.csv          out-of-fold predictions of every image, every variant
    summary.json             per-fold metrics, mean and std per variant (and magnification), pooled
                             out-of-fold metrics with patient-clustered intervals, paired comparisons

Folds are either grouped, stratified k-fold (:func:`~finescope.data.kfold_groups`) or repeated random
hold-outs of a fraction of the groups (Spanhol et al. 2016: 5 trials, 30% of patients); validation for early
stopping is carved from each fold's training groups only. With ``per_magnification`` the folds, runs and
metrics are made separately for every magnification the source has (BreakHis 40X/100X/200X/400X).

Example:
    >>> cfg, protocol = load_protocol("configs/breakhis_protocol.yaml", profile="quick")
    >>> summary = run_cv(cfg, protocol, "runs/cv_breakhis")
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from finescope.config import (
    Config,
    config_from_dict,
    first_difference,
    load_config,
    read_yaml_mapping,
    stored_config,
    to_dict,
)
from finescope.data import (
    SampleSet,
    carve_validation,
    check_no_leak,
    kfold_groups,
    load_samples,
    save_splits,
    summarize_splits,
    trial_splits,
)
from finescope.data.sources import check_outside_data, in_class_order
from finescope.data.splits import SIDES, _group_table, _key, _match, _relative, stored_class_names
from finescope.errors import FinescopeError, FinescopeWarning
from finescope.files import json_text, remove_temporaries, write_text
from finescope.models import list_models

CV_FORMAT = "finescope-cv-splits/1"


@dataclass(frozen=True)
class Protocol:
    """How the folds are drawn and which variants are compared.

    Attributes:
        variants: model variants to train on every fold (names of :func:`~finescope.models.list_models`).
        folds: k of grouped, stratified k-fold; 0 uses ``trials`` instead.
        trials: number of repeated random group hold-outs (used when ``folds`` is 0).
        test_fraction: fraction of each class's groups held out per trial.
        per_magnification: separate folds and runs per magnification (when the samples have one).
        reference: the variant every other one is compared with (paired bootstrap); default the first.
        n_boot: bootstrap resamples for the intervals.
    """

    variants: tuple[str, ...] = ("global", "attention", "fusion")
    folds: int = 0
    trials: int = 5
    test_fraction: float = 0.3
    per_magnification: bool = False
    reference: str = ""
    n_boot: int = 1000

    @property
    def ref(self) -> str:
        return self.reference or self.variants[0]


@dataclass
class Fold:
    """One fold: its name, magnification (None = all) and sample indices into the full sample set."""

    name: str
    magnification: int | None
    splits: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- protocol
def make_protocol(raw: dict | None, where: str = "protocol") -> Protocol:
    """A :class:`Protocol` from a mapping; unknown keys and bad values raise naming ``where``."""
    raw = dict(raw or {})
    names = {f.name for f in fields(Protocol)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise FinescopeError(f"unknown key '{where}.{unknown[0]}'; valid keys: {', '.join(sorted(names))}")
    if isinstance(raw.get("variants"), str):
        raw["variants"] = [v for v in raw["variants"].split(",") if v.strip()]
    if "variants" in raw:
        if not isinstance(raw["variants"], (list, tuple)):  # variants: (empty) or variants: 5 in the YAML
            raise FinescopeError(f"'{where}.variants' must be a list of variant names (or 'global,fusion'), got "
                                 f"{raw['variants']!r}")
        raw["variants"] = tuple(str(v).strip() for v in raw["variants"])
    for key, tp in (("folds", int), ("trials", int), ("n_boot", int), ("test_fraction", float),
                    ("per_magnification", bool)):
        if key in raw and (isinstance(raw[key], bool) != (tp is bool) or not isinstance(raw[key], (int, float))
                           or (tp is int and not (math.isfinite(raw[key]) and raw[key] == int(raw[key])))):
            raise FinescopeError(f"'{where}.{key}' must be {'true or false' if tp is bool else f'a {tp.__name__}'}"
                                 f", got {raw[key]!r}")
        if key in raw and tp is int:
            raw[key] = int(raw[key])  # folds: 5.0 is 5 folds
    if "reference" in raw and not isinstance(raw["reference"], str):
        raise FinescopeError(f"'{where}.reference' must be a variant name, got {raw['reference']!r}")
    protocol = Protocol(**raw)
    check_protocol(protocol)
    return protocol


def check_protocol(p: Protocol) -> None:
    """Raise :class:`FinescopeError` for unknown variants, no folds/trials, a bad test fraction or no resamples."""
    known = list_models()
    if not p.variants:
        raise FinescopeError(f"--variants is empty; choose from: {', '.join(known)}")
    for v in p.variants:
        if v not in known:
            raise FinescopeError(f"unknown variant '{v}' in --variants; choose from: {', '.join(known)}")
    if len(set(p.variants)) != len(p.variants):
        raise FinescopeError(f"--variants lists a variant twice: {','.join(p.variants)}")
    if p.reference and p.reference not in p.variants:
        raise FinescopeError(f"reference variant '{p.reference}' is not in --variants {','.join(p.variants)}")
    if p.folds == 1 or p.folds < 0:
        raise FinescopeError(f"--folds is {p.folds}; k-fold needs at least 2 folds (or use --trials)")
    if p.folds == 0 and p.trials < 1:
        raise FinescopeError("give --folds K (>= 2) or --trials N (>= 1)")
    if not 0.0 < p.test_fraction < 1.0:
        raise FinescopeError(f"--test-fraction is {p.test_fraction}; it must be in (0, 1)")
    if p.n_boot < 1:  # else every fold trains and the summary's bootstrap stops with a traceback
        raise FinescopeError(f"'protocol.n_boot' is {p.n_boot}; the intervals need at least 1 bootstrap resample "
                             "(default 1000)")


def load_protocol(
    path: str | Path, profile: str = "", overrides: list[str] | None = None, protocol: dict | None = None
) -> tuple[Config, Protocol]:
    """Read an experiment YAML that may also hold ``protocol:`` and ``profiles:`` sections.

    A profile (e.g. ``quick``) is a mapping merged over the file: its ``protocol`` entries over the file's
    protocol, its ``data``/``model``/``train`` entries over the config. ``--set`` overrides and the CLI's
    protocol flags (``protocol``) are applied last; ``--set data.test_fraction=F`` is the trials' test fraction
    (as ``--test-fraction F``; both at other values raise).

    Returns:
        The resolved config and protocol.
    """
    path = Path(path)
    raw = read_yaml_mapping(path)

    def mapping(value: Any, key: str) -> dict:
        if not isinstance(value or {}, dict):
            raise FinescopeError(f"config file '{path}': '{key}' must be a mapping, got {value!r}")
        return dict(value or {})

    proto = mapping(raw.pop("protocol", None), "protocol")
    profiles = mapping(raw.pop("profiles", None), "profiles")
    if "_provenance" in raw:  # a run's own config.yaml: read as that run was trained, as load_config does
        raw = stored_config(raw)
    if profile:
        if profile not in profiles:
            have = ", ".join(map(str, profiles)) or "none"
            raise FinescopeError(f"config file '{path}' has no profile '{profile}'; profiles: {have}")
        chosen = mapping(copy.deepcopy(profiles[profile]), f"profiles.{profile}")
        proto.update(mapping(chosen.pop("protocol", None), f"profiles.{profile}.protocol"))
        raw = _merge(raw, chosen)
    cfg = load_config(base=raw, overrides=overrides)
    flags = {k: v for k, v in (protocol or {}).items() if v is not None}
    if sets_test_fraction(overrides):  # the command line's: over the file's protocol and profiles, as the flags
        if flags.get("test_fraction", cfg.data.test_fraction) != cfg.data.test_fraction:
            raise FinescopeError(f"--test-fraction {flags['test_fraction']} and --set data.test_fraction="
                                 f"{cfg.data.test_fraction}: give one of them (the fraction of each class's groups "
                                 "a trial holds out)")
        proto["test_fraction"] = cfg.data.test_fraction
    proto.update(flags)
    p = make_protocol(proto)
    if p.folds and ("test_fraction" in flags or sets_test_fraction(overrides)):
        given = (f"--test-fraction {flags['test_fraction']}" if "test_fraction" in flags
                 else f"data.test_fraction={cfg.data.test_fraction}")
        warnings.warn(f"k-fold (--folds {p.folds}) tests 1/{p.folds} of the groups in each fold and does not read "
                      f"{given}, the fraction --trials N holds out", FinescopeWarning, stacklevel=2)
    return cfg, p


def sets_test_fraction(overrides: list[str] | None) -> bool:
    """Whether the ``--set`` items ``overrides`` set ``data.test_fraction``, which cv reads as --test-fraction."""
    return any(item.split("=", 1)[0].strip() == "data.test_fraction" for item in overrides or [])


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------- folds
def magnification_subsets(sample_set: SampleSet, per_magnification: bool) -> dict[int | None, np.ndarray]:
    """Sample indices per magnification (``{None: all}`` when not per magnification or the data has none)."""
    mags = [s.meta.get("magnification") for s in sample_set.samples]
    if not per_magnification or any(m is None for m in mags):
        return {None: np.arange(len(sample_set), dtype=np.int64)}
    values = np.array(mags)
    return {int(m): np.flatnonzero(values == m) for m in sorted(set(mags))}


def as_drawn(p: Protocol, sample_set: SampleSet) -> Protocol:
    """``p`` as its folds are drawn on ``sample_set``: ``per_magnification`` false where images without a
    magnification make the folds take all images together (:func:`make_folds` warns so), what cv.json records."""
    return replace(p, per_magnification=None not in magnification_subsets(sample_set, p.per_magnification))


def _test_sides(sample_set: SampleSet, idx: np.ndarray, p: Protocol, seed: int, where: str) -> list[np.ndarray]:
    """Test indices (into the full set) of each fold of the subset ``idx``."""
    labels = np.asarray(sample_set.labels)[idx]
    groups = np.asarray([s.group for s in sample_set.samples])[idx]
    if p.folds:
        _check_fold_classes(labels, groups, p.folds, sample_set.class_names, where)
    try:
        if p.folds:
            parts = kfold_groups(labels, groups, p.folds, seed, sample_set.class_names)
        else:
            parts = trial_splits(labels, groups, p.trials, p.test_fraction, seed)
    except FinescopeError as e:
        raise FinescopeError(f"{where}: {e}") from None
    if not any(len(part) for part in parts):  # trials of single-group classes: no run would have a test image
        raise FinescopeError(f"{where}: every class has a single group, so no trial holds out any image to test; "
                             "cross-validation needs a class with 2 or more groups (patients, cases): add them, or "
                             "check data.group_pattern")
    untested = [n for c, n in enumerate(sample_set.class_names)
                if (labels == c).any() and not any((labels[part] == c).any() for part in parts)]
    if untested:
        many = len(untested) > 1
        warnings.warn(f"{where}: class{'es' if many else ''} {', '.join(repr(n) for n in untested)} "
                      f"{'are' if many else 'is'} in no trial's test side (a class with a single group of its own, a "
                      "group counting for the class most of its images have, stays in training), so no metric scores "
                      f"{'them' if many else 'it'}", FinescopeWarning, stacklevel=2)
    return [idx[part] for part in parts]


def _check_fold_classes(labels: np.ndarray, groups: np.ndarray, k: int, names: list[str], where: str) -> None:
    """Raise naming the first class with fewer groups than folds, its group count and what to do instead. A group
    counts for the class most of its images have, as :func:`~finescope.data.kfold_groups` deals it to a fold."""
    n_groups = len(set(groups.tolist()))
    _, group_label, _ = _group_table(labels, groups)
    counts = {name: int((group_label == c).sum()) for c, name in enumerate(names) if (labels == c).any()}
    single = [(name, n) for name, n in counts.items() if n <= 1]  # 0: its images lie in other classes' groups only
    if single:
        own = "; ".join(
            f"class{'es' if len(names) > 1 else ''} {', '.join(repr(name) for name in names)} "
            f"{'have' if len(names) > 1 else 'has'} {'only 1 group' if n else 'no group'} of "
            f"{'their' if len(names) > 1 else 'its'} own"
            for n in (1, 0) if (names := [name for name, m in single if m == n])
        )
        raise FinescopeError(
            f"{where}: {own} (a group counts for the class most of its images have), so k-fold cannot give every "
            "fold a test group of each; use --trials N --test-fraction F instead (a class with one group of its own "
            "then stays in training) or drop them"
        )
    short = [(n, name) for name, n in counts.items() if 0 < n < k]
    if n_groups < k:  # the folds that fit are those of the class with the fewest groups, not of all groups
        n, name = min(short)
        raise FinescopeError(f"{where} has only {n_groups} groups, fewer than --folds {k}; use --folds {n} or fewer"
                             + (f" (class '{name}' has {n} groups of its own)" if n < n_groups else ""))
    if short:
        n, name = min(short)
        raise FinescopeError(
            f"{where}: class '{name}' has only {n} groups of its own, so with --folds {k} some folds would have no test group "
            f"of it; use --folds {n} or fewer"
        )


def make_folds(sample_set: SampleSet, p: Protocol, seed: int, val_fraction: float) -> list[Fold]:
    """Every fold of the protocol: grouped test sides, validation carved from the training groups only.

    Raises:
        FinescopeError: fewer groups than folds, or a class with fewer groups than folds (naming it).
    """
    labels = np.asarray(sample_set.labels)
    groups = [s.group for s in sample_set.samples]
    folds = []
    missing = sum(s.meta.get("magnification") is None for s in sample_set.samples)
    if p.per_magnification and missing:
        warnings.warn(f"per-magnification: {missing} of the {len(sample_set)} images have no magnification (a "
                      "BreakHis file name or a manifest's magnification column gives one), so the folds, runs and "
                      "metrics take all images together; --no-per-magnification says so without this warning",
                      FinescopeWarning, stacklevel=2)
    subsets = magnification_subsets(sample_set, p.per_magnification)
    _check_magnification_classes(sample_set, subsets)
    for mag, idx in subsets.items():
        where = f"{mag}X" if mag is not None else "the data"
        kind = "fold" if p.folds else "trial"
        for f, test in enumerate(_test_sides(sample_set, idx, p, seed, where)):
            rest = np.setdiff1d(idx, test)
            train, val = carve_validation(rest, labels, groups, val_fraction, seed + 1000 + f)
            name = f"{kind}{f}" if mag is None else f"{mag}x_{kind}{f}"
            splits = {"train": train, "val": val, "test": np.sort(test)}
            check_no_leak(splits, groups)
            folds.append(Fold(name, mag, splits))
    if val_fraction > 0 and (message := _thin_validation_warning(folds, sample_set)):
        warnings.warn(message, FinescopeWarning, stacklevel=2)
    return folds


def _check_magnification_classes(sample_set: SampleSet, subsets: dict[int | None, np.ndarray]) -> None:
    """Refuse a magnification without an image of some class: its folds train with ``data.magnifications`` of
    it alone, a classifier of fewer classes than the cv's, whose predictions the cv cannot collect."""
    labels = np.asarray(sample_set.labels)
    present = set(labels.tolist())
    for mag, idx in subsets.items():
        missing = [name for c, name in enumerate(sample_set.class_names)
                   if c in present and not (labels[idx] == c).any()]
        if mag is None or not missing:
            continue
        many = len(missing) > 1
        rest = ",".join(str(m) for m in subsets if m != mag)
        raise FinescopeError(
            f"{mag}X has no image of class{'es' if many else ''} {', '.join(repr(n) for n in missing)}, so its "
            f"per-magnification folds would train a classifier of the other classes only; use "
            f"--no-per-magnification (all magnifications together), or leave {mag}X out with --set "
            f"data.magnifications=[{rest}]")


def _thin_validation_warning(folds: list[Fold], sample_set: SampleSet) -> str | None:
    """One line naming the folds whose validation side holds no image of a class their training side has
    (:func:`~finescope.data.carve_validation` spares a class's group only once it has 3 there), or None."""
    labels = np.asarray(sample_set.labels)
    lacking = []
    for f in folds:
        val = set(labels[f.splits["val"]].tolist())
        trained = set(labels[f.splits["train"]].tolist())
        missing = [name for c, name in enumerate(sample_set.class_names) if c in trained and c not in val]
        if missing:
            lacking.append(f"{f.name}: {', '.join(missing) if val else 'empty'}")
    if not lacking:
        return None
    return (f"the validation side of {len(lacking)} of {len(folds)} folds holds no image of a class "
            f"({'; '.join(lacking)}): a class spares a group for validation only with 3 or more training groups in "
            "a fold, so early stopping and best.pt judge those folds by the other classes only (an empty side: "
            "best.pt is the last epoch and early stopping is off); add groups (patients) to those classes, or set "
            "data.val_fraction=0 to train every fold to its last epoch")


def save_cv_splits(path: Path, folds: list[Fold], sample_set: SampleSet, extra: dict) -> None:
    """Write every fold (image paths relative to the data root) and its per-side summary as one JSON file."""
    rel = [_relative(s.path, sample_set.root) for s in sample_set.samples]
    out = {
        "format": CV_FORMAT,
        "class_names": list(sample_set.class_names),
        "extra": extra,
        "folds": [
            {
                "name": f.name,
                "magnification": f.magnification,
                "summary": summarize_splits(f.splits, sample_set),
                "splits": {side: [rel[i] for i in idx.tolist()] for side, idx in f.splits.items()},
            }
            for f in folds
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json_text(out, indent=1))


def load_cv_splits(path: str | Path, sample_set: SampleSet, per_magnification: bool, own: bool = False) -> list[Fold]:
    """Read folds written by :func:`save_cv_splits` and check they fit ``sample_set``; ``own``: the cv folder's
    own file (a rerun's), which errors name as such, not as ``--splits``.

    Raises:
        FinescopeError: not a cv splits file, other classes, images not in the data, a fold that does not
            cover its images exactly, or a group on two sides.
    """
    path = Path(path)
    fix = "use the splits.json of a finescope cv run on this data, or leave --splits out to draw new folds"
    what = f"--splits '{path}'"
    if own:  # what its folds were trained on: the data changed since
        what = f"this cv folder's splits file '{path}'"
        fix = "the data changed since its folds were drawn: restore it, or run this cv into a new --out folder"
    if path.is_dir() and not own:  # a cv folder: its splits.json is meant
        raise FinescopeError(f"{what} is a folder; pass the splits.json file in it (e.g. '{path / 'splits.json'}' "
                             "of a finescope cv folder), or leave --splits out to draw new folds")
    if not path.is_file():
        raise FinescopeError(f"{what} not found; {fix}")
    try:
        raw = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if not isinstance(raw, dict) or raw.get("format") != CV_FORMAT or not isinstance(raw.get("folds"), list):
        raise FinescopeError(f"{what} is not a finescope cv splits file ({CV_FORMAT}); {fix}")
    if not raw["folds"]:  # else nothing is trained and the summary finds no predictions
        raise FinescopeError(f"{what} holds no fold (the file is damaged or was edited); {fix}")
    if raw.get("class_names") != list(sample_set.class_names):
        raise FinescopeError(
            f"{what} is for classes {raw.get('class_names')} but the data has {sample_set.class_names}; "
            f"{fix}"
        )
    for n, item in enumerate(raw["folds"]):
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("splits"), dict)
                and all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in item["splits"].values())):
            raise FinescopeError(f"{what}: fold {n} is not a name with a 'splits' mapping of side -> list "
                                 f"of image paths (the file is damaged or was edited); {fix}")
        name, mag = item["name"], item.get("magnification")
        if name in ("", ".", "..") or "/" in name or "\\" in name or name in [f["name"] for f in raw["folds"][:n]]:
            raise FinescopeError(f"{what}: fold {n} is named {name!r}, which is empty, not a plain folder name or "
                                 f"another fold's; its runs go to runs/<variant>/<fold> (the file is damaged or was "
                                 f"edited); {fix}")
        if mag is not None and (not isinstance(mag, int) or isinstance(mag, bool)):
            raise FinescopeError(f"{what}: fold {name} has magnification {mag!r}, neither a whole number nor null "
                                 f"(the file is damaged or was edited); {fix}")
        sides = set(item["splits"])
        if not {"train", "test"} <= sides <= set(SIDES):
            raise FinescopeError(f"{what}: fold {item['name']} has the sides {sorted(sides)}, not train and "
                                 f"test (and val) (the file is damaged or was edited); {fix}")
    index = _match([_key(p) for item in raw["folds"] for v in item["splits"].values() for p in v], sample_set)[0]
    subsets = magnification_subsets(sample_set, per_magnification)
    folds = []
    for item in raw["folds"]:
        splits = {}
        for side, paths in item["splits"].items():
            paths = [_key(p) for p in paths]
            missing = [p for p in paths if p not in index]
            if missing:
                raise FinescopeError(
                    f"{what} does not match the data: fold {item['name']} lists {len(missing)} images "
                    f"not under data.root '{sample_set.root}', e.g. '{missing[0]}'; {fix}"
                )
            splits[side] = np.array(sorted(index[p] for p in paths), dtype=np.int64)
        mag = item.get("magnification")
        _check_cover(splits, subsets.get(mag), item["name"], what, fix, sample_set)
        try:  # the data grouped otherwise since (a group column edited, another data.group_pattern)
            check_no_leak(splits, [s.group for s in sample_set.samples])
        except FinescopeError as e:
            raise FinescopeError(f"{what} does not match the data's groups: fold {item['name']}: {e}; {fix}") from None
        folds.append(Fold(item["name"], mag, splits))
    return folds


def _check_cover(splits: dict, expected: np.ndarray | None, name: str, what: str, fix: str,
                 sample_set: SampleSet) -> None:
    got = np.sort(np.concatenate(list(splits.values())))
    if expected is None or not np.array_equal(got, np.sort(expected)):
        n = 0 if expected is None else len(expected)
        unlisted = sorted(set(expected.tolist()) - set(got.tolist())) if expected is not None else []
        example = (f": e.g. '{_relative(sample_set.samples[unlisted[0]].path, sample_set.root)}' is in none of its "
                   "sides" if unlisted else "")  # an image added to the data since
        raise FinescopeError(
            f"{what} does not match the data: fold {name} covers {len(got)} images but the data "
            f"has {n} for it{example} (check data.root, data.magnifications and --per-magnification); {fix}"
        )


# ---------------------------------------------------------------------------------------------- running
def _stored_settings(cfg: Config, p: Protocol) -> dict:
    """What a resumed cv run must share with the first run: the config and how the folds were drawn."""
    proto = {k: v for k, v in asdict(p).items() if k in ("folds", "trials", "test_fraction", "per_magnification")}
    if p.folds:
        proto.pop("trials"), proto.pop("test_fraction")
    return {"config": to_dict(cfg), "protocol": proto}


def check_rerun(out: Path, cfg: Config, p: Protocol, asked: Protocol | None = None) -> None:
    """Refuse to mix settings in one cv directory; a rerun with the same settings resumes it. ``p``: the protocol
    as drawn (:func:`as_drawn`); ``asked``: as given, which a cv.json written before it recorded what was drawn
    holds (``per_magnification`` true of folds that took all images together)."""
    path = out / "cv.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):
        raise FinescopeError(f"'{path}' is damaged (not the JSON record finescope cv writes), so the settings of its "
                             "folds cannot be checked; restore it, or run this cv into a new --out folder")
    ignore = tuple(f"config.{k}" for k in _rerun_free())
    diff = first_difference(old.get("settings"), _stored_settings(cfg, p), ignore=ignore)
    if diff and asked is not None and not first_difference(old.get("settings"), _stored_settings(cfg, asked),
                                                           ignore=ignore):
        diff = None
    if diff:
        diff = diff.removeprefix("config.")
        raise FinescopeError(
            f"'{out}' holds a cv run with other settings: {diff}; rerun with the same settings to resume, "
            "or choose another --out"
        )


def _rerun_free() -> tuple[str, ...]:
    """The config keys a cv rerun may change, as ``train --resume`` may (:data:`~finescope.trainer.RESUME_FREE`):
    where the data is (its folds name images relative to ``data.root``, and a finished fold's predictions are
    matched by their place under the root it trained on: :func:`~finescope.oof.collect_predictions`), where the
    cache is, how the data is read (``data.on_error``) and how fast, on which device; not how long it trains nor
    what it reads (``train.compile`` drops the last incomplete batch)."""
    from finescope.trainer import RESUME_FREE

    return tuple(k for k in RESUME_FREE if k not in ("train.epochs", "train.patience", "train.compile"))


def resolve_folds(out: Path, sample_set: SampleSet, cfg: Config, p: Protocol, splits_file: str = "",
                  reuse: bool = True) -> list[Fold]:
    """The run's folds: its own ``splits.json`` when resuming (and ``reuse``), ``--splits FILE``, or newly drawn."""
    own = out / "splits.json"
    if reuse and own.is_file():
        folds = load_cv_splits(own, sample_set, p.per_magnification, own=True)
        _check_drawn_with(own, cfg, p, sample_set)
        if splits_file and _fold_lists(load_cv_splits(splits_file, sample_set, p.per_magnification)) != _fold_lists(
                folds):
            raise FinescopeError(
                f"'{out}' already holds other folds than --splits '{splits_file}'; choose another --out"
            )
        return folds
    if splits_file:
        return load_cv_splits(splits_file, sample_set, p.per_magnification)
    return make_folds(sample_set, p, cfg.seed, cfg.data.val_fraction)


def _check_drawn_with(path: Path, cfg: Config, p: Protocol, sample_set: SampleSet) -> None:
    """Refuse a cv folder's folds recorded with another seed or protocol than this run's (what cv.json guards,
    when it was removed): the cv would go on with the folds it holds, e.g. 2 folds under --folds 5. The protocol
    as drawn on ``sample_set`` (:func:`as_drawn`), or as given (what a splits.json of before recorded)."""
    extra = json.loads(path.read_text()).get("extra")
    now, given = ({"seed": cfg.seed, **_stored_settings(cfg, q)["protocol"]} for q in (as_drawn(p, sample_set), p))
    key = next((k for k in now if isinstance(extra, dict) and k in extra and extra[k] != now[k]
                and extra[k] != given[k]), None)
    if key:
        name = "seed" if key == "seed" else f"--{key.replace('_', '-')}"
        raise FinescopeError(f"'{path}' holds folds drawn with {name} {extra[key]!r}, not {now[key]!r}; rerun with "
                             "the settings of that cv, or choose another --out")


def splits_protocol(path: str | Path, p: Protocol) -> Protocol:
    """``p`` with the fold settings of the cv splits file ``path``, which a cv reusing it runs: k-fold with as many
    folds as it holds (per magnification), or that many trials at the test fraction it records (``p``'s where it
    records none); per magnification where its folds have one. ``p`` itself when the file cannot be read
    (:func:`load_cv_splits` then says why)."""
    try:
        raw = json.loads(Path(path).read_text())
        names = [str(f["name"]) for f in raw["folds"]]
        count = max(Counter(str(f.get("magnification")) for f in raw["folds"]).values(), default=0)
        p = replace(p, per_magnification=any(f.get("magnification") is not None for f in raw["folds"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return p
    extra = raw.get("extra") if isinstance(raw.get("extra"), dict) else {}
    drawn = extra.get("folds")
    if isinstance(drawn, int) and not isinstance(drawn, bool):
        kfold = drawn > 0
    else:  # a file without its record: the fold names say (fold0 or 100x_fold0, trial0)
        kfold = all(re.fullmatch(r"(\d+x_)?fold\d+", n) for n in names)
    if kfold:
        return replace(p, folds=count, trials=0)
    fraction = extra.get("test_fraction")
    ok = isinstance(fraction, float) and 0.0 < fraction < 1.0
    return replace(p, folds=0, trials=count, test_fraction=fraction if ok else p.test_fraction)


def _splits_val_fraction(path: str | Path, cfg: Config) -> Config:
    """``cfg`` with the ``data.val_fraction`` that carved the validation sides of the cv splits file ``path``,
    where it records one (with a warning when ``cfg``'s differs: a reuse does not carve them again)."""
    try:
        extra = json.loads(Path(path).read_text()).get("extra")
        used = extra["val_fraction"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return cfg
    if not isinstance(used, (int, float)) or isinstance(used, bool) or not 0.0 <= used < 1.0:
        return cfg
    if float(used) != cfg.data.val_fraction:
        warnings.warn(f"the validation sides of --splits '{path}' were carved at data.val_fraction={float(used)} and "
                      f"are reused as they are; data.val_fraction={cfg.data.val_fraction} is not read",
                      FinescopeWarning, stacklevel=3)
    return replace(cfg, data=replace(cfg.data, val_fraction=float(used)))


def _check_given(given: Collection[str], asked: Protocol, used: Protocol, splits_file: str) -> None:
    """Refuse protocol flags (``given``: ``folds``, ``trials``, ``test_fraction``, ``per_magnification``) that the
    folds of ``--splits`` contradict: cv trains the file's folds as they are, so a --trials 5 beside a 2-fold file
    would be ignored. ``asked``: as drawn on the data (:func:`as_drawn`)."""
    names = ("folds", "trials", "test_fraction", "per_magnification")
    wrong = [name for name in names if name in given and (getattr(asked, name) != getattr(used, name) or (
        name in ("trials", "test_fraction") and used.folds > 0))]
    if not wrong:
        return
    held = (f"the {used.folds} folds of --folds {used.folds}" if used.folds else
            f"the {used.trials} trials of --trials {used.trials} --test-fraction {used.test_fraction}")
    if "per_magnification" in wrong:
        held += " --per-magnification" if used.per_magnification else " --no-per-magnification"
    flags = " ".join(("--" if getattr(asked, n) else "--no-") + "per-magnification" if n == "per_magnification"
                     else f"--{n.replace('_', '-')} {getattr(asked, n)}" for n in wrong)
    raise FinescopeError(f"--splits '{splits_file}' holds {held}, not {flags}: cv reuses its folds as they are; "
                         f"leave {flags} out to reuse them, or leave --splits out to draw new folds")


def _fold_lists(folds: list[Fold]) -> list:
    """What makes two lists of folds the same: names, magnifications and the images of every side."""
    return [(f.name, f.magnification, {side: idx.tolist() for side, idx in f.splits.items()}) for f in folds]


def fold_config(cfg: Config, variant: str, fold: Fold, fold_file: Path) -> Config:
    """The training config of one variant on one fold (its splits file, its magnification)."""
    data = {"splits": str(fold_file)}
    if fold.magnification is not None:
        data["magnifications"] = [fold.magnification]
    raw = to_dict(cfg)
    raw["data"].update(data)
    raw["model"]["variant"] = variant
    raw["name"] = f"{cfg.name or 'cv'}_{variant}_{fold.name}"
    return config_from_dict(raw)


def run_fold(cfg: Config, run_dir: Path, progress: bool) -> str:
    """Train one fold unless it is finished; resume it from ``last.pt`` when it was interrupted.

    Returns:
        ``"done"`` (already finished), ``"resumed"`` or ``"trained"``.
    """
    from finescope.trainer import RunLocked, as_resumed, train

    if _finished(run_dir):
        return "done"
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    try:
        train(as_resumed(cfg, run_dir) if resume else cfg, run_dir, resume=resume, progress=progress)
    except RunLocked as e:  # another cv into this folder: train's '--resume' is no cv option
        raise e.then("rerun the same command") from None
    return "resumed" if resume else "trained"


def _check_not_a_run(out: Path) -> None:
    """Refuse an ``out`` that holds a training run: the cv's ``splits.json`` and report would replace the run's."""
    if not (out / "cv.json").is_file() and ((out / "checkpoints" / "last.pt").is_file() or (
            (out / "config.yaml").is_file() and (out / "splits.json").is_file())):
        raise FinescopeError(f"--out '{out}' holds a training run (config.yaml, splits.json, checkpoints), whose "
                             "splits.json and report a cv would replace; choose another --out")


def _trained_anything(out: Path) -> bool:
    """Whether a fold of the cv folder ``out`` has a checkpoint or has finished: a cv stopped before (by data it
    could not read, say, since fixed) has nothing to lose, and its rerun starts again from the data as it is."""
    return any(out.glob("runs/*/*/checkpoints/last.pt")) or any(out.glob("runs/*/*/metrics.json"))


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "predictions_test.csv").is_file()


def _check_finished_config(run_dir: Path, cfg: Config) -> None:
    """Refuse a finished fold trained with another config than ``cfg``, naming the first differing key. cv.json
    guards a cv folder's settings, but a cv.json removed and written again by a rerun with other settings would
    otherwise keep the folds finished before under the new settings' name. Where the data, the cache and the
    folder are and how fast it ran may differ (:data:`~finescope.trainer.RESUME_FREE`), but not how long it
    trained nor what it read."""
    from finescope.trainer import RESUME_FREE

    fix = f"delete '{run_dir}' to train it again, or choose another --out"
    try:
        old = to_dict(load_config(base=stored_config(read_yaml_mapping(run_dir / "config.yaml"))))
    except FinescopeError as e:
        raise FinescopeError(f"'{run_dir}' is a finished fold whose config cannot be read ({e}); {fix}") from None
    free = ("data.splits", *(k for k in RESUME_FREE if k not in ("train.epochs", "train.patience", "train.compile")))
    diff = first_difference(old, to_dict(cfg), ignore=free)
    if diff:
        raise FinescopeError(f"'{run_dir}' is a finished fold trained with other settings than this cv's: {diff}; "
                             f"rerun with the settings it was trained with (its config.yaml), or {fix}")


def _write_fold_files(out: Path, folds: list[Fold], sample_set: SampleSet, cfg: Config, p: Protocol) -> None:
    save_cv_splits(out / "splits.json", folds, sample_set,
                   extra={"seed": cfg.seed, **asdict(p), "val_fraction": cfg.data.val_fraction})
    for f in folds:
        save_splits(out / "folds" / f.name / "splits.json", f.splits, sample_set, extra={"fold": f.name})
    record = {"settings": _stored_settings(cfg, p), "variants": list(p.variants), "reference": p.ref,
              "n_boot": p.n_boot, "folds": [f.name for f in folds]}
    write_text(out / "cv.json", json_text(record, indent=2))


def run_cv(
    cfg: Config, p: Protocol, out: str | Path, splits_file: str = "", progress: bool = True, report: bool = True,
    given: Collection[str] = (),
) -> dict:
    """Train and test every variant on every fold, then write predictions.csv, summary.json and the report.

    Args:
        cfg: the experiment (``model.variant`` is replaced by each variant; ``data.splits`` is not read: a
            warning says so).
        p: the protocol.
        out: the cv directory; rerunning with the same settings resumes (finished folds are not retrained).
        splits_file: a cv ``splits.json`` to reuse instead of drawing folds; its folds replace ``p``'s fold
            settings (:func:`splits_protocol`), in what is trained and in cv.json and splits.json.
        progress: print per-epoch lines.
        report: also write report.md and report.html.
        given: the fold settings the user gave explicitly (``folds``, ``trials``, ``test_fraction``,
            ``per_magnification``: the CLI's flags); one that the folds of ``splits_file`` contradict is refused.

    Returns:
        The summary (also in ``out/summary.json``).
    """
    from finescope.oof import check_as_trained, collect_predictions, write_oof_csv

    out = Path(out)
    if cfg.data.splits:  # README: data.splits is a split to reuse; a cv's folds are its splits.json, --splits
        warnings.warn(f"cv draws its own folds and does not read data.splits '{cfg.data.splits}'; to reuse the folds "
                      "of an earlier cv, pass its splits.json with --splits", FinescopeWarning, stacklevel=2)
    cfg = replace(cfg, data=replace(cfg.data, splits=""))
    check_protocol(p)
    asked = p
    if splits_file:  # what is trained and recorded: the file's folds
        p = splits_protocol(splits_file, p)
        cfg = _splits_val_fraction(splits_file, cfg)
    check_outside_data(cfg.data, out)
    _check_not_a_run(out)
    trained = _trained_anything(out)  # else its cv.json and splits.json record what nothing was trained on
    sample_set = load_samples(cfg.data)
    if trained and (out / "splits.json").is_file():  # its folds' class order (labels 1, 10, 2 as text once ordered)
        sample_set = in_class_order(sample_set, stored_class_names(out / "splits.json") or [])
    if len(sample_set.class_names) < 2:  # as train refuses it, but before cv.json and splits.json record the data
        from finescope.trainer import one_class_error

        raise one_class_error(cfg, sample_set.class_names)
    drawn = as_drawn(p, sample_set)  # what cv.json and splits.json record
    if trained:  # the data read: whether per-magnification folds take all images together
        check_rerun(out, cfg, drawn, asked=p)
    folds = resolve_folds(out, sample_set, cfg, p, splits_file, reuse=trained)
    if splits_file:
        _check_given(given, as_drawn(asked, sample_set), p, splits_file)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)  # a killed run's half-written records
    fold_cfgs = {(variant, fold.name): fold_config(cfg, variant, fold, out / "folds" / fold.name / "splits.json")
                 for variant in p.variants for fold in folds}
    for (variant, name), fold_cfg in fold_cfgs.items():  # before cv.json is written again
        if _finished(out / "runs" / variant / name):
            _check_finished_config(out / "runs" / variant / name, fold_cfg)
            check_as_trained(out / "runs" / variant / name / "predictions_test.csv")
    _write_fold_files(out, folds, sample_set, cfg, drawn)
    for variant in p.variants:
        for fold in folds:
            state = run_fold(fold_cfgs[variant, fold.name], out / "runs" / variant / fold.name, progress)
            if progress:
                print(f"cv: {variant} {fold.name} {state}", flush=True)
    rows = collect_predictions(out, folds, p.variants, sample_set, cfg.data.root)
    write_oof_csv(out / "predictions.csv", rows, sample_set.class_names)
    summary = _summary(out, p.ref, p.n_boot, cfg.seed)
    if report:
        from finescope.report import write_report  # matplotlib is imported only here

        write_report(out)
    return summary


def _summary(out: Path, reference: str, n_boot: int, seed: int) -> dict:
    """``summary.json`` of ``out/predictions.csv``: read back when this finescope version computed it from these
    very predictions with these settings (a rerun of a finished cv: its bootstrap is the slow part), else computed
    and written."""
    from finescope import __version__
    from finescope.metrics import METRICS_VERSION, MIN_CI_GROUPS
    from finescope.oof import summarize_predictions

    # ci_min_groups, metrics_version: a summary from before intervals of few patients were withheld, or before a
    # metric's definition changed, is computed again
    made_from = {"predictions_sha256": hashlib.sha256((out / "predictions.csv").read_bytes()).hexdigest(),
                 "reference": reference, "n_boot": n_boot, "seed": seed, "finescope_version": __version__,
                 "ci_min_groups": MIN_CI_GROUPS, "metrics_version": METRICS_VERSION}
    path = out / "summary.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("made_from") == made_from:
        return old
    summary = {**summarize_predictions(out / "predictions.csv", reference, n_boot, seed), "made_from": made_from}
    write_text(path, json_text(summary, indent=2))
    return summary


__all__ = [
    "Fold",
    "Protocol",
    "load_cv_splits",
    "load_protocol",
    "make_folds",
    "make_protocol",
    "resolve_folds",
    "run_cv",
    "save_cv_splits",
]
