"""HTML: one self-contained report file with charts and a fleet timeline (no network needed to open it).

Everything is drawn here, in Python, as inline SVG; the page's small script
only adds hover details and lets the reader hide probes on the timeline, so
the report reads the same with scripts off.  Every string that came from a
host or the kernel is escaped.

The fleet timeline puts sampled events of every host on the controller's
wall clock.  Each host's lane shows its measured clock offset and its
uncertainty (half the round trip of the best ping, see orchestrate): each
event is drawn as wide as that uncertainty, so two events on different hosts
can be ordered only where their marks do not overlap.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from typing import Any

from fleetprobe import caveats
from fleetprobe.render import aggregates
from fleetprobe.audit import AuditResult
from fleetprobe.aggtables import AggResults, bucket_label
from fleetprobe.results import FleetReport
from fleetprobe.render.safe import visible
from fleetprobe.sketches import Latency, bucket_range_ns
from fleetprobe.render.terminal import format_ns, value_text
from fleetprobe.outfiles import write_text_atomic

#: Hosts drawn as timeline lanes / heatmap rows before "N more".
MAX_HOSTS = 60
#: Top values per (probe, field) chart.
TOP = 10
#: Distinct probe colours (colour-blind safe: Okabe-Ito), reused cyclically.
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
_STATUS_CLASS = {"ok": "ok", "failed": "bad", "unreachable": "bad", "skipped": "warn", "interrupted": "warn"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1b1b1b;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.4em 0}th,td{padding:.2em .6em;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:600}.warn{color:#9a6700}
.verdict{padding:.6em 1em;border-radius:6px;margin:.8em 0}.verdict.pass{background:#dafbe1}
.verdict.fail{background:#ffebe9}.meta{color:#555}.small{font-size:.85em;color:#555}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .axis line,svg .axis path{stroke:#999}
.legend label{margin-right:1em;cursor:pointer;white-space:nowrap}.swatch{display:inline-block;width:.8em;
height:.8em;margin-right:.3em;vertical-align:-.05em}
#tip{position:fixed;pointer-events:none;background:#1b1b1b;color:#fff;padding:.3em .5em;border-radius:4px;
font-size:12px;max-width:40em;display:none;white-space:pre-wrap;z-index:9}
.charts{display:flex;flex-wrap:wrap;gap:1.5em}.chart{flex:0 0 auto}
td.heat{text-align:right;font-variant-numeric:tabular-nums;min-width:3em}
#timeline{cursor:crosshair;user-select:none}#timeline rect.event.outside{display:none}
"""

_JS = """
(function(){
  "use strict";
  var tip = document.getElementById("tip");
  document.addEventListener("mousemove", function(e){
    var t = e.target.closest ? e.target.closest("[data-tip]") : null;
    if (!t) { tip.style.display = "none"; return; }
    tip.textContent = t.getAttribute("data-tip");
    tip.style.display = "block";
    tip.style.left = Math.min(e.clientX + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = (e.clientY + 14) + "px";
  });
  var boxes = document.querySelectorAll("input[data-probe]");
  Array.prototype.forEach.call(boxes, function(box){
    box.addEventListener("change", function(){
      var marks = document.querySelectorAll("#timeline [data-probe='" + box.getAttribute("data-probe") + "']");
      Array.prototype.forEach.call(marks, function(m){ m.style.display = box.checked ? "" : "none"; });
    });
  });

  // Timeline zoom: marks carry their time (data-t, s from the start) and clock uncertainty (data-e).
  var svg = document.getElementById("timeline");
  if (!svg) { return; }
  var NS = "http://www.w3.org/2000/svg";
  var x0 = +svg.getAttribute("data-x0"), pw = +svg.getAttribute("data-w");
  var span = +svg.getAttribute("data-span"), top = +svg.getAttribute("data-top");
  var bottom = +svg.getAttribute("data-bottom");
  var marks = svg.querySelectorAll("rect.event"), ticks = document.getElementById("ticks");
  var label = document.getElementById("zoom-label");
  function niceTicks(lo, hi) {
    var raw = (hi - lo) / 6, mag = Math.pow(10, Math.floor(Math.log10(raw))), step = 10 * mag;
    [1, 2, 5, 10].some(function(m){ if (m * mag >= raw) { step = m * mag; return true; } return false; });
    var out = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) { out.push(t); }
    return {ticks: out, digits: Math.max(0, -Math.floor(Math.log10(step)))};
  }
  function el(name, attrs, text) {
    var e = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function(k){ e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function zoom(a, b) {
    a = Math.max(0, a); b = Math.min(span, b);
    if (!(b - a > 1e-7)) { a = 0; b = span; }
    var k = pw / (b - a);
    Array.prototype.forEach.call(marks, function(m){
      var t = +m.getAttribute("data-t"), e = +m.getAttribute("data-e");
      var w = Math.max(2, 2 * e * k), x = x0 + (t - a) * k - w / 2;
      var out = t + e < a || t - e > b;
      m.setAttribute("x", Math.max(x0, x).toFixed(2));
      m.setAttribute("width", Math.max(0, Math.min(x + w, x0 + pw) - Math.max(x0, x)).toFixed(2));
      m.classList.toggle("outside", out);
    });
    while (ticks.firstChild) { ticks.removeChild(ticks.firstChild); }
    var nt = niceTicks(a, b);
    nt.ticks.forEach(function(t){
      var x = (x0 + (t - a) * k).toFixed(1);
      ticks.appendChild(el("line", {x1: x, y1: top - 10, x2: x, y2: bottom, stroke: "#eee"}));
      ticks.appendChild(el("text", {x: x, y: top - 12, "text-anchor": "middle"}, "+" + t.toFixed(nt.digits) + "s"));
    });
    var whole = a === 0 && b === span;
    label.textContent = whole ? "" : "showing +" + a.toFixed(6) + "s to +" + b.toFixed(6) + "s";
    if (history.replaceState) {
      history.replaceState(null, "", whole ? location.pathname + location.search
                                           : "#t=" + a.toFixed(6) + "-" + b.toFixed(6));
    }
    view = [a, b];
  }
  var view = [0, span], drag = null, band = el("rect", {y: top - 6, height: bottom - top + 6,
                                                    fill: "#0969da", "fill-opacity": "0.15"});
  function timeAt(evt) {
    var r = svg.getBoundingClientRect(), x = (evt.clientX - r.left) * (+svg.getAttribute("width") / r.width);
    return {x: Math.min(Math.max(x, x0), x0 + pw),
            t: view[0] + (Math.min(Math.max(x, x0), x0 + pw) - x0) * (view[1] - view[0]) / pw};
  }
  svg.addEventListener("mousedown", function(evt){
    drag = timeAt(evt); band.setAttribute("x", drag.x); band.setAttribute("width", 0); svg.appendChild(band);
    evt.preventDefault();
  });
  svg.addEventListener("mousemove", function(evt){
    if (!drag) { return; }
    var p = timeAt(evt);
    band.setAttribute("x", Math.min(p.x, drag.x)); band.setAttribute("width", Math.abs(p.x - drag.x));
  });
  window.addEventListener("mouseup", function(evt){
    if (!drag) { return; }
    var p = timeAt(evt), a = Math.min(p.t, drag.t), b = Math.max(p.t, drag.t);
    if (band.parentNode) { band.parentNode.removeChild(band); }
    if (Math.abs(p.x - drag.x) >= 4) { zoom(a, b); }
    drag = null;
  });
  svg.addEventListener("dblclick", function(){ zoom(0, span); });
  document.getElementById("zoom-reset").addEventListener("click", function(){ zoom(0, span); });
  var m = /^#t=([0-9.]+)-([0-9.]+)$/.exec(location.hash);
  if (m) { zoom(parseFloat(m[1]), parseFloat(m[2])); }
})();
"""


def _e(text: object) -> str:
    """HTML-escape any value for text or attribute context."""
    return html.escape(str(text), quote=True)


def _v(text: object) -> str:
    """A host's value for the page: non-printables shown as escapes (render.safe.visible), then HTML-escaped."""
    return _e(visible(text))


def _utc(t: float, with_date: bool = True) -> str:
    """Epoch seconds as UTC text with milliseconds."""
    base = time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S", time.gmtime(t))
    return f"{base}.{int((t % 1) * 1000):03d}" + ("Z" if with_date else "")


def _fmt_ms(seconds: float) -> str:
    """Seconds as a signed millisecond string."""
    return f"{seconds * 1e3:+.2f} ms"


def _probe_colours(probes: list[str]) -> dict[str, str]:
    """A stable colour per probe."""
    return {p: COLOURS[i % len(COLOURS)] for i, p in enumerate(probes)}


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About ``n`` round tick positions between lo and hi."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _status_table(report: FleetReport) -> str:
    """Per-host status: status, stage, kernel, events, clock offset and its uncertainty, cleanup, reason."""
    rows = []
    for o in report.hosts:
        clock = (f"{_fmt_ms(o.clock_offset)} ± {(o.clock_error or 0) * 1e3:.2f} ms"
                 if o.clock_offset is not None else "-")
        rows.append(f"<tr><td>{_e(o.host)}</td><td class='{_STATUS_CLASS.get(o.status, '')}'>{_e(o.status)}</td>"
                    f"<td>{_e(o.stage)}</td><td>{_e(o.arch or '-')}</td><td>{_e(o.kernel_release or '-')}</td>"
                    f"<td class='n'>{o.events}</td><td class='n'>{_e(clock)}</td><td class='n'>{o.loss.total}</td>"
                    f"<td>{_e(o.cleanup)}</td><td>{_e(o.reason or '-')}</td></tr>")
    return ("<table id='hosts'><thead><tr><th>host</th><th>status</th><th>stage</th><th>arch</th><th>kernel</th>"
            "<th class='n'>events</th><th class='n'>clock offset vs controller</th><th class='n'>lost</th>"
            "<th>cleanup</th><th>reason</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _caveats_block(report: FleetReport) -> str:
    """Lines no probe claimed, fleetprobe's own events left out, skipped probes (caveats.py); '' if none."""
    items = [f"<li class='warn'><b>{_e(h)}</b>: {_e(t)}</li>" for h, t in caveats.fleet_caveats(report.hosts)]
    summary = caveats.own_filter_summary(report.hosts)
    if summary:
        items.append(f"<li>{_e(summary)}</li>")
    for p in report.aggregate.probes():
        skipped = caveats.skipped_on(report.hosts, p)
        if skipped:
            items.append(f"<li>probe <b>{_e(p)}</b> skipped on " + "; ".join(
                f"{_e(h)}: {_e(r)}" for h, r in skipped[:MAX_HOSTS]) + "</li>")
    return f"<ul id='caveats'>{''.join(items)}</ul>" if items else ""


def _heatmap(report: FleetReport, probes: list[str]) -> str:
    """Hits per probe per host: a table whose cells are shaded by count (log scale)."""
    agg = report.aggregate
    hosts = [o.host for o in report.hosts] or sorted(agg.hosts)
    shown = hosts[:MAX_HOSTS]
    peak = max([n for p in probes for n in agg.hits(p).values()] or [1])
    head = "".join(f"<th class='n'>{_e(p)}</th>" for p in probes)
    rows = []
    outcomes = {o.host: o for o in report.hosts}
    for h in shown:
        cells = []
        for p in probes:
            n = agg.hits(p).get(h, 0)
            o = outcomes.get(h)
            if caveats.hit_text(o, p, n) == caveats.SKIPPED and o is not None:
                cells.append(f"<td class='heat skipped' data-tip='{_e(h)} / {_e(p)}: skipped: "
                             f"{_e(o.skipped_probes[p])}'>{caveats.SKIPPED}</td>")
                continue
            alpha = 0.0 if n == 0 else 0.12 + 0.78 * math.log1p(n) / math.log1p(peak)
            cells.append(f"<td class='heat' style='background:rgba(0,114,178,{alpha:.2f});"
                         f"color:{'#fff' if alpha > 0.55 else '#1b1b1b'}' data-tip='{_e(h)} / {_e(p)}: {n} hits'>"
                         f"{n}</td>")
        rows.append(f"<tr><td>{_e(h)}</td>{''.join(cells)}</tr>")
    totals = "".join(f"<td class='n'><b>{agg.total_hits(p)}</b></td>" for p in probes)
    more = (f"<p class='small'>{len(hosts) - len(shown)} more hosts not shown (see the JSON report)</p>"
            if len(hosts) > len(shown) else "")
    return (f"<table id='hits' class='heatmap'><thead><tr><th>host</th>{head}</tr></thead><tbody>{''.join(rows)}"
            f"<tr><td><b>total</b></td>{totals}</tr></tbody></table>{more}")


def _bar_chart(title: str, items: list[tuple[str, int, str]], colour: str, chart_id: str) -> str:
    """A horizontal bar chart as SVG: (label, value, tooltip) per bar."""
    if not items:
        return ""
    width, label_w, bar_h = 460, 170, 18
    peak = max(v for _, v, _ in items) or 1
    height = bar_h * len(items) + 8
    bars = []
    for i, (label, value, tip) in enumerate(items):
        y = 4 + i * bar_h
        w = max(1.0, (width - label_w - 60) * value / peak)
        short = label if len(label) <= 26 else label[:25] + "…"
        bars.append(f"<text x='{label_w - 6}' y='{y + 13}' text-anchor='end'>{_e(short)}</text>"
                    f"<rect class='bar' x='{label_w}' y='{y + 2}' width='{w:.1f}' height='{bar_h - 5}' "
                    f"fill='{colour}' data-tip='{_e(tip)}'><title>{_e(tip)}</title></rect>"
                    f"<text x='{label_w + w + 4:.1f}' y='{y + 13}'>{value}</text>")
    return (f"<div class='chart'><h3>{_e(title)}</h3><svg id='{_e(chart_id)}' class='barchart' width='{width}' "
            f"height='{height}' role='img' aria-label='{_e(title)}'>{''.join(bars)}</svg></div>")


def _top_values(report: FleetReport, probes: list[str], colours: dict[str, str]) -> str:
    """Top values per (probe, field) as bar charts."""
    agg = report.aggregate
    charts = []
    for p, name, table, top in agg.top_tables(probes, TOP):
        approx = "" if table.exact else f" (≥, error ≤ {table.error})"
        items = [(value_text(v), c, f"{p} {name}={value_text(v)}: {c} events on {h} host(s)") for v, c, h in top]
        charts.append(_bar_chart(f"{p}: top {name}{approx}", items, colours.get(p, COLOURS[0]), f"top-{p}-{name}"))
    return "<div class='charts'>" + "".join(charts) + "</div>" if charts else "<p>no values recorded</p>"


def _latency_chart(entry: str, ret: str, lat: Latency, colour: str) -> str:
    """A log2 latency histogram as SVG columns, one per bucket from the first to the last used."""
    used = [b for b, c in enumerate(lat.buckets) if c]
    if not used:
        return ""
    lo_b, hi_b = used[0], used[-1]
    n = hi_b - lo_b + 1
    width, height, pad_l, pad_b = max(260, 34 * n + 60), 180, 50, 40
    col_w = (width - pad_l - 10) / n
    peak = max(lat.buckets)
    cols = []
    for i, b in enumerate(range(lo_b, hi_b + 1)):
        c = lat.buckets[b]
        lo, hi = bucket_range_ns(b)
        h = (height - pad_b - 10) * c / peak
        x = pad_l + i * col_w
        tip = f"{format_ns(lo)} – {format_ns(hi)}: {c} calls"
        cols.append(f"<rect class='bar' x='{x + 1:.1f}' y='{height - pad_b - h:.1f}' width='{col_w - 2:.1f}' "
                    f"height='{h:.1f}' fill='{colour}' data-tip='{_e(tip)}'><title>{_e(tip)}</title></rect>"
                    f"<text x='{x + col_w / 2:.1f}' y='{height - pad_b + 14}' text-anchor='middle' "
                    f"transform='rotate(30 {x + col_w / 2:.1f} {height - pad_b + 14})'>{_e(format_ns(lo))}</text>")
    p50, p99 = lat.quantile(0.5), lat.quantile(0.99)
    title = (f"{entry} → {ret}: {lat.count} calls"
             + (f", p50 ≤ {format_ns(p50)}, p99 ≤ {format_ns(p99)}" if p50 is not None and p99 is not None else ""))
    notes = lat.caveats()
    return (f"<div class='chart'><h3>{_e(title)}</h3><svg class='histogram' id='lat-{_e(ret)}' width='{width}' "
            f"height='{height}' role='img' aria-label='latency {_e(entry)} to {_e(ret)}'>"
            f"<g class='axis'><line x1='{pad_l}' y1='{height - pad_b}' x2='{width - 5}' y2='{height - pad_b}'/>"
            f"<text x='{pad_l - 6}' y='16' text-anchor='end'>{peak}</text>"
            f"<text x='{pad_l - 6}' y='{height - pad_b}' text-anchor='end'>0</text></g>{''.join(cols)}</svg>"
            + (f"<p class='small'>{_e('; '.join(notes))}</p>" if notes else "") + "</div>")


def _aggregates(results: AggResults) -> str:
    """Every ``aggregate:`` table as the terminal shows it (render.aggregates): heading, each host's mode, notes, rows.

    Keys are comm and path values chosen by any user on a host, reasons quote the host's
    kernel: each goes through ``_v`` (non-printables shown as escapes, as on the terminal, so
    a bidi override cannot reorder the page and ``--html -`` cannot drive a terminal; then
    HTML-escaped), and element ids are made from the table's position, never from a key.
    """
    blocks = []
    for i, s in enumerate(aggregates.summaries(results)):
        t = s.table
        parts = [f"<div class='agg' id='agg-{i}'><h3>{_v(s.heading)}</h3>",
                 "<ul class='agg-modes'>" + "".join(f"<li>{_v(m)}</li>" for m in s.modes) + "</ul>"]
        parts += [f"<p class='small agg-note'>{_v(n)}</p>" for n in s.notes]
        hosts = "".join(f"<tr><td>{_v(h)}</td><td>{_e(p[s.tid].mode)}</td><td class='n'>{p[s.tid].hits}</td>"
                        f"<td class='n'>{p[s.tid].entries}</td><td class='n'>{p[s.tid].dropped}</td>"
                        f"<td>{_v(p[s.tid].reason or '-')}</td></tr>"
                        for h, p in sorted(results.hosts.items()) if s.tid in p)
        if hosts:
            parts.append("<details><summary>per host</summary><table class='agg-hosts'><thead><tr><th>host</th>"
                         "<th>mode</th><th class='n'>hits</th><th class='n'>keys</th><th class='n'>not counted</th>"
                         f"<th>reason</th></tr></thead><tbody>{hosts}</tbody></table></details>")
        if t.kind == "count":
            rows, more = aggregates.count_rows(t)
            body = "".join(f"<tr><td>{_v(v)}</td><td class='n'>{c}</td><td class='n'>{h}</td></tr>"
                           for v, c, h in rows)
            parts.append(f"<table class='agg-counts'><thead><tr><th>{_e(t.field)}</th><th class='n'>count</th>"
                         f"<th class='n'>hosts</th></tr></thead><tbody>{body}</tbody></table>" if rows
                         else "<p>nothing counted</p>")
        else:
            groups, more = aggregates.histogram_groups(t)
            unit = aggregates.bucket_unit(t)
            charts = []
            for j, (label, total, buckets) in enumerate(groups):
                shown = visible(label)
                title = f"{shown}: {total}" if label else f"{total}"
                items = [(bucket_label(b) + unit, c, f"{shown + ' ' if label else ''}{bucket_label(b)}{unit}: {c}")
                         for b, c in aggregates.bucket_rows(buckets)]
                charts.append(_bar_chart(title, items, COLOURS[i % len(COLOURS)], f"agg-{i}-{j}"))
            parts.append(f"<div class='charts'>{''.join(charts)}</div>" if charts else "<p>nothing counted</p>")
        if more:
            parts.append(f"<p class='small'>... and {more} more (see the JSON report)</p>")
        blocks.append("".join(parts) + "</div>")
    return "".join(blocks)


def _timeline(report: FleetReport, colours: dict[str, str]) -> str:
    """One wall-clock axis, one lane per host: sampled events drawn as wide as the host's clock uncertainty."""
    run = report.run
    outcomes = {o.host: o for o in report.hosts}
    events: dict[str, list[dict[str, Any]]] = {}
    for host, summary in sorted(report.aggregate.hosts.items()):
        evs = [e for e in summary.sample.first + summary.sample.reservoir if isinstance(e.get("time"), (int, float))]
        if evs:
            events[host] = sorted(evs, key=lambda e: float(e["time"]))
    hosts = [o.host for o in report.hosts if o.host in events] + sorted(h for h in events if h not in outcomes)
    if not hosts:
        return "<p id='timeline-empty'>no events to place on the timeline</p>"
    shown = hosts[:MAX_HOSTS]
    times = [float(e["time"]) for h in shown for e in events[h]]
    t0 = min(times + ([run.started] if run.started else []))
    t1 = max(times + ([run.ended] if run.ended else []))
    if t1 - t0 < 1e-3:
        t1 = t0 + 1e-3
    label_w, right, lane_h, top, bottom = 230, 20, 22, 30, 30
    width = 1120
    plot_w = width - label_w - right
    height = top + lane_h * len(shown) + bottom

    def x_of(t: float) -> float:
        return label_w + plot_w * (t - t0) / (t1 - t0)

    parts = [f"<g class='axis'><line x1='{label_w}' y1='{top - 6}' x2='{width - right}' y2='{top - 6}'/><g id='ticks'>"]
    for tick in _nice_ticks(0.0, t1 - t0):
        x = x_of(t0 + tick)
        parts.append(f"<line x1='{x:.1f}' y1='{top - 10}' x2='{x:.1f}' y2='{height - bottom}' stroke='#eee'/>"
                     f"<text x='{x:.1f}' y='{top - 12}' text-anchor='middle'>+{tick:g}s</text>")
    parts.append(f"</g><text x='{label_w}' y='{height - 8}'>{_e(_utc(t0))} (controller clock, UTC)</text>"
                 f"<text id='zoom-label' x='{(label_w + width - right) / 2:.0f}' y='{height - 8}' "
                 "text-anchor='middle'></text>"
                 f"<text x='{width - right}' y='{height - 8}' text-anchor='end'>{_e(_utc(t1))}</text></g>")
    for i, host in enumerate(shown):
        y = top + i * lane_h
        o = outcomes.get(host)
        offset, err = (o.clock_offset, o.clock_error or 0.0) if o is not None else (None, 0.0)
        clock = f"{_fmt_ms(offset)} ± {err * 1e3:.2f} ms" if offset is not None else "offset unknown"
        parts.append(f"<g class='lane' data-host='{_e(host)}'>"
                     f"<rect x='{label_w}' y='{y}' width='{plot_w}' height='{lane_h - 2}' "
                     f"fill='{'#f6f8fa' if i % 2 == 0 else '#fff'}'/>"
                     f"<text x='4' y='{y + 14}'><tspan font-weight='600'>{_e(host[:22])}</tspan>"
                     f"<tspan class='clock' x='{label_w - 6}' text-anchor='end'>{_e(clock)}</tspan></text>")
        for ev in events[host]:
            t = float(ev["time"])
            # The mark spans the host's clock uncertainty (at least 2 px so it stays visible).
            x_lo, x_hi = x_of(t - err), x_of(t + err)
            w = max(2.0, x_hi - x_lo)
            fields = " ".join(f"{k}={v}" for k, v in dict(ev.get("fields") or {}).items())
            tip = (f"{host} {_utc(t)} ± {err * 1e3:.2f} ms\n{ev.get('probe')} comm={ev.get('comm')} "
                   f"pid={ev.get('pid')} cpu={ev.get('cpu')}" + (f"\n{fields}" if fields else ""))
            probe = str(ev.get("probe"))
            parts.append(f"<rect class='event' data-probe='{_e(probe)}' data-t='{t - t0:.6f}' data-e='{err:.6f}' "
                         f"x='{(x_lo + x_hi - w) / 2:.2f}' "
                         f"y='{y + 3}' width='{w:.2f}' height='{lane_h - 8}' fill='{colours.get(probe, '#555')}' "
                         f"fill-opacity='0.75' data-tip='{_e(tip)}'/>")
        parts.append("</g>")
    legend = "".join(f"<label><input type='checkbox' checked data-probe='{_e(p)}'><span class='swatch' "
                     f"style='background:{c}'></span>{_e(p)}</label>" for p, c in colours.items())
    more = (f"<p class='small'>{len(hosts) - len(shown)} more hosts not drawn</p>" if len(hosts) > len(shown) else "")
    sampled = sum(len(events[h]) for h in shown)
    seen = sum(report.aggregate.hosts[h].sample.seen for h in shown)
    return (f"<div class='legend'>{legend}</div>"
            f"<svg id='timeline' width='{width}' height='{height}' role='img' aria-label='fleet timeline' "
            f"data-x0='{label_w}' data-w='{plot_w}' data-span='{t1 - t0:.6f}' data-top='{top}' "
            f"data-bottom='{height - bottom}'>{''.join(parts)}</svg>{more}"
            "<p class='small'>Drag across the timeline to zoom into a time window; double-click or "
            "<button type='button' id='zoom-reset'>show all</button> to see the whole run. The window is kept "
            "in the address (<code>#t=FROM-TO</code>, seconds from the start) so a link opens it.</p>"
            f"<p class='small'>{sampled} of {seen} events drawn (each host's first events and a uniform "
            "sample of the rest). Each mark is as wide as the host's clock uncertainty: events on two hosts "
            "are ordered only where their marks do not overlap.</p>")


def _clock_chart(report: FleetReport) -> str:
    """Each host's clock offset vs the controller as a dot with its uncertainty as error bars."""
    clocked = [o for o in report.hosts if o.clock_offset is not None][:MAX_HOSTS]
    if not clocked:
        return ""
    lo = min((o.clock_offset or 0.0) - (o.clock_error or 0.0) for o in clocked)
    hi = max((o.clock_offset or 0.0) + (o.clock_error or 0.0) for o in clocked)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-4:
        lo, hi = lo - 5e-5, hi + 5e-5
    label_w, width, row_h, top = 160, 620, 18, 24
    plot_w = width - label_w - 20
    height = top + row_h * len(clocked) + 24

    def x_of(v: float) -> float:
        return label_w + plot_w * (v - lo) / (hi - lo)

    parts = [f"<g class='axis'><line x1='{x_of(0):.1f}' y1='{top - 6}' x2='{x_of(0):.1f}' y2='{height - 14}' "
             f"stroke-dasharray='3,3'/><text x='{x_of(0):.1f}' y='{height - 2}' text-anchor='middle'>controller clock</text>"
             f"<text x='{label_w}' y='{top - 10}'>{lo * 1e3:+.2f} ms</text>"
             f"<text x='{width - 20}' y='{top - 10}' text-anchor='end'>{hi * 1e3:+.2f} ms</text></g>"]
    for i, o in enumerate(clocked):
        y = top + i * row_h + row_h / 2
        off, err = o.clock_offset or 0.0, o.clock_error or 0.0
        tip = f"{o.host}: {_fmt_ms(off)} ± {err * 1e3:.2f} ms"
        parts.append(f"<g class='clock-offset' data-tip='{_e(tip)}'><text x='{label_w - 6}' y='{y + 4:.1f}' "
                     f"text-anchor='end'>{_e(o.host[:22])}</text>"
                     f"<line x1='{x_of(off - err):.1f}' y1='{y:.1f}' x2='{x_of(off + err):.1f}' y2='{y:.1f}' "
                     f"stroke='#0072B2' stroke-width='2'/><circle cx='{x_of(off):.1f}' cy='{y:.1f}' r='3.5' "
                     f"fill='#0072B2'><title>{_e(tip)}</title></circle></g>")
    return (f"<div class='chart'><h3>clock offsets (dot) and their uncertainty (bar)</h3><svg id='clocks' "
            f"width='{width}' height='{height}' role='img' aria-label='clock offsets'>{''.join(parts)}</svg></div>")


def _audit_block(audit: AuditResult) -> str:
    """The audit verdict and its findings."""
    cls = "pass" if audit.passed else "fail"
    base = f"against baseline run {_e(audit.baseline)}" if audit.baseline else "with no baseline run"
    head = f"Audit {'passed' if audit.passed else 'FAILED'} {base}"
    hosts = audit.failed_hosts()
    items = "".join(f"<li><b class='{'bad' if f in audit.failures else 'meta'}'>{_e(f.kind)}</b> {_e(f.message)}</li>"
                    for f in audit.findings)
    return (f"<div id='audit' class='verdict {cls}'><b>{head}</b>"
            + (f"<br>hosts: {_e(', '.join(hosts))}" if hosts else "")
            + (f"<ul>{items}</ul>" if items else "") + "</div>")


def render_html(report: FleetReport, audit: AuditResult | None = None) -> str:
    """The whole report as one HTML document (inline CSS, SVG and script; nothing fetched)."""
    run, agg = report.run, report.aggregate
    agg.finish()
    probes = agg.probes()
    colours = _probe_colours(probes)
    counts: dict[str, int] = {}
    for o in report.hosts:
        counts[o.status] = counts.get(o.status, 0) + 1
    status_line = ", ".join(f"<span class='{_STATUS_CLASS.get(s, '')}'>{n} {_e(s)}</span>"
                            for s, n in sorted(counts.items()))
    totals = [(p, agg.total_hits(p), f"{p}: {agg.total_hits(p)} hits on {len(agg.hits(p))} host(s)")
              for p in probes]
    latency = "".join(_latency_chart(entry, ret, agg.latency(ret), colours.get(ret, COLOURS[0]))
                      for ret, entry in sorted(agg.pairs.items()))
    meta = {"run_id": run.run_id, "playbook": run.playbook, "playbook_sha256": run.playbook_sha256,
            "started": run.started, "ended": run.ended, "hosts": len(report.hosts), "shards": run.shards}
    body = [
        f"<h1>fleetprobe: {_e(run.playbook)} <span class='meta'>run {_e(run.run_id)}</span></h1>",
        f"<p class='meta'>{len(report.hosts)} host(s): {status_line} · {_e(_utc(run.started))} for "
        f"{run.duration:.1f}s" + (f" · playbook sha256 {_e(run.playbook_sha256[:12])}" if run.playbook_sha256 else "")
        + (f" · merged from shards {_e(', '.join(run.shards))}" if run.shards else "") + "</p>",
        _audit_block(audit) if audit is not None else "",
        "<h2>Hosts</h2>", _status_table(report), _caveats_block(report),
        "<h2>Fleet timeline</h2>", _timeline(report, colours), _clock_chart(report),
        "<h2>Hits per probe per host</h2>",
        "<div class='charts'>" + _bar_chart("hits per probe (fleet)", totals, COLOURS[0], "hits-total") + "</div>"
        if totals else "<p>no probes were placed or hit</p>",
        _heatmap(report, probes) if probes else "",
        "<h2>Top values</h2>", _top_values(report, probes, colours),
        "<h2>Latency</h2>", f"<div class='charts'>{latency}</div>" if latency else "<p>no paired probes</p>",
        *(["<h2 id='aggregates'>Aggregates</h2>", _aggregates(agg.aggregates)] if agg.aggregates else []),
    ]
    # The run's metadata for programs that scrape the page; '<' escaped so it cannot end the script element.
    data = json.dumps(meta, allow_nan=False).replace("<", "\\u003c")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; img-src data:\">"
            f"<title>fleetprobe {_e(run.playbook)} {_e(run.run_id)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(b for b in body if b)
            + f"<div id='tip'></div><script type='application/json' id='run-meta'>{data}</script>"
            f"<script>{_JS}</script></body></html>\n")


def write_html(report: FleetReport, path: str | os.PathLike[str], audit: AuditResult | None = None) -> None:
    """Write :func:`render_html` to ``path`` atomically, mode 0600 (``-``: stdout)."""
    write_text_atomic(path, render_html(report, audit))
