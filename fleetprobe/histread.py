"""Reading a host's hist tables back: the kernel's ``hist`` files into :class:`~fleetprobe.aggtables.AggTable`.

:func:`parse_hist` is a function of the text the kernel printed (hostile input: comm
and paths are chosen by any user on the host); :func:`host_tables` puts every table of
one host together, kernel-counted or streamed, failed ones with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field

from fleetprobe.aggstream import StreamTables
from fleetprobe.aggtables import AggResults, AggTable, HostTable, Key, Value
from fleetprobe.histplan import AggPlan, KeySpec
from fleetprobe.plan import HostPlan
from fleetprobe.runner.runner import RunnerReport

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

