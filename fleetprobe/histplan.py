"""Hist-trigger planning: which tables of a probe's ``aggregate:`` a host's kernel counts, and the lines to write.

A probe with ``aggregate:`` (see :class:`~fleetprobe.playbook.AggregateSpec`) is
counted in the host's kernel where the kernel can (ftrace hist triggers, 4.7+;
entry->return latency with synthetic events and ``onmatch()``, 4.17+), so the
controller receives one line per key instead of one per event.  Where it cannot
(no hist triggers, a key the kernel cannot take, too many keys), the table is
planned as streamed and :class:`~fleetprobe.aggstream.StreamTables` computes it
on the controller.  Pure: a function of (probe, planned event, facts).

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
from dataclasses import dataclass

from fleetprobe.aggtables import AggTable
from fleetprobe.facts import Facts
from fleetprobe.playbook import ProbeSpec

#: Entries of the per-pid timestamp table an entry probe keeps for a latency (one per live task).
TS_TABLE_SIZE = 16384


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


@dataclass
class _Keys:
    """How one probe's fields become kernel keys on one host, and the fetch args that takes (``extra``)."""

    kind: str
    args: Mapping[str, str | None]
    decls: FieldDecls | None
    features: frozenset[str]
    extra: list[str]

    def key(self, name: str) -> tuple[str, KeySpec]:
        """The kernel key expression of a field and how it prints (NoKernel, BadField: see field_form)."""
        expr, ks, add = field_form(self.kind, name, self.args, self.decls, self.features)
        if add and add not in self.extra:
            self.extra.append(add)
        return expr, ks

    def check(self, name: str) -> None:
        """A field must exist even where the table streams (BadField otherwise)."""
        _check_field(self.kind, name, self.args, self.decls)

    def streamed(self, reason: str, names: Iterable[str]) -> str:
        """A streamed table keyed by comm: the event's own comm where the probe can carry it, else said.

        A trace line's task name is the kernel's pid->comm cache when the line is read: for a
        short-lived task it can be '<...>', the name it had before exec, or an earlier task's.
        """
        if "comm" not in names:
            return reason
        if self.kind == "tracepoint":
            if self.decls is not None and "comm" in self.decls:
                return reason
        elif "comm" in self.args:
            return reason
        elif "comm" in self.features:
            if "comm=$comm:string" not in self.extra:
                self.extra.append("comm=$comm:string")
            return reason
        return (reason + "; comm is the kernel's name for the pid when each line is read, not at the event "
                "(a short-lived task can show '<...>', its name before exec, or an earlier task's)")


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
    keys = _Keys(kind, args, decls, features, [])
    why_not = "" if "hist" in features else "no hist triggers in this kernel (the tracefs README lists no 'hist:')"
    if spec_kind == "count":
        return _count_plan(probe, fields, top, size, event, keys, why_not)
    if spec_kind == "histogram":
        assert value is not None
        return _histogram_plan(probe, fields, value, top, size, event, keys, why_not)
    assert entry_event is not None and entry_name is not None
    return _latency_plan(probe, fields, top, size, event, group, entry_event, entry_name, keys, why_not)


def _count_plan(probe: str, fields: tuple[str, ...], top: int, size: int, event: str, keys: _Keys,
                why_not: str) -> AggPlan:
    """``count``: one table per field, each in the kernel where it can be keyed there."""
    tables: list[TablePlan] = []
    triggers: list[Trigger] = []
    for f in fields:
        table = AggTable(probe, "count", f, (), top)
        reason = why_not
        trig: Trigger | None = None
        if not reason:
            try:
                expr, ks = keys.key(f)
                trig = Trigger(event, f"hist:keys={expr}:vals=hitcount:sort=hitcount.descending:size={size}",
                               table.table_id, (ks,))
            except NoKernel as e:
                reason = f"{f}: {e}"
        else:
            keys.check(f)
        if trig is not None:
            triggers.append(trig)
            tables.append(TablePlan(table, "kernel"))
        else:
            tables.append(TablePlan(table, "stream", keys.streamed(reason, (f,))))
    return AggPlan(probe, tuple(tables), (), tuple(triggers), tuple(keys.extra))


def _histogram_plan(probe: str, fields: tuple[str, ...], value: str, top: int, size: int, event: str,
                    keys: _Keys, why_not: str) -> AggPlan:
    """``histogram``: log2 buckets of ``value``, split by at most one key in the kernel."""
    features = keys.features
    table = AggTable(probe, "histogram", value, fields, top)
    reason = why_not or ("" if "hist_log2" in features else "the kernel's hist has no .log2 modifier")
    if not reason and len(fields) > 1:
        reason = (f"split by {len(fields)} keys: the kernel takes at most two keys per trigger, the "
                  "histogram's value and one")
    exprs: list[tuple[str, KeySpec]] = []
    if not reason:
        try:
            exprs = [keys.key(f) for f in fields]
            vexpr, vks = keys.key(value)
            if vks.form in ("string", "execname"):
                raise BadField(f"{value!r} is a string here; a histogram needs a number")
            exprs.append((f"{vexpr}.log2", KeySpec(vexpr, "log2")))
        except NoKernel as e:
            reason = str(e)
    else:
        for f in (*fields, value):
            keys.check(f)
    if reason:
        return AggPlan(probe, (TablePlan(table, "stream", keys.streamed(reason, fields)),), (), (),
                       tuple(keys.extra))
    line = (f"hist:keys={','.join(k for k, _ in exprs)}:vals=hitcount:sort=hitcount.descending:size={size}")
    return AggPlan(probe, (TablePlan(table, "kernel"),), (),
                   (Trigger(event, line, table.table_id, tuple(ks for _, ks in exprs)),), tuple(keys.extra))


#: What a kernel latency needs beyond hist triggers, and what the report says when it lacks it.
_LATENCY_NEEDS = (("synthetic_events", "no synthetic events (CONFIG_SYNTH_EVENTS)"),
                  ("hist_onmatch", "the kernel's hist has no onmatch() handler"),
                  ("common_timestamp", "the kernel's hist has no common_timestamp"),
                  ("hist_log2", "the kernel's hist has no .log2 modifier"))


def _latency_plan(probe: str, fields: tuple[str, ...], top: int, size: int, event: str, group: str,
                  entry_event: str, entry_name: str, keys: _Keys, why_not: str) -> AggPlan:
    """``latency``: entry->return nanoseconds, timed in the kernel by a synthetic event where it can."""
    features = keys.features
    table = AggTable(probe, "latency", "ns", fields, top)
    reason = why_not
    for need, what in _LATENCY_NEEDS:
        if not reason and need not in features:
            reason = what
    if not reason and len(fields) > 1:
        reason = f"split by {len(fields)} keys: the kernel takes at most two keys per trigger, the latency and one"
    if reason:
        return AggPlan(probe, (TablePlan(table, "stream", keys.streamed(reason, fields), source_probe=entry_name),),
                       (), (), tuple(keys.extra))
    synth = synthetic_name(group, probe)
    ts, lat = f"fpts_{probe}", f"fplat_{probe}"
    sys_, _, ev = entry_event.partition("/")
    action = (f"onmatch({sys_}.{ev}).trace({synth},${lat},common_pid)" if "hist_trace_action" in features
              else f"onmatch({sys_}.{ev}).{synth}(${lat},common_pid)")
    # The synthetic event fires in the returning task: its pid field and common_pid are that task.
    by_keys = [("pid", KeySpec("pid", "signed", 32)) if f == "pid" else _execname(features)[:2] for f in fields]
    keys_text = ",".join([k for k, _ in by_keys] + ["lat.log2"])
    triggers = (
        Trigger(entry_event, f"hist:keys=common_pid:{ts}=common_timestamp:size={TS_TABLE_SIZE}"),
        Trigger(event, f"hist:keys=common_pid:{lat}=common_timestamp-${ts}:{action}"),
        Trigger(f"synthetic/{synth}", f"hist:keys={keys_text}:vals=hitcount:sort=hitcount.descending:"
                f"size={size}", table.table_id, (*(ks for _, ks in by_keys), KeySpec("lat", "log2"))))
    return AggPlan(probe, (TablePlan(table, "kernel"),), (f"{synth} u64 lat; int pid",), triggers, ())


def _check_field(kind: str, name: str, args: Mapping[str, str | None], decls: FieldDecls | None) -> None:
    """A field must exist even where the table streams (BadField otherwise)."""
    if name in ("comm", "pid"):
        return
    if kind == "tracepoint":
        if decls is not None and name not in decls:
            raise BadField(f"the event has no field {name!r} (fields: {', '.join(decls) or 'none'})")
    elif name not in args:
        raise BadField(f"the probe has no field {name!r}")



def probe_arg_types(spec: ProbeSpec) -> dict[str, str | None]:
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


def tracepoint_decls(facts: Facts, spec: ProbeSpec) -> dict[str, str] | None:
    """A tracepoint's {field: declaration} from the host's format file; None when the facts lack it."""
    if spec.kind != "tracepoint":
        return None
    fmt = facts.tracepoint_formats.get(str(spec.targets[0]))
    if fmt is None:
        return None
    return fmt.decl_of() or None

