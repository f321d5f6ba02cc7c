"""Markdown: a run's summary (and audit verdict) to paste into a ticket.

GitHub-flavoured Markdown tables; every value from a host or the kernel is
escaped so a comm or file name cannot break the table or inject markup.
"""

from __future__ import annotations

import os
import time

from fleetprobe import caveats
from fleetprobe.render import aggregates
from fleetprobe.audit import AuditResult
from fleetprobe.aggtables import AggResults, bucket_label
from fleetprobe.results import FleetReport
from fleetprobe.render.safe import visible
from fleetprobe.render.terminal import format_ns, value_text
from fleetprobe.outfiles import write_text_atomic

#: Hosts listed per table before "N more".
ROWS = 25
#: Top values per (probe, field).
TOP = 10


def escape(text: object) -> str:
    """Text safe inside a Markdown table cell: pipes, backticks, markup characters and newlines escaped.

    Newlines become blanks (a cell is one line); every other non-printable character is shown as an
    escape (render.safe.visible), as on the terminal: ``--markdown -`` must not drive a terminal with a
    comm's ESC sequence, and a bidi override must not reorder the ticket it is pasted into.
    """
    s = visible(str(text).replace("\r", " ").replace("\n", " ")).replace("\\", "\\\\")
    for ch in "|`*_[]<>#":
        s = s.replace(ch, "\\" + ch)
    return s


def _utc(t: float) -> str:
    """Epoch seconds as ``2026-01-02 03:04:05Z``."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if t else "-"


def render_markdown(report: FleetReport, audit: AuditResult | None = None) -> str:
    """The whole summary as Markdown: verdict, hosts, hits, top values, latency, clocks."""
    run, agg = report.run, report.aggregate
    agg.finish()
    out: list[str] = [f"## fleetprobe run `{escape(run.run_id)}`: {escape(run.playbook)}", ""]
    out.append(f"{len(report.hosts)} host(s), {_utc(run.started)} for {run.duration:.1f}s"
               + (f", playbook sha256 `{run.playbook_sha256[:12]}`" if run.playbook_sha256 else "")
               + (f", shards: {', '.join(escape(s) for s in run.shards)}" if run.shards else ""))
    out.append("")
    if audit is not None:
        verdict = "PASSED" if audit.passed else "FAILED"
        base = f" against baseline `{escape(audit.baseline)}`" if audit.baseline else " (no baseline run)"
        out += [f"### Audit {verdict}{base}", ""]
        if audit.failed_hosts():
            out += ["Hosts that failed the audit: " + ", ".join(f"**{escape(h)}**" for h in audit.failed_hosts()), ""]
        for f in audit.findings:
            mark = "FAIL" if f in audit.failures else "note"
            out.append(f"- **{mark}** `{f.kind}`: {escape(f.message)}")
        if audit.findings:
            out.append("")

    out += ["### Hosts", "", "| host | status | stage | events | clock offset | reason |", "|---|---|---|--:|--:|---|"]
    for o in report.hosts[:ROWS]:
        clock = (f"{o.clock_offset * 1e3:+.1f} ms ± {(o.clock_error or 0) * 1e3:.1f}"
                 if o.clock_offset is not None else "-")
        out.append(f"| {escape(o.host)} | {escape(o.status)} | {escape(o.stage)} | {o.events} | {clock} | "
                   f"{escape(o.reason) or '-'} |")
    if len(report.hosts) > ROWS:
        out.append(f"\n... and {len(report.hosts) - ROWS} more hosts (see the JSON or HTML report)")
    out.append("")

    notes = caveats.fleet_caveats(report.hosts)
    summary = caveats.own_filter_summary(report.hosts)
    if notes or summary:
        out += [f"- **WARNING** {escape(h)}: {escape(t)}" for h, t in notes[:ROWS]]
        out += [f"- {escape(summary)}"] if summary else []
        out.append("")
    probes = agg.probes()
    if probes:
        out += ["### Hits per probe", "", "| probe | total | hosts hit | top hosts | skipped |", "|---|--:|--:|---|---|"]
        for p in probes:
            ranked = sorted(agg.hits(p).items(), key=lambda hn: (-hn[1], hn[0]))
            top = ", ".join(f"{escape(h)} {n}" for h, n in ranked[:5]) + (f", {len(ranked) - 5} more"
                                                                         if len(ranked) > 5 else "")
            skipped = caveats.skipped_on(report.hosts, p)
            why = "; ".join(f"{escape(h)}: {escape(r)}" for h, r in skipped[:5]) + (
                f"; {len(skipped) - 5} more" if len(skipped) > 5 else "")
            total = str(agg.total_hits(p)) if len(skipped) < len(report.hosts) or agg.total_hits(p) else caveats.SKIPPED
            out.append(f"| {escape(p)} | {total} | {len(ranked)}/{len(report.hosts)} | {top or '-'} | {why or '-'} |")
        out.append("")
    for p, name, table, top_values in agg.top_tables(probes, TOP):
        approx = "" if table.exact else f" (approximate, counts may be low by up to {table.error})"
        out += [f"#### {escape(p)}: top {escape(name)}{approx}", "", f"| {escape(name)} | count | hosts |",
                "|---|--:|--:|"]
        out += [f"| {escape(value_text(v))} | {c} | {h} |" for v, c, h in top_values]
        out.append("")
    for ret, entry in sorted(agg.pairs.items()):
        lat = agg.latency(ret)
        p50, p99 = lat.quantile(0.5), lat.quantile(0.99)
        if p50 is None or p99 is None:
            continue
        out.append(f"- latency {escape(entry)} -> {escape(ret)}: {lat.count} calls, p50 <= {format_ns(p50)}, "
                   f"p99 <= {format_ns(p99)}")
    if agg.aggregates:
        out += _aggregates(agg.aggregates)
    lossy = [o for o in report.hosts if o.loss.total]
    if lossy:
        out.append("")
        out.append("Events lost on: " + ", ".join(f"{escape(o.host)} ({o.loss.total})" for o in lossy[:ROWS]))
    return "\n".join(out).rstrip() + "\n"


def _aggregates(results: AggResults) -> list[str]:
    """Every ``aggregate:`` table as the terminal shows it (render.aggregates), each key escaped (a user chose it)."""
    out = ["", "### Aggregates", ""]
    for s in aggregates.summaries(results):
        t = s.table
        out += [f"#### {escape(s.heading)}", ""]
        out += [f"- {escape(m)}" for m in s.modes + s.notes]
        out.append("")
        if t.kind == "count":
            rows, more = aggregates.count_rows(t)
            if rows:
                out += [f"| {escape(t.field)} | count | hosts |", "|---|--:|--:|"]
                out += [f"| {escape(v)} | {c} | {h} |" for v, c, h in rows]
            else:
                out.append("nothing counted")
        else:
            groups, more = aggregates.histogram_groups(t)
            unit = aggregates.bucket_unit(t)
            peak = max((c for _, _, b in groups for c in b.values()), default=1)
            if groups:
                head = escape(", ".join(t.by)) if t.by else ""
                out += [f"| {head + ' | ' if t.by else ''}{escape(t.field)} | count | |",
                        f"|{'---|' if t.by else ''}--:|--:|---|"]
            else:
                out.append("nothing counted")
            for label, total, buckets in groups:
                for i, (b, c) in enumerate(aggregates.bucket_rows(buckets)):
                    # The group's label (a user's comm) on its first row only, escaped like every cell.
                    first = (f"{escape(label)} ({total}) | " if i == 0 else " | ") if t.by else ""
                    bar = "█" * max(1 if c else 0, round(20 * c / peak))
                    out.append(f"| {first}{escape(bucket_label(b) + unit)} | {c} | {bar} |")
        if more:
            out.append(f"\n... and {more} more (see the JSON report)")
        out.append("")
    return out


def write_markdown(report: FleetReport, path: str | os.PathLike[str], audit: AuditResult | None = None) -> None:
    """Write :func:`render_markdown` to ``path`` atomically, mode 0600 (``-``: stdout)."""
    write_text_atomic(path, render_markdown(report, audit))
