"""Aggregation at the source: hist triggers planned per host, their output parsed, one result type.

A probe with ``aggregate:`` (see :class:`~fleetprobe.playbook.AggregateSpec`) is
counted in the host's kernel where the kernel can (ftrace hist triggers, 4.7+;
entry->return latency with synthetic events and ``onmatch()``, 4.17+), so the
controller receives one line per key instead of one per event.  Where it cannot
(no hist triggers, a key the kernel cannot take, too many keys), the probe's
events are streamed as today and :class:`StreamTables` computes the same tables
on the controller.  Both end in :class:`AggResults`: reports, merge, shards,
history, audits and diff see one type, and each host's part says which way it
was computed (``kernel`` or ``stream``) and why.

Pure except for nothing: planning is a function of (probe, planned probe, facts);
:func:`parse_hist` is a function of the text the kernel printed (hostile input:
comm and paths are chosen by any user on the host).

Kernel facts (Documentation/trace/histogram.rst; checked on the lab's 6.1 guests,
see KERNEL-NOTES): at most two key fields per trigger; one string key at most
(two dynamic strings exceed HIST_KEY_SIZE_MAX: EINVAL); ``.log2`` keys print
``~ 2^N`` with N = ilog2(roundup_pow_of_two(v)); ``common_pid`` is ``int`` and a
synthetic event's parameter types must match exactly; synthetic events are
global, so each run and probe gets its own; a trigger whose variable another
trigger uses cannot be removed before that one (EBUSY), and an event with a
trigger cannot be deleted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any

from fleetprobe.errors import InputError
from fleetprobe.facts import Facts
from fleetprobe.parse import EventBatch, LineSink
from fleetprobe.traceline import parse_value, split_args, split_event
from fleetprobe.playbook import Playbook, ProbeSpec

if TYPE_CHECKING:
    from fleetprobe.plan import HostPlan, PlannedProbe
    from fleetprobe.runner.runner import RunnerReport

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
#: Entries of the per-pid timestamp table an entry probe keeps for a latency (one per live task).
TS_TABLE_SIZE = 16384
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


# --- parsing the kernel's hist files ---------------------------------------------------------------

@dataclass
class HistSection:
    """One trigger's table in a ``hist`` file: its trigger line, its entries as printed, its totals."""

    trigger: str
    entries: list[tuple[str, int]] = dc_field(default_factory=list)
    hits: int | None = None
    total_entries: int | None = None
    dropped: int | None = None
    unparsed: int = 0

    @property
    def keys(self) -> str:
        """The ``keys=`` part of the trigger as the kernel echoes it."""
        for part in self.trigger.split(":"):
            if part.startswith("keys="):
                return part[5:]
        return ""

    @property
    def helper(self) -> bool:
        """A latency's helper trigger (sets or uses a timestamp variable), not a table of its own."""
        return "=common_timestamp" in self.trigger or "onmatch(" in self.trigger


_ENTRY = re.compile(r"\{ (.*) \} hitcount: *(\d+)\s*\Z", re.S)
_TOTAL = re.compile(r"\s*(Hits|Entries|Dropped): *(\d+)\s*\Z")


def parse_hist(text: str) -> list[HistSection]:
    """The sections of a ``hist`` file (one per hist trigger on the event), in order.

    An entry is ``{ key: value[, key: value] } hitcount: N`` on one line; anything a
    user chose (a comm, a path) sits between the braces, so the line is taken from its
    end: the last `` } hitcount: N`` closes it.  A key printed over two lines (a comm
    with a newline in it) does not match and counts as unparsed: it cannot pass for
    another entry or for the totals.
    """
    sections: list[HistSection] = []
    cur: HistSection | None = None
    in_totals = False
    for line in text.split("\n"):
        if line.startswith("# trigger info: "):
            trig = line[len("# trigger info: "):]
            trig = re.sub(r" \[(active|paused)\]\s*\Z", "", trig)
            cur = HistSection(trig)
            sections.append(cur)
            in_totals = False
            continue
        if cur is None or not line.strip() or line.startswith("#"):
            continue
        if line.strip() == "Totals:":
            in_totals = True
            continue
        if in_totals:
            m = _TOTAL.match(line)
            if m:
                n = int(m.group(2))
                if m.group(1) == "Hits":
                    cur.hits = n
                elif m.group(1) == "Entries":
                    cur.total_entries = n
                else:
                    cur.dropped = n
                continue
        m = _ENTRY.match(line)
        if m and not in_totals:
            cur.entries.append((m.group(1), int(m.group(2))))
        else:
            cur.unparsed += 1
    return sections


@dataclass(frozen=True)
class KeySpec:
    """How one key of a trigger is printed and read back.

    ``form``: ``string`` (``name: text`` padded to 50), ``number`` (``%10llu``),
    ``signed`` (a signed field printed as u64: converted back with ``bits``),
    ``execname`` (``common_pid: comm [pid]``: read as the comm), ``log2`` (``~ 2^N``).
    """

    name: str      # the name the kernel prints (comm, path, common_pid, lat)
    form: str
    bits: int = 64


def _parse_key(text: str, specs: tuple[KeySpec, ...]) -> Key | None:
    """A printed compound key back into values, from its end (only the first key may be a string)."""
    values: list[Value] = []
    rest = text
    for i in range(len(specs) - 1, -1, -1):
        spec = specs[i]
        if i > 0:
            # Every key but the first is a number: take "name: VALUE" from the end, after ", ".
            if spec.form == "log2":
                m = re.search(r", " + re.escape(spec.name) + r": ~ 2\^(\d+) *\Z", rest)
            elif spec.form == "execname":
                m = re.search(r", " + re.escape(spec.name) + r": (.{0,16}?) *\[ *(\d+)\] *\Z", rest, re.S)
            else:
                m = re.search(r", " + re.escape(spec.name) + r": *(\d+) *\Z", rest)
            if m is None:
                return None
            values.append(_key_value(spec, m))
            rest = rest[:m.start()]
            continue
        prefix = spec.name + ": "
        if not rest.startswith(prefix):
            return None
        body = rest[len(prefix):]
        if spec.form == "string":
            # Padded with spaces to 50 by the kernel: trailing blanks of a value are lost.
            values.append(body.rstrip(" "))
        else:
            if spec.form == "log2":
                m = re.fullmatch(r"~ 2\^(\d+) *", body)
            elif spec.form == "execname":
                m = re.fullmatch(r"(.{0,16}?) *\[ *(\d+)\] *", body, re.S)
            else:
                m = re.fullmatch(r" *(\d+) *", body)
            if m is None:
                return None
            values.append(_key_value(spec, m))
    return tuple(reversed(values))


def _key_value(spec: KeySpec, m: re.Match[str]) -> Value:
    if spec.form == "execname":
        return m.group(1)
    n = int(m.group(1))
    if spec.form == "signed":
        n &= (1 << spec.bits) - 1
        if n >= 1 << (spec.bits - 1):
            n -= 1 << spec.bits
    return n


# --- planning -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trigger:
    """One line appended to ``instances/I/events/EVENT/trigger``; ``table`` is the table it fills ('' = helper)."""

    event: str
    line: str
    table: str = ""
    keys: tuple[KeySpec, ...] = ()


@dataclass(frozen=True)
class TablePlan:
    """One table of an aggregate on one host: computed in the kernel (``trigger``) or from the stream."""

    table: AggTable
    mode: str                      # kernel | stream
    reason: str = ""               # why it streams
    source_probe: str = ""         # stream latency: the entry probe
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AggPlan:
    """A probe's aggregates on one host: the synthetic events and triggers to install, and each table's mode.

    ``stream`` is True when the probe's events must be streamed (some table is
    computed on the controller); otherwise the probe's event is not enabled at all
    (its triggers alone run it: a trigger soft-enables the event).
    """

    probe: str
    tables: tuple[TablePlan, ...]
    synthetic: tuple[str, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    #: Extra fetch args this probe's definition gets (``comm=$comm:string`` for a comm key).
    extra_args: tuple[str, ...] = ()

    @property
    def stream(self) -> bool:
        return any(t.mode == "stream" for t in self.tables)

    @property
    def kernel(self) -> bool:
        return any(t.mode == "kernel" for t in self.tables)


class NoKernel(Exception):
    """This table cannot be computed in this host's kernel; the message says why (it streams)."""


class BadField(Exception):
    """A field the probe does not have on this host (the probe is skipped with this reason)."""


#: Field declarations of a tracepoint (name -> C declaration, e.g. ``const char * pathname``).
FieldDecls = Mapping[str, str]

_STRING_TYPES = ("string", "ustring", "symstr")
_SIGNED_C = re.compile(r"\b(int|long|short|s8|s16|s32|s64|pid_t|ssize_t|loff_t|off_t|time64_t|ktime_t)\b")


def field_form(probe_kind: str, name: str, args: Mapping[str, str | None], decls: FieldDecls | None,
               features: frozenset[str]) -> tuple[str, KeySpec, str | None]:
    """(kernel key expression, how it prints, an extra fetch arg to add) for one key field.

    ``args``: a dynamic probe's fetch args (name -> type); ``decls``: a tracepoint's fields.
    Raises NoKernel (stream it) or BadField (no such field on this host).
    """
    if name == "pid":
        return "common_pid", KeySpec("common_pid", "signed", 32), None
    if probe_kind == "tracepoint":
        if decls is None:
            raise NoKernel("the host's facts lack this tracepoint's format (fields unknown)")
        decl = decls.get(name)
        if decl is None:
            if name == "comm":
                return _execname(features)
            raise BadField(f"the event has no field {name!r} (fields: {', '.join(decls) or 'none'})")
        return _decl_form(name, decl)
    if name in args:
        t = (args[name] or "").split("[", 1)
        base = t[0]
        if len(t) > 1:
            raise NoKernel(f"{name} is an array ({args[name]}); the kernel keys only scalars and strings")
        if base in _STRING_TYPES:
            return name, KeySpec(name, "string"), None
        if base.startswith("s") and base[1:].isdigit():
            return name, KeySpec(name, "signed", int(base[1:])), None
        return name, KeySpec(name, "number"), None
    if name == "comm":
        if "comm" in features:
            # A string the kernel copies at the probe: keyed by task name, not by pid.
            return "comm", KeySpec("comm", "string"), "comm=$comm:string"
        return _execname(features)
    raise BadField(f"the probe has no field {name!r}")


def _execname(features: frozenset[str]) -> tuple[str, KeySpec, str | None]:
    if "hist_execname" not in features:
        raise NoKernel("the event has no comm field and the kernel's hist has no .execname")
    return "common_pid.execname", KeySpec("common_pid", "execname"), None


def _decl_form(name: str, decl: str) -> tuple[str, KeySpec, str | None]:
    """A tracepoint field's key form from its C declaration in the format file."""
    d = " ".join(decl.split())
    if d.startswith("__data_loc") or re.search(r"\bchar\s+\w+\[\d*\]", d) or d.startswith("__rel_loc"):
        return name, KeySpec(name, "string"), None
    if "[" in d:
        raise NoKernel(f"{name} is an array ({d}); the kernel keys only scalars and strings")
    if "*" in d and re.search(r"\bchar\b", d):
        raise NoKernel(f"{name} is a pointer to a string the kernel does not copy ({d}); keyed in the kernel it "
                       "would count addresses (a kprobe with +0(argN):ustring can key the string)")
    if "unsigned" not in d and "*" not in d and _SIGNED_C.search(d):
        bits = 64 if re.search(r"\blong\b|64|loff_t|ssize_t|ktime_t|time64_t", d) else 32
        if re.search(r"\bshort\b|16", d):
            bits = 16
        return name, KeySpec(name, "signed", bits), None
    return name, KeySpec(name, "number"), None


def synthetic_name(group: str, probe: str) -> str:
    """The run's own synthetic event for a latency: global in the kernel, so named by run, host and probe."""
    return f"{group}_{probe}"


def plan_aggregate(*, probe: str, kind: str, spec_kind: str, fields: tuple[str, ...], value: str | None,
                   top: int, size: int, event: str, group: str, args: Mapping[str, str | None],
                   decls: FieldDecls | None, features: frozenset[str], entry_event: str | None = None,
                   entry_kind: str | None = None, entry_decls: FieldDecls | None = None,
                   entry_name: str | None = None) -> AggPlan:
    """Plan one probe's aggregate on one host.

    ``kind``: the probe's kind (kprobe, tracepoint ...); ``spec_kind``: count, histogram
    or latency; ``event``: the probe's path under ``events/``; ``entry_*``: for a
    latency, the entry probe it pairs with (its event path, kind and name).
    Raises BadField when a field does not exist on this host.
    """
    tables: list[TablePlan] = []
    triggers: list[Trigger] = []
    synthetic: list[str] = []
    extra: list[str] = []
    base = "hist" in features
    why_not = "" if base else "no hist triggers in this kernel (the tracefs README lists no 'hist:')"

    def key(name: str) -> tuple[str, KeySpec]:
        expr, ks, add = field_form(kind, name, args, decls, features)
        if add and add not in extra:
            extra.append(add)
        return expr, ks

    def streamed(reason: str, names: Iterable[str]) -> str:
        """A streamed table keyed by comm: the event's own comm where the probe can carry it, else said.

        A trace line's task name is the kernel's pid->comm cache when the line is read: for a
        short-lived task it can be '<...>', the name it had before exec, or an earlier task's.
        """
        if "comm" not in names:
            return reason
        if kind == "tracepoint":
            if decls is not None and "comm" in decls:
                return reason
        elif "comm" in args:
            return reason
        elif "comm" in features:
            if "comm=$comm:string" not in extra:
                extra.append("comm=$comm:string")
            return reason
        return (reason + "; comm is the kernel's name for the pid when each line is read, not at the event "
                "(a short-lived task can show '<...>', its name before exec, or an earlier task's)")

    if spec_kind == "count":
        for f in fields:
            table = AggTable(probe, "count", f, (), top)
            reason = why_not
            trig: Trigger | None = None
            if not reason:
                try:
                    expr, ks = key(f)
                    trig = Trigger(event, f"hist:keys={expr}:vals=hitcount:sort=hitcount.descending:size={size}",
                                   table.table_id, (ks,))
                except NoKernel as e:
                    reason = f"{f}: {e}"
            else:
                _check_field(kind, f, args, decls)
            if trig is not None:
                triggers.append(trig)
                tables.append(TablePlan(table, "kernel"))
            else:
                tables.append(TablePlan(table, "stream", streamed(reason, (f,))))
        return AggPlan(probe, tuple(tables), (), tuple(triggers), tuple(extra))
    if spec_kind == "histogram":
        assert value is not None
        table = AggTable(probe, "histogram", value, fields, top)
        reason = why_not or ("" if "hist_log2" in features else "the kernel's hist has no .log2 modifier")
        if not reason and len(fields) > 1:
            reason = (f"split by {len(fields)} keys: the kernel takes at most two keys per trigger, the "
                      "histogram's value and one")
        keys: list[tuple[str, KeySpec]] = []
        if not reason:
            try:
                keys = [key(f) for f in fields]
                vexpr, vks = key(value)
                if vks.form in ("string", "execname"):
                    raise BadField(f"{value!r} is a string here; a histogram needs a number")
                keys.append((f"{vexpr}.log2", KeySpec(vexpr, "log2")))
            except NoKernel as e:
                reason = str(e)
        else:
            for f in (*fields, value):
                _check_field(kind, f, args, decls)
        if reason:
            return AggPlan(probe, (TablePlan(table, "stream", streamed(reason, fields)),), (), (), tuple(extra))
        line = (f"hist:keys={','.join(k for k, _ in keys)}:vals=hitcount:sort=hitcount.descending:size={size}")
        return AggPlan(probe, (TablePlan(table, "kernel"),), (),
                       (Trigger(event, line, table.table_id, tuple(ks for _, ks in keys)),), tuple(extra))
    # latency
    assert entry_event is not None and entry_name is not None
    table = AggTable(probe, "latency", "ns", fields, top)
    reason = why_not
    for need, what in (("synthetic_events", "no synthetic events (CONFIG_SYNTH_EVENTS)"),
                       ("hist_onmatch", "the kernel's hist has no onmatch() handler"),
                       ("common_timestamp", "the kernel's hist has no common_timestamp"),
                       ("hist_log2", "the kernel's hist has no .log2 modifier")):
        if not reason and need not in features:
            reason = what
    if not reason and len(fields) > 1:
        reason = f"split by {len(fields)} keys: the kernel takes at most two keys per trigger, the latency and one"
    if reason:
        return AggPlan(probe, (TablePlan(table, "stream", streamed(reason, fields), source_probe=entry_name),),
                       (), (), tuple(extra))
    synth = synthetic_name(group, probe)
    ts, lat = f"fpts_{probe}", f"fplat_{probe}"
    sys_, _, ev = entry_event.partition("/")
    action = (f"onmatch({sys_}.{ev}).trace({synth},${lat},common_pid)" if "hist_trace_action" in features
              else f"onmatch({sys_}.{ev}).{synth}(${lat},common_pid)")
    # The synthetic event fires in the returning task: its pid field and common_pid are that task.
    by_keys = [("pid", KeySpec("pid", "signed", 32)) if f == "pid" else _execname(features)[:2] for f in fields]
    synthetic.append(f"{synth} u64 lat; int pid")
    triggers.append(Trigger(entry_event, f"hist:keys=common_pid:{ts}=common_timestamp:size={TS_TABLE_SIZE}"))
    triggers.append(Trigger(event, f"hist:keys=common_pid:{lat}=common_timestamp-${ts}:{action}"))
    keys_text = ",".join([k for k, _ in by_keys] + ["lat.log2"])
    triggers.append(Trigger(f"synthetic/{synth}", f"hist:keys={keys_text}:vals=hitcount:sort=hitcount.descending:"
                            f"size={size}", table.table_id,
                            (*(ks for _, ks in by_keys), KeySpec("lat", "log2"))))
    return AggPlan(probe, (TablePlan(table, "kernel"),), tuple(synthetic), tuple(triggers), ())


def _check_field(kind: str, name: str, args: Mapping[str, str | None], decls: FieldDecls | None) -> None:
    """A field must exist even where the table streams (BadField otherwise)."""
    if name in ("comm", "pid"):
        return
    if kind == "tracepoint":
        if decls is not None and name not in decls:
            raise BadField(f"the event has no field {name!r} (fields: {', '.join(decls) or 'none'})")
    elif name not in args:
        raise BadField(f"the probe has no field {name!r}")


# --- reading a host's tables back ----------------------------------------------------------------

def tables_from_hist(plan: AggPlan, hist_text: Mapping[str, str], refused: Mapping[str, str],
                     ) -> list[tuple[AggTable, HostTable]]:
    """Each kernel table of ``plan`` from the hist files the runner read (``{event: text}``).

    ``refused``: the kernel's refusal of a trigger, by table id. A table whose
    section is missing is ``failed`` with the reason, never an empty table.
    """
    out: list[tuple[AggTable, HostTable]] = []
    by_event: dict[str, list[HistSection]] = {}
    for ev, text in hist_text.items():
        by_event[ev] = [s for s in parse_hist(text) if not s.helper]
    helper_dropped = 0
    for text in hist_text.values():
        for s in parse_hist(text):
            if s.helper and s.dropped:
                helper_dropped += s.dropped
    for tp in plan.tables:
        if tp.mode != "kernel":
            continue
        t = tp.table
        trig = next(tr for tr in plan.triggers if tr.table == t.table_id)
        if t.table_id in refused:
            out.append((t, HostTable("failed", refused[t.table_id])))
            continue
        want = _keys_of(trig.line)
        section = next((s for s in by_event.get(trig.event, []) if s.keys == want), None)
        if section is None:
            out.append((t, HostTable("failed", f"no table for {trig.line!r} in {trig.event}/hist (the trigger "
                                              "was not in place when the run ended)")))
            continue
        table = AggTable(t.probe, t.kind, t.field, t.by, t.top)
        bad = section.unparsed
        for text, n in section.entries:
            k = _parse_key(text, trig.keys)
            if k is None:
                bad += 1
                continue
            table.counts[k] = table.counts.get(k, 0) + n
        hits = section.hits if section.hits is not None else sum(n for _, n in section.entries)
        dropped = section.dropped or 0
        if t.kind == "latency":
            # A full per-pid timestamp table loses entries: the returns they belonged to are not timed.
            dropped += helper_dropped
        reason = f"{bad} line(s) of the kernel's table could not be read" if bad else ""
        out.append((table, HostTable("kernel", reason, hits=hits,
                                     entries=section.total_entries or len(section.entries), dropped=dropped)))
    return out


def _keys_of(line: str) -> str:
    """The keys= part of a trigger line as the kernel echoes it back."""
    for part in line.split(":"):
        if part.startswith("keys="):
            return part[5:]
    return ""


# --- the stream fallback ----------------------------------------------------------------------

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


# --- one host's aggregates, from the playbook and the probes planned there ---------------------------

def plan_host_aggregates(playbook: Playbook, facts: Facts, group: str, probes: list[PlannedProbe],
                         ) -> tuple[list[PlannedProbe], tuple[AggPlan, ...], list[tuple[str, str]]]:
    """(probes, aggregate plans, [(probe, reason) skipped]) for one host.

    A probe whose every table is counted in the kernel is planned with ``stream=False``
    (not enabled: its triggers run it); an entry probe a streamed latency pairs with
    keeps streaming.  A probe whose aggregate names a field the event lacks on this
    host is skipped with the reason.
    """
    placed = {p.name: p for p in probes}
    plans: list[AggPlan] = []
    skipped: list[tuple[str, str]] = []
    for spec in playbook.probes:
        agg = spec.aggregate
        if agg is None or spec.name not in placed:
            continue
        pp = placed[spec.name]
        entry = placed.get(spec.pair_with or "") if agg.kind == "latency" else None
        if agg.kind == "latency" and entry is None:
            skipped.append((spec.name, f"its entry probe {spec.pair_with!r} is not placed on this host: no latency"))
            continue
        try:
            ap = plan_aggregate(
                probe=spec.name, kind=spec.kind, spec_kind=agg.kind, fields=agg.fields, value=agg.value,
                top=agg.top, size=agg.size, event=pp.event, group=group, args=_probe_arg_types(spec),
                decls=_decls(facts, spec), features=facts.features,
                entry_event=entry.event if entry else None, entry_kind=entry.kind if entry else None,
                entry_name=entry.name if entry else None)
        except BadField as e:
            skipped.append((spec.name, f"aggregate: {e}"))
            continue
        plans.append(ap)
        if ap.extra_args and pp.definition:
            # Before the run's seal when the definition has one: the seal must stay the last thing printed.
            head, seal = _split_seal(pp.definition)
            pp = replace(pp, definition=f"{head} {' '.join(ap.extra_args)}{seal}",
                         fields=pp.fields + tuple(a.split("=", 1)[0] for a in ap.extra_args))
        placed[spec.name] = replace(pp, stream=ap.stream)
    for name, _ in skipped:
        placed.pop(name, None)
    # An entry probe whose latency is computed from the stream must stream too.
    for ap in plans:
        for tp in ap.tables:
            if tp.mode == "stream" and tp.source_probe in placed:
                placed[tp.source_probe] = replace(placed[tp.source_probe], stream=True)
    return [placed[p.name] for p in probes if p.name in placed], tuple(plans), skipped


_SEAL_TAIL = re.compile(r"( fpt=\\0x[0-9a-f]+:x32 fpu=\\0x[0-9a-f]+:x32)$")


def _split_seal(definition: str) -> tuple[str, str]:
    """(definition without its trailing seal args, the seal args with their leading space or '')."""
    m = _SEAL_TAIL.search(definition)
    return (definition[:m.start()], m.group(1)) if m else (definition, "")


def _probe_arg_types(spec: ProbeSpec) -> dict[str, str | None]:
    """A dynamic probe's fields and their fetch types (a raw line's from its own text)."""
    if spec.kind == "raw" and spec.raw_line:
        out: dict[str, str | None] = {}
        for tok in spec.raw_line.split()[2:]:
            name, eq, rest = tok.partition("=")
            if eq:
                _, colon, typ = rest.rpartition(":")
                out[name] = typ if colon and ")" not in typ else None
        for f in spec.raw_fields:
            out.setdefault(f, None)
        return out
    return {a.name: a.type for a in spec.args}


def _decls(facts: Facts, spec: ProbeSpec) -> dict[str, str] | None:
    """A tracepoint's {field: declaration} from the host's format file; None when the facts lack it."""
    if spec.kind != "tracepoint":
        return None
    fmt = facts.tracepoint_formats.get(str(spec.targets[0]))
    if fmt is None:
        return None
    return fmt.decl_of() or None


# --- one host's results after its run -------------------------------------------------------------

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


def host_tables(plans: Iterable[AggPlan], hist_text: Mapping[str, list[str]],
                trigger_refused: Mapping[tuple[str, str], str], synth_refused: Mapping[str, str],
                stream: StreamTables | None, capped: int, filters: Mapping[str, str] | None = None,
                ) -> list[tuple[str, HostTable, AggTable | None]]:
    """Every table of one host's aggregates, kernel or stream, as (table id, host part, table)."""
    filters = filters or {}
    texts = {ev: "\n".join(lines) for ev, lines in hist_text.items()}
    out: list[tuple[str, HostTable, AggTable | None]] = []
    for ap in plans:
        refused: dict[str, str] = {}
        latency_tids = [tp.table.table_id for tp in ap.tables if tp.table.kind == "latency"]
        for s in ap.synthetic:
            name = s.split(" ", 1)[0]
            if name in synth_refused:
                for tid in latency_tids:
                    refused.setdefault(tid, synth_refused[name])
        for t in ap.triggers:
            f = filters.get(t.event)
            why = trigger_refused.get((t.event, t.line + (f" if {f}" if f else "")))
            if why is None:
                continue
            for tid in ([t.table] if t.table else latency_tids):
                refused.setdefault(tid, f"{why} ({t.event}: {t.line})")
        kernel = [tp for tp in ap.tables if tp.mode == "kernel"]
        if kernel:
            wanted = {t.event for t in ap.triggers}
            for table, part in tables_from_hist(ap, {e: x for e, x in texts.items() if e in wanted}, refused):
                out.append((table.table_id, part, table if part.mode == "kernel" else None))
        for tp in ap.tables:
            if tp.mode != "stream":
                continue
            tid = tp.table.table_id
            got = stream.tables.get(tid) if stream is not None else None
            if got is None:
                out.append((tid, HostTable("failed", "no stream was read for it"), None))
                continue
            reason = tp.reason
            if capped:
                reason += f"; the event cap stopped the stream ({capped} events not counted)"
            out.append((tid, HostTable("stream", reason, hits=stream.hits.get(tid, 0) if stream else 0,
                                       entries=len(got.counts), dropped=capped), got))
    return out


def add_host_tables(results: AggResults, host: str, plan: HostPlan, report: RunnerReport,
                    stream: StreamTables | None, capped: int, hits: dict[str, int]) -> int:
    """Fold one host's aggregate tables into ``results``; fill ``hits`` of kernel-counted probes.

    Returns the events the kernel could not count (hist ``Dropped:``), for the host's loss counters.
    """
    filters = {p.event: p.filter for p in plan.probes if p.filter}
    dropped = 0
    for tid, part, table in host_tables(plan.aggregates, report.hist, report.trigger_refused,
                                        report.synth_refused, stream, capped, filters):
        results.add_host(host, tid, part, table)
        if part.mode == "kernel":
            dropped += part.dropped
            probe = tid.split(":", 1)[0]
            # Hits + Dropped: the kernel saw every one of them (Dropped ones found the table full).
            hits[probe] = max(hits.get(probe, 0), part.hits + part.dropped)
    return dropped


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


def final_progress(results: AggResults, host: str) -> tuple[AggProgress, ...]:
    """One host's tables once its run ended: every mode with what it counted (kernel tables now read)."""
    return tuple(AggProgress(tid, part.mode, part.hits, part.entries, final=True)
                 for tid, part in sorted(results.hosts.get(host, {}).items()))


# --- what `fleetprobe plan` shows ----------------------------------------------------------------

def plan_lines(plan: HostPlan) -> list[str]:
    """The exact synthetic-event and trigger lines a run writes on this host, and each table's mode."""
    out: list[str] = []
    for ap in plan.aggregates:
        for s in ap.synthetic:
            out.append(f"synthetic_events >> {s}")
        for t in ap.triggers:
            out.append(f"instances/{plan.instance}/events/{t.event}/trigger >> {t.line}")
        for tp in ap.tables:
            by = f" per {', '.join(tp.table.by)}" if tp.table.by else ""
            what = f"{tp.table.probe}: {tp.table.kind} {tp.table.field}{by}"
            if tp.mode == "kernel":
                out.append(f"aggregate {what}: in kernel")
            else:
                out.append(f"aggregate {what}: streamed, computed on the controller ({tp.reason})")
    return out


def plan_json(plan: HostPlan) -> list[dict[str, Any]]:
    """The aggregates of a plan as JSON (``fleetprobe plan --json``)."""
    return [{"probe": ap.probe, "synthetic": list(ap.synthetic),
             "triggers": [{"event": t.event, "line": t.line, "table": t.table} for t in ap.triggers],
             "tables": [{"table": tp.table.table_id, "by": list(tp.table.by), "mode": tp.mode, "reason": tp.reason}
                        for tp in ap.tables]} for ap in plan.aggregates]
