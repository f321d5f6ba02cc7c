"""Parse: trace_pipe lines into events, tolerant of every kernel's format.

Two layers:

* :func:`parse_line` is a pure function of one line.  It never raises: it
  returns a :class:`TraceEvent`, a :class:`Marker` (``fpsync`` clock marker),
  a :class:`Loss` (``CPU:N [LOST M EVENTS]``), a :class:`Control` line from
  the runner (``@@fp ...``) or None for garbage.
* :class:`TraceStream` is the hot path: it is fed the raw bytes the controller
  reads from the runner's channel (large chunks, never line by line: see
  PERF-NOTES), keeps a partial last line for the next chunk, takes all lines
  of a chunk with one ``findall``, and hands the events to the aggregate as an
  :class:`EventBatch` of the strings the kernel printed; a raw-event writer
  gets the same batches (``on_batch``), or, on request, every event as a
  :class:`TraceEvent` through a callback (``on_event``, several times dearer).

The line layout (kernel/trace/trace_output.c, print_trace_fmt + lat/irq info)::

    <comm right-aligned in 16>-<pid> [( tgid)] [cpu] [flags] <secs.usecs>: <event>: <args>

The parser anchors on the ``[cpu]`` column, because comm may contain spaces
(``kworker/u8:2 x``), dashes and even brackets: one compiled regular
expression takes the shortest comm followed by ``-pid``, an optional tgid
column and ``[cpu]``.  It matches spaces, not any whitespace (the kernel pads
with spaces, and `` +`` backtracks less).  On CPython 3.11 here it measured
0.70 M lines/s against 0.60-0.65 M for partition-and-validate versions that
check as much; one ``findall`` per chunk, written for the engine (see _HEAD),
takes 1.1 M lines/s.  Argument text is split into fields only when someone
needs the values (see merge.FleetAggregate.add_batch).
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
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


def control_prefix(secret: str) -> str:
    """The prefix of the runner's own lines in a run with ``secret`` (runner.sh ``secret`` directive).

    The secret is sent with the plan; neither the kernel nor a user on the host sees it, so
    a printed file name cannot start a line with it.
    """
    return f"@@fp:{secret} "
MARKER_EVENT = "tracing_mark_write"
MARKER_WORD = "fpsync"
#: The runner's heartbeat (a marker without a clock reading: it costs the host no process).
BEAT_WORD = "fpbeat"

# When ``date +%N`` works the runner reads CLOCK_REALTIME a little before the
# marker write: a process exit and a shell builtin ``echo`` apart.  1 ms bounds
# that on a busy small host; the runner may state its own bound as a 3rd token.
DEFAULT_MARKER_UNCERTAINTY = 1e-3
# busybox ``date`` without %N support gives whole seconds (or prints "%N").
WHOLE_SECOND_UNCERTAINTY = 1.0

# Everything before the event name: comm (anything, the shortest that fits),
# -pid, optional (tgid), [cpu], optional flags, timestamp.  Groups: comm, pid,
# cpu, timestamp.  Written for CPython's re engine without changing a single
# parse: possessive quantifiers (``++``) only where giving characters back
# could never lead to a match (digits before a space, spaces before a
# bracket), and optional parts as ``(?:X|)`` rather than ``(?:X)?`` (the same
# order of trials; a branch costs the engine less than a repeat).  Together
# about 20% less time per line than the plain form.
# Numbers are bounded (issue 11 #7): a pid or tgid of at most 10 digits, a cpu of 6, a timestamp of
# 12.9 (trace clocks count seconds since boot, or since the epoch): a line with more is no
# header (a 400-digit timestamp would be inf, a 5000-digit pid no int JSON can read back).
_HEAD = (r" *+(.*?)-(\d{1,10}+) ++(?:\( *+(?:\d{1,10}+|-++)\) ++|)\[(\d{1,6}+)\] ++(?:\S{1,8} +|)"
         r"(\d{1,12}+\.\d{1,9}+): ")
# One line (parse_line): the head, then the event text (split by split_event).
_LINE_RE = re.compile(_HEAD + r"([^: \n].*)")
# Every line of a decoded chunk in one findall, one row per line (lines end at
# "\n" only, as with str.split("\n")): an event line gives comm, pid, cpu,
# timestamp and its event text ("name: args", which must start like a name,
# as in _LINE_RE); any other line gives four empty columns and the line.
_LINES = r"(?m)^(?:" + _HEAD + r"(?=[^: \n])|)(.*)"
_LINES_RE = re.compile(_LINES)
# The same for text that is all ASCII (str.isascii() is O(1)), 15% faster:
# re.ASCII makes \d a plain [0-9] test (all a Unicode \d can match in ASCII
# text), and \S is spelled out as Unicode's (which also excludes \x1c-\x1f).
_ASCII_LINES_RE = re.compile(_LINES.replace(r"\S", r"[^\t-\r\x1c-\x1f ]"), re.ASCII)
# An event text's name, the separator after it and its argument text. Most events print
# "name: args"; syscall tracepoints print "sys_NAME(arg: value, ...)" at entry and
# "sys_NAME -> 0xRET" at exit (kernel/trace/trace_syscalls.c, print_syscall_enter/exit).
_EVENT_TEXT_RE = re.compile(r"([^: (]+)(\(| -> |:? ?)(.*)", re.S)
# One argument of a syscall entry line: "name: hexvalue" (0x-prefixed since about 6.10,
# bare %lx before), maybe followed by a quoted user string (kernels that read them).
_SYSCALL_ARG_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*): (?:0x)?([0-9a-fA-F]+)(?: ("(?:[^"]|"(?!, [A-Za-z_]\w*: |\)$))*"))?'
                             r'(?:, |\)$)')
_LOSS_RE = re.compile(r"^\s*CPU:\s*(\d{1,6})\s+\[LOST\s+(\d{1,19})\s+EVENTS\]")
_DEC_RE = re.compile(r"-?[0-9]+\Z")
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def parse_value(text: str) -> int | str:
    """Convert one printed value: decimal or hex (``0x`` or ``%lx`` style) to int, quoted strings unquoted.

    x64-typed negatives (``0xffffffffffffff9c``) stay as the printed unsigned
    value, because the kernel printed them that way and the probe chose the type.
    ``(fault)`` (a string the kernel could not read) stays a string.
    """
    if text.isdigit() and text.isascii() and len(text) <= 20:
        # The common case (pids, counts), decided without the regex below.
        return int(text, 16) if text[0] == "0" and len(text) >= 8 else int(text)
    if not text:
        return text
    c = text[0]
    if c == '"':
        # The kernel does not escape quotes inside strings (seen on 6.18:
        # prompt="fp "q" $ "), so strip exactly one quote at each end.
        return text[1:-1] if len(text) >= 2 and text[-1] == '"' else text[1:]
    if len(text) > 22:
        # No kernel prints a 64-bit number in more than 20 digits (22 with "0x"/"-"): a longer one
        # stays text (5000 digits are a ValueError in int(), and an int no JSON reader takes back).
        # Strings are unquoted first, whatever their length.
        return text
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
    if not whole.isdigit() or len(whole) > 12 or len(frac) > 12:
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
        if not math.isfinite(stated) or not 0 <= stated <= 3600:
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
    comm, pid_s, cpu_s, ts_s, text = m.groups()
    name, args = split_event(text)
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

    ``unknown`` counts events whose trace key is not one of the run's
    (an event printed under a name the plan did not expect, or someone else's
    event in the run's own instance), by key, for at most
    :data:`MAX_UNKNOWN_NAMES` keys; ``unknown_lines`` counts all of them, so
    a run can say how many lines it could not attribute to a probe, whatever
    their names.  ``unparsed_examples`` and ``unknown_examples`` keep the first
    few such lines so a report can show them.
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
    #: Lines longer than MAX_LINE_BYTES, dropped without being kept.
    overlong: int = 0
    #: Events whose text went on over more than one line (a newline in a string the kernel printed).
    multiline: int = 0
    unknown_lines: int = 0
    unknown_examples: list[str] = field(default_factory=list)
    #: Events of fleetprobe's own processes (the runner's pids) dropped here: the kernel could not.
    own_events: int = 0

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {"bytes": self.bytes, "lines": self.lines, "events": self.events, "markers": self.markers,
                "control": self.control, "loss_lines": self.loss_lines, "lost_events": self.lost_events,
                "unparsed": self.unparsed, "unsynced": self.unsynced, "unknown": dict(self.unknown),
                "unparsed_examples": list(self.unparsed_examples), "unknown_lines": self.unknown_lines,
                "unknown_examples": list(self.unknown_examples), "own_events": self.own_events,
                "overlong": self.overlong, "multiline": self.multiline}


MAX_UNKNOWN_NAMES = 64
#: The longest line a stream keeps (bytes or characters). The kernel prints an event into one
#: page-sized buffer (trace_seq, 8 KiB on 6.x); a line past this is a host's attack, not an event.
MAX_LINE_BYTES = 256 * 1024
MAX_UNPARSED_EXAMPLES = 5
#: What the kernel prints instead of an event too long for its print buffer (tracing_read_pipe).
LINE_TOO_BIG = "[LINE TOO BIG]"


#: One event line as the kernel printed it: (comm, pid, cpu, timestamp, event text "name: args").
Row = tuple[str, str, str, str, str]

#: Distinct event texts whose names a stream (and :func:`split_event`) remember.
EVENT_TEXT_CACHE = 4096

_PID = itemgetter(1)
_EVENT_TEXT = itemgetter(4)


@functools.lru_cache(maxsize=EVENT_TEXT_CACHE)
def split_event(text: str) -> tuple[str, str]:
    """An event text (what follows the timestamp) -> (trace key, argument text as ``name=value ...``).

    The trace key is the event's name as printed (``openat`` for ``openat: (site) dfd=..``),
    except for the two forms syscall tracepoints print (see
    :func:`fleetprobe.facts.printed_key`): ``sys_openat(`` for an entry line
    ``sys_openat(dfd: ffffff9c, ...)`` and ``sys_openat ->`` for an exit line
    ``sys_openat -> 0x3``.  Their arguments come back in the ``name=value`` form of
    every other event (``dfd=0xffffff9c filename=0x7f..``; ``ret=-2``, signed as the
    format file declares it), so fields, top values and raw events need no second parser.
    """
    m = _EVENT_TEXT_RE.match(text)
    if m is None:
        return text, ""
    name, sep, rest = m.groups()
    if sep == "(":
        return sys.intern(name + "("), _syscall_enter_args(rest)
    if sep == " -> ":
        return sys.intern(name + " ->"), _syscall_exit_args(rest)
    if rest.endswith(SEALED):
        # A sealed line's seal, already cut to its sentinel by the stream (TraceStream._text_framed).
        rest = rest[:-1]
    # Interned: a batch's names of one event are then one object (cheap == and dict lookups).
    return sys.intern(name), rest


def _syscall_enter_args(rest: str) -> str:
    """``dfd: ffffff9c, filename: 0x7f1c, flags: 0)`` -> ``dfd=0xffffff9c filename=0x7f1c flags=0x0``.

    Every value is hex (``%lx``), with or without ``0x``; a quoted user string after
    the number, where the kernel prints one, becomes the value.  Text that does not
    have this shape is kept whole under ``args=`` (never dropped, never mis-split).
    """
    parts: list[str] = []
    pos = 0
    n = len(rest)
    while pos < n:
        m = _SYSCALL_ARG_RE.match(rest, pos)
        if m is None:
            return "args=" + _quote(rest)
        name, number, string = m.groups()
        parts.append(f"{name}={string}" if string else f"{name}=0x{number.lower()}")
        pos = m.end()
    return " ".join(parts)


def _syscall_exit_args(rest: str) -> str:
    """``0xfffffffffffffffe`` -> ``ret=-2``: the return value, signed (``long ret`` in the format file)."""
    text = rest.strip()
    try:
        value = int(text, 16)
    except ValueError:
        return "args=" + _quote(rest)
    if value >= 1 << 63:
        value -= 1 << 64
    return f"ret={value}"


def _quote(text: str) -> str:
    """A free-form text as one quoted value (split_args keeps it whole)."""
    return '"' + text.replace("\n", " ") + '"'


class _EventNames(dict[str, str]):
    """Event text -> trace event name, filled on a miss and emptied when full (bounded memory).

    A dict so that naming a chunk's rows is one C-level ``map`` over
    ``__getitem__``; only texts not seen lately cost a Python call.
    """

    def __missing__(self, text: str) -> str:
        """Name a text not seen lately."""
        if len(self) >= EVENT_TEXT_CACHE:
            self.clear()
        name = self[text] = split_event(text)[0]
        return name


#: What a sealed line's seal becomes in the stream's text: NUL, which no kernel-printed text holds
#: (strings and comms end at their NUL), so the line's end is one character to test, and C-speed
#: ``str.replace`` marks a whole chunk's seals at once.
SEALED = "\x00"
#: The name a stream gives a line whose seal does not fit its event (a sealed probe's line without
#: it, another line with it): such a chunk goes the slow way (records), never the fast one.
_MISFRAMED = "\x00misframed"
# A sealed record's head: as _HEAD, but the comm may hold newlines (a user's prctl(PR_SET_NAME)).
_RECORD_RE = re.compile("(?s)" + _HEAD + r"([^: \n].*)")
#: A comm is at most 15 bytes, printed right-aligned in 16: a line before a sealed record's head
#: (the comm's part before its newline) is never longer.
MAX_COMM_PART = 16


class _SealedNames(_EventNames):
    """_EventNames for a sealed stream: a text whose seal does not fit its event is named _MISFRAMED."""

    def __init__(self, sealed: frozenset[str]) -> None:
        """Remember which trace names are sealed."""
        super().__init__()
        self.sealed = sealed

    def __missing__(self, text: str) -> str:
        """Name a text not seen lately, checking its seal."""
        if len(self) >= EVENT_TEXT_CACHE:
            self.clear()
        name = split_event(text)[0]
        if (name in self.sealed) != text.endswith(SEALED):
            name = _MISFRAMED
        self[text] = name
        return name


@dataclass(slots=True)
class EventBatch:
    """Consecutive event lines of one host's stream, kept as the strings the kernel printed.

    ``rows[i]`` is one line's columns, ``names[i]`` its trace event name,
    ``counts`` the number of rows per name (in order of first appearance).
    ``slope``/``intercept`` put the rows' trace timestamps on the controller's
    time axis (the clock map in force when they were read).
    """

    rows: list[Row]
    names: list[str]
    counts: dict[str, int]
    slope: float = 1.0
    intercept: float = 0.0

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.rows)

    def head(self, n: int) -> EventBatch:
        """The first ``n`` rows as a batch of their own."""
        if n >= len(self.rows):
            return self
        names = self.names[:n]
        return EventBatch(self.rows[:n], names, dict(Counter(names)), self.slope, self.intercept)

    def events(self, probes: Mapping[str, str]) -> Iterator[tuple[str, float, float, int, int, str, str]]:
        """Each row as (probe, trace_ts, time, cpu, pid, comm, args), for per-event sinks."""
        for (comm, pid_s, cpu_s, ts_s, text), name in zip(self.rows, self.names):
            ts = float(ts_s)
            yield (probes[name], ts, ts * self.slope + self.intercept, int(cpu_s), int(pid_s), comm,
                   split_event(text)[1])


class LineSink(Protocol):
    """Where :class:`TraceStream` counts events without building objects (see FleetAggregate).

    A sink that also has ``add_batch(host, batch, probes)`` (as FleetAggregate
    does) gets each chunk's events as one :class:`EventBatch` instead, and
    counts them column-wise: no Python work per event where C can count.
    """

    def add_line(self, host: str, probe: str, trace_ts: float, time: float, cpu: int, pid: int,
                 comm: str, args: str) -> None:
        """Count one event given as split strings."""
        ...


class EventSink(Protocol):
    """Where raw events go (see :class:`fleetprobe.report.EventWriter`): batches of rows, or one parsed event."""

    def write(self, ev: TraceEvent) -> None:
        """Store one event already built (module events come this way)."""
        ...

    def write_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Store every row of a batch of ``host``'s events; ``probes`` names each row's trace event."""
        ...


class TraceStream:
    """Turn one host's raw trace_pipe bytes into events, markers, loss and control lines.

    Feed it whatever the channel's ``read(65536)`` returned; a chunk may end in
    the middle of a line (and of a UTF-8 sequence): the tail waits for the
    next chunk.  Bytes that are not UTF-8 become U+FFFD; they never raise.

    The hot path takes every line of a chunk with one ``findall`` and names
    the events with one ``map``; only chunks with other lines in them
    (control, loss, garbage) are cut into runs of event lines around those.
    Events go to ``aggregate.add_batch`` as one :class:`EventBatch` per chunk
    (split at clock markers).  A raw-event writer gets the same rows, as the
    kernel printed them, through ``on_batch`` (one :class:`EventBatch` per run
    of events, with the clock map in force); ``on_event``, if given, gets
    every event as a :class:`TraceEvent` with parsed fields instead (building
    and parsing every event costs several times the rest).
    Event times are put on the controller's time axis by ``clock`` (a
    :class:`fleetprobe.clock.ClockMap`), which learns from the markers as they
    arrive; before the first marker an event's ``time`` is its raw trace
    timestamp and it is counted in ``stats.unsynced``.
    """

    def __init__(self, host: str, names: Mapping[str, str], *,
                 aggregate: LineSink | None = None,
                 on_event: Callable[[TraceEvent], None] | None = None,
                 on_batch: Callable[[EventBatch], None] | None = None,
                 on_control: Callable[[str], None] | None = None,
                 on_marker: Callable[[Marker], None] | None = None,
                 on_loss: Callable[[Loss], None] | None = None,
                 clock: ClockLike | None = None,
                 control_prefix: str = CONTROL_PREFIX,
                 trailer: str | None = None,
                 sealed: Iterable[str] = (),
                 unframed: Iterable[str] = ()) -> None:
        """Set up a stream for ``host``; ``names`` maps trace event names to probe names.

        ``control_prefix`` starts the runner's own lines: ``@@fp:<secret> `` with the
        run's secret (see :func:`control_prefix`), so that no text the kernel prints
        (a file name a user chose) can pass for one.

        ``trailer`` (the run's seal as the kernel prints it, :func:`fleetprobe.plan.seal_trailer`)
        frames the stream (issue 11 #2): a line of a ``sealed`` trace name is whole only where
        it ends with the trailer, whatever newlines and trace lines a user's string held before
        it; every other line (guarded events, markers, control and loss lines) is whole at its
        newline, and stands at a record boundary, so its head is the kernel's. ``unframed``
        names (neither sealed nor guarded) may go on over several lines: their continuation
        is folded in, and any line after them could be a user's (the report says so).
        Without ``trailer``, lines are framed as before (:meth:`_text`).
        """
        self.host = host
        self.control_prefix = control_prefix
        self._prefix_bytes = control_prefix.encode()
        self.names = dict(names)
        self.aggregate = aggregate
        self.on_event = on_event
        self.on_batch = on_batch
        self.on_control = on_control
        self.on_marker = on_marker
        self.on_loss = on_loss
        self.clock = clock
        self.stats = StreamStats()
        #: The newest trace timestamp read so far (events and markers): how far the stream has got in
        #: the host's trace time, whatever the controller's backlog (the probe watchdog compares it
        #: with the last clock marker's).
        self.last_trace_ts = 0.0
        #: The trace timestamp of the runner's last clock or heartbeat marker (None before the first).
        self.last_beat_ts: float | None = None
        #: pids (as printed) whose events are fleetprobe's own, dropped and counted (see exclude_pids).
        self._own: frozenset[str] = frozenset()
        self._add_batch: Callable[[str, EventBatch, Mapping[str, str]], None] | None = \
            getattr(aggregate, "add_batch", None)
        self._event_names = _EventNames()
        # The batch being collected: flushed at the end of each chunk and before each marker.
        self._rows: list[Row] = []
        self._row_names: list[str] = []
        self._counts: dict[str, int] = {}
        # The partial last line, as pieces (appending to one bytes object would copy it again per
        # chunk: quadratic in a line that never ends); _tail_len bytes in all.
        self._tail: list[bytes] = []
        self._tail_len = 0
        # Dropping an overlong line up to its newline.
        self._discarding = False
        # The last event line read: the next chunk may go on with its text (a newline in a string).
        self._pending: Row | None = None
        self._pending_joined = False
        self._slope = 1.0
        self._intercept = 0.0
        self._synced = False
        self._sync()
        self._trailer = trailer or None
        self._sealed = frozenset(sealed)
        self._unframed = frozenset(unframed)
        if self._trailer is not None:
            self._event_names = _SealedNames(self._sealed)
        # A sealed record not ended yet (its lines so far), its length, and whether it is being
        # dropped for its length (then only its seal is waited for).
        self._record: list[str] | None = None
        self._record_len = 0
        self._record_drop = False
        # Lines at a record boundary that may be the start of a comm holding a newline (at most 16
        # bytes in all: the printed comm field), waiting for the rest of their head.
        self._head_parts: list[str] = []

    def add_unframed(self, names: Iterable[str]) -> None:
        """Take these trace names as unframed from now on (their guard was refused on the host)."""
        self._unframed = self._unframed | frozenset(names)

    def exclude_pids(self, pids: frozenset[int] | set[int]) -> None:
        """Drop (and count in ``stats.own_events``) the events of these pids from now on.

        For fleetprobe's own processes on a host whose kernel would not take the
        runner's ``common_pid !=`` filter: events it cannot keep out there are left
        out here, and said to be.  Costs one set lookup per event while set.
        """
        self._own = frozenset(str(p) for p in pids)

    def feed(self, data: bytes) -> None:
        """Consume one chunk of the channel's bytes.

        Linear in the bytes fed: only the new chunk is searched for newlines. A line longer
        than :data:`MAX_LINE_BYTES` is dropped whole (counted in ``stats.overlong``), never
        kept. The chunk's last event waits for the next chunk, which may continue its text
        (see :meth:`_continued`).
        """
        if not data:
            return
        self.stats.bytes += len(data)
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            self._discarding = False
            data = data[nl + 1:]
        cut = data.rfind(b"\n")
        if cut < 0:
            self._keep(data)
            return
        if self._tail:
            first = data.find(b"\n")
            if self._tail_len + first > MAX_LINE_BYTES:
                self._overlong()
                data = data[first + 1:]
                cut -= first + 1
            else:
                data = b"".join(self._tail) + data
                cut += self._tail_len
            self._tail, self._tail_len = [], 0
        self._keep(data[cut + 1:])
        if cut >= 0:
            self._text(data[:cut].decode("utf-8", "replace"), final=False)

    def _keep(self, data: bytes) -> None:
        """Keep a partial line for the next chunk, unless it grew past the cap."""
        if not data:
            return
        if self._tail_len + len(data) > MAX_LINE_BYTES:
            self._overlong()
            self._tail, self._tail_len = [], 0
            self._discarding = True
            return
        self._tail.append(data)
        self._tail_len += len(data)

    def _overlong(self) -> None:
        """Count a line dropped for its length."""
        self.stats.overlong += 1
        self.stats.lines += 1

    def close(self) -> None:
        """End of stream: parse a last line that had no newline, and the event held for continuation."""
        tail = b"".join(self._tail)
        self._tail, self._tail_len, self._discarding = [], 0, False
        if tail:
            self._text(tail.decode("utf-8", "replace"), final=True)
        elif self._pending is not None:
            rows, self._pending = [self._pending], None
            self._events(rows)
            self._flush()
        if self._head_parts:
            parts, self._head_parts = self._head_parts, []
            self._unparsed("\\n".join(parts))
        if self._record is not None:
            # A sealed event whose seal never came (the stream was cut): not an event.
            record, self._record = self._record, None
            if self._record_drop:
                self._record_drop = False
                self._overlong()
            else:
                self._unparsed("\\n".join(record).replace(SEALED, ""))

    def _sync(self) -> None:
        """Refresh the cached linear map from trace time to controller time."""
        if self.clock is not None and self.clock.synced:
            self._slope, self._intercept = self.clock.linear()
            self._synced = True

    def _text(self, text: str, *, final: bool) -> None:
        """Whole lines (joined by "\n"): events in runs, the other lines one by one, in order.

        Unless ``final``, the last line, if it is an event, is held back (``_pending``) for
        the next text, whose first lines may continue it; not our own clock and heartbeat
        markers (no user's text is in them, and the heartbeat judge must see them at once).
        """
        if self._trailer is not None:
            self._text_framed(text)
            return
        rows: list[Row] = (_ASCII_LINES_RE if text.isascii() else _LINES_RE).findall(text)
        joined = False
        if self._pending is not None:
            rows.insert(0, self._pending)
            self._pending, joined = None, self._pending_joined
        if all(map(_PID, rows)):
            if len(text) > MAX_LINE_BYTES:
                rows = self._capped(rows)
            if not final and rows and not rows[-1][4].startswith(MARKER_EVENT):
                self._pending, self._pending_joined = rows.pop(), False
            self._events(rows)
        else:
            rows, joined = self._continued(rows, joined)
            if not final and rows and rows[-1][1] and not rows[-1][4].startswith(MARKER_EVENT):
                self._pending, self._pending_joined = rows.pop(), joined
            start = 0
            for i in [i for i, row in enumerate(rows) if not row[1]]:
                self._events(rows[start:i])
                self._other(rows[i][4])
                start = i + 1
            self._events(rows[start:])
        self._flush()

    def _text_framed(self, text: str) -> None:
        """Whole lines of a sealed stream: one findall where every line is whole, else record by record.

        Each seal is first cut to the sentinel :data:`SEALED` (NUL: a NUL the host sent becomes
        U+FFFD first), one ``str.replace`` per chunk. A chunk whose lines are all trace heads,
        each sealed exactly where its event is (:class:`_SealedNames`), is taken as it is: the
        common case, at about the cost of an unsealed one.
        """
        if SEALED in text:
            text = text.replace(SEALED, "\ufffd")
        trailer = self._trailer
        assert trailer is not None
        text = text.replace(trailer + "\n", SEALED + "\n")
        if text.endswith(trailer):
            text = text[:-len(trailer)] + SEALED
        if self._record is None and not self._head_parts:
            rows: list[Row] = (_ASCII_LINES_RE if text.isascii() else _LINES_RE).findall(text)
            if all(map(_PID, rows)):
                names = list(map(self._event_names.__getitem__, map(_EVENT_TEXT, rows)))
                if _MISFRAMED not in names and not (len(text) > MAX_LINE_BYTES
                                                     and any(len(row[4]) > MAX_LINE_BYTES for row in rows)):
                    self._events(rows, names)
                    self._flush()
                    return
        self._lines_framed(text.split("\n"))
        self._flush()

    def _lines_framed(self, lines: list[str]) -> None:
        """The slow path of :meth:`_text_framed`: lines in order, sealed records put together.

        At a record boundary a line is a control or loss line, a trace head (the kernel's: the
        line before it ended an event), or the first part of a comm that holds a newline. A
        sealed event's record runs to the line that ends with its seal; everything in between
        (newlines, whole trace lines, control-looking text a user chose) is that event's text,
        newlines escaped as ``\\n``. A guarded event's line is whole. An unframed event's
        continuation lines are folded into it, as before.
        """
        rows: list[Row] = []
        names: list[str] = []
        prefix = self.control_prefix
        sealed = self._sealed
        fold = False          # the last row is an unframed event that a non-head line continues
        folded = False        # ... and it was already continued (counted once in multiline)

        def flush() -> None:
            nonlocal rows, names
            if rows:
                self._events(rows, names)
                rows, names = [], []

        for line in lines:
            record = self._record
            if record is not None:
                if line.startswith(prefix):
                    # The runner's own line (only its secret starts one), between two reads of a long line.
                    flush()
                    self._other(line)
                    continue
                self._record_len += len(line) + 1
                if not self._record_drop:
                    if self._record_len > MAX_LINE_BYTES:
                        self._record_drop = True
                        record.clear()
                    else:
                        record.append(line)
                if not line.endswith(SEALED):
                    continue
                self._record = None
                if self._record_drop:
                    self._record_drop = False
                    self._overlong()
                    continue
                got = self._sealed_record(record)
                if got is None:
                    flush()
                    self._unparsed("\\n".join(record).replace(SEALED, ""))
                else:
                    rows.append(got[0])
                    names.append(got[1])
                fold = False
                continue
            if not line:
                continue
            parts = self._head_parts
            head_lines = [line]
            m = None
            if parts:
                # The lines before were the start of a comm with a newline in it: is the head whole now?
                m = _RECORD_RE.match("\n".join([*parts, line]))
                if m is not None:
                    head_lines = [*parts, line]
                    self._head_parts = []
                elif len(line.encode("utf-8", "replace")) + sum(map(len, parts)) + len(parts) <= MAX_COMM_PART:
                    parts.append(line)
                    continue
                else:
                    self._head_parts = []
                    flush()
                    self._unparsed("\\n".join(parts))
            if m is None:
                if line.startswith(prefix) or (line.startswith("CPU:") and _LOSS_RE.match(line)):
                    flush()
                    self._other(line)
                    fold = False
                    continue
                if line == LINE_TOO_BIG:
                    # The kernel's own stand-in for an event longer than its print buffer.
                    flush()
                    self._overlong()
                    fold = False
                    continue
                m = _LINE_RE.match(line)
            if m is not None:
                comm, pid_s, cpu_s, ts_s, ev_text = m.groups()
                if len(head_lines) > 1:
                    # The printed comm is the pid's last saved one: a user's prctl(PR_SET_NAME) may have
                    # put a newline in it, whatever the event's own filter said of the comm then.
                    comm = comm.replace("\n", "\\n")
                    self.stats.multiline += 1
                name = split_event(ev_text)[0]
                ends = ev_text.endswith(SEALED)
                if name in sealed:
                    if ends:
                        rows.append((comm, pid_s, cpu_s, ts_s, ev_text))
                        names.append(name)
                    else:
                        self._record = head_lines
                        self._record_len = sum(map(len, head_lines)) + len(head_lines)
                        if len(head_lines) > 1:
                            self.stats.multiline -= 1      # counted once, when the record is whole
                    fold = False
                elif ends:
                    # The seal ends only sealed events' lines.
                    flush()
                    self._unparsed(line.replace(SEALED, ""))
                    fold = False
                else:
                    rows.append((comm, pid_s, cpu_s, ts_s, ev_text))
                    names.append(name)
                    fold, folded = name in self._unframed, False
                continue
            if fold and rows:
                comm, pid_s, cpu_s, ts_s, ev_text = rows[-1]
                if len(ev_text) + len(line) > MAX_LINE_BYTES:
                    self._overlong()
                    continue
                rows[-1] = (comm, pid_s, cpu_s, ts_s, ev_text + "\\n" + line)
                if not folded:
                    self.stats.multiline += 1
                    folded = True
                continue
            if len(line.encode("utf-8", "replace")) <= MAX_COMM_PART and not line.endswith(SEALED):
                # The start of a comm with a newline in it: its head goes on on the next line(s).
                self._head_parts = [line]
                continue
            flush()
            self._unparsed(line.replace(SEALED, ""))
            fold = False
        flush()

    def _sealed_record(self, record: list[str]) -> tuple[Row, str] | None:
        """A sealed record's lines (the last one sealed) as one row and its name, or None if it is no event.

        Its head is where the record starts (the kernel's); whatever the lines after it hold
        is the event's text, newlines escaped.
        """
        m = _RECORD_RE.match("\n".join(record))
        if m is None:
            return None
        comm, pid_s, cpu_s, ts_s, ev_text = m.groups()
        name = split_event(ev_text.replace("\n", "\\n"))[0]
        if name not in self._sealed or not ev_text.endswith(SEALED):
            return None
        if len(record) > 1:
            self.stats.multiline += 1
        return (comm.replace("\n", "\\n"), pid_s, cpu_s, ts_s, ev_text.replace("\n", "\\n")), name

    def _capped(self, rows: list[Row]) -> list[Row]:
        """Rows without the ones whose text is longer than the line cap (counted)."""
        kept = [row for row in rows if len(row[4]) <= MAX_LINE_BYTES]
        for _ in range(len(rows) - len(kept)):
            self._overlong()
        return kept

    def _continued(self, rows: list[Row], joined: bool) -> tuple[list[Row], bool]:
        """Fold every line that is neither a trace header nor a control or loss line into the event before it.

        The kernel prints ``%s`` fields raw: a file name with a newline in it goes on over
        several lines, and whatever follows the newline (a user's choice) must stay part of
        that event's text, escaped as ``\\n``, never become an event or a control line of
        its own. A line after no event at all is garbage (unparsed). Each event whose text
        held a newline is counted once (``stats.multiline``); ``joined`` says whether the
        first row (an event held from the last chunk) was already continued, and the
        result's second item whether the last event was.
        """
        out: list[Row] = []
        prefix = self.control_prefix
        last = -1          # index in out of the event the next stray line continues, or -1
        for row in rows:
            if row[1]:
                if out:
                    joined = False
                out.append(row)
                # Our own markers hold no user's text: a stray line after one continues nothing.
                last = -1 if row[4].startswith(MARKER_EVENT) else len(out) - 1
                continue
            line = row[4]
            if line.startswith(prefix) or (line.startswith("CPU:") and _LOSS_RE.match(line)):
                out.append(row)
                last = -1
                continue
            if last < 0:
                out.append(row)
                continue
            comm, pid, cpu, ts, ev_text = out[last]
            if len(ev_text) + len(line) > MAX_LINE_BYTES:
                # The event stays as it was; what would make it overlong is dropped and counted.
                self._overlong()
                continue
            out[last] = (comm, pid, cpu, ts, ev_text + "\\n" + line)
            if not joined:
                self.stats.multiline += 1
                joined = True
        return out, joined and last == len(out) - 1

    def _events(self, rows: list[Row], row_names: list[str] | None = None) -> None:
        """A run of event lines: the run's own events join the batch; markers and others' events are counted.

        ``row_names``: the rows' trace names, when the caller has them already.
        """
        if not rows:
            return
        stats = self.stats
        stats.lines += len(rows)
        last = float(rows[-1][3])
        if last > self.last_trace_ts:
            self.last_trace_ts = last
        if row_names is None:
            row_names = list(map(self._event_names.__getitem__, map(_EVENT_TEXT, rows)))
        counts = Counter(row_names)
        known = self.names
        own = self._own
        if own and any(pid in own for pid in map(_PID, rows)):
            # Our own processes' events among these (the kernel did not filter them): row by row.
            keep = [(row, name) for row, name in zip(rows, row_names) if row[1] not in own or name not in known]
            stats.own_events += len(rows) - len(keep)
            rows = [row for row, _ in keep]
            row_names = [name for _, name in keep]
            counts = Counter(row_names)
            if not rows:
                return
        if all(name in known for name in counts):
            if not self._synced:
                stats.unsynced += len(rows)
            self._take(rows, row_names, counts)
            return
        # A clock marker or someone else's events among ours: row by row.
        for row, name in zip(rows, row_names):
            if name in known:
                if not self._synced:
                    stats.unsynced += 1
                self._take([row], [name], {name: 1})
                continue
            args = split_event(row[4])[1]
            if name == MARKER_EVENT and args.startswith(BEAT_WORD):
                stats.markers += 1
                self.last_beat_ts = float(row[3])
                continue
            if name == MARKER_EVENT and args.startswith(MARKER_WORD):
                marker = parse_marker(float(row[3]), args)
                if marker is not None:
                    # Events before the marker keep the map they were read under.
                    self._flush()
                    stats.markers += 1
                    self.last_beat_ts = marker.trace_ts
                    if self.clock is not None:
                        self.clock.add_marker(marker)
                        self._sync()
                    if self.on_marker is not None:
                        self.on_marker(marker)
                    continue
            unknown = stats.unknown
            if name in unknown or len(unknown) < MAX_UNKNOWN_NAMES:
                unknown[name] = unknown.get(name, 0) + 1
            stats.unknown_lines += 1
            if len(stats.unknown_examples) < MAX_UNPARSED_EXAMPLES:
                comm, pid_s, cpu_s, ts_s, text = row
                stats.unknown_examples.append(f"{comm}-{pid_s} [{cpu_s}] {ts_s}: {text}"[:200])

    def _take(self, rows: list[Row], row_names: list[str], counts: Mapping[str, int]) -> None:
        """Add events of this run's probes to the batch (and hand them to ``on_batch``/``on_event``, if any)."""
        self._rows += rows
        self._row_names += row_names
        have = self._counts
        for name, n in counts.items():
            have[name] = have.get(name, 0) + n
        if self.on_batch is not None:
            # Now, not at the flush: the writer sees events in the order they were read (module
            # events are written between chunks) and under the clock map they were read with.
            self.on_batch(EventBatch(rows, row_names, dict(counts), self._slope, self._intercept))
        on_event = self.on_event
        if on_event is not None:
            names, host, slope, intercept = self.names, self.host, self._slope, self._intercept
            for (comm, pid_s, cpu_s, ts_s, text), name in zip(rows, row_names):
                ts = float(ts_s)
                args = split_event(text)[1]
                site, values = parse_fields(args)
                on_event(TraceEvent(host, names[name], ts * slope + intercept, ts, int(cpu_s),
                                    int(pid_s), comm, values, site, args))

    def _flush(self) -> None:
        """Hand the collected batch to the aggregate."""
        if not self._rows:
            return
        batch = EventBatch(self._rows, self._row_names, self._counts, self._slope, self._intercept)
        self._rows, self._row_names, self._counts = [], [], {}
        self.stats.events += len(batch)
        if self._add_batch is not None:
            self._add_batch(self.host, batch, self.names)
        elif self.aggregate is not None:
            add_line, host = self.aggregate.add_line, self.host
            for event in batch.events(self.names):
                add_line(host, *event)

    def _other(self, line: str) -> None:
        """A line that is not an event: control, loss, blank or garbage."""
        stats = self.stats
        prefix = self.control_prefix
        if line.startswith(prefix):
            stats.lines += 1
            stats.control += 1
            if self.on_control is not None:
                self.on_control(line[len(prefix):])
            return
        if not line.strip():
            return
        stats.lines += 1
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
