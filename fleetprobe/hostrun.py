"""Probe one host: its plan to the waiting runner, its stream through ingest, the host's outcome.

The probe phase of orchestrate's per-host pipeline (connect -> facts -> plan ->
deploy -> *probe* -> outcome).  ``probe_host`` sends the runner its directives,
feeds the runner's stdout to the trace parser (and the kernel-log splitter when
modules run), keeps a watchdog on the runner's heartbeat, and folds what the
runner reported into the HostOutcome, raising HostError when the host's run
failed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .clock import ClockMap
from .errors import HostError, TransportError
from .facts import Facts
from .aggstream import StreamTables, StreamTap, stream_progress
from .aggtables import AggResults, final_progress
from .histread import add_host_tables
from .ingest import _HostCap
from .kmsg import KmsgCollector, MarkerSplitter
from .outcome import HostOutcome, LossCounters, Stage, Status
from .parse import EventBatch, TraceStream
from .traceline import TraceEvent, control_prefix
from .plan import HostPlan, host_framing
from .runner.channel import (HEARTBEAT_TIMEOUT, TICK_SECONDS, RunnerChannel, _oopses_since,
                             _teardown_for_dead_runner, runner_silent)
from .runner.runner import ModuleLoad, RunnerReport, clock_sample, plan_directives
from .session import Session

if TYPE_CHECKING:  # orchestrate imports this module: FleetRun is only a type here
    from .orchestrate import FleetRun


async def probe_host(fr: FleetRun, session: Session, runner: RunnerChannel, facts: Facts, plan: HostPlan,
                     out: HostOutcome, modules: tuple[ModuleLoad, ...] = ()) -> None:
    """Send the waiting runner its plan and stream its events into the sink.

    With ``modules``, the runner loads them and forwards the kernel log through the
    run's trace_marker; their lines become events of the same aggregate.
    """
    await _HostProbe(fr, session, runner, facts, plan, out, modules).run()


class _HostProbe:
    """One host's probe phase: the state its stream callbacks, watchdog and outcome share."""

    def __init__(self, fr: FleetRun, session: Session, runner: RunnerChannel, facts: Facts, plan: HostPlan,
                 out: HostOutcome, modules: tuple[ModuleLoad, ...]) -> None:
        self.fr, self.session, self.runner, self.facts, self.plan, self.out = fr, session, runner, facts, plan, out
        self.modules = modules
        self.host = host = session.host.name
        self.names = {p.trace_name: p.name for p in plan.probes if p.kind != "module"}
        self.report = RunnerReport()
        self.clock = ClockMap(offset=out.clock_offset or 0.0, error=out.clock_error or 0.0)
        # aggregate: tables the kernel cannot compute here are computed from the stream (fleetprobe.hist).
        self.stream_tables = StreamTables(plan.aggregates) if plan.aggregates else None
        self.counter = _HostCap(StreamTap(fr.aggregate, self.stream_tables)
                                if self.stream_tables and self.stream_tables.probes else fr.aggregate, fr.event_cap)
        self.sink = sink = fr.events
        self.write = sink.write if sink is not None else fr.on_event
        self.ping_sent = 0.0
        # Controller time when the runner said its probes were on, and when it said it was stopping.
        self.window: list[float] = []
        self.probes_live = getattr(fr.observer, "probes_live", None)
        # Per host and run: the runner's control lines carry it, a user's file name cannot (issue 11).
        secret = secrets.token_hex(16)
        self.parser = TraceStream(
            host, self.names, aggregate=self.counter,
            on_event=self.on_event if self.write and sink is None else None,
            on_batch=self.on_batch if sink is not None else None, on_control=self.on_control, clock=self.clock,
            control_prefix=control_prefix(secret), trailer=plan.trailer or None, string_ends=plan.string_ends,
            sealed=[p.trace_name for p in plan.probes if p.framing == "sealed"],
            unframed=[p.trace_name for p in plan.probes if p.name in plan.unframed()])
        self.directives = plan_directives(plan, tracefs=facts.tracefs or "/sys/kernel/tracing",
                                          duration=plan.duration, deadline=plan.deadline, grace=fr.settings.grace,
                                          buffer_kb=fr.settings.buffer_kb, modules=modules, secret=secret)
        self.module_probes = {p.name for p in plan.probes if p.kind == "module"}
        self.splitter = MarkerSplitter(secret) if modules else None
        self.kmsg = KmsgCollector(host, fr.run_id)
        #: Module lines of fleetprobe's own processes, left out per probe (they did come through).
        self.module_own: dict[str, int] = {}
        self.stream = runner.stream
        self.stop_sent = False
        self.runner_dead = False
        self.link_error: TransportError | None = None
        self.status = -1
        self.loop = asyncio.get_running_loop()
        self.last_read = self.t0 = self.next_tick = time.monotonic()
        self.run_limit = 0.0
        self.guard: asyncio.TimerHandle | None = None
        self.flush_due: Callable[[], None] | None = getattr(sink, "flush_due", None)

    # --- the stream's callbacks -------------------------------------------------------------

    def on_event(self, ev: TraceEvent) -> None:
        if self.write is not None and self.counter.keep_for_writer():
            self.write(ev)

    def on_batch(self, batch: EventBatch) -> None:
        """Trace events to the raw-event file as rows, under the same cap as one by one."""
        n = self.counter.take_for_writer(len(batch))
        if n and self.sink is not None:
            self.sink.write_batch(self.host, batch.head(n), self.names)

    def on_control(self, text: str) -> None:
        report = self.report
        was_started = report.started
        report.handle(text)
        if text.startswith(("started", "stopping")) and len(self.window) < 2:
            self.window.append(time.time())
        if report.started and not was_started and self.probes_live is not None:
            # The runner says its probes are in place: the moment a user starts the workload.
            self.probes_live(self.host, report.enabled + report.triggers + len(report.loaded))
        if text.startswith("unguarded"):
            # Its lines may go on over several: fold them into it (the host is reported forgeable).
            event = text.partition(" ")[2].partition(" :: ")[0]
            self.parser.add_unframed(p.trace_name for p in self.plan.probes if p.event == event)
        if text.startswith("ownfilter") and report.own_pids:
            # The kernel would not keep fleetprobe's own pids out of an event: drop them here, counted.
            self.parser.exclude_pids(set(report.own_pids))
        if len(report.pongs) == 1 and text.startswith("pong"):
            self._take_pong()

    def _take_pong(self) -> None:
        # The ping travels with the plan and the runner answers it before reading the rest:
        # one small round trip on an idle shell, the clock offset for free (NTP's min-RTT rule
        # against the facts' estimate, whose round trip includes sending the script).
        out = self.out
        received, said = self.report.pongs[0]
        sample = clock_sample(self.ping_sent, received, said)
        if sample is not None and (out.clock_error is None or sample[1] <= out.clock_error):
            out.clock_offset, out.clock_error = sample
            self.clock.offset, self.clock.error = sample

    def take_records(self, data: bytes) -> None:
        """Module lines of this run into the same cap, aggregate and event file as tracefs events."""
        counter = self.counter
        for ev in self.kmsg.feed(data) if data else self.kmsg.flush():
            if ev.probe not in self.module_probes:
                continue
            if ev.pid in self.report.own_pids:
                # A module's probe sees the runner's own forks and execs (no kernel filter reaches it).
                self.parser.stats.own_events += 1
                self.module_own[ev.probe] = self.module_own.get(ev.probe, 0) + 1
                continue
            # Printk time + (host realtime - printk clock) is host realtime; minus the host's
            # offset from the controller puts it on the controller's axis like trace events.
            ev.time = ev.time - self.clock.offset if ev.time else time.time()
            before = counter.accepted
            counter.add_line(self.host, ev.probe, ev.trace_ts, ev.time, ev.cpu, ev.pid, ev.comm, ev.args)
            if counter.accepted != before:
                self.on_event(ev)

    def feed(self, chunk: bytes) -> None:
        """One chunk of the runner's stdout: kernel-log records (if any) apart, the rest to the parser."""
        if self.splitter is None:
            self.parser.feed(chunk)
            return
        trace, records = self.splitter.feed(chunk)
        self.parser.feed(trace)
        if records:
            self.take_records(records)

    def stop(self) -> None:
        if not self.stop_sent:
            self.stop_sent = True
            self.stream.write(b"stop\n")

    def watchdog(self) -> None:
        """Every second: stop the runner on interrupt or overrun, and give up on it when its heartbeat stops.

        The runner writes a clock marker every 5 s while it runs; a runner that
        was killed (an oops in its context, the OOM killer, a person) leaves
        its reader streaming but sends no more markers (see runner_silent).  A
        timer callback, not a task: a task per host costs a future and two
        wake-ups per second (issue 5).
        """
        report, fr = self.report, self.fr
        now = time.monotonic()
        if self.flush_due is not None:
            # At least once a second on disk, whole lines: a killed controller keeps what it had (issue 11 #16).
            self.flush_due()
        if self.plan.aggregates and report.started:
            # The live view: streamed tables as they grow; kernel ones are only read at the end.
            fr.observer.set_aggregates(self.host, stream_progress(self.plan.aggregates, self.stream_tables))
        if fr.interrupted.is_set() or now - self.t0 > self.run_limit:
            self.stop()
            self.guard = self.loop.call_later(fr.settings.teardown_timeout, self.stream.close)
            return
        if report.started and not report.stop_reason and runner_silent(now - self.last_read, self.parser.last_beat_ts,
                                                                       self.parser.last_trace_ts):
            self.runner_dead = True
            self.stream.close()
            return
        if report.started and not self.stop_sent and not report.stop_reason and now >= self.next_tick:
            # The runner forks nothing while it runs (issue 9): it sleeps until this wakes it to
            # write its heartbeat marker.
            self.next_tick = now + TICK_SECONDS
            self.stream.write(b"tick\n")
        self.guard = self.loop.call_later(1, self.watchdog)

    # --- the phase, in order ----------------------------------------------------------------

    async def run(self) -> None:
        await self.stream_all()
        module_failures = self.fold_counts()
        await self.fold_cleanup_and_kernel()
        self.raise_if_failed(module_failures)
        self.note_alerts()
        self.raise_if_partial()
        out, fr = self.out, self.fr
        out.status = Status.INTERRUPTED if fr.interrupted.is_set() else Status.OK
        out.stage = Stage.DONE
        fr.observer.set_state(self.host, "done" if out.status == "ok" else out.status,
                              f"{self.counter.accepted} events")

    async def stream_all(self) -> None:
        """Send the plan, read the runner's stdout to its end, the watchdog running; its exit status."""
        fr, s, plan, stream, counter = self.fr, self.fr.settings, self.plan, self.stream, self.counter
        if self.runner.rest:
            self.feed(self.runner.rest)
        self.ping_sent = time.time()
        stream.write(b"ping\n" + self.directives.encode())
        self.last_read = self.t0 = time.monotonic()
        # The runner may probe until its deadline (the planned end plus the teardown slack, in its
        # clock): a host slow to place its probes starts its window late. Give up only past that.
        # Bounded by what the deadline was made of (duration + slack): a host that lied about its clock
        # between the plan and now cannot stretch how long the controller waits for it.
        until_deadline = plan.deadline - (self.out.clock_offset or 0.0) - time.time() if plan.deadline else 0.0
        self.run_limit = max(fr.duration, min(until_deadline, fr.duration + s.teardown_slack)) + s.teardown_timeout
        self.next_tick = self.t0 + TICK_SECONDS
        self.guard = self.loop.call_later(1, self.watchdog)
        last_seen = 0
        try:
            while True:
                try:
                    chunk = await stream.read(65536)
                except TransportError as exc:
                    self.link_error = exc
                    break
                if not chunk:
                    break
                self.last_read = time.monotonic()
                self.feed(chunk)
                if counter.accepted != last_seen:
                    fr.observer.add_events(self.host, counter.accepted - last_seen)
                    last_seen = counter.accepted
                if counter.accepted >= counter.cap and not self.stop_sent:
                    self.stop()
            self.drain()
            try:
                self.status = await stream.wait(5)
            except TimeoutError:
                self.status = -1
        finally:
            self.guard.cancel()
            if fr.interrupted.is_set() and not self.report.bye:
                self.stop()
            host_flush: Callable[[], None] | None = getattr(self.sink, "flush", None)
            if host_flush is not None:
                host_flush()

    def drain(self) -> None:
        """The stream ended: what the splitter and the parser still hold."""
        if self.splitter is not None:
            trace, records = self.splitter.flush()
            self.parser.feed(trace)
            if records:
                self.take_records(records)
            self.take_records(b"")  # the record the collector held back
        self.parser.close()

    def fold_counts(self) -> list[str]:
        """What was counted into the outcome; why each module that failed failed."""
        fr, plan, out, report, counter, stats = self.fr, self.plan, self.out, self.report, self.counter, self.parser.stats
        out.events = counter.accepted
        out.hits = dict(counter.counts)
        loss = report.loss(plan.group)
        loss.lost_lines = stats.lost_events
        loss.capped = counter.capped
        module_failures = _module_results(plan, self.modules, report, self.kmsg, out, loss, self.module_own)
        results = getattr(fr.aggregate, "aggregates", None)
        if plan.aggregates and isinstance(results, AggResults):
            loss.hist_dropped = add_host_tables(results, self.host, plan, report, self.stream_tables, loss.capped,
                                                out.hits)
            fr.observer.set_aggregates(self.host, final_progress(results, self.host))
        out.loss = loss
        out.unparsed_lines = stats.unparsed
        out.multiline_events = stats.multiline
        out.overlong_lines = stats.overlong
        out.unattributed_lines = stats.unknown_lines
        out.unattributed = dict(stats.unknown)
        out.unattributed_examples = list(stats.unknown_examples)
        out.own_pids, out.own_unfiltered = list(report.own_pids), dict(report.own_unfiltered)
        out.own_events = stats.own_events
        self.fold_framing_and_placement()
        return module_failures

    def fold_framing_and_placement(self) -> None:
        plan, out, report = self.plan, self.out, self.report
        out.framing, out.forgeable = host_framing(plan, report.unguarded)
        if out.forgeable:
            out.unverified_events = self.counter.accepted
        out.guarded_out = report.guarded_out if report.guarded_out is not None else 0
        out.guard_uncounted = list(report.guard_uncounted)
        out.guarded_out_by_probe = {p.name: report.guarded_by_event[p.event] for p in plan.probes
                                    if p.event in report.guarded_by_event}
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

    async def fold_cleanup_and_kernel(self) -> None:
        """The kernel's oops/warning counts over the run; the controller's teardown for a dead runner."""
        out, report, facts = self.out, self.report, self.facts
        deltas = report.kernel_deltas()
        # The runner's own start counts, else the facts' (taken just before; the runner holds its start
        # line until its probes are placed, and a probe that oopses the kernel may kill it first).
        start = report.kernel.get("start") or (
            {"oops": facts.oops_count, "warn": facts.warn_count or 0} if facts.oops_count is not None else None)
        if deltas is None and start:
            deltas = await _oopses_since(self.session, start)
        if deltas is not None:
            out.kernel_oopses, out.kernel_warnings = deltas
            if deltas[0] > 0:
                out.alerts.append(f"the kernel oopsed {deltas[0]} time(s) during the run: a probe may sit on an "
                                  "instruction this kernel cannot single-step; see the host's kernel log (dmesg)")
            if deltas[1] > 0:
                out.alerts.append(f"the kernel logged {deltas[1]} WARNING(s) during the run; see dmesg")
        if (self.runner_dead or not report.bye) and self.link_error is None:
            out.cleanup = await _teardown_for_dead_runner(self.session, self.plan, facts,
                                                          tuple(m.name for m in self.modules),
                                                          tuple(report.own_processes))

    def raise_if_failed(self, module_failures: list[str]) -> None:
        host, out, report, link_error = self.host, self.out, self.report, self.link_error
        if self.runner_dead:
            raise HostError(host, "probe", f"the runner stopped responding (no heartbeat for {HEARTBEAT_TIMEOUT}s)",
                            evidence="; ".join(out.alerts) or None)
        if report.errors and not report.started:
            raise HostError(host, "probe", "runner refused the plan", evidence="; ".join(report.errors))
        if report.errors:
            raise HostError(host, "probe", "the runner reported an error while probing",
                            evidence="; ".join(report.errors))
        if module_failures:
            raise HostError(host, "probe", "the kernel refused a module: " + "; ".join(module_failures),
                            hint="the module's err= is the kernel's: -2 ENOENT (no such symbol), -22 EINVAL "
                                 "(blacklisted, or an offset off an instruction boundary), -84 EILSEQ (x86: an "
                                 "offset inside an instruction); check the probe's params in the playbook")
        if link_error is not None or not report.bye:
            if link_error is not None:
                why = (f"{link_error.message}; the runner removes its probes itself when it sees the link drop, "
                       "and its on-host timer does by the deadline otherwise")
            elif out.cleanup == "controller":
                why = f"the runner died before finishing (exit {self.status}); fleetprobe removed its probes"
            else:
                why = f"the runner died before finishing (exit {self.status}); its on-host timer removes the probes"
            raise HostError(host, "probe", why,
                            evidence=self.stream.stderr().decode("utf-8", "replace")[-400:] or None)
        if report.watchdog_fired:
            raise HostError(host, "probe", "the host's on-host timer removed the probes before the run ended: "
                            "its counts are partial", evidence=f"runner: stopping {report.stop_reason}; watchdog-fired",
                            hint=f"the deadline ({self.plan.deadline}) plus --grace ({self.fr.settings.grace} s) "
                                 "passed during the run; raise --teardown-slack or --grace for a host this slow")

    def note_alerts(self) -> None:
        out, report, counter, plan, window = self.out, self.report, self.counter, self.plan, self.window
        if report.shortened is not None:
            asked, got = report.shortened
            out.alerts.append(f"probed {got} s of the {asked} s asked: placing the probes took longer than "
                              f"--teardown-slack ({self.fr.settings.teardown_slack} s), and the window ends by the "
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

    def raise_if_partial(self) -> None:
        out, report, plan = self.out, self.report, self.plan
        if report.stop_reason in ("reader-exit", "signal") and not self.fr.interrupted.is_set():
            # The trace reader ended, or the runner was signalled, without the controller asking: someone
            # removed the run's instance (another operator's "fleetprobe cleanup --force" or a negative
            # grace stops every process holding it open, the runner too): what it did not see is not "nothing".
            covered = f"{out.probed_seconds:.1f} s" if out.probed_seconds is not None else "an unknown part"
            raise HostError(self.host, "probe", f"the probes were removed under the run: it saw {covered} of its "
                            f"{plan.duration:.0f} s", evidence=f"runner: stopping {report.stop_reason}",
                            hint="another fleetprobe run or 'fleetprobe cleanup --force' on this host removed "
                                 "the run's tracefs instance; rerun when it is alone")
        if report.enabled == 0 and not report.loaded and not report.triggers:
            raise HostError(self.host, "probe", "the kernel refused every probe",
                            evidence="; ".join(f"{k}: {v}" for k, v in report.refused.items()) or None)


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
