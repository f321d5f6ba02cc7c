"""Aggregate tables (``aggregate:``): the one result type, whichever way each host computed them.

Both ways a host counts an aggregate (in its kernel with hist triggers, :mod:`fleetprobe.histplan`
and :mod:`fleetprobe.histread`; or on the controller from its stream, :mod:`fleetprobe.aggstream`)
end in :class:`AggResults`: reports, merge, shards, history, audits and diff see one type, and
each host's part says which way it was computed (``kernel`` or ``stream``) and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from fleetprobe.errors import InputError


Value = int | str
Key = tuple[Value, ...]

#: The task name a trace line carries when the kernel no longer knows the pid's name.  A streamed
#: tracepoint line names its task from the kernel's pid->comm cache (saved_cmdlines) when it is
#: *read*, not when the event happened: a short-lived task can be gone from it by then (seen on
#: this project's CI, 1-2 of 12 execs).  Kernel tables (``.execname``, ``$comm``) name it at the
#: event, so only streamed tables have such a row; the report says what it means.
UNKNOWN_COMM = "<...>"


def unknown_comm_hits(t: AggTable) -> int:
    """How many of ``t``'s hits are keyed by a task name the kernel had forgotten (``<...>``)."""
    idx = [i for i, f in enumerate((t.field,) if t.kind == "count" else t.by) if f == "comm"]
    return sum(c for k, c in t.counts.items() if any(k[i] == UNKNOWN_COMM for i in idx))

#: A fleet table keeps at most this many keys (then Misra-Gries pruning with a stated error bound).
FLEET_KEYS = 20_000
#: log2 buckets: bucket b holds values v with 2**(b-1) < v <= 2**b (the kernel's .log2), b = 0 holds 0 and 1.
LOG2_BUCKETS = 65

KINDS = ("count", "histogram", "latency")


def log2_bucket(v: int) -> int:
    """The kernel's ``.log2`` of ``v``: ilog2(roundup_pow_of_two(v)); 0 for v <= 1.

    (roundup_pow_of_two(0) is undefined in the kernel; 0 goes to bucket 0 here, as it
    does on x86_64, where the shift by 64 wraps.)  A negative value (a signed field)
    is bucketed as the kernel does: as its u64 bit pattern.
    """
    if v < 0:
        v &= (1 << 64) - 1
    return 0 if v <= 1 else min((v - 1).bit_length(), LOG2_BUCKETS - 1)


def bucket_label(b: int) -> str:
    """``(lo, hi]`` of a log2 bucket as text."""
    return "<= 1" if b == 0 else f"{(1 << (b - 1)) + 1}..{1 << b}"


# --- the result type ---------------------------------------------------------------------------

@dataclass
class HostTable:
    """One table of one probe on one host: how it was computed and what the kernel said about it.

    ``mode`` is ``kernel`` (hist trigger), ``stream`` (computed on the controller from
    streamed events) or ``failed`` (neither: ``reason`` says why, e.g. the kernel refused
    the trigger); ``hits`` the events counted, ``entries`` the keys, ``dropped`` the events
    the kernel could not count because its table was full (hist ``Dropped:``), or the
    events the stream lost to the event cap.
    """

    mode: str
    reason: str = ""
    hits: int = 0
    entries: int = 0
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "hits": self.hits, "entries": self.entries,
                "dropped": self.dropped}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HostTable:
        return cls(str(d["mode"]), str(d.get("reason", "")), int(d.get("hits", 0)), int(d.get("entries", 0)),
                   int(d.get("dropped", 0)))


@dataclass
class AggTable:
    """Counts per key of one aggregate, for one host or folded over many.

    ``kind`` ``count``: ``counts[(value,)]`` is the hits with ``field == value``.
    ``histogram``/``latency``: ``counts[(*by_values, bucket)]`` with ``bucket`` the
    log2 bucket of ``field`` (``latency``: entry->return nanoseconds).  ``hosts``
    counts the hosts that saw each key; ``error`` is the Misra-Gries bound once the
    table was pruned (each count is then low by at most ``error``; 0 = exact).
    """

    probe: str
    kind: str
    field: str
    by: tuple[str, ...] = ()
    top: int = 20
    counts: dict[Key, int] = dc_field(default_factory=dict)
    hosts: dict[Key, int] = dc_field(default_factory=dict)
    error: int = 0
    cap: int = FLEET_KEYS

    @property
    def table_id(self) -> str:
        return table_id(self.probe, self.kind, self.field)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, key: Key, n: int, hosts: int = 0) -> None:
        """Count ``key`` ``n`` more times (seen by ``hosts`` more hosts)."""
        self.counts[key] = self.counts.get(key, 0) + n
        if hosts:
            self.hosts[key] = self.hosts.get(key, 0) + hosts
        if len(self.counts) > self.cap:
            self.prune(self.cap // 2)

    def prune(self, keep: int) -> None:
        """Keep at most ``keep`` keys: subtract the (keep+1)-th largest count from all (Misra-Gries)."""
        if len(self.counts) <= keep:
            return
        cut = sorted(self.counts.values(), reverse=True)[keep]
        self.error += cut
        self.counts = {k: c - cut for k, c in self.counts.items() if c > cut}
        self.hosts = {k: h for k, h in self.hosts.items() if k in self.counts}

    def same_shape(self, other: AggTable) -> bool:
        return (self.probe, self.kind, self.field, self.by) == (other.probe, other.kind, other.field, other.by)

    def merged(self, other: AggTable) -> AggTable:
        """Counts and host counts add, errors add (the mergeable-summaries bound)."""
        if not self.same_shape(other):
            raise InputError(f"aggregate {self.table_id} by {list(self.by)} cannot merge with "
                             f"{other.table_id} by {list(other.by)}", hint="merge reports of the same playbook")
        out = AggTable(self.probe, self.kind, self.field, self.by, max(self.top, other.top), dict(self.counts),
                       dict(self.hosts), self.error + other.error, max(self.cap, other.cap))
        for k, c in other.counts.items():
            out.counts[k] = out.counts.get(k, 0) + c
        for k, h in other.hosts.items():
            out.hosts[k] = out.hosts.get(k, 0) + h
        if len(out.counts) > out.cap:
            out.prune(out.cap // 2)
        return out

    def rows(self, k: int | None = None) -> list[tuple[Key, int, int]]:
        """(key, count, hosts), most frequent first (ties by key text, for a stable order)."""
        items = sorted(self.counts.items(), key=lambda kc: (-kc[1], [str(v) for v in kc[0]]))
        if k is not None:
            items = items[:k]
        return [(key, c, self.hosts.get(key, 0)) for key, c in items]

    def histograms(self) -> dict[Key, dict[int, int]]:
        """histogram/latency: {by-values: {bucket: count}}, the split keys in count order."""
        out: dict[Key, dict[int, int]] = {}
        for key, c in self.counts.items():
            b = key[-1]
            assert isinstance(b, int)
            buckets = out.setdefault(key[:-1], {})
            buckets[b] = buckets.get(b, 0) + c
        return dict(sorted(out.items(), key=lambda kv: (-sum(kv[1].values()), [str(v) for v in kv[0]])))

    def to_json(self) -> dict[str, Any]:
        return {"probe": self.probe, "kind": self.kind, "field": self.field, "by": list(self.by), "top": self.top,
                "error": self.error, "cap": self.cap, "unknown_comm": unknown_comm_hits(self),
                "rows": [[list(k), c, h] for k, c, h in self.rows()]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AggTable:
        t = cls(str(d["probe"]), str(d["kind"]), str(d["field"]), tuple(d.get("by", ())), int(d.get("top", 20)),
                error=int(d.get("error", 0)), cap=int(d.get("cap", FLEET_KEYS)))
        for k, c, h in d["rows"]:
            key = tuple(k)
            t.counts[key] = int(c)
            if h:
                t.hosts[key] = int(h)
        return t


def table_id(probe: str, kind: str, fld: str) -> str:
    """``probe:count:comm``, ``io:histogram:nr_sector``, ``open_ret:latency:ns``."""
    return f"{probe}:{kind}:{fld}"


@dataclass
class AggResults:
    """Every aggregate of a run: fleet tables and each host's part (how it was computed).

    Hosts are the unit of merging, as in :class:`~fleetprobe.merge.FleetAggregate`:
    two results that both have the same host refuse to merge.
    """

    tables: dict[str, AggTable] = dc_field(default_factory=dict)
    hosts: dict[str, dict[str, HostTable]] = dc_field(default_factory=dict)

    def add_host(self, host: str, tid: str, part: HostTable, table: AggTable | None) -> None:
        """Fold one host's table (None when it has none: failed) into the fleet's."""
        have = self.hosts.setdefault(host, {})
        if tid in have:
            raise InputError(f"host {host} reported aggregate {tid} twice")
        have[tid] = part
        if table is None:
            return
        fleet = self.tables.get(tid)
        one = AggTable(table.probe, table.kind, table.field, table.by, table.top, dict(table.counts),
                       dict.fromkeys(table.counts, 1), table.error, table.cap)
        self.tables[tid] = one if fleet is None else fleet.merged(one)

    def declare(self, table: AggTable) -> None:
        """Make sure a table exists (a run whose hosts all failed still shows its aggregates)."""
        if table.table_id not in self.tables:
            self.tables[table.table_id] = AggTable(table.probe, table.kind, table.field, table.by, table.top)

    def modes(self, tid: str) -> dict[str, list[str]]:
        """{mode: hosts} for one table."""
        out: dict[str, list[str]] = {}
        for h, parts in sorted(self.hosts.items()):
            if tid in parts:
                out.setdefault(parts[tid].mode, []).append(h)
        return out

    def host_hits(self, tid: str) -> dict[str, int]:
        return {h: parts[tid].hits for h, parts in sorted(self.hosts.items()) if tid in parts}

    def dropped(self, host: str) -> int:
        return sum(p.dropped for p in self.hosts.get(host, {}).values())

    def merged(self, other: AggResults) -> AggResults:
        both = sorted(set(self.hosts) & set(other.hosts))
        if both:
            raise InputError(f"host(s) {', '.join(both[:5])} have aggregates in both reports",
                             hint="merge reports of disjoint host sets (shards), not the same run twice")
        out = AggResults({k: t.merged(AggTable(t.probe, t.kind, t.field, t.by, t.top)) for k, t in self.tables.items()},
                         {h: dict(p) for h, p in self.hosts.items()})
        for k, t in other.tables.items():
            out.tables[k] = out.tables[k].merged(t) if k in out.tables else t.merged(
                AggTable(t.probe, t.kind, t.field, t.by, t.top))
        for h, p in other.hosts.items():
            out.hosts[h] = dict(p)
        return out

    def __bool__(self) -> bool:
        return bool(self.tables or self.hosts)

    def to_json(self) -> dict[str, Any]:
        return {"tables": [t.to_json() for _, t in sorted(self.tables.items())],
                "hosts": {h: {k: v.to_json() for k, v in sorted(p.items())} for h, p in sorted(self.hosts.items())}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> AggResults:
        if not d:
            return cls()
        tables = {t.table_id: t for t in (AggTable.from_json(x) for x in d.get("tables", ()))}
        hosts = {h: {k: HostTable.from_json(v) for k, v in p.items()} for h, p in d.get("hosts", {}).items()}
        return cls(tables, hosts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AggResults):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]



# --- progress while the run goes on (the live view) -------------------------------------------------

@dataclass(frozen=True)
class AggProgress:
    """One table on one host, as far as the controller knows while the run goes on.

    A streamed table grows on the controller as events arrive: ``hits`` and ``keys`` so far.
    A kernel table lives in the host's kernel until the runner reads its hist file at the
    end (reading it during the run would cost a channel or a fork on the host, issue 9):
    ``hits`` is None until then, and ``final`` says the host's part is in (any mode).
    """

    table: str
    mode: str
    hits: int | None = None
    keys: int | None = None
    final: bool = False


def final_progress(results: AggResults, host: str) -> tuple[AggProgress, ...]:
    """One host's tables once its run ended: every mode with what it counted (kernel tables now read)."""
    return tuple(AggProgress(tid, part.mode, part.hits, part.entries, final=True)
                 for tid, part in sorted(results.hosts.get(host, {}).items()))

