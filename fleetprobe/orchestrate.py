"""Orchestrate: wire the stages for every host, at once.

    inventory -> connect -> facts -> plan -> run on host -> parse -> merge

Fan-out is bounded where it costs CPU (connect, facts, plan: ``forks`` at a
time) and not where it only waits (the probe phase: every host probes at
once, over the one connection opened for it).  Every phase has a deadline;
one host that hangs, drops or fails is recorded in its HostOutcome and never
stalls or fails the others.  Teardown always runs: on the host by the runner
itself, with the controller's part in ``finally`` blocks.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import traceback
from types import TracebackType
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from .clock import ClockMap
from .errors import FleetprobeError, HostError, TransportError
from .events import EventWriter
from .facts import Facts
from .aggstream import StreamTables, StreamTap, stream_progress
from .aggtables import AggResults, final_progress
from .histread import add_host_tables
from .inventory import Host
from .kmsg import KmsgCollector, MarkerSplitter
from .merge import FleetAggregate
from .results import FleetReport, RunInfo
from .version import __version__
from .outcome import HostOutcome, LossCounters, Stage, Status
from .parse import EventBatch, EventSink, LineSink, TraceStream
from .traceline import TraceEvent, control_prefix
from .plan import HostPlan, host_framing, new_run_id, new_seal, plan_host, with_later_deadline
from .playbook import Playbook
from .runner.runner import (ModuleLoad, RunnerReport, clock_sample, plan_directives, sweep_directives)
from .session import Session, put_private
from .ingest import _HostCap
from .kmod.builds import ModuleBuilds, _MODULE_WORD, _module_cache, load_name
from .runner.channel import HEARTBEAT_TIMEOUT, TICK_SECONDS, HostFacts, RunnerChannel, _oopses_since, _runner_once, _teardown_for_dead_runner, gather_facts, runner_silent, start_runner
from .kmod.plan import module_load_blocker
from .settings import NullObserver, Observer, RunSettings
from .uprobes import ElfOffsets

T = TypeVar("T")

@dataclass
class FleetRun:
    """Shared state of one run across its hosts."""

    playbook: Playbook
    settings: RunSettings
    aggregate: LineSink
    on_event: Callable[[TraceEvent], None] | None
    observer: Observer
    run_id: str
    interrupted: asyncio.Event
    setup_slots: asyncio.Semaphore
    elf_offsets: ElfOffsets = field(default_factory=ElfOffsets)
    plans: dict[str, HostPlan] = field(default_factory=dict)
    modules: ModuleBuilds = field(default_factory=ModuleBuilds)
    #: The raw-event file (takes whole batches of rows; ``on_event`` gets TraceEvents instead).
    events: EventSink | None = None
    #: Hosts still connecting/gathering facts/planning; ``everyone_set_up`` is set when none is.
    in_setup: int = 0
    everyone_set_up: asyncio.Event = field(default_factory=asyncio.Event)

    def setup_over(self) -> None:
        """One host left its setup (planned, failed or interrupted)."""
        self.in_setup -= 1
        if self.in_setup <= 0:
            self.everyone_set_up.set()

    @property
    def duration(self) -> float:
        return self.settings.duration if self.settings.duration is not None else self.playbook.duration

    @property
    def event_cap(self) -> int:
        return self.settings.event_cap if self.settings.event_cap is not None else self.playbook.event_cap


async def run_fleet(hosts: Iterable[Host], playbook: Playbook, settings: RunSettings, aggregate: LineSink, *,
                    on_event: Callable[[TraceEvent], None] | None = None,
                    events: EventSink | None = None,
                    observer: Observer | None = None,
                    interrupted: asyncio.Event | None = None,
                    on_outcome: Callable[[HostOutcome], None] | None = None) -> list[HostOutcome]:
    """Probe every host with the playbook; one HostOutcome per host, in inventory order.

    Events go to ``aggregate.add_line`` as they arrive and, when given, to
    ``on_event`` as parsed TraceEvents, or to ``events`` (the raw-event file, see
    events.EventWriter) as the rows the kernel printed: one of the two, not both.
    ``on_outcome`` gets each host's outcome as soon as that host is over (a worker
    process sends the host's results to its parent then, see fleetprobe.workers).
    """
    if on_event is not None and events is not None:
        raise ValueError("run_fleet: pass on_event or events, not both")
    hosts = list(hosts)
    fr = FleetRun(playbook=playbook, settings=settings, aggregate=aggregate, on_event=on_event, events=events,
                  observer=observer or NullObserver(),
                  run_id=settings.run_id or new_run_id(), interrupted=interrupted or asyncio.Event(),
                  setup_slots=asyncio.Semaphore(max(1, settings.forks)),
                  modules=ModuleBuilds(settings.build_at, _module_cache(settings.module_cache),
                                       trusted=settings.trusted_build_hosts),
                  in_setup=len(hosts))
    if not hosts:
        fr.everyone_set_up.set()
    if on_outcome is None:
        return list(await asyncio.gather(*(_run_host(fr, h) for h in hosts)))
    tell = on_outcome

    async def one(host: Host) -> HostOutcome:
        out = await _run_host(fr, host)
        tell(out)
        return out

    return list(await asyncio.gather(*(one(h) for h in hosts)))


@dataclass
class _SetUp:
    """A host ready to probe: its connection, its runner waiting for the plan, its facts and plan."""

    session: Session
    runner: RunnerChannel
    facts: Facts
    plan: HostPlan


async def _setup(fr: FleetRun, host: Host, out: HostOutcome) -> _SetUp | None:
    """Connect, start the runner for facts and plan (bounded by ``forks``); None when the host ends here."""
    s = fr.settings
    obs = fr.observer
    async with fr.setup_slots:
        if fr.interrupted.is_set():
            out.status, out.reason = Status.INTERRUPTED, "interrupted before connecting"
            return None
        # Timed from the slot on: a host that waited for one (a fleet larger than --forks, many
        # workers) is not slow.
        async with asyncio.timeout(s.setup_timeout * 2):
            obs.set_state(host.name, "connecting")
            session = await s.open_session(host)
            runner: RunnerChannel | None = None
            try:
                out.stage = Stage.FACTS
                obs.set_state(host.name, "facts")
                runner, facts, offset, error = await start_runner(session, fr.playbook, mount=s.mount_tracefs,
                                                                  timeout=s.setup_timeout)
                out.arch, out.kernel_release, out.boot_id = facts.arch, facts.kernel_release, facts.boot_id
                out.clock_offset, out.clock_error = offset, error
                if s.on_facts is not None:
                    s.on_facts(host.name, facts)
                out.stage = Stage.PLAN
                obs.set_state(host.name, "planning")
                offsets = await fr.elf_offsets.resolve(session, facts, fr.playbook.uprobe_targets())
                deadline = s.deadline(offset, fr.duration)
                # Per host and run, like the control lines' secret: the seal ends every line of a sealed probe.
                plan = plan_host(fr.playbook, facts, run_id=fr.run_id, deadline=deadline, uprobe_offsets=offsets,
                                 duration=fr.duration, seal=new_seal())
            except BaseException:
                if runner is not None:
                    runner.stream.close()
                await session.close()
                raise
    fr.plans[host.name] = plan
    return _SetUp(session, runner, facts, plan)


async def _run_host(fr: FleetRun, host: Host) -> HostOutcome:
    """One host's whole run; never raises (a failure is recorded in the outcome)."""
    out = HostOutcome(host=host.name, started=time.time())
    obs = fr.observer
    session: Session | None = None
    runner: RunnerChannel | None = None
    set_up = False
    try:
        try:
            setup = await _setup(fr, host, out)
        except TimeoutError:
            raise HostError(host.name, out.stage, f"no answer within {fr.settings.setup_timeout * 2:.0f}s",
                            hint="the host is slow or hung; raise --setup-timeout") from None
        finally:
            # Synchronously after the setup: a host that will build registers its build before
            # hosts waiting for "everyone set up" look for one.
            set_up = True
            fr.setup_over()
        if setup is None:
            return out
        session, runner, facts, plan = setup.session, setup.runner, setup.facts, setup.plan
        out.skipped_probes = {sp.name: sp.reason for sp in plan.skipped}
        if fr.playbook.needs_module_consent() and (blocker := module_load_blocker(facts)):
            # A module playbook on a host that can never load one is a failure, not a quiet skip.
            out.stage = Stage.BUILD
            raise HostError(host.name, "build", f"cannot load kernel modules: {blocker}",
                            hint="run tracefs probes on this host instead (drop it from the module playbook)")
        if plan.failed:
            out.status, out.reason = Status.FAILED, plan.failed
            obs.set_state(host.name, "failed", plan.failed)
            return out
        if not plan.probes:
            out.status = Status.SKIPPED
            out.reason = "no probe can be placed: " + "; ".join(f"{k}: {v}" for k, v in out.skipped_probes.items())
            obs.set_state(host.name, "skipped", out.reason)
            return out
        if facts.tracefs is None:
            raise HostError(host.name, "plan", "tracefs is not mounted",
                            hint="mount it (mount -t tracefs nodev /sys/kernel/tracing) or pass --mount-tracefs")
        loads: tuple[ModuleLoad, ...] = ()
        if any(p.kind == "module" for p in plan.probes):
            out.stage = Stage.BUILD
            obs.set_state(host.name, "building")
            loads = await _prepare_modules(fr, session, facts, plan, out)
        out.stage = Stage.PROBE
        obs.set_state(host.name, "probing")
        # After a long build the planned deadline may be near: probes get the whole duration.
        plan = fr.plans[host.name] = with_later_deadline(
            plan, fr.settings.deadline(out.clock_offset or 0.0, fr.duration))
        probe_runner, runner = runner, None
        await _probe(fr, session, probe_runner, facts, plan, out, loads)
    except HostError as exc:
        out.status = Status.UNREACHABLE if isinstance(exc, TransportError) and exc.stage == "connect" else Status.FAILED
        if isinstance(exc, TransportError) and out.stage == "probe":
            out.status = Status.FAILED
        out.stage = exc.stage if out.stage in ("connect",) else out.stage
        out.reason = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        out.evidence = exc.evidence or ""
        obs.set_state(host.name, out.status, exc.message)
    except asyncio.CancelledError:
        out.status, out.reason = Status.INTERRUPTED, "cancelled"
        raise
    except Exception as exc:  # noqa: BLE001 - one host's bug must never end the whole run
        out.status, out.reason = Status.FAILED, f"internal error: {type(exc).__name__}: {exc}"
        out.evidence = traceback.format_exc()[-2000:]
        obs.set_state(host.name, "failed", out.reason)
    finally:
        if not set_up:
            fr.setup_over()
        out.ended = time.time()
        if runner is not None:
            # Planned nothing to probe here: EOF before "go" ends the waiting runner quietly.
            runner.stream.write_eof()
            runner.stream.close()
        if session is not None:
            try:
                async with asyncio.timeout(5):
                    await session.close()
            except (TimeoutError, OSError):
                pass
    return out


async def _prepare_modules(fr: FleetRun, session: Session, facts: Facts, plan: HostPlan,
                           out: HostOutcome) -> tuple[ModuleLoad, ...]:
    """Build (once per group), check and copy this host's modules; what the runner must insmod.

    Each failure is this host's HostError with the compiler's or kernel's words:
    no build tree or compiler, a build error, a vermagic mismatch.
    """
    # The builder (kmod.compile, kmod.debian) and the .ko reader load only for module playbooks:
    # a tracefs run, `facts` and `cleanup` never need them (start-up cost, issue 5).
    from .kmod.deploy import verify_on_host
    from .kmod.ko import with_module_name

    host = session.host.name
    loads: list[ModuleLoad] = []
    for p in plan.probes:
        if p.kind != "module" or not p.module:
            continue
        try:
            source = fr.modules.source(p.module)
        except FleetprobeError as exc:
            raise HostError(host, "build", exc.message, hint=exc.hint) from None
        params = (("run", fr.run_id), ("probe", p.name)) + tuple(p.params)
        for k, v in params:
            if not (_MODULE_WORD.fullmatch(k) and _MODULE_WORD.fullmatch(v)):
                raise HostError(host, "build", f"probe {p.name!r}: module parameter {k}={v!r} is not "
                                "letters, digits and _ . + -", hint="rename the probe or fix the parameter")
        module = await fr.modules.module_for(facts, source, fr.everyone_set_up, session)
        problem = await verify_on_host(session, host, module, facts.kernel_release)
        if problem is not None:
            raise problem
        # The kernel holds one module per name: each load gets the run's, host's and probe's
        # (two operators, two probes of one module, a module stuck by an oops never collide).
        # The .ko goes to a fresh private directory (see put_private); the runner checks it is still
        # what we wrote, loads it and deletes it right after insmod.
        name = load_name(plan.group, p.name)
        remote = f"/tmp/{name}.mod.*/{name}.ko"
        try:
            ko = with_module_name(module.data(), name, name=str(module.path))
        except ValueError as exc:  # ElfFormatError too: a .ko fleetprobe cannot rename
            raise HostError(host, "build", f"cannot give {source.name}.ko its run's name {name}: {exc}",
                            hint="is the module built by the kernel's Kbuild (a struct module in "
                                 ".gnu.linkonce.this_module)?") from None
        try:
            remote = await put_private(session, ko, name)
        except HostError as exc:
            raise HostError(host, "build", f"cannot copy {source.name}.ko to {remote}: {exc.message}",
                            evidence=exc.evidence) from None
        out.placed_probes[p.name] = fr.modules.describe(module) + f" as {name}"
        loads.append(ModuleLoad(name, remote, params, source.name))
    return tuple(loads)


async def _probe(fr: FleetRun, session: Session, runner: RunnerChannel, facts: Facts, plan: HostPlan,
                 out: HostOutcome, modules: tuple[ModuleLoad, ...] = ()) -> None:
    """Send the waiting runner its plan and stream its events into the sink.

    With ``modules``, the runner loads them and forwards the kernel log through the
    run's trace_marker; their lines become events of the same aggregate.
    """
    host = session.host.name
    s = fr.settings
    names = {p.trace_name: p.name for p in plan.probes if p.kind != "module"}
    report = RunnerReport()
    clock = ClockMap(offset=out.clock_offset or 0.0, error=out.clock_error or 0.0)
    # aggregate: tables the kernel cannot compute here are computed from the stream (fleetprobe.aggstream).
    stream_tables = StreamTables(plan.aggregates) if plan.aggregates else None
    counter = _HostCap(StreamTap(fr.aggregate, stream_tables) if stream_tables and stream_tables.probes
                       else fr.aggregate, fr.event_cap)
    sink = fr.events
    write = sink.write if sink is not None else fr.on_event

    def on_event(ev: TraceEvent) -> None:
        if write is not None and counter.keep_for_writer():
            write(ev)

    def on_batch(batch: EventBatch) -> None:
        """Trace events to the raw-event file as rows, under the same cap as one by one."""
        n = counter.take_for_writer(len(batch))
        if n and sink is not None:
            sink.write_batch(host, batch.head(n), names)

    ping_sent = 0.0

    # Controller time when the runner said its probes were on, and when it said it was stopping.
    window: list[float] = []
    probes_live = getattr(fr.observer, "probes_live", None)

    def on_control(text: str) -> None:
        was_started = report.started
        report.handle(text)
        if text.startswith(("started", "stopping")) and len(window) < 2:
            window.append(time.time())
        if report.started and not was_started and probes_live is not None:
            # The runner says its probes are in place: the moment a user starts the workload.
            probes_live(host, report.enabled + report.triggers + len(report.loaded))
        if text.startswith("unguarded"):
            # Its lines may go on over several: fold them into it (the host is reported forgeable).
            event = text.partition(" ")[2].partition(" :: ")[0]
            parser.add_unframed(p.trace_name for p in plan.probes if p.event == event)
        if text.startswith("ownfilter") and report.own_pids:
            # The kernel would not keep fleetprobe's own pids out of an event: drop them here, counted.
            parser.exclude_pids(set(report.own_pids))
        if len(report.pongs) == 1 and text.startswith("pong"):
            # The ping travels with the plan and the runner answers it before reading the rest:
            # one small round trip on an idle shell, the clock offset for free (NTP's min-RTT rule
            # against the facts' estimate, whose round trip includes sending the script).
            received, said = report.pongs[0]
            sample = clock_sample(ping_sent, received, said)
            if sample is not None and (out.clock_error is None or sample[1] <= out.clock_error):
                out.clock_offset, out.clock_error = sample
                clock.offset, clock.error = sample

    # Per host and run: the runner's control lines carry it, a user's file name cannot (issue 11).
    secret = secrets.token_hex(16)
    parser = TraceStream(host, names, aggregate=counter, on_event=on_event if write and sink is None else None,
                         on_batch=on_batch if sink is not None else None, on_control=on_control, clock=clock,
                         control_prefix=control_prefix(secret), trailer=plan.trailer or None,
                         sealed=[p.trace_name for p in plan.probes if p.framing == "sealed"],
                         unframed=[p.trace_name for p in plan.probes if p.name in plan.unframed()])
    directives = plan_directives(plan, tracefs=facts.tracefs or "/sys/kernel/tracing", duration=plan.duration,
                                 deadline=plan.deadline, grace=s.grace, buffer_kb=s.buffer_kb, modules=modules,
                                 secret=secret)
    module_probes = {p.name for p in plan.probes if p.kind == "module"}
    splitter = MarkerSplitter(secret) if modules else None
    kmsg = KmsgCollector(host, fr.run_id)
    #: Module lines of fleetprobe's own processes, left out per probe (they did come through).
    module_own: dict[str, int] = {}

    def take_records(data: bytes) -> None:
        """Module lines of this run into the same cap, aggregate and event file as tracefs events."""
        for ev in kmsg.feed(data) if data else kmsg.flush():
            if ev.probe not in module_probes:
                continue
            if ev.pid in report.own_pids:
                # A module's probe sees the runner's own forks and execs (no kernel filter reaches it).
                parser.stats.own_events += 1
                module_own[ev.probe] = module_own.get(ev.probe, 0) + 1
                continue
            # Printk time + (host realtime - printk clock) is host realtime; minus the host's
            # offset from the controller puts it on the controller's axis like trace events.
            ev.time = ev.time - clock.offset if ev.time else time.time()
            before = counter.accepted
            counter.add_line(host, ev.probe, ev.trace_ts, ev.time, ev.cpu, ev.pid, ev.comm, ev.args)
            if counter.accepted != before:
                on_event(ev)

    def feed(chunk: bytes) -> None:
        """One chunk of the runner's stdout: kernel-log records (if any) apart, the rest to the parser."""
        if splitter is None:
            parser.feed(chunk)
            return
        trace, records = splitter.feed(chunk)
        parser.feed(trace)
        if records:
            take_records(records)
    stream = runner.stream
    if runner.rest:
        feed(runner.rest)
    ping_sent = time.time()
    stream.write(b"ping\n" + directives.encode())
    stop_sent = False

    def stop() -> None:
        nonlocal stop_sent
        if not stop_sent:
            stop_sent = True
            stream.write(b"stop\n")

    last_read = time.monotonic()
    runner_dead = False
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    # The runner may probe until its deadline (the planned end plus the teardown slack, in its
    # clock): a host slow to place its probes starts its window late. Give up only past that.
    # Bounded by what the deadline was made of (duration + slack): a host that lied about its clock
    # between the plan and now cannot stretch how long the controller waits for it.
    until_deadline = plan.deadline - (out.clock_offset or 0.0) - time.time() if plan.deadline else 0.0
    run_limit = max(fr.duration, min(until_deadline, fr.duration + s.teardown_slack)) + s.teardown_timeout
    next_tick = t0 + TICK_SECONDS
    guard: asyncio.TimerHandle

    def watchdog() -> None:
        """Every second: stop the runner on interrupt or overrun, and give up on it when its heartbeat stops.

        The runner writes a clock marker every 5 s while it runs; a runner that
        was killed (an oops in its context, the OOM killer, a person) leaves
        its reader streaming but sends no more markers (see runner_silent).  A
        timer callback, not a task: a task per host costs a future and two
        wake-ups per second (issue 5).
        """
        nonlocal runner_dead, guard, next_tick
        now = time.monotonic()
        if flush_due is not None:
            # At least once a second on disk, whole lines: a killed controller keeps what it had (issue 11 #16).
            flush_due()
        if plan.aggregates and report.started:
            # The live view: streamed tables as they grow; kernel ones are only read at the end.
            fr.observer.set_aggregates(host, stream_progress(plan.aggregates, stream_tables))
        if fr.interrupted.is_set() or now - t0 > run_limit:
            stop()
            guard = loop.call_later(s.teardown_timeout, stream.close)
            return
        if report.started and not report.stop_reason and runner_silent(now - last_read, parser.last_beat_ts,
                                                                       parser.last_trace_ts):
            runner_dead = True
            stream.close()
            return
        if report.started and not stop_sent and not report.stop_reason and now >= next_tick:
            # The runner forks nothing while it runs (issue 9): it sleeps until this wakes it to
            # write its heartbeat marker.
            next_tick = now + TICK_SECONDS
            stream.write(b"tick\n")
        guard = loop.call_later(1, watchdog)

    flush_due: Callable[[], None] | None = getattr(sink, "flush_due", None)
    guard = loop.call_later(1, watchdog)
    last_seen = 0
    link_error: TransportError | None = None
    try:
        while True:
            try:
                chunk = await stream.read(65536)
            except TransportError as exc:
                link_error = exc
                break
            if not chunk:
                break
            last_read = time.monotonic()
            feed(chunk)
            if counter.accepted != last_seen:
                fr.observer.add_events(host, counter.accepted - last_seen)
                last_seen = counter.accepted
            if counter.accepted >= counter.cap and not stop_sent:
                stop()
        if splitter is not None:
            trace, records = splitter.flush()
            parser.feed(trace)
            if records:
                take_records(records)
            take_records(b"")  # the record the collector held back
        parser.close()
        try:
            status = await stream.wait(5)
        except TimeoutError:
            status = -1
    finally:
        guard.cancel()
        if fr.interrupted.is_set() and not report.bye:
            stop()
        host_flush: Callable[[], None] | None = getattr(sink, "flush", None)
        if host_flush is not None:
            host_flush()
    out.events = counter.accepted
    out.hits = dict(counter.counts)
    loss = report.loss(plan.group)
    loss.lost_lines = parser.stats.lost_events
    loss.capped = counter.capped
    module_failures = _module_results(plan, modules, report, kmsg, out, loss, module_own)
    results = getattr(fr.aggregate, "aggregates", None)
    if plan.aggregates and isinstance(results, AggResults):
        loss.hist_dropped = add_host_tables(results, host, plan, report, stream_tables, loss.capped, out.hits)
        fr.observer.set_aggregates(host, final_progress(results, host))
    out.loss = loss
    out.unparsed_lines = parser.stats.unparsed
    out.multiline_events = parser.stats.multiline
    out.overlong_lines = parser.stats.overlong
    out.unattributed_lines = parser.stats.unknown_lines
    out.unattributed = dict(parser.stats.unknown)
    out.unattributed_examples = list(parser.stats.unknown_examples)
    out.own_pids, out.own_unfiltered = list(report.own_pids), dict(report.own_unfiltered)
    out.own_events = parser.stats.own_events
    out.framing, out.forgeable = host_framing(plan, report.unguarded)
    if out.forgeable:
        out.unverified_events = counter.accepted
    out.guarded_out = report.guarded_out if report.guarded_out is not None else 0
    out.guard_uncounted = list(report.guard_uncounted)
    if report.guarded_out is None and any(p.framing.startswith("guarded") for p in plan.probes) and report.started:
        out.guard_uncounted.append("the runner did not say")
    out.placed_probes.update({p.name: (p.definition or p.event) for p in plan.probes
                              if p.kind != "module" and _event_name(p) not in report.refused})
    for p in plan.probes:
        why = report.refused.get(_event_name(p)) if p.kind != "module" else None
        if why:
            out.skipped_probes[p.name] = why
    if report.clean:
        out.cleanup = "clean"
    elif report.clean is False:
        out.cleanup = "failed: " + "; ".join(report.unclean)
    else:
        out.cleanup = "timer"
    deltas = report.kernel_deltas()
    # The runner's own start counts, else the facts' (taken just before; the runner holds its start
    # line until its probes are placed, and a probe that oopses the kernel may kill it first).
    start = report.kernel.get("start") or (
        {"oops": facts.oops_count, "warn": facts.warn_count or 0} if facts.oops_count is not None else None)
    if deltas is None and start:
        deltas = await _oopses_since(session, start)
    if deltas is not None:
        out.kernel_oopses, out.kernel_warnings = deltas
        if deltas[0] > 0:
            out.alerts.append(f"the kernel oopsed {deltas[0]} time(s) during the run: a probe may sit on an "
                              "instruction this kernel cannot single-step; see the host's kernel log (dmesg)")
        if deltas[1] > 0:
            out.alerts.append(f"the kernel logged {deltas[1]} WARNING(s) during the run; see dmesg")
    if (runner_dead or not report.bye) and link_error is None:
        out.cleanup = await _teardown_for_dead_runner(session, plan, facts, tuple(m.name for m in modules),
                                                      tuple(report.own_processes))
    if runner_dead:
        raise HostError(host, "probe", f"the runner stopped responding (no heartbeat for {HEARTBEAT_TIMEOUT}s)",
                        evidence="; ".join(out.alerts) or None)
    if report.errors and not report.started:
        raise HostError(host, "probe", "runner refused the plan", evidence="; ".join(report.errors))
    if report.errors:
        raise HostError(host, "probe", "the runner reported an error while probing", evidence="; ".join(report.errors))
    if module_failures:
        raise HostError(host, "probe", "the kernel refused a module: " + "; ".join(module_failures),
                        hint="the module's err= is the kernel's: -2 ENOENT (no such symbol), -22 EINVAL "
                             "(blacklisted, or an offset off an instruction boundary), -84 EILSEQ (x86: an offset "
                             "inside an instruction); check the probe's params in the playbook")
    if link_error is not None or not report.bye:
        if link_error is not None:
            why = (f"{link_error.message}; the runner removes its probes itself when it sees the link drop, "
                   "and its on-host timer does by the deadline otherwise")
        elif out.cleanup == "controller":
            why = f"the runner died before finishing (exit {status}); fleetprobe removed its probes"
        else:
            why = f"the runner died before finishing (exit {status}); its on-host timer removes the probes"
        raise HostError(host, "probe", why,
                        evidence=stream.stderr().decode("utf-8", "replace")[-400:] or None)
    if report.watchdog_fired:
        raise HostError(host, "probe", "the host's on-host timer removed the probes before the run ended: "
                        "its counts are partial", evidence=f"runner: stopping {report.stop_reason}; watchdog-fired",
                        hint=f"the deadline ({plan.deadline}) plus --grace ({fr.settings.grace} s) passed during the "
                             "run; raise --teardown-slack or --grace for a host this slow")
    if report.shortened is not None:
        asked, got = report.shortened
        out.alerts.append(f"probed {got} s of the {asked} s asked: placing the probes took longer than "
                          f"--teardown-slack ({fr.settings.teardown_slack} s), and the window ends by the "
                          "deadline; raise --teardown-slack for a host this slow")
    if counter.accepted >= counter.cap:
        # The cap ends the host's run early: what happened after it was never collected, and the
        # kernel's own hit counts (kprobe_profile) say how much that was where the host has them.
        kernel = report.hits(plan.group)
        missed = sum(max(0, n - out.hits.get(p, 0)) for p, n in kernel.items())
        where = f" after {window[1] - window[0]:.1f} s of the {plan.duration:.0f} s" if len(window) == 2 else ""
        out.alerts.append(f"the event cap ({counter.cap} events) was reached{where}: the host's run stopped "
                          f"there, {counter.capped} event(s) already read were not kept"
                          + (f", and the kernel counted {missed} hit(s) of its kprobes/uprobes that were not "
                             "collected" if kernel else "")
                          + "; raise --event-cap (or the playbook's event_cap) for the whole window")
    if report.dropped:
        out.alerts.append(f"the runner sent {report.dropped} control lines past the {report.MAX_LINES} kept: "
                          "a runner says a few hundred; this host's stream is suspect")
    if len(window) == 2:
        out.probed_seconds = round(window[1] - window[0], 3)
    if report.stop_reason in ("reader-exit", "signal") and not fr.interrupted.is_set():
        # The trace reader ended, or the runner was signalled, without the controller asking: someone
        # removed the run's instance (another operator's "fleetprobe cleanup --force" or a negative
        # grace stops every process holding it open, the runner too): what it did not see is not "nothing".
        covered = f"{out.probed_seconds:.1f} s" if out.probed_seconds is not None else "an unknown part"
        raise HostError(host, "probe", f"the probes were removed under the run: it saw {covered} of its "
                        f"{plan.duration:.0f} s", evidence=f"runner: stopping {report.stop_reason}",
                        hint="another fleetprobe run or 'fleetprobe cleanup --force' on this host removed "
                             "the run's tracefs instance; rerun when it is alone")
    if report.enabled == 0 and not report.loaded and not report.triggers:
        raise HostError(host, "probe", "the kernel refused every probe",
                        evidence="; ".join(f"{k}: {v}" for k, v in report.refused.items()) or None)
    out.status = Status.INTERRUPTED if fr.interrupted.is_set() else Status.OK
    out.stage = Stage.DONE
    fr.observer.set_state(host, "done" if out.status == "ok" else out.status, f"{counter.accepted} events")


def _module_results(plan: HostPlan, modules: tuple[ModuleLoad, ...], report: RunnerReport,
                    kmsg: KmsgCollector, out: HostOutcome, loss: LossCounters,
                    own: Mapping[str, int] | None = None) -> list[str]:
    """Fold what the modules said into the outcome; return why each module that failed failed.

    The module's own totals at rmmod: ``missed`` (hits the kernel skipped because a kprobe was
    already running on that CPU) into probe_misses, lines its rate limit suppressed into
    ``capped`` (dropped by a cap, like the event cap); records lost from the kernel log
    (sequence gaps) into ``kmsg_gaps``.
    """
    if not modules:
        return []
    loss.kmsg_gaps = kmsg.stream.lost
    # What the report already counts as not collected: sequence gaps, and events past the event cap.
    unexplained_gaps = kmsg.stream.lost + loss.capped
    failures: list[str] = []
    by_module = {m.name: m for m in modules}
    probe_of = {m.name: dict(m.params).get("probe", m.name) for m in modules}
    for name, probe in probe_of.items():
        st = kmsg.status.get(probe)
        if st is not None:
            if st.missed is not None:
                loss.probe_misses[probe] = loss.probe_misses.get(probe, 0) + st.missed
            loss.capped += st.suppressed
        refused = report.refused.get(name)
        if refused or (st is not None and st.failed) or name not in report.loaded:
            said = f" (module: {st.failed})" if st is not None and st.failed else ""
            why = refused or ("not loaded" if report.started else "the runner stopped before loading it")
            module = by_module[name]
            what = f"{module.source} for probe {probe} (as {name})" if module.source else f"{name} for probe {probe}"
            failures.append(f"{what}: {why}{said}")
            out.placed_probes.pop(probe, None)
            continue
        built = out.placed_probes.get(probe, by_module[name].name)
        where = st.planted_at if st is not None and st.planted_at else "its plant line was not seen"
        out.placed_probes[probe] = f"module {built}; planted at {where}"
        # The module's own totals at rmmod are the kernel's count: fewer lines collected than it
        # printed, or no totals at all, means the kernel-log path lost some (a slow host's reader
        # still replaying old records at the end): a lower bound, said and counted, never exact.
        # What came through: the probe's events, and those of fleetprobe's own processes left out.
        got = out.hits.get(probe, 0) + (own or {}).get(probe, 0)
        if st is None or not st.unregistered:
            out.alerts.append(f"module {name} (probe {probe}): its totals at unload never came through the "
                              f"kernel log, so its {got} hit(s) are a lower bound")
        elif st.printed is not None and got < st.printed:
            # Records the kernel overwrote (gaps) or the cap dropped are counted already: the rest once.
            short = st.printed - got
            counted = min(short, unexplained_gaps)
            unexplained_gaps -= counted
            loss.kmsg_gaps += short - counted
            out.alerts.append(f"module {name} (probe {probe}) printed {st.printed} line(s) and {got} came "
                              f"through the kernel log: {short} not collected")
    return failures


def _event_name(p: object) -> str:
    """The dynamic event name a planned probe defines (the runner reports refusals by it)."""
    event = getattr(p, "event", "") or ""
    return event.rsplit("/", 1)[-1]


# --- facts, plan and cleanup across the fleet ------------------------------------------------

async def fan_out(hosts: Iterable[Host], settings: RunSettings, stage: str,
                  work: Callable[[Host, Session], Awaitable[T]],
                  failed: Callable[[Host, HostError], T], observer: Observer | None = None) -> list[T]:
    """One short job per host over one connection each, ``forks`` at a time; a failure is a value.

    Whatever goes wrong on one host (a HostError, no answer in time, or an exception nobody
    expected: a bug in a connector or a parser) becomes that host's HostError, passed to
    ``failed``; the other hosts go on. ``stage`` names the job (facts, plan, teardown) in
    the error of an unexpected exception after the host was connected.
    """
    slots = asyncio.Semaphore(max(1, settings.forks))
    obs = observer or NullObserver()

    async def one(host: Host) -> T:
        async with slots:
            session: Session | None = None
            try:
                obs.set_state(host.name, "connecting")
                session = await asyncio.wait_for(settings.open_session(host), settings.setup_timeout)
                result = await work(host, session)
                obs.set_state(host.name, "done")
                return result
            except HostError as exc:
                error = exc
            except TimeoutError:
                error = HostError(host.name, "connect", f"no answer within {settings.setup_timeout:.0f}s")
            except Exception as exc:  # noqa: BLE001 - one host's bug must never end the command for the fleet
                error = HostError(host.name, "connect" if session is None else stage,
                                  f"internal error: {type(exc).__name__}: {exc}",
                                  evidence=traceback.format_exc()[-2000:],
                                  hint="this is a fleetprobe bug: report it with the evidence")
            finally:
                if session is not None:
                    await session.close()
            obs.set_state(host.name, "failed", error.message)
            return failed(host, error)

    return list(await asyncio.gather(*(one(h) for h in hosts)))


async def facts_fleet(hosts: Iterable[Host], settings: RunSettings, playbook: Playbook | None = None,
                      observer: Observer | None = None) -> list[HostFacts]:
    """Facts of every host (bounded fan-out); failures are values."""
    obs = observer or NullObserver()

    async def work(host: Host, session: Session) -> HostFacts:
        obs.set_state(host.name, "facts")
        facts, offset, error = await gather_facts(session, playbook, mount=settings.mount_tracefs,
                                                  timeout=settings.setup_timeout)
        return HostFacts(host, facts, clock_offset=offset, clock_error=error)

    return await fan_out(hosts, settings, "facts", work, lambda host, exc: HostFacts(host, error=exc), obs)


async def plan_fleet(hosts: Iterable[Host], playbook: Playbook, settings: RunSettings,
                     observer: Observer | None = None) -> list[tuple[HostFacts, HostPlan | None]]:
    """Facts and a plan for every host, changing nothing on any host."""
    run_id = settings.run_id or new_run_id()
    offsets = ElfOffsets(fetch_timeout=settings.setup_timeout)
    duration = settings.duration if settings.duration is not None else playbook.duration
    # plan has a deadline: facts, then every binary's fetch, each bounded, and the whole as well
    # (a host that answers slowly to everything must not hold the command for ever).
    limit = settings.setup_timeout * 3

    async def work(host: Host, session: Session) -> tuple[HostFacts, HostPlan | None]:
        try:
            async with asyncio.timeout(limit):
                facts, offset, error = await gather_facts(session, playbook, mount=False,
                                                          timeout=settings.setup_timeout)
                uo = await offsets.resolve(session, facts, playbook.uprobe_targets())
        except TimeoutError:
            raise HostError(host.name, "plan", f"no plan within {limit:.0f}s (facts and binaries to read)",
                            hint="raise --setup-timeout for slow hosts or links") from None
        deadline = settings.deadline(offset, duration)
        return (HostFacts(host, facts, clock_offset=offset, clock_error=error),
                plan_host(playbook, facts, run_id=run_id, deadline=deadline, uprobe_offsets=uo, duration=duration,
                          seal=new_seal()))

    return await fan_out(hosts, settings, "plan", work, lambda host, exc: (HostFacts(host, error=exc), None),
                         observer)


@dataclass
class CleanupResult:
    """What a sweep removed from one host (or why it could not)."""

    host: str
    removed: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)
    error: str = ""


async def cleanup_fleet(hosts: Iterable[Host], settings: RunSettings, *, force: bool = False) -> list[CleanupResult]:
    """Remove fleetprobe leftovers of dead runs from every host (``force``: of live runs too)."""
    grace = -(10 ** 9) if force else settings.grace

    async def work(host: Host, session: Session) -> CleanupResult:
        res = CleanupResult(host.name)
        facts, _, _ = await gather_facts(session, None, mount=False, timeout=settings.setup_timeout)
        if facts.tracefs is None:
            res.error = "tracefs is not mounted: nothing fleetprobe makes can exist"
            return res
        rep = await _runner_once(session, sweep_directives(facts.tracefs, grace), settings.setup_timeout * 2)
        res.removed = rep.swept
        after, _, _ = await gather_facts(session, None, mount=False, timeout=settings.setup_timeout)
        res.remaining = list(after.leftovers)
        if rep.unclean:
            res.error = "; ".join(rep.unclean)
        return res

    return await fan_out(hosts, settings, "teardown", work,
                         lambda host, exc: CleanupResult(host.name, error=str(exc)))


def playbook_pairs(playbook: Playbook) -> dict[str, str]:
    """{return probe: entry probe} from the playbook itself."""
    return {p.name: p.pair_with for p in playbook.probes if p.pair_with}


async def run_playbook(hosts: Iterable[Host], playbook: Playbook, settings: RunSettings, *,
                       observer: Observer | None = None, events_path: str | None = None,
                       interrupted: asyncio.Event | None = None, inventory: str = "",
                       argv: list[str] | None = None, events: EventSink | None = None) -> FleetReport:
    """The Python API's one call: run a playbook on hosts and return the merged report.

    Raw events go to ``events_path`` (JSON lines) as they arrive, never to memory, or to the sink
    ``events`` (batches of the rows the kernel printed, see events.EventWriter): one of the two.
    """
    if events_path and events is not None:
        raise ValueError("run_playbook: pass events_path or events, not both")
    aggregate = FleetAggregate(pairs=playbook_pairs(playbook))
    run_id = settings.run_id or new_run_id()
    settings = replace(settings, run_id=run_id)
    started = time.time()
    writer = None
    if events_path:
        writer = EventWriter(events_path)
    try:
        outcomes = await run_fleet(hosts, playbook, settings, aggregate,
                                   events=writer if writer is not None else events,
                                   observer=observer, interrupted=interrupted)
    finally:
        if writer is not None:
            writer.close()
    run = RunInfo(run_id=run_id, playbook=playbook.name, playbook_path=playbook.source,
                  playbook_sha256=playbook.sha256, started=started, ended=time.time(),
                  inventory=inventory, argv=list(argv or []), version=__version__)
    if writer is not None:
        run.events_written = writer.written
        run.events_truncated = writer.error
    return FleetReport(run, aggregate, outcomes)


#: Events an EventStream holds for a consumer that reads slower than the fleet sends (then dropped, counted).
STREAM_QUEUE = 100_000


class EventStream:
    """``run_playbook`` whose events come as an async iterator (the Python API's live view).

    ::

        async with EventStream(hosts, playbook, settings) as stream:
            async for ev in stream:      # TraceEvent, as each host's chunk arrives
                print(ev.host, ev.probe, ev.comm, ev.fields)
        report = stream.report           # the merged FleetReport

    Leaving the block early (``break``, an exception) ends the run on every host as a Ctrl-C does,
    and the block's exit waits for that teardown: nothing is left on any host.  Memory is bounded: a
    consumer slower than the fleet loses the events past ``maxsize`` waiting ones, counted in
    ``dropped`` (the report's counts are the kernel's, whatever the consumer kept up with).
    """

    def __init__(self, hosts: Iterable[Host], playbook: Playbook, settings: RunSettings, *,
                 observer: Observer | None = None, maxsize: int = STREAM_QUEUE) -> None:
        if maxsize < 1:
            raise ValueError(f"EventStream(maxsize={maxsize}): at least 1")
        self._args = (list(hosts), playbook, settings)
        self._observer = observer
        self._queue: asyncio.Queue[TraceEvent | None] = asyncio.Queue(maxsize)
        self._interrupted = asyncio.Event()
        self._task: asyncio.Task[FleetReport] | None = None
        #: Events not handed over: the consumer was ``maxsize`` events behind.
        self.dropped = 0
        #: The merged report, once the ``async with`` block ended.
        self.report: FleetReport | None = None

    def write(self, ev: TraceEvent) -> None:
        """EventSink: one built event (module lines)."""
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.dropped += 1

    def write_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """EventSink: a batch of rows, each made a TraceEvent (fields parsed as everywhere else)."""
        from fleetprobe.events import _row_event

        room = self._queue.maxsize - self._queue.qsize()
        for i, ev in enumerate(batch.events(probes)):
            if i >= room:
                self.dropped += len(batch.rows) - i
                break
            self._queue.put_nowait(_row_event(host, ev))

    def stop(self) -> None:
        """End the run on every host (as Ctrl-C does); the iteration then finishes."""
        self._interrupted.set()

    async def _run(self) -> FleetReport:
        hosts, playbook, settings = self._args
        try:
            return await run_playbook(hosts, playbook, settings, observer=self._observer,
                                      interrupted=self._interrupted, events=self)
        finally:
            # The end marker always gets in (the oldest waiting event makes room for it).
            while True:
                try:
                    self._queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    self._queue.get_nowait()
                    self.dropped += 1

    async def __aenter__(self) -> EventStream:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._task is not None
        if not self._task.done():
            self._interrupted.set()
        self.report = await self._task

    async def __aiter__(self) -> AsyncIterator[TraceEvent]:
        if self._task is None:
            raise RuntimeError("iterate an EventStream inside 'async with EventStream(...) as stream'")
        while (ev := await self._queue.get()) is not None:
            yield ev
