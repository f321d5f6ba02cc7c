"""Where a run's raw events go (``--events FILE``, ``--events -``, ``--print``), on one loop or over workers.

:class:`EventOutputs` says it once for both ways of running.  On one loop
(:meth:`EventOutputs.open_here`) the sinks write from this process, as before.  Over worker
processes (:meth:`EventOutputs.share`) the parent opens the events file once (private, truncated)
and hands each worker a dup of it, of its own stdout, and a lock file: every worker writes its
hosts' lines itself, straight into the one file (or stdout), each flush one locked append of
whole lines (events.SharedFd).

Why the workers write and not the parent: the event bytes are the bulk of what a run moves
(~200 bytes a JSON line; bench/ingest_ssh.py streams ~10^6 lines/s over two workers). Sent in
frames to the parent they would cost a pickle, a pipe copy, an unpickle and the parent's own
write per byte, on a parent that shares the cores with the workers; appended by the parent from
per-worker part files they would be written and read twice, and a killed parent would leave the
parts as the only copy.  A locked append costs each worker two ``lockf`` calls per flush (once a
second, at 1 MiB, at a host's end: what one loop already did) and the parent nothing; a killed
parent leaves the file whole, every line up to the workers' last flush (they stop when their
stdin, the parent's pipe, ends, and flush then).

What holds either way: a host's lines in its kernel's order (a host is in one worker), whole
lines only, flushed at least once a second (files) or at every batch (stdout).
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from fleetprobe.events import EventWriter, SharedFd, _open_private_fd, cut_to_whole_lines
from fleetprobe.parse import EventSink
from fleetprobe.render.eventlines import Tee

#: ``--print``'s printer: called as ``printer(stream, on_closed=...)`` (a class or a functools.partial
#: of one: it is pickled for the workers).
PrinterFactory = Callable[..., EventSink]


@dataclass
class EventOutputs:
    """The raw-event destinations of one run (none of them: no raw events are written)."""

    #: ``--events FILE``, or the store's temporary file (JSON lines).
    path: str | None = None
    #: ``--events -``: JSON lines on stdout.
    stdout_json: bool = False
    #: ``--print``: lines for people on stdout.
    printer: PrinterFactory | None = None
    #: Called once when the reader of stdout goes away (``| head``); stays in this process.
    on_stdout_closed: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def any(self) -> bool:
        """Whether any raw event is written anywhere."""
        return bool(self.path or self.stdout_json or self.printer)

    def open_here(self) -> Opened:
        """The sinks, writing from this process (the single loop)."""
        return _open(self, None, self.on_stdout_closed)

    def share(self) -> Shared:
        """Open what the workers will share: the events file (0600, truncated), a lock, stdout."""
        fds: list[int] = []
        try:
            lock = tempfile.TemporaryFile(prefix="fleetprobe-events-lock-")
            lock_fd = os.dup(lock.fileno())
            lock.close()
            fds.append(lock_fd)
            events_fd = _open_private_fd(Path(self.path), readable=True) if self.path else None
            if events_fd is not None:
                fds.append(events_fd)
            stdout_fd = os.dup(sys.stdout.fileno()) if self.stdout_json or self.printer else None
            if stdout_fd is not None:
                fds.append(stdout_fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds:
            os.set_inheritable(fd, True)
        stream = sys.stdout
        return Shared(lock_fd=lock_fd, path=self.path, events_fd=events_fd, stdout_fd=stdout_fd,
                      stdout_json=self.stdout_json, printer=self.printer,
                      encoding=getattr(stream, "encoding", None) or "utf-8",
                      errors=getattr(stream, "errors", None) or "strict")


@dataclass
class Shared:
    """What a worker gets (pickled with its job): inherited descriptors and how to write on them."""

    lock_fd: int
    path: str | None
    events_fd: int | None
    stdout_fd: int | None
    stdout_json: bool
    printer: PrinterFactory | None
    encoding: str
    errors: str

    @property
    def fds(self) -> tuple[int, ...]:
        """The descriptors a worker must inherit."""
        return tuple(fd for fd in (self.lock_fd, self.events_fd, self.stdout_fd) if fd is not None)

    def open_in_worker(self, on_stdout_closed: Callable[[], None]) -> Opened:
        """The worker's sinks on the inherited descriptors."""
        return _open(EventOutputs(self.path, self.stdout_json, self.printer), self, on_stdout_closed)

    def settle(self) -> int | None:
        """After a worker died: the events file cut back to whole lines (it may have died in the middle of
        a write), and the lines in it (what the workers' own counts cannot say); None without a file."""
        if self.events_fd is None:
            return None
        fd = self.events_fd
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            end = cut_to_whole_lines(fd, end) if end else 0
            lines, at = 0, 0
            while at < end:
                block = os.pread(fd, min(1 << 20, end - at), at)
                if not block:
                    break
                lines += block.count(b"\n")
                at += len(block)
            return lines
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """The parent's copies (the workers hold their own)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


class LockedText:
    """A text stream for ``--print`` in a worker: each flush one locked append of whole lines."""

    def __init__(self, shared: SharedFd, encoding: str, errors: str) -> None:
        """Write on ``shared.fd`` (a dup of the parent's stdout)."""
        self.shared = shared
        self.fd = os.dup(shared.fd)
        self.encoding, self.errors = encoding, errors
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        """Queue (the printer flushes after every batch, whole lines)."""
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        """Write what is queued; BrokenPipeError when the reader is gone (the printer handles it)."""
        if self._pending:
            data = "".join(self._pending).encode(self.encoding, self.errors)
            self._pending = []
            self.shared.append(self.fd, data)

    def close(self) -> None:
        """Close our dup."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Opened:
    """The sinks of one process: the one to give run_fleet, and the writers whose counts the report takes."""

    sink: EventSink | None
    file: EventWriter | None = None
    stdout: EventWriter | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def counted(self) -> EventWriter | None:
        """The user's destination: ``--events -`` when given, else the file."""
        return self.stdout or self.file

    def close(self) -> None:
        """Flush and close everything (idempotent)."""
        for close in self.closers:
            close()
        self.closers = []


def _open(out: EventOutputs, shared: Shared | None, on_closed: Callable[[], None] | None) -> Opened:
    """The sinks of ``out``: here (``shared`` None) or on a worker's inherited descriptors."""
    opened = Opened(None)
    sinks: list[EventSink] = []
    try:
        if out.path:
            fd = shared.events_fd if shared is not None else None
            opened.file = EventWriter(out.path, shared=SharedFd(fd, shared.lock_fd)
                                      if shared is not None and fd is not None else None)
            opened.closers.append(opened.file.close)
            sinks.append(opened.file)
        stdout = SharedFd(shared.stdout_fd, shared.lock_fd) if shared is not None and shared.stdout_fd is not None \
            else None
        if out.stdout_json:
            opened.stdout = EventWriter("-", on_closed=on_closed, shared=stdout)
            opened.closers.append(opened.stdout.close)
            sinks.append(opened.stdout)
        if out.printer is not None:
            if stdout is not None and shared is not None:
                text = LockedText(stdout, shared.encoding, shared.errors)
                opened.closers.append(text.close)
                stream = cast(IO[str], text)
            else:
                stream = sys.stdout
            printer = out.printer(stream, on_closed=on_closed)
            close: Callable[[], None] | None = getattr(printer, "close", None)
            if close is not None:
                opened.closers.insert(0, close)
            sinks.append(printer)
    except BaseException:
        opened.close()
        raise
    opened.sink = sinks[0] if len(sinks) == 1 else Tee(*sinks) if sinks else None
    return opened
