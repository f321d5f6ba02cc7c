"""Commands on stored runs and report files: ``history``, ``show``, ``diff``, ``merge``.

``diff`` exits 4 (:attr:`Exit.AUDIT_FAILED`) when the two runs differ.
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fleetprobe.audit import AuditResult, Finding, diff_reports
from fleetprobe.cli.options import Exit, _thresholds
from fleetprobe.results import FleetReport
from fleetprobe.store import Store
from fleetprobe.render.html import write_html
from fleetprobe.render.markdown import write_markdown
from fleetprobe.render.terminal import render_summary
from fleetprobe.results import write_json
from fleetprobe.shard import merge_files
from fleetprobe.outfiles import open_private, write_text_atomic


_SEVERITY_STYLE = {"fail": "red", "note": "yellow"}


def open_store(args: argparse.Namespace) -> Store:
    """The store named by ``--store`` (default path otherwise)."""
    return Store(getattr(args, "store", None) or None)


def write_reports(args: argparse.Namespace, report: FleetReport, console: Console,
                  audit_result: AuditResult | None = None) -> None:
    """Write --html / --markdown (and --json where the command has it) for a report."""
    if getattr(args, "html", None):
        write_html(report, args.html, audit_result)
        console.print(f"HTML report written to {escape(args.html)}", highlight=False)
    if getattr(args, "markdown", None):
        write_markdown(report, args.markdown, audit_result)
        console.print(f"Markdown summary written to {escape(args.markdown)}", highlight=False)
    if getattr(args, "json", None) and args.command in ("show", "audit"):
        write_json(report, args.json)
        console.print(f"report written to {escape(args.json)}", highlight=False)


def _when(t: float | None) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_history(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe history``: the stored runs, newest first."""
    with open_store(args) as store:
        if args.prune:
            events, runs = store.prune(events_days=args.keep_events_days, runs_days=args.keep_runs_days)
            console.print(f"pruned raw events of {events} chunk(s) and {runs} run(s)", highlight=False)
        rows = store.runs(playbook=args.playbook, limit=args.limit)
    if args.json:
        data = [r.__dict__ for r in rows]
        text = json.dumps(data, indent=1)
        if args.json == "-":
            print(text)
            return 0
        write_text_atomic(args.json, text + "\n")
    t = Table(title=f"fleetprobe history ({escape(str(store.path))})", title_justify="left")
    for col in ("run", "playbook", "started", "took", "state", "hosts ok", "events", "audit", "raw events"):
        t.add_column(col, justify="right" if col in ("took", "events") else "left")
    for r in rows:
        took = f"{r.ended - r.started:.1f}s" if r.ended else "-"
        state = {"killed": "[red]killed[/]", "running": "[yellow]running[/]"}.get(r.state, r.state)
        audit_text = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]"}.get(r.audit or "", "-")
        t.add_row(r.run_id, escape(r.playbook), _when(r.started), took, state, f"{r.hosts_ok}/{r.hosts}",
                  str(r.events), audit_text, "kept" if r.has_events else "-")
    console.print(t)
    if not rows:
        console.print("no runs stored yet: 'fleetprobe run' and 'fleetprobe audit' record every run")
    return 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe show RUN``: the stored report, rendered again (with its audit verdict)."""
    with open_store(args) as store:
        run_id = store.resolve(args.run)
        report = store.load_report(run_id)
        stored = store.audit_result(run_id)
        result = AuditResult.from_json(stored) if stored else None
        if args.events:
            n = 0
            with open_private(args.events) as f:
                for ev in store.events(run_id):
                    f.write(json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n")
                    n += 1
            console.print(f"{n} raw events written to {escape(args.events)}"
                          + ("" if n else " (none stored, or dropped by retention)"), highlight=False)
    render_summary(report, console)
    if result is not None:
        print_audit(result, console)
    write_reports(args, report, console, result)
    return 0


def print_findings(findings: list[Finding], console: Console, failing: set[int] | None = None) -> None:
    """One line per finding: severity, kind, message."""
    for i, f in enumerate(findings):
        sev = "FAIL" if failing is None and f.severity == "fail" or failing is not None and i in failing else "note"
        line = Text(f"  {sev:<4} ", style=_SEVERITY_STYLE["fail" if sev == "FAIL" else "note"])
        line.append(f"{f.kind}: ", style="bold")
        line.append(f.message)
        console.print(line, highlight=False)


def print_audit(result: AuditResult, console: Console) -> None:
    """The verdict line, the hosts that failed, and every finding."""
    base = f"against baseline run {result.baseline}" if result.baseline else "(no baseline run: rules only)"
    if result.passed:
        console.print(Text(f"audit PASSED {base}", style="bold green"))
    else:
        hosts = result.failed_hosts()
        console.print(Text(f"audit FAILED {base}" + (f": {', '.join(hosts)}" if hosts else ""), style="bold red"))
    failing = {i for i, f in enumerate(result.findings) if f in result.failures}
    print_findings(result.findings, console, failing)


def cmd_diff(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe diff A B``: what changed from run A to run B."""
    with open_store(args) as store:
        a, b = store.resolve(args.run_a), store.resolve(args.run_b)
        ra, rb = store.load_report(a), store.load_report(b)
    if ra.run.playbook != rb.run.playbook:
        console.print(f"[yellow]note[/]: the runs ran different playbooks ({escape(ra.run.playbook)} and "
                      f"{escape(rb.run.playbook)}); only probes with the same name compare")
    findings = diff_reports(ra, rb, _thresholds(args))
    if args.json:
        text = json.dumps({"from": a, "to": b, "changes": [f.to_json() for f in findings]}, indent=1)
        if args.json == "-":
            print(text)
        else:
            write_text_atomic(args.json, text + "\n")
    if args.json != "-":
        console.print(Text(f"changes from run {a} to run {b}: {len(findings) or 'none'}", style="bold"))
        print_findings(findings, console)
    return int(Exit.AUDIT_FAILED if findings else Exit.OK)


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe merge A.json B.json -o merged.json``."""
    report = merge_files(args.reports)
    write_json(report, args.output)
    render_summary(report, console)
    console.print(f"merged {len(args.reports)} report(s) ({len(report.hosts)} hosts) into {escape(args.output)}",
                  highlight=False)
    write_reports(args, report, console)
    return 0
