"""Evidence galleries: what the model looks at for each class, across a dataset.

For every class c, the crops of the images *predicted* as c are ranked by ``attention mass of the box x
probability of c``; the ``top`` highest are kept. Variants without crops (``global``, ``attention``) give one
crop per image instead (so does a crop variant of ``model.num_crops=0``): a square of ``min_box_fraction`` of the
short side around the maximum of the main map, ranked by the probability of c; an image whose main map is flat
(zero everywhere, say) has no maximum and gives no crop (explain counts such maps in ``flat_maps``). Where that map
is a CAM of another class than c (a mistake explained with ``--target true``), its entry says so in ``map``
(``gradcam of malignant``).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import unicodedata
from pathlib import Path

import torch

from finescope.explain.maps import peak_box
from finescope.explain.methods import explains_class
from finescope.explain.overlay import save_image


class EvidenceCollector:
    """Keeps the ``top`` best crops per predicted class while images stream by (memory: ``top`` crops/class)."""

    def __init__(self, class_names: list[str], top: int = 16) -> None:
        self.class_names = list(class_names)
        self.top = top
        self.heaps: dict[int, list] = {c: [] for c in range(len(class_names))}
        self._tie = itertools.count()

    def _push(self, c: int, score: float, entry: dict) -> None:
        heap = self.heaps[c]
        item = (score, next(self._tie), entry)
        if len(heap) < self.top:
            heapq.heappush(heap, item)
        elif score > heap[0][0]:
            heapq.heapreplace(heap, item)

    def add(self, model, expl, name: str, figure: str) -> None:
        """Offer the crops of one :class:`Explanation` (or its map-peak crop when the model has no boxes)."""
        c, p = expl.predicted, expl.confidence
        common = {"image": name, "figure": figure, "probability": p, "correct": expl.correct}
        if expl.crops is not None and len(expl.crops):  # a crop model of num_crops=0 takes the map's peak below
            for k, (crop, mass) in enumerate(zip(expl.crops, expl.box_mass.tolist(), strict=True)):
                self._push(c, mass * p, {**common, "rank": k + 1, "mass": mass, "crop": crop.clone()})
            return
        H, W = expl.image.shape[-2:]
        box = peak_box(expl.map, model.min_box_fraction * min(H, W))  # (4,)
        if box is None:  # a flat map points nowhere: not at the top-left corner
            return
        if explains_class(expl.method) and expl.target != c:  # a mistake's CAM of its true class (--target true)
            common["map"] = f"{expl.method} of {self.class_names[expl.target]}"
        device = next(model.parameters()).device
        x = expl.image.to(device).float()[None] / 255
        with torch.no_grad():
            crop = model._crops(x, box.to(device)[None, None])[0].clamp(0, 1).cpu()  # (3, L, L)
        self._push(c, p, {**common, "rank": 1, "mass": None, "crop": crop})

    def save(self, out: Path) -> dict[str, list[dict]]:
        """Write ``out/evidence/<class>/NN.png`` (the folder: :func:`class_folders`); returns {class: [entries,
        best first]} with ``file`` paths relative to ``out`` (the crops themselves are dropped)."""
        result = {}
        folders = class_folders(self.class_names)
        for c, heap in self.heaps.items():
            name = self.class_names[c]
            entries = []
            for n, (score, _, entry) in enumerate(sorted(heap, key=lambda t: (-t[0], t[1]))):
                rel = Path("evidence") / folders[c] / f"{n + 1:02d}.png"
                save_image(entry["crop"], out / rel)
                entries.append({**{k: v for k, v in entry.items() if k != "crop"}, "score": score,
                                "file": rel.as_posix()})
            result[name] = entries
        return result


# Windows gives these names (any case, with any extension) to devices: no file or folder can have them
_DEVICE_NAMES = frozenset(["con", "prn", "aux", "nul"]
                          + [f"{port}{d}" for port in ("com", "lpt") for d in "0123456789\u00b9\u00b2\u00b3"])


# a folder's name at most (UTF-8 bytes) before the '~' and class index of a shared or device name: file systems take
# 255 (ext4, APFS: bytes; NTFS: UTF-16 units), and Windows paths of more than 260 characters are refused by default
_MAX_FOLDER_BYTES = 128


def safe_name(name: str) -> str:
    """``name`` as a file or folder name every common file system takes: letters, digits, ``-``, ``_`` and ``.``
    (the rest as ``_``), no final ``.``, at most 128 UTF-8 bytes (longer: its start, ``~`` and a hash)."""
    name = unicodedata.normalize("NFC", name)  # 'e' + combining accent is the one letter 'é', as macOS sees it
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "class"
    safe = safe[:-1] + "_" if safe.endswith(".") else safe  # Windows drops a final '.': 'a.' would be 'a'
    if len(safe.encode()) <= _MAX_FOLDER_BYTES:
        return safe
    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:8]  # of the whole name: names sharing a start differ
    start = safe.encode()[:_MAX_FOLDER_BYTES - len(tag)].decode(errors="ignore")  # whole letters only
    return start + tag


def _is_device(safe: str) -> bool:
    return safe.split(".")[0].casefold() in _DEVICE_NAMES


def class_folders(class_names: list[str]) -> list[str]:
    """The folder of each class in ``evidence/``: its name (in NFC) with characters other than letters, digits,
    ``-``, ``_`` and ``.`` as ``_``, and a final ``.`` as ``_`` (Windows drops it). Where two classes would share a
    folder on a file system that ignores case and Unicode normalisation (macOS, Windows: 'a+' and 'a?' both 'a_';
    'A' and 'a'; 'é' and 'e' + combining accent), the folder ends in ``~`` and the class index ('a_~0', 'a_~1'):
    one class's crops no longer overwrite another's. A Windows device name (CON, PRN, AUX, NUL, COM0-9, LPT0-9, any
    case, with or without an extension) takes ``~`` and the class index before its extension ('CON~2',
    'nul~3.txt'). A name of more than 128 UTF-8 bytes is cut to its start and ``~`` and 8 hex digits of a hash of
    the whole name ('xxx...~1b2c3d4e'), so that it fits the 255 bytes a file name may have. ``~`` is in no plain
    folder name, so these are unique."""
    safe = [safe_name(name) for name in class_names]
    keys = [unicodedata.normalize("NFC", s.casefold()) for s in safe]
    folders = []
    for c, (s, key) in enumerate(zip(safe, keys)):
        if _is_device(s):
            stem, dot, ext = s.partition(".")
            folders.append(f"{stem}~{c}{dot}{ext}")
        elif keys.count(key) > 1:
            folders.append(f"{s}~{c}")
        else:
            folders.append(s)
    return folders


__all__ = ["EvidenceCollector", "class_folders", "safe_name"]
