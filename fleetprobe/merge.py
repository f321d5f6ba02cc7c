"""Merge: a fleet's events folded into one bounded, mergeable aggregate (:class:`FleetAggregate`).

Memory does not grow with the number of events: counts are integers, value
tables are Misra-Gries summaries (exact until a table reaches its cap, then
approximate with a stated error bound), latency is a fixed set of log2
buckets, and the per-host event sample is the first N plus a reservoir of M.

Hosts are the unit of merging.  Events are collected per host in an open
"part"; when the host's outcome arrives (:meth:`FleetAggregate.add_host`) the
part is folded into the fleet tables, where each value also counts the hosts
that saw it.  Shards (bastions, stored runs) must therefore partition hosts:
:meth:`FleetAggregate.merge` refuses two aggregates that both finished the
same host.

Hot path: :meth:`FleetAggregate.add_batch` takes a chunk's event rows from
the stream, still the strings the kernel printed, and counts each distinct
argument text once (``Counter`` over the batch); the text is parsed into
field values only when the host is folded (or its cache fills), so parsing
costs scale with distinct values, not with events.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from operator import add, itemgetter, mul, sub
from typing import Any

from fleetprobe.errors import InputError
from fleetprobe.aggtables import AggResults
from fleetprobe.outcome import HostOutcome
from fleetprobe.parse import EventBatch
from fleetprobe.traceline import TraceEvent, parse_fields, parse_value, split_args, split_event
from fleetprobe.sketches import BUCKETS, EventSample, Latency, TopValues, Value

#: Distinct argument texts counted per (host, probe) before they are parsed into field tables.
ARGS_CACHE = 4096
#: Distinct values a host part keeps per table; the fleet keeps ``FLEET_CAP_FACTOR`` x top_k.
PART_CAP_FACTOR = 16
FLEET_CAP_FACTOR = 200
#: Entries a return probe may wait for at most, per (host, entry probe).
PENDING_CAP = 65536
#: Field tables one probe keeps on one host: a field name is whatever precedes "=" in the printed
#: text, and a user chooses printed paths ("a=1 b=1 ..."), so names are bounded like values.
MAX_FIELDS_PER_PROBE = 64
#: Characters of one value kept in a table (a longer one is cut and marked).
MAX_VALUE_CHARS = 1024
COMM_FIELD = "comm"
# Columns of a parse.Row.
_COMM = itemgetter(0)
_PID = itemgetter(1)
_TS = itemgetter(3)
_EVENT_TEXT = itemgetter(4)
# A host part's comm table once it outgrew a plain dict (not a field name the kernel can print).
_SPILLED_COMMS = "\0comm"


class _ProbeState:
    """One probe on one host while its events stream in (the hot path's working set)."""

    __slots__ = ("hits", "args", "comms", "fields", "pending", "entry_pending", "latency")

    def __init__(self, cap: int) -> None:
        """Empty state; ``cap`` bounds each value table."""
        self.hits = 0
        self.args: dict[str, int] = {}
        self.comms: dict[str, int] = {}
        self.fields: dict[str, TopValues] = {}
        # Entry probes: pid -> trace timestamp (both as printed) of each
        # task's open call.  Return probes: the entry probe's table, so
        # pairing is one dict pop.
        self.pending: dict[str, str] | None = None
        self.entry_pending: dict[str, str] | None = None
        self.latency: Latency | None = None

    def flush_args(self, cap: int) -> None:
        """Parse each distinct argument text once and count its values into the field tables.

        A value printed the same way twice (a pid in ``pid=`` and ``old_pid=``,
        a file name) is converted once per flush; each table then takes its
        values in argument-text order, as if added one by one.
        """
        converted: dict[str, Value] = {}
        by_field: dict[str, list[tuple[Value, int]]] = {}
        for args, n in self.args.items():
            for name, text in split_args(args)[1].items():
                value = converted.get(text)
                if value is None:
                    value = converted[text] = parse_value(text) if len(text) <= MAX_VALUE_CHARS else \
                        text[:MAX_VALUE_CHARS] + "...(cut)"
                values = by_field.get(name)
                if values is None:
                    values = by_field[name] = []
                values.append((value, n))
        for name, values in by_field.items():
            table = self._table(name, cap)
            if table is not None:
                table.add_all(values)
        self.args = {}

    def _table(self, name: str, cap: int) -> TopValues | None:
        """The value table of field ``name``, made if there is room (None: over MAX_FIELDS_PER_PROBE)."""
        table = self.fields.get(name)
        if table is None:
            if len(self.fields) >= MAX_FIELDS_PER_PROBE:
                return None
            table = self.fields[name] = TopValues(cap)
        return table


class _HostPart:
    """Everything one host's stream contributes before the host is folded into the fleet tables."""

    __slots__ = ("host", "probes", "first_time", "last_time", "sample", "rng", "cap")

    def __init__(self, host: str, cap: int) -> None:
        """An empty part for ``host``."""
        self.host = host
        self.probes: dict[str, _ProbeState] = {}
        self.first_time = math.inf
        self.last_time = -math.inf
        self.sample = EventSample()
        self.rng = random.Random(zlib.crc32(host.encode()))
        self.cap = cap


@dataclass
class HostSummary:
    """One host's folded numbers: events, hits and latency per probe, time span, sample."""

    events: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    latency: dict[str, Latency] = field(default_factory=dict)
    first_time: float | None = None
    last_time: float | None = None
    sample: EventSample = field(default_factory=EventSample)

    def merged(self, other: HostSummary) -> HostSummary:
        """Same host seen in two parts: everything adds."""
        hits = dict(self.hits)
        for p, n in other.hits.items():
            hits[p] = hits.get(p, 0) + n
        lat = dict(self.latency)
        for p, v in other.latency.items():
            lat[p] = lat[p].merged(v) if p in lat else v
        times = [t for t in (self.first_time, other.first_time) if t is not None]
        ends = [t for t in (self.last_time, other.last_time) if t is not None]
        return HostSummary(self.events + other.events, hits, lat, min(times) if times else None,
                           max(ends) if ends else None, self.sample.merged(other.sample))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"events": self.events, "hits": dict(sorted(self.hits.items())),
                "latency": {p: v.to_json() for p, v in sorted(self.latency.items())},
                "first_time": self.first_time, "last_time": self.last_time,
                "sample": self.sample.to_json()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HostSummary:
        """Inverse of :meth:`to_json`."""
        return cls(int(d["events"]), {k: int(v) for k, v in d["hits"].items()},
                   {k: Latency.from_json(v) for k, v in d["latency"].items()},
                   d["first_time"], d["last_time"], EventSample.from_json(d["sample"]))


class FleetAggregate:
    """What the whole fleet saw, in memory bounded by (hosts x probes x top_k), never by events.

    ``pairs`` maps each return probe to the entry probe it pairs with
    (``{"openat_ret": "openat"}``) for latency histograms.
    """

    def __init__(self, pairs: Mapping[str, str] | None = None, top_k: int = 20, *,
                 pending_cap: int = PENDING_CAP) -> None:
        """An empty aggregate; ``pending_cap`` bounds unpaired entries per (host, entry probe)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.pairs: dict[str, str] = dict(pairs or {})
        self.top_k = top_k
        self.pending_cap = pending_cap
        self.part_cap = top_k * PART_CAP_FACTOR
        self.fleet_cap = top_k * FLEET_CAP_FACTOR
        self.outcomes: dict[str, HostOutcome] = {}
        self.hosts: dict[str, HostSummary] = {}
        self.values: dict[tuple[str, str], TopValues] = {}
        self._parts: dict[str, _HostPart] = {}
        #: ``aggregate:`` tables (in-kernel hist triggers or their stream fallback), see fleetprobe.aggtables.
        self.aggregates = AggResults()

    # -- hot path ---------------------------------------------------------------------------

    def _state(self, part: _HostPart, probe: str) -> _ProbeState:
        """The probe's state in a host part, created (and wired for pairing) on first use."""
        st = part.probes.get(probe)
        if st is None:
            st = part.probes[probe] = _ProbeState(part.cap)
            if probe in self.pairs.values():
                st.pending = {}
            entry = self.pairs.get(probe)
            if entry is not None:
                st.entry_pending = self._state(part, entry).pending
                st.latency = Latency()
        return st

    # A hot path the issue 10 limits allow over complexity 15 (17; 54 lines): it runs once per event for
    # per-event sinks (module events, the stream tap), so its steps stay inline, not in calls.
    def add_line(self, host: str, probe: str, trace_ts: float, time: float, cpu: int, pid: int,  # noqa: C901
                 comm: str, args: str) -> None:
        """Count one event given as split strings (per-event sinks; TraceStream uses :meth:`add_batch`)."""
        part = self._parts.get(host)
        if part is None:
            part = self._parts[host] = _HostPart(host, self.part_cap)
        st = part.probes.get(probe)
        if st is None:
            st = self._state(part, probe)
        st.hits += 1
        if args:
            a = st.args
            n = a.get(args)
            if n is None:
                a[args] = 1
                if len(a) > ARGS_CACHE:
                    st.flush_args(part.cap)
            else:
                a[args] = n + 1
        c = st.comms
        n = c.get(comm)
        if n is None:
            c[comm] = 1
            if len(c) > part.cap:
                _prune_counts(st, part.cap)
        else:
            c[comm] = n + 1
        pend = st.pending
        if pend is not None or st.entry_pending is not None:
            # Same keys as add_batch: the pid and timestamp as the kernel printed them.
            key = str(pid)
            if pend is not None:
                if len(pend) >= self.pending_cap and key not in pend:
                    del pend[next(iter(pend))]
                    self._evicted(part, probe)
                pend[key] = repr(trace_ts)
            pend = st.entry_pending
            if pend is not None:
                t0 = pend.pop(key, None)
                lat = st.latency
                if lat is not None:
                    if t0 is None:
                        lat.unmatched += 1
                    else:
                        ns = int((trace_ts - float(t0)) * 1e9 + 0.5)
                        lat.buckets[min(ns.bit_length(), BUCKETS - 1) if ns > 0 else 0] += 1
        if time > part.last_time:
            part.last_time = time
        if time < part.first_time:
            part.first_time = time
        smp = part.sample
        smp.seen += 1
        if smp.seen >= smp.next_pick:
            smp.offer(part.rng, _sample_dict(host, probe, trace_ts, time, cpu, pid, comm, args))

    def add_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Count a batch of one host's events from :class:`~fleetprobe.parse.TraceStream` (the hot path).

        Same result as :meth:`add_line` per row, counted column by column:
        hits come with the batch, argument texts and comms are counted with
        ``Counter`` (C speed), each distinct event text is split once, and
        only entry/return pairing and the sample look at single rows.
        ``probes`` maps the batch's trace event names to probe names.
        """
        rows = batch.rows
        if not rows:
            return
        part = self._parts.get(host)
        if part is None:
            part = self._parts[host] = _HostPart(host, self.part_cap)
        states: dict[str, _ProbeState] = {}
        for name, n in batch.counts.items():
            probe = probes[name]
            st = states[name] = part.probes.get(probe) or self._state(part, probe)
            st.hits += n
        # Distinct (name, args) in order of first appearance (texts differing
        # only in the separator after the name are the same pair).
        texts: dict[tuple[str, str], int] = {}
        for text, n in Counter(map(_EVENT_TEXT, rows)).items():
            key = split_event(text)
            texts[key] = texts.get(key, 0) + n
        for (name, args), n in texts.items():
            if args:
                st = states[name]
                a = st.args
                a[args] = a.get(args, 0) + n
                if len(a) > ARGS_CACHE:
                    st.flush_args(part.cap)
        if len(states) == 1:
            # One probe in the batch (a busy tracepoint): count comms alone, no (name, comm) pairs.
            only = next(iter(states))
            by_comm = [((only, comm), n) for comm, n in Counter(map(_COMM, rows)).items()]
        else:
            by_comm = list(Counter(zip(batch.names, map(_COMM, rows))).items())
        for (name, comm), n in by_comm:
            st = states[name]
            c = st.comms
            c[comm] = c.get(comm, 0) + n
            if len(c) > part.cap:
                _prune_counts(st, part.cap)
        if any(st.pending is not None or st.latency is not None for st in states.values()):
            self._pair(part, batch, probes, states)
        _batch_times(part, batch)
        _sample_batch(part, host, batch, probes)

    def _pair(self, part: _HostPart, batch: EventBatch, probes: Mapping[str, str],
              states: Mapping[str, _ProbeState]) -> None:
        """Pair a batch's return rows with their entries (in row order) and bucket the durations.

        pid and timestamp stay strings until a pair completes: an entry costs
        one dict store; the durations of the batch's pairs are computed in one
        go at the end, with the same float arithmetic as :meth:`add_line`.
        """
        entries = {name: st.pending for name, st in states.items() if st.pending is not None}
        # A probe that is an entry of one pair and the return of another stays an entry.
        returns: dict[str, tuple[Callable[[str, None], str | None], list[str], list[str], Latency]] = {
            name: (st.entry_pending.pop, [], [], st.latency) for name, st in states.items()
            if st.entry_pending is not None and st.latency is not None and name not in entries}
        cap = self.pending_cap
        if len(entries) == 1 and len(returns) == 1:
            (entry, pending), = entries.items()
            (exit_name, (pop, starts, ends, latency)), = returns.items()
            if states[exit_name].entry_pending is pending and len(pending) + batch.counts[entry] <= cap:
                # The common case (one entry/return pair, no room for an eviction): the same
                # steps as the general loop below, without its lookups and its cap check.
                unmatched = 0
                for (_comm, pid, _cpu, ts, _text), name in zip(batch.rows, batch.names):
                    if name == entry:
                        pending[pid] = ts
                    elif name == exit_name:
                        t0 = pop(pid, None)
                        if t0 is None:
                            unmatched += 1
                        else:
                            starts.append(t0)
                            ends.append(ts)
                latency.unmatched += unmatched
                if starts:
                    _add_durations(latency, starts, ends)
                return
        for name, pid, ts in zip(batch.names, map(_PID, batch.rows), map(_TS, batch.rows)):
            pend = entries.get(name)
            if pend is not None:
                if len(pend) >= cap and pid not in pend:
                    del pend[next(iter(pend))]
                    self._evicted(part, probes[name])
                pend[pid] = ts
                continue
            ret = returns.get(name)
            if ret is None:
                continue
            t0 = ret[0](pid, None)
            if t0 is None:
                ret[3].unmatched += 1
            else:
                ret[1].append(t0)
                ret[2].append(ts)
        for _pop, starts, ends, latency in returns.values():
            if starts:
                _add_durations(latency, starts, ends)

    def _evicted(self, part: _HostPart, entry_probe: str) -> None:
        """Count an entry dropped from a full pending table against every return probe pairing with it."""
        for ret, entry in self.pairs.items():
            if entry == entry_probe:
                lat = self._state(part, ret).latency
                if lat is not None:
                    lat.evicted += 1

    def add_event(self, ev: TraceEvent) -> None:
        """Count one parsed event (slower than :meth:`add_line`; for events built elsewhere)."""
        if ev.args or not ev.fields:
            self.add_line(ev.host, ev.probe, ev.trace_ts, ev.time, ev.cpu, ev.pid, ev.comm, ev.args)
            return
        # An event built from values (no raw text): count its fields directly.
        self.add_line(ev.host, ev.probe, ev.trace_ts, ev.time, ev.cpu, ev.pid, ev.comm, "")
        st = self._parts[ev.host].probes[ev.probe]
        for name, value in ev.fields.items():
            table = st._table(name, self.part_cap)
            if table is not None:
                if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
                    value = value[:MAX_VALUE_CHARS] + "...(cut)"
                table.add(value, 1)

    # -- hosts ------------------------------------------------------------------------------

    def add_host(self, outcome: HostOutcome) -> None:
        """Record a host's outcome and fold its events into the fleet tables (call once per host, at its end)."""
        self.outcomes[outcome.host] = outcome
        self._fold(outcome.host)
        summary = self.hosts.setdefault(outcome.host, HostSummary())
        for probe, n in outcome.hits.items():
            # Probes the kernel aggregated stream nothing: their hits are the kernel's count.
            summary.hits.setdefault(probe, n)

    def finish(self) -> None:
        """Fold every host still open (its stream ended without an outcome)."""
        for host in list(self._parts):
            self._fold(host)

    def _fold(self, host: str) -> None:
        """Move a host part's numbers into its summary and the fleet value tables."""
        part = self._parts.pop(host, None)
        if part is None:
            return
        events = part.sample.seen
        summary = HostSummary(events=events, sample=part.sample,
                              first_time=part.first_time if events else None,
                              last_time=part.last_time if events else None)
        for probe, st in part.probes.items():
            if st.hits:
                summary.hits[probe] = st.hits
            st.flush_args(part.cap)
            tables = dict(st.fields)
            comms = tables.pop(_SPILLED_COMMS, None) or TopValues(part.cap)
            for comm, n in st.comms.items():
                comms.add(comm, n)
            tables[COMM_FIELD] = comms
            values = self.values
            for name, table in tables.items():
                key = (probe, name)
                have = values.get(key)
                if have is None:
                    # The fleet's tables are its own (merge() copies), so later hosts fold in place.
                    have = values[key] = TopValues(table.cap, dict(table.counts), dict.fromkeys(table.counts, 1),
                                                   table.error, table.total)
                    have.cap = self.fleet_cap
                    if len(have.counts) > have.cap:
                        have.prune(have.cap // 2)
                else:
                    have.absorb_host(table, self.fleet_cap)
            if st.latency is not None and st.entry_pending is not None:
                st.latency.pending_at_end = len(st.entry_pending)
                summary.latency[probe] = st.latency
        have_summary = self.hosts.get(host)
        self.hosts[host] = summary if have_summary is None else have_summary.merged(summary)

    # -- merging ----------------------------------------------------------------------------

    def merge(self, other: FleetAggregate) -> FleetAggregate:
        """A new aggregate of both (associative; exact where both are exact).

        Raises :class:`~fleetprobe.errors.InputError` if both finished the same
        host: shards must partition the fleet, or host counts would be wrong.
        """
        self.finish()
        other.finish()
        both = sorted(set(self.outcomes) & set(other.outcomes))
        if both:
            raise InputError(f"host(s) {', '.join(both[:5])} appear in both aggregates",
                             hint="merge reports of disjoint host sets (shards), not the same run twice")
        if self.pairs != other.pairs and self.pairs and other.pairs:
            conflict = {k for k in set(self.pairs) & set(other.pairs) if self.pairs[k] != other.pairs[k]}
            if conflict:
                raise InputError(f"return probe(s) {', '.join(sorted(conflict))} pair with different entry "
                                 "probes in the two aggregates", hint="merge reports of the same playbook")
        out = FleetAggregate({**self.pairs, **other.pairs}, max(self.top_k, other.top_k))
        out.outcomes = {**self.outcomes, **other.outcomes}
        out.hosts = dict(self.hosts)
        for h, s in other.hosts.items():
            out.hosts[h] = out.hosts[h].merged(s) if h in out.hosts else s
        out.values = {key: table.copy() for key, table in self.values.items()}
        for key, table in other.values.items():
            out.values[key] = out.values[key].merged(table) if key in out.values else table.copy()
        out.aggregates = self.aggregates.merged(other.aggregates)
        return out

    def absorb(self, other: FleetAggregate) -> None:
        """In place: become what ``self.merge(other)`` returns, taking ``other``'s tables (do not use it after).

        For a parent that folds partial aggregates as they arrive (fleetprobe.workers):
        ``merge`` copies both sides, which per arrival is O(everything folded so far);
        this costs O(``other``).  Same refusals as :meth:`merge`; hosts still open in
        ``self`` stay open (their host sets are disjoint from ``other``'s).
        """
        other.finish()
        both = sorted(set(self.outcomes) & set(other.outcomes))
        if both:
            raise InputError(f"host(s) {', '.join(both[:5])} appear in both aggregates",
                             hint="merge reports of disjoint host sets (shards), not the same run twice")
        conflict = {k for k in set(self.pairs) & set(other.pairs) if self.pairs[k] != other.pairs[k]}
        if conflict:
            raise InputError(f"return probe(s) {', '.join(sorted(conflict))} pair with different entry "
                             "probes in the two aggregates", hint="merge reports of the same playbook")
        self.pairs.update(other.pairs)
        if other.top_k > self.top_k:
            self.top_k = other.top_k
            self.part_cap = self.top_k * PART_CAP_FACTOR
            self.fleet_cap = self.top_k * FLEET_CAP_FACTOR
        self.outcomes.update(other.outcomes)
        for h, s in other.hosts.items():
            have = self.hosts.get(h)
            self.hosts[h] = s if have is None else have.merged(s)
        for key, table in other.values.items():
            mine = self.values.get(key)
            if mine is None:
                self.values[key] = table
            else:
                mine.absorb(table)
        if other.aggregates:
            self.aggregates = self.aggregates.merged(other.aggregates)

    # -- questions the report asks ----------------------------------------------------------

    def probes(self) -> list[str]:
        """Every probe that was hit, or placed or skipped on some host, sorted."""
        names: set[str] = set()
        for s in self.hosts.values():
            names.update(s.hits)
        for o in self.outcomes.values():
            names.update(o.placed_probes)
            names.update(o.skipped_probes)
        return sorted(names)

    def hits(self, probe: str) -> dict[str, int]:
        """Hits per host for ``probe`` (hosts with none left out)."""
        return {h: s.hits[probe] for h, s in sorted(self.hosts.items()) if s.hits.get(probe)}

    def total_hits(self, probe: str) -> int:
        """Hits of ``probe`` over the fleet."""
        return sum(s.hits.get(probe, 0) for s in self.hosts.values())

    def probe_misses(self, probe: str) -> int:
        """kprobe_profile misses of ``probe`` over the fleet (from the hosts' outcomes)."""
        return sum(o.loss.probe_misses.get(probe, 0) for o in self.outcomes.values())

    def top(self, probe: str, name: str, k: int | None = None) -> list[tuple[Value, int, int]]:
        """Top (value, count, hosts) of one probe's field (``comm`` for the task name)."""
        table = self.values.get((probe, name))
        return [] if table is None else table.top(k or self.top_k)

    def top_tables(self, probes: Iterable[str], k: int) -> list[tuple[str, str, TopValues, list[tuple[Value, int, int]]]]:
        """(probe, field, table, its top ``k``) of every field that holds a value: what a report's top-values
        section shows (HTML and Markdown; the terminal also leaves out tables that say nothing)."""
        out = []
        for p in probes:
            for name in self.fields(p):
                table = self.values[(p, name)]
                top = table.top(k)
                if top:
                    out.append((p, name, table, top))
        return out

    def fields(self, probe: str) -> list[str]:
        """Field names with value tables for ``probe``, ``comm`` first."""
        names = sorted(n for p, n in self.values if p == probe and n != COMM_FIELD)
        return ([COMM_FIELD] if (probe, COMM_FIELD) in self.values else []) + names

    def latency(self, probe: str) -> Latency:
        """Fleet-wide latency of a return probe (all hosts' buckets added)."""
        total = Latency()
        for s in self.hosts.values():
            if probe in s.latency:
                total = total.merged(s.latency[probe])
        return total

    def quiet_hosts(self) -> dict[str, str]:
        """Hosts that contributed no events, and why (status and reason, or "saw nothing")."""
        out: dict[str, str] = {}
        for h in sorted(set(self.outcomes) | set(self.hosts)):
            s = self.hosts.get(h)
            if s is not None and (s.events or any(s.hits.values())):
                # Hits without events: the host's kernel counted them (in-kernel aggregation).
                continue
            o = self.outcomes.get(h)
            if o is None or o.status == "ok":
                out[h] = "saw nothing" if o is None or o.placed_probes or not o.skipped_probes \
                    else "every probe skipped: " + "; ".join(f"{p}: {r}" for p, r in o.skipped_probes.items())
            else:
                out[h] = f"{o.status} at {o.stage}: {o.reason}" if o.reason else f"{o.status} at {o.stage}"
        return out

    # -- JSON --------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (folds any host still open first)."""
        self.finish()
        return {
            "pairs": dict(sorted(self.pairs.items())), "top_k": self.top_k,
            "hosts": {h: s.to_json() for h, s in sorted(self.hosts.items())},
            "values": [{"probe": p, "field": n, **t.to_json()} for (p, n), t in sorted(self.values.items())],
            "outcomes": {h: o.to_json() for h, o in sorted(self.outcomes.items())},
            **({"aggregates": self.aggregates.to_json()} if self.aggregates else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FleetAggregate:
        """Inverse of :meth:`to_json`."""
        agg = cls(d["pairs"], int(d["top_k"]))
        agg.hosts = {h: HostSummary.from_json(s) for h, s in d["hosts"].items()}
        agg.values = {(v["probe"], v["field"]): TopValues.from_json(v) for v in d["values"]}
        agg.outcomes = {h: HostOutcome.from_json(o) for h, o in d["outcomes"].items()}
        agg.aggregates = AggResults.from_json(d.get("aggregates"))
        return agg

    def __eq__(self, other: object) -> bool:
        """Equal when their JSON forms are equal."""
        if not isinstance(other, FleetAggregate):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]


def _batch_times(part: _HostPart, batch: EventBatch) -> None:
    """Widen the host part's time span to a batch's first and last rows (once per batch)."""
    # trace_pipe is merged by timestamp, but check both ends anyway (cheap: two rows).
    slope, intercept = batch.slope, batch.intercept
    for row in (batch.rows[0], batch.rows[-1]):
        t = float(row[3]) * slope + intercept
        if t > part.last_time:
            part.last_time = t
        if t < part.first_time:
            part.first_time = t


def _sample_batch(part: _HostPart, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
    """Offer the sample the batch's rows it picks (a few per batch: the first N, then the reservoir's)."""
    rows = batch.rows
    slope, intercept = batch.slope, batch.intercept
    smp = part.sample
    before = smp.seen
    end = before + len(rows)
    while smp.next_pick <= end:
        i = smp.next_pick - before - 1
        comm, pid_s, cpu_s, ts_s, text = rows[i]
        trace_ts = float(ts_s)
        smp.seen = smp.next_pick
        smp.offer(part.rng, _sample_dict(host, probes[batch.names[i]], trace_ts, trace_ts * slope + intercept,
                                         int(cpu_s), int(pid_s), comm, split_event(text)[1]))
    smp.seen = end

def _prune_counts(st: _ProbeState, cap: int) -> None:
    """The comm table of a host part is full: move it into a Misra-Gries table and prune."""
    table = st.fields.get(_SPILLED_COMMS)
    if table is None:
        table = st.fields[_SPILLED_COMMS] = TopValues(cap)
    for comm, n in st.comms.items():
        table.add(comm, n)
    st.comms = {}


def _add_durations(latency: Latency, starts: list[str], ends: list[str]) -> None:
    """Bucket the durations of paired (entry, return) timestamps as printed, all at once.

    Each is ``int((float(end) - float(start)) * 1e9 + 0.5)`` ns, as in
    :meth:`FleetAggregate.add_line`; ``map`` over C functions instead of a loop.
    A duration that is not a finite number (a timestamp of hundreds of
    digits) cannot be placed and counts as unmatched.
    """
    try:
        durations = map(int, map(add, map(mul, map(sub, map(float, ends), map(float, starts)), repeat(1e9)),
                                 repeat(0.5)))
        buckets = Counter(map(int.bit_length, map(max, durations, repeat(0))))
    except (OverflowError, ValueError):
        buckets = Counter()
        for start, end in zip(starts, ends):
            ns = (float(end) - float(start)) * 1e9 + 0.5
            if math.isfinite(ns):
                buckets[max(int(ns), 0).bit_length()] += 1
            else:
                latency.unmatched += 1
    for b, n in buckets.items():
        latency.buckets[min(b, BUCKETS - 1)] += n


def _sample_dict(host: str, probe: str, trace_ts: float, time: float, cpu: int, pid: int,
                 comm: str, args: str) -> dict[str, Any]:
    """A sampled event as a JSON-ready dict (fields parsed now: only sampled events pay for it)."""
    site, values = parse_fields(args)
    cut = {k: _cut(v) for k, v in list(values.items())[:MAX_FIELDS_PER_PROBE]}
    return {"host": host, "probe": probe, "time": time, "trace_ts": trace_ts, "cpu": cpu, "pid": pid,
            "comm": _cut(comm), "site": _cut(site), "fields": cut}


def _cut(value: Value) -> Value:
    """A str value cut to MAX_VALUE_CHARS (marked), anything else as it is."""
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + "...(cut)"
    return value


def aggregate_events(events: Iterable[TraceEvent], pairs: Mapping[str, str] | None = None,
                     top_k: int = 20) -> FleetAggregate:
    """Aggregate a finite sequence of events (tests, small tools)."""
    agg = FleetAggregate(pairs, top_k)
    for ev in events:
        agg.add_event(ev)
    return agg
