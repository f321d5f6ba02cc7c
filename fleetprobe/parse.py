"""Parse: trace_pipe lines into events, tolerant of every kernel's format.

Two layers:

* :func:`parse_line` is a pure function of one line.  It never raises: it
  returns a :class:`TraceEvent`, a :class:`Marker` (``fpsync`` clock marker),
  a :class:`Loss` (``CPU:N [LOST M EVENTS]``), a :class:`Control` line from
  the runner (``@@fp ...``) or None for garbage.
* :class:`TraceStream` is the hot path: it is fed the raw bytes the controller
  reads from the runner's channel (large chunks, never line by line: see
  PERF-NOTES), splits lines itself, keeps a partial last line for the next
  chunk, and hands out events through a callback.

The line layout (kernel/trace/trace_output.c, print_trace_fmt + lat/irq info)::

    <comm right-aligned in 16>-<pid> [( tgid)] [cpu] [flags] <secs.usecs>: <event>: <args>

The parser anchors on the ``[cpu]`` column, because comm may contain spaces
(``kworker/u8:2 x``), dashes and even brackets: one compiled regular
expression takes the shortest comm followed by ``-pid``, an optional tgid
column and ``[cpu]``.  It matches spaces, not any whitespace (the kernel pads
with spaces, and `` +`` backtracks less).  On CPython 3.11 here it measured
0.70 M lines/s against 0.60-0.65 M for partition-and-validate versions that
check as much.  Argument text is split into fields only when someone needs the
values (see merge.FleetAggregate.add_rows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class TraceEvent:
    """One event seen on one host.

    ``time`` is wall-clock seconds since the epoch (the host's trace clock
    converted with a (trace time, realtime) pair taken on the host);
    ``trace_ts`` is the raw trace timestamp.  ``fields`` maps argument names
    to values: ints for numbers (hex or decimal), str for strings.
    ``site`` is ``sym+off/size`` for entry probes, ``caller <- func`` for
    return probes, else empty.
    ``args`` is the raw argument text the fields were parsed from (kept so a
    raw-event writer can store exactly what the kernel printed).
    """

    host: str
    probe: str
    time: float
    trace_ts: float
    cpu: int
    pid: int
    comm: str
    fields: dict[str, int | str] = field(default_factory=dict)
    site: str = ""
    args: str = ""

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (one line of the raw-events file)."""
        return {"host": self.host, "probe": self.probe, "time": self.time, "trace_ts": self.trace_ts,
                "cpu": self.cpu, "pid": self.pid, "comm": self.comm, "site": self.site,
                "fields": self.fields}


@dataclass(frozen=True, slots=True)
class Marker:
    """A clock marker the runner wrote into trace_marker: ``fpsync <realtime> [<uncertainty>]``.

    ``trace_ts`` is the trace timestamp the kernel gave the write, ``realtime``
    the host's CLOCK_REALTIME (seconds since the epoch) read just before it,
    and ``uncertainty`` how far apart the two readings may be, in seconds.
    """

    trace_ts: float
    realtime: float
    uncertainty: float


@dataclass(frozen=True, slots=True)
class Loss:
    """``CPU:N [LOST M EVENTS]``: the ring buffer overwrote M events on CPU N before we read them."""

    cpu: int
    count: int


@dataclass(frozen=True, slots=True)
class Control:
    """A line from the on-host runner itself (``@@fp ...``), without the ``@@fp `` prefix."""

    text: str


#: What :func:`parse_line` may return.
Parsed = TraceEvent | Marker | Loss | Control | None

CONTROL_PREFIX = "@@fp "
MARKER_EVENT = "tracing_mark_write"
MARKER_WORD = "fpsync"

# When ``date +%N`` works the runner reads CLOCK_REALTIME a little before the
# marker write: a process exit and a shell builtin ``echo`` apart.  1 ms bounds
# that on a busy small host; the runner may state its own bound as a 3rd token.
DEFAULT_MARKER_UNCERTAINTY = 1e-3
# busybox ``date`` without %N support gives whole seconds (or prints "%N").
WHOLE_SECOND_UNCERTAINTY = 1.0

# The slow, tolerant path: comm (anything), -pid, optional (tgid), [cpu],
# optional flags, timestamp, then "event: args" (args may be absent).
_LINE_RE = re.compile(
    r" *(.*?)-(\d+) +(?:\( *(?:\d+|-+)\) +)?\[(\d+)\] +(?:(\S{1,8}) +)?(\d+\.\d+): ([^: ]+):? ?(.*)"
)
_LOSS_RE = re.compile(r"^\s*CPU:\s*(\d+)\s+\[LOST\s+(\d+)\s+EVENTS\]")
_DEC_RE = re.compile(r"-?[0-9]+\Z")
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def parse_value(text: str) -> int | str:
    """Convert one printed value: decimal or hex (``0x`` or ``%lx`` style) to int, quoted strings unquoted.

    x64-typed negatives (``0xffffffffffffff9c``) stay as the printed unsigned
    value, because the kernel printed them that way and the probe chose the type.
    ``(fault)`` (a string the kernel could not read) stays a string.
    """
    if not text:
        return text
    c = text[0]
    if c == '"':
        # The kernel does not escape quotes inside strings (seen on 6.18:
        # prompt="fp "q" $ "), so strip exactly one quote at each end.
        return text[1:-1] if len(text) >= 2 and text[-1] == '"' else text[1:]
    if c == "0" and len(text) > 2 and text[1] in "xX":
        try:
            return int(text, 16)
        except ValueError:
            return text
    if c in "-0123456789":
        if _DEC_RE.match(text):
            # A leading-zero run of hex digits (``00000000abcd1234``) is a
            # %lx pointer, not a decimal; decimals are never zero-padded.
            if c == "0" and len(text) >= 8:
                return int(text, 16)
            return int(text)
    if len(text) >= 8 and c != "-" and _HEXDIGITS.issuperset(text) and not text.isalpha():
        # %lx-printed addresses in tracepoints (``ptr=ffff888004a1b2c0``).
        return int(text, 16)
    return text


def split_args(args: str) -> tuple[str, dict[str, str]]:
    """Split ``(site) name=value ...`` into the site and raw (unconverted) values.

    Quoted values may contain spaces and unescaped quotes: a quoted value ends
    at a ``"`` followed by a space and the next ``name=``, or at the end.
    Unquoted values may contain spaces too (``comm=my worker x`` in
    sched_process_fork; ``filename=`` of a path with a space): a token without
    ``=`` continues the previous value.
    """
    site = ""
    if args.startswith("("):
        close = args.find(") ")
        if close < 0:
            if args.endswith(")"):
                return args[1:-1], {}
            close = len(args)
        site = args[1:close]
        args = args[close + 2:]
    values: dict[str, str] = {}
    if '"' not in args:
        last = ""
        for tok in args.split(" "):
            name, eq, value = tok.partition("=")
            if eq and name:
                values[name] = value
                last = name
            elif last and tok:
                values[last] += " " + tok
        return site, values
    return site, _split_quoted(args)


_NEXT_NAME_RE = re.compile(r'" [A-Za-z_][A-Za-z0-9_.\[\]]*=')


def _split_quoted(args: str) -> dict[str, str]:
    """The slow path of :func:`split_args` for argument text with quoted strings."""
    values: dict[str, str] = {}
    pos = 0
    n = len(args)
    last = ""
    while pos < n:
        while pos < n and args[pos] == " ":
            pos += 1
        if pos >= n:
            break
        eq = args.find("=", pos)
        sp = args.find(" ", pos)
        if eq < 0 or (0 <= sp < eq):
            # A token without '=': continues the previous (unquoted) value.
            end = n if sp < 0 else sp
            if last:
                values[last] += " " + args[pos:end]
            pos = end
            continue
        name = args[pos:eq]
        vstart = eq + 1
        if vstart < n and args[vstart] == '"':
            m = _NEXT_NAME_RE.search(args, vstart + 1)
            if m:
                end = m.start() + 1
            else:
                end = n
            values[name] = args[vstart:end]
            pos = end
        else:
            end = args.find(" ", vstart)
            if end < 0:
                end = n
            values[name] = args[vstart:end]
            pos = end
        last = name
    return values


def parse_fields(args: str) -> tuple[str, dict[str, int | str]]:
    """The site and the converted field values of one event's argument text."""
    site, raw = split_args(args)
    return site, {k: parse_value(v) for k, v in raw.items()}


def parse_marker(trace_ts: float, text: str) -> Marker | None:
    """``fpsync <realtime> [<uncertainty>]`` -> Marker, or None if the text is not a clock marker."""
    parts = text.split()
    if len(parts) < 2 or parts[0] != MARKER_WORD:
        return None
    whole, dot, frac = parts[1].partition(".")
    if not whole.isdigit():
        return None
    if dot and frac.isdigit():
        realtime = float(whole + "." + frac)
        uncertainty = DEFAULT_MARKER_UNCERTAINTY
    else:
        # Whole seconds (or busybox printing a literal "%N"): the true time is
        # somewhere in [s, s+1); take the middle, keep the stated 1 s bound.
        realtime = float(whole) + 0.5
        uncertainty = WHOLE_SECOND_UNCERTAINTY
    if len(parts) >= 3:
        try:
            stated = float(parts[2])
        except ValueError:
            return None
        if not math.isfinite(stated) or stated < 0:
            return None
        uncertainty = stated
    if not math.isfinite(realtime):
        return None
    return Marker(trace_ts, realtime, uncertainty)


def parse_line(line: str, host: str = "", names: Mapping[str, str] | None = None) -> Parsed:
    """Parse one trace_pipe line (no trailing newline).  Never raises.

    ``names`` maps trace event names to probe names; without it the event's
    probe is its trace name.  An event whose name is not in ``names`` is still
    returned (with its trace name as probe) so callers can count it.
    """
    try:
        return _parse_line(line, host, names)
    except (ValueError, IndexError, OverflowError):
        return None


def _parse_line(line: str, host: str, names: Mapping[str, str] | None) -> Parsed:
    """The body of :func:`parse_line`, allowed to raise on garbage."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if line.startswith(CONTROL_PREFIX):
        return Control(line[len(CONTROL_PREFIX):])
    if line.lstrip().startswith("CPU:"):
        m = _LOSS_RE.match(line)
        return Loss(int(m[1]), int(m[2])) if m else None
    m = _LINE_RE.match(line)
    if m is None:
        return None
    comm, pid_s, cpu_s, _flags, ts_s, name, args = m.groups()
    pid, cpu, ts = int(pid_s), int(cpu_s), float(ts_s)
    if name == MARKER_EVENT and args.startswith(MARKER_WORD):
        marker = parse_marker(ts, args)
        if marker is not None:
            return marker
    probe = names.get(name, name) if names is not None else name
    site, values = parse_fields(args)
    return TraceEvent(host=host, probe=probe, time=ts, trace_ts=ts, cpu=cpu, pid=pid,
                      comm=comm, fields=values, site=site, args=args)


@dataclass
class StreamStats:
    """What one host's stream carried: line counts by kind, loss, and what could not be parsed.

    ``unknown`` counts events whose trace name is not one of the run's
    (another user's events in a shared buffer, or a naming bug), by name,
    for at most :data:`MAX_UNKNOWN_NAMES` names.  ``unparsed_examples``
    keeps the first few garbage lines so an error can show them.
    """

    bytes: int = 0
    lines: int = 0
    events: int = 0
    markers: int = 0
    control: int = 0
    loss_lines: int = 0
    lost_events: int = 0
    unparsed: int = 0
    unsynced: int = 0
    unknown: dict[str, int] = field(default_factory=dict)
    unparsed_examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {"bytes": self.bytes, "lines": self.lines, "events": self.events, "markers": self.markers,
                "control": self.control, "loss_lines": self.loss_lines, "lost_events": self.lost_events,
                "unparsed": self.unparsed, "unsynced": self.unsynced, "unknown": dict(self.unknown),
                "unparsed_examples": list(self.unparsed_examples)}


MAX_UNKNOWN_NAMES = 64
MAX_UNPARSED_EXAMPLES = 5


#: One event line as the regex split it: (comm, pid, cpu, flags or None, timestamp, trace name, args).
Row = tuple[str, str, str, str | None, str, str, str]


class LineSink(Protocol):
    """Where :class:`TraceStream` counts events without building objects (see FleetAggregate).

    A sink that also has ``add_rows(host, rows, names, slope, intercept)``
    (as FleetAggregate does) gets each chunk's events as one batch instead:
    measured 0.34-0.36 M lines/s end to end against 0.28 M row by row.
    """

    def add_line(self, host: str, probe: str, trace_ts: float, time: float, cpu: int, pid: int,
                 comm: str, args: str) -> None:
        """Count one event given as split strings."""
        ...


class TraceStream:
    """Turn one host's raw trace_pipe bytes into events, markers, loss and control lines.

    Feed it whatever the channel's ``read(65536)`` returned; a chunk may end in
    the middle of a line (and of a UTF-8 sequence): the tail waits for the
    next chunk.  Bytes that are not UTF-8 become U+FFFD; they never raise.

    Events go to ``aggregate.add_rows`` in one batch per chunk (the fast path:
    no object per event, counting done by C-level Counter updates)
    and, only if ``on_event`` is given, also as :class:`TraceEvent` objects
    with parsed fields (for the raw-events writer: building and parsing every
    event roughly halves the rate).
    Event times are put on the controller's time axis by ``clock`` (a
    :class:`fleetprobe.clock.ClockMap`), which learns from the markers as they
    arrive; before the first marker an event's ``time`` is its raw trace
    timestamp and it is counted in ``stats.unsynced``.
    """

    def __init__(self, host: str, names: Mapping[str, str], *,
                 aggregate: LineSink | None = None,
                 on_event: Callable[[TraceEvent], None] | None = None,
                 on_control: Callable[[str], None] | None = None,
                 on_marker: Callable[[Marker], None] | None = None,
                 on_loss: Callable[[Loss], None] | None = None,
                 clock: ClockLike | None = None) -> None:
        """Set up a stream for ``host``; ``names`` maps trace event names to probe names."""
        self.host = host
        self.names = dict(names)
        self.aggregate = aggregate
        self.on_event = on_event
        self.on_control = on_control
        self.on_marker = on_marker
        self.on_loss = on_loss
        self.clock = clock
        self.stats = StreamStats()
        self._batch: Callable[[str, list[Row], Mapping[str, str], float, float], None] | None = \
            getattr(aggregate, "add_rows", None)
        self._tail = b""
        self._slope = 1.0
        self._intercept = 0.0
        self._synced = False
        self._sync()

    def feed(self, data: bytes) -> None:
        """Consume one chunk of the channel's bytes."""
        if not data:
            return
        self.stats.bytes += len(data)
        buf = self._tail + data if self._tail else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self._tail = buf
            return
        self._tail = buf[cut + 1:]
        self._lines(buf[:cut].decode("utf-8", "replace").split("\n"))

    def close(self) -> None:
        """End of stream: parse a last line that had no newline."""
        if self._tail:
            tail, self._tail = self._tail, b""
            self._lines([tail.decode("utf-8", "replace")])

    def _sync(self) -> None:
        """Refresh the cached linear map from trace time to controller time."""
        if self.clock is not None and self.clock.synced:
            self._slope, self._intercept = self.clock.linear()
            self._synced = True

    def _lines(self, lines: list[str]) -> None:
        """The hot loop: one regex match per line, events batched per chunk for the aggregate."""
        stats = self.stats
        names = self.names
        host = self.host
        match = _LINE_RE.match
        on_event = self.on_event
        slope, intercept, synced = self._slope, self._intercept, self._synced
        rows: list[Row] = []
        append = rows.append
        # Per-event sinks (no add_rows) get add_line before on_event, row by row.
        add_line = self.aggregate.add_line if self.aggregate is not None and self._batch is None else None
        n_lines = 0
        for line in lines:
            if not line:
                continue
            n_lines += 1
            m = match(line)
            if m is None:
                self._other(line)
                continue
            row: Row = m.groups()  # type: ignore[assignment]
            name = row[5]
            if name in names:
                append(row)
                if not synced:
                    stats.unsynced += 1
                if add_line is not None:
                    comm, pid_s, cpu_s, _flags, ts_s, _name, args = row
                    ts = float(ts_s)
                    add_line(host, names[name], ts, ts * slope + intercept, int(cpu_s), int(pid_s), comm, args)
                if on_event is not None:
                    comm, pid_s, cpu_s, _flags, ts_s, _name, args = row
                    ts = float(ts_s)
                    site, values = parse_fields(args)
                    on_event(TraceEvent(host, names[name], ts * slope + intercept, ts, int(cpu_s),
                                        int(pid_s), comm, values, site, args))
                continue
            args = row[6]
            if name == MARKER_EVENT and args.startswith(MARKER_WORD):
                marker = parse_marker(float(row[4]), args)
                if marker is not None:
                    # Events before the marker keep the map they were read under.
                    self._flush(rows, slope, intercept)
                    rows = []
                    append = rows.append
                    stats.markers += 1
                    if self.clock is not None:
                        self.clock.add_marker(marker)
                        self._sync()
                        slope, intercept, synced = self._slope, self._intercept, self._synced
                    if self.on_marker is not None:
                        self.on_marker(marker)
                    continue
            unknown = stats.unknown
            if name in unknown or len(unknown) < MAX_UNKNOWN_NAMES:
                unknown[name] = unknown.get(name, 0) + 1
        self._flush(rows, slope, intercept)
        stats.lines += n_lines

    def _flush(self, rows: list[Row], slope: float, intercept: float) -> None:
        """Hand a batch of event rows to the aggregate."""
        if not rows:
            return
        self.stats.events += len(rows)
        if self._batch is not None:
            self._batch(self.host, rows, self.names, slope, intercept)

    def _other(self, line: str) -> None:
        """A line that is not an event: control, loss, blank or garbage."""
        stats = self.stats
        if line.startswith(CONTROL_PREFIX):
            stats.control += 1
            if self.on_control is not None:
                self.on_control(line[len(CONTROL_PREFIX):])
            return
        if not line.strip():
            stats.lines -= 1
            return
        m = _LOSS_RE.match(line)
        if m is not None:
            loss = Loss(int(m[1]), int(m[2]))
            stats.loss_lines += 1
            stats.lost_events += loss.count
            if self.on_loss is not None:
                self.on_loss(loss)
            return
        self._unparsed(line)

    def _unparsed(self, line: str) -> None:
        """Count a line nothing could parse; keep the first few as evidence."""
        self.stats.unparsed += 1
        if len(self.stats.unparsed_examples) < MAX_UNPARSED_EXAMPLES:
            self.stats.unparsed_examples.append(line[:200])


class ClockLike(Protocol):
    """What :class:`TraceStream` needs from a clock map (see :class:`fleetprobe.clock.ClockMap`)."""

    @property
    def synced(self) -> bool:
        """True once at least one marker was seen."""
        ...

    def add_marker(self, marker: Marker) -> None:
        """Learn from one marker."""
        ...

    def linear(self) -> tuple[float, float]:
        """(slope, intercept) taking a trace timestamp to controller time."""
        ...
