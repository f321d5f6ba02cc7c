"""Render ``aggregate:`` tables (fleetprobe.aggtables.AggResults) for people: counts, histograms, latencies.

The same shape whichever way each host computed a table (in its kernel, or on the
controller from its stream): the header says which hosts did which, and why.

What is said about a table (its heading, each host's mode, its notes, the rows shown)
is made here once, as text (:func:`summaries`, :func:`count_rows`, :func:`histogram_groups`);
the terminal (:func:`render_aggregates`), HTML and Markdown only lay it out, each escaping
it for its own format: keys are comm and path values any user on a host chose.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from fleetprobe.aggtables import UNKNOWN_COMM, AggResults, AggTable, bucket_label, unknown_comm_hits
from fleetprobe.render.safe import add_row, plain

BAR_WIDTH = 40
ROWS = 20
_MODE_WORDS = {"kernel": "in kernel", "stream": "streamed", "failed": "FAILED"}


def _host_list(hosts: list[str], limit: int = 5) -> str:
    if len(hosts) <= limit:
        return ", ".join(hosts)
    return f"{', '.join(hosts[:limit])} and {len(hosts) - limit} more"


def mode_lines(results: AggResults, tid: str) -> list[str]:
    """Which hosts computed a table in the kernel, which from the stream (and why), which failed."""
    lines = []
    reasons: dict[tuple[str, str], list[str]] = {}
    for h, parts in sorted(results.hosts.items()):
        part = parts.get(tid)
        if part is not None:
            reasons.setdefault((part.mode, part.reason), []).append(h)
    for (mode, reason), hosts in sorted(reasons.items()):
        lines.append(f"{_MODE_WORDS.get(mode, mode)} on {_host_list(hosts)}" + (f": {reason}" if reason else ""))
    return lines


def value_text(v: int | str) -> str:
    return repr(v) if isinstance(v, str) and (v == "" or v != v.strip()) else str(v)


def unknown_comm_note(t: AggTable) -> str:
    """What the ``<...>`` rows of a table mean ('' when it has none)."""
    unknown = unknown_comm_hits(t)
    if not unknown:
        return ""
    return (f"comm {UNKNOWN_COMM}: {unknown} hit(s) whose task name the kernel had forgotten when the line was "
            "read (its pid->comm cache); a kernel-side table, or a kprobe or uprobe ($comm), names the task at "
            "the event")


def heading(results: AggResults, tid: str, t: AggTable) -> str:
    """``opens: count by comm: 123 counted on 2 host(s)``, with what was not counted and the error bound."""
    parts = [p[tid] for p in results.hosts.values() if tid in p]
    # A host whose table failed counted nothing: it is named in the mode lines, not counted here.
    counted = sum(1 for p in parts if p.mode != "failed")
    # A kernel part's dropped events found its table full; a stream part's were cut by the event cap.
    full = sum(p.dropped for p in parts if p.mode == "kernel")
    capped = sum(p.dropped for p in parts if p.mode == "stream")
    what = {"count": f"count by {t.field}", "histogram": f"histogram of {t.field}",
            "latency": f"latency (ns, entry -> {t.probe})"}.get(t.kind, f"{t.kind} of {t.field}")
    if t.by:
        what += f" per {', '.join(t.by)}"
    head = f"{t.probe}: {what}: {t.total} counted on {counted} host(s)"
    if full:
        head += f", {full} the kernel could not count (table full)"
    if capped:
        head += f", {capped} not counted (the event cap stopped the stream)"
    if t.error:
        head += f" (approximate: counts may be low by up to {t.error})"
    return head


@dataclass(frozen=True)
class TableSummary:
    """Everything said about one aggregate table, as plain text (each renderer escapes it)."""

    tid: str
    table: AggTable
    heading: str
    modes: tuple[str, ...]
    notes: tuple[str, ...]


def summaries(results: AggResults) -> list[TableSummary]:
    """One :class:`TableSummary` per table, in table id order."""
    out = []
    for tid, t in sorted(results.tables.items()):
        note = unknown_comm_note(t)
        out.append(TableSummary(tid, t, heading(results, tid, t), tuple(mode_lines(results, tid)),
                                (note,) if note else ()))
    return out


def count_rows(t: AggTable) -> tuple[list[tuple[str, int, int]], int]:
    """A count table's shown rows as (value text, count, hosts), most frequent first, and how many more."""
    rows = t.rows()
    return [(value_text(k[0]), c, h) for k, c, h in rows[:t.top]], max(0, len(rows) - t.top)


def histogram_groups(t: AggTable) -> tuple[list[tuple[str, int, dict[int, int]]], int]:
    """A histogram's or latency's groups as (``comm=bash`` label or '', total, {bucket: count}), and how many more."""
    hists = t.histograms()
    shown = []
    for by, buckets in list(hists.items())[:t.top]:
        label = ", ".join(f"{f}={value_text(v)}" for f, v in zip(t.by, by))
        shown.append((label, sum(buckets.values()), buckets))
    return shown, max(0, len(hists) - t.top)


def bucket_unit(t: AggTable) -> str:
    return "ns" if t.kind == "latency" else ""


def bucket_rows(buckets: dict[int, int]) -> list[tuple[int, int]]:
    """(bucket, count) from the first to the last non-empty bucket, empty ones between included."""
    if not buckets:
        return []
    return [(b, buckets.get(b, 0)) for b in range(min(buckets), max(buckets) + 1)]


def bucket_lines(buckets: dict[int, int], unit: str = "") -> list[str]:
    """A log2 histogram as text bars, from the first to the last non-empty bucket."""
    if not buckets:
        return []
    peak = max(buckets.values())
    out = []
    for b, c in bucket_rows(buckets):
        bar = "#" * max(1 if c else 0, round(BAR_WIDTH * c / peak))
        out.append(f"{bucket_label(b) + unit:>24} {c:>9} |{bar}")
    return out


def render_aggregates(results: AggResults, console: Console) -> None:
    """Every aggregate table of the run, fleet-wide, with each host's mode."""
    for s in summaries(results):
        _render_table(s, console)


def _render_table(s: TableSummary, console: Console) -> None:
    t = s.table
    console.print(plain(s.heading, style="bold"))
    for line in s.modes + s.notes:
        console.print(plain(f"  {line}"))
    if t.kind == "count":
        table = Table(show_edge=False, box=None, pad_edge=False)
        table.add_column(t.field, overflow="fold")
        table.add_column("count", justify="right")
        table.add_column("hosts", justify="right")
        rows, more = count_rows(t)
        for value, c, h in rows:
            add_row(table, value, str(c), str(h))
        console.print(table)
        if more:
            console.print(plain(f"  ... and {more} more values (see the JSON report)"))
        return
    groups, more = histogram_groups(t)
    for label, total, buckets in groups:
        if label:
            console.print(plain(f"  {label}: {total}"))
        for line in bucket_lines(buckets, bucket_unit(t)):
            console.print(plain(f"  {line}"))
    if more:
        console.print(plain(f"  ... and {more} more (see the JSON report)"))
