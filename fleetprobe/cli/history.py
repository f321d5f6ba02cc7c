"""Commands on stored runs and report files: ``history``, ``show``, ``diff``, ``merge``.

``diff`` exits 4 (:attr:`Exit.AUDIT_FAILED`) when the two runs differ.
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleetprobe.audit import AuditResult, Finding, audit_json, diff_reports, group_findings
from fleetprobe.cli.options import Exit, _thresholds
from fleetprobe.results import FleetReport
from fleetprobe.store import Store
from fleetprobe.cli.output import print_table, where, write_report_json
from fleetprobe.render.html import write_html
from fleetprobe.render.markdown import write_markdown
from fleetprobe.render.safe import visible
from fleetprobe.render.terminal import render_summary
from fleetprobe.playbook import Playbook
from fleetprobe.shard import merge_files
from fleetprobe.outfiles import open_private, write_text_atomic


_SEVERITY_STYLE = {"fail": "red", "note": "yellow"}


def open_store(args: argparse.Namespace) -> Store:
    """The store named by ``--store`` (default path otherwise)."""
    return Store(getattr(args, "store", None) or None)


def write_reports(args: argparse.Namespace, report: FleetReport,
                  audit_result: AuditResult | None = None, playbook: Playbook | None = None) -> list[str]:
    """Write --html / --markdown (and --json where the command has it) for a report, printing nothing.

    Returns the lines to print once everything is written (:func:`print_written`): the files
    are written before anything is rendered, so a rendering bug can never cost a report.
    The JSON of an audited run carries the verdict, the playbook's rules and the grouped findings.
    Every path may be ``-`` (stdout; people's text then goes to stderr, see cli.output).
    """
    written: list[str] = []
    if getattr(args, "html", None):
        write_html(report, args.html, audit_result)
        written.append(f"HTML report written to {where(args.html)}")
    if getattr(args, "markdown", None):
        write_markdown(report, args.markdown, audit_result)
        written.append(f"Markdown summary written to {where(args.markdown)}")
    if getattr(args, "json", None) and args.command in ("show", "audit"):
        write_report_json(report, args.json, audit_json(audit_result, playbook) if audit_result else None)
        written.append(f"report written to {where(args.json)}")
    return written


def print_written(lines: list[str], console: Console) -> None:
    """The "... written to" lines of :func:`write_reports`, as plain text."""
    for line in lines:
        console.print(Text(visible(line)))


def _when(t: float | None) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_history(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe history``: the stored runs, newest first."""
    with open_store(args) as store:
        if args.prune:
            events, runs = store.prune(events_days=args.keep_events_days, runs_days=args.keep_runs_days)
            console.print(Text(f"pruned raw events of {events} chunk(s) and {runs} run(s)"))
        rows = store.runs(playbook=args.playbook, limit=args.last)
    if args.json:
        data = [r.__dict__ for r in rows]
        text = json.dumps(data, indent=1)
        if args.json == "-":
            print(text)
            return 0
        write_text_atomic(args.json, text + "\n")
    t = Table(title=Text(visible(f"fleetprobe history ({store.path})")), title_justify="left")
    for col in ("run", "playbook", "started", "took", "state", "hosts ok", "events", "audit", "raw events"):
        t.add_column(col, justify="right" if col in ("took", "events") else "left")
    for r in rows:
        took = f"{r.ended - r.started:.1f}s" if r.ended else "-"
        state = Text(visible(r.state), style={"killed": "red", "running": "yellow"}.get(r.state, ""))
        audit_text = {"pass": Text("pass", style="green"), "fail": Text("FAIL", style="red")}.get(r.audit or "",
                                                                                                 Text("-"))
        t.add_row(visible(r.run_id), Text(visible(r.playbook)), _when(r.started), took, state, f"{r.hosts_ok}/{r.hosts}",
                  str(r.events), audit_text, "kept" if r.has_events else "-")
    print_table(t, console, args.format)
    if not rows and args.format == "table":
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
            console.print(Text(visible(f"{n} raw events written to {where(args.events)}"
                                       + ("" if n else " (none stored, or dropped by retention)"))))
    written = write_reports(args, report, result)
    render_summary(report, console)
    if result is not None:
        print_audit(result, console)
    print_written(written, console)
    return 0


def print_findings(findings: list[Finding], console: Console, failing: set[int] | None = None) -> None:
    """One line per finding: severity, kind, message."""
    for i, f in enumerate(findings):
        sev = "FAIL" if failing is None and f.severity == "fail" or failing is not None and i in failing else "note"
        line = Text(f"  {sev:<4} ", style=_SEVERITY_STYLE["fail" if sev == "FAIL" else "note"])
        line.append(visible(f"{f.kind}: "), style="bold")
        line.append(visible(f.message))
        console.print(line, highlight=False)


def print_audit(result: AuditResult, console: Console) -> None:
    """The verdict line, the hosts that failed, and every finding."""
    base = f"against baseline run {result.baseline}" if result.baseline else "(no baseline run: rules only)"
    if result.passed:
        console.print(Text(f"audit PASSED {base}", style="bold green"))
    else:
        hosts = result.failed_hosts()
        console.print(Text(visible(f"audit FAILED {base}" + (f": {', '.join(hosts)}" if hosts else "")),
                           style="bold red"))
    print_grouped(result, console)


#: Per-host lines shown under a finding that holds for many hosts (the JSON has them all).
GROUP_DETAILS = 5


def print_grouped(result: AuditResult, console: Console) -> None:
    """Each finding once, with the hosts it holds for; a few hosts' own lines under it.

    Kinds, hosts and messages hold host text (probe names, values): each is shown through visible()."""
    for g in group_findings(result):
        sev = "FAIL" if g["fails"] else "note"
        line = Text(f"  {sev:<4} ", style=_SEVERITY_STYLE["fail" if g["fails"] else "note"])
        line.append(visible(f"{g['kind']}: "), style="bold")
        hosts: list[str] = g["hosts"]
        if len(hosts) <= 1:
            line.append(visible(g["details"][hosts[0]] if hosts else g["summary"]))
            console.print(line)
            continue
        line.append(visible(f"{g['summary']} on {len(hosts)} hosts: {', '.join(hosts[:20])}"
                            + (f" and {len(hosts) - 20} more" if len(hosts) > 20 else "")))
        console.print(line)
        for host in hosts[:GROUP_DETAILS]:
            console.print(Text(visible(f"         {g['details'][host]}")))
        if len(hosts) > GROUP_DETAILS:
            console.print(Text(f"         ... {len(hosts) - GROUP_DETAILS} more (all in --json)"))


def cmd_diff(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe diff A B``: what changed from run A to run B."""
    with open_store(args) as store:
        a, b = store.resolve(args.run_a), store.resolve(args.run_b)
        ra, rb = store.load_report(a), store.load_report(b)
    if ra.run.playbook != rb.run.playbook:
        console.print(Text.assemble(("note", "yellow"), visible(
            f": the runs ran different playbooks ({ra.run.playbook} and {rb.run.playbook}); "
            "only probes with the same name compare")))
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
    write_report_json(report, args.output)
    written = write_reports(args, report)
    render_summary(report, console)
    console.print(Text(visible(f"merged {len(args.reports)} report(s) ({len(report.hosts)} hosts) "
                               f"into {where(args.output)}")))
    print_written(written, console)
    return 0
