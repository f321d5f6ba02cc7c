"""``--print``: every event as one line on stdout as it arrives, host first (as the playbooks' Example headers).

    db-07    exec  sh               4121    filename="/usr/bin/logrotate" pid=4121 old_pid=4121

Columns: host, probe, comm, pid, then the fields as the kernel printed them.  Host, probe, comm
and pid never contain a blank, so ``awk '{print $1, $3}'`` works: a comm's blanks, and every
character that is not printable in any column (a comm and a path are chosen by any user on the
host), are written as escapes (``\\x1b``, ``\\u200b``, ``\\\\``).  Lines of one host come in its
kernel's order (trace_pipe merges the CPUs' buffers by time); hosts interleave as their chunks
arrive.

Cost: nothing when ``--print`` is off (the sink is not installed).  When on, one ``str.join`` and
one ``isprintable`` per batch of rows; rows are escaped one by one only in a batch that needs it
(bench/ingest.py ``--print``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import IO

from fleetprobe.parse import EventBatch, EventSink
from fleetprobe.traceline import STRING_END, TraceEvent, split_event

#: TASK_COMM_LEN - 1: the longest comm, so the pid column lines up.
COMM_WIDTH = 15
PID_WIDTH = 7


def _escape_char(c: str) -> str:
    """One character as its escape (printable ones are themselves)."""
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def visible(text: str) -> str:
    """``text`` with every non-printable character (and ``\\``) made a visible escape."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escape_char, text))


def visible_word(text: str) -> str:
    """Like :func:`visible`, and blanks escaped too: a column that splits on whitespace stays one word."""
    return visible(text).replace(" ", "\\x20") or "-"


class _Comms(dict[str, str]):
    """comm -> its column (escaped, padded); a hit is one C-level lookup; bounded (comms repeat)."""

    def __missing__(self, comm: str) -> str:
        """Escape and pad a comm not seen lately."""
        if len(self) >= 4096:
            self.clear()
        text = self[comm] = f"{visible_word(comm):<{COMM_WIDTH}} "
        return text


def _args(text: str, name: str) -> str:
    """The argument part of an event text ``name: args`` (as parse.split_event splits it)."""
    rest = text[len(name):]
    if rest[:2] == ": ":
        # A sealed probe's text ends in the seal's sentinel (parse.SEALED), its strings in
        # STRING_END (the same NUL): not the kernel's text.
        return rest[2:].replace(STRING_END, "")
    return split_event(text)[1]


class EventPrinter:
    """An :class:`~fleetprobe.parse.EventSink` that prints each event as one line on ``stream``."""

    def __init__(self, stream: IO[str] | None = None, *, hosts: Iterable[str] = (),
                 probes: Iterable[str] = (), on_closed: Callable[[], None] | None = None) -> None:
        """Columns as wide as the longest host and probe name (known before the run), so lines align.

        When the reader of ``stream`` goes away (``| head``: EPIPE), the printer stops printing and
        calls ``on_closed`` once (the CLI ends the run there, as a Ctrl-C would): no host fails for it.
        """
        self.stream = stream or sys.stdout
        self.on_closed = on_closed
        #: The reader went away; nothing more is printed.
        self.closed = False
        self.count = 0
        self._host_width = max(map(len, hosts), default=0)
        self._probe_width = max(map(len, probes), default=0)
        self._heads: dict[tuple[str, str], str] = {}
        self._comms = _Comms()

    def align_hosts(self, hosts: Iterable[str]) -> None:
        """Pad the host column to the longest of ``hosts`` (the run's, once its shard is known)."""
        self._host_width = max(map(len, hosts), default=0)
        self._heads.clear()

    def _head(self, host: str, probe: str) -> str:
        """``host probe `` padded, escaped once per (host, probe)."""
        key = (host, probe)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = (f"{visible_word(host):<{self._host_width}} "
                                       f"{visible_word(probe):<{self._probe_width}} ")
        return head

    def write_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Print every row of ``host``'s batch, in order, with one write."""
        rows = batch.rows
        if not rows:
            return
        heads = {name: self._head(host, probes[name]) for name in batch.counts}
        skip = {name: len(name) + 2 for name in batch.counts}
        comms = self._comms
        texts = [row[4] for row in rows]
        joined = "".join(texts)
        if joined.isprintable() and "\\" not in joined and all(
                t.startswith(": ", skip[n] - 2) for t, n in zip(texts, batch.names)):
            # The common batch: nothing to escape in the texts (heads and comms are escaped already),
            # every text "name: args". No Python call per row.
            out = "".join([f"{heads[name]}{comms[comm]}{pid:<{PID_WIDTH}} {text[skip[name]:]}\n"
                           for (comm, pid, _, _, text), name in zip(rows, batch.names)])
        else:
            out = "".join([f"{heads[name]}{comms[comm]}{pid:<{PID_WIDTH}} {visible(_args(text, name))}\n"
                           for (comm, pid, _, _, text), name in zip(rows, batch.names)])
        self._put(out, len(rows))

    def write(self, ev: TraceEvent) -> None:
        """Print one event already built (module events)."""
        self._put(f"{self._head(ev.host, ev.probe)}{self._comms[ev.comm]}{ev.pid:<{PID_WIDTH}} "
                  f"{visible(ev.args)}\n", 1)

    def _put(self, text: str, n: int) -> None:
        """Write and flush (a pipe's reader sees each batch as it comes), unless the reader is gone."""
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self._reader_gone()
            return
        self.count += n

    def _reader_gone(self) -> None:
        """The reader closed the pipe: print nothing more, and point stdout at /dev/null so that
        Python's own flush at exit does not fail on the same pipe (as the Python docs advise for EPIPE)."""
        self.closed = True
        if self.stream is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        if self.on_closed is not None:
            self.on_closed()

    def close(self) -> None:
        """Flush."""
        if not self.closed:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._reader_gone()


class Tee:
    """An EventSink that hands every batch and event to each of its sinks, in order."""

    def __init__(self, *sinks: EventSink) -> None:
        """``sinks``: e.g. the raw-event file and the printer."""
        self.sinks = sinks

    def write_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Each sink gets the batch."""
        for s in self.sinks:
            s.write_batch(host, batch, probes)

    def write(self, ev: TraceEvent) -> None:
        """Each sink gets the event."""
        for s in self.sinks:
            s.write(ev)

    def flush_due(self) -> None:
        """The run's once-a-second timer: each sink that buffers (the events file) gets it."""
        for s in self.sinks:
            due: Callable[[], None] | None = getattr(s, "flush_due", None)
            if due is not None:
                due()

    def flush(self) -> None:
        """A host ended: each sink that buffers writes what it holds."""
        for s in self.sinks:
            flush: Callable[[], None] | None = getattr(s, "flush", None)
            if flush is not None:
                flush()


__all__ = ["EventPrinter", "Tee", "split_event", "visible", "visible_word"]
