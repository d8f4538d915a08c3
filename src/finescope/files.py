"""Files written whole or not at all, so that a process killed mid-write (or a full disk) never leaves a
truncated result that a later command reads as complete."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """A UTF-8 text file for writing that appears at ``path`` only once complete: written under a temporary
    name in the same folder, then renamed over ``path``, so the previous file (or none) stays until then. A
    ``path`` that exists and is not a regular file (``/dev/stdout``, a pipe) is written directly."""
    path = Path(path)
    try:
        special = not stat.S_ISREG(path.stat().st_mode)
    except OSError:  # not there yet
        special = False
    if special:
        with path.open("w", newline=newline, encoding="utf-8") as fh:
            yield fh
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", newline=newline, encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the write failed


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically (:func:`atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(text)
