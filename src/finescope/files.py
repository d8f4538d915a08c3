"""Files written whole or not at all, so that a process killed mid-write (or a full disk) never leaves a
truncated result that a later command reads as complete."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_PREFIX = ".finescope-"  # temporary files: ``.finescope-XXXXXXXX.tmp`` beside their target
# a file name that is not UTF-8 (Latin-1 names from an old archive) is a str with surrogates on Linux: written
# back as its own bytes, and read back (errors=ERRORS) as the same str, so that paths in a CSV still match
ERRORS = "surrogateescape"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """A UTF-8 text file for writing (names that are not UTF-8 as their bytes: :data:`ERRORS`) that appears at
    ``path`` only once complete: written under a temporary name in the same folder, then renamed over ``path``, so
    the previous file (or none) stays until then; an existing file keeps its permissions. A ``path`` that is a link (symbolic or hard, such as ``/dev/stdout``)
    or not a regular file (a pipe) is written through, directly, as ``open`` would."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:  # not there yet
        st = None
    if st is not None and (path.is_symlink() or not stat.S_ISREG(st.st_mode) or st.st_nlink > 1):
        with path.open("w", newline=newline, encoding="utf-8", errors=ERRORS) as fh:
            yield fh
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=".tmp")
    except OSError as e:  # name the file the user asked for, not the temporary one
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "w", newline=newline, encoding="utf-8", errors=ERRORS) as fh:
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


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Remove the temporary files a killed process left in ``folder`` (only this module's)."""
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*.tmp"):
        tmp.unlink(missing_ok=True)
