"""What ``finescope explain`` reads: a run's split or files and folders, with true labels and ground truth.

- ``--split test`` (a run directory): the run's ``splits.json`` and data root (from its config; ``--set
  data.root=...`` when the data moved); labels come from the data source.
- files and folders: every image under them; the true class is the nearest parent folder named like one of the
  model's classes (``defungi/H1/x.jpg`` -> H1, ``.../benign/SOB/...`` -> benign), or an original BreakHis file
  name for a BreakHis model, else unknown.
- ground truth positions: a ``cells.json`` (the synthetic generator's, :func:`~finescope.data.synthetic.load_cells`)
  in the data root or in a parent folder of the files.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from finescope.config import Config
from finescope.data import empty_split_error
from finescope.data.splits import own_split_leak, trained_files
from finescope.errors import FinescopeError, FinescopeWarning
from finescope.trainer import (
    OWN_SPLIT_FIX,
    _same_root,
    lone_on_own_data,
    other_listed_split,
    other_split,
    own_splits,
    run_dir_of,
    trained_data_of,
)

SPLITS = ("train", "val", "test", "all")


@dataclass
class Item:
    """One image to explain: absolute ``path``, display ``name``, true ``label`` (or None) and ground-truth
    ``cells`` [[cx, cy, r], ...] (None when no cells.json covers the image)."""

    path: str
    name: str
    label: int | None = None
    cells: list | None = None


@dataclass
class Inputs:
    """The images to explain, their data root (or ''), and the training image sizes {(H, W)} when known."""

    items: list[Item]
    root: str = ""
    train_sizes: set = field(default_factory=set)
    trained: set | None = field(default_factory=set)  # real paths of the run's training and validation images
    split_leak: str | None = None  # what is wrong with the run's split for this model (as evaluate's)
    split: str | None = None  # the side read: 'all' where other data has none of the run's (as evaluate's)


def _shown(name: str) -> str:
    """A name to show: a file name that is not UTF-8 (a str with surrogates on Linux, which matplotlib cannot
    draw) with U+FFFD for its odd bytes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _cells_of(root: str | Path) -> dict | None:
    """The synthetic set's true atypical nuclei, or None for other data: a ``cells.json`` that is not the
    generator's (another tool's file of that name in a parent folder) is ignored with a warning."""
    from finescope.data.synthetic import load_cells

    path = Path(root) / "cells.json"
    if not path.is_file():
        return None
    try:
        cells = load_cells(root)
        ok = isinstance(cells, dict) and all(
            isinstance(v, list) and all(isinstance(c, list) and len(c) == 3 and
                                        all(isinstance(x, (int, float)) for x in c) for c in v)
            for v in cells.values())
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        warnings.warn(f"ignoring '{path}': not the synthetic set's ground truth ({{\"images/x.png\": [[cx, cy, r], "
                      "...]}); hit rate and pointing game are not measured from it", FinescopeWarning, stacklevel=2)
        return None
    return cells


def _run_samples(cfg: Config, state: dict, class_names: list[str]):
    """(sample set, splits) of the run's own data."""
    from finescope.data import load_samples, load_splits

    splits_file = run_dir_of(state) / "splits.json"
    if not splits_file.is_file():
        raise FinescopeError(f"--split needs the run's splits.json, not found at '{splits_file}'; pass a run "
                             "directory, or give image files/folders instead")
    sample_set = load_samples(cfg.data, require_all_classes=False, class_names=class_names)
    return sample_set, load_splits(splits_file, sample_set, fix=OWN_SPLIT_FIX, own=True)


def split_inputs(cfg: Config, state: dict, class_names: list[str], split: str) -> Inputs:
    """The images of one side of the run's split; ``all``: every image of ``cfg``'s data, the run's or other data
    (``--set data.root=OTHER``), as evaluate reads them, with the images the run trained or validated on as
    :func:`training_images` finds them for files given. As evaluate, a side of other data (which the run's
    ``splits.json`` does not describe, or a checkpoint without one) is all its images, with a warning saying why
    (``split`` of the result: ``all``); on the data the run trained on, a ``splits.json`` that does not fit, or none,
    is refused: nothing tells its sides apart there."""
    from finescope.data import load_samples

    if split not in SPLITS:
        raise FinescopeError(f"--split '{split}' is unknown; choose one of: {', '.join(SPLITS)}")
    splits_file = run_dir_of(state) / "splits.json"
    if split != "all" and not splits_file.is_file() and _same_root(cfg.data, trained_data_of(state)):
        raise FinescopeError(f"--split needs the run's splits.json, not found at '{splits_file}'; pass a run "
                             "directory, or give image files/folders instead")
    sample_set = load_samples(cfg.data, require_all_classes=False, class_names=class_names)
    splits, why = (None, None) if split == "all" else own_splits(cfg, state, sample_set)
    if splits is not None:
        if len(splits[split]) == 0:
            raise empty_split_error(split, splits, run_dir_of(state))
        sizes = _image_sizes([sample_set.samples[i].path for i in splits["train"]])
        return Inputs(_items(sample_set, splits[split]), sample_set.root, sizes,
                      split_leak=_split_leak(state, splits, sample_set), split=split)
    if why:  # no splits.json to match: other data has none, as for evaluate
        warnings.warn(f"explaining all {len(sample_set)} images, not the '{split}' split: {why}", FinescopeWarning,
                      stacklevel=3)
    inputs = Inputs(_items(sample_set, range(len(sample_set))), sample_set.root, split="all")
    inputs.train_sizes, inputs.trained, inputs.split_leak = training_images(cfg, state, class_names,
                                                                            [i.path for i in inputs.items])
    inputs.split_leak = inputs.split_leak or _warn_if_lone_on_own_data(cfg, state, len(inputs.items))
    return inputs


def _warn_if_lone_on_own_data(cfg: Config, state: dict, n: int) -> str | None:
    """As evaluate says it, warned: a checkpoint without its run's ``splits.json`` read on the data it was trained
    on, whose ``n`` images then include its training images, not told apart; None otherwise."""
    run_dir = run_dir_of(state)
    if (run_dir / "splits.json").is_file() or not _same_root(cfg.data, trained_data_of(state)):
        return None
    seen = lone_on_own_data(cfg.data.root, run_dir, n, "explain")
    warnings.warn(seen, FinescopeWarning, stacklevel=3)
    return seen


def _items(sample_set, indices) -> list[Item]:
    """The :class:`Item` of each sample of ``sample_set`` at ``indices``, named by its path below the data root."""
    cells = _cells_of(sample_set.root)
    items = []
    for i in indices:
        s = sample_set.samples[i]
        rel = Path(os.path.relpath(s.path, sample_set.root)).as_posix()
        items.append(Item(s.path, _shown(rel), int(s.label), None if cells is None else cells.get(rel, [])))
    return items


def _split_leak(state: dict, splits: dict, sample_set) -> str | None:
    """What evaluate records in ``split_leak`` of a run's split: a group on two of its sides, or a checkpoint
    trained on another split (:func:`_other_split_warned`); None when neither."""
    return "; ".join(filter(None, [own_split_leak(splits, sample_set),
                                   _other_split_warned(state, splits, sample_set)])) or None


def _other_split_warned(state: dict, splits: dict, sample_set) -> str | None:
    """:func:`~finescope.trainer.other_split` of the checkpoint ``state`` for explain, warned when there is one."""
    seen = other_split(state, splits, sample_set, run_dir_of(state), command="explain")
    if seen:
        warnings.warn(seen, FinescopeWarning, stacklevel=3)
    return seen


def _cells_for(path: Path, cache: dict) -> list | None:
    """The ground truth of ``path`` from the nearest parent folder holding a cells.json, or None."""
    for parent in path.parents:
        if parent not in cache:
            cache[parent] = _cells_of(parent)
        if cache[parent] is not None:
            return cache[parent].get(path.relative_to(parent).as_posix(), [])
    return None


def path_inputs(paths: list[str], class_names: list[str], cfg: Config) -> Inputs:
    """Every image file under ``paths`` (files and folders, recursively), with labels (by ``cfg``'s data section,
    :func:`~finescope.data.sources.label_and_group_of`) and cells when known."""
    from finescope.data.sources import images_in, label_and_group_of

    cache: dict = {}
    items = []
    for f, base in images_in(paths):  # each image once, in the order given
        # '..' resolved but links kept, as predict does: a link in a class folder takes that folder's class
        absolute = Path(os.path.abspath(f))
        name = f.relative_to(base).as_posix() if f != base else f.name
        label = label_and_group_of(absolute, cfg.data, class_names)[0]
        items.append(Item(str(absolute), _shown(name), None if label < 0 else label, _cells_for(f.resolve(), cache)))
    return Inputs(items)


def _image_sizes(paths: list[str], limit: int = 16) -> set:
    """{(H, W)} of up to ``limit`` images, read from their headers; unreadable ones (also those PIL refuses to
    open, as too large: a decompression bomb to it) are ignored."""
    from PIL import Image

    from finescope.data.dataset import open_image

    sizes = set()
    for p in paths[:: max(1, len(paths) // limit)][:limit]:
        try:
            with open_image(p) as img:
                sizes.add((img.height, img.width))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # as the dataset's header read
            continue
    return sizes


def training_sizes(cfg: Config, state: dict, class_names: list[str]) -> set:
    """{(H, W)} of the run's training images, or an empty set when its data cannot be read from here."""
    return training_images(cfg, state, class_names)[0]


def training_images(cfg: Config, state: dict, class_names: list[str],
                    paths: Sequence[str] = ()) -> tuple[set, set | None, str | None]:
    """{(H, W)} of the run's training images, the real paths of its training and validation images, and what is
    wrong with its folder's ``splits.json`` for this checkpoint (:func:`~finescope.trainer.other_split`, warned
    here: a split it was not trained on, whose sides tell nothing of its images, which are then None) or None.
    Where its data cannot be read from here, the sizes of the data it was trained on (:func:`_trained_sizes`), and
    those of ``paths`` (the images explained) at the place of a training or validation image of its
    ``splits.json`` (None without one)."""
    # the synthetic source's loader generates the set where it is missing (for a run's relative data.root: in the
    # working folder), which is no way to measure it; its images are synthetic_size pixels square
    synthetic = cfg.data.source == "synthetic"
    sizes = {(cfg.data.synthetic_size,) * 2} if synthetic else set()
    if synthetic and not (Path(cfg.data.root) / "manifest.csv").is_file():
        return sizes, *_listed_trained(state, paths)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample_set, splits = _run_samples(cfg, state, class_names)
    except FinescopeError:  # other data (--set data.root=OTHER): the sizes of the data the run trained on
        return sizes or _trained_sizes(cfg, state, class_names), *_listed_trained(state, paths)
    sizes = sizes or _image_sizes([sample_set.samples[i].path for i in splits["train"]])
    leak = _other_split_warned(state, splits, sample_set)
    if leak:
        return sizes, None, leak
    seen = {os.path.realpath(sample_set.samples[i].path) for side in ("train", "val") for i in splits.get(side, [])}
    return sizes, seen, None


def _trained_sizes(cfg: Config, state: dict, class_names: list[str]) -> set:
    """{(H, W)} of the run's training images, read from the data it was trained on where ``cfg`` reads other data
    (whose sizes say nothing of the model's); empty where that data is ``cfg``'s or cannot be read from here."""
    trained = trained_data_of(state)
    if trained == cfg.data:
        return set()
    if trained.source == "synthetic":  # not generated here to be measured: its images are of synthetic_size
        return {(trained.synthetic_size,) * 2}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample_set, splits = _run_samples(replace(cfg, data=trained), state, class_names)
    except (FinescopeError, OSError):
        return set()
    return _image_sizes([sample_set.samples[i].path for i in splits["train"]])


def _listed_trained(state: dict, paths: Sequence[str]) -> tuple[set | None, str | None]:
    """:func:`training_images`' images trained on and what is wrong with the split, where the run's data cannot be
    read: by its ``splits.json`` alone (:func:`~finescope.data.splits.trained_files`,
    :func:`~finescope.trainer.other_listed_split`)."""
    run_dir = run_dir_of(state)
    leak = other_listed_split(state, run_dir, command="explain")
    if leak:
        warnings.warn(leak, FinescopeWarning, stacklevel=3)
        return None, leak
    return trained_files(run_dir / "splits.json", paths), None


def size_notes(size: tuple[int, int], train_sizes: set, global_size: int, local_size: int, crops: bool) -> list[str]:
    """Warnings for an image of another scale than the training images (the model resizes it, but the
    magnification it sees changes), or too small for its crops."""
    H, W = size
    notes = []
    if train_sizes and not any(0.8 <= min(H, W) / min(h, w) <= 1.25 for h, w in train_sizes):
        seen = ", ".join(f"{w}x{h}" for h, w in sorted(train_sizes)[:3])
        notes.append(f"image is {W}x{H} but the model was trained on {seen} images: the global view rescales it to "
                     f"a short side of {global_size} px, so the scale it sees differs; trust this prediction less")
    if crops and min(H, W) < local_size:
        notes.append(f"image's short side {min(H, W)} px is smaller than the crop size {local_size} px: crops are "
                     "upsampled, which the model never saw in training; predict and evaluate refuse such an image")
    return notes


__all__ = ["Inputs", "Item", "path_inputs", "run_dir_of", "size_notes", "split_inputs", "training_images",
           "training_sizes"]
