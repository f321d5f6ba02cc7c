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
import time
import traceback
from types import TracebackType
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from .errors import FleetprobeError, HostError, TransportError
from .events import EventWriter, _row_event
from .facts import Facts
from .inventory import Host
from .merge import FleetAggregate
from .results import FleetReport, RunInfo
from .version import __version__
from .outcome import HostOutcome, Stage, Status
from .parse import EventBatch, EventSink, LineSink
from .traceline import TraceEvent
from .plan import HostPlan, new_run_id, new_seal, plan_host, with_later_deadline
from .playbook import Playbook
from .runner.runner import (ModuleLoad, sweep_directives)
from .session import Session, put_private
from .hostrun import probe_host
from .kmod.builds import ModuleBuilds, _MODULE_WORD, _module_cache, load_name
from .runner.channel import HostFacts, RunnerChannel, _runner_once, gather_facts, start_runner
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
        await probe_host(fr, session, probe_runner, facts, plan, out, loads)
    except HostError as exc:
        _record_host_error(out, exc, obs)
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
        await _close_host(runner, session)
    return out


def _record_host_error(out: HostOutcome, exc: HostError, obs: Observer) -> None:
    """A host's failure into its outcome: unreachable when it failed to connect, else failed."""
    out.status = Status.UNREACHABLE if isinstance(exc, TransportError) and exc.stage == "connect" else Status.FAILED
    if isinstance(exc, TransportError) and out.stage == "probe":
        out.status = Status.FAILED
    out.stage = exc.stage if out.stage in ("connect",) else out.stage
    out.reason = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    out.evidence = exc.evidence or ""
    obs.set_state(out.host, out.status, exc.message)


async def _close_host(runner: RunnerChannel | None, session: Session | None) -> None:
    """The host's end, whatever happened: a runner still waiting for its plan, then the connection."""
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
