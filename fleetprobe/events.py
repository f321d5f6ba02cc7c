"""Events: the raw-event sink (``--events``): every event a run kept, one JSON object per line.

Hot path: :meth:`EventWriter.write_batch` formats a whole batch of the stream's rows at once from
the strings the kernel printed, with caches; ``tests/test_event_writer_equivalence.py`` checks it
writes the same bytes as the exact one-event-at-a-time path.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from types import TracebackType

from fleetprobe.parse import EventBatch
from fleetprobe.traceline import TraceEvent, parse_fields, parse_value, split_event
from fleetprobe.outfiles import PRIVATE

#: JSON exactly as ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` writes it, without
#: building an encoder per call.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
#: A str as a JSON string literal, as that encoder writes it (C-accelerated).
_encode_str: Callable[[str], str] = json.encoder.encode_basestring
#: Trace timestamps whose float repr is the text without trailing zeros: >= 1, at most 15 digits.
_PLAIN_TS = re.compile(r"(?:[1-9][0-9]{0,8}\.[0-9]{1,6}\n)*[1-9][0-9]{0,8}\.[0-9]{1,6}")
_COMM = itemgetter(0)
_PID_TEXT = itemgetter(1)
_CPU_TEXT = itemgetter(2)
_TS_TEXT = itemgetter(3)
_EVENT_TEXT = itemgetter(4)
#: A writer writes what it holds once it holds this much, or once it is this old (issue 11 #16).
FLUSH_BYTES = 1 << 20
FLUSH_SECONDS = 1.0
#: Distinct event texts (and comms) whose JSON a writer remembers.
EVENT_TAIL_CACHE = 4096


def _fields_json(values: Mapping[str, int | str]) -> str:
    """``fields`` as _encode_json writes it: parse_value gives only ints (repr) and strs."""
    return "{" + ",".join([f"{_encode_str(k)}:{v}" if isinstance(v, int) else f"{_encode_str(k)}:{_encode_str(v)}"
                           for k, v in values.items()]) + "}"


class _Tokens(dict[str, "tuple[str, str] | None"]):
    """One ``name=value`` token -> (name, its JSON member ``"name":value``), None if not that simple; bounded."""

    def __missing__(self, tok: str) -> tuple[str, str] | None:
        """Convert a token not seen lately, as split_args and parse_value would."""
        if len(self) >= EVENT_TAIL_CACHE:
            self.clear()
        name, eq, value = tok.partition("=")
        member: tuple[str, str] | None = None
        if eq and name:
            if value.isdigit() and value.isascii() and value[0] != "0" and len(value) < 20:
                # A pid or a count: parse_value's int, which JSON writes as printed.
                member = (name, f"{_encode_str(name)}:{value}")
            else:
                v = parse_value(value)
                member = (name, f"{_encode_str(name)}:{v}" if isinstance(v, int) else
                          f"{_encode_str(name)}:{_encode_str(v)}")
        self[tok] = member
        return member


_NAME = itemgetter(0)
_MEMBER = itemgetter(1)


class _EventTails(dict[str, str]):
    """Event text (``name: args``) -> the end of its JSON line (site and fields), bounded like parse's names.

    Texts with a pid or an address in them are all different; their tokens
    (``filename=/bin/sh``, ``pid=7``) repeat, so a text of plain distinct
    ``name=value`` tokens is put together from remembered tokens, and any
    other text (quotes, a value with a space, a name twice) is parsed whole.
    """

    def __init__(self) -> None:
        """Empty caches."""
        super().__init__()
        self._tokens = _Tokens()

    def __missing__(self, text: str) -> str:
        """Parse and encode a text not seen lately."""
        if len(self) >= EVENT_TAIL_CACHE:
            self.clear()
        tail = self[text] = f"{self._fields(split_event(text)[1])}}}\n"
        return tail

    def _fields(self, args: str) -> str:
        """``,"site":...,"fields":{...}`` for one argument text (see parse.split_args)."""
        site = ""
        rest = args
        if args.startswith("("):
            close = args.find(") ")
            if close >= 0:
                site, rest = args[1:close], args[close + 2:]
            else:
                rest = '"'  # the rare forms: the whole parse below
        if '"' not in rest:
            if not rest:
                return f',"site":{_encode_str(site)},"fields":{{}}'
            members = list(map(self._tokens.__getitem__, rest.split(" ")))
            if None not in members:
                names = list(map(_NAME, members))  # type: ignore[arg-type]
                if len(set(names)) == len(names):
                    return (f',"site":{_encode_str(site)},"fields":{{'
                            f'{",".join(map(_MEMBER, members))}}}')  # type: ignore[arg-type]
        site, values = parse_fields(args)
        return f',"site":{_encode_str(site)},"fields":{_fields_json(values)}'


class _Encoded(dict[str, str]):
    """str -> its JSON string literal, for columns whose values repeat (comms); bounded."""

    def __missing__(self, text: str) -> str:
        """Encode a string not seen lately."""
        if len(self) >= EVENT_TAIL_CACHE:
            self.clear()
        literal = self[text] = _encode_str(text)
        return literal


class _IntText(dict[str, str]):
    """A column of decimal digits (cpu) -> how JSON writes the int (no leading zeros, ASCII digits)."""

    def __missing__(self, digits: str) -> str:
        """Convert digits not seen yet (a host has few cpus; bounded anyway)."""
        if len(self) >= EVENT_TAIL_CACHE:
            self.clear()
        text = self[digits] = str(int(digits))
        return text


class EventWriter:
    """Every event as one JSON line, written as it comes (raw events go to disk, never kept in memory).

    Use as a context manager; pass :meth:`write_batch` as a TraceStream's
    ``on_batch`` (or :meth:`write` as its ``on_event``).  A line is
    ``json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False)``
    whichever way the event came; from a batch it is built from the strings
    the kernel printed, and an argument text seen lately is parsed and
    encoded only once.
    """

    def __init__(self, path: str | os.PathLike[str], *, on_closed: Callable[[], None] | None = None,
                 shared: SharedFd | None = None, forward: Callable[[bytes, int], None] | None = None) -> None:
        """Open ``path`` for writing (truncates); ``-`` is standard output (``--events -``).

        Standard output is written at every batch, not once a second: a reader of the pipe
        (``--events - | jq``) sees events as they come.  When that reader goes away (EPIPE),
        ``on_closed`` is called once (the CLI ends the run there).

        ``shared``: write to that descriptor instead of opening ``path`` (named in errors), which
        other processes write too (the worker processes of one run, see fleetprobe.workers): each
        flush is one locked append of whole lines, so lines never interleave.

        ``forward``: open nothing; each flush is ``forward(whole lines, events)`` (a cluster task's
        lines go to the client, which writes them: see fleetprobe.eventout).
        """
        self.on_closed = on_closed
        self.path = Path(path)
        #: Events handed to the writer (written, waiting, or dropped after a write error).
        self.count = 0
        #: Events on disk, whole lines only.
        self.written = 0
        #: Why the file stopped growing (a full disk, a file size limit), or "" while it grows.
        self.error = ""
        #: Events dropped after ``error``.
        self.dropped = 0
        self._shared = shared
        self._forward = forward
        # -1: open, with nowhere of its own to write (``forward``); None: closed.
        self._fd: int | None = -1 if forward is not None else os.dup(shared.fd) if shared is not None \
            else _open_private_fd(self.path)
        # Our own buffer of whole lines (an io buffer would write a half line when it fills: a killed
        # controller would leave one, and a full disk another): flushed at FLUSH_BYTES, every
        # FLUSH_SECONDS (see flush_due) and at every host's end.
        self._pending: list[str] = []
        self._pending_events = 0
        self._pending_len = 0
        self._size = 0
        self._last_flush = time.monotonic()
        self._eager = str(path) == "-"
        self._tails = _EventTails()
        self._comms = _Encoded()
        self._cpus = _IntText()

    def _add(self, text: str, events: int) -> None:
        """Queue whole lines (``events`` of them) for the next flush."""
        self.count += events
        if self.error:
            self.dropped += events
            return
        self._pending.append(text)
        self._pending_events += events
        self._pending_len += len(text)
        if self._eager or self._pending_len >= FLUSH_BYTES or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush_due(self) -> None:
        """Flush if the last flush is FLUSH_SECONDS old (called by a timer: events may stop coming)."""
        if self._pending and time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write every queued line. On a write error (ENOSPC, EFBIG, ...) the file is cut back to its
        last whole line and the writer stops: the run goes on, its report says the events stopped."""
        self._last_flush = time.monotonic()
        if not self._pending or self._fd is None:
            return
        data = "".join(self._pending).encode("utf-8", "replace")
        events = self._pending_events
        self._pending, self._pending_events, self._pending_len = [], 0, 0
        self._emit(data, events)

    def write_encoded(self, data: bytes, events: int) -> None:
        """Append ``data``, whole lines already encoded (``events`` of them: a cluster task's, on the
        client), after what is queued; written at once, and counted as the writer's own lines are."""
        if self._fd is None:
            raise ValueError(f"{self.path}: event writer is closed")
        self.flush()
        self.count += events
        if self.error:
            self.dropped += events
            return
        self._emit(data, events)

    def _emit(self, data: bytes, events: int) -> None:
        """Write ``data`` (whole lines); on a write error cut back to the last whole line and stop."""
        assert self._fd is not None
        if self._forward is not None:
            self._forward(data, events)
            self.written += events
            return
        try:
            if self._shared is not None:
                self._shared.append(self._fd, data)
            else:
                _write_all(self._fd, data)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror or exc} after {self.written} events"
            if isinstance(exc, BrokenPipeError) and self.on_closed is not None:
                self.on_closed()
            self.dropped += events
            if self._shared is None:
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    pass
            return
        self._size += len(data)
        self.written += events

    def write(self, ev: TraceEvent) -> None:
        """Append one event."""
        if self._fd is None:
            raise ValueError(f"{self.path}: event writer is closed")
        data = ev.to_json()
        try:
            text = _encode_json(data)
        except ValueError:
            # inf/nan (a host's clock or numbers out of range): null, never "Infinity" (not JSON).
            text = _encode_json(_finite(data))
        self._add(text + "\n", 1)

    def write_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Append every row of ``host``'s batch, in order (one write for the batch)."""
        if self._fd is None:
            raise ValueError(f"{self.path}: event writer is closed")
        rows = batch.rows
        if not rows:
            return
        slope, intercept = batch.slope, batch.intercept
        trace_ts = list(map(float, map(_TS_TEXT, rows)))
        times = [ts * slope + intercept for ts in trace_ts]
        if not math.isfinite(sum(trace_ts) + sum(times)):
            # inf/nan (or sums past the float range): the encoder spells those its own way.
            for ev in batch.events(probes):
                self.write(_row_event(host, ev))
            return
        heads = {name: f'{{"host":{_encode_str(host)},"probe":{_encode_str(probes[name])},"time":'
                 for name in batch.counts}
        ts_texts = list(map(_TS_TEXT, rows))
        if _PLAIN_TS.fullmatch("\n".join(ts_texts)):
            # At most 15 significant digits and >= 1: the float's repr is the printed number without its
            # trailing zeros (DBL_DIG = 15 digits round-trip; no shorter string reads as the same float).
            stripped = "\n".join(map(str.rstrip, ts_texts, repeat("0"))).replace(".\n", ".0\n")
            ts_json = (stripped + "0" if stripped.endswith(".") else stripped).split("\n")
        else:
            ts_json = list(map(repr, trace_ts))
        # Before the first clock marker an event's time is its trace timestamp (ts * 1.0 + 0.0 == ts).
        time_json = ts_json if slope == 1.0 and intercept == 0.0 else list(map(repr, times))
        pids = list(map(_PID_TEXT, rows))
        joined = "\n" + "\n".join(pids)
        if "\n0" in joined or not joined.isascii():
            # A pid printed with leading zeros or in other digits: JSON has the int.
            pids = list(map(str, map(int, pids)))
        tails, comms, cpus = self._tails, self._comms, self._cpus
        self._add("".join([
            f'{head}{time},"trace_ts":{ts},"cpu":{cpus[cpu]},"pid":{pid},"comm":{comms[comm]}{tails[text]}'
            for head, time, ts, (comm, _, cpu, _, text), pid
            in zip(map(heads.__getitem__, batch.names), time_json, ts_json, rows, pids)]), len(rows))

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._fd is not None:
            self.flush()
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventWriter:
        """Context manager entry."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close on exit."""
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (os.write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass(frozen=True)
class SharedFd:
    """A descriptor several processes append whole lines to, and the lock file they take turns by.

    Both descriptors are inherited from the parent (a worker never reopens the events file by its
    path, which could be swapped under it).  The lock is a POSIX record lock on a file of its own
    (``lockf``: owned per process, so processes sharing one inherited descriptor still exclude each
    other; a pipe or terminal takes no lock itself).
    """

    fd: int
    lock_fd: int

    def append(self, fd: int, data: bytes) -> None:
        """``data`` (whole lines) on ``fd`` (a dup of ``self.fd``) in one turn: at the end of a regular
        file, cut back to where it was on a write error (ENOSPC): no half line, whoever wrote before."""
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
        try:
            try:
                start: int | None = os.lseek(fd, 0, os.SEEK_END)
            except OSError:
                start = None  # a pipe or a terminal: no offset
            if start:
                start = cut_to_whole_lines(fd, start)
            try:
                _write_all(fd, data)
            except OSError:
                if start is not None:
                    try:
                        os.ftruncate(fd, start)
                        os.lseek(fd, start, os.SEEK_SET)
                    except OSError:
                        pass
                raise
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)


def cut_to_whole_lines(fd: int, size: int) -> int:
    """The file's size once cut back to its last whole line (a writer killed in the middle of a write,
    whose lock died with it, leaves part of its last line): what follows starts on a line of its own.
    A descriptor that cannot be read (O_WRONLY) is left as it is."""
    try:
        if os.pread(fd, 1, size - 1) == b"\n":
            return size
        end = size
        while end > 0:
            begin = max(0, end - 65536)
            block = os.pread(fd, end - begin, begin)
            nl = block.rfind(b"\n")
            if nl >= 0:
                end = begin + nl + 1
                break
            end = begin
        os.ftruncate(fd, end)
        os.lseek(fd, end, os.SEEK_SET)
        return end
    except OSError:
        return size


def _finite(data: dict[str, object]) -> dict[str, object]:
    """``data`` (an event's JSON dict) with every non-finite float, top level or in fields, as None."""
    def fix(v: object) -> object:
        return None if isinstance(v, float) and not math.isfinite(v) else v
    out = {k: fix(v) for k, v in data.items()}
    fields = data.get("fields")
    if isinstance(fields, dict):
        out["fields"] = {k: fix(v) for k, v in fields.items()}
    return out


def _open_private_fd(path: Path, *, readable: bool = False) -> int:
    """A raw descriptor for :func:`fleetprobe.outfiles.open_private`'s file (0600, never through a
    symlink; ``-`` is standard output): the writer buffers whole lines itself.  ``readable``: open it
    read-write (a shared file is checked for a cut last line, see cut_to_whole_lines)."""
    if str(path) == "-":
        return os.dup(sys.stdout.fileno())
    fd = os.open(path, (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE)
    try:
        os.fchmod(fd, PRIVATE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _row_event(host: str, ev: tuple[str, float, float, int, int, str, str]) -> TraceEvent:
    """A TraceEvent from one of :meth:`EventBatch.events`'s tuples (the writer's rare exact path)."""
    probe, trace_ts, time, cpu, pid, comm, args = ev
    site, values = parse_fields(args)
    return TraceEvent(host, probe, time, trace_ts, cpu, pid, comm, values, site, args)
