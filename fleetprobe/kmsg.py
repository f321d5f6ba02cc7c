"""Kernel log records (/dev/kmsg) and the lines fleetprobe's modules print, parsed into events.

Everything here is pure: bytes in, values out; the on-host runner reads
/dev/kmsg and the orchestrator feeds what it streams back into a
:class:`KmsgCollector` (or calls the functions directly).

/dev/kmsg (3.5+, Documentation/ABI/testing/dev-kmsg) gives one record per
read(2)::

    prio,seq,usec,flags[,more];text
     KEY=value                      <- zero or more "dictionary" lines

``prio`` is ``facility << 3 | level``; ``seq`` is a 64-bit sequence number
that grows by one per record, so a jump means records were overwritten
before anyone read them (read(2) then fails once with EPIPE and a reader such
as ``cat`` may stop: the runner reopens, which replays the ring from the
oldest record, hence records with an already seen seq are dropped here).
``usec`` is the printk clock (local_clock(): monotonic since boot, not
CLOCK_REALTIME).  ``flags`` is ``-``, or ``c`` for a continuation fragment.
Extra comma fields appear on some kernels (``caller=T123`` with
CONFIG_PRINTK_CALLER, 5.1+) and are kept, not interpreted.  In ``text`` the
kernel escapes bytes below 0x20, from 0x7f up, and the backslash itself as
``\\xHH``; they are unescaped here.

Module lines (modules/fp_kprobe/README.md) look like::

    fleetprobe run=<run> probe=<probe> ev=<ev> key=value ... [comm=<rest of line>]

``comm=`` is always last and its value runs to the end of the line (task names
may contain spaces); any other token without ``=`` continues the previous
value (``%pS`` may print ``sym+0x0/0x10 [mod]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from fleetprobe.traceline import TraceEvent

#: The first word of every line fleetprobe's modules print.
LINE_PREFIX = "fleetprobe "

#: ``ev`` values that are probe hits (become TraceEvents); the others are status lines.
EVENT_KINDS = frozenset({"pre", "post", "ret"})

_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_LEADING_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class KmsgFormatError(ValueError):
    """A line that is not a /dev/kmsg record header; names the line and what was expected."""

    def __init__(self, line: str, reason: str, *, where: str = "") -> None:
        self.line = line
        self.reason = reason
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}not a /dev/kmsg record ({reason}): {line[:120]!r}")


@dataclass(frozen=True, slots=True)
class KmsgRecord:
    """One /dev/kmsg record: header fields, unescaped text, dictionary lines (``SUBSYSTEM=...``)."""

    facility: int
    level: int
    seq: int
    usec: int
    flags: str
    text: str
    props: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()

    @property
    def timestamp(self) -> float:
        """Seconds on the printk clock (monotonic since boot)."""
        return self.usec / 1e6

    @property
    def continuation(self) -> bool:
        """True for a fragment of a message continued with KERN_CONT."""
        return "c" in self.flags


def unescape(text: str) -> str:
    """Undo the kernel's ``\\xHH`` escaping; bytes that are not UTF-8 become U+FFFD."""
    if "\\x" not in text:
        return text
    raw = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        raw += text[pos:m.start()].encode("utf-8", "surrogateescape")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += text[pos:].encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "replace")


def parse_header(line: str, *, where: str = "") -> KmsgRecord:
    """Parse one record's first line (``prio,seq,usec,flags[,...];text``), without dictionary lines."""
    head, sep, text = line.partition(";")
    if not sep:
        raise KmsgFormatError(line, "no ';' after the header", where=where)
    parts = head.split(",")
    if len(parts) < 4:
        raise KmsgFormatError(line, "header needs prio,seq,usec,flags", where=where)
    try:
        prio, seq, usec = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        raise KmsgFormatError(line, "prio, seq and usec must be decimal numbers", where=where) from None
    return KmsgRecord(facility=prio >> 3, level=prio & 7, seq=seq, usec=usec, flags=parts[3],
                      text=unescape(text.rstrip("\n")), extra=tuple(parts[4:]))


def parse_records(data: bytes | str, *, where: str = "") -> list[KmsgRecord]:
    """Parse whole records (as concatenated reads of /dev/kmsg); raise KmsgFormatError on a bad line.

    Keeps every record, duplicates included: deduplication and gap counting
    are :class:`KmsgStream`'s job.
    """
    stream = KmsgStream(where=where, strict=True)
    records = stream.feed(data)
    return records + stream.flush()


class KmsgStream:
    """Incremental /dev/kmsg reader state: splits chunks into records, drops replays, counts gaps.

    ``feed()`` takes chunks cut anywhere and returns the records completed so
    far.  A record is complete once the next record's header arrives, or when
    a chunk ends exactly at the end of a line: read(2) of /dev/kmsg returns a
    record together with its dictionary lines, so a line-aligned chunk end is
    almost always a record end, and a live stream must not hold its latest
    event back until the kernel logs something else.  Dictionary lines that
    arrive after their record was returned are counted in ``late_props``.

    Counters: ``lost`` records never seen (sum of sequence gaps), ``gaps`` the
    gaps themselves as (last seen seq, next seq) pairs, ``duplicates`` records
    dropped because their seq was already seen (a reopened reader replays the
    ring), ``late_props`` dictionary lines that came after their record was
    returned, ``malformed`` lines that were not records (kept in ``bad_lines``,
    at most 20), unless ``strict`` in which case they raise.
    """

    def __init__(self, *, where: str = "", strict: bool = False, last_seq: int | None = None) -> None:
        """``last_seq``: the last sequence number already consumed (e.g. from a previous connection)."""
        self.where = where
        self.strict = strict
        self.last_seq = last_seq
        self.lost = 0
        self.gaps: list[tuple[int, int]] = []
        self.duplicates = 0
        self.late_props = 0
        self.malformed = 0
        self.bad_lines: list[str] = []
        self._partial = b""
        self._pending: KmsgRecord | None = None
        self._pending_props: list[tuple[str, str]] = []
        self._skipping = False
        self._emitted = False  # the last record was returned at a chunk end

    def feed(self, chunk: bytes | str) -> list[KmsgRecord]:
        """Add bytes read from the host; return the records now complete, in order."""
        data = self._partial + (chunk.encode("utf-8", "surrogateescape") if isinstance(chunk, str) else chunk)
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out: list[KmsgRecord] = []
        for raw in lines:
            self._line(raw.decode("utf-8", "replace"), out)
        if not self._partial:
            self._finish_pending(out)
            self._emitted = True
        return out

    def flush(self) -> list[KmsgRecord]:
        """Finish: return the held-back record (and a final line that had no newline)."""
        out: list[KmsgRecord] = []
        if self._partial:
            partial, self._partial = self._partial, b""
            self._line(partial.decode("utf-8", "replace"), out)
        self._finish_pending(out)
        return out

    def _line(self, line: str, out: list[KmsgRecord]) -> None:
        """Handle one line: a dictionary line of the pending record, or a new record header."""
        if not line:
            return
        if line.startswith(" "):
            key, sep, value = line[1:].partition("=")
            if self._pending is not None and sep:
                self._pending_props.append((key, unescape(value)))
            elif self._skipping:
                return  # the dictionary of a record dropped as a duplicate
            elif self._emitted and sep:
                self.late_props += 1
            else:
                self._bad(line, "dictionary line without a record before it")
            return
        try:
            record = parse_header(line, where=self.where)
        except KmsgFormatError as exc:
            self._finish_pending(out)
            self._skipping = self._emitted = False
            self._bad(line, exc.reason)
            return
        self._finish_pending(out)
        self._emitted = False
        self._skipping = self.last_seq is not None and record.seq <= self.last_seq
        if self._skipping:
            self.duplicates += 1
            return
        if self.last_seq is not None and record.seq > self.last_seq + 1:
            self.lost += record.seq - self.last_seq - 1
            self.gaps.append((self.last_seq, record.seq))
        self.last_seq = record.seq
        self._pending = record

    def _finish_pending(self, out: list[KmsgRecord]) -> None:
        """Emit the held-back record with the dictionary lines collected for it."""
        if self._pending is None:
            return
        record = self._pending
        if self._pending_props:
            record = KmsgRecord(record.facility, record.level, record.seq, record.usec, record.flags,
                                record.text, tuple(self._pending_props), record.extra)
        out.append(record)
        self._pending = None
        self._pending_props = []

    def _bad(self, line: str, reason: str) -> None:
        """Count (or, when strict, raise on) a line that is not part of a record."""
        if self.strict:
            raise KmsgFormatError(line, reason or "malformed header", where=self.where)
        self.malformed += 1
        if len(self.bad_lines) < 20:
            self.bad_lines.append(line)


@dataclass(frozen=True, slots=True)
class ModuleLine:
    """A line printed by one of fleetprobe's modules: run, probe, ev, the other values as text, comm."""

    run: str
    probe: str
    ev: str
    values: dict[str, str] = field(default_factory=dict)
    comm: str | None = None


def parse_module_line(text: str) -> ModuleLine | None:
    """Parse a fleetprobe module line; None for any other kernel message (or one missing run/probe/ev)."""
    if not text.startswith(LINE_PREFIX):
        return None
    body = text[len(LINE_PREFIX):]
    comm: str | None = None
    cut = body.find(" comm=")
    if cut >= 0:
        comm = body[cut + len(" comm="):]
        body = body[:cut]
    elif body.startswith("comm="):
        comm, body = body[len("comm="):], ""
    values: dict[str, str] = {}
    last: str | None = None
    for token in body.split(" "):
        if not token:
            continue
        key, sep, value = token.partition("=")
        if sep and key:
            values[key] = value
            last = key
        elif last is not None:
            # A value that printed with a space in it (%pS of a module symbol).
            values[last] += " " + token
    run, probe, ev = values.pop("run", ""), values.pop("probe", ""), values.pop("ev", "")
    if not (run and probe and ev):
        return None
    return ModuleLine(run=run, probe=probe, ev=ev, values=values, comm=comm)


def field_value(text: str) -> int | str:
    """A module value as int when it is ``0x`` hex or decimal (``-`` allowed), else the text."""
    try:
        if text.startswith(("0x", "0X")):
            return int(text, 16)
        if text.lstrip("-").isdigit():
            return int(text, 10)
    except ValueError:
        pass
    return text


def to_event(record: KmsgRecord, line: ModuleLine, *, host: str, clock_offset: float | None) -> TraceEvent:
    """Turn a probe-hit line (ev pre, post or ret) into a TraceEvent.

    ``trace_ts`` is the record's printk time in seconds; ``time`` adds
    ``clock_offset`` (host realtime minus printk clock, see
    :func:`clock_offset_from`), or is 0.0 when no offset is known.
    ``fields`` holds ``ev`` and every value except run, probe, cpu, pid and comm;
    ``site`` is the ``sym`` value.
    """
    if line.ev not in EVENT_KINDS:
        raise ValueError(f"{host}: kmsg seq {record.seq}: ev={line.ev} is a status line, not a probe hit")
    out: dict[str, int | str] = {"ev": line.ev}
    for key, value in line.values.items():
        if key not in ("cpu", "pid"):
            out[key] = field_value(value)
    cpu = field_value(line.values.get("cpu", "-1"))
    pid = field_value(line.values.get("pid", "-1"))
    ts = record.timestamp
    site = line.values.get("sym", "")
    # ``args`` in the layout of a kprobe's trace line, "(site) name=value ...", as printed:
    # the fleet aggregate counts argument texts and parses them the same way for both kinds.
    args = " ".join([f"({site})"] * bool(site) + [f"ev={line.ev}"] + [
        f"{k}={v}" for k, v in line.values.items() if k not in ("cpu", "pid", "sym")])
    return TraceEvent(host=host, probe=line.probe,
                      time=ts + clock_offset if clock_offset is not None else 0.0,
                      trace_ts=ts, cpu=cpu if isinstance(cpu, int) else -1,
                      pid=pid if isinstance(pid, int) else -1,
                      comm=line.comm if line.comm is not None else "",
                      fields=out, site=site, args=args)


def clock_offset_from(record: KmsgRecord, line: ModuleLine) -> float | None:
    """Host realtime minus printk clock, from an ``ev=clock realtime=<epoch secs>`` line.

    The runner writes ``fleetprobe run=<run> probe=- ev=clock realtime=$(date +%s.%N)``
    into /dev/kmsg; the kernel stamps that record with its printk clock, so
    the pair gives the offset (error: the few ms between ``date`` and the write,
    or up to a second where ``date`` has no ``%N``).
    """
    if line.ev != "clock":
        return None
    # busybox date has no %N and prints "1795656830.%N": whole seconds are still a clock.
    m = _LEADING_NUMBER.match(line.values.get("realtime", ""))
    return float(m.group(0)) - record.timestamp if m else None


@dataclass
class ProbeStatus:
    """What a module said about itself: where it was planted, its failure, its totals at unload."""

    planted_at: str = ""
    failed: str = ""
    suppressed: int = 0
    hits: int | None = None
    printed: int | None = None
    missed: int | None = None
    unregistered: bool = False


class KmsgCollector:
    """One host's kernel log stream for one run: records in, that run's events and probe status out.

    Lines of other runs and ordinary kernel messages are ignored (``other``
    counts them).  ``status`` maps probe name to :class:`ProbeStatus`;
    ``stream`` holds the sequence counters (lost, duplicates, malformed).
    """

    def __init__(self, host: str, run: str, *, last_seq: int | None = None) -> None:
        """Collect for ``host`` the lines of ``run``; ``last_seq`` as in KmsgStream."""
        self.host = host
        self.run = run
        self.stream = KmsgStream(where=host, last_seq=last_seq)
        self.clock_offset: float | None = None
        self.status: dict[str, ProbeStatus] = {}
        self.other = 0

    def feed(self, chunk: bytes | str) -> list[TraceEvent]:
        """Add a chunk of /dev/kmsg output; return this run's probe hits completed so far."""
        return self._take(self.stream.feed(chunk))

    def flush(self) -> list[TraceEvent]:
        """End of stream: return the last held-back event, if any."""
        return self._take(self.stream.flush())

    def _take(self, records: Iterable[KmsgRecord]) -> list[TraceEvent]:
        """Sort records into events, status updates and other messages."""
        events: list[TraceEvent] = []
        for record in records:
            line = parse_module_line(record.text)
            if line is None or line.run != self.run:
                self.other += 1
                continue
            if line.ev in EVENT_KINDS:
                events.append(to_event(record, line, host=self.host, clock_offset=self.clock_offset))
                continue
            if line.ev == "clock":
                self.clock_offset = clock_offset_from(record, line)
                continue
            st = self.status.setdefault(line.probe, ProbeStatus())
            v = {k: field_value(x) for k, x in line.values.items()}
            if line.ev == "planted":
                st.planted_at = str(line.values.get("addr") or line.values.get("sym", ""))
            elif line.ev == "failed":
                st.failed = f"sym={line.values.get('sym', '?')} err={line.values.get('err', '?')}"
            elif line.ev == "suppressed":
                count = v.get("count", 0)
                st.suppressed += count if isinstance(count, int) else 0
            elif line.ev == "unregistered":
                st.unregistered = True
                for key in ("hits", "printed", "missed"):
                    val = v.get(key)
                    setattr(st, key, val if isinstance(val, int) else None)
                total = v.get("suppressed")
                if isinstance(total, int):
                    st.suppressed = total  # the module's own total is authoritative
        return events


#: What the runner's kernel-log forwarder writes into the run's trace_marker before each record.
MARKER_PREFIX = b"tracing_mark_write: fpk "


class MarkerSplitter:
    """Take kernel log records out of a runner's trace_pipe stream.

    The runner writes every kernel log record of the run into the instance's
    trace_marker as ``fpk <record>``, so the records travel through the ring
    buffer next to the trace events and reach the controller as whole lines::

        <...>-311 [000] ...1.  25.34: tracing_mark_write: fpk 6,812,25339123,-;fleetprobe run=...

    :meth:`feed` takes the channel's chunks (cut anywhere) and returns
    (bytes for the trace parser, the records as /dev/kmsg text for a
    :class:`KmsgCollector`).  Only whole lines go to either side, and a chunk
    without a record (the usual case) costs one ``bytes.find``.
    """

    def __init__(self, secret: str = "") -> None:
        """An empty splitter; ``secret`` is the run's control secret, which the runner's records carry
        (``fpk:<secret> <record>``): a line a user's string put in the stream cannot pass for one."""
        self._tail = b""
        self.records = 0
        self.prefix = MARKER_PREFIX if not secret else MARKER_PREFIX[:-1] + f":{secret} ".encode()

    def feed(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Split one chunk; a partial last line waits for the next chunk."""
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:]
        return self._split(data[:cut])

    def flush(self) -> tuple[bytes, bytes]:
        """End of stream: split what is left (a last line without a newline)."""
        data, self._tail = self._tail, b""
        return self._split(data)

    def _split(self, data: bytes) -> tuple[bytes, bytes]:
        """Split whole lines into trace lines and records."""
        prefix = self.prefix
        if prefix not in data:
            return data, b""
        trace: list[bytes] = []
        kmsg: list[bytes] = []
        for line in data.splitlines(keepends=True):
            at = line.find(prefix)
            if at < 0:
                trace.append(line)
                continue
            record = line[at + len(prefix):].rstrip(b"\r\n")
            kmsg.append(record + b"\n")
            self.records += 1
        return b"".join(trace), b"".join(kmsg)
