"""Where a run's raw events go (``--events FILE``, ``--events -``, ``--print``): one loop, workers, a cluster.

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

Over a Dask cluster (:meth:`EventOutputs.forward`) a task's writers cannot reach the client's file:
each flush of whole lines goes to the task's sender (fleetprobe.cluster), through the scheduler, and
the client writes it with one loop's writers (:meth:`EventOutputs.receive`).

What holds every way: a host's lines in its kernel's order (a host is in one worker), whole
lines only, flushed at least once a second (files) or at every batch (stdout).
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
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
        return _open(self, _Here(), self.on_stdout_closed)

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
        return Shared(lock_fd, self.path, events_fd, stdout_fd, self.stdout_json, self.printer, *_stdout_encoding())

    def forward(self) -> Forwarded:
        """What a cluster task gets: the same sinks, their lines sent to the client (see :meth:`receive`)."""
        return Forwarded(self.path, self.stdout_json, self.printer, *_stdout_encoding())

    def receive(self) -> Received:
        """The client's writers of what cluster tasks send: the events file (0600, truncated), stdout."""
        return Received(self)


def _stdout_encoding() -> tuple[str, str]:
    """How this process's stdout encodes text (``--print`` away from it encodes the same way)."""
    return getattr(sys.stdout, "encoding", None) or "utf-8", getattr(sys.stdout, "errors", None) or "strict"


#: The two destinations of a cluster task's lines: the events file, stdout (``--events -`` or ``--print``).
FILE, STDOUT = "file", "stdout"


@dataclass
class Forwarded:
    """What a cluster task gets (pickled with its job): the run's outputs; ``send`` is set in the task
    (its sender: fleetprobe.cluster), each flush of whole lines is ``send(FILE or STDOUT, lines, events)``."""

    path: str | None
    stdout_json: bool
    printer: PrinterFactory | None
    encoding: str
    errors: str
    send: Callable[[str, bytes, int], None] | None = field(default=None, repr=False)

    def open_in_worker(self, on_stdout_closed: Callable[[], None]) -> Opened:
        """The task's sinks (the reader of stdout going away is seen by the client, not here)."""
        assert self.send is not None, "Forwarded.send is set in the task"
        return _open(EventOutputs(self.path, self.stdout_json, self.printer),
                     _ToClient(self.send, self.encoding, self.errors), None)


class Received:
    """The client's side of a cluster run's lines: each piece written at once, whole lines, in the one
    events file or on stdout; counted (and stopped at a write error) as one loop's writers are."""

    def __init__(self, out: EventOutputs) -> None:
        """Open the file (as one loop does) and stdout if the run writes there."""
        self.file = EventWriter(out.path) if out.path else None
        try:
            self.stdout = EventWriter("-", on_closed=out.on_stdout_closed) \
                if out.stdout_json or out.printer is not None else None
        except BaseException:
            if self.file is not None:
                self.file.close()
            raise
        self._counted = self.stdout if out.stdout_json else self.file

    def take(self, stream: str, data: bytes, events: int) -> None:
        """One piece of whole lines from a task."""
        writer = self.file if stream == FILE else self.stdout if stream == STDOUT else None
        if writer is not None:
            writer.write_encoded(data, events)

    @property
    def counted(self) -> EventWriter | None:
        """The user's destination: ``--events -`` when given, else the file."""
        return self._counted

    def close(self) -> None:
        """Close both (idempotent)."""
        for writer in (self.file, self.stdout):
            if writer is not None:
                writer.close()


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
        return _open(EventOutputs(self.path, self.stdout_json, self.printer), _OnShared(self), on_stdout_closed)

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


class WholeLines:
    """A text stream for ``--print`` away from this process's stdout: each flush hands the whole lines
    written since to ``append`` (a worker's locked append, a cluster task's send to the client)."""

    def __init__(self, append: Callable[[bytes], None], encoding: str, errors: str,
                 close: Callable[[], None] | None = None) -> None:
        """Encode as the parent's stdout does; ``close`` is called once by :meth:`close`."""
        self._append, self._close = append, close
        self.encoding, self.errors = encoding, errors
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        """Queue (the printer flushes after every batch, whole lines)."""
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        """Hand on what is queued; BrokenPipeError when stdout's reader is gone (the printer handles it)."""
        if self._pending:
            data = "".join(self._pending).encode(self.encoding, self.errors)
            self._pending = []
            self._append(data)

    def close(self) -> None:
        """Call ``close`` (once)."""
        close, self._close = self._close, None
        if close is not None:
            close()


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


class _Here:
    """Sinks writing from this process (one loop)."""

    def file(self, path: str) -> EventWriter:
        """The events file."""
        return EventWriter(path)

    def stdout(self, on_closed: Callable[[], None] | None) -> EventWriter:
        """``--events -``."""
        return EventWriter("-", on_closed=on_closed)

    def text(self) -> tuple[IO[str], Callable[[], None] | None]:
        """``--print``'s stream, and what closes it."""
        return sys.stdout, None


@dataclass
class _OnShared:
    """Sinks of a worker process, on the descriptors it inherited (each flush one locked append)."""

    shared: Shared

    def file(self, path: str) -> EventWriter:
        """The one events file."""
        assert self.shared.events_fd is not None
        return EventWriter(path, shared=SharedFd(self.shared.events_fd, self.shared.lock_fd))

    def stdout(self, on_closed: Callable[[], None] | None) -> EventWriter:
        """``--events -`` on the parent's stdout."""
        assert self.shared.stdout_fd is not None
        return EventWriter("-", on_closed=on_closed, shared=SharedFd(self.shared.stdout_fd, self.shared.lock_fd))

    def text(self) -> tuple[IO[str], Callable[[], None] | None]:
        """``--print`` on the parent's stdout."""
        assert self.shared.stdout_fd is not None
        out = SharedFd(self.shared.stdout_fd, self.shared.lock_fd)
        fd = os.dup(out.fd)
        text = WholeLines(partial(out.append, fd), self.shared.encoding, self.shared.errors, partial(os.close, fd))
        return cast(IO[str], text), text.close


@dataclass
class _ToClient:
    """Sinks of a cluster task: every flush is ``send(stream, whole lines, events)`` (see Forwarded)."""

    send: Callable[[str, bytes, int], None]
    encoding: str
    errors: str

    def file(self, path: str) -> EventWriter:
        """Lines for the client's events file."""
        return EventWriter(path, forward=partial(self.send, FILE))

    def stdout(self, on_closed: Callable[[], None] | None) -> EventWriter:
        """Lines for the client's stdout (its reader going away is the client's to see)."""
        return EventWriter("-", forward=partial(self.send, STDOUT))

    def text(self) -> tuple[IO[str], Callable[[], None] | None]:
        """``--print``'s text for the client's stdout (not events: the report counts JSON lines)."""
        text = WholeLines(lambda data: self.send(STDOUT, data, 0), self.encoding, self.errors)
        return cast(IO[str], text), None


def _open(out: EventOutputs, to: _Here | _OnShared | _ToClient, on_closed: Callable[[], None] | None) -> Opened:
    """The sinks of ``out``, made by ``to`` (here, on a worker's inherited descriptors, or toward the client)."""
    opened = Opened(None)
    sinks: list[EventSink] = []
    try:
        if out.path:
            opened.file = to.file(out.path)
            opened.closers.append(opened.file.close)
            sinks.append(opened.file)
        if out.stdout_json:
            opened.stdout = to.stdout(on_closed)
            opened.closers.append(opened.stdout.close)
            sinks.append(opened.stdout)
        if out.printer is not None:
            stream, close_stream = to.text()
            if close_stream is not None:
                opened.closers.append(close_stream)
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
