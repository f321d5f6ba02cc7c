"""Report: render a FleetReport for people (rich terminal) and for programs (JSON, JSON-lines events).

Nothing here decides anything: it only shows what merge computed.  Big fleets
are summarised (top hosts + "N more") so a 2000-host report stays readable.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleetprobe import caveats
from fleetprobe.merge import FleetReport, Latency, bucket_range_ns
from fleetprobe.parse import EventBatch, TraceEvent, parse_fields, parse_value, split_event

#: Up to this many hosts the hits table is a full probe x host matrix.
MATRIX_HOSTS = 12
#: Rows shown per long list before "N more".
LIST_ROWS = 15
#: Values shown per field in the terminal (the JSON report keeps top_k).
VALUE_ROWS = 5
BAR_WIDTH = 40

_STATUS_STYLE = {"ok": "green", "failed": "red", "unreachable": "red", "skipped": "yellow",
                 "interrupted": "yellow"}


def format_ns(ns: int) -> str:
    """A duration in ns as a short human string (512ns, 4us, 1.0ms, 2.1s)."""
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns // 1_000}us" if ns % 1_000 == 0 or ns >= 10_000 else f"{ns / 1_000:.1f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.1f}ms"
    return f"{ns / 1e9:.1f}s"


def value_text(value: int | str) -> str:
    """How a field value reads in a table: ints in decimal and, when large, hex too."""
    if isinstance(value, int):
        # Flags and addresses read better in hex; pids and sizes below 64 Ki do not.
        return f"{value} ({value:#x})" if abs(value) >= 0x10000 else str(value)
    return repr(value) if value == "" or value != value.strip() else value


# html.py and markdown.py import the old private name.
_value_text = value_text


def render_summary(report: FleetReport, console: Console) -> None:
    """Print the whole summary: hosts, hits, top values, latency, quiet hosts, loss, clocks."""
    run = report.run
    agg = report.aggregate
    agg.finish()
    console.print(Text(f"fleetprobe run {run.run_id}: {run.playbook} on {len(report.hosts)} host(s), "
                       f"{run.duration:.1f}s", style="bold"))
    _render_status(report, console)
    _render_alerts(report, console)
    _render_hits(report, console)
    _render_values(report, console)
    _render_latency(report, console)
    _render_quiet(report, console)
    _render_loss(report, console)
    _render_caveats(report, console)
    _render_clocks(report, console)


def _render_caveats(report: FleetReport, console: Console) -> None:
    """Lines no probe could claim, and fleetprobe's own events left out (caveats.py): never a silent zero."""
    for host, text in caveats.fleet_caveats(report.hosts)[:LIST_ROWS * 2]:
        console.print(Text.assemble(("WARNING ", "bold yellow"), (f"{host}: ", "bold"), text))
    summary = caveats.own_filter_summary(report.hosts)
    if summary:
        console.print(summary, highlight=False)


def _render_alerts(report: FleetReport, console: Console) -> None:
    """What an operator must hear about even on hosts that ended ok (an oops during the run ...)."""
    for o in report.hosts:
        for alert in o.alerts:
            console.print(Text.assemble(("ALERT ", "bold red"), (f"{o.host}: ", "bold"), alert))


def _render_status(report: FleetReport, console: Console) -> None:
    """Counts per status, then the hosts that did not end ok (stage and reason)."""
    counts: dict[str, int] = {}
    for o in report.hosts:
        counts[o.status] = counts.get(o.status, 0) + 1
    line = Text("hosts: ")
    for i, (status, n) in enumerate(sorted(counts.items())):
        if i:
            line.append(", ")
        line.append(f"{n} {status}", style=_STATUS_STYLE.get(status, ""))
    console.print(line)
    bad = [o for o in report.hosts if o.status != "ok"]
    if not bad:
        return
    table = Table(title="hosts that did not finish", title_justify="left")
    for col in ("host", "status", "stage", "reason", "cleanup"):
        table.add_column(col, overflow="fold")
    for o in bad[:LIST_ROWS]:
        table.add_row(o.host, Text(o.status, style=_STATUS_STYLE.get(o.status, "")), o.stage,
                      o.reason or "-", o.cleanup)
    console.print(table)
    if len(bad) > LIST_ROWS:
        console.print(f"... and {len(bad) - LIST_ROWS} more hosts that did not finish (see the JSON report)")


def _render_hits(report: FleetReport, console: Console) -> None:
    """Hits per probe per host: a matrix for small fleets, totals and top hosts for big ones."""
    agg = report.aggregate
    probes = agg.probes()
    if not probes:
        console.print("no probes were placed or hit")
        return
    # Hosts that failed before probing are listed above; zero columns for them say nothing.
    hosts = [o.host for o in report.hosts
             if o.status == "ok" or (agg.hosts.get(o.host) and agg.hosts[o.host].events)] or sorted(agg.hosts)
    if len(hosts) <= MATRIX_HOSTS:
        table = Table(title="hits per probe and host", title_justify="left")
        table.add_column("probe")
        for h in hosts:
            table.add_column(h, justify="right")
        table.add_column("total", justify="right")
        table.add_column("misses", justify="right")
        outcomes = {o.host: o for o in report.hosts}
        for p in probes:
            per = agg.hits(p)
            table.add_row(p, *[caveats.hit_text(outcomes.get(h), p, per.get(h, 0)) for h in hosts],
                          str(agg.total_hits(p)), str(agg.probe_misses(p)))
        console.print(table)
        return
    table = Table(title="hits per probe", title_justify="left")
    for col in ("probe", "total", "misses", "hosts hit", "top hosts"):
        table.add_column(col, justify="left" if col in ("probe", "top hosts") else "right", overflow="fold")
    for p in probes:
        ranked = sorted(agg.hits(p).items(), key=lambda hn: (-hn[1], hn[0]))
        top = ", ".join(f"{h} {n}" for h, n in ranked[:3])
        if len(ranked) > 3:
            top += f", {len(ranked) - 3} more"
        if skipped := caveats.skipped_on(report.hosts, p):
            top += f"{'; ' if top else ''}{caveats.SKIPPED} on {len(skipped)} host(s)"
        table.add_row(p, str(agg.total_hits(p)), str(agg.probe_misses(p)), f"{len(ranked)}/{len(hosts)}",
                      top or "-")
    console.print(table)


def _render_values(report: FleetReport, console: Console) -> None:
    """Top values per probe, one table per probe and a section per field: which comm, which filename."""
    agg = report.aggregate
    for p in agg.probes():
        table = Table(title=f"{p}: top values", title_justify="left")
        for col, right in (("field", False), ("value", False), ("count", True), ("hosts", True),
                           ("share", True)):
            table.add_column(col, justify="right" if right else "left", overflow="fold")
        notes: list[str] = []
        for name in agg.fields(p):
            values = agg.values[(p, name)]
            top = values.top(min(agg.top_k, VALUE_ROWS))
            if not top:
                continue
            if values.exact and top[0][1] == 1 and len(values.counts) > 1:
                # Every value seen once (pids, pointers): a table of them says nothing.
                notes.append(f"{name}: {len(values.counts)} distinct values, none repeated")
                continue
            if values.total and top[0][1] < 0.05 * values.total and len(values.counts) > 2 * VALUE_ROWS:
                # Many values and none stands out (pids repeated across hosts ...): nothing to read.
                notes.append(f"{name}: {len(values.counts)}{'' if values.exact else '+'} distinct values, "
                             "none above 5%")
                continue
            for i, (value, count, nhosts) in enumerate(top):
                share = f"{100 * count / values.total:.1f}%" if values.total else "-"
                last = i == len(top) - 1
                table.add_row(name if i == 0 else "", value_text(value), str(count), str(nhosts), share,
                              end_section=last)
            more = len(values.counts) - len(top)
            extra = []
            if more > 0:
                extra.append(f"{more} more values")
            if not values.exact:
                extra.append(f"approximate: counts may be low by up to {values.error}")
            if extra:
                notes.append(f"{name}: " + "; ".join(extra))
        if table.row_count:
            if notes:
                table.caption = "\n".join(notes)
                table.caption_justify = "left"
            console.print(table)
        elif notes:
            console.print(f"{p}: " + "; ".join(notes), highlight=False)


def latency_lines(lat: Latency) -> list[str]:
    """A log2 histogram as text bars, one line per bucket from the first to the last non-empty one."""
    used = [b for b, c in enumerate(lat.buckets) if c]
    if not used:
        return []
    peak = max(lat.buckets)
    lines = []
    for b in range(used[0], used[-1] + 1):
        lo, hi = bucket_range_ns(b)
        c = lat.buckets[b]
        bar = "#" * max(1 if c else 0, round(BAR_WIDTH * c / peak))
        lines.append(f"{format_ns(lo):>7} - {format_ns(hi):<7} {c:>9} |{bar}")
    return lines


def _render_latency(report: FleetReport, console: Console) -> None:
    """Entry->return latency histograms of paired probes, fleet-wide."""
    agg = report.aggregate
    for ret, entry in sorted(agg.pairs.items()):
        lat = agg.latency(ret)
        if not lat.count and not lat.unmatched:
            continue
        p50, p99 = lat.quantile(0.5), lat.quantile(0.99)
        head = f"latency {entry} -> {ret}: {lat.count} calls"
        if p50 is not None and p99 is not None:
            head += f", p50 <= {format_ns(p50)}, p99 <= {format_ns(p99)}"
        notes = lat.caveats()
        console.print(Text(head + (f" ({'; '.join(notes)})" if notes else ""), style="bold"))
        for line in latency_lines(lat):
            console.print(line, highlight=False)


def _render_quiet(report: FleetReport, console: Console) -> None:
    """Hosts that contributed no events, probes skipped per host, and placed probes that never fired."""
    agg = report.aggregate
    quiet = agg.quiet_hosts()
    if quiet:
        console.print(Text(f"{len(quiet)} host(s) contributed no events:", style="bold"))
        for h, why in list(quiet.items())[:LIST_ROWS]:
            console.print(f"  {h}: {why}", highlight=False)
        if len(quiet) > LIST_ROWS:
            console.print(f"  ... and {len(quiet) - LIST_ROWS} more")
    skipped: dict[tuple[str, str], list[str]] = {}
    for o in report.hosts:
        for probe, reason in o.skipped_probes.items():
            skipped.setdefault((probe, reason), []).append(o.host)
    for (probe, reason), hosts in sorted(skipped.items()):
        console.print(f"probe {probe} skipped on {_host_list(hosts)}: {reason}", highlight=False)
    for probe in agg.probes():
        placed = [o.host for o in report.hosts if probe in o.placed_probes]
        silent = [h for h in placed if not agg.hosts.get(h) or not agg.hosts[h].hits.get(probe)]
        if placed and silent and len(silent) == len(placed):
            console.print(f"probe {probe} was placed on {_host_list(placed)} and never fired", highlight=False)


def _host_list(hosts: list[str], limit: int = 5) -> str:
    """``a, b, c and 7 more``."""
    if len(hosts) <= limit:
        return ", ".join(hosts)
    return f"{', '.join(hosts[:limit])} and {len(hosts) - limit} more"


def _render_loss(report: FleetReport, console: Console) -> None:
    """Loss counters of hosts that lost anything (ring buffer overrun, LOST lines, misses, cap)."""
    lossy = [o for o in report.hosts if o.loss.total]
    if not lossy:
        console.print("no events lost")
        return
    table = Table(title="events lost", title_justify="left")
    for col in ("host", "overrun", "dropped", "LOST lines", "probe misses", "kmsg gaps", "capped"):
        table.add_column(col, justify="left" if col == "host" else "right")
    for o in sorted(lossy, key=lambda o: -o.loss.total)[:LIST_ROWS]:
        lc = o.loss
        table.add_row(o.host, str(lc.overrun), str(lc.dropped), str(lc.lost_lines),
                      str(sum(lc.probe_misses.values())), str(lc.kmsg_gaps), str(lc.capped))
    console.print(table)
    if len(lossy) > LIST_ROWS:
        console.print(f"... and {len(lossy) - LIST_ROWS} more hosts lost events")


def _render_clocks(report: FleetReport, console: Console) -> None:
    """Host clock offsets vs the controller (the largest first): how far the timeline can be trusted."""
    clocked = [o for o in report.hosts if o.clock_offset is not None]
    if not clocked:
        return
    clocked.sort(key=lambda o: -abs(o.clock_offset or 0.0))
    worst = max(o.clock_error or 0.0 for o in clocked)
    console.print(Text(f"clock offsets vs controller ({len(clocked)} hosts; worst uncertainty "
                       f"+/-{worst * 1e3:.1f} ms):", style="bold"))
    for o in clocked[:5 if len(clocked) > MATRIX_HOSTS else MATRIX_HOSTS]:
        console.print(f"  {o.host}: {(o.clock_offset or 0.0) * 1e3:+.1f} ms "
                      f"+/- {(o.clock_error or 0.0) * 1e3:.1f} ms", highlight=False)


def write_json(report: FleetReport, path: str | os.PathLike[str]) -> None:
    """Write the report as JSON atomically (a reader never sees half a file)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report.to_json(), f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
    os.replace(tmp, target)


#: JSON exactly as ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` writes it, without
#: building an encoder per call.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: A str as a JSON string literal, as that encoder writes it (C-accelerated).
_encode_str: Callable[[str], str] = json.encoder.encode_basestring
#: Trace timestamps whose float repr is the text without trailing zeros: >= 1, at most 15 digits.
_PLAIN_TS = re.compile(r"(?:[1-9][0-9]{0,8}\.[0-9]{1,6}\n)*[1-9][0-9]{0,8}\.[0-9]{1,6}")
_COMM = itemgetter(0)
_PID_TEXT = itemgetter(1)
_CPU_TEXT = itemgetter(2)
_TS_TEXT = itemgetter(3)
_EVENT_TEXT = itemgetter(4)
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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open ``path`` for writing (truncates)."""
        self.path = Path(path)
        self.count = 0
        self._f: IO[str] | None = open(self.path, "w", encoding="utf-8", buffering=1 << 20)
        self._tails = _EventTails()
        self._comms = _Encoded()
        self._cpus = _IntText()

    def write(self, ev: TraceEvent) -> None:
        """Append one event."""
        if self._f is None:
            raise ValueError(f"{self.path}: event writer is closed")
        self._f.write(_encode_json(ev.to_json()) + "\n")
        self.count += 1

    def write_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Append every row of ``host``'s batch, in order (one write for the batch)."""
        if self._f is None:
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
        self._f.write("".join([
            f'{head}{time},"trace_ts":{ts},"cpu":{cpus[cpu]},"pid":{pid},"comm":{comms[comm]}{tails[text]}'
            for head, time, ts, (comm, _, cpu, _, text), pid
            in zip(map(heads.__getitem__, batch.names), time_json, ts_json, rows, pids)]))
        self.count += len(rows)

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> EventWriter:
        """Context manager entry."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close on exit."""
        self.close()


def _row_event(host: str, ev: tuple[str, float, float, int, int, str, str]) -> TraceEvent:
    """A TraceEvent from one of :meth:`EventBatch.events`'s tuples (the writer's rare exact path)."""
    probe, trace_ts, time, cpu, pid, comm, args = ev
    site, values = parse_fields(args)
    return TraceEvent(host, probe, time, trace_ts, cpu, pid, comm, values, site, args)


def load_json(path: str | os.PathLike[str]) -> FleetReport:
    """Read a report written by :func:`write_json`."""
    with open(path, encoding="utf-8") as f:
        data: Any = json.load(f)
    return FleetReport.from_json(data)
