"""Commands for history, audits and shards: ``history``, ``show``, ``diff``, ``audit``, ``merge``.

Also :class:`RunExtras`, what ``run`` and ``audit`` do around a run: pick
the shard and the transport, keep each host's facts, store the run, and
write the HTML and Markdown reports.  The CLI calls :func:`add_parsers` and
:func:`run_command`; nothing here runs unless asked.

Audit exit statuses (for schedulers): 0 passed, 1 bad input or unusable
store, 4 the audit failed (a rule broke, a host could not be audited, or
with ``--strict`` anything changed), 130 interrupted.  ``diff`` exits 4
when the two runs differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetprobe.audit import AuditResult, Finding, Thresholds, audit, diff_reports
from fleetprobe.errors import InputError
from fleetprobe.facts import Facts
from fleetprobe.inventory import Host, Inventory
from fleetprobe.results import FleetReport
from fleetprobe.plan import new_run_id
from fleetprobe.playbook import Playbook
from fleetprobe.shard import Shard, parse_shard, select_hosts
from fleetprobe.store import DEFAULT_EVENTS_DAYS, Store, default_path

if TYPE_CHECKING:
    # rich is imported where something is rendered and the orchestrator (asyncssh) where a run
    # starts: `fleetprobe --help` builds these parsers and needs neither (issue 5).
    from rich.console import Console

    from fleetprobe.orchestrate import RunSettings

#: Exit status of an audit that ran and failed (distinct from the run statuses 0-3).
AUDIT_FAILED = 4
COMMANDS = ("history", "show", "diff", "audit", "merge")

_SEVERITY_STYLE = {"fail": "red", "note": "yellow"}


def _shard_arg(text: str) -> Shard:
    """argparse type for ``--shard i/N``."""
    try:
        return parse_shard(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_store_option(p: argparse.ArgumentParser, *, allow_none: bool) -> None:
    """``--store PATH`` (and ``--no-store`` where storing is optional)."""
    p.add_argument("--store", metavar="PATH",
                   help=f"history database (default {default_path()}, under $XDG_DATA_HOME)")
    if allow_none:
        p.add_argument("--no-store", action="store_true", help="do not record this run in the history")


def add_run_options(p: argparse.ArgumentParser, *, reports: bool = True) -> None:
    """Options ``run`` and ``audit`` share: HTML/Markdown reports (``reports``), transport, event retention."""
    if reports:
        p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report (charts, fleet timeline)")
        p.add_argument("--markdown", metavar="FILE", help="write a Markdown summary (for tickets)")
    p.add_argument("--transport", choices=("asyncssh", "fabric"), default="asyncssh",
                   help="SSH library (default asyncssh; fabric needs the 'fabric' extra)")
    p.add_argument("--keep-events-days", type=float, default=DEFAULT_EVENTS_DAYS, metavar="DAYS",
                   help=f"drop stored raw events older than this (default {DEFAULT_EVENTS_DAYS:g}; "
                        "reports are kept)")


def add_shard_option(p: argparse.ArgumentParser) -> None:
    """``--shard i/N``: this bastion's share of the inventory."""
    p.add_argument("--shard", type=_shard_arg, metavar="i/N",
                   help="probe only shard i of N (stable split by host name; merge the JSON reports)")


def add_parsers(sub: Any) -> None:
    """Add history, show, diff, audit and merge to the CLI's subparsers."""
    from fleetprobe.cli import _add_connection_options, _positive_int, parse_duration

    p = sub.add_parser("history", help="list stored runs (newest first)")
    add_store_option(p, allow_none=False)
    p.add_argument("--playbook", help="only runs of this playbook (its name)")
    p.add_argument("-n", "--limit", type=_positive_int, default=30, help="how many runs (default 30)")
    p.add_argument("--json", metavar="FILE", help="write the list as JSON ('-' for stdout)")
    p.add_argument("--prune", action="store_true", help="apply retention now (see --keep-*-days)")
    p.add_argument("--keep-events-days", type=float, default=DEFAULT_EVENTS_DAYS, metavar="DAYS",
                   help=f"with --prune: drop raw events older than this (default {DEFAULT_EVENTS_DAYS:g})")
    p.add_argument("--keep-runs-days", type=float, metavar="DAYS", help="with --prune: drop whole runs older than this")

    p = sub.add_parser("show", help="re-render a stored run (RUN: id, unique prefix, last or last~N)")
    p.add_argument("run")
    add_store_option(p, allow_none=False)
    _add_report_outputs(p)
    p.add_argument("--events", metavar="FILE", help="write the run's stored raw events as JSON lines")

    p = sub.add_parser("diff", help="what changed between two stored runs (exit 4 when anything did)")
    p.add_argument("run_a")
    p.add_argument("run_b")
    add_store_option(p, allow_none=False)
    _add_threshold_options(p)
    p.add_argument("--json", metavar="FILE", help="write the changes as JSON ('-' for stdout)")

    p = sub.add_parser("audit", help="run, store and judge a playbook against its rules and a baseline run")
    p.add_argument("playbook")
    _add_connection_options(p)
    add_shard_option(p)
    p.add_argument("-d", "--duration", type=parse_duration, help="how long to probe (default: the playbook's)")
    p.add_argument("--event-cap", type=_positive_int, help="events per host (default: the playbook's)")
    p.add_argument("--grace", type=int, default=60, help="seconds past the deadline before on-host cleanup")
    p.add_argument("--buffer-kb", type=_positive_int, help="per-CPU ring buffer of the run's instance")
    p.add_argument("--allow-modules", action="store_true", help="allow playbooks to load kernel modules")
    add_store_option(p, allow_none=False)
    p.add_argument("--baseline", metavar="RUN", help="compare with this stored run (default: the playbook's "
                   "'baseline:', else the previous run of the same playbook)")
    p.add_argument("--strict", action="store_true", help="any change from the baseline fails the audit")
    _add_threshold_options(p)
    _add_report_outputs(p)
    add_run_options(p, reports=False)
    p.add_argument("--events", metavar="FILE", help="also write every event as a JSON line")

    p = sub.add_parser("merge", help="combine shard JSON reports into the report of the whole fleet")
    p.add_argument("reports", nargs="+", metavar="REPORT.json")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="merged JSON report")
    p.add_argument("--html", metavar="FILE", help="also write the merged HTML report")
    p.add_argument("--markdown", metavar="FILE", help="also write the merged Markdown summary")


def _add_report_outputs(p: argparse.ArgumentParser) -> None:
    """--json/--html/--markdown for commands that render a report."""
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--markdown", metavar="FILE", help="write a Markdown summary")


def _add_threshold_options(p: argparse.ArgumentParser) -> None:
    """How large a change must be to count."""
    p.add_argument("--factor", type=float, default=Thresholds.factor,
                   help=f"hits on a host moved when they changed by this factor (default {Thresholds.factor:g})")
    p.add_argument("--min-count", type=int, default=Thresholds.min_count,
                   help=f"ignore count changes below this many hits (default {Thresholds.min_count})")
    p.add_argument("--value-field", action="append", metavar="FIELD",
                   help="report new values of this field (repeatable; default comm and string fields)")


def _thresholds(args: argparse.Namespace) -> Thresholds:
    """Thresholds from options."""
    if args.factor <= 1.0:
        raise InputError(f"--factor {args.factor:g} must be greater than 1", hint="e.g. --factor 2")
    return Thresholds(args.factor, args.min_count, tuple(args.value_field) if args.value_field else None)


def open_store(args: argparse.Namespace) -> Store:
    """The store named by ``--store`` (default path otherwise)."""
    return Store(getattr(args, "store", None) or None)


# --- what run and audit do around a run ----------------------------------------------------------

class RunExtras:
    """Around one run: the shard's hosts, the transport, facts per host, the store and the report files.

    Use: ``x = RunExtras(args, playbook)``; ``x.hosts(inv)``; ``x.settings(s)``;
    ``x.begin()`` before the run; ``x.finish(report, console)`` after it
    (and ``x.close()`` in ``finally``).
    """

    def __init__(self, args: argparse.Namespace, playbook: Playbook, *, store: bool | None = None) -> None:
        """Open the store now (before any host is touched) unless ``--no-store``."""
        self.args = args
        self.playbook = playbook
        keep = not getattr(args, "no_store", False) if store is None else store
        self.store: Store | None = open_store(args) if keep else None
        self.facts: dict[str, dict[str, Any]] = {}
        self.run_id = getattr(args, "run_id", None) or new_run_id()
        self._tmp_events: Path | None = None
        user_events = getattr(args, "events", None)
        if user_events:
            self.events_path: str | None = str(user_events)
        elif self.store is not None:
            _remove_stale_event_files(self.store.path.parent)
            # Raw events are streamed to a file next to the store, then compressed into it.
            fd, name = tempfile.mkstemp(prefix=f".events-{self.run_id}-", suffix=".jsonl",
                                        dir=self.store.path.parent)
            os.close(fd)
            self._tmp_events = Path(name)
            self.events_path = name
        else:
            self.events_path = None

    def hosts(self, inventory: Inventory) -> tuple[Host, ...]:
        """This shard's hosts (all of them without ``--shard``); an empty shard is an input error."""
        shard: Shard | None = getattr(self.args, "shard", None)
        hosts = select_hosts(inventory.hosts, shard)
        if not hosts:
            raise InputError(f"shard {shard} of this inventory has no hosts" if shard else "the inventory has no hosts",
                             where=str(getattr(self.args, "inventory", "")),
                             hint="use fewer shards than hosts" if shard else "check the inventory and --limit")
        return hosts

    def settings(self, settings: RunSettings) -> RunSettings:
        """The run's settings with this run id, the chosen transport, and facts collection."""
        connect = settings.connect
        if getattr(self.args, "transport", "asyncssh") == "fabric":
            from fleetprobe.connectors import fabric

            connect = fabric.connect
        return replace(settings, run_id=self.run_id, connect=connect, on_facts=self._on_facts)

    def _on_facts(self, host: str, facts: Facts) -> None:
        """Keep a host's facts for the store."""
        self.facts[host] = facts.to_json()

    def begin(self) -> None:
        """Record the run as started (a killed run then shows as ``killed`` in the history)."""
        if self.store is not None:
            self.store.begin_run(self.run_id, self.playbook.name, inventory_path=str(self.args.inventory))

    def finish(self, report: FleetReport, console: Console, audit_result: AuditResult | None = None) -> None:
        """Store the run, apply event retention, write the HTML/Markdown reports."""
        from rich.markup import escape

        if self.store is not None:
            self.store.save_run(report, playbook_text=_read_text(self.playbook.source),
                                inventory_text=_inventory_text(str(self.args.inventory)), facts=self.facts,
                                events_path=self.events_path if self.events_path and
                                Path(self.events_path).exists() else None)
            keep = getattr(self.args, "keep_events_days", DEFAULT_EVENTS_DAYS)
            self.store.prune(events_days=keep)
            console.print(f"run {report.run.run_id} stored in {escape(str(self.store.path))}", highlight=False)
        write_reports(self.args, report, console, audit_result)

    def close(self) -> None:
        """Remove the temporary events file and close the store."""
        if self._tmp_events is not None:
            self._tmp_events.unlink(missing_ok=True)
        if self.store is not None:
            self.store.close()


#: A temporary events file older than this belongs to a run that was killed (no run lasts this long).
STALE_EVENTS_SECONDS = 2 * 86400


def _remove_stale_event_files(folder: Path) -> None:
    """Delete temporary raw-event files that killed runs left next to the store."""
    cutoff = time.time() - STALE_EVENTS_SECONDS
    for path in folder.glob(".events-*.jsonl"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass  # another audit removed it first


def _read_text(path: str) -> str | None:
    """A file's text, or None when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _inventory_text(spec: str) -> str:
    """The inventory as it was: the file's text, or the ad-hoc host list itself."""
    text = _read_text(spec) if os.path.isfile(spec) else None
    return text if text is not None else spec


def write_reports(args: argparse.Namespace, report: FleetReport, console: Console,
                  audit_result: AuditResult | None = None) -> None:
    """Write --html / --markdown (and --json where the command has it) for a report."""
    from rich.markup import escape

    from fleetprobe.render.html import write_html
    from fleetprobe.render.markdown import write_markdown
    from fleetprobe.results import write_json

    if getattr(args, "html", None):
        write_html(report, args.html, audit_result)
        console.print(f"HTML report written to {escape(args.html)}", highlight=False)
    if getattr(args, "markdown", None):
        write_markdown(report, args.markdown, audit_result)
        console.print(f"Markdown summary written to {escape(args.markdown)}", highlight=False)
    if getattr(args, "json", None) and args.command in ("show", "audit"):
        write_json(report, args.json)
        console.print(f"report written to {escape(args.json)}", highlight=False)


# --- commands ---------------------------------------------------------------------------------------

def run_command(args: argparse.Namespace, console: Console) -> int | None:
    """Run one of :data:`COMMANDS`; None when ``args.command`` is not one of them."""
    handlers = {"history": cmd_history, "show": cmd_show, "diff": cmd_diff, "audit": cmd_audit,
                "merge": cmd_merge}
    handler = handlers.get(args.command)
    return None if handler is None else handler(args, console)


def _when(t: float | None) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_history(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe history``: the stored runs, newest first."""
    from rich.markup import escape
    from rich.table import Table

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
        Path(args.json).write_text(text + "\n")
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
    from rich.markup import escape

    from fleetprobe.render.terminal import render_summary

    with open_store(args) as store:
        run_id = store.resolve(args.run)
        report = store.load_report(run_id)
        stored = store.audit_result(run_id)
        result = AuditResult.from_json(stored) if stored else None
        if args.events:
            n = 0
            with open(args.events, "w", encoding="utf-8") as f:
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
    from rich.text import Text

    for i, f in enumerate(findings):
        sev = "FAIL" if failing is None and f.severity == "fail" or failing is not None and i in failing else "note"
        line = Text(f"  {sev:<4} ", style=_SEVERITY_STYLE["fail" if sev == "FAIL" else "note"])
        line.append(f"{f.kind}: ", style="bold")
        line.append(f.message)
        console.print(line, highlight=False)


def print_audit(result: AuditResult, console: Console) -> None:
    """The verdict line, the hosts that failed, and every finding."""
    from rich.text import Text

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
    from rich.markup import escape
    from rich.text import Text

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
            Path(args.json).write_text(text + "\n")
    if args.json != "-":
        console.print(Text(f"changes from run {a} to run {b}: {len(findings) or 'none'}", style="bold"))
        print_findings(findings, console)
    return AUDIT_FAILED if findings else 0


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe merge A.json B.json -o merged.json``."""
    from rich.markup import escape

    from fleetprobe.render.terminal import render_summary
    from fleetprobe.results import write_json
    from fleetprobe.shard import merge_files

    report = merge_files(args.reports)
    write_json(report, args.output)
    render_summary(report, console)
    console.print(f"merged {len(args.reports)} report(s) ({len(report.hosts)} hosts) into {escape(args.output)}",
                  highlight=False)
    write_reports(args, report, console)
    return 0


def _baseline_ref(args: argparse.Namespace, playbook: Playbook) -> str | None:
    """The pinned baseline: --baseline, else the playbook's ``baseline:`` (None: the previous run)."""
    return str(args.baseline) if args.baseline else playbook.baseline


def cmd_audit(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe audit``: run the playbook, store the run, judge it; exit 0 passed / 4 failed."""
    from fleetprobe.cli import _inventory, _load_playbook_checked, _raise_fd_limit, _settings, _with_interrupt
    from fleetprobe.orchestrate import run_playbook
    from fleetprobe.render.terminal import render_summary

    args.run_id = None
    pb = _load_playbook_checked(args)
    thresholds = _thresholds(args)
    inv = _inventory(args)
    extras = RunExtras(args, pb, store=True)
    try:
        assert extras.store is not None
        pinned = _baseline_ref(args, pb)
        # Resolve a pinned baseline before touching any host: a typo must not cost a run.
        baseline_id = extras.store.resolve(pinned) if pinned else None
        hosts = extras.hosts(inv)
        settings = extras.settings(_settings(args))
        _raise_fd_limit()
        extras.begin()

        async def go(interrupted: asyncio.Event) -> FleetReport:
            return await run_playbook(hosts, pb, settings, events_path=extras.events_path, interrupted=interrupted,
                                      inventory=args.inventory, argv=sys.argv)

        report, interrupted = asyncio.run(_with_interrupt(go))
        if baseline_id is None:
            baseline_id = extras.store.previous_run(pb.name, before=report.run.run_id)
        baseline = extras.store.load_report(baseline_id) if baseline_id else None
        result = audit(report, pb, baseline, thresholds, strict=args.strict)
        render_summary(report, console)
        extras.finish(report, console, result)
        extras.store.set_audit(report.run.run_id, result.passed, result.to_json())
    finally:
        extras.close()
    print_audit(result, console)
    if interrupted:
        return 130
    return 0 if result.passed else AUDIT_FAILED
