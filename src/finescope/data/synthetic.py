"""A histology-like synthetic set where the class hides in a few small cells visible only at full resolution.

Every image is eosin-pink stroma with fibres and a few pale lumina, scattered with many small haematoxylin
nuclei. Every image also holds a few *enlarged* nuclei. In class ``typical`` they are smooth. In class
``atypical`` they carry coarse-grained chromatin: a fine dark/light checkerboard with a period of
``grain`` pixels, plus a slight hyperchromasia. Downsampled to the global view (e.g. 384 -> 96 px) the
checkerboard averages away and only the faint darkening is left, so a plain CNN on the global view can only
guess from a weak cue, while a model that looks again at those nuclei at full resolution sees the texture.
The centre and radius of every atypical nucleus is saved, so explanations can be scored against the truth.

Files written under ``root``: ``images/<class>_<n>.png``, ``manifest.csv`` (path,label,group) and
``cells.json`` ({relative path: [[cx, cy, r], ...]} for the atypical nuclei; empty lists for ``typical``).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from finescope.errors import FinescopeError
from finescope.files import json_text

CLASS_NAMES = ("typical", "atypical")


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the generator (defaults give the demo set)."""

    size: int = 384  # image side in pixels
    n_nuclei: tuple[int, int] = (45, 70)  # normal nuclei per image
    nucleus_radius: tuple[float, float] = (4.0, 7.0)
    n_key: tuple[int, int] = (2, 3)  # enlarged nuclei per image (the key instances)
    key_radius: tuple[float, float] = (10.0, 13.0)
    grain: int = 2  # checkerboard period of atypical chromatin, pixels
    grain_contrast: float = 0.55  # amplitude of the checkerboard (fraction of the nucleus darkness)
    hyperchromasia: float = 0.15  # extra darkness of atypical nuclei (the faint low-resolution cue)
    darkness_jitter: float = 0.06  # per-nucleus random darkness (hides the cue in noise)


_STROMA = np.array([0.93, 0.72, 0.80])  # eosin pink
_NUCLEUS = np.array([0.36, 0.22, 0.52])  # haematoxylin purple


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], (size, size)."""
    coarse = rng.uniform(-1, 1, (size // scale + 2, size // scale + 2)).astype(np.float32)
    img = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 127.5 - 1


def _background(rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    """Stroma with fibres and pale lumina, (S, S, 3) float in [0, 1]."""
    S = spec.size
    tone = 1 + 0.06 * _smooth_noise(rng, S, 24)[..., None]
    img = _STROMA[None, None, :] * tone
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    fibres = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / rng.uniform(3, 6) + 3 * _smooth_noise(rng, S, 48))
    img = img - 0.04 * fibres[..., None] * np.array([0.2, 1.0, 0.6])
    for _ in range(rng.integers(1, 4)):  # lumina
        cy, cx, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(S / 14, S / 7)
        d = np.hypot(yy - cy, (xx - cx) * rng.uniform(0.6, 1.4)) / r
        img = img + np.clip(1 - d, 0, 1)[..., None] ** 0.5 * (0.97 - img) * 0.9
    return img


def _stamp(img: np.ndarray, cy: float, cx: float, r: float, darkness: np.ndarray | float) -> None:
    """Blend an elliptical nucleus into ``img`` in place; ``darkness`` is a scalar or a (2r, 2r) field."""
    S = img.shape[0]
    y0, y1 = max(int(cy - r - 2), 0), min(int(cy + r + 3), S)
    x0, x1 = max(int(cx - r - 2), 0), min(int(cx + r + 3), S)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.hypot(yy - cy, xx - cx) / r
    alpha = np.clip((1.0 - d) * r / 1.5, 0, 1)[..., None]  # soft 1.5 px rim
    dark = darkness if np.isscalar(darkness) else darkness[y0:y1, x0:x1][..., None]
    colour = _NUCLEUS[None, None, :] * (1 - dark) + 0.1 * dark
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + colour * alpha


def _checker(size: int, grain: int, phase: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((((yy + phase[0]) // (grain // 2 or 1)) + ((xx + phase[1]) // (grain // 2 or 1))) % 2) * 2.0 - 1.0


def render_image(rng: np.random.Generator, atypical: bool, spec: SyntheticSpec) -> tuple[np.ndarray, list]:
    """One image (S, S, 3) uint8 and the list of its atypical nuclei [[cx, cy, r], ...]."""
    S = spec.size
    img = _background(rng, spec)
    for _ in range(rng.integers(*spec.n_nuclei, endpoint=True)):
        r = rng.uniform(*spec.nucleus_radius)
        _stamp(img, rng.uniform(0, S), rng.uniform(0, S), r, 0.45 + rng.normal(0, spec.darkness_jitter))
    cells = []
    margin = spec.key_radius[1] + 4
    centres: list[tuple[float, float]] = []
    for _ in range(rng.integers(*spec.n_key, endpoint=True)):
        for _try in range(50):  # keep key nuclei apart
            cy, cx = rng.uniform(margin, S - margin, size=2)
            if all(np.hypot(cy - py, cx - px) > 4 * margin for py, px in centres):
                break
        centres.append((cy, cx))
        r = rng.uniform(*spec.key_radius)
        base = 0.5 + rng.normal(0, spec.darkness_jitter)
        if atypical:
            grain = _checker(S, spec.grain, tuple(rng.integers(0, spec.grain, size=2)))
            darkness = base + spec.hyperchromasia + spec.grain_contrast * 0.5 * grain
            cells.append([round(float(cx), 1), round(float(cy), 1), round(float(r), 1)])
        else:
            darkness = base
        _stamp(img, cy, cx, r, darkness)
    noise = rng.normal(0, 0.015, img.shape)
    return (np.clip(img + noise, 0, 1) * 255).round().astype(np.uint8), cells


def generate(root: str | Path, per_class: int = 160, size: int = 384, seed: int = 0) -> Path:
    """Write the synthetic set to ``root`` and return the path of its ``manifest.csv``.

    Each image is its own group (a "patient"): the set has no shared-patient structure.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    # an earlier set's marks go before its images are drawn over: a generation stopped midway is never taken
    # for that set (manifest first: a manifest without spec.json is taken for someone else's)
    (root / "manifest.csv").unlink(missing_ok=True)
    (root / "spec.json").unlink(missing_ok=True)
    spec = SyntheticSpec(size=size)
    rows, cells = [], {}
    for label, name in enumerate(CLASS_NAMES):
        for n in range(per_class):
            rng = np.random.default_rng([seed, label, n])
            img, atypical = render_image(rng, bool(label), spec)
            rel = f"images/{name}_{n:04d}.png"
            Image.fromarray(img).save(root / rel, compress_level=1)
            rows.append((rel, name, f"{name}_{n:04d}"))
            cells[rel] = atypical
    (root / "cells.json").write_text(json_text(cells))
    manifest = root / "manifest.csv"
    tmp = manifest.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group"), *rows])
    tmp.replace(manifest)  # written last: its presence means the set is complete
    (root / "spec.json").write_text(json_text({"per_class": per_class, "size": size, "seed": seed}))
    return manifest


def ensure_synthetic(root: str | Path, per_class: int = 160, size: int = 384, seed: int = 0) -> Path:
    """Generate the set unless ``root`` already holds one made with the same settings; return its manifest."""
    root = Path(root)
    spec_file, manifest = root / "spec.json", root / "manifest.csv"
    wanted = {"per_class": per_class, "size": size, "seed": seed}
    if manifest.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == wanted:
        return manifest
    if root.exists() and not root.is_dir():
        raise FinescopeError(f"data.root '{root}' is a file; the synthetic source generates its images into a "
                             "folder (give a new or empty one)")
    if root.is_dir() and not spec_file.is_file() and not _only_generated(root):  # someone else's: never write there
        raise FinescopeError(f"data.root '{root}' holds files that are not a finescope synthetic set, and "
                             "data.source is 'synthetic' (the default), which would write generated images there; "
                             "set data.source to breakhis, folder or csv for your data, or give a new folder")
    return generate(root, per_class, size, seed)


def _only_generated(root: Path) -> bool:
    """Whether ``root`` holds nothing but what :func:`generate` writes before its manifest (an empty folder, or
    a generation interrupted while drawing), so generating there overwrites nobody's files. A manifest.csv
    without spec.json may be anyone's."""
    ours = {"images", "cells.json", "manifest.tmp"}
    if any(p.name not in ours for p in root.iterdir()):
        return False
    images = root / "images"
    pattern = re.compile(rf"({'|'.join(CLASS_NAMES)})_\d{{4}}\.png")
    return not images.exists() or (images.is_dir() and all(pattern.fullmatch(p.name) for p in images.iterdir()))


def load_cells(root: str | Path) -> dict[str, list[list[float]]]:
    """The atypical nuclei of a generated set: {relative path: [[cx, cy, r], ...]}."""
    return json.loads((Path(root) / "cells.json").read_text())
