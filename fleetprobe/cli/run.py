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
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleetprobe.adhoc import adhoc_playbook
from fleetprobe.audit import AuditResult, audit, audit_json, result_line
from fleetprobe.cli.history import open_store, print_audit, print_written, write_reports
from fleetprobe.cli.options import Exit, _thresholds
from fleetprobe.cli.eventformat import FormatPrinter
from fleetprobe.cli.output import (JOURNAL_ERR, JOURNAL_INFO, STDOUT, console_for, print_table, stdout_options,
                                   to_journal, where, write_report_json, write_text)
from fleetprobe.events import EventWriter
from fleetprobe.errors import InputError
from fleetprobe.facts import Facts
from fleetprobe.hist import AggProgress, plan_json, plan_lines
from fleetprobe.inventory import Host, Inventory
from fleetprobe.plan import new_run_id
from fleetprobe.render.safe import visible, visible_lines
from fleetprobe.playbook import Playbook
from fleetprobe.results import FleetReport
from fleetprobe.shard import Shard, select_hosts
from fleetprobe.store import DEFAULT_EVENTS_DAYS, Store
from fleetprobe.session import SSHOptions
from fleetprobe.inventory import load_inventory
from fleetprobe.settings import RunSettings
from fleetprobe.orchestrate import cleanup_fleet
from fleetprobe.orchestrate import facts_fleet
from fleetprobe.kmod.builds import plan_module_builds
from fleetprobe.orchestrate import plan_fleet
from fleetprobe.orchestrate import run_playbook
from fleetprobe.plan import group_of_instance, is_stale_instance
from fleetprobe.playbook import load_playbook, parse_playbook
from fleetprobe.render.eventlines import EventPrinter, Tee
from fleetprobe.render.live import LiveView
from fleetprobe.render.terminal import render_summary
from fleetprobe.shard import shard_inventory

if TYPE_CHECKING:
    from fleetprobe.kmod.plan import BuildGroup
    from fleetprobe.parse import EventSink
    from fleetprobe.runner.channel import HostFacts
    from fleetprobe.settings import RunSettings
    from fleetprobe.outcome import HostOutcome
    from fleetprobe.plan import HostPlan


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
        from fleetprobe.discover import suggest_for_plans

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
            from fleetprobe.workers import run_playbook_workers  # --workers: slices over processes, one report

            async def over(observer: Any) -> FleetReport:
                if args.cluster:
                    from fleetprobe.cluster import run_playbook_cluster  # Dask: the optional extra

                    return await run_playbook_cluster(hosts, pb, settings, scheduler=args.cluster,
                                                      observer=observer, events_path=extras.events_path,
                                                      interrupted=interrupted, inventory=args.inventory,
                                                      argv=sys.argv)
                ev = extras.event_args()
                if "events" in ev:
                    # --print / --events -: the events stream through this process as they come, so
                    # the run is on this process's loop (workers write theirs to files).
                    return await run_playbook(hosts, pb, settings, observer=observer, interrupted=interrupted,
                                              inventory=args.inventory, argv=sys.argv, **ev)
                return await run_playbook_workers(hosts, pb, settings, workers=args.workers, observer=observer,
                                                  events_path=ev["events_path"], interrupted=interrupted,
                                                  inventory=args.inventory, argv=sys.argv)

            # The live view only on a terminal, and not under --print (the events own the screen).
            if args.no_live or args.print or not console.is_terminal:
                return await over(LiveLine(names))
            with LiveView(console, names) as live:
                return await over(LiveLine(names, live))

        report, interrupted = asyncio.run(_with_interrupt(go))
        extras.events_done(report)
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


# --- what run and audit do around a run ----------------------------------------------------------

class RunExtras:
    """Around one run: the shard's hosts, the transport, facts per host, the store and the report files.

    Use: ``x = RunExtras(args, playbook)``; ``x.hosts(inv)``; ``x.settings(s)``;
    ``x.begin()`` before the run; ``x.finish(report)`` after it, before anything is rendered
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
        #: Sinks besides the events file: the JSON lines of ``--events -`` and ``--print``'s lines.
        self.sinks: list[EventSink] = []
        #: The writer of ``--events -`` (its counts go into the report, as a file's do).
        self._stdout_writer: EventWriter | None = None
        #: Set once the reader of stdout went away (``--print | head``): the run was ended for it.
        self.reader_gone = False
        #: Ends the run (the run's interrupted event's set(), once the run started).
        self.stop: Callable[[], None] | None = None
        if user_events == STDOUT:
            # Its own sink, not events_path: the store still gets the events through its temporary file.
            self._stdout_writer = EventWriter(STDOUT, on_closed=self._stdout_closed)
            self.sinks.append(self._stdout_writer)
            user_events = None
        if getattr(args, "print", False):
            formats = {p.name: p.print_format for p in playbook.probes if p.print_format is not None}
            names = [p.name for p in playbook.probes]
            # The playbook's print: formats where it has them (the plain printer's fast path otherwise).
            self.sinks.append(FormatPrinter(sys.stdout, formats, probes=names, on_closed=self._stdout_closed)
                              if formats else EventPrinter(sys.stdout, probes=names, on_closed=self._stdout_closed))
        self._file_writer: EventWriter | None = None
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

    def _stdout_closed(self) -> None:
        """The reader of stdout is gone (``| head``): end the run on every host as a Ctrl-C would.
        Events no one reads are not worth probing for, and no host failed for it."""
        if not self.reader_gone:
            self.reader_gone = True
            print("stdout was closed by its reader: probing stopped on every host", file=sys.stderr, flush=True)
            if self.stop is not None:
                self.stop()

    def event_args(self) -> dict[str, Any]:
        """run_playbook's keyword for the raw events: the events file alone, or every sink at once."""
        if not self.sinks:
            return {"events_path": self.events_path}
        sinks = list(self.sinks)
        if self.events_path:
            self._file_writer = EventWriter(self.events_path)
            sinks.insert(0, self._file_writer)
        return {"events": sinks[0] if len(sinks) == 1 else Tee(*sinks)}

    def events_done(self, report: FleetReport) -> None:
        """After the run: close the writers this object made, and put the user's events destination's
        counts in the report (run_playbook does that itself for the events file alone)."""
        if not self.sinks:
            return
        for w in (self._file_writer, self._stdout_writer):
            if w is not None:
                w.close()
        user = self._stdout_writer or self._file_writer
        if user is not None:
            report.run.events_written = user.written
            report.run.events_truncated = user.error

    def hosts(self, inventory: Inventory) -> tuple[Host, ...]:
        """This shard's hosts (all of them without ``--shard``); an empty shard is an input error."""
        shard: Shard | None = getattr(self.args, "shard", None)
        hosts = select_hosts(inventory.hosts, shard)
        for sink in self.sinks:
            if isinstance(sink, EventPrinter):
                sink.align_hosts([h.name for h in hosts])
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

    def finish(self, report: FleetReport, audit_result: AuditResult | None = None) -> list[str]:
        """Store the run, apply event retention, write the HTML/Markdown reports; print nothing.

        Returns the lines saying what was written, to print after the summary."""
        written: list[str] = []
        if self.store is not None:
            text = getattr(self.args, "playbook_text", None) or _read_text(self.playbook.source)
            self.store.save_run(report, playbook_text=text,
                                inventory_text=_inventory_text(str(self.args.inventory)), facts=self.facts,
                                events_path=self.events_path if self.events_path and
                                Path(self.events_path).exists() else None)
            keep = getattr(self.args, "keep_events_days", DEFAULT_EVENTS_DAYS)
            self.store.prune(events_days=keep)
            written.append(f"run {report.run.run_id} stored in {self.store.path}")
        return written + write_reports(self.args, report, audit_result, self.playbook)

    def close(self) -> None:
        """Close the event writers, remove the temporary events file and close the store."""
        for w in (self._file_writer, self._stdout_writer):
            if w is not None:
                w.close()
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
            return await run_playbook(hosts, pb, settings, interrupted=interrupted, observer=LiveLine(hosts_names),
                                      inventory=args.inventory, argv=sys.argv, **extras.event_args())

        hosts_names = [h.name for h in hosts]

        report, interrupted = asyncio.run(_with_interrupt(go))
        extras.events_done(report)
        if baseline_id is None:
            baseline_id = extras.store.previous_run(pb.name, before=report.run.run_id)
        baseline = extras.store.load_report(baseline_id) if baseline_id else None
        result = audit(report, pb, baseline, thresholds, strict=args.strict)
        # Stored and written before anything is rendered (see cmd_run).
        written = extras.finish(report, result)
        extras.store.set_audit(report.run.run_id, result.passed, result.to_json())
        if args.prometheus:
            from fleetprobe.render.prometheus import write_textfile

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


class LiveLine:
    """An Observer: "N probes live on M hosts" on stderr once every host has its probes in place or ended.

    bpftrace says ``Attaching N probes...``: a user needs to know when to start the workload, and
    a script piping stdout must still see it (stderr).  Wraps the live view when there is one.
    """

    #: States after which a host will place no probe.
    ENDED = frozenset({"done", "skipped", "failed", "unreachable", "interrupted"})

    def __init__(self, hosts: list[str], inner: LiveView | None = None) -> None:
        """Watch ``hosts``; pass states and counts on to ``inner``."""
        self.hosts = set(hosts)
        self.inner = inner
        self.live: dict[str, int] = {}
        self.ended: set[str] = set()
        self.said = False

    def set_state(self, host: str, state: str, detail: str = "") -> None:
        """A host's state changed."""
        if self.inner is not None:
            self.inner.set_state(host, state, detail)
        if state in self.ENDED and host not in self.live:
            self.ended.add(host)
            self._maybe_say()

    def add_events(self, host: str, n: int) -> None:
        """Events arrived (the live view counts them)."""
        if self.inner is not None:
            self.inner.add_events(host, n)

    def set_aggregates(self, host: str, progress: tuple[AggProgress, ...]) -> None:
        """A host's aggregate tables so far (the live view shows them)."""
        if self.inner is not None:
            self.inner.set_aggregates(host, progress)

    def probes_live(self, host: str, n: int) -> None:
        """The runner on ``host`` placed its ``n`` probes."""
        self.live[host] = n
        self._maybe_say()

    def _maybe_say(self) -> None:
        """Say it once, when no host is still setting up."""
        if self.said or not self.live or len(self.live) + len(self.ended - set(self.live)) < len(self.hosts):
            return
        self.said = True
        n = sum(self.live.values())
        rest = len(self.hosts) - len(self.live)
        print(f"{n} probe{'s' if n != 1 else ''} live on {len(self.live)} host{'s' if len(self.live) != 1 else ''}"
              + (f" ({rest} host{'s' if rest != 1 else ''} not probing)" if rest else "")
              + "; Ctrl-C to stop", file=sys.stderr, flush=True)
