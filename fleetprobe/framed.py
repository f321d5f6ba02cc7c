"""A sealed stream's slow path: lines in order, each sealed record put back together (issue 11 #2).

In a sealed run every line of a ``sealed`` probe ends with the run's seal (cut to
:data:`~fleetprobe.traceline.SEALED` by the stream), which only the kernel prints.
:class:`fleetprobe.parse.TraceStream` takes a chunk whose lines are all whole trace heads,
each sealed where its event is, in one ``findall`` (its fast path); any other chunk comes
here, line by line: a record that a user's newline split, a comm holding a newline, a
control, loss or garbage line.

At a record boundary a line is a control or loss line, a trace head (the kernel's: the
line before it ended an event), or the first part of a comm that holds a newline. A
sealed event's record runs to the line that ends with its seal; everything in between
(newlines, whole trace lines, control-looking text a user chose) is that event's text,
newlines escaped as ``\\n``. A guarded event's line is whole. An unframed event's
continuation lines are folded into it.

Not the hot path: a run's stream comes here only for chunks that hold something other
than whole sealed events (the framing check of bench/ingest.py ``--sealed`` never does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

from fleetprobe.traceline import (HEAD, LINE_RE, LINE_TOO_BIG, LOSS_RE, MAX_LINE_BYTES, MIN_TRACE_NAME, SEALED, Row,
                                  kernel_head,
                                  split_event)

# A sealed record's head: as HEAD, but the comm may hold newlines (a user's prctl(PR_SET_NAME)).
_RECORD_RE = re.compile("(?s)" + HEAD + r"([^: \n].*)")
#: A comm is at most 15 bytes, printed right-aligned in 16: a line before a sealed record's head
#: (the comm's part before its newline) is never longer.
MAX_COMM_PART = 16


class _Counts(Protocol):
    """The one counter of a stream's stats the framing keeps (see StreamStats.multiline)."""

    multiline: int


class FramedStream(Protocol):
    """What the framing hands its results to (:class:`fleetprobe.parse.TraceStream`)."""

    @property
    def stats(self) -> _Counts:
        """The stream's counters."""
        ...

    def _events(self, rows: list[Row], row_names: list[str] | None = None) -> None:
        """A run of event rows and their trace names."""
        ...

    def _other(self, line: str) -> None:
        """A control or loss line (or garbage)."""
        ...

    def _unparsed(self, line: str) -> None:
        """A line nothing could parse."""
        ...

    def _overlong(self) -> None:
        """A line dropped for its length."""
        ...


class SealedFraming:
    """The record state of one sealed stream across chunks, and the line-by-line reading of a chunk."""

    def __init__(self, stream: FramedStream, control_prefix: str, sealed: Iterable[str],
                 unframed: Iterable[str]) -> None:
        """Frame ``stream``'s lines: ``sealed`` trace names end at their seal, ``unframed`` ones may go on."""
        self._stream = stream
        self._prefix = control_prefix
        self.sealed = frozenset(sealed)
        self.unframed = frozenset(unframed)
        # A sealed record not ended yet (its lines so far), its length, and whether it is being
        # dropped for its length (then only its seal is waited for).
        self._record: list[str] | None = None
        self._record_len = 0
        self._record_drop = False
        # Lines at a record boundary that may be the start of a comm holding a newline (at most 16
        # bytes in all: the printed comm field), waiting for the rest of their head.
        self._head_parts: list[str] = []
        # The rows of the chunk being read (handed on at each other line and at the end).
        self._rows: list[Row] = []
        self._names: list[str] = []
        self._fold = False      # the last row is an unframed event that a non-head line continues
        self._folded = False    # ... and it was already continued (counted once in multiline)

    @property
    def at_boundary(self) -> bool:
        """True when no record and no comm is half read: the next line starts afresh."""
        return self._record is None and not self._head_parts

    def lines(self, lines: list[str]) -> None:
        """Whole lines of a chunk, in order (the stream flushes its batch after)."""
        self._rows, self._names, self._fold, self._folded = [], [], False, False
        sealed, prefix = self.sealed, self._prefix
        for line in lines:
            if self._record is not None:
                self._record_line(line)
            elif (line.endswith(SEALED) and not self._head_parts and not line.startswith((prefix, "CPU:"))
                  and (m := LINE_RE.match(line)) is not None):
                # The common line even here, a whole sealed event: _boundary_line's steps for it, inlined.
                name = split_event(m[5])[0]
                if name in sealed:
                    self._rows.append(m.groups())  # type: ignore[arg-type]
                    self._names.append(name)
                    self._fold = False
                else:
                    self._head(m, [line], line)
            elif line:
                self._boundary_line(line)
        self._flush()

    def close(self) -> None:
        """End of stream: a comm start or a record whose seal never came is no event."""
        stream = self._stream
        if self._head_parts:
            parts, self._head_parts = self._head_parts, []
            stream._unparsed("\\n".join(parts))
        if self._record is not None:
            # A sealed event whose seal never came (the stream was cut): not an event.
            record, self._record = self._record, None
            if self._record_drop:
                self._record_drop = False
                stream._overlong()
            else:
                stream._unparsed("\\n".join(record).replace(SEALED, ""))

    def _flush(self) -> None:
        """Hand the rows read so far to the stream (before a line that is not an event)."""
        if self._rows:
            self._stream._events(self._rows, self._names)
            self._rows, self._names = [], []

    def _record_line(self, line: str) -> None:
        """A line inside a sealed record: part of its text, unless it is the runner's own line."""
        stream = self._stream
        record = self._record
        assert record is not None
        if line.startswith(self._prefix):
            # The runner's own line (only its secret starts one), between two reads of a long line.
            self._flush()
            stream._other(line)
            return
        self._record_len += len(line) + 1
        if not self._record_drop:
            if self._record_len > MAX_LINE_BYTES:
                self._record_drop = True
                record.clear()
            else:
                record.append(line)
        if not line.endswith(SEALED):
            return
        self._record = None
        if self._record_drop:
            self._record_drop = False
            stream._overlong()
            return
        got = self._sealed_record(record)
        if got is None:
            self._flush()
            stream._unparsed("\\n".join(record).replace(SEALED, ""))
        else:
            self._rows.append(got[0])
            self._names.append(got[1])
        self._fold = False

    def _boundary_line(self, line: str) -> None:
        """A line at a record boundary: a head (maybe after a comm's first part), another line, or a stray."""
        head_lines = [line]
        m: re.Match[str] | None = None
        if self._head_parts:
            joined = self._comm_head(line)
            if joined is None:
                return
            m, head_lines = joined
        if m is None:
            if self._not_event(line):
                return
            m = LINE_RE.match(line)
        if m is not None:
            self._head(m, head_lines, line)
            return
        self._stray(line)

    def _comm_head(self, line: str) -> tuple[re.Match[str] | None, list[str]] | None:
        """After the first part(s) of a comm with a newline: (the whole head if it is one now, its lines).

        None when ``line`` is kept as a further part of the comm; (None, [line]) when the parts
        were no head after all (they are unparsed, and ``line`` is read afresh).
        """
        parts = self._head_parts
        m = _RECORD_RE.match("\n".join([*parts, line]))
        if m is not None:
            self._head_parts = []
            return m, [*parts, line]
        if len(line.encode("utf-8", "replace")) + sum(map(len, parts)) + len(parts) <= MAX_COMM_PART:
            parts.append(line)
            return None
        self._head_parts = []
        self._flush()
        self._stream._unparsed("\\n".join(parts))
        return None, [line]

    def _not_event(self, line: str) -> bool:
        """Take a control or loss line, or the kernel's stand-in for an overlong event; False for others."""
        if line.startswith(self._prefix) or (line.startswith("CPU:") and LOSS_RE.match(line)):
            self._flush()
            self._stream._other(line)
        elif line == LINE_TOO_BIG:
            # The kernel's own stand-in for an event longer than its print buffer.
            self._flush()
            self._stream._overlong()
        else:
            return False
        self._fold = False
        return True

    def _head(self, m: re.Match[str], head_lines: list[str], line: str) -> None:
        """A trace head at a record boundary: a whole event, the start of a sealed record, or misframed."""
        comm, pid_s, cpu_s, ts_s, ev_text = m.groups()
        name = split_event(ev_text)[0]
        if (len(name) < MIN_TRACE_NAME and name not in self.sealed
                and (row := self._kernels_sealed("\n".join(head_lines))) is not None):
            # A fake head inside a comm came first (issue 11): the kernel's names a sealed probe.
            (comm, pid_s, cpu_s, ts_s, ev_text), name = row
        stats = self._stream.stats
        if len(head_lines) > 1:
            # The printed comm is the pid's last saved one: a user's prctl(PR_SET_NAME) may have
            # put a newline in it, whatever the event's own filter said of the comm then.
            comm = comm.replace("\n", "\\n")
            stats.multiline += 1
        ends = ev_text.endswith(SEALED)
        if name in self.sealed:
            if ends:
                self._rows.append((comm, pid_s, cpu_s, ts_s, ev_text))
                self._names.append(name)
            else:
                self._record = head_lines
                self._record_len = sum(map(len, head_lines)) + len(head_lines)
                if len(head_lines) > 1:
                    stats.multiline -= 1      # counted once, when the record is whole
            self._fold = False
        elif ends:
            # The seal ends only sealed events' lines.
            self._flush()
            self._stream._unparsed(line.replace(SEALED, ""))
            self._fold = False
        else:
            self._rows.append((comm, pid_s, cpu_s, ts_s, ev_text))
            self._names.append(name)
            self._fold, self._folded = name in self.unframed, False

    def _stray(self, line: str) -> None:
        """A line that is no head: an unframed event's continuation, a comm's first part, or garbage."""
        rows = self._rows
        if self._fold and rows:
            comm, pid_s, cpu_s, ts_s, ev_text = rows[-1]
            if len(ev_text) + len(line) > MAX_LINE_BYTES:
                self._stream._overlong()
                return
            rows[-1] = (comm, pid_s, cpu_s, ts_s, ev_text + "\\n" + line)
            if not self._folded:
                self._stream.stats.multiline += 1
                self._folded = True
            return
        if len(line.encode("utf-8", "replace")) <= MAX_COMM_PART and not line.endswith(SEALED):
            # The start of a comm with a newline in it: its head goes on on the next line(s).
            self._head_parts = [line]
            return
        self._flush()
        self._stream._unparsed(line.replace(SEALED, ""))
        self._fold = False

    def _kernels_sealed(self, text: str) -> tuple[Row, str] | None:
        """The kernel's head of ``text`` (see traceline.kernel_head) and its name, if it names a sealed probe.

        A comm can hold a fake head (a user's prctl, or the name of a file they exec); with every
        sealed trace name too long to fit in one (traceline.MIN_TRACE_NAME), the fake names no probe,
        and the event is read at the kernel's head instead of being lost as unparsed.
        """
        row = kernel_head(text)
        if row is None:
            return None
        name = split_event(row[4].replace("\n", "\\n"))[0]
        return (row, name) if name in self.sealed else None

    def _sealed_record(self, record: list[str]) -> tuple[Row, str] | None:
        """A sealed record's lines (the last one sealed) as one row and its name, or None if it is no event.

        Its head is where the record starts (the kernel's); whatever the lines after it hold
        is the event's text, newlines escaped.
        """
        text = "\n".join(record)
        m = _RECORD_RE.match(text)
        if m is None:
            return None
        comm, pid_s, cpu_s, ts_s, ev_text = m.groups()
        name = split_event(ev_text.replace("\n", "\\n"))[0]
        if len(name) < MIN_TRACE_NAME and name not in self.sealed and (row := self._kernels_sealed(text)) is not None:
            (comm, pid_s, cpu_s, ts_s, ev_text), name = row
        if name not in self.sealed or not ev_text.endswith(SEALED):
            return None
        if len(record) > 1:
            self._stream.stats.multiline += 1
        return (comm.replace("\n", "\\n"), pid_s, cpu_s, ts_s, ev_text.replace("\n", "\\n")), name
