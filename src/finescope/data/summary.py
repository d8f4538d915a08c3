"""What a dataset holds: counts per class, group and magnification, image sizes, unreadable and duplicate files.

This is what ``finescope data`` prints, so that a user can check a source before training on it.

Example:
    >>> d = describe_samples(load_samples(cfg.data))
    >>> print(format_description(d))
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from finescope.config import MAX_SIDE
from finescope.data.dataset import check_view_side, is_sixteen_bit, open_image, read_image, sixteen_bit_top
from finescope.data.records import SampleSet
from finescope.errors import SKIP_ADVICE, FinescopeError


def _file_digest(path: str) -> str | None:
    """The SHA-1 of a file's bytes, or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha1(fh.read()).hexdigest()
    except OSError:
        return None


DARK = 16  # an image whose brightest value is at most this (of 255) is almost black


def _pages(path: str) -> int:
    """How many pages (frames) a TIFF or WebP file holds: :func:`read_image` reads the first; 1 for other
    formats, or where the header cannot tell."""
    if os.path.splitext(path)[1].lower() not in (".tif", ".tiff", ".webp"):
        return 1
    try:
        with open_image(path) as img:
            return int(getattr(img, "n_frames", 1))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1


def dark_sixteen_bit(paths: Sequence[str], bit_depth: int = 0, limit: int = 8) -> tuple[str, int] | None:
    """The first of up to ``limit`` of ``paths`` (evenly spaced) that is a 16-bit file and reads almost black (its
    brightest value at most :data:`DARK` of 255) as ``data.bit_depth`` scales it: (path, brightest), else None.
    Headers are read, and only the 16-bit files among them decoded: cheap enough for the start of a run."""
    for path in list(paths)[:: max(1, len(paths) // limit)][:limit]:
        if not is_sixteen_bit(path):
            continue
        try:
            brightest = int(read_image(path, bit_depth).max())
        except FinescopeError:  # the run reports it where it reads it
            continue
        if brightest <= DARK:
            return path, brightest
    return None


def dark_advice(bit_depth: int) -> str:
    """How 16-bit files are scaled under ``bit_depth``, and the ``data.bit_depth`` that reads a camera's 12- or
    14-bit data in them."""
    top = sixteen_bit_top(bit_depth)
    return (f"16-bit files are read as value * 255 / {top:.0f} (data.bit_depth={bit_depth}), "
            "so a camera's 12- or 14-bit data in them reads so: set data.bit_depth to the camera's bits "
            "(--set data.bit_depth=12, or 14), or rescale the files")


def _read_all(sample_set: SampleSet, min_side: int, view_side: int = 0, bit_depth: int = 0) -> tuple[
        Counter, list[tuple[str, str]], list[list[str]], list[tuple[str, str]], list[tuple[str, int]],
        list[tuple[str, str]], list[tuple[str, int]]]:
    """Decode every image: size histogram ("WxH": n), unreadable files, sets of byte-identical files, the
    images whose short side is below ``min_side`` (path, "WxH"), the almost black ones (path, brightest) and
    those whose global view (short side ``view_side``) would be too long (path, "WxH"; :func:`check_view_side`)
    and the files of several pages, of which the first is read (path, pages)."""
    sizes: Counter = Counter()
    unreadable: list[tuple[str, str]] = []
    small: list[tuple[str, str]] = []
    thin: list[tuple[str, str]] = []
    dark: list[tuple[str, int]] = []
    multi: list[tuple[str, int]] = []
    by_digest: dict[str, list[str]] = defaultdict(list)
    for s in sample_set.samples:
        digest = _file_digest(s.path)
        if digest is not None:
            by_digest[digest].append(s.path)
        try:
            img = read_image(s.path, bit_depth)  # (3, H, W)
        except FinescopeError as e:
            unreadable.append((s.path, str(e)))
            continue
        sizes[f"{img.shape[2]}x{img.shape[1]}"] += 1
        if min(img.shape[1:]) < min_side:
            small.append((s.path, f"{img.shape[2]}x{img.shape[1]}"))
        try:
            check_view_side(s.path, tuple(img.shape[1:]), view_side)
        except FinescopeError:
            thin.append((s.path, f"{img.shape[2]}x{img.shape[1]}"))
        if int(img.max()) <= DARK:
            dark.append((s.path, int(img.max())))
        if (pages := _pages(s.path)) > 1:
            multi.append((s.path, pages))
    duplicates = [paths for paths in by_digest.values() if len(paths) > 1]
    return sizes, unreadable, sorted(duplicates), small, dark, thin, multi


def describe_samples(sample_set: SampleSet, read_images: bool = True, min_side: int = 0,
                     view_side: int = 0, on_error: str = "raise", bit_depth: int = 0) -> dict[str, Any]:
    """Count a sample set, and with ``read_images`` decode every file to find sizes and problems.

    Args:
        sample_set: the output of :func:`~finescope.data.sources.load_samples`.
        read_images: decode every image (slow on large sets); False gives counts only.
        min_side: the short side a model needs (its crop size; 0: none), below which an image is ``too_small``.
        view_side: the short side of the model's global view (0: none), with which an image too thin for it is
            ``too_thin`` (its view would be longer than ``finescope.config.MAX_SIDE``).
        on_error: the config's ``data.on_error``; under ``skip`` (recorded as ``on_error``) the reasons of the
            unreadable files do not end in the advice to set it.
        bit_depth: the config's ``data.bit_depth``, how 16-bit files are scaled (recorded as ``bit_depth``).

    Returns:
        A dict with ``root`` (the folder read; image paths relative to it), ``manifest`` (the CSV manifest
        read, or empty), ``n_images``, ``n_groups``, ``class_names``, ``per_class`` ({name: {"images", "groups"}}),
        ``per_group`` ({group: images}), ``mixed_groups`` ({group: [class names]} of the groups holding images
        of two or more classes), ``images_per_group`` (min/median/max), ``per_magnification``
        ({40: n, ...} when the samples have one), ``image_sizes`` ({"700x460": n}, width x height),
        ``unreadable`` ([(path, reason)]) with ``on_error``, ``duplicates`` (lists of byte-identical files),
        ``duplicates_across_groups`` (how many of those lists span two groups: a possible leak),
        ``duplicates_joined`` (how many spanned two of the data's groups before ``data.merge_duplicates`` joined
        them: its ``meta['source_group']``), ``too_small``
        ([(path, "WxH")] below ``min_side``, with ``min_side``), ``too_thin`` ([(path, "WxH")], with ``view_side``),
        ``almost_black`` ([(path, brightest value)] at most
        16 of 255: e.g. 12-bit camera data in a 16-bit file, which ``bit_depth`` 0 reads as value * 255 / 65535),
        ``multi_page`` ([(path, pages)] of the TIFF or WebP files of several pages, read as their first) and
        ``skipped`` (files the source skipped).
    """
    samples = sample_set.samples
    per_group = Counter(s.group for s in samples)
    counts = np.array(sorted(per_group.values())) if per_group else np.zeros(1, dtype=int)
    per_class = {}
    for c, name in enumerate(sample_set.class_names):
        of_c = [s for s in samples if s.label == c]
        per_class[name] = {"images": len(of_c), "groups": len({s.group for s in of_c})}
    classes_of: dict[str, set[int]] = defaultdict(set)
    for s in samples:
        classes_of[s.group].add(s.label)
    mixed = {g: [sample_set.class_names[c] for c in sorted(cs)] for g, cs in sorted(classes_of.items()) if len(cs) > 1}
    mags = Counter(s.meta["magnification"] for s in samples if "magnification" in s.meta)
    out: dict[str, Any] = {
        "root": sample_set.root,
        "manifest": sample_set.manifest,
        "n_images": len(samples),
        "n_groups": len(per_group),
        "class_names": list(sample_set.class_names),
        "per_class": per_class,
        "per_group": dict(sorted(per_group.items())),
        "mixed_groups": mixed,
        "images_per_group": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "max": int(counts.max()),
        },
        "per_magnification": dict(sorted(mags.items())),
        "skipped": [list(x) for x in sample_set.skipped],
    }
    if read_images:
        sizes, unreadable, duplicates, small, dark, thin, multi = _read_all(sample_set, min_side, view_side,
                                                                            bit_depth)
        group_of = {s.path: s.group for s in samples}
        out["image_sizes"] = dict(sizes.most_common())
        out["on_error"] = on_error
        out["unreadable"] = [[p, r.removesuffix(SKIP_ADVICE) if on_error == "skip" else r] for p, r in unreadable]
        out["duplicates"] = duplicates
        out["duplicates_across_groups"] = sum(len({group_of[p] for p in d}) > 1 for d in duplicates)
        source_of = {s.path: s.meta.get("source_group", s.group) for s in samples}
        out["duplicates_joined"] = sum(len({source_of[p] for p in d}) > len({group_of[p] for p in d})
                                       for d in duplicates)
        out["min_side"], out["too_small"] = min_side, [list(x) for x in small]
        out["view_side"], out["too_thin"] = view_side, [list(x) for x in thin]
        out["bit_depth"], out["almost_black"] = bit_depth, [list(x) for x in dark]
        out["multi_page"] = [list(x) for x in multi]
    return out


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root) if root else path


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list) -> str:
        cells = [str(v).ljust(widths[i]) if i == 0 else str(v).rjust(widths[i]) for i, v in enumerate(row)]
        return "  " + "  ".join(cells)

    return [fmt(header), *(fmt(r) for r in rows)]


def format_description(d: dict[str, Any]) -> str:
    """A plain-text report of :func:`describe_samples` for the ``finescope data`` command."""
    where = f"root: {d.get('root', '')}"
    if d.get("manifest"):  # the images are those the CSV lists, not those under its folder
        where = f"manifest: {d['manifest']} (its relative paths are read from {d.get('root', '')})"
    lines = [
        where,
        f"{d['n_images']} images in {d['n_groups']} groups, {len(d['class_names'])} classes",
        "",
    ]
    rows = [[name, v["images"], v["groups"]] for name, v in d["per_class"].items()]
    lines += _table(rows, ["class", "images", "groups"]) + [""]
    ipg = d["images_per_group"]
    lines.append(f"images per group: min {ipg['min']}, median {ipg['median']:g}, max {ipg['max']}")
    names = list(d.get("per_group", {}))
    if names:  # what the groups are named: a patient, or an organising folder such as 40X taken for one?
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} groups)" if len(names) > 6 else "")
        lines.append(f"groups: {shown}")
    mixed = d.get("mixed_groups", {})
    if mixed:  # such a patient has no one label: say how the patient accuracies score it
        shown = "; ".join(f"{g}: {', '.join(cs)}" for g, cs in list(mixed.items())[:4]) + ("; ..." if len(mixed) > 4
                                                                                          else "")
        lines.append(f"groups holding two or more classes: {len(mixed)} of {d['n_groups']} ({shown}); the "
                     "patient accuracies (patient_accuracy_*) score such a group once per class, on its images of it")
    if d.get("per_magnification"):
        lines.append("magnifications: " + ", ".join(f"{m}X: {n}" for m, n in d["per_magnification"].items()))
    if "image_sizes" in d:
        sizes = list(d["image_sizes"].items())
        shown = ", ".join(f"{k}: {n}" for k, n in sizes[:8]) + (
            f", ... ({len(sizes)} sizes)" if len(sizes) > 8 else ""
        )
        lines.append(f"image sizes (WxH): {shown}")
        lines += _problems(d)
    return "\n".join(lines)


def _problems(d: dict[str, Any]) -> list[str]:
    """Lines about unreadable, too small, skipped and duplicate files."""
    root = d.get("root", "")
    skips = " (data.on_error=skip: train, evaluate and predict skip them)" if d.get("on_error") == "skip" else ""
    lines = [f"unreadable: {len(d['unreadable'])}{skips if d['unreadable'] else ''}"]
    lines += [f"  {_rel(p, root)}: {reason}" for p, reason in d["unreadable"][:20]]
    if d.get("min_side"):
        lines.append(f"smaller than {d['min_side']} px (model.local_size) on their short side: {len(d['too_small'])}")
        lines += [f"  {_rel(p, root)}: {size}" for p, size in d["too_small"][:20]]
    if d.get("too_thin"):
        lines.append(f"so thin that the global view (a short side of {d['view_side']} px) would be longer than "
                     f"{MAX_SIDE} px: {len(d['too_thin'])}")
        lines += [f"  {_rel(p, root)}: {size}" for p, size in d["too_thin"][:20]]
    if d.get("almost_black"):
        lines.append(f"almost black (brightest value at most {DARK} of 255): {len(d['almost_black'])}; "
                     + dark_advice(d.get("bit_depth", 0)))
        lines += [f"  {_rel(p, root)}: brightest {v}" for p, v in d["almost_black"][:20]]
    if d.get("multi_page"):  # a z-stack, channels or a pyramid: which page is meant, finescope cannot tell
        lines.append(f"multi-page files, read as their first page only: {len(d['multi_page'])}")
        lines += [f"  {_rel(p, root)}: {n} pages" for p, n in d["multi_page"][:20]]
    if d.get("skipped"):
        lines.append(f"skipped by the source: {len(d['skipped'])}")
        lines += [f"  {_rel(p, root)}: {reason}" for p, reason in d["skipped"][:20]]
    dup = d["duplicates"]
    joined = d.get("duplicates_joined", 0)
    lines.append(
        f"byte-identical duplicates: {len(dup)} sets, {d['duplicates_across_groups']} spanning two groups"
        + (f" ({joined} spanned two of the data's groups, joined in one by data.merge_duplicates)" if joined else "")
    )
    lines += ["  " + " = ".join(_rel(p, root) for p in paths) for paths in dup[:10]]
    if len(dup) > 10:
        lines.append(f"  ... and {len(dup) - 10} more sets")
    return lines


__all__ = ["dark_advice", "dark_sixteen_bit", "describe_samples", "format_description"]
