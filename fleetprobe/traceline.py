"""The trace-line grammar: what one trace_pipe line says, as pure functions that never raise.

:func:`parse_line` takes one line and returns a :class:`TraceEvent`, a :class:`Marker`
(``fpsync`` clock marker), a :class:`Loss` (``CPU:N [LOST M EVENTS]``), a :class:`Control`
line from the runner (``@@fp ...``) or None for garbage.  The compiled expressions here
(:data:`HEAD`, :data:`LINE_RE`, :data:`LINES_RE`) are the ones the stream reader
(:mod:`fleetprobe.parse`) runs over whole chunks; :func:`split_event` and
:func:`split_args` cut an event's text into its name, site and fields.

The line layout (kernel/trace/trace_output.c, print_trace_fmt + lat/irq info)::

    <comm right-aligned in 16>-<pid> [( tgid)] [cpu] [flags] <secs.usecs>: <event>: <args>

The parser anchors on the ``[cpu]`` column, because comm may contain spaces
(``kworker/u8:2 x``), dashes and even brackets: one compiled regular
expression takes the shortest comm followed by ``-pid``, an optional tgid
column and ``[cpu]``.  It matches spaces, not any whitespace (the kernel pads
with spaces, and `` +`` backtracks less).  On CPython 3.11 here it measured
0.70 M lines/s against 0.60-0.65 M for partition-and-validate versions that
check as much; one ``findall`` per chunk, written for the engine (see HEAD),
takes 1.1 M lines/s.  Argument text is split into fields only when someone
needs the values (see merge.FleetAggregate.add_batch).
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Distinct event texts whose names :func:`split_event` (and a stream) remember.
EVENT_TEXT_CACHE = 4096

#: One event line as the kernel printed it: (comm, pid, cpu, timestamp, event text "name: args").
Row = tuple[str, str, str, str, str]

#: The longest line a stream keeps (bytes or characters). The kernel prints an event into one
#: page-sized buffer (trace_seq, 8 KiB on 6.x); a line past this is a host's attack, not an event.
MAX_LINE_BYTES = 256 * 1024
#: What the kernel prints instead of an event too long for its print buffer (tracing_read_pipe).
LINE_TOO_BIG = "[LINE TOO BIG]"

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
HEAD = (r" *+(.*?)-(\d{1,10}+) ++(?:\( *+(?:\d{1,10}+|-++)\) ++|)\[(\d{1,6}+)\] ++(?:\S{1,8} +|)"
         r"(\d{1,12}+\.\d{1,9}+): ")
# One line (parse_line): the head, then the event text (split by split_event).
LINE_RE = re.compile(HEAD + r"([^: \n].*)")
#: The shortest name fleetprobe gives a dynamic event (seal.trace_name_of, issue 11). The kernel prints a task's comm
#: (at most 15 bytes: TASK_COMM_LEN - 1) at the head of every line, and a user chooses it
#: (prctl(PR_SET_NAME), or the name of a file or symlink they exec). A comm can hold a fake head
#: before the kernel's: the shortest text HEAD takes is 12 characters, ``-1 [0] 1.1: ``
#: (an empty comm, one-digit pid and cpu, no tgid, no flags, a timestamp ``1.1``), and the fake
#: event name must end inside the comm as well (at ``:``, `` `` or ``(``: otherwise it runs on into
#: the kernel's ``-<pid>``, and no event name holds ``-``). So a comm names at most a
#: 15 - 12 - 1 = 2 character event; a name of 3 or more characters can never be forged in one.
MIN_TRACE_NAME = 3
#: The kernel prints a comm right-aligned in 16 (``"%16s-%-7d "``, trace_output.c
#: trace_print_context; a comm is at most 15 bytes): the ``-`` before the kernel's pid is at a
#: line's 16th byte or later. A head HEAD finds before it is a fake one inside a comm.
COMM_FIELD_BYTES = 16
# What follows the comm in a head (HEAD after its comm group), and the event text; newlines allowed.
_AFTER_COMM_RE = re.compile("(?s)" + HEAD.partition("(.*?)")[2] + r"([^: \n].*)")


def kernel_head(text: str) -> Row | None:
    """``text`` (a line, or a record's lines joined) read at the kernel's own head, or None.

    HEAD takes the shortest comm, so a comm a user chose (``-1 [0] 1.1: ab:``) can put a fake
    head first. The kernel's is the first whose ``-<pid>`` is at byte :data:`COMM_FIELD_BYTES`
    or later. Only for lines the shortest comm could not attribute (not the hot path).
    """
    pos = text.find("-")
    while 0 <= pos <= 4 * COMM_FIELD_BYTES:
        if len(text[:pos].encode("utf-8", "replace")) >= COMM_FIELD_BYTES:
            m = _AFTER_COMM_RE.match(text, pos)
            if m is not None:
                return (text[:pos].lstrip(" "), *m.groups())  # type: ignore[return-value]
        pos = text.find("-", pos + 1)
    return None
# Every line of a decoded chunk in one findall, one row per line (lines end at
# "\n" only, as with str.split("\n")): an event line gives comm, pid, cpu,
# timestamp and its event text ("name: args", which must start like a name,
# as in LINE_RE); any other line gives four empty columns and the line.
_LINES = r"(?m)^(?:" + HEAD + r"(?=[^: \n])|)(.*)"
LINES_RE = re.compile(_LINES)
# The same for text that is all ASCII (str.isascii() is O(1)), 15% faster:
# re.ASCII makes \d a plain [0-9] test (all a Unicode \d can match in ASCII
# text), and \S is spelled out as Unicode's (which also excludes \x1c-\x1f).
ASCII_LINES_RE = re.compile(_LINES.replace(r"\S", r"[^\t-\r\x1c-\x1f ]"), re.ASCII)
# An event text's name, the separator after it and its argument text. Most events print
# "name: args"; syscall tracepoints print "sys_NAME(arg: value, ...)" at entry and
# "sys_NAME -> 0xRET" at exit (kernel/trace/trace_syscalls.c, print_syscall_enter/exit).
_EVENT_TEXT_RE = re.compile(r"([^: (]+)(\(| -> |:? ?)(.*)", re.S)
# One argument of a syscall entry line: "name: hexvalue" (0x-prefixed since about 6.10,
# bare %lx before), maybe followed by a quoted user string (kernels that read them).
_SYSCALL_ARG_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*): (?:0x)?([0-9a-fA-F]+)(?: ("(?:[^"]|"(?!, [A-Za-z_]\w*: |\)$))*"))?'
                             r'(?:, |\)$)')
LOSS_RE = re.compile(r"^\s*CPU:\s*(\d{1,6})\s+\[LOST\s+(\d{1,19})\s+EVENTS\]")
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
        _split_plain(args, values)
        return site, values
    if STRING_END in args:
        return site, _split_ended(args)
    return site, _split_quoted(args)


#: What the stream makes of a sealed line's string ends (seal.string_ends, printed by the kernel
#: after each string with the run's seal): NUL, as :data:`SEALED`. In a sealed stream a NUL the host
#: sent is U+FFFD before the string ends are marked, so every NUL inside a line is the kernel's.
STRING_END = "\x00"


def _split_ended(args: str) -> dict[str, str]:
    """:func:`split_args` for a sealed line whose strings end at :data:`STRING_END` (issue 11 #2).

    The kernel prints fetch args in order: between two string ends (and before the first) come
    its own ``name=value`` tokens (numbers, symbols: no quotes, no spaces), then one string,
    ``name="<a user's bytes>"`` (or ``name=(fault)``). The first ``="`` of such a piece opens
    its string; whatever follows, up to the string end, is that string's value, so no text in a
    string can stand for a field printed before or after it.

    The last piece (after the last string end) is read the same way: a string fetch arg added after
    the ends were placed (the aggregation fallback's ``comm=$comm:string``) runs to the line's end.
    """
    values: dict[str, str] = {}
    for piece in args.split(STRING_END):
        opening = piece.find('="')
        if opening < 0:
            _split_plain(piece, values)
            continue
        before, _, name = piece[:opening].rpartition(" ")
        _split_plain(before, values)
        values[name] = piece[opening + 1:]
    return values


def _split_plain(text: str, values: dict[str, str]) -> None:
    """Unquoted ``name=value`` tokens into ``values`` (a token without ``=`` continues the last value).

    The kernel prints each field once: a second ``name=`` came from a string a user chose (a comm
    ``x pid=1``). Which one is the kernel's is not knowable here, so the field is :data:`AMBIGUOUS`
    (issue 11 #2; a sealed line's strings are split off by their ends first, see _split_ended).
    """
    last = ""
    for tok in text.split(" "):
        name, eq, value = tok.partition("=")
        if eq and name:
            if name in values:
                values[name] = AMBIGUOUS
                last = ""
                continue
            values[name] = value
            last = name
        elif last and tok:
            values[last] += " " + tok


_NEXT_NAME_RE = re.compile(r'" [A-Za-z_][A-Za-z0-9_.\[\]]*=')


#: The value of a field printed twice in one unsealed event (one of them by a user's string).
AMBIGUOUS = "(ambiguous: printed twice)"


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
        else:
            end = args.find(" ", vstart)
            if end < 0:
                end = n
        pos = end
        if name in values:  # printed twice: see _split_plain
            values[name] = AMBIGUOUS
            last = ""
            continue
        values[name] = args[vstart:end]
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
        m = LOSS_RE.match(line)
        return Loss(int(m[1]), int(m[2])) if m else None
    m = LINE_RE.match(line)
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



#: What a sealed line's seal becomes in the stream's text: NUL, which no kernel-printed text holds
#: (strings and comms end at their NUL), so the line's end is one character to test, and C-speed
#: ``str.replace`` marks a whole chunk's seals at once.
SEALED = "\x00"


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
