"""Plan: pure functions of (playbook, facts) that decide exactly what to write on each host.

Nothing here touches a host.  ``fleetprobe plan`` prints these plans.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fleetprobe.arches import (ARM64_SYSCALL_PT_REGS, I386_MACHINES, X64_SYSCALL_PT_REGS, kernel_arg_registers,
                              user_arg_registers)
from fleetprobe.facts import Facts, SymbolFacts, printed_key
from fleetprobe.fetchargs import ArgSpec, Deref, Fetch, RawFetch, RetvalRef
from fleetprobe.syscall_abi import n64_blind
from fleetprobe.histplan import AggPlan, BadField, plan_aggregate, probe_arg_types, tracepoint_decls
from fleetprobe.playbook import KernelTarget, Playbook, ProbeSpec, UserTarget
from fleetprobe.seal import MIN_TRACE_NAME, end_strings, seal_args, seal_trailer, split_seal, string_ends, trace_name_of
# The run's seal is made here for the orchestrator (fleetprobe.seal makes it).
from fleetprobe.seal import new_seal as new_seal


@dataclass(frozen=True)
class PlannedProbe:
    """One probe as it will be placed on one host.

    ``event`` is the path under the instance's ``events/`` directory
    (``fp_k3x9q2_a1b2/openat`` for a dynamic event, ``sched/sched_process_exec``
    for a tracepoint).  ``definition`` is the exact line appended to
    ``events_file`` (``kprobe_events`` or ``uprobe_events``); None for tracepoints.
    ``trace_name`` is the event name as it appears in trace_pipe lines.
    ``pair_with`` names the entry probe a return probe pairs with, for latency.
    """

    name: str
    kind: str
    event: str
    trace_name: str
    definition: str | None = None
    events_file: str | None = None
    filter: str | None = None
    symbol: str | None = None
    fields: tuple[str, ...] = ()
    pair_with: str | None = None
    #: ``any`` or ``none`` (the probe must never fire: an audit).
    expect: str = "any"
    #: Module probes: the module's source directory and its resolved parameters.
    module: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    #: Uprobes: the binary and the file offset probed.
    path: str | None = None
    offset: int | None = None
    #: False when the kernel aggregates every table of this probe: its event is not enabled for
    #: streaming (its hist triggers alone run it).
    stream: bool = True
    #: How a user's text in this probe's lines is kept from passing for other lines (issue 11 #2):
    #: ``sealed`` (the definition ends with the run's seal, which the kernel prints after every
    #: string, so a line is whole only at the seal), ``guarded`` (the event's filter keeps every
    #: event whose strings or comm hold a newline out of the ring buffer: each line is whole),
    #: or ``unframed`` (neither: a user's string can forge lines; the report says so).
    #: Empty for modules (their lines come through the kernel log, which escapes newlines).
    framing: str = ""
    #: ``guarded``: the string fields the guard filter covers (the task's comm always).
    guard: tuple[str, ...] = ()
    #: ``sealed``: how many strings its definition ends with a string end (see string_end_args).
    string_ends: int = 0


@dataclass(frozen=True)
class SkippedProbe:
    """A probe not placed on a host, and why (e.g. no alternative symbol is probeable)."""

    name: str
    reason: str


@dataclass(frozen=True)
class HostPlan:
    """Everything one host will do in one run.

    ``group`` is the tracefs group owning this run's dynamic events on this host
    and ``instance`` the tracefs instance (private ring buffer) they are enabled in;
    both carry the run id and a per-host part so they never collide.
    ``failed`` is set when a probe with ``on_missing: fail`` cannot be placed:
    the host is then not probed at all.  ``duration`` is how long the probes run (seconds) and
    ``deadline`` the host's epoch second by which the run is over, teardown slack included (also
    in the instance name, for sweeps by other runs; the run itself reads these fields).
    """

    host: str
    run_id: str
    group: str
    instance: str
    probes: tuple[PlannedProbe, ...] = ()
    skipped: tuple[SkippedProbe, ...] = ()
    failed: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    duration: float = 0.0
    deadline: int = 0
    #: In-kernel aggregation (hist triggers) or its controller-side fallback, per aggregating probe.
    aggregates: tuple[AggPlan, ...] = ()
    #: The run's seal on this host (two 32-bit secrets, see :func:`seal_args`), or None.
    seal: tuple[int, int] | None = None

    @property
    def trailer(self) -> str:
        """What the kernel prints at the end of every line of a sealed probe ('' without a seal)."""
        return seal_trailer(self.seal) if self.seal is not None else ""

    @property
    def string_ends(self) -> tuple[str, ...]:
        """How the kernel prints the string ends of this host's sealed probes (see :func:`string_ends`)."""
        count = max((p.string_ends for p in self.probes), default=0)
        return string_ends(self.seal, count) if self.seal is not None and count else ()

    def unframed(self) -> dict[str, str]:
        """{probe: why} for the placed tracefs probes whose lines a user's text could forge."""
        return {p.name: p.framing.partition(": ")[2] or "no framing"
                for p in self.probes if p.kind != "module" and not p.framing.startswith(("sealed", "guarded"))}


def host_framing(plan: HostPlan, unguarded: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """Each placed tracefs probe's framing as it ran, and why the host's events could be forged ('' if not).

    ``unguarded``: {event: why} for the guards the host's kernel refused (the runner says so).
    One probe whose lines a user's text can continue is enough to make every line after one of its
    events suspect, whatever probe it names: the whole host is then forgeable.
    """
    framing = {p.name: p.framing for p in plan.probes if p.kind != "module"}
    unframed = plan.unframed()
    for p in plan.probes:
        why = unguarded.get(p.event)
        if why is not None and p.kind != "module":
            framing[p.name] = unframed[p.name] = f"unframed: the kernel refused its newline guard ({why})"
    if not unframed:
        return framing, ""
    return framing, ("a user's text in " + ", ".join(f"{k} ({v.partition(': ')[2] or v})"
                                                      for k, v in sorted(unframed.items()))
                     + " can forge whole events of any probe on this host")


# --- names -----------------------------------------------------------------

_RUN_ID = re.compile(r"[a-z0-9]{1,16}")
_GROUP = re.compile(r"fp_[a-z0-9]{1,16}_[0-9a-f]{4}")
_INSTANCE = re.compile(r"(fp_[a-z0-9]{1,16}_[0-9a-f]{4})_(\d{1,12})")
#: Every group and instance fleetprobe creates starts with this; sweeps touch nothing else.
PREFIX = "fp_"


def new_run_id() -> str:
    """A fresh 6-character run id (lowercase letters and digits)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(6))


def names_for(run_id: str, host: str, deadline: int) -> tuple[str, str]:
    """(group, instance) for one run on one host: ``fp_<run>_<hosthash>`` and ``<group>_<deadline>``.

    The host part keeps "hosts" that share one kernel (network namespaces,
    containers) apart; the deadline (epoch seconds) in the instance name lets a
    later sweep tell a dead run's leftovers from a live run.  Group names are
    capped at MAX_EVENT_NAME_LEN (64) by the kernel; these stay under 25.
    """
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-16 lowercase letters or digits")
    if deadline < 0:
        raise ValueError(f"deadline {deadline} must be epoch seconds")
    host_part = hashlib.sha256(host.encode("utf-8")).hexdigest()[:4]
    group = f"{PREFIX}{run_id}_{host_part}"
    return group, f"{group}_{int(deadline)}"


def is_fleetprobe_group(name: str) -> bool:
    """True when an event group name has exactly the shape names_for() gives (a sweep touches only these)."""
    return _GROUP.fullmatch(name) is not None


def with_later_deadline(plan: HostPlan, deadline: float) -> HostPlan:
    """``plan`` with its instance's deadline moved to ``deadline`` if that is later (never earlier).

    A plan's deadline is set when it is made; a host that then waits for a module
    build would start its probes with less time before its on-host timer and
    other runs' sweeps treat it as dead. Called again just before the probes start.
    """
    if int(deadline) <= plan.deadline:
        return plan
    group, instance = names_for(plan.run_id, plan.host, int(deadline))
    if group != plan.group:
        return plan
    return replace(plan, instance=instance, deadline=int(deadline))


def group_of_instance(name: str) -> str | None:
    """The group a fleetprobe instance name belongs to, or None if it is not one of ours."""
    m = _INSTANCE.fullmatch(name)
    return m.group(1) if m else None


def is_stale_instance(name: str, now: float, grace: float) -> bool:
    """True for a fleetprobe instance whose deadline + grace has passed (never for other names)."""
    m = _INSTANCE.fullmatch(name)
    return m is not None and int(m.group(2)) + grace < now


# --- lowering --------------------------------------------------------------

class _Unplaceable(Exception):
    """A probe cannot be placed on this host; the message is the reason."""


@dataclass(frozen=True)
class _Lowering:
    """How portable fetch args become tracefs syntax for one probe on one host."""

    probe: str
    facts: Facts
    user: bool            # uprobe: user-space calling convention
    entry: bool           # function entry (offset 0): $argN is valid
    symbol: str | None

    def fetch(self, fetch: Fetch, notes: list[str]) -> str:
        """Lower one fetch expression."""
        if isinstance(fetch, RawFetch):
            return fetch.text
        if isinstance(fetch, RetvalRef):
            return "$retval"
        if isinstance(fetch, Deref):
            user = fetch.user
            if user and "user_deref" not in self.facts.features:
                # +u<off> arrived in 5.3; before it, + reads user memory too.
                notes.append(f"{self.probe}: +u (user memory) unsupported on {self.facts.kernel_release} "
                             "(before 5.3): using +")
                user = False
            sign = "-" if fetch.offset < 0 else "+"
            return f"{sign}{'u' if user else ''}{abs(fetch.offset)}({self.fetch(fetch.inner, notes)})"
        return self.arg(fetch.n, notes)

    def arg(self, n: int, notes: list[str]) -> str:
        """Lower ``argN``."""
        f = self.facts
        if self.user:
            if f.arch in I386_MACHINES:
                # cdecl: at the first instruction the return address is $stack0.
                return f"$stack{n}"
            regs = user_arg_registers(f)
        else:
            sym = self.symbol or ""
            if sym.startswith("__x64_sys_") and f.arch == "x86_64":
                return self._syscall_arg(n, "%di", X64_SYSCALL_PT_REGS)
            if sym.startswith("__arm64_sys_") and f.arch in ("aarch64", "arm64"):
                return self._syscall_arg(n, "%x0", ARM64_SYSCALL_PT_REGS)
            if self.entry and "arg_n" in f.features:
                return f"$arg{n}"
            regs = kernel_arg_registers(f)
            if not self.entry:
                notes.append(f"{self.probe}: arg{n} read from a register inside the function; "
                             "it may no longer hold the argument")
        if regs is None:
            raise _Unplaceable(f"no argument-register table for {f.arch}; write tracefs registers "
                               "(%reg) or $stackN instead of argN")
        if n > len(regs):
            raise _Unplaceable(f"arg{n} is not passed in a register on {f.arch} "
                               f"(only {len(regs)}: {' '.join(regs)})")
        return regs[n - 1]

    def _syscall_arg(self, n: int, base: str, offsets: tuple[int, ...]) -> str:
        """Argument N of a pt_regs-based syscall wrapper."""
        if n > len(offsets):
            raise _Unplaceable(f"syscalls take at most {len(offsets)} arguments (arg{n} asked)")
        return f"+{offsets[n - 1]}({base})"

    def type(self, type_text: str | None, notes: list[str]) -> str | None:
        """Lower a type to what this kernel supports."""
        if type_text is None:
            return None
        base, bracket, rest = type_text.partition("[")
        feats = self.facts.features
        if base == "ustring" and "ustring" not in feats:
            notes.append(f"{self.probe}: ustring unsupported on {self.facts.kernel_release} (before 5.3): "
                         "using string, which reads user memory on those kernels")
            base = "string"
        elif base == "symstr" and "symstr" not in feats:
            # Not "before 6.2": Debian's 6.1 lists symstr (a stable backport; seen in the lab).
            notes.append(f"{self.probe}: symstr unsupported on {self.facts.kernel_release} (not in its tracefs README): "
                         "using symbol")
            base = "symbol"
        return base + bracket + rest

    def args(self, args: tuple[ArgSpec, ...], notes: list[str]) -> str:
        """The ``name=fetch:type`` list for a definition line."""
        parts = []
        for a in args:
            text = f"{a.name}={self.fetch(a.fetch, notes)}"
            t = self.type(a.type, notes)
            parts.append(f"{text}:{t}" if t else text)
        return " ".join(parts)


# --- planning --------------------------------------------------------------

def plan_host(playbook: Playbook, facts: Facts, *, run_id: str, deadline: int,
              uprobe_offsets: Mapping[tuple[str, str], int | str], duration: float | None = None,
              seal: tuple[int, int] | None = None) -> HostPlan:
    """Decide exactly what to place on one host: a pure function of (playbook, facts).

    ``uprobe_offsets`` maps (path, symbol) to the symbol's file offset in this
    host's binary, or to a reason it could not be resolved.  ``duration`` defaults to the
    playbook's (the CLI's ``--duration`` overrides it). ``seal`` (:func:`new_seal`) seals the
    dynamic probes' lines where the kernel has immediate fetch args; without it every probe
    is guarded or unframed (see :attr:`PlannedProbe.framing`).
    """
    group, instance = names_for(run_id, facts.host, deadline)
    probes: list[PlannedProbe] = []
    skipped: list[SkippedProbe] = []
    notes: list[str] = []
    failed: str | None = None
    host_block = _host_blocks_tracefs(facts)
    for spec in playbook.probes:
        probe_notes: list[str] = []
        try:
            if spec.kind != "module" and host_block:
                raise _Unplaceable(host_block)
            planned = _frame(_plan_probe(spec, facts, group, uprobe_offsets, probe_notes), facts, seal)
            twin = next((p for p in probes if p.kind != "module" and planned.kind != "module"
                         and p.trace_name == planned.trace_name), None)
            if twin is not None:
                # Lines are attributed by what they print: two probes printing alike cannot be told apart.
                raise _Unplaceable(f"its events print as {planned.trace_name!r} like those of probe "
                                   f"{twin.name!r}, so their lines could not be told apart")
            probes.append(planned)
            notes.extend(probe_notes)
        except _Unplaceable as e:
            reason = str(e)
            skipped.append(SkippedProbe(spec.name, reason))
            if spec.on_missing == "fail" and failed is None:
                failed = f"probe {spec.name!r} (on_missing: fail) cannot be placed: {reason}"
    notes.extend(_pairing_notes(probes))
    aggregates: tuple[AggPlan, ...] = ()
    if any(spec.aggregate for spec in playbook.probes):
        placed_list, aggregates, agg_skipped = plan_host_aggregates(playbook, facts, group, probes, seal=seal)
        probes = list(placed_list)
        for name, reason in agg_skipped:
            skipped.append(SkippedProbe(name, reason))
            spec = playbook.probe(name)
            if spec.on_missing == "fail" and failed is None:
                failed = f"probe {name!r} (on_missing: fail) cannot be placed: {reason}"
    if not probes and not failed:
        notes.append("no probe can be placed on this host")
    for p in probes:
        if p.kind != "module" and p.framing.startswith("unframed"):
            notes.append(f"{p.name}: {p.framing}")
    return HostPlan(host=facts.host, run_id=run_id, group=group, instance=instance,
                    probes=tuple(probes), skipped=tuple(skipped), failed=failed, notes=tuple(notes),
                    duration=playbook.duration if duration is None else duration, deadline=int(deadline),
                    aggregates=aggregates, seal=seal)


def _pairing_notes(probes: list[PlannedProbe]) -> list[str]:
    """What the report says of return probes whose latency pairing is lost or odd on this host."""
    placed = {p.name: p for p in probes}
    notes: list[str] = []
    for p in probes:
        if p.pair_with is None:
            continue
        entry = placed.get(p.pair_with)
        if entry is None:
            notes.append(f"{p.name}: no latency pairing, its entry probe {p.pair_with!r} is skipped on this host")
        elif entry.symbol != p.symbol:
            notes.append(f"{p.name}: pairs {entry.symbol} (entry) with {p.symbol} (return): different functions")
    return notes

def plan_host_aggregates(playbook: Playbook, facts: Facts, group: str, probes: list[PlannedProbe],
                         seal: tuple[int, int] | None = None) -> tuple[list[PlannedProbe], tuple[AggPlan, ...], list[tuple[str, str]]]:
    """(probes, aggregate plans, [(probe, reason) skipped]) for one host.

    ``seal``: the run's, so that an added string arg gets its string end (seal.end_strings).
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
                top=agg.top, size=agg.size, event=pp.event, group=group, args=probe_arg_types(spec),
                decls=tracepoint_decls(facts, spec), features=facts.features,
                entry_event=entry.event if entry else None, entry_kind=entry.kind if entry else None,
                entry_name=entry.name if entry else None)
        except BadField as e:
            skipped.append((spec.name, f"aggregate: {e}"))
            continue
        plans.append(ap)
        if ap.extra_args and pp.definition:
            # Before the run's seal when the definition has one: the seal must stay the last thing printed.
            head, sealed = split_seal(pp.definition)
            head, ends = f"{head} {' '.join(ap.extra_args)}", pp.string_ends
            if sealed and seal is not None:
                # An added string (the fallback's comm) gets its string end like the playbook's own.
                head, ends = end_strings(head, seal)
            pp = replace(pp, definition=f"{head}{sealed}", string_ends=ends,
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


# A string fetch arg of a definition: NAME=FETCH:string or :ustring (symbol and symstr print
# kernel symbols, no user's text).
_RAW_STRING_ARG = re.compile(r"(?:^| )([A-Za-z_][A-Za-z0-9_]*)=\S*:u?string\b")


def _frame(p: PlannedProbe, facts: Facts, seal: tuple[int, int] | None) -> PlannedProbe:
    """``p`` with its framing (issue 11 #2): sealed where its definition can end with the seal, else
    guarded by a filter where its strings are known, else unframed with the reason.

    The kernel prints ``%s`` raw: a file name ``y\\n<a whole trace line>`` would be an event of its
    own in any parser that splits at newlines. A sealed line is whole at the seal; a guarded
    event never reaches the ring buffer with a newline in a string or in the task's comm.
    """
    if p.kind == "module":
        return p
    if p.definition is not None:
        if seal is not None and "imm" in facts.features:
            definition, ends = end_strings(p.definition, seal)
            return replace(p, definition=f"{definition} {seal_args(seal)}", framing="sealed", string_ends=ends)
        strings = tuple(dict.fromkeys(_RAW_STRING_ARG.findall(p.definition)))
        why = "no immediate fetch args in its tracefs README" if seal is not None else "no seal"
        return replace(p, framing=f"guarded ({why})", guard=strings)
    if len(p.trace_name.rstrip("( ->")) < MIN_TRACE_NAME:
        # The kernel chose a name short enough for a comm to hold a fake head naming it.
        return replace(p, framing=f"unframed: its printed name {p.trace_name!r} is short enough for a "
                                  "process name to hold a whole trace head of it")
    fmt = facts.tracepoint_formats.get(p.event)
    if fmt is None or (fmt.fields and not fmt.decl_of()):
        return replace(p, framing="unframed: the host did not say which of its fields are strings "
                                  "(no format file read), so no filter can keep newlines out of them")
    return replace(p, framing="guarded", guard=tuple(
        f for f, d in fmt.decl_of().items() if _is_string_decl(d)))


def _is_string_decl(decl: str) -> bool:
    """A tracepoint field the kernel prints as text: ``__data_loc char[] f``, ``char f[16]`` (not a pointer)."""
    return "char" in decl and "*" not in decl and ("[" in decl or "__data_loc" in decl or "__rel_loc" in decl)


def _host_blocks_tracefs(facts: Facts) -> str:
    """Why no tracefs event can be used on this host at all ('' when they can)."""
    if facts.lockdown == "confidentiality":
        return "kernel lockdown is 'confidentiality', which blocks tracefs and kprobes"
    if facts.tracefs is None:
        return "no tracefs found (mount it: mount -t tracefs nodev /sys/kernel/tracing)"
    if not facts.instances:
        return "tracefs has no instances/ directory, and fleetprobe only records into its own instance"
    return ""


def _plan_probe(spec: ProbeSpec, facts: Facts, group: str,
                uprobe_offsets: Mapping[tuple[str, str], int | str], notes: list[str]) -> PlannedProbe:
    """Plan one probe or raise _Unplaceable with the reason."""
    event_name = trace_name_of(spec.name)
    event = f"{group}/{event_name}"
    if spec.kind in ("kprobe", "kretprobe"):
        _require_kprobes(facts)
        target, symbol = _choose_symbol(spec.kernel_targets(), facts, spec.name, notes)
        low = _Lowering(spec.name, facts, user=False, entry=target.offset == 0, symbol=symbol)
        place = (f"{target.module}:" if target.module else "") + symbol
        if target.offset:
            place += f"+{target.offset:#x}"
        head = "r" if spec.kind == "kretprobe" else "p"
        return _planned(spec, kind=spec.kind, event=event, trace_name=event_name,
                        definition=_join(f"{head}:{event} {place}", low.args(spec.args, notes)),
                        events_file="kprobe_events", symbol=symbol,
                        fields=tuple(a.name for a in spec.args))
    if spec.kind == "raw":
        _require_kprobes(facts)
        assert spec.raw_line is not None
        raw_symbol: str | None = None
        if spec.targets:
            target, raw_symbol = _choose_symbol(spec.kernel_targets(), facts, spec.name, notes)
            if raw_symbol != target.symbol:
                raise _Unplaceable(f"{target.symbol} exists only as clone {raw_symbol}; a raw line is used "
                                   "verbatim, so name the clone yourself")
        head, _, rest = spec.raw_line.partition(" ")
        return _planned(spec, kind="raw", event=event, trace_name=event_name,
                        definition=f"{head}:{event} {rest}", events_file="kprobe_events",
                        symbol=raw_symbol, fields=spec.raw_fields)
    if spec.kind in ("uprobe", "uretprobe"):
        if not facts.uprobe_events:
            raise _Unplaceable("no uprobe_events in tracefs (kernel without CONFIG_UPROBE_EVENTS)")
        utarget, offset = _choose_user_target(spec.user_targets(), facts, uprobe_offsets)
        low = _Lowering(spec.name, facts, user=True, entry=True, symbol=utarget.symbol)
        head = "r" if spec.kind == "uretprobe" else "p"
        return _planned(spec, kind=spec.kind, event=event, trace_name=event_name,
                        definition=_join(f"{head}:{event} {utarget.path}:{offset:#x}",
                                         low.args(spec.args, notes)),
                        events_file="uprobe_events", symbol=utarget.symbol,
                        fields=tuple(a.name for a in spec.args), path=utarget.path, offset=offset)
    if spec.kind == "tracepoint":
        tp = str(spec.targets[0])
        exists = facts.tracepoints.get(tp)
        if exists is None:
            raise _Unplaceable(f"tracepoint {tp} was not checked on this host (facts lack it)")
        if not exists:
            raise _Unplaceable(f"tracepoint {tp} does not exist on this kernel ({facts.kernel_release})")
        if (blind := n64_blind(facts, tp)) is not None:
            raise _Unplaceable(blind)
        fmt = facts.tracepoint_formats.get(tp)
        if fmt is None and facts.tracepoint_formats:
            notes.append(f"{spec.name}: the host did not say what {tp} prints (no format file read); "
                         "its lines are attributed by the event's name")
        return _planned(spec, kind="tracepoint", event=tp, trace_name=printed_key(tp, fmt))
    return _plan_module(spec, facts, notes)


def _plan_module(spec: ProbeSpec, facts: Facts, notes: list[str]) -> PlannedProbe:
    """Plan a kernel-module probe: resolve its symbol parameters; the build and load happen later."""
    if facts.modules_disabled:
        raise _Unplaceable("module loading is disabled (/proc/sys/kernel/modules_disabled = 1)")
    if facts.lockdown in ("integrity", "confidentiality"):
        raise _Unplaceable(f"kernel lockdown is '{facts.lockdown}': only signed modules load")
    if not facts.kprobes_enabled:
        raise _Unplaceable("kprobes are globally disabled (debugfs kprobes/enabled = 0)")
    # A module may hold kprobes of its own: the same kernel bug applies.
    _refuse_known_kprobe_oops(facts)
    params: list[tuple[str, str]] = []
    symbol: str | None = None
    for param in spec.params:
        if param.is_symbol:
            targets = tuple(KernelTarget(s) for s in param.alternatives)
            _, chosen = _choose_symbol(targets, facts, spec.name, notes)
            params.append((param.name, chosen))
            if symbol is None or param.name == "symbol":
                symbol = chosen
        else:
            assert param.value is not None
            params.append((param.name, param.value))
    return _planned(spec, kind="module", event="", trace_name=spec.name, symbol=symbol,
                    module=spec.module_path or spec.module, params=tuple(params))


def _planned(spec: ProbeSpec, **fields: Any) -> PlannedProbe:
    """A PlannedProbe carrying the fields every kind copies from the playbook."""
    return PlannedProbe(name=spec.name, filter=spec.filter, pair_with=spec.pair_with, expect=spec.expect,
                        **fields)


def _require_kprobes(facts: Facts) -> None:
    """Raise _Unplaceable when this host cannot take kprobe events."""
    if not facts.kprobe_events:
        raise _Unplaceable("no kprobe_events in tracefs (kernel without CONFIG_KPROBE_EVENTS)")
    if not facts.kprobes_enabled:
        raise _Unplaceable("kprobes are globally disabled (debugfs kprobes/enabled = 0)")
    _refuse_known_kprobe_oops(facts)


def mips_kprobe_oops(facts: Facts) -> str:
    """Why a kprobe would knowingly oops this host ('' when no known cause applies).

    MIPS takes the kprobe break with interrupts enabled (handle_bp), so a timer
    tick between a probe hit and its single-step break can run RCU callbacks in
    softirq; delayed_put_task_struct -> kprobe_flush_task then sets the CPU's
    current kprobe to NULL, and the single-step break oopses the task ("Break
    instruction in kernel code" in the kprobe slot).  Measured on Debian 6.1 and
    6.12 malta kernels: about one oops per 100-300 hits on a host where
    processes exit, on every qemu CPU model tried; none in 6000 hits with RCU
    callbacks offloaded to rcuo kthreads on every CPU (rcu_nocbs=, which needs
    CONFIG_RCU_NOCB_CPU: Debian's 5kc-malta has it, 4kc-malta does not).
    README, "Known kernel problem (MIPS)".
    """
    if facts.kernel_arch != "mips" or not facts.kprobe_flush_task:
        return ""
    missing = sorted(set(range(facts.ncpus)) - facts.rcu_offloaded_cpus)
    if not missing:
        return ""
    cpus = f"0-{facts.ncpus - 1}" if facts.ncpus > 1 else "0"
    shown = ",".join(str(c) for c in missing[:8]) + (" ..." if len(missing) > 8 else "")
    return (f"kprobes oops this MIPS kernel ({facts.kernel_release}): kprobe_flush_task can clear the "
            f"CPU's current kprobe from an RCU callback mid-probe, and RCU callbacks of CPU {shown} are "
            f"not offloaded to kthreads; a kernel with CONFIG_RCU_NOCB_CPU booted with rcu_nocbs={cpus} "
            "can be probed (README: Known kernel problem (MIPS))")


def _refuse_known_kprobe_oops(facts: Facts) -> None:
    """Raise _Unplaceable on a host where a kprobe (event or module) is known to oops the kernel."""
    reason = mips_kprobe_oops(facts)
    if reason:
        raise _Unplaceable(reason)


def _choose_symbol(targets: tuple[KernelTarget, ...], facts: Facts, probe: str,
                   notes: list[str]) -> tuple[KernelTarget, str]:
    """The first probeable alternative, as (target, symbol to write); a GCC clone if that is all there is."""
    why: list[str] = []
    clone_choice: tuple[KernelTarget, str] | None = None
    for t in targets:
        sf: SymbolFacts | None = facts.symbols.get(t.symbol)
        if sf is None:
            why.append(f"{t.symbol} was not checked on this host (facts lack it)")
            continue
        if sf.probeable:
            return t, t.symbol
        if sf.clones and not sf.blacklisted and clone_choice is None:
            clone_choice = (t, sf.clones[0])
        why.append(sf.why_not)
    if clone_choice is not None:
        t, clone = clone_choice
        notes.append(f"{probe}: {t.symbol} exists only as GCC clone {clone}; probing the clone, whose "
                     "argument layout may differ from the source (ISRA/constprop)")
        return clone_choice
    names = ", ".join(t.symbol for t in targets)
    raise _Unplaceable(f"none of {names} is probeable: " + "; ".join(why))


def _choose_user_target(targets: tuple[UserTarget, ...], facts: Facts,
                        offsets: Mapping[tuple[str, str], int | str]) -> tuple[UserTarget, int]:
    """The first uprobe alternative whose binary exists and whose symbol has a file offset."""
    why: list[str] = []
    for t in targets:
        ff = facts.files.get(t.path)
        if ff is None:
            why.append(f"{t.path} was not checked on this host (facts lack it)")
            continue
        if not ff.exists:
            why.append(f"{t.path} does not exist")
            continue
        if t.symbol is None:
            return t, t.offset
        resolved = offsets.get((t.path, t.symbol))
        if resolved is None:
            why.append(f"no file offset was resolved for {t.path}:{t.symbol}")
        elif isinstance(resolved, str):
            why.append(f"{t.path}:{t.symbol}: {resolved}")
        else:
            return t, resolved + t.offset
    raise _Unplaceable("no uprobe target usable: " + "; ".join(why))


def _join(head: str, args: str) -> str:
    """A definition line: head plus args when there are any."""
    return f"{head} {args}" if args else head
