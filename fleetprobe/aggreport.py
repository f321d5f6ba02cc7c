"""Render ``aggregate:`` tables (fleetprobe.hist.AggResults) for people: counts, histograms, latencies.

The same shape whichever way each host computed a table (in its kernel, or on the
controller from its stream): the header says which hosts did which, and why.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fleetprobe.render.safe import add_row, plain

from fleetprobe.hist import UNKNOWN_COMM, AggResults, AggTable, bucket_label, unknown_comm_hits

BAR_WIDTH = 40
ROWS = 20


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
        what = {"kernel": "in kernel", "stream": "streamed", "failed": "FAILED"}.get(mode, mode)
        lines.append(f"{what} on {_host_list(hosts)}" + (f": {reason}" if reason else ""))
    return lines


def value_text(v: int | str) -> str:
    return repr(v) if isinstance(v, str) and (v == "" or v != v.strip()) else str(v)


def bucket_lines(buckets: dict[int, int], unit: str = "") -> list[str]:
    """A log2 histogram as text bars, from the first to the last non-empty bucket."""
    if not buckets:
        return []
    peak = max(buckets.values())
    lo, hi = min(buckets), max(buckets)
    out = []
    for b in range(lo, hi + 1):
        c = buckets.get(b, 0)
        bar = "#" * max(1 if c else 0, round(BAR_WIDTH * c / peak))
        out.append(f"{bucket_label(b) + unit:>24} {c:>9} |{bar}")
    return out


def render_aggregates(results: AggResults, console: Console) -> None:
    """Every aggregate table of the run, fleet-wide, with each host's mode."""
    for tid, t in sorted(results.tables.items()):
        _render_table(results, tid, t, console)


def _render_table(results: AggResults, tid: str, t: AggTable, console: Console) -> None:
    hits = results.host_hits(tid)
    dropped = sum(parts[tid].dropped for parts in results.hosts.values() if tid in parts)
    what = {"count": f"count by {t.field}", "histogram": f"histogram of {t.field}",
            "latency": f"latency (ns, entry -> {t.probe})"}[t.kind]
    if t.by:
        what += f" per {', '.join(t.by)}"
    head = f"{t.probe}: {what}: {t.total} counted on {len(hits)} host(s)"
    if dropped:
        head += f", {dropped} the kernel could not count (table full)"
    if t.error:
        head += f" (approximate: counts may be low by up to {t.error})"
    console.print(plain(head, style="bold"))
    for line in mode_lines(results, tid):
        console.print(plain(f"  {line}"))
    unknown = unknown_comm_hits(t)
    if unknown:
        console.print(plain(f"  comm {UNKNOWN_COMM}: {unknown} hit(s) whose task name the kernel had forgotten when "
                            "the line was read (its pid->comm cache); a kernel-side table, or a kprobe or uprobe "
                            "($comm), names the task at the event"))
    if t.kind == "count":
        table = Table(show_edge=False, box=None, pad_edge=False)
        table.add_column(t.field, overflow="fold")
        table.add_column("count", justify="right")
        table.add_column("hosts", justify="right")
        rows = t.rows()
        for key, c, h in rows[:t.top]:
            add_row(table, value_text(key[0]), str(c), str(h))
        console.print(table)
        if len(rows) > t.top:
            console.print(plain(f"  ... and {len(rows) - t.top} more values (see the JSON report)"))
        return
    unit = "ns" if t.kind == "latency" else ""
    hists = t.histograms()
    for i, (by, buckets) in enumerate(hists.items()):
        if i >= t.top:
            console.print(plain(f"  ... and {len(hists) - t.top} more (see the JSON report)"))
            break
        if t.by:
            label = ", ".join(f"{f}={value_text(v)}" for f, v in zip(t.by, by))
            console.print(plain(f"  {label}: {sum(buckets.values())}"))
        for line in bucket_lines(buckets, unit):
            console.print(plain(f"  {line}"))
