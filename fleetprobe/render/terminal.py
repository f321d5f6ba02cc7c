"""Terminal: render a FleetReport for people (rich).

Nothing here decides anything: it only shows what merge computed.  Big fleets
are summarised (top hosts + "N more") so a 2000-host report stays readable.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleetprobe import caveats
from fleetprobe.render.aggregates import render_aggregates
from fleetprobe.render.safe import add_row, plain, visible

from fleetprobe.results import FleetReport
from fleetprobe.sketches import Latency, bucket_range_ns

#: Up to this many hosts the hits table is a full probe x host matrix.
MATRIX_HOSTS = 12
#: Rows shown per long list before "N more".
LIST_ROWS = 15
#: Values shown per field in the terminal (the JSON report keeps top_k).
VALUE_ROWS = 5
BAR_WIDTH = 40

_STATUS_STYLE = {"ok": "green", "failed": "red", "unreachable": "red", "skipped": "yellow",
                 "interrupted": "yellow"}


def format_ns(ns: int) -> str:
    """A duration in ns as a short human string (512ns, 4us, 1.0ms, 2.1s)."""
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns // 1_000}us" if ns % 1_000 == 0 or ns >= 10_000 else f"{ns / 1_000:.1f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.1f}ms"
    return f"{ns / 1e9:.1f}s"


def value_text(value: int | str) -> str:
    """How a field value reads in a table: ints in decimal and, when large, hex too."""
    if isinstance(value, int):
        # Flags and addresses read better in hex; pids and sizes below 64 Ki do not.
        return f"{value} ({value:#x})" if abs(value) >= 0x10000 else str(value)
    return repr(value) if value == "" or value != value.strip() else value


# html.py and markdown.py import the old private name.
_value_text = value_text


def render_summary(report: FleetReport, console: Console) -> None:
    """Print the whole summary: hosts, hits, top values, latency, quiet hosts, loss, clocks."""
    run = report.run
    agg = report.aggregate
    agg.finish()
    console.print(plain(f"fleetprobe run {run.run_id}: {run.playbook} on {len(report.hosts)} host(s), "
                       f"{run.duration:.1f}s", style="bold"))
    _render_status(report, console)
    _render_alerts(report, console)
    _render_hits(report, console)
    _render_values(report, console)
    _render_latency(report, console)
    if agg.aggregates:
        render_aggregates(agg.aggregates, console)
    _render_quiet(report, console)
    _render_loss(report, console)
    _render_caveats(report, console)
    _render_clocks(report, console)


def _render_caveats(report: FleetReport, console: Console) -> None:
    """Lines no probe could claim, and fleetprobe's own events left out (caveats.py): never a silent zero."""
    for host, text in caveats.fleet_caveats(report.hosts)[:LIST_ROWS * 2]:
        # The text quotes a line the host printed: chosen by any user there, shown as text.
        console.print(Text.assemble(("WARNING ", "bold yellow"), (visible(f"{host}: "), "bold"), visible(text)))
    summary = caveats.own_filter_summary(report.hosts)
    if summary:
        console.print(plain(summary))


def _render_alerts(report: FleetReport, console: Console) -> None:
    """What an operator must hear about even on hosts that ended ok (an oops during the run ...)."""
    for o in report.hosts:
        for alert in o.alerts:
            console.print(Text.assemble(("ALERT ", "bold red"), (visible(f"{o.host}: "), "bold"), visible(alert)))


def _render_status(report: FleetReport, console: Console) -> None:
    """Counts per status, then the hosts that did not end ok (stage and reason)."""
    counts: dict[str, int] = {}
    for o in report.hosts:
        counts[o.status] = counts.get(o.status, 0) + 1
    line = plain("hosts: ")
    for i, (status, n) in enumerate(sorted(counts.items())):
        if i:
            line.append(", ")
        line.append(f"{n} {status}", style=_STATUS_STYLE.get(status, ""))
    console.print(line)
    bad = [o for o in report.hosts if o.status != "ok"]
    if not bad:
        return
    table = Table(title="hosts that did not finish", title_justify="left")
    for col in ("host", "status", "stage", "reason", "cleanup"):
        table.add_column(col, overflow="fold")
    for o in bad[:LIST_ROWS]:
        add_row(table, o.host, plain(o.status, style=_STATUS_STYLE.get(o.status, "")), o.stage,
                      o.reason or "-", o.cleanup)
    console.print(table)
    if len(bad) > LIST_ROWS:
        console.print(plain(f"... and {len(bad) - LIST_ROWS} more hosts that did not finish (see the JSON report)"))


def _render_hits(report: FleetReport, console: Console) -> None:
    """Hits per probe per host: a matrix for small fleets, totals and top hosts for big ones."""
    agg = report.aggregate
    probes = agg.probes()
    if not probes:
        console.print(plain("no probes were placed or hit"))
        return
    # Hosts that failed before probing are listed above; zero columns for them say nothing.
    hosts = [o.host for o in report.hosts
             if o.status == "ok" or (agg.hosts.get(o.host) and agg.hosts[o.host].events)] or sorted(agg.hosts)
    if len(hosts) <= MATRIX_HOSTS:
        table = Table(title="hits per probe and host", title_justify="left")
        table.add_column("probe")
        for h in hosts:
            table.add_column(plain(h), justify="right")
        table.add_column("total", justify="right")
        table.add_column("misses", justify="right")
        outcomes = {o.host: o for o in report.hosts}
        for p in probes:
            per = agg.hits(p)
            add_row(table, p, *[caveats.hit_text(outcomes.get(h), p, per.get(h, 0)) for h in hosts],
                    str(agg.total_hits(p)), str(agg.probe_misses(p)))
        console.print(table)
        return
    table = Table(title="hits per probe", title_justify="left")
    for col in ("probe", "total", "misses", "hosts hit", "top hosts"):
        table.add_column(col, justify="left" if col in ("probe", "top hosts") else "right", overflow="fold")
    for p in probes:
        ranked = sorted(agg.hits(p).items(), key=lambda hn: (-hn[1], hn[0]))
        top = ", ".join(f"{h} {n}" for h, n in ranked[:3])
        if len(ranked) > 3:
            top += f", {len(ranked) - 3} more"
        if skipped := caveats.skipped_on(report.hosts, p):
            top += f"{'; ' if top else ''}{caveats.SKIPPED} on {len(skipped)} host(s)"
        add_row(table, p, str(agg.total_hits(p)), str(agg.probe_misses(p)), f"{len(ranked)}/{len(hosts)}",
                      top or "-")
    console.print(table)


def _render_values(report: FleetReport, console: Console) -> None:
    """Top values per probe, one table per probe and a section per field: which comm, which filename."""
    agg = report.aggregate
    for p in agg.probes():
        table = Table(title=plain(f"{p}: top values"), title_justify="left")
        for col, right in (("field", False), ("value", False), ("count", True), ("hosts", True),
                           ("share", True)):
            table.add_column(col, justify="right" if right else "left", overflow="fold")
        notes: list[str] = []
        for name in agg.fields(p):
            values = agg.values[(p, name)]
            top = values.top(min(agg.top_k, VALUE_ROWS))
            if not top:
                continue
            if values.exact and top[0][1] == 1 and len(values.counts) > 1:
                # Every value seen once (pids, pointers): a table of them says nothing.
                notes.append(f"{name}: {len(values.counts)} distinct values, none repeated")
                continue
            if values.total and top[0][1] < 0.05 * values.total and len(values.counts) > 2 * VALUE_ROWS:
                # Many values and none stands out (pids repeated across hosts ...): nothing to read.
                notes.append(f"{name}: {len(values.counts)}{'' if values.exact else '+'} distinct values, "
                             "none above 5%")
                continue
            for i, (value, count, nhosts) in enumerate(top):
                share = f"{100 * count / values.total:.1f}%" if values.total else "-"
                last = i == len(top) - 1
                add_row(table, name if i == 0 else "", value_text(value), str(count), str(nhosts), share,
                              end_section=last)
            more = len(values.counts) - len(top)
            extra = []
            if more > 0:
                extra.append(f"{more} more values")
            if not values.exact:
                extra.append(f"approximate: counts may be low by up to {values.error}")
            if extra:
                notes.append(f"{name}: " + "; ".join(extra))
        if table.row_count:
            if notes:
                table.caption = "\n".join(notes)
                table.caption_justify = "left"
            console.print(table)
        elif notes:
            console.print(plain(f"{p}: " + "; ".join(notes)))


def latency_lines(lat: Latency) -> list[str]:
    """A log2 histogram as text bars, one line per bucket from the first to the last non-empty one."""
    used = [b for b, c in enumerate(lat.buckets) if c]
    if not used:
        return []
    peak = max(lat.buckets)
    lines = []
    for b in range(used[0], used[-1] + 1):
        lo, hi = bucket_range_ns(b)
        c = lat.buckets[b]
        bar = "#" * max(1 if c else 0, round(BAR_WIDTH * c / peak))
        lines.append(f"{format_ns(lo):>7} - {format_ns(hi):<7} {c:>9} |{bar}")
    return lines


def _render_latency(report: FleetReport, console: Console) -> None:
    """Entry->return latency histograms of paired probes, fleet-wide."""
    agg = report.aggregate
    for ret, entry in sorted(agg.pairs.items()):
        lat = agg.latency(ret)
        if not lat.count and not lat.unmatched:
            continue
        p50, p99 = lat.quantile(0.5), lat.quantile(0.99)
        head = f"latency {entry} -> {ret}: {lat.count} calls"
        if p50 is not None and p99 is not None:
            head += f", p50 <= {format_ns(p50)}, p99 <= {format_ns(p99)}"
        notes = lat.caveats()
        console.print(plain(head + (f" ({'; '.join(notes)})" if notes else ""), style="bold"))
        for line in latency_lines(lat):
            console.print(plain(line))


def _render_quiet(report: FleetReport, console: Console) -> None:
    """Hosts that contributed no events, probes skipped per host, and placed probes that never fired."""
    agg = report.aggregate
    quiet = agg.quiet_hosts()
    if quiet:
        console.print(plain(f"{len(quiet)} host(s) contributed no events:", style="bold"))
        for h, why in list(quiet.items())[:LIST_ROWS]:
            console.print(plain(f"  {h}: {why}"))
        if len(quiet) > LIST_ROWS:
            console.print(plain(f"  ... and {len(quiet) - LIST_ROWS} more"))
    skipped: dict[tuple[str, str], list[str]] = {}
    for o in report.hosts:
        for probe, reason in o.skipped_probes.items():
            skipped.setdefault((probe, reason), []).append(o.host)
    for (probe, reason), hosts in sorted(skipped.items()):
        console.print(plain(f"probe {probe} skipped on {_host_list(hosts)}: {reason}"))
    for probe in agg.probes():
        placed = [o.host for o in report.hosts if probe in o.placed_probes]
        silent = [h for h in placed if not agg.hosts.get(h) or not agg.hosts[h].hits.get(probe)]
        if placed and silent and len(silent) == len(placed):
            console.print(plain(f"probe {probe} was placed on {_host_list(placed)} and never fired"))


def _host_list(hosts: list[str], limit: int = 5) -> str:
    """``a, b, c and 7 more``."""
    if len(hosts) <= limit:
        return ", ".join(hosts)
    return f"{', '.join(hosts[:limit])} and {len(hosts) - limit} more"


def _render_loss(report: FleetReport, console: Console) -> None:
    """Loss counters of hosts that lost anything (ring buffer overrun, LOST lines, misses, cap)."""
    lossy = [o for o in report.hosts if o.loss.total]
    if not lossy:
        console.print(plain("no events lost"))
        return
    table = Table(title="events lost", title_justify="left")
    for col in ("host", "overrun", "dropped", "LOST lines", "probe misses", "kmsg gaps", "capped", "hist full"):
        table.add_column(col, justify="left" if col == "host" else "right")
    for o in sorted(lossy, key=lambda o: -o.loss.total)[:LIST_ROWS]:
        lc = o.loss
        add_row(table, o.host, str(lc.overrun), str(lc.dropped), str(lc.lost_lines),
                      str(sum(lc.probe_misses.values())), str(lc.kmsg_gaps), str(lc.capped), str(lc.hist_dropped))
    console.print(table)
    if len(lossy) > LIST_ROWS:
        console.print(plain(f"... and {len(lossy) - LIST_ROWS} more hosts lost events"))


def _render_clocks(report: FleetReport, console: Console) -> None:
    """Host clock offsets vs the controller (the largest first): how far the timeline can be trusted."""
    clocked = [o for o in report.hosts if o.clock_offset is not None]
    if not clocked:
        return
    clocked.sort(key=lambda o: -abs(o.clock_offset or 0.0))
    worst = max(o.clock_error or 0.0 for o in clocked)
    console.print(plain(f"clock offsets vs controller ({len(clocked)} hosts; worst uncertainty "
                       f"+/-{worst * 1e3:.1f} ms):", style="bold"))
    for o in clocked[:5 if len(clocked) > MATRIX_HOSTS else MATRIX_HOSTS]:
        console.print(plain(f"  {o.host}: {(o.clock_offset or 0.0) * 1e3:+.1f} ms "
                            f"+/- {(o.clock_error or 0.0) * 1e3:.1f} ms"))
