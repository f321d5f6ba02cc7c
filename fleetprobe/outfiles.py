"""Writing the files fleetprobe produces (reports, events, plans) safely, as root, in shared folders.

Reports and events hold what hosts printed (typed lines, paths, process names): they are
created 0600 unless the caller asks otherwise. A report is written whole to a temporary
file made with ``mkstemp`` in the target's folder (exclusive creation, unpredictable name)
and renamed over the target, so a reader never sees half a report and a planted symlink at
a predictable temporary name cannot make root write elsewhere. A file written as it grows
(``--events``) is opened without following a symlink at its final component.
``-`` means standard output everywhere.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: Mode of every report and events file fleetprobe creates.
PRIVATE = 0o600


def write_atomic(target: str | os.PathLike[str], write: Callable[[IO[str]], object], *,
                 mode: int = PRIVATE) -> None:
    """Write a text file through ``write(f)`` into a fresh temporary file, then rename it to ``target``."""
    if str(target) == "-":
        write(sys.stdout)
        sys.stdout.flush()
        return
    path = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(target: str | os.PathLike[str], text: str, *, mode: int = PRIVATE) -> None:
    """:func:`write_atomic` of one string."""
    write_atomic(target, lambda f: f.write(text), mode=mode)


def open_private(path: str | os.PathLike[str], *, buffering: int = -1, mode: int = PRIVATE) -> IO[str]:
    """A new (or truncated) text file for writing, ``mode`` 0600, never through a symlink; ``-`` is stdout."""
    if str(path) == "-":
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=buffering)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        return os.fdopen(fd, "w", encoding="utf-8", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise
