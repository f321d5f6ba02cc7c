"""The stream fallback: aggregate tables computed on the controller from one host's streamed events.

Where a host's kernel cannot count a table (:mod:`fleetprobe.histplan` says why), the
probe's events stream as any other's and :class:`StreamTables` counts them here, into the
same :class:`~fleetprobe.aggtables.AggTable` a kernel table becomes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from fleetprobe.aggtables import AggProgress, AggTable, Key, Value, log2_bucket
from fleetprobe.histplan import AggPlan
from fleetprobe.parse import EventBatch, LineSink
from fleetprobe.traceline import parse_value, split_args, split_event

_SYSCALL_ENTER = re.compile(r"(?:sys_\w+\()?((?:[A-Za-z_]\w*: [^,]*, )*[A-Za-z_]\w*: [^,]*)\)\s*\Z", re.S)
_SYSCALL_EXIT = re.compile(r"(?:sys_\w+ -> )?(-?(?:0x)?[0-9a-fA-F]+)\s*\Z")


def event_values(args: str) -> dict[str, str]:
    """Raw field texts of one event's printed argument text: ``name=value`` pairs, or a syscall's.

    Syscall tracepoints print ``sys_statfs(pathname: 7ffd.., buf: ..)`` on entry and
    ``sys_statfs -> 0x0`` on exit (kernel/trace/trace_syscalls.c); the text may come with
    or without its ``sys_NAME(`` / ``sys_NAME -> `` head (a parser that splits it off).
    """
    if "=" in args and not args.startswith("sys_"):
        return split_args(args)[1]
    m = _SYSCALL_ENTER.match(args)
    if m:
        out: dict[str, str] = {}
        for part in m.group(1).split(", "):
            k, sep, v = part.partition(": ")
            if sep:
                out[k.strip()] = v.strip() if v.strip().startswith(("0x", "-")) else "0x" + v.strip()
        return out
    m = _SYSCALL_EXIT.match(args)
    if m:
        return {"ret": m.group(1)}
    return split_args(args)[1]


class StreamTables:
    """Tables computed on the controller from one host's streamed events (the fallback).

    Fed the rows the stream parser hands the aggregate (see :meth:`add_row`); each
    distinct argument text is split once per host.  Latency pairs entries and returns
    by pid, as :class:`~fleetprobe.merge.FleetAggregate` does, in nanoseconds of the
    trace clock (printed to the microsecond: a latency under 1 us lands in bucket <= 1024).
    """

    def __init__(self, plans: Iterable[AggPlan]) -> None:
        self.tables: dict[str, AggTable] = {}
        self.hits: dict[str, int] = {}
        self._by_probe: dict[str, list[AggTable]] = {}
        self._entries: dict[str, list[str]] = {}   # entry probe -> latency table ids
        self._pending: dict[str, dict[str, float]] = {}
        self._values: dict[str, dict[str, str]] = {}
        for p in plans:
            for tp in p.tables:
                if tp.mode != "stream":
                    continue
                t = AggTable(tp.table.probe, tp.table.kind, tp.table.field, tp.table.by, tp.table.top)
                self.tables[t.table_id] = t
                self.hits[t.table_id] = 0
                self._by_probe.setdefault(t.probe, []).append(t)
                if t.kind == "latency":
                    self._entries.setdefault(tp.source_probe, []).append(t.table_id)
                    self._pending[t.table_id] = {}

    @property
    def probes(self) -> set[str]:
        return set(self._by_probe) | set(self._entries)

    def add_row(self, probe: str, ts: float, pid: int, comm: str, args: str) -> None:
        """One streamed event of ``probe``."""
        for tid in self._entries.get(probe, ()):
            self._pending[tid][str(pid)] = ts
        tables = self._by_probe.get(probe)
        if not tables:
            return
        values: dict[str, str] | None = None
        for t in tables:
            self.hits[t.table_id] += 1
            if t.kind == "latency":
                t0 = self._pending[t.table_id].pop(str(pid), None)
                if t0 is None:
                    continue
                ns = int(round((ts - t0) * 1e9))
                if values is None:
                    values = self._values.get(args)
                    if values is None:
                        values = event_values(args)
                # The event's own comm (a comm=$comm fetch arg) where the probe carries one.
                k: Key = (*(_field_value(f, pid, comm, values) for f in t.by), log2_bucket(max(ns, 0)))
                t.counts[k] = t.counts.get(k, 0) + 1
                continue
            if values is None:
                values = self._values.get(args)
                if values is None:
                    values = event_values(args)
                    if len(self._values) < 65536:
                        self._values[args] = values
            if t.kind == "count":
                key: Key = (_field_value(t.field, pid, comm, values),)
            else:
                v = _field_value(t.field, pid, comm, values)
                if not isinstance(v, int):
                    continue
                key = (*(_field_value(f, pid, comm, values) for f in t.by), log2_bucket(v))
            t.counts[key] = t.counts.get(key, 0) + 1


def _field_value(name: str, pid: int, comm: str, values: Mapping[str, str]) -> Value:
    if name == "pid":
        return pid
    text = values.get(name)
    if text is None:
        return comm if name == "comm" else "(missing)"
    return parse_value(text)


class StreamTap:
    """A LineSink in front of the fleet aggregate that also feeds a host's :class:`StreamTables`."""

    def __init__(self, inner: LineSink, tables: StreamTables) -> None:
        self.inner = inner
        self.tables = tables
        self._probes = tables.probes

    def add_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        add_batch = getattr(self.inner, "add_batch", None)
        if add_batch is not None:
            add_batch(host, batch, probes)
        else:
            for event in batch.events(probes):
                self.inner.add_line(host, *event)
        wanted = self._probes
        add_row = self.tables.add_row
        for (comm, pid, _cpu, ts, text), name in zip(batch.rows, batch.names):
            probe = probes[name]
            if probe in wanted:
                add_row(probe, float(ts), int(pid), comm, split_event(text)[1])

    def add_line(self, host: str, probe: str, trace_ts: float, time: float, cpu: int, pid: int,
                 comm: str, args: str) -> None:
        self.inner.add_line(host, probe, trace_ts, time, cpu, pid, comm, args)
        if probe in self._probes:
            self.tables.add_row(probe, trace_ts, pid, comm, args)


def stream_progress(plans: Iterable[AggPlan], stream: StreamTables | None) -> tuple[AggProgress, ...]:
    """Every table of one host's aggregates now: streamed ones with their counts so far, kernel ones unknown."""
    out = []
    for ap in plans:
        for tp in ap.tables:
            tid = tp.table.table_id
            got = stream.tables.get(tid) if stream is not None and tp.mode == "stream" else None
            if got is None:
                out.append(AggProgress(tid, tp.mode))
            else:
                out.append(AggProgress(tid, "stream", stream.hits.get(tid, 0) if stream else 0, len(got.counts)))
    return tuple(out)

