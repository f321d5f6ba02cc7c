"""Sketches: the bounded, mergeable summaries a FleetAggregate is made of.

:class:`TopValues` (Misra-Gries counts per value), :class:`Latency` (log2
buckets of entry->return durations) and :class:`EventSample` (the first N
events of a host plus a reservoir of M).  Each merges with another of its kind
and has a JSON form; none grows with the number of events.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Per host: the report of a 2000-host run carries 2000 x 40 sampled events (~20 MB of JSON).
SAMPLE_FIRST = 20
SAMPLE_RESERVOIR = 20
#: log2 latency buckets: bucket b holds durations in [2**(b-1), 2**b) ns; b = 0 is 0 ns.
BUCKETS = 64
Value = int | str


@dataclass
class TopValues:
    """Counts per value, bounded: a Misra-Gries summary (Agarwal et al., "Mergeable summaries", 2012).

    Exact while fewer than ``cap`` distinct values were seen (``error == 0``).
    After a prune, each kept count is a lower bound and the true count is at
    most ``count + error``; a value not kept occurred at most ``error`` times.
    ``hosts`` counts the hosts that saw a value (a lower bound after a prune).
    """

    cap: int
    counts: dict[Value, int] = field(default_factory=dict)
    hosts: dict[Value, int] = field(default_factory=dict)
    error: int = 0
    total: int = 0

    def add(self, value: Value, n: int, hosts: int = 0) -> None:
        """Count ``value`` ``n`` more times (seen on ``hosts`` more hosts)."""
        self.counts[value] = self.counts.get(value, 0) + n
        if hosts:
            self.hosts[value] = self.hosts.get(value, 0) + hosts
        self.total += n
        if len(self.counts) > self.cap:
            self.prune(self.cap // 2)

    def add_all(self, values: Iterable[tuple[Value, int]]) -> None:
        """:meth:`add` each (value, n) in turn, without a call per value."""
        counts, cap = self.counts, self.cap
        for value, n in values:
            counts[value] = counts.get(value, 0) + n
            self.total += n
            if len(counts) > cap:
                self.prune(cap // 2)
                counts = self.counts

    def prune(self, keep: int) -> None:
        """Keep at most ``keep`` values: subtract the (keep+1)-th largest count from all (Misra-Gries)."""
        if len(self.counts) <= keep:
            return
        cut = sorted(self.counts.values(), reverse=True)[keep]
        self.error += cut
        self.counts = {v: c - cut for v, c in self.counts.items() if c > cut}
        self.hosts = {v: h for v, h in self.hosts.items() if v in self.counts}

    def merged(self, other: TopValues) -> TopValues:
        """Counts and host counts add; errors add (the mergeable-summaries bound)."""
        out = TopValues(max(self.cap, other.cap), dict(self.counts), dict(self.hosts),
                        self.error + other.error, self.total + other.total)
        for v, c in other.counts.items():
            out.counts[v] = out.counts.get(v, 0) + c
        for v, h in other.hosts.items():
            out.hosts[v] = out.hosts.get(v, 0) + h
        if len(out.counts) > out.cap:
            out.prune(out.cap // 2)
        return out

    def absorb(self, other: TopValues) -> None:
        """In place: become what ``self.merged(other)`` returns (``other`` is left as it was).

        A parent folding its workers' partial aggregates as they arrive would copy its
        whole table per arrival with ``merged``; this adds only ``other``'s values.
        """
        counts, hosts = self.counts, self.hosts
        for v, c in other.counts.items():
            counts[v] = counts.get(v, 0) + c
        for v, h in other.hosts.items():
            hosts[v] = hosts.get(v, 0) + h
        self.error += other.error
        self.total += other.total
        self.cap = max(self.cap, other.cap)
        if len(self.counts) > self.cap:
            self.prune(self.cap // 2)

    def absorb_host(self, part: TopValues, cap: int) -> None:
        """In place: ``merged`` with one host's table (each of its values seen on 1 host), then capped at ``cap``.

        The fleet folds every host into its tables: copying a fleet table (up to
        ``FLEET_CAP_FACTOR`` x top_k values) per host and field, as ``merged`` does,
        made the fold O(hosts x fleet table) (issue 5).  Same result as
        ``merged(TopValues(part.cap, part.counts, {v: 1 ...}, ...))`` with ``cap`` set after.
        """
        counts, hosts = self.counts, self.hosts
        for v, c in part.counts.items():
            counts[v] = counts.get(v, 0) + c
            hosts[v] = hosts.get(v, 0) + 1
        self.error += part.error
        self.total += part.total
        self.cap = max(self.cap, part.cap)
        if len(self.counts) > self.cap:
            self.prune(self.cap // 2)
        self.cap = cap
        if len(self.counts) > cap:
            self.prune(cap // 2)

    def copy(self) -> TopValues:
        """An independent copy."""
        return TopValues(self.cap, dict(self.counts), dict(self.hosts), self.error, self.total)

    def top(self, k: int) -> list[tuple[Value, int, int]]:
        """The ``k`` most frequent (value, count, hosts), ties broken by value for a stable order."""
        items = sorted(self.counts.items(), key=lambda vc: (-vc[1], type(vc[0]).__name__, str(vc[0])))
        return [(v, c, self.hosts.get(v, 0)) for v, c in items[:k]]

    @property
    def exact(self) -> bool:
        """True if no count was ever pruned."""
        return self.error == 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; values keep their type (int or str) via a tagged list."""
        return {"cap": self.cap, "error": self.error, "total": self.total,
                "values": [[v, c, self.hosts.get(v, 0)]
                           for v, c in sorted(self.counts.items(),
                                              key=lambda vc: (-vc[1], type(vc[0]).__name__, str(vc[0])))]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TopValues:
        """Inverse of :meth:`to_json`."""
        t = cls(int(d["cap"]), error=int(d["error"]), total=int(d["total"]))
        for v, c, h in d["values"]:
            t.counts[v] = int(c)
            if h:
                t.hosts[v] = int(h)
        return t


def bucket_of(seconds: float) -> int:
    """The log2 bucket of a duration: b such that 2**(b-1) <= ns < 2**b (0 for 0 ns)."""
    ns = int(round(seconds * 1e9))
    return min(max(ns, 0).bit_length(), BUCKETS - 1)


def bucket_range_ns(b: int) -> tuple[int, int]:
    """[low, high) nanoseconds of bucket ``b``."""
    return (0, 1) if b == 0 else (1 << (b - 1), 1 << b)


@dataclass
class Latency:
    """Entry->return durations of one return probe, log2 buckets, plus what could not be paired."""

    buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    unmatched: int = 0
    evicted: int = 0
    pending_at_end: int = 0

    @property
    def count(self) -> int:
        """Number of paired durations."""
        return sum(self.buckets)

    def merged(self, other: Latency) -> Latency:
        """Buckets and counters add."""
        return Latency([a + b for a, b in zip(self.buckets, other.buckets)],
                       self.unmatched + other.unmatched, self.evicted + other.evicted,
                       self.pending_at_end + other.pending_at_end)

    def caveats(self) -> list[str]:
        """What limits the histogram: returns with no entry, entries evicted, entries still open."""
        notes = []
        if self.unmatched:
            notes.append(f"{self.unmatched} returns without an entry")
        if self.evicted:
            notes.append(f"{self.evicted} entries evicted from the pending table")
        if self.pending_at_end:
            notes.append(f"{self.pending_at_end} entries still open at the end")
        return notes

    def quantile(self, q: float) -> int | None:
        """Upper edge (ns) of the bucket holding quantile ``q``, or None with no data."""
        n = self.count
        if n == 0:
            return None
        rank = max(1, math.ceil(q * n))
        seen = 0
        for b, c in enumerate(self.buckets):
            seen += c
            if seen >= rank:
                return bucket_range_ns(b)[1]
        return None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (only non-empty buckets, keyed by bucket number)."""
        return {"buckets": {str(b): c for b, c in enumerate(self.buckets) if c},
                "unmatched": self.unmatched, "evicted": self.evicted, "pending_at_end": self.pending_at_end}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Latency:
        """Inverse of :meth:`to_json`."""
        lat = cls(unmatched=int(d["unmatched"]), evicted=int(d["evicted"]),
                  pending_at_end=int(d["pending_at_end"]))
        for b, c in d["buckets"].items():
            lat.buckets[int(b)] = int(c)
        return lat


@dataclass
class EventSample:
    """A bounded sample of one host's events for the timeline: the first N and a reservoir of M.

    The reservoir is Vitter's algorithm R with a per-host seeded generator so a
    run is reproducible.  Events are stored as their JSON dicts.
    """

    first: list[dict[str, Any]] = field(default_factory=list)
    reservoir: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0
    # Li's algorithm L: the index of the next event to take, so the hot path
    # pays one comparison per event instead of a random draw.
    next_pick: int = 1
    weight: float = 1.0

    def offer(self, rng: random.Random, event: dict[str, Any]) -> None:
        """Take event number ``seen`` (called only when ``seen >= next_pick``)."""
        if len(self.first) < SAMPLE_FIRST:
            self.first.append(event)
            self.next_pick = self.seen + 1
            return
        if len(self.reservoir) < SAMPLE_RESERVOIR:
            self.reservoir.append(event)
            if len(self.reservoir) < SAMPLE_RESERVOIR:
                self.next_pick = self.seen + 1
                return
            self.weight = math.exp(math.log(1.0 - rng.random()) / SAMPLE_RESERVOIR)
        else:
            self.reservoir[rng.randrange(SAMPLE_RESERVOIR)] = event
            self.weight *= math.exp(math.log(1.0 - rng.random()) / SAMPLE_RESERVOIR)
        skip = math.floor(math.log(1.0 - rng.random()) / math.log1p(-self.weight)) if self.weight < 1.0 else 0
        self.next_pick = self.seen + skip + 1

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"first": self.first, "reservoir": self.reservoir, "seen": self.seen}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EventSample:
        """Inverse of :meth:`to_json`."""
        return cls(list(d["first"]), list(d["reservoir"]), int(d["seen"]), next_pick=int(d["seen"]) + 1)

    def merged(self, other: EventSample) -> EventSample:
        """Union of two samples of the same host: earliest N first, reservoir resampled by weight."""
        both = sorted(self.first + other.first, key=lambda e: float(e["trace_ts"]))
        first, spill = both[:SAMPLE_FIRST], both[SAMPLE_FIRST:]
        pool = self.reservoir + other.reservoir + spill
        rng = random.Random(len(pool) * 7919 + self.seen + other.seen)
        reservoir = pool if len(pool) <= SAMPLE_RESERVOIR else rng.sample(pool, SAMPLE_RESERVOIR)
        seen = self.seen + other.seen
        return EventSample(first, sorted(reservoir, key=lambda e: float(e["trace_ts"])), seen,
                           next_pick=seen + 1)
