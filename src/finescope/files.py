"""Files written whole or not at all, so that a process killed mid-write (or a full disk) never leaves a
truncated result that a later command reads as complete; and JSON that every parser reads (:func:`json_text`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

TMP_PREFIX = ".finescope-"  # temporary files: ``.finescope-XXXXXXXX.tmp`` beside their target
# a file name that is not UTF-8 (Latin-1 names from an old archive) is a str with surrogates on Linux: written
# back as its own bytes, and read back (errors=ERRORS) as the same str, so that paths in a CSV still match
ERRORS = "surrogateescape"
# the figures explain writes in its output folder, as (folder, glob below it, file name): images/NNNNN_<name>.png
# and evidence/<class>/NN.png; it clears them before a new run, and predict and explain do not take them for data
EXPLAIN_FIGURES = (("images", "*.png", re.compile(r"\d{5,}_.*\.png")),
                   ("evidence", "*/*.png", re.compile(r"\d{2,}\.png")))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, newline: str | None = None, binary: bool = False) -> Iterator[IO]:
    """A UTF-8 text file (names that are not UTF-8 as their bytes: :data:`ERRORS`), or with ``binary`` a bytes
    file, for writing that appears at ``path`` only once complete: written under a temporary name in the same
    folder, then renamed over ``path``, so the previous file (or none) stays until then; an existing file keeps
    its permissions. A ``path`` that is a link (symbolic or hard, such as ``/dev/stdout``) or not a regular file
    (a pipe) is written through, directly, as ``open`` would."""
    path = Path(path)
    how = {"mode": "wb"} if binary else {"mode": "w", "newline": newline, "encoding": "utf-8", "errors": ERRORS}
    try:
        st = path.stat()
    except OSError:  # not there yet
        st = None
    if st is not None and (path.is_symlink() or not stat.S_ISREG(st.st_mode) or st.st_nlink > 1):
        with path.open(**how) as fh:
            yield fh
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=".tmp")
    except OSError as e:  # name the file the user asked for, not the temporary one
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, **how) as fh:
            yield fh
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        else:  # mkstemp's 0600: give the mode a plain open would (0666 less the umask)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename == tmp:
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left only when the write failed


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically (:func:`atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``Path(path).write_bytes(data)``, atomically (:func:`atomic_open`)."""
    with atomic_open(path, binary=True) as fh:
        fh.write(data)


def finite_json(obj):
    """``obj`` with every NaN or infinite float (Python's or NumPy's) replaced by None, and where they were.

    Returns:
        (the copy, {path: ``nan``, ``inf`` or ``-inf``}), a path being the keys and list positions joined by dots
        (``train_loss``, ``methods.gradcam.deletion_curve.3``).
    """
    where: dict[str, str] = {}

    def clean(value, path: str):
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            where[path] = str(float(value))  # nan, inf, -inf
            return None
        return value

    return clean(obj, ""), where


def json_text(obj, indent: int | None = None, default=None) -> str:
    """``json.dumps(obj)`` as standard JSON, which strict parsers and ``jq`` read: NaN and infinities, which
    Python's json writes as the non-standard ``NaN`` and ``Infinity``, become ``null`` (:func:`finite_json`).
    ``allow_nan=False``: a non-finite value that slipped through raises instead of being written."""
    return json.dumps(finite_json(obj)[0], indent=indent, default=default, allow_nan=False)


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Remove the temporary files a killed process left in ``folder`` (only this module's)."""
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*.tmp"):
        tmp.unlink(missing_ok=True)
