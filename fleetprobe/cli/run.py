"""Commands that talk to hosts: ``facts``, ``plan``, ``cleanup``, ``run`` and ``audit``.

Also :class:`RunExtras`, what ``run`` and ``audit`` do around a run: pick the shard and the
transport, keep each host's facts, store the run, and write the HTML and Markdown reports.

Audit exit statuses (for schedulers): 0 passed, 1 bad input or unusable store, 4 the audit failed
(a rule broke, a host could not be audited, or with ``--strict`` anything changed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleetprobe.adhoc import adhoc_playbook
from fleetprobe.audit import audit, audit_json, result_line
from fleetprobe.cli.history import print_audit, print_written
from fleetprobe.cli.options import Exit, _thresholds
from fleetprobe.cli.extras import RunExtras
from fleetprobe.cli.liveline import LiveLine
from fleetprobe.cluster import run_playbook_cluster  # imports Dask (the optional extra) only when called
from fleetprobe.discover import suggest_for_plans
from fleetprobe.kmod.plan import BuildGroup
from fleetprobe.outcome import HostOutcome
from fleetprobe.plan import HostPlan
from fleetprobe.render.prometheus import write_textfile
from fleetprobe.runner.channel import HostFacts
from fleetprobe.workers import run_playbook_workers
from fleetprobe.cli.output import (JOURNAL_ERR, JOURNAL_INFO, STDOUT, console_for, print_table, stdout_options,
                                   to_journal, where, write_report_json, write_text)
from fleetprobe.errors import InputError
from fleetprobe.render.aggplan import plan_json, plan_lines
from fleetprobe.inventory import Host, Inventory
from fleetprobe.render.safe import visible, visible_lines
from fleetprobe.playbook import Playbook
from fleetprobe.results import FleetReport
from fleetprobe.session import SSHOptions
from fleetprobe.inventory import load_inventory
from fleetprobe.settings import RunSettings
from fleetprobe.orchestrate import cleanup_fleet
from fleetprobe.orchestrate import facts_fleet
from fleetprobe.kmod.builds import plan_module_builds
from fleetprobe.orchestrate import plan_fleet
from fleetprobe.plan import group_of_instance, is_stale_instance
from fleetprobe.playbook import load_playbook, parse_playbook
from fleetprobe.render.live import LiveView
from fleetprobe.render.terminal import render_summary
from fleetprobe.shard import shard_inventory



def _settings(args: argparse.Namespace) -> RunSettings:
    """RunSettings from parsed options."""
    ssh_config: tuple[str, ...] | None = None
    if args.ssh_config is not None:
        ssh_config = tuple(c for c in args.ssh_config if c != "none")
    ssh = SSHOptions(known_hosts=tuple(args.known_hosts) or None, ssh_config=ssh_config,
                     identities=tuple(args.identity), accept_new_host_keys=args.accept_new_host_keys,
                     connect_timeout=args.connect_timeout, use_agent=not args.no_agent)
    return RunSettings(ssh=ssh, forks=args.forks, setup_timeout=args.setup_timeout,
                       duration=getattr(args, "duration", None), event_cap=getattr(args, "event_cap", None),
                       grace=getattr(args, "grace", 60), mount_tracefs=args.mount_tracefs,
                       allow_modules=getattr(args, "allow_modules", False),
                       buffer_kb=getattr(args, "buffer_kb", None), run_id=getattr(args, "run_id", None),
                       teardown_slack=getattr(args, "teardown_slack", 30),
                       build_at=getattr(args, "build_at", "auto"),
                       trusted_build_hosts=tuple(getattr(args, "trust_build_host", ())))


def _inventory(args: argparse.Namespace) -> Inventory:
    """The inventory, limited by --limit and --shard."""
    inv = load_inventory(args.inventory, reader=getattr(args, "inventory_reader", "builtin"))
    if args.inventory is None:
        args.inventory = inv.source  # what Ansible's defaults chose, for the report and the history
    return shard_inventory(inv.limit(args.limit), getattr(args, "shard", None))


def _raise_fd_limit() -> None:
    """One SSH connection per host: allow as many open files as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _write_json(path: str, data: Any, console: Console) -> None:
    """Write JSON to a file, or to stdout for '-' (people's text then goes to stderr: see cli.output)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _yes(v: bool) -> Text:
    return Text("yes", style="green") if v else Text("no", style="red")


def render_facts(results: list[HostFacts], console: Console, fmt: str = "table") -> None:
    """The facts table.  Every value a host reported is shown through visible(): it is the host's
    word (a kernel release of ``[/]`` or ``\x1b]0;...``), never markup or a terminal command."""
    t = Table(title="fleetprobe facts", title_justify="left")
    for col in ("host", "arch", "kernel", "tracefs", "kprobes", "uprobes", "lockdown", "modules",
                "clock", "leftovers"):
        t.add_column(col)
    for hf in results:
        f = hf.facts
        if f is None:
            t.add_row(Text(visible(hf.host.name)), Text("failed", style="red"),
                      Text(visible(hf.error.message if hf.error else "")), "", "", "", "", "", "", "")
            continue
        arch = visible(f.arch) + ("" if f.endian == "little" else " (be)")
        modules = (Text("disabled", style="red") if f.modules_disabled else
                   Text("build here" if f.can_build_modules else "load only"))
        clock = (f"{(hf.clock_offset or 0) * 1000:+.1f}±{(hf.clock_error or 0) * 1000:.1f}ms"
                 if hf.clock_offset is not None else "")
        t.add_row(Text(visible(hf.host.name)), Text(arch), Text(visible(f.kernel_release)),
                  Text(visible(f.tracefs)) if f.tracefs else Text("none", style="red"),
                  _yes(f.kprobe_events), _yes(f.uprobe_events), Text(visible(f.lockdown)), modules,
                  Text(clock), Text(visible(", ".join(f.leftovers) or "-")))
    print_table(t, console, fmt)
    failed = [hf for hf in results if hf.error]
    for hf in failed:
        # An error is fleetprobe's own text over several lines (message, evidence, hint): its line
        # breaks stay, every other non-printable is shown.
        console.print(Text.assemble((visible(hf.host.name), "red"), ": ", visible_lines(str(hf.error))))


def _line(*parts: str | tuple[str, str]) -> Text:
    """One output line of plain parts and (text, style) parts, every text made visible()."""
    return Text.assemble(*((visible(p[0]), p[1]) if isinstance(p, tuple) else visible(p) for p in parts))


def render_plans(results: list[tuple[HostFacts, HostPlan | None]], console: Console) -> None:
    """Per host: the exact lines a run would write, and what is skipped and why.

    Symbols, paths, releases and reasons come from the host's facts: each is shown
    through visible() in a Text, never as markup."""
    for hf, plan in results:
        if plan is None:
            console.print(Text.assemble((visible(hf.host.name), "bold"), ": ", ("cannot plan", "red"), ": ",
                                        visible_lines(str(hf.error))))
            continue
        f = hf.facts
        head = f"{f.arch} {f.kernel_release}" if f else ""
        console.print(_line((hf.host.name, "bold"), f" ({head}) group {plan.group}, instance {plan.instance}"))
        if plan.failed:
            console.print(_line("  ", ("fails", "red"), f": {plan.failed}"))
        for p in plan.probes:
            if p.definition:
                console.print(_line(f"  {p.events_file} >> {p.definition}"))
            elif p.kind == "module":
                params = " ".join(f"{k}={v}" for k, v in p.params)
                console.print(_line(f"  insmod {p.module} {params}"))
            elif p.stream:
                console.print(_line(f"  enable {p.event}"))
            if p.filter:
                console.print(_line(f"    filter: {p.filter}"))
            if p.framing.startswith("guarded"):
                fields = ", ".join(["comm", *p.guard])
                console.print(_line(f"    guard: events whose {fields} hold a newline are kept out, counted"))
        for line in plan_lines(plan):
            console.print(_line(f"  {line}"))
        for sp in plan.skipped:
            console.print(_line("  ", ("skip", "yellow"), f" {sp.name}: {sp.reason}"))
        for note in plan.notes:
            console.print(_line("  ", (f"note: {note}", "dim")))
        if not plan.failed and not plan.probes:
            console.print(_line("  ", ("places nothing", "red"),
                                ": every probe of the playbook is skipped on this host (reasons above)"))


def render_builds(groups: list[BuildGroup], console: Console) -> None:
    """Module build groups: one build per (arch, kernel release, module source), and where it happens."""
    if not groups:
        return
    console.print(_line(("module builds", "bold"), f" ({len(groups)}, one per arch, kernel release and module source)"))
    for g in groups:
        colour = "red" if g.where == "none" else "green"
        console.print(_line("  ", (g.describe(), colour)))
        console.print(_line(f"    hosts: {', '.join(g.hosts) or '-'}"))
        for host, why in g.blocked:
            console.print(_line(f"    {host} cannot load modules: {why}"))
        if g.where == "none" and g.hint:
            console.print(_line(f"    hint: {g.hint}"))


def _plan_json(results: list[tuple[HostFacts, HostPlan | None]]) -> list[dict[str, Any]]:
    """Plans as JSON."""
    out = []
    for hf, plan in results:
        item: dict[str, Any] = {"host": hf.host.name, "error": str(hf.error) if hf.error else None}
        if plan is not None:
            item.update({"group": plan.group, "instance": plan.instance, "failed": plan.failed,
                         "probes": [{"name": p.name, "kind": p.kind, "event": p.event, "file": p.events_file,
                                     "definition": p.definition, "filter": p.filter, "symbol": p.symbol,
                                     "framing": p.framing, "guard": list(p.guard)}
                                    for p in plan.probes],
                         "skipped": [{"name": s.name, "reason": s.reason} for s in plan.skipped],
                         "notes": list(plan.notes), "aggregates": plan_json(plan),
                         "places_nothing": not plan.failed and not plan.probes})
        out.append(item)
    return out


def exit_status(outcomes: list[HostOutcome], interrupted: bool) -> Exit:
    """0 all ok, 2 some failed, 3 none ok, 130 interrupted."""
    if interrupted:
        return Exit.INTERRUPTED
    ok = sum(1 for o in outcomes if o.status == "ok")
    bad = sum(1 for o in outcomes if o.status in ("failed", "unreachable"))
    if ok == 0:
        return Exit.NONE_OK
    return Exit.SOME_FAILED if bad else Exit.OK


def _read_playbook(args: argparse.Namespace) -> Playbook:
    """The playbook of the command line: ``-e`` expressions, ``-`` (stdin), a file or a shipped name.

    The text of an ad-hoc or stdin playbook is kept in ``args.playbook_text`` for the history store.
    """
    exprs: list[str] = getattr(args, "expressions", None) or []
    if exprs and args.playbook:
        raise InputError(f"give a playbook ({args.playbook!r}) or -e probes, not both", where="command line",
                         hint="put the extra probes in the playbook, or drop the playbook argument")
    if exprs:
        pb, args.playbook_text = adhoc_playbook(exprs)
        return pb
    if not args.playbook:
        raise InputError("no playbook given", where="command line",
                         hint=f"{args.command} PLAYBOOK.yml, a shipped name (opensnoop), '-' for stdin, "
                              "or -e 'kprobe:SYMBOL ...'")
    if args.playbook == STDOUT:
        if sys.stdin.isatty():
            raise InputError("'-' reads the playbook from stdin, which is a terminal", where="command line",
                             hint="pipe it in: cat playbook.yml | fleetprobe run - -i ...")
        args.playbook_text = sys.stdin.read()
        return parse_playbook(args.playbook_text, "<stdin>")
    return load_playbook(args.playbook)


def _load_playbook_checked(args: argparse.Namespace) -> Playbook:
    """Load and validate the playbook before any connection; refuse modules without consent."""
    pb = _read_playbook(args)
    if pb.needs_module_consent():
        pb.check_module_dirs()
        if args.command == "run" and not (pb.allow_modules or args.allow_modules):
            raise InputError("this playbook loads kernel modules, which can crash a host",
                             where=args.playbook,
                             hint="set allow_modules: true in the playbook or pass --allow-modules")
    return pb


async def _with_interrupt(coro_factory: Any) -> tuple[Any, bool]:
    """Run a coroutine with SIGINT/SIGTERM setting an 'interrupted' event (the 2nd one cancels)."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    task = asyncio.ensure_future(coro_factory(interrupted))

    def on_signal() -> None:
        if interrupted.is_set():
            task.cancel()
        interrupted.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        return await task, interrupted.is_set()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass


def cmd_facts(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe facts``."""
    inv = _inventory(args)
    results = asyncio.run(facts_fleet(inv.hosts, _settings(args)))
    if args.json:
        _write_json(args.json, [{"host": hf.host.name, "error": str(hf.error) if hf.error else None,
                                 "clock_offset": hf.clock_offset, "clock_error": hf.clock_error,
                                 "facts": hf.facts.to_json() if hf.facts else None} for hf in results], console)
    if args.json != "-":
        render_facts(results, console, args.format)
    ok = sum(1 for hf in results if hf.facts)
    return int(Exit.NONE_OK if ok == 0 else Exit.SOME_FAILED if ok < len(results) else Exit.OK)


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe plan``: facts + plan per host; writes nothing on any host."""
    pb = _load_playbook_checked(args)
    inv = _inventory(args)
    settings = _settings(args)

    async def plans() -> list[tuple[HostFacts, HostPlan | None]]:
        # A probe skipped for a name the host lacks gets near names from that host's own lists.
        return await suggest_for_plans(await plan_fleet(inv.hosts, pb, settings), pb, settings)

    results = asyncio.run(plans())
    builds = plan_module_builds(results, args.build_at, args.trust_build_host)
    if args.json:
        data = _plan_json(results)
        for item in data:
            item["builds"] = [g.describe() for g in builds
                              if item["host"] in g.hosts or item["host"] in dict(g.blocked)]
        _write_json(args.json, data, console)
    if args.json != "-":
        render_plans(results, console)
        render_builds(builds, console)
    # A host that would place nothing (every probe skipped) is not a host that plans well: a run
    # would connect, probe nothing and report zeros for it (issue 14). It counts as failed here.
    ok = sum(1 for _, p in results if p is not None and not p.failed and p.probes)
    return int(Exit.NONE_OK if ok == 0 else Exit.SOME_FAILED if ok < len(results) else Exit.OK)


def _stale(leftovers: list[str], grace: int, now: float) -> tuple[list[str], list[str]]:
    """Split what a host still holds after a sweep into (stale, live): live runs are kept on purpose."""
    live_groups = set()
    live: list[str] = []
    for item in leftovers:
        kind, _, name = item.partition(" ")
        if kind == "instance" and not is_stale_instance(name, now, grace):
            live.append(item)
            group = group_of_instance(name)
            if group:
                live_groups.add(group)
    stale = [x for x in leftovers if x not in live and not (x.startswith("group ") and x[6:] in live_groups)
             and not (x.startswith("synthetic ") and any(x[10:].startswith(g + "_") for g in live_groups))]
    return stale, [x for x in leftovers if x not in stale]


def cmd_cleanup(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe cleanup``: sweep leftovers of dead runs (all fleetprobe runs with --force)."""
    inv = _inventory(args)
    results = asyncio.run(cleanup_fleet(inv.hosts, _settings(args), force=args.force))
    t = Table(title="fleetprobe cleanup", title_justify="left")
    for col in ("host", "removed", "still there (stale)", "live runs (kept)", "error"):
        t.add_column(col)
    bad = 0
    for r in results:
        stale, live = _stale(r.remaining, args.grace, time.time())
        t.add_row(*(Text(visible(x)) for x in (r.host, ", ".join(r.removed) or "-", ", ".join(stale) or "-",
                                                ", ".join(live) or "-", r.error or "")))
        bad += bool(r.error or stale)
    print_table(t, console, args.format)
    return int(Exit.OK if bad == 0 else Exit.NONE_OK if bad == len(results) else Exit.SOME_FAILED)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe run``: probe, stream, merge, report."""
    pb = _load_playbook_checked(args)
    if not args.print and any(p.print_format for p in pb.probes) and not stdout_options(args):
        # A playbook that says how to print its events wants them printed (issue 14 item 3), unless
        # stdout already carries the command's data (--json -): then they stay in the report.
        args.print = True
        if console.file is sys.stdout:
            console = console_for(sys.stderr)  # people's text off stdout, as main() does for --print
    inv = _inventory(args)
    # Store, shard, transport, HTML/Markdown: see RunExtras.
    extras = RunExtras(args, pb)
    try:
        hosts = extras.hosts(inv)
        _raise_fd_limit()
        settings = extras.settings(_settings(args))
        names = [h.name for h in hosts]
        extras.begin()

        async def go(interrupted: asyncio.Event) -> FleetReport:
            extras.stop = interrupted.set

            async def over(observer: Any) -> FleetReport:
                return await _run_over(args, hosts, pb, settings, extras, observer, interrupted)

            # The live view only on a terminal, and not under --print (the events own the screen).
            if args.no_live or args.print or not console.is_terminal:
                return await over(LiveLine(names))
            with LiveView(console, names) as live:
                return await over(LiveLine(names, live))

        report, interrupted = asyncio.run(_with_interrupt(go))
        # Every machine output first (JSON, store, HTML, Markdown; the events file is already
        # written): the summary is rendered from host text, and a bug there must cost no data.
        written = []
        if args.json:
            write_report_json(report, args.json)
            written.append(f"report written to {where(args.json)}")
        if args.events and report.run.events_truncated:
            written.append(f"events TRUNCATED: {report.run.events_truncated}; "
                           f"{report.run.events_written} events kept in {where(args.events)}, the run went on")
        elif args.events:
            written.append(f"events written to {where(args.events)}")
        written += extras.finish(report)
        render_summary(report, console)
        print_written(written, console)
    finally:
        extras.close()
    if extras.reader_gone:
        # Ended because no one reads the events any more (| head): not an interrupt, and a host cut
        # short for it did not fail. (A Ctrl-C after it is not told apart: both end the run alike.)
        bad = sum(1 for o in report.hosts if o.status in ("failed", "unreachable"))
        return int(Exit.OK if bad == 0 else Exit.NONE_OK if bad == len(report.hosts) else Exit.SOME_FAILED)
    return int(exit_status(report.hosts, interrupted))


async def _run_over(args: argparse.Namespace, hosts: Sequence[Host], pb: Playbook, settings: RunSettings,
                    extras: RunExtras, observer: Any, interrupted: asyncio.Event) -> FleetReport:
    """The run of ``run`` and ``audit``: over the Dask cluster (``--cluster``) or worker processes.

    --events FILE, --events - and --print either way: over workers each writes its hosts' lines
    (whole, in each host's order) on the file or stdout the parent opened; over a cluster the tasks
    send them to this process, which writes them as they come."""
    if getattr(args, "cluster", None):
        return await run_playbook_cluster(hosts, pb, settings, scheduler=args.cluster, observer=observer,
                                          outputs=extras.outputs(), interrupted=interrupted,
                                          inventory=args.inventory, argv=sys.argv)
    return await run_playbook_workers(hosts, pb, settings, workers=args.workers, observer=observer,
                                      outputs=extras.outputs(), interrupted=interrupted,
                                      inventory=args.inventory, argv=sys.argv)


def _baseline_ref(args: argparse.Namespace, playbook: Playbook) -> str | None:
    """The pinned baseline: --baseline, else the playbook's ``baseline:`` (None: the previous run)."""
    return str(args.baseline) if args.baseline else playbook.baseline


def cmd_audit(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe audit``: run the playbook, store the run, judge it; exit 0 passed / 4 failed."""
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
            extras.stop = interrupted.set
            # Over workers or a cluster as `run` is: the verdict is judged here, on the one merged report, once.
            return await _run_over(args, hosts, pb, settings, extras, LiveLine(hosts_names), interrupted)

        hosts_names = [h.name for h in hosts]

        report, interrupted = asyncio.run(_with_interrupt(go))
        if baseline_id is None:
            baseline_id = extras.store.previous_run(pb.name, before=report.run.run_id)
        baseline = extras.store.load_report(baseline_id) if baseline_id else None
        result = audit(report, pb, baseline, thresholds, strict=args.strict)
        # Stored and written before anything is rendered (see cmd_run).
        written = extras.finish(report, result)
        extras.store.set_audit(report.run.run_id, result.passed, result.to_json())
        if args.prometheus:
            write_textfile(report, result, args.prometheus)
            written.append(f"Prometheus textfile written to {where(args.prometheus)}")
        render_summary(report, console)
        print_written(written, console)
    finally:
        extras.close()
    print_audit(result, console)
    line = visible(result_line(report, result))
    if to_journal(console.file):
        # Under the systemd unit: the verdict at priority err when failed, so that
        # `journalctl -p err -u fleetprobe-audit` lists exactly the failed audits.
        line = (JOURNAL_INFO if result.passed else JOURNAL_ERR) + line
    console.print(Text(line))
    if not result.passed and args.on_fail:
        _on_fail(args.on_fail, audit_json(result, pb), console)
    if interrupted:
        return int(Exit.INTERRUPTED)
    return int(Exit.OK if result.passed else Exit.AUDIT_FAILED)


#: How long an --on-fail command may take before it is killed (a hook must not hang a cron job).
ON_FAIL_TIMEOUT = 60.0


def _on_fail(command: str, verdict: dict[str, Any], console: Console) -> None:
    """Run ``command`` with ``sh -c``, the audit JSON on its stdin; say on stderr when it fails.

    The audit's own exit status (4) stands whatever the hook does: the hook notifies, it does not judge.
    """
    data = (json.dumps(verdict, indent=1) + "\n").encode()
    try:
        done = subprocess.run(["/bin/sh", "-c", command], input=data, timeout=ON_FAIL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        print(f"warning: --on-fail command did not finish in {ON_FAIL_TIMEOUT:g}s and was killed: {command}",
              file=sys.stderr)
        return
    except OSError as exc:
        print(f"warning: cannot run the --on-fail command {command!r}: {exc.strerror}", file=sys.stderr)
        return
    if done.returncode != 0:
        print(f"warning: --on-fail command exited {done.returncode}: {command}", file=sys.stderr)
    else:
        console.print(Text(visible(f"--on-fail command ran: {command}")))
