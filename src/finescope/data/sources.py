"""Sources: find the images of a dataset and turn them into :class:`~finescope.data.records.Sample` records.

Every source returns a :class:`~finescope.data.records.SampleSet` sorted by path, so the same folder always
gives the same order. Four sources exist, picked by ``data.source``:

- ``breakhis``: the BreaKHis release (Spanhol et al., IEEE TBME 2016); labels, patient, case number and
  magnification all come from the original file names, so the official tree and a flat folder both work.
- ``folder``: ``root/<class>/**/<image>``; the group is the first sub-folder below the class folder
  (``root/<class>/<patient>/...``), or a regex's capture group in the path below the class folder.
- ``csv``: a manifest with ``path,label[,group][,split]`` columns.
- ``synthetic``: the generated demo set, written as a manifest and read by the ``csv`` source.

Example:
    >>> sample_set = load_samples(DataConfig(source="breakhis", root="../shared/data/breakhis"))
    >>> sample_set.class_names, len(sample_set)
    (['benign', 'malignant'], 296)
"""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import stat
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from finescope.config import DataConfig
from finescope.data.records import Sample, SampleSet
from finescope.errors import SKIP_ADVICE, FinescopeError, FinescopeWarning
from finescope.files import EXPLAIN_FIGURES

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

BREAKHIS_SUBTYPES = {
    "A": ("benign", "adenosis"),
    "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes_tumor"),
    "TA": ("benign", "tubular_adenoma"),
    "DC": ("malignant", "ductal_carcinoma"),
    "LC": ("malignant", "lobular_carcinoma"),
    "MC": ("malignant", "mucinous_carcinoma"),
    "PC": ("malignant", "papillary_carcinoma"),
}
BREAKHIS_CLASSES = {
    "binary": ["benign", "malignant"],
    "subtype": [name for _, name in BREAKHIS_SUBTYPES.values()],
}
BREAKHIS_MAGNIFICATIONS = (40, 100, 200, 400)
# SOB_B_A-14-22549AB-100-001.png: biopsy, class, subtype - year - patient - magnification - image index
BREAKHIS_NAME = re.compile(
    r"^(?P<biopsy>[A-Z]+)_(?P<cls>[BM])_(?P<subtype>PT|TA|DC|LC|MC|PC|A|F)"
    r"-(?P<year>\d+)-(?P<patient>(?P<case>\d+)[A-Za-z]*)-(?P<mag>\d+)-(?P<index>\d+)$"
)
BREAKHIS_EXAMPLE = "SOB_<B|M>_<A|F|PT|TA|DC|LC|MC|PC>-<year>-<patient>-<magnification>-<index>.png"
SPLIT_NAMES = ("train", "val", "test")
SPLIT_SPELLINGS = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}  # a sheet's words
CSV_COLUMNS = ("path", "label", "group", "split", "patient", "magnification")  # read in any letter case


class _Found(NamedTuple):
    """One image as a source finds it, before labels become indices."""

    path: str
    label: str
    group: str
    meta: dict[str, Any]
    split: str | None = None


class _Scan(NamedTuple):
    """What a source reader returns to :func:`load_samples`."""

    found: list[_Found]
    class_names: list[str]  # the source's own class order (used when none is given)
    root: str
    skipped: list[tuple[str, str]]
    no_groups: str = ""  # when no image's group was given (each its own): what the data lacks and how to give one
    manifest: str = ""  # the CSV read (csv and synthetic sources), its relative paths read from ``root``
    group_column: str = ""  # the manifest's column of groups, '' where it has none


def load_samples(
    cfg: DataConfig, require_all_classes: bool = True, class_names: list[str] | None = None
) -> SampleSet:
    """Find the samples that ``cfg.source`` describes.

    Args:
        cfg: the data section of the config (``source``, ``root``, ``task``, ``magnifications``,
            ``group_pattern``, ``on_error``, ``synthetic_*``).
        require_all_classes: raise when a class has no image (set False to predict on a subset).
        class_names: a fixed label order, e.g. from a checkpoint; a label outside it is an error.

    Returns:
        A :class:`SampleSet` sorted by path; ``label`` indexes ``class_names``.

    Raises:
        FinescopeError: a missing root, no images, an unparseable name, an unknown label or an empty class.
    """
    readers: dict[str, Callable[[DataConfig], _Scan]] = {
        "breakhis": _scan_breakhis,
        "folder": _scan_folder,
        "csv": _scan_csv,
        "synthetic": _scan_synthetic,
    }
    if cfg.source not in readers:
        raise FinescopeError(
            f"config key 'data.source' is '{cfg.source}'; choose one of: {', '.join(readers)}"
        )
    if cfg.magnifications and cfg.source in ("folder", "synthetic"):  # runs made so read the same: not refused
        warnings.warn(f"data.magnifications {list(cfg.magnifications)} keeps no image out: data.source {cfg.source} "
                      "reads no magnification (data.source=breakhis reads it from BreakHis file names, a CSV manifest "
                      "from its magnification column), so every image is read; set data.magnifications=[] to say so",
                      FinescopeWarning, stacklevel=2)
    scan = readers[cfg.source](cfg)
    if scan.no_groups and len(scan.found) > 1:
        warnings.warn(f"{scan.no_groups}, so each of the {len(scan.found)} images is its own group: images of one "
                      "patient can sit on both sides of a split, and every patient-level metric is image-level",
                      FinescopeWarning, stacklevel=2)
    sample_set = _to_sample_set(scan, cfg, class_names, require_all_classes)
    if doubt := grouping_doubt(sample_set, cfg):
        warnings.warn(doubt, FinescopeWarning, stacklevel=2)
    return merge_duplicate_groups(sample_set) if cfg.merge_duplicates else sample_set


def merge_duplicate_groups(sample_set: SampleSet) -> SampleSet:
    """Put byte-identical files in one group, so a copy can never sit on the other side of a split.

    Groups linked by a shared file content are merged (union-find); the merged group is named by its members
    joined with '+' (e.g. DeFungi's ``113a+114a``). The original group stays in ``meta['source_group']``.
    """
    import hashlib

    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.setdefault(g, g) != g:
            g = parent[g]
        return g

    first_of: dict[str, str] = {}
    for sample in sample_set.samples:
        digest = hashlib.sha1(Path(sample.path).read_bytes()).hexdigest()
        other = first_of.setdefault(digest, sample.group)
        a, b = find(other), find(sample.group)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, set[str]] = {}
    for sample in sample_set.samples:
        members.setdefault(find(sample.group), set()).add(sample.group)
    name = {root: "+".join(sorted(groups)) for root, groups in members.items()}
    samples = [
        replace(s, group=name[find(s.group)], meta={**s.meta, "source_group": s.group}) for s in sample_set.samples
    ]
    return replace(sample_set, samples=samples)


def _to_sample_set(
    scan: _Scan, cfg: DataConfig, class_names: list[str] | None, require_all_classes: bool
) -> SampleSet:
    """Turn label names into indices, sort by path and check that every class has images."""
    names = list(class_names) if class_names is not None else list(scan.class_names)
    if class_names is None:
        _check_case(scan)
    found = sorted(scan.found, key=lambda f: f.path)
    labels = [class_index(f.label, names) for f in found]
    for f, label in zip(found, labels, strict=True):
        if label < 0:
            raise FinescopeError(
                f"image '{f.path}' has label '{f.label}', which is not a known class ({', '.join(names)}); "
                "use data that matches the checkpoint's classes"
            )
    if require_all_classes:
        present = {names[label] for label in labels}
        for name in names:
            if name not in present:
                fix = ("data.task sets the BreakHis classes: add images of it, or list the images and their "
                       "classes in a CSV manifest (data.source=csv)" if cfg.source == "breakhis" else
                       "add images of it or remove the class")
                raise FinescopeError(
                    f"class '{name}' has no images under data.root '{scan.root}' (data.source={cfg.source}); {fix}"
                )
    samples = [Sample(f.path, label, f.group, f.meta) for f, label in zip(found, labels, strict=True)]
    has_split = any(f.split is not None for f in found)
    preset = [f.split or "" for f in found] if has_split else None
    return SampleSet(samples, names, root=scan.root, skipped=list(scan.skipped), preset_splits=preset,
                     manifest=scan.manifest, group_column=scan.group_column)


def class_index(name: str, class_names: Sequence[str]) -> int:
    """The position of class ``name`` in ``class_names``, -1 when it is none of them; a name in the other Unicode
    normal form is the same class (a folder copied from a Mac names 'bénin' with 'e' and a combining accent,
    Linux and Windows with one character)."""
    names = list(class_names)
    if name in names:
        return names.index(name)
    nfc = [unicodedata.normalize("NFC", n) for n in names]
    key = unicodedata.normalize("NFC", name)
    return nfc.index(key) if key in nfc else -1


def group_id(name: str) -> str:
    """A group id (patient, case) as sources make it: in one Unicode normal form (NFC), so that a patient folder
    copied from a Mac ('Müller' as 'u' + a combining diaeresis) beside the same patient's folder written on Linux
    or Windows (one character) is one group, never on two sides of a split. Paths keep their own spelling."""
    return unicodedata.normalize("NFC", name)


def class_order(names: Iterable[str]) -> list[str]:
    """Class names in a source's order: by value when every one reads as a whole number (``1, 2, 10``, not
    the text order ``1, 10, 2``), else sorted as text."""
    names = sorted(set(names))
    if names and all(re.fullmatch(r"[+-]?\d+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))  # '01' and '1' (warned about) keep a fixed order
    return names


def in_class_order(sample_set: SampleSet, class_names: Sequence[str]) -> SampleSet:
    """``sample_set`` with its labels indexing ``class_names``, a run's stored order of the same classes (a run
    trained when finescope ordered them otherwise keeps its indices); unchanged when the classes differ, for the
    caller's check to name."""
    names = list(class_names)
    if names == sample_set.class_names or sorted(names) != sorted(sample_set.class_names):
        return sample_set
    index = {name: i for i, name in enumerate(names)}
    samples = [replace(s, label=index[sample_set.class_names[s.label]]) for s in sample_set.samples]
    return replace(sample_set, samples=samples, class_names=names)


def _check_case(scan: _Scan) -> None:
    """Refuse class names that differ only in letter case ('Benign', 'benign'): a typo, not two classes."""
    seen: dict[str, str] = {}
    for name in scan.class_names:
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            example = {f.label: f.path for f in reversed(scan.found)}
            raise FinescopeError(
                f"classes '{other}' and '{name}' differ only in letter case (e.g. '{example.get(other, '?')}' and "
                f"'{example.get(name, '?')}' under '{scan.root}'); write each class the same way"
            )


# ----------------------------------------------------------------------------------------------- discovery


def _manifest_hint(root: str | Path) -> str:
    """For a file given as data.root to a source that reads folders: how to read it where it is a CSV manifest."""
    csv_file = Path(root).suffix.lower() in (".csv", ".tsv")
    return "; to read the images this CSV manifest lists, set data.source=csv" if csv_file else ""


def _check_root(root: str, what: str) -> Path:
    """The root as an absolute path; raise when it does not exist."""
    path = Path(os.path.abspath(os.path.expanduser(root))) if root else None
    if path is None or not path.exists():  # a run's relative root is read from here, not from where it trained
        where = f" (a relative path: read from {os.getcwd()})" if root and not os.path.isabs(root) and \
            not root.startswith("~") else ""
        raise FinescopeError(f"data.root '{root}' does not exist{where}; set data.root to {what} (--set "
                             "data.root=PATH)")
    return path


def check_outside_data(cfg: DataConfig, out: str | Path, flag: str = "--out") -> None:
    """Refuse an output folder inside a ``folder`` or ``breakhis`` source's ``data.root``: those sources read
    every folder and image below the root, so the run's own files would become data (its top folder a class)."""
    if cfg.source not in ("folder", "breakhis") or not cfg.root:
        return
    root = Path(os.path.abspath(os.path.expanduser(cfg.root)))
    out = Path(os.path.abspath(out))
    if out == root or root in out.parents:
        raise FinescopeError(f"{flag} '{out}' lies inside data.root '{root}' ({cfg.source} source), which reads every "
                             "folder and image below it: the outputs would become data; write them outside the "
                             "data folder")


def is_image_file(path: Path) -> bool:
    """True for a visible file with one of :data:`SUPPORTED_EXTENSIONS` (any case)."""
    return path.suffix.lower() in SUPPORTED_EXTENSIONS and not path.name.startswith(".")


def find_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, following links once; hidden folders skipped), sorted."""
    out, visited = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop or a second link to a folder already read
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath) / name for name in filenames if is_image_file(Path(name))
                and not _special(os.path.join(dirpath, name))]
    return sorted(out, key=str)


def _special(path: str) -> bool:
    """Whether ``path`` is there but no regular file (a named pipe, a socket, a device), which opening would block
    on or read without end; a broken link is kept, to be named unreadable where it is read."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


# the figures finescope writes, by name and by the file beside them that marks them finescope's: a report's
# (REPORT_files/figure_N.png beside REPORT.md or .html), explain's gallery (OUT/images/NNNNN_<name>.png,
# OUT/evidence/<class>/NN.png and OUT/faithfulness.png beside OUT/faithfulness.json: EXPLAIN_FIGURES) and the
# demo's overlay (attention_overlay.png beside demo_results.json)
_REPORT_FIGURE = re.compile(r"figure_\d+\.png")


def _finescope_figure(f: Path) -> bool:
    """Whether the image file ``f`` is a figure finescope wrote (a report's, explain's, the demo's), not data."""
    d = f.parent
    if _REPORT_FIGURE.fullmatch(f.name) and d.name.endswith("_files"):
        stem = d.name.removesuffix("_files")
        return (d.parent / f"{stem}.md").is_file() or (d.parent / f"{stem}.html").is_file()
    for sub, pattern, name in EXPLAIN_FIGURES:  # OUT/sub/..., as deep below sub as its pattern
        depth = pattern.count("/") + 1
        if name.fullmatch(f.name) and len(f.parents) > depth and f.parents[depth - 1].name == sub:
            return (f.parents[depth] / "faithfulness.json").is_file()
    marks = {"faithfulness.png": "faithfulness.json", "attention_overlay.png": "demo_results.json"}
    return f.name in marks and (d / marks[f.name]).is_file()


def _without_figures(folder: Path) -> tuple[list[Path], int]:
    """:func:`find_images` of ``folder`` less the figures finescope wrote there (a run folder's report and explain
    galleries), and how many those were, said in a warning: read as images, they would be taken for data."""
    found = find_images(folder)
    figures = [f for f in found if _finescope_figure(f)]
    if figures:
        warnings.warn(f"left out {len(figures)} figures finescope wrote under '{folder}' (reports' "
                      "*_files/figure_N.png, explain's images/, evidence/ and faithfulness.png, the demo's "
                      f"attention_overlay.png), e.g. '{figures[0]}': they are no data; give a file by name to read it",
                      FinescopeWarning, stacklevel=3)
    return [f for f in found if f not in set(figures)], len(figures)


def images_in(paths: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """Every image under ``paths`` (image files, and folders read recursively) as (file, the argument it came
    from), in the order given; an image reached twice (a file inside a folder also given, a link to it) is kept
    once, where it came first. In folders, the figures finescope wrote there (:func:`_without_figures`) are left
    out, with a warning; an image file given by name is always read.

    Raises:
        FinescopeError: a path that does not exist or a file that is not an image, or no image at all.
    """
    files: list[tuple[Path, Path]] = []
    left_out = 0
    for p in map(Path, paths):
        if p.is_dir():
            found, figures = _without_figures(p)
            left_out += figures
            files += [(f, p) for f in found]
        elif p.is_file():
            if p.suffix.lower() in (".csv", ".tsv"):  # a spreadsheet of labelled images: evaluate scores them
                raise FinescopeError(f"'{p}' is not an image file but a table: predict reads images and folders; "
                                     f"evaluate RUN --set data.source=csv {shlex.quote(f'data.root={p}')} scores the images a CSV "
                                     "manifest lists")
            if not is_image_file(p):
                raise FinescopeError(f"'{p}' is not an image file; supported: {', '.join(SUPPORTED_EXTENSIONS)}")
            files.append((p, p.parent))
        elif not os.path.lexists(p):  # a typo, most often
            raise FinescopeError(f"'{p}' does not exist; check the path")
        else:
            raise FinescopeError(f"'{p}' is neither an image file nor a folder")
    if not files:
        figures = f" (left out {left_out} figures finescope wrote there; give one by name to read it)" \
            if left_out else ""
        raise FinescopeError(f"found no images in {', '.join(map(str, paths))}{figures}; supported: "
                             f"{', '.join(SUPPORTED_EXTENSIONS)}")
    kept, seen = [], set()
    for f, base in files:
        if os.path.realpath(f) not in seen:
            seen.add(os.path.realpath(f))
            kept.append((f, base))
    return kept


def _no_images(folder: Path | str, skipped: list[tuple[str, str]] = ()) -> FinescopeError:
    """No image found under ``folder``; or, when every one was ``skipped``, that and the first reason."""
    if skipped:
        return FinescopeError(f"all {len(skipped)} images under '{folder}' were skipped, the first: {skipped[0][1]}")
    return FinescopeError(
        f"found 0 images under '{folder}'; supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}"
    )


def _skip_or_raise(cfg: DataConfig, path: str, reason: str, skipped: list[tuple[str, str]],
                   advice: str = SKIP_ADVICE) -> None:
    """With ``data.on_error=skip`` record and warn; otherwise raise, the ``advice`` after the reason."""
    if cfg.on_error != "skip":
        raise FinescopeError(f"{reason}{advice}")
    warnings.warn(f"skipped '{path}': {reason}", FinescopeWarning, stacklevel=3)
    skipped.append((path, reason))


# ------------------------------------------------------------------------------------------------ breakhis


def parse_breakhis_name(name: str) -> dict[str, Any] | None:
    """Read class, subtype, patient, case number and magnification from an original BreakHis file name.

    Args:
        name: a file name such as ``SOB_B_A-14-22549AB-100-001.png`` (a path is fine too).

    Returns:
        ``{"tumor_class": "benign", "subtype": "adenosis", "year": 14, "patient": "22549AB", "case": "22549",
        "magnification": 100, "index": 1}``, or None when the name does not follow the pattern.
    """
    m = BREAKHIS_NAME.match(Path(name).stem)
    if m is None:
        return None
    tumor_class, subtype = BREAKHIS_SUBTYPES[m["subtype"]]
    if (m["cls"] == "B") != (tumor_class == "benign"):
        return None  # e.g. SOB_M_A: a benign subtype filed as malignant
    return {
        "tumor_class": tumor_class,
        "subtype": subtype,
        "year": int(m["year"]),
        "patient": m["patient"],
        "case": m["case"],
        "magnification": int(m["mag"]),
        "index": int(m["index"]),
    }


def label_and_group_of(path: str | Path, cfg: DataConfig, class_names: Sequence[str]) -> tuple[int, str]:
    """What an image outside the data set says about itself (``predict``, ``explain`` on files): its class index
    in ``class_names`` (-1 when unknown) and its group ('' when unknown).

    With ``data.source: breakhis`` an original BreakHis name gives both: the class by ``data.task``, the group the
    case number, as in training. Otherwise the class is the nearest parent folder named like a class
    (``defungi/H1/x.jpg`` -> H1; below a ``folder`` source's ``data.root`` the one right under it, elsewhere not one
    lying in another so named, see :func:`_class_folder`; for a link without one, that of the file it links to)
    and the group as in training
    (:func:`group_below_class`, on the path below that folder, or on the file name when no parent is named like a
    class); '' for an image that would be its own.
    """
    path = Path(path)
    info = parse_breakhis_name(path.name) if cfg.source == "breakhis" else None
    if info is not None:
        name = info["tumor_class"] if cfg.task == "binary" else info["subtype"]
        return (list(class_names).index(name) if name in class_names else -1), group_id(info["case"])
    real = Path(os.path.realpath(path))  # a link given outside the class folders: where its image lies
    path, folder = next(((c, f) for c in (path, real) if (f := _class_folder(c, cfg, class_names))), (path, None))
    label = -1 if folder is None else class_index(folder.name, class_names)
    pattern = _compile_group_pattern(cfg.group_pattern)  # --set data.group_pattern=...: checked as in training
    return label, group_below_class(path.relative_to(folder) if folder else Path(path.name), pattern) or ""


def _class_folder(path: Path, cfg: DataConfig, class_names: Sequence[str]) -> Path | None:
    """The folder that gives an image's class: below ``data.root`` of a ``folder`` source the one right under it,
    as in training; elsewhere the nearest parent named like a class that does not itself lie in one (patient
    folder ``1`` in class folder ``0`` is no class folder), else the nearest so named; None when none is."""
    if cfg.source == "folder" and cfg.root:
        root = Path(os.path.abspath(os.path.expanduser(cfg.root)))
        if root in path.parents and len(path.relative_to(root).parts) > 1:
            top = path.relative_to(root).parts[0]
            if class_index(top, class_names) >= 0:
                return root / top
    named = [p for p in path.parents if class_index(p.name, class_names) >= 0]
    outer = [p for p in named if class_index(p.parent.name, class_names) < 0]  # not inside another so named
    return (outer or named or [None])[0]


def file_sample(path: str | Path, cfg: DataConfig, class_names: Sequence[str]) -> Sample:
    """An image outside the data set as a :class:`Sample`: its class and group by :func:`label_and_group_of`, and
    for an original BreakHis name its patient (the patient folder, 22549AB, beside its case number 22549) and
    magnification."""
    label, group = label_and_group_of(path, cfg, class_names)
    info = parse_breakhis_name(Path(path).name) if cfg.source == "breakhis" else None
    return Sample(str(path), label, group, {k: info[k] for k in ("patient", "magnification")} if info else {})


def _check_magnifications(mags: tuple[int, ...]) -> None:
    bad = [m for m in mags if m not in BREAKHIS_MAGNIFICATIONS]
    if bad:
        raise FinescopeError(
            f"config key 'data.magnifications' has {bad[0]}; choose from "
            f"{', '.join(map(str, BREAKHIS_MAGNIFICATIONS))} (empty = all)"
        )


def _scan_breakhis(cfg: DataConfig) -> _Scan:
    """BreakHis: the official tree or a flat folder; everything is parsed from the file names."""
    if cfg.task not in BREAKHIS_CLASSES:
        raise FinescopeError(f"config key 'data.task' is '{cfg.task}'; choose one of: binary, subtype")
    _check_magnifications(cfg.magnifications)
    root = _check_root(
        cfg.root, "the BreakHis folder (the one holding BreaKHis_v1, or a folder of its images)"
    )
    if root.is_file():
        raise FinescopeError(f"data.root '{cfg.root}' is a file; data.source=breakhis needs the BreakHis folder (the "
                             f"one holding BreaKHis_v1, or a folder of its images){_manifest_hint(root)}")
    files = find_images(root)
    if not files:
        raise _no_images(root)
    infos = [parse_breakhis_name(path.name) for path in files]
    if not any(infos):  # other data: skipping each file would not help
        raise FinescopeError(f"none of the {len(files)} images under '{root}' has a BreakHis file name (e.g. "
                             f"'{files[0].name}', expected {BREAKHIS_EXAMPLE}); for other data set data.source to "
                             "folder or csv")
    found, skipped = [], []
    for path, info in zip(files, infos, strict=True):
        if info is None:
            reason = f"file name '{path}' does not follow the BreakHis pattern {BREAKHIS_EXAMPLE}"
            _skip_or_raise(cfg, str(path), reason, skipped)
            continue
        if cfg.magnifications and info["magnification"] not in cfg.magnifications:
            continue
        label = info["tumor_class"] if cfg.task == "binary" else info["subtype"]
        meta = {k: info[k] for k in ("patient", "magnification", "subtype", "tumor_class")}
        found.append(_Found(str(path), label, group_id(info["case"]), meta))
    if not found and skipped:
        raise _no_images(root, skipped)
    if not found:
        mags = ", ".join(f"{m}X" for m in cfg.magnifications)
        raise FinescopeError(f"found 0 BreakHis images at {mags} under '{root}'; check data.magnifications")
    return _Scan(found, BREAKHIS_CLASSES[cfg.task], str(root), skipped)


# -------------------------------------------------------------------------------------------------- folder


def _compile_group_pattern(pattern: str) -> re.Pattern | None:
    """The compiled ``data.group_pattern`` (None when empty); it must have a capture group."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise FinescopeError(
            f"config key 'data.group_pattern' is not a valid regex ({e}): {pattern!r}"
        ) from None
    if compiled.groups < 1:
        raise FinescopeError(
            f"config key 'data.group_pattern' {pattern!r} has no capture group; "
            r"put the group id in parentheses, e.g. '^H\d+_([^_]+)_'"
        )
    return compiled


def _scan_folder(cfg: DataConfig) -> _Scan:
    """``root/<class>/**/<image>``: classes are the sorted sub-folder names, groups as :func:`group_below_class`."""
    root = _check_root(cfg.root, "a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise FinescopeError(
            f"data.root '{root}' is a file; data.source=folder needs root/<class>/<image> folders{_manifest_hint(root)}"
        )
    pattern = _compile_group_pattern(cfg.group_pattern)
    classes = class_order(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FinescopeError(
            f"data.root '{root}' has no class sub-folders; data.source=folder expects root/<class>/<image>"
        )
    sides = {c: SPLIT_SPELLINGS.get(c.lower(), c.lower()) for c in classes}
    if len(classes) > 1 and all(side in SPLIT_NAMES for side in sides.values()):
        train = next((c for c in classes if sides[c] == "train"), classes[0])
        raise FinescopeError(  # root/train/<class>/..., root/test/<class>/...: a model of 'train' against 'test'
            f"data.root '{root}' holds the folders {', '.join(classes)}, the sides of a split, not classes; point "
            f"data.root at the folder whose sub-folders are the classes, e.g. {root / train} (and evaluate the "
            "run on another side with finescope evaluate RUN --set data.root=...), or list the images with their "
            "side in a CSV manifest's split column (data.source=csv)")
    found, skipped, any_given, direct = [], [], False, 0
    for name in classes:
        for path in find_images(root / name):
            rel = path.relative_to(root / name)
            group = group_below_class(rel, pattern)
            if group is None:
                reason = (f"'{rel.as_posix()}' (below class folder '{root / name}') does not match "
                          f"data.group_pattern '{pattern.pattern}'")
                _skip_or_raise(cfg, str(path), reason, skipped, advice="; fix data.group_pattern, or set "
                               "data.on_error=skip to leave such files out")
            else:
                any_given, direct = any_given or group != "", direct + (group == "")
                group = group or group_id(path.relative_to(root).as_posix())  # else its own group
                found.append(_Found(str(path), name, group, {}))
    if not found:
        raise _no_images(root, skipped)
    if any_given and direct:
        warnings.warn(f"{direct} of the {len(found)} images under '{root}' lie directly in their class folder, each "
                      "its own group, beside images in patient sub-folders: put them in their patient's folder",
                      FinescopeWarning, stacklevel=3)
    no_groups = "" if any_given else (f"the class folders under '{root}' hold their images directly (no "
                                      "root/<class>/<patient>/ sub-folders) and data.group_pattern is empty")
    return _Scan(found, classes, str(root), skipped, no_groups)


def group_below_class(rel: Path, pattern: re.Pattern | None) -> str | None:
    """The group of an image at ``rel``, its path below its class folder: the first capture group of
    ``pattern`` searched in the file name or, where it does not match there, in that whole path ('/'-separated,
    e.g. ``P01/img_000.png``), None when neither matches with a non-empty capture; without a pattern the first sub-folder (``P01``), or ''
    for an image directly in its class folder (the caller then makes it a group of its own). In NFC (:func:`group_id`)."""
    if pattern is None:
        return group_id(rel.parts[0]) if len(rel.parts) > 1 else ""
    for text in (rel.name, rel.as_posix()):
        m = pattern.search(text)
        if m is not None and m.group(1):  # an empty capture names no group
            return group_id(m.group(1))
    return None


MAGNIFICATION_NAME = re.compile(r"\d+(?:\.\d+)?\s*[xX]")  # '40X', '100x', '2.5x': a magnification, not a patient
FEW_GROUPS, BIG_GROUP = 2, 20  # a class in at most 2 groups of 20 or more images each on average: groups to doubt


def grouping_doubt(sample_set: SampleSet, cfg: DataConfig, thin: bool = False) -> str:
    """Why the groups of a ``folder`` source, or of a CSV manifest's group or patient column, look like no
    patients, as one sentence that says how the images are grouped and how to group them by patient; '' when they
    look right, or for another source (or a manifest of neither column: each image its own group, warned apart).

    Signs: group names that read as magnifications (``root/<class>/40X/<patient>/...``, or a patient column of
    '40X': one patient's images at two magnifications are two groups, which a split puts on two sides); original
    BreakHis file names of one case number in two groups or of several cases in one (``breast/<class>/SOB/...``:
    the folder 'SOB' is each class's only group); a class whose images all lie in one group that holds images of
    every other class too, and :data:`BIG_GROUP` images or more per class (a folder such as 'images' below each
    class folder); group names that differ only in letter case (a spreadsheet's 'P01' and 'p01': one patient
    typed two ways?). With ``thin`` (a split found too few groups) also a class whose images lie in
    :data:`FEW_GROUPS` groups or fewer of :data:`BIG_GROUP` images or more each (the sentence then says where
    those are no patients).
    """
    by, fix = _grouping_of(sample_set, cfg)
    if not by or not sample_set.samples:
        return ""
    images: dict[str, int] = {}
    classes: dict[str, set[int]] = {}
    for s in sample_set.samples:
        images[s.group] = images.get(s.group, 0) + 1
        classes.setdefault(s.group, set()).add(s.label)
    names = [f"'{g}'" for g in sorted(images) if MAGNIFICATION_NAME.fullmatch(g)]
    breakhis = _breakhis_doubt(sample_set)
    by_class = {c: sorted(g for g, cs in classes.items() if c in cs) for c in range(len(sample_set.class_names))}
    k = len(sample_set.class_names)
    shared = [(c, gs[0]) for c, gs in by_class.items()  # one group, of every class, 20+ images per class
              if len(gs) == 1 and k > 1 and len(classes[gs[0]]) == k and images[gs[0]] >= BIG_GROUP * k]
    cased: dict[str, list[str]] = {}  # 'P01' and 'p01' of a spreadsheet: one patient typed twice?
    for g in sorted(images):
        cased.setdefault(g.casefold(), []).append(g)
    twins = next((gs for gs in cased.values() if len(gs) > 1), None)
    if names:
        why = (f"the group{'s' if len(names) > 1 else ''} {', '.join(names[:4])} read{'' if len(names) > 1 else 's'} "
               "as magnifications, not patients: one patient's images at two magnifications are two groups, which a "
               "split puts on two sides")
    elif breakhis:
        why = breakhis
    elif shared:
        c, g = shared[0]
        why = (f"the group '{g}' holds every image of class {sample_set.class_names[c]} and images of every other "
               f"class too ({images[g]} images): a {'folder' if cfg.source == 'folder' else 'group'} such as this is "
               "rarely one patient, and a split finds too few groups")
    elif twins:
        others = sum(len(gs) > 1 for gs in cased.values()) - 1
        why = (f"the groups {' and '.join(repr(g) for g in twins[:3])} differ only in letter case"
               + (f" (and {others} more such set{'s' if others > 1 else ''})" if others else "")
               + ": finescope keeps them apart, as two patients, so a split may put them on two sides")
        fix = (f"write each patient's id alike in every row of the '{sample_set.group_column}' column of "
               f"'{sample_set.manifest}'" if cfg.source == "csv" else "name each patient's folders alike (or the "
               "captures of data.group_pattern)") + "; where they are two patients, nothing is wrong"
    elif thin and (few := [(c, gs) for c, gs in by_class.items() if 0 < len(gs) <= FEW_GROUPS
                           and sum(images[g] for g in gs) >= BIG_GROUP * len(gs)]):
        c, gs = few[0]
        n = sum(1 for s in sample_set.samples if s.label == c)
        return (f"{by}, which gives class {sample_set.class_names[c]} {len(gs)} group{'s' if len(gs) > 1 else ''} "
                f"({', '.join(repr(g) for g in gs)}) for its {n} images; where those are no patients, {fix}")
    else:
        return ""
    named = breakhis or _breakhis_names(sample_set)
    where = "the same data.root" if cfg.source == "folder" else "data.root their folder"
    advice = (f"read them with data.source=breakhis ({where}: it reads class, patient and magnification from the "
              "file names and groups by the patient's case number), or " if named else "")
    if cfg.source == "csv" and named:  # a patient column of 22549AB and 22549CD: one case, so one group
        fix = (f"write each image's case number in {'the' if sample_set.group_column == 'group' else 'a'} 'group' "
               f"column of '{sample_set.manifest}' (22549 for the patients 22549AB and 22549CD, one case; a 'patient' "
               "column keeps the patient for patient-level metrics)")
    if cfg.source == "csv" and names:
        fix += "; a 'magnification' column holds the magnifications"
    return f"{by}, and {why}; group them by patient: {advice}{fix}"


def _grouping_of(sample_set: SampleSet, cfg: DataConfig) -> tuple[str, str]:
    """How a ``folder`` source or a CSV manifest's column groups the images, and how to group them by patient
    instead; ('', '') for another source or a manifest of no group or patient column."""
    if cfg.source == "folder":
        how = (f"data.group_pattern {cfg.group_pattern!r}" if cfg.group_pattern else
               "the first sub-folder below each class folder")
        return f"data.source=folder groups the images by {how}", GROUPING_FIX
    if cfg.source == "csv" and sample_set.group_column:
        column, manifest = sample_set.group_column, sample_set.manifest
        return (f"CSV manifest '{manifest}' groups the images by its '{column}' column",
                f"write each image's patient (or specimen) in the '{column}' column of '{manifest}'")
    return "", ""


GROUPING_FIX = ("set data.group_pattern to a regex whose first capture group is the patient id (searched in the file "
                "name, then in the path below the class folder, e.g. '^[^/]+/([^/]+)/' for <class>/40X/<patient>/...), "
                "or list the images with a group or patient column in a CSV manifest (data.source=csv)")


def _breakhis_names(sample_set: SampleSet) -> bool:
    """Whether most images have original BreakHis file names."""
    n = sum(parse_breakhis_name(Path(s.path).name) is not None for s in sample_set.samples)
    return 2 * n > len(sample_set.samples)


def _breakhis_doubt(sample_set: SampleSet) -> str:
    """Where the groups of images with original BreakHis names cut across their case numbers, what they do; ''
    when each group is one case (or the names are no BreakHis names)."""
    cases: dict[str, set[str]] = {}  # group -> cases
    groups: dict[str, set[str]] = {}  # case -> groups
    patients: dict[str, set[str]] = {}  # group -> patients
    for s in sample_set.samples:
        if (info := parse_breakhis_name(Path(s.path).name)) is not None:
            cases.setdefault(s.group, set()).add(info["case"])
            groups.setdefault(info["case"], set()).add(s.group)
            patients.setdefault(s.group, set()).add(info["patient"])
    many = max(cases.items(), key=lambda item: (len(item[1]), item[0]), default=("", set()))
    if len(many[1]) > 1:
        return (f"the group '{many[0]}' holds the images of {len(patients[many[0]])} BreakHis patients "
                f"({len(many[1])} case numbers, read from the file names), which a split cannot part")
    split = next(((case, sorted(gs)) for case, gs in sorted(groups.items()) if len(gs) > 1), None)
    if split:
        return (f"the BreakHis case number {split[0]} (in the file names) lies in the groups "
                f"{', '.join(repr(g) for g in split[1][:3])}, which a split may put on two sides")
    return ""


# ----------------------------------------------------------------------------------------------------- csv


def _manifest_path(root: str) -> Path:
    """The CSV file itself, or ``manifest.csv`` inside a folder."""
    path = _check_root(root, "a CSV manifest (path,label[,group][,split]) or a folder holding manifest.csv")
    if path.is_dir():
        path = path / "manifest.csv"
        if not path.is_file():
            raise FinescopeError(
                f"data.root '{root}' is a folder without manifest.csv; point data.root at the CSV file"
            )
    return path


def _separator(text: str) -> tuple[str, int]:
    """The cell separator of a manifest and how many lines come before its header: the one a first line
    ``sep=X`` names (Excel writes and reads it), else ',' unless the header has a ``path`` cell only when split
    by ';' (Excel where ',' is the decimal mark) or by a tab (Excel's "Text")."""
    first = text.split("\n", 1)[0].rstrip("\r")
    if len(first) == 5 and first.lower().startswith("sep="):
        return first[4], 1
    for sep in (",", ";", "\t"):
        if "path" in (cell.strip().strip('"').strip().lower() for cell in first.split(sep)):
            return sep, 0
    return ",", 0


def _column_names(manifest: Path, names: Sequence[str]) -> list[str]:
    """A header's column names, stripped, finescope's own (:data:`CSV_COLUMNS`) in lower case whatever case a
    spreadsheet gave them; raise when two cells name one column."""
    header = [h.strip().lower() if h.strip().lower() in CSV_COLUMNS else h.strip() for h in names]
    for i, name in enumerate(header):
        if name and name in header[:i]:
            raise FinescopeError(f"CSV manifest '{manifest}' has the columns '{names[header.index(name)].strip()}' and "
                                 f"'{names[i].strip()}'; keep one")
    return header


def _read_rows(manifest: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (file line, row) of every row of a manifest (blank lines skipped, multi-line cells counted);
    raise when it cannot be read or lacks ``path``/``label``."""
    reader, before = None, 0
    try:
        with manifest.open("rb") as fh:  # Excel's "Unicode Text" is UTF-16 with a BOM; else UTF-8, BOM or not
            utf16 = fh.read(2) in (b"\xff\xfe", b"\xfe\xff")
        with manifest.open(newline="", encoding="utf-16" if utf16 else "utf-8-sig") as fh:
            text = fh.read()
        sep, before = _separator(text)
        body = text.split("\n", 1)[1] if before and "\n" in text else "" if before else text
        reader = csv.DictReader(io.StringIO(body, newline=""), delimiter=sep, strict=True)  # strict: an unclosed
        header = _column_names(manifest, reader.fieldnames or [])  # quote is an error, not one long cell
        reader.fieldnames = header
        rows = [  # reader.line_num: the line where the row just read ends, counted from the header
            (reader.line_num + before, {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)})
            for row in reader
        ]
        rows = [(line, row) for line, row in rows if any(row.values())]  # Excel's ',,' below the table: blank
    except csv.Error as e:
        hint = " (a quote opened and never closed?)" if "end of data" in str(e) else ""
        start = (reader.line_num if reader else 0) + before + 1  # the row that failed starts after the last read
        raise FinescopeError(f"cannot read CSV manifest '{manifest}', the row from line {start}: {e}{hint}") from None
    except UnicodeDecodeError as e:  # e.g. Excel's "CSV (Comma delimited)": the Windows code page
        raise FinescopeError(f"cannot read CSV manifest '{manifest}': it is not UTF-8 ({e}); save it as UTF-8 "
                             "(Excel: 'CSV UTF-8')") from None
    except OSError as e:
        raise FinescopeError(f"cannot read CSV manifest '{manifest}': {e}") from None
    for column in ("path", "label"):
        if column not in header:
            raise FinescopeError(
                f"CSV manifest '{manifest}' has no '{column}' column (columns: {', '.join(header) or 'none'}); "
                "the header must be path,label[,group][,split]"
            )
    if not rows:
        raise FinescopeError(f"CSV manifest '{manifest}' has a header but no rows")
    return header, rows


def _group_column(header: list[str]) -> str:
    """The manifest's column of groups: ``group``, else ``patient``, else none ('')."""
    return next((c for c in ("group", "patient") if c in header), "")


def _listed_path(folder: Path, text: str) -> str:
    """The absolute path a manifest's cell names from ``folder``; where it names nothing, the first spelling that
    does of: '/' for a Windows '\\' (a manifest made there), the other Unicode normal form (a Mac keeps 'ü' as
    'u' and a combining mark in names, Excel as one character)."""
    path = os.path.abspath(folder / text)
    if os.path.lexists(path):
        return path
    texts = [text] + ([text.replace("\\", "/")] if os.sep == "/" and "\\" in text else [])
    for spelling in texts[1:] + [unicodedata.normalize(form, t) for t in texts for form in ("NFC", "NFD")]:
        if os.path.lexists(other := os.path.abspath(folder / spelling)):
            return other
    return path


def _csv_row(row: dict[str, str], line: int, manifest: Path, header: list[str]) -> _Found:
    """One manifest row as a :class:`_Found` (the image's existence is checked by the caller)."""
    where = f"CSV manifest '{manifest}' line {line}"
    if not row.get("path") or not row.get("label"):
        raise FinescopeError(f"{where} has an empty path or label; every row needs both")
    path = _listed_path(manifest.parent, row["path"])
    split = None
    if "split" in header:
        split = row["split"].lower()
        split = SPLIT_SPELLINGS.get(split, split)
        if split not in SPLIT_NAMES:
            raise FinescopeError(f"{where} has split '{row['split']}'; use one of: {', '.join(SPLIT_NAMES)}")
    column = _group_column(header)
    if column and not row[column]:
        raise FinescopeError(f"{where} has an empty {column}; give every row its patient or specimen (without a "
                             "group or patient column each image is its own group)")
    group = group_id(row[column] if column else Path(row["path"]).as_posix())
    meta = {k: v for k, v in row.items() if k not in ("path", "label", "group", "split") and k}
    if meta.get("patient"):  # scored by the patient metrics: in NFC as the group ids are
        meta["patient"] = group_id(meta["patient"])
    if "magnification" in meta:  # '40X' or '40' -> 40, as BreakHis names give it; an empty cell says none
        mag = re.fullmatch(r"(\d+)\s*[xX]?", meta["magnification"])
        if meta["magnification"] and mag is None:  # cv would stop at it after training every fold
            raise FinescopeError(f"{where} has magnification '{meta['magnification']}'; write it as a number such as "
                                 "40 or 40X, or leave the cell empty")
        if mag:
            meta["magnification"] = int(mag[1])
        else:
            del meta["magnification"]
    return _Found(path, row["label"], group, meta, split)


def _warn_numbers_written_two_ways(manifest: Path, labels: list[str]) -> None:
    """Warn about labels that read as one number (``1`` and ``1.0``): two classes, though maybe meant as one."""
    spellings: dict[float, list[str]] = {}
    for label in labels:
        try:
            spellings.setdefault(float(label), []).append(label)
        except ValueError:
            continue
    for names in spellings.values():
        if len(names) > 1:
            warnings.warn(f"CSV manifest '{manifest}' has the labels {' and '.join(repr(n) for n in names)}, one "
                          "number written two ways, read as two classes; write each class's label alike",
                          FinescopeWarning, stacklevel=4)


def read_manifest(manifest: Path, cfg: DataConfig) -> _Scan:
    """Read a ``path,label[,group][,split]`` CSV; paths are relative to the CSV's folder."""
    header, rows = _read_rows(manifest)
    if "group" in header and "patient" in header:  # the group splits, the patient is what patient metrics score
        empty = [line for line, row in rows if not row.get("patient")]
        if empty and len(empty) < len(rows):  # that image would be scored as a patient named after its group
            raise FinescopeError(f"CSV manifest '{manifest}' line {empty[0]} has an empty patient, where other rows "
                                 "name theirs (patient-level metrics score the patient column; the group column "
                                 "splits); give every row its patient, or leave the column empty to score groups")
    found, skipped, first, repeated = [], [], {}, []
    for line, row in rows:
        item = _csv_row(row, line, manifest, header)
        if item.path in first:  # a row pasted twice: one image, unless the rows disagree about it
            line0, item0, text0 = first[item.path]
            for what, a, b in (("label", item0.label, item.label), ("group", item0.group, item.group),
                               ("split", item0.split, item.split)):
                if a != b:
                    raise FinescopeError(f"CSV manifest '{manifest}' line {line} lists '{row['path']}' again, with "
                                         f"{what} '{b}' where line {line0} has '{a}'; remove the wrong row")
            repeated.append((text0, line0, line))
            continue
        first[item.path] = (line, item, row["path"])
        if not os.path.isfile(item.path):
            what = ("is a folder, not an image" if os.path.isdir(item.path) else
                    "is not a regular file (a named pipe, socket or device)" if os.path.exists(item.path) else
                    "does not exist")
            if what == "does not exist" and os.sep == "/" and re.match(r"[A-Za-z]:[\\/]", row["path"]):
                what += ": it is a Windows path; write it relative to the CSV's folder or as a path on this machine"
            elif what == "does not exist" and not os.path.isabs(row["path"]) and os.path.isfile(row["path"]):
                what += (f": relative paths are read from the CSV's folder '{manifest.parent}', and '{row['path']}' "
                         "names a file in the working folder; write the paths relative to the CSV's folder, or "
                         "absolute")
            reason = f"image '{item.path}' listed in CSV manifest '{manifest}' line {line} {what}"
            _skip_or_raise(cfg, item.path, reason, skipped)
            continue
        found.append(item)
    if repeated:
        text, line0, line = repeated[0]
        warnings.warn(f"CSV manifest '{manifest}' lists '{text}' on lines {line0} and {line}, with the same label, "
                      "group and split; read once (remove the repeated row)" if len(repeated) == 1 else
                      f"CSV manifest '{manifest}' lists {len(repeated)} images again, with the same label, group and "
                      f"split, e.g. '{text}' on lines {line0} and {line}; each read once (remove the repeated rows)",
                      FinescopeWarning, stacklevel=3)
    if not found:
        raise FinescopeError(f"none of the images listed in CSV manifest '{manifest}' exists")
    _warn_numbers_written_two_ways(manifest, sorted({f.label for f in found}))
    if cfg.magnifications:  # a magnification column, as cv --per-magnification trains each on its own
        if "magnification" not in header:  # e.g. a BreakHis config (magnifications: [100]) read from a CSV
            raise FinescopeError(f"CSV manifest '{manifest}' has no 'magnification' column to keep data.magnifications "
                                 f"{list(cfg.magnifications)} by; set data.magnifications=[] (every image), or add "
                                 "the column")
        found = [f for f in found if f.meta.get("magnification") in cfg.magnifications]
        if not found:
            raise FinescopeError(f"CSV manifest '{manifest}' lists no image at data.magnifications "
                                 f"{list(cfg.magnifications)} in its magnification column; check data.magnifications")
    others = [h for h in header if h and h not in ("path", "label", "split")]
    no_groups = "" if _group_column(header) else (
        f"CSV manifest '{manifest}' has no 'group' or 'patient' column"
        + (f" (its other columns: {', '.join(others)}; rename the patient or specimen column to 'group')" if others
           else " (add one naming each image's patient or specimen)"))
    return _Scan(found, class_order({f.label for f in found}), str(manifest.parent), skipped, no_groups, str(manifest),
                 _group_column(header))


def _scan_csv(cfg: DataConfig) -> _Scan:
    return read_manifest(_manifest_path(cfg.root), cfg)


def _scan_synthetic(cfg: DataConfig) -> _Scan:
    """Generate the synthetic set under ``cfg.root`` if needed (seed 0) and read its manifest."""
    from finescope.data.synthetic import ensure_synthetic

    if os.path.isfile(cfg.root):  # e.g. data.root=my.csv with the default source
        raise FinescopeError(f"data.root '{cfg.root}' is a file; data.source=synthetic generates its images into a "
                             f"folder (give a new or empty one){_manifest_hint(cfg.root)}")
    manifest = ensure_synthetic(Path(cfg.root), cfg.synthetic_per_class, cfg.synthetic_size, 0)
    return read_manifest(Path(os.path.abspath(manifest)), cfg)


__all__ = [
    "BREAKHIS_CLASSES",
    "BREAKHIS_MAGNIFICATIONS",
    "SUPPORTED_EXTENSIONS",
    "class_order",
    "find_images",
    "grouping_doubt",
    "in_class_order",
    "is_image_file",
    "file_sample",
    "label_and_group_of",
    "load_samples",
    "parse_breakhis_name",
    "read_manifest",
]
