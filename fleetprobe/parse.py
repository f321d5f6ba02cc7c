"""Parse: one host's raw trace_pipe bytes into events, markers, loss and control lines (the stream reader).

:class:`TraceStream` is the hot path: it is fed the raw bytes the controller
reads from the runner's channel (large chunks, never line by line: see
PERF-NOTES), keeps a partial last line for the next chunk, takes all lines
of a chunk with one ``findall``, and hands the events to the aggregate as an
:class:`EventBatch` of the strings the kernel printed; a raw-event writer
gets the same batches (``on_batch``), or, on request, every event as a
:class:`TraceEvent` through a callback (``on_event``, several times dearer).

What one line says (its grammar, and :func:`~fleetprobe.traceline.parse_line` for a single
line) is :mod:`fleetprobe.traceline`; how a sealed stream's records are put back together
where a user's text holds newlines (the slow path) is :mod:`fleetprobe.framed`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Protocol

from fleetprobe.framed import SealedFraming
from fleetprobe.traceline import (ASCII_LINES_RE, BEAT_WORD, CONTROL_PREFIX, EVENT_TEXT_CACHE, LINES_RE, LOSS_RE,
                                  MARKER_EVENT, MARKER_WORD, MAX_LINE_BYTES, SEALED, STRING_END, Loss, Marker, Row, TraceEvent,
                                  parse_fields, parse_marker, split_event)


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
MAX_UNPARSED_EXAMPLES = 5



_PID = itemgetter(1)
_EVENT_TEXT = itemgetter(4)


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


#: The name a stream gives a line whose seal does not fit its event (a sealed probe's line without
#: it, another line with it): such a chunk goes the slow way (records), never the fast one.
_MISFRAMED = "\x00misframed"


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
                 unframed: Iterable[str] = (),
                 string_ends: Iterable[str] = ()) -> None:
        """Set up a stream for ``host``; ``names`` maps trace event names to probe names.

        ``control_prefix`` starts the runner's own lines: ``@@fp:<secret> `` with the
        run's secret (see :func:`control_prefix`), so that no text the kernel prints
        (a file name a user chose) can pass for one.

        ``trailer`` (the run's seal as the kernel prints it, :func:`fleetprobe.seal.seal_trailer`)
        frames the stream (issue 11 #2): a line of a ``sealed`` trace name is whole only where
        it ends with the trailer, whatever newlines and trace lines a user's string held before
        it; every other line (guarded events, markers, control and loss lines) is whole at its
        newline, and stands at a record boundary, so its head is the kernel's. ``unframed``
        names (neither sealed nor guarded) may go on over several lines: their continuation
        is folded in, and any line after them could be a user's (the report says so).
        Without ``trailer``, lines are framed as before (:meth:`_text`). ``string_ends``
        (:func:`fleetprobe.seal.string_ends`, with a ``trailer`` only) are what the kernel prints
        after each string of a sealed line: each becomes :data:`~fleetprobe.traceline.STRING_END`,
        where a field splitter ends that string's value.
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
        self._string_ends = tuple(string_ends) if self._trailer is not None else ()
        # The record state of a sealed stream across chunks, and its line-by-line reading.
        self._framing = SealedFraming(self, control_prefix, sealed, unframed)
        if self._trailer is not None:
            self._event_names = _SealedNames(self._framing.sealed)

    def add_unframed(self, names: Iterable[str]) -> None:
        """Take these trace names as unframed from now on (their guard was refused on the host)."""
        self._framing.unframed = self._framing.unframed | frozenset(names)

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
        self._framing.close()

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
        rows: list[Row] = (ASCII_LINES_RE if text.isascii() else LINES_RE).findall(text)
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
        for end in self._string_ends:
            if end in text:
                text = text.replace(end, STRING_END)
        if self._framing.at_boundary:
            rows: list[Row] = (ASCII_LINES_RE if text.isascii() else LINES_RE).findall(text)
            if all(map(_PID, rows)):
                names = list(map(self._event_names.__getitem__, map(_EVENT_TEXT, rows)))
                if _MISFRAMED not in names and not (len(text) > MAX_LINE_BYTES
                                                     and any(len(row[4]) > MAX_LINE_BYTES for row in rows)):
                    self._events(rows, names)
                    self._flush()
                    return
        self._framing.lines(text.split("\n"))
        self._flush()

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
            if line.startswith(prefix) or (line.startswith("CPU:") and LOSS_RE.match(line)):
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
        self._mixed(rows, row_names)

    def _mixed(self, rows: list[Row], row_names: list[str]) -> None:
        """A run with a clock marker or someone else's events among ours: row by row."""
        stats = self.stats
        known = self.names
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
            if name == MARKER_EVENT and args.startswith(MARKER_WORD) and self._marker(float(row[3]), args):
                continue
            self._unknown(row, name)

    def _marker(self, trace_ts: float, args: str) -> bool:
        """Take a clock marker (True), or say it is none (a ``fpsync`` text that does not parse)."""
        marker = parse_marker(trace_ts, args)
        if marker is None:
            return False
        # Events before the marker keep the map they were read under.
        self._flush()
        self.stats.markers += 1
        self.last_beat_ts = marker.trace_ts
        if self.clock is not None:
            self.clock.add_marker(marker)
            self._sync()
        if self.on_marker is not None:
            self.on_marker(marker)
        return True

    def _unknown(self, row: Row, name: str) -> None:
        """Count an event that is not one of this run's probes (by name, for a bounded number of names)."""
        stats = self.stats
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
        m = LOSS_RE.match(line)
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
