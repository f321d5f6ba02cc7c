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
import hashlib
import re
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from .clock import ClockMap
from .errors import FleetprobeError, HostError, TransportError
from .facts import Facts, facts_args, facts_script, parse_facts
from .inventory import Host
from .kmsg import KmsgCollector, MarkerSplitter
from .merge import FleetAggregate, FleetReport, RunInfo
from .outcome import HostOutcome, LossCounters
from .parse import EventBatch, EventSink, LineSink, TraceEvent, TraceStream
from .plan import HostPlan, new_run_id, plan_host, with_later_deadline
from .playbook import Playbook
from .runner import (ModuleLoad, RunnerReport, clock_sample, plan_directives, runner_script,
                     sweep_directives, teardown_directives)
from .transport import Session, SSHOptions, Stream, connect, script_command, script_input, shell_command

if TYPE_CHECKING:
    # Module builds (build, debian) and ELF reading (uprobes) are imported where a run needs
    # them: a tracefs run, `facts` and `cleanup` never do (start-up cost, issue 5).
    from .build import BuildGroup, BuildKey, BuildSession, BuiltModule, GroupResult, ModuleCache, ModuleSource

T = TypeVar("T")

#: Seconds after the planned end that the on-host deadline (and the watchdog) allow for teardown.
TEARDOWN_SLACK = 30


@dataclass(frozen=True)
class RunSettings:
    """How a run behaves; the CLI fills it from its options.

    ``grace`` is how long past its deadline a dead run's leftovers are kept
    before the watchdog or a sweep removes them.  ``setup_timeout`` bounds
    connect + facts + plan per host; the probe phase gets the duration plus
    ``teardown_timeout``.
    """

    ssh: SSHOptions = field(default_factory=SSHOptions)
    duration: float | None = None
    event_cap: int | None = None
    forks: int = 200
    setup_timeout: float = 60.0
    teardown_timeout: float = 30.0
    grace: int = 60
    mount_tracefs: bool = False
    allow_modules: bool = False
    buffer_kb: int | None = None
    run_id: str | None = None
    teardown_slack: int = TEARDOWN_SLACK

    def deadline(self, clock_offset: float, duration: float) -> int:
        """The host's epoch second by which a run of ``duration`` starting now is over, teardown slack included."""
        return int(time.time() + clock_offset + duration + self.teardown_slack)

    #: Opens a Session to a host; None is asyncssh (transport.connect). ``--transport fabric`` sets
    #: fleetprobe.fabric.connect. One hook, so no stage branches on the transport.
    connect: Callable[[Host, SSHOptions], Awaitable[Session]] | None = None
    #: Called with each host's facts as they are gathered (the history store keeps them).
    on_facts: Callable[[str, Facts], None] | None = None
    #: Where kernel modules are built: ``auto`` (a host of the group that can, else the controller for
    #: a Debian kernel with a cross compiler), ``host`` or ``controller`` (see fleetprobe.build).
    build_at: str = "auto"
    #: Built-module cache; None is ``$FLEETPROBE_CACHE``/``~/.cache/fleetprobe`` (build.ModuleCache).
    module_cache: Path | None = None

    async def open_session(self, host: Host) -> Session:
        """Connect to ``host`` with the configured transport."""
        return await (self.connect or connect)(host, self.ssh)


class Observer(Protocol):
    """Receives progress for the live view (must be cheap: called from the event loop)."""

    def set_state(self, host: str, state: str, detail: str = "") -> None: ...
    def add_events(self, host: str, n: int) -> None: ...


class NullObserver:
    """An observer that ignores everything."""

    def set_state(self, host: str, state: str, detail: str = "") -> None:
        """Ignore."""

    def add_events(self, host: str, n: int) -> None:
        """Ignore."""


class _HostCap:
    """Counts one host's events per probe and enforces the playbook's event cap.

    Sits between the stream and the fleet aggregate (the hot path: batches of
    rows per chunk), so an event over the cap is counted as ``capped`` and
    neither aggregated nor written.
    """

    __slots__ = ("aggregate", "cap", "accepted", "capped", "counts", "written")

    def __init__(self, aggregate: LineSink, cap: int) -> None:
        self.aggregate = aggregate
        self.cap = cap
        self.accepted = 0
        self.capped = 0
        self.counts: Counter[str] = Counter()
        self.written = 0

    def add_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Count and forward a batch, cut at the cap."""
        room = max(self.cap - self.accepted, 0)
        if len(batch) > room:
            self.capped += len(batch) - room
            batch = batch.head(room)
        if not len(batch):
            return
        self.accepted += len(batch)
        for name, n in batch.counts.items():
            self.counts[probes[name]] += n
        add_batch = getattr(self.aggregate, "add_batch", None)
        if add_batch is not None:
            add_batch(host, batch, probes)
        else:
            for event in batch.events(probes):
                self.aggregate.add_line(host, *event)

    def add_line(self, host: str, probe: str, trace_ts: float, time: float, cpu: int, pid: int,
                 comm: str, args: str) -> None:
        """Count and forward one event unless the cap is reached."""
        if self.accepted >= self.cap:
            self.capped += 1
            return
        self.accepted += 1
        self.counts[probe] += 1
        self.aggregate.add_line(host, probe, trace_ts, time, cpu, pid, comm, args)

    def keep_for_writer(self) -> bool:
        """Whether the raw-event writer may write the next event (the same first ``cap`` events)."""
        if self.written >= self.cap:
            return False
        self.written += 1
        return True

    def take_for_writer(self, n: int) -> int:
        """How many of the next ``n`` events the writer may write (keep_for_writer for a whole batch)."""
        k = min(n, max(self.cap - self.written, 0))
        self.written += k
        return k


@dataclass
class HostFacts:
    """Facts of one host with the measured clock offset (host realtime minus controller realtime)."""

    host: Host
    facts: Facts | None = None
    error: HostError | None = None
    clock_offset: float | None = None
    clock_error: float | None = None


def _facts_words(playbook: Playbook | None, mount: bool) -> tuple[list[str], list[str]]:
    """The kernel symbols a playbook names, and the facts script's arguments for it."""
    symbols = playbook.kernel_symbols() if playbook else []
    tps = playbook.tracepoints() if playbook else []
    binaries = playbook.user_binaries() if playbook else []
    return symbols, facts_args(symbols, tps, binaries, mount=mount)


async def gather_facts(session: Session, playbook: Playbook | None, *, mount: bool,
                       timeout: float) -> tuple[Facts, float, float]:
    """Run the facts script once; return facts and the clock offset with its uncertainty.

    The script prints the host's realtime first: the time its line arrives,
    against the time we asked, bounds the offset the way NTP does.
    """
    symbols, words = _facts_words(playbook, mount)
    stream = await session.stream(script_command(session.host, "fleetprobe-facts", *words))
    stream.write(script_input(facts_script()))
    stream.write_eof()
    facts, offset, error, _ = await _read_facts(stream, session.host.name, symbols, timeout, keep_open=False)
    return facts, offset, error


@dataclass
class RunnerChannel:
    """A host's runner, started for its facts and kept waiting for the plan (one channel per run).

    ``rest``: what the runner printed after its facts, before it was sent anything (normally nothing).
    """

    stream: Stream
    rest: bytes = b""


async def start_runner(session: Session, playbook: Playbook, *, mount: bool,
                       timeout: float) -> tuple[RunnerChannel, Facts, float, float]:
    """Start the runner and read the host's facts from it; it then waits for its plan on the same channel.

    One channel instead of a facts channel and a runner channel: each channel costs the
    controller a dozen SSH packets to encrypt or decrypt (issue 5).  The offset and error are
    the facts' NTP-style estimate; the ping sent with the plan usually replaces them.
    """
    symbols, words = _facts_words(playbook, mount)
    stream = await session.stream(script_command(session.host, "fleetprobe-runner", "facts", *words))
    stream.write(script_input(runner_script()))
    try:
        facts, offset, error, rest = await _read_facts(stream, session.host.name, symbols, timeout,
                                                       keep_open=True)
    except BaseException:
        stream.close()
        raise
    return RunnerChannel(stream, rest), facts, offset, error


#: The line that ends the facts output.
_FACTS_END = b"\n@@end\n"


async def _read_facts(stream: Stream, host: str, symbols: list[str], timeout: float, *,
                      keep_open: bool) -> tuple[Facts, float, float, bytes]:
    """Read facts output from a script just sent on ``stream``: facts, clock offset, its error, bytes after them.

    The facts script exits after ``@@end``; the runner (``keep_open``) stays, waiting for its plan.
    """
    # Measured from when the script is sent: the channel's set-up round trip is not part of the error.
    t0 = time.time()
    buf = bytearray()
    t_line: float | None = None
    end = -1
    status = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
                buf += chunk
                if t_line is None and buf.count(b"\n") >= 2:
                    t_line = time.time()
                if keep_open and (end := buf.find(_FACTS_END)) >= 0:
                    break
            if end < 0:
                status = await stream.wait(timeout)
    except TimeoutError:
        stream.close()
        raise HostError(host, "facts", f"facts script did not finish in {timeout:.0f}s") from None
    rest = b""
    if end >= 0:
        rest = bytes(buf[end + len(_FACTS_END):])
        del buf[end + len(_FACTS_END):]
    text = buf.decode("utf-8", "replace")
    if status != 0 or "@@end" not in text:
        raise HostError(host, "facts", f"facts script failed (exit {status})",
                        evidence=stream.stderr().decode("utf-8", "replace")[-600:] or text[-300:],
                        hint="is the login shell POSIX sh compatible, and (with become) is sudo -n allowed?")
    facts = parse_facts(host, text, symbols)
    t_line = t_line or time.time()
    offset = facts.realtime - (t0 + t_line) / 2 if facts.realtime else 0.0
    error = (t_line - t0) / 2 + (1.0 if facts.realtime == int(facts.realtime) else 0.0)
    return facts, offset, error, rest


class ElfOffsets:
    """Resolves uprobe (binary, symbol) to file offsets, fetching each distinct binary once per run.

    Hosts with the same binary (same md5) share one fetch and one ELF parse:
    a fleet of 300 identical hosts costs one transfer, not 300.
    """

    def __init__(self) -> None:
        self._results: dict[tuple[str, str], asyncio.Future[int | str]] = {}

    async def resolve(self, session: Session, facts: Facts,
                      targets: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int | str]:
        """Offsets (or reasons) for this host's uprobe targets."""
        out: dict[tuple[str, str], int | str] = {}
        by_path: dict[str, list[str]] = {}
        for path, symbol in targets:
            by_path.setdefault(path, []).append(symbol)
        for path, symbols in by_path.items():
            ff = facts.files.get(path)
            if ff is None or not ff.exists:
                for s in symbols:
                    out[(path, s)] = f"{path} does not exist on this host"
                continue
            keys = [(ff.md5, s) for s in symbols]
            if any(k not in self._results for k in keys):
                loop = asyncio.get_running_loop()
                futs = {k: loop.create_future() for k in keys if k not in self._results}
                self._results.update(futs)
                try:
                    data = await session.get(path)
                except HostError as exc:
                    for k, f in futs.items():
                        f.set_result(f"cannot read {path}: {exc.evidence or exc.message}")
                else:
                    from . import elf

                    for (_, sym), f in futs.items():
                        try:
                            f.set_result(elf.symbol_file_offset(data, sym))
                        except ValueError as exc:
                            f.set_result(str(exc))
            for (md5, s) in keys:
                out[(path, s)] = await self._results[(md5, s)]
        return out


class ModuleBuilds:
    """Builds each (arch, kernel release, module source) once per run; every host of that group awaits it.

    The first host of a group to arrive starts the build (on the controller,
    or on itself when it is the chosen build host) under an asyncio future;
    the others await the same future, so N hosts of one kernel cost one build
    (or one cache hit).  A host that can neither build nor have the controller
    build for it waits until every host has finished its setup, in case a host
    of its kernel that can build turns up, and then fails with the planner's
    reason.  ``results`` lists the group results in the order builds started:
    a result's position + 1 is its build number in this run.
    """

    def __init__(self, where: str = "auto", cache: ModuleCache | None = None,
                 have_program: Callable[[str], bool] | None = None) -> None:
        """Build at ``where`` (auto/host/controller) into ``cache``; ``have_program`` as in plan_builds."""
        self.where = where
        self._cache = cache
        self.have_program = have_program
        self.results: list[GroupResult] = []
        self._sources: dict[str, ModuleSource] = {}
        self._builds: dict[BuildKey, asyncio.Future[GroupResult]] = {}

    @property
    def cache(self) -> ModuleCache:
        """The build cache, opened when a run first needs a module."""
        if self._cache is None:
            from .build import ModuleCache

            self._cache = ModuleCache()
        return self._cache

    def source(self, path: str) -> ModuleSource:
        """The module folder's source, read and hashed once per run."""
        from .build import load_module_source

        src = self._sources.get(path)
        if src is None:
            src = self._sources[path] = load_module_source(path)
        return src

    def build_number(self, key: BuildKey) -> int:
        """1-based position of ``key``'s build in this run (0: none)."""
        for i, r in enumerate(self.results):
            if r.group.key == key:
                return i + 1
        return 0

    async def module_for(self, facts: Facts, source: ModuleSource, everyone_set_up: asyncio.Event,
                         session: BuildSession | None = None) -> BuiltModule:
        """This host's built module (shared with its group), or a HostError (stage ``build``) saying why not.

        ``session`` is the host's own, used when the host is the one that builds.
        """
        from .build import build_group, plan_builds

        host = facts.host
        kwargs = {"have_program": self.have_program} if self.have_program else {}
        (group,) = plan_builds([facts], [source], where=self.where, **kwargs)
        key = group.key
        fut = self._builds.get(key)
        if fut is None and group.where == "none" and not group.blocked:
            await everyone_set_up.wait()
            fut = self._builds.get(key)
        if fut is None:
            if group.where == "none":
                raise HostError(host, "build", f"cannot build {key}: {group.error or group.reason}",
                                hint=group.hint)
            fut = asyncio.get_running_loop().create_future()
            self._builds[key] = fut
            try:
                result = await build_group(group, cache=self.cache, session=session)
            except BaseException as exc:
                # Waiters must not hang on a build that died (a dropped link, a bug): they get its error.
                fut.set_exception(HostError(host, "build", f"the build of {key} on {host} broke off: {exc}"))
                fut.exception()  # mark retrieved: a group nobody else awaits must not warn
                raise
            self.results.append(result)
            fut.set_result(result)
        result = await asyncio.shield(fut)
        if result.module is None:
            err = result.error
            message = f"{err.where}: {err.message}" if err else f"build of {key} failed"
            raise HostError(host, "build", message, evidence=(err.evidence if err else None) or None,
                            hint=err.hint if err else None)
        return result.module

    def describe(self, module: BuiltModule) -> str:
        """Where a host's module came from, for its outcome: ``built on the controller, build 2 of this run``."""
        if module.where == "cache":
            how = "from the controller's module cache"
        elif module.where == "host":
            group = next((r.group for r in self.results if r.group.key == module.key), None)
            how = f"built on {group.build_host if group else 'a host'} in {module.seconds:.1f}s"
        else:
            how = f"built on the controller in {module.seconds:.1f}s"
        return f"{module.key.module}@{module.key.source_hash[:8]} {how}, build {self.build_number(module.key)} of this run"


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
                    interrupted: asyncio.Event | None = None) -> list[HostOutcome]:
    """Probe every host with the playbook; one HostOutcome per host, in inventory order.

    Events go to ``aggregate.add_line`` as they arrive and, when given, to
    ``on_event`` as parsed TraceEvents, or to ``events`` (the raw-event file, see
    report.EventWriter) as the rows the kernel printed: one of the two, not both.
    """
    if on_event is not None and events is not None:
        raise ValueError("run_fleet: pass on_event or events, not both")
    hosts = list(hosts)
    fr = FleetRun(playbook=playbook, settings=settings, aggregate=aggregate, on_event=on_event, events=events,
                  observer=observer or NullObserver(),
                  run_id=settings.run_id or new_run_id(), interrupted=interrupted or asyncio.Event(),
                  setup_slots=asyncio.Semaphore(max(1, settings.forks)),
                  modules=ModuleBuilds(settings.build_at, _module_cache(settings.module_cache)),
                  in_setup=len(hosts))
    if not hosts:
        fr.everyone_set_up.set()
    return list(await asyncio.gather(*(_run_host(fr, h) for h in hosts)))


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
            out.status, out.reason = "interrupted", "interrupted before connecting"
            return None
        obs.set_state(host.name, "connecting")
        session = await s.open_session(host)
        runner: RunnerChannel | None = None
        try:
            out.stage = "facts"
            obs.set_state(host.name, "facts")
            runner, facts, offset, error = await start_runner(session, fr.playbook, mount=s.mount_tracefs,
                                                              timeout=s.setup_timeout)
            out.arch, out.kernel_release, out.boot_id = facts.arch, facts.kernel_release, facts.boot_id
            out.clock_offset, out.clock_error = offset, error
            if s.on_facts is not None:
                s.on_facts(host.name, facts)
            out.stage = "plan"
            obs.set_state(host.name, "planning")
            offsets = await fr.elf_offsets.resolve(session, facts, fr.playbook.uprobe_targets())
            deadline = s.deadline(offset, fr.duration)
            plan = plan_host(fr.playbook, facts, run_id=fr.run_id, deadline=deadline, uprobe_offsets=offsets)
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
            async with asyncio.timeout(fr.settings.setup_timeout * 2):
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
        if fr.playbook.needs_module_consent() and (blocker := _module_load_blocker(facts)):
            # A module playbook on a host that can never load one is a failure, not a quiet skip.
            out.stage = "build"
            raise HostError(host.name, "build", f"cannot load kernel modules: {blocker}",
                            hint="run tracefs probes on this host instead (drop it from the module playbook)")
        if plan.failed:
            out.status, out.reason = "failed", plan.failed
            obs.set_state(host.name, "failed", plan.failed)
            return out
        if not plan.probes:
            out.status = "skipped"
            out.reason = "no probe can be placed: " + "; ".join(f"{k}: {v}" for k, v in out.skipped_probes.items())
            obs.set_state(host.name, "skipped", out.reason)
            return out
        if facts.tracefs is None:
            raise HostError(host.name, "plan", "tracefs is not mounted",
                            hint="mount it (mount -t tracefs nodev /sys/kernel/tracing) or pass --mount-tracefs")
        loads: tuple[ModuleLoad, ...] = ()
        if any(p.kind == "module" for p in plan.probes):
            out.stage = "build"
            obs.set_state(host.name, "building")
            loads = await _prepare_modules(fr, session, facts, plan, out)
        out.stage = "probe"
        obs.set_state(host.name, "probing")
        # After a long build the planned deadline may be near: probes get the whole duration.
        plan = fr.plans[host.name] = with_later_deadline(
            plan, fr.settings.deadline(out.clock_offset or 0.0, fr.duration))
        probe_runner, runner = runner, None
        await _probe(fr, session, probe_runner, facts, plan, out, loads)
    except HostError as exc:
        out.status = "unreachable" if isinstance(exc, TransportError) and exc.stage == "connect" else "failed"
        if isinstance(exc, TransportError) and out.stage == "probe":
            out.status = "failed"
        out.stage = exc.stage if out.stage in ("connect",) else out.stage
        out.reason = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        out.evidence = exc.evidence or ""
        obs.set_state(host.name, out.status, exc.message)
    except asyncio.CancelledError:
        out.status, out.reason = "interrupted", "cancelled"
        raise
    except Exception as exc:  # noqa: BLE001 - one host's bug must never end the whole run
        out.status, out.reason = "failed", f"internal error: {type(exc).__name__}: {exc}"
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


def _module_load_blocker(facts: Facts) -> str | None:
    """build.module_load_blocker, imported only for module playbooks."""
    from .build import module_load_blocker

    return module_load_blocker(facts)


def _module_cache(path: Path | None) -> ModuleCache | None:
    """The build cache at ``path`` (None: the default, opened when first needed)."""
    if not path:
        return None
    from .build import ModuleCache

    return ModuleCache(path)


#: What a module name, run id, probe name and parameter must look like: the modules print them as
#: key=value tokens (fp_kprobe refuses others) and the runner splits its directives at blanks.
_MODULE_WORD = re.compile(r"[A-Za-z0-9_.+-]+")


def load_name(group: str, probe: str) -> str:
    """The kernel module name of ``probe``'s module in the run and host of ``group`` (fp_<run>_<host>)."""
    name = f"{group}_{probe}"
    if len(name) > 55:  # MODULE_NAME_LEN - 1 on 64-bit kernels
        name = f"{group}_{hashlib.sha256(probe.encode()).hexdigest()[:8]}"
    return name


async def _prepare_modules(fr: FleetRun, session: Session, facts: Facts, plan: HostPlan,
                           out: HostOutcome) -> tuple[ModuleLoad, ...]:
    """Build (once per group), check and copy this host's modules; what the runner must insmod.

    Each failure is this host's HostError with the compiler's or kernel's words:
    no build tree or compiler, a build error, a vermagic mismatch.
    """
    from .build import verify_on_host, with_module_name

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
        # The .ko goes to a path as unique; the runner deletes it right after insmod.
        name = load_name(plan.group, p.name)
        remote = f"/tmp/{name}.ko"
        try:
            ko = with_module_name(module.data(), name, name=str(module.path))
        except ValueError as exc:  # ElfFormatError too: a .ko fleetprobe cannot rename
            raise HostError(host, "build", f"cannot give {source.name}.ko its run's name {name}: {exc}",
                            hint="is the module built by the kernel's Kbuild (a struct module in "
                                 ".gnu.linkonce.this_module)?") from None
        try:
            await session.put(ko, remote, 0o600)
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
    counter = _HostCap(fr.aggregate, fr.event_cap)
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

    def on_control(text: str) -> None:
        report.handle(text)
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

    parser = TraceStream(host, names, aggregate=counter, on_event=on_event if write and sink is None else None,
                         on_batch=on_batch if sink is not None else None, on_control=on_control, clock=clock)
    deadline = int(plan.instance.rsplit("_", 1)[1])
    directives = plan_directives(plan, tracefs=facts.tracefs or "/sys/kernel/tracing", duration=fr.duration,
                                 deadline=deadline, grace=s.grace, buffer_kb=s.buffer_kb, modules=modules)
    module_probes = {p.name for p in plan.probes if p.kind == "module"}
    splitter = MarkerSplitter() if modules else None
    kmsg = KmsgCollector(host, fr.run_id)

    def take_records(data: bytes) -> None:
        """Module lines of this run into the same cap, aggregate and event file as tracefs events."""
        for ev in kmsg.feed(data) if data else kmsg.flush():
            if ev.probe not in module_probes:
                continue
            if ev.pid in report.own_pids:
                # A module's probe sees the runner's own forks and execs (no kernel filter reaches it).
                parser.stats.own_events += 1
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
        if fr.interrupted.is_set() or now - t0 > fr.duration + s.teardown_timeout:
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
        except asyncio.TimeoutError:
            status = -1
    finally:
        guard.cancel()
        if fr.interrupted.is_set() and not report.bye:
            stop()
    out.events = counter.accepted
    out.hits = dict(counter.counts)
    loss = report.loss(plan.group)
    loss.lost_lines = parser.stats.lost_events
    loss.capped = counter.capped
    module_failures = _module_results(plan, modules, report, kmsg, out, loss)
    out.loss = loss
    out.unparsed_lines = parser.stats.unparsed
    out.unattributed_lines = parser.stats.unknown_lines
    out.unattributed = dict(parser.stats.unknown)
    out.unattributed_examples = list(parser.stats.unknown_examples)
    out.own_pids, out.own_unfiltered = list(report.own_pids), dict(report.own_unfiltered)
    out.own_events = parser.stats.own_events
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
    if report.enabled == 0 and not report.loaded:
        raise HostError(host, "probe", "the kernel refused every probe",
                        evidence="; ".join(f"{k}: {v}" for k, v in report.refused.items()) or None)
    out.status = "interrupted" if fr.interrupted.is_set() else "ok"
    out.stage = "done"
    fr.observer.set_state(host, "done" if out.status == "ok" else out.status, f"{counter.accepted} events")


def _module_results(plan: HostPlan, modules: tuple[ModuleLoad, ...], report: RunnerReport,
                    kmsg: KmsgCollector, out: HostOutcome, loss: LossCounters) -> list[str]:
    """Fold what the modules said into the outcome; return why each module that failed failed.

    The module's own totals at rmmod: ``missed`` (hits the kernel skipped because a kprobe was
    already running on that CPU) into probe_misses, lines its rate limit suppressed into
    ``capped`` (dropped by a cap, like the event cap); records lost from the kernel log
    (sequence gaps) into ``kmsg_gaps``.
    """
    if not modules:
        return []
    loss.kmsg_gaps = kmsg.stream.lost
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
    return failures


#: Seconds without the runner's 5-second clock marker before it is presumed dead.
HEARTBEAT_TIMEOUT = 20
#: How often the controller wakes the runner for its heartbeat marker ("tick" on its stdin).
TICK_SECONDS = 5


def runner_silent(idle: float, last_marker_ts: float | None, last_trace_ts: float) -> bool:
    """Has the runner stopped writing its 5-second clock markers for HEARTBEAT_TIMEOUT?

    Judged in the host's trace time, not by when the controller happens to read:
    a controller behind a busy stream reads old data, markers included, late.
    Dead when events read go HEARTBEAT_TIMEOUT (trace time) past the last marker
    (the killed runner's reader still streams), or when nothing at all arrived
    for that long (``idle``, controller seconds: a live runner always writes
    markers, so silence cannot be backlog).
    """
    if idle > HEARTBEAT_TIMEOUT:
        return True
    return last_marker_ts is not None and last_trace_ts - last_marker_ts > HEARTBEAT_TIMEOUT


async def _runner_once(session: Session, directives: str, timeout: float) -> RunnerReport:
    """Run the runner for one directive (a sweep, a dead run's teardown) and read what it said."""
    r = await session.run(script_command(session.host, "fleetprobe-runner"),
                          input=script_input(runner_script()) + directives.encode(), timeout=timeout)
    rep = RunnerReport()
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("@@fp "):
            rep.handle(line[5:])
    return rep


async def _teardown_for_dead_runner(session: Session, plan: HostPlan, facts: Facts,
                                   modules: tuple[str, ...] = (), processes: tuple[str, ...] = ()) -> str:
    """Remove a run's modules, group, instance and left processes over the same connection when its runner died."""
    try:
        rep = await _runner_once(session, teardown_directives(plan, facts.tracefs or "/sys/kernel/tracing",
                                                              modules, processes), timeout=60)
    except HostError as exc:
        return f"timer (controller teardown failed: {exc.message})"
    return "controller" if rep.clean else "timer (controller teardown incomplete)"


async def _oopses_since(session: Session, start: dict[str, int]) -> tuple[int, int] | None:
    """After a runner died: the kernel's oops/warn counts since its start snapshot (None if unknown)."""
    try:
        r = await session.run(shell_command(session.host, "cat /sys/kernel/oops_count /sys/kernel/warn_count"),
                              timeout=15)
        oops, warn = (int(x) for x in r.stdout.split()[:2])
    except (HostError, ValueError):
        return None
    return oops - start.get("oops", oops), warn - start.get("warn", warn)


def _event_name(p: object) -> str:
    """The dynamic event name a planned probe defines (the runner reports refusals by it)."""
    event = getattr(p, "event", "") or ""
    return event.rsplit("/", 1)[-1]


# --- facts, plan and cleanup across the fleet ------------------------------------------------

async def _on_each_host(hosts: Iterable[Host], settings: RunSettings,
                        work: Callable[[Host, Session], Awaitable[T]],
                        failed: Callable[[Host, HostError], T], observer: Observer | None = None) -> list[T]:
    """One short job per host over one connection each, ``forks`` at a time; a failure is a value."""
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
            except asyncio.TimeoutError:
                error = HostError(host.name, "connect", f"no answer within {settings.setup_timeout:.0f}s")
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

    return await _on_each_host(hosts, settings, work, lambda host, exc: HostFacts(host, error=exc), obs)


async def plan_fleet(hosts: Iterable[Host], playbook: Playbook, settings: RunSettings,
                     observer: Observer | None = None) -> list[tuple[HostFacts, HostPlan | None]]:
    """Facts and a plan for every host, changing nothing on any host."""
    run_id = settings.run_id or new_run_id()
    offsets = ElfOffsets()
    duration = settings.duration if settings.duration is not None else playbook.duration

    async def work(host: Host, session: Session) -> tuple[HostFacts, HostPlan | None]:
        facts, offset, error = await gather_facts(session, playbook, mount=False, timeout=settings.setup_timeout)
        uo = await offsets.resolve(session, facts, playbook.uprobe_targets())
        deadline = settings.deadline(offset, duration)
        return (HostFacts(host, facts, clock_offset=offset, clock_error=error),
                plan_host(playbook, facts, run_id=run_id, deadline=deadline, uprobe_offsets=uo))

    return await _on_each_host(hosts, settings, work, lambda host, exc: (HostFacts(host, error=exc), None),
                               observer)


def plan_module_builds(results: Iterable[tuple[HostFacts, HostPlan | None]],
                       where: str = "auto") -> list[BuildGroup]:
    """The build groups a run of these plans would build (``fleetprobe plan`` shows them); pure."""
    from .build import load_module_source, plan_builds

    facts: dict[str, Facts] = {}
    wanted: dict[str, list[ModuleSource]] = {}
    sources: dict[str, ModuleSource] = {}
    for hf, plan in results:
        if hf.facts is None or plan is None:
            continue
        for p in plan.probes:
            if p.kind == "module" and p.module:
                src = sources.get(p.module) or sources.setdefault(p.module, load_module_source(p.module))
                facts[hf.host.name] = hf.facts
                wanted.setdefault(hf.host.name, []).append(src)
    return plan_builds(facts, wanted, where=where) if facts else []


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

    return await _on_each_host(hosts, settings, work, lambda host, exc: CleanupResult(host.name, error=str(exc)))


def playbook_pairs(playbook: Playbook) -> dict[str, str]:
    """{return probe: entry probe} from the playbook itself."""
    return {p.name: p.pair_with for p in playbook.probes if p.pair_with}


async def run_playbook(hosts: Iterable[Host], playbook: Playbook, settings: RunSettings, *,
                       observer: Observer | None = None, events_path: str | None = None,
                       interrupted: asyncio.Event | None = None, inventory: str = "",
                       argv: list[str] | None = None) -> FleetReport:
    """The Python API's one call: run a playbook on hosts and return the merged report.

    Raw events go to ``events_path`` (JSON lines) as they arrive, never to memory.
    """
    from . import __version__

    aggregate = FleetAggregate(pairs=playbook_pairs(playbook))
    run_id = settings.run_id or new_run_id()
    settings = replace(settings, run_id=run_id)
    started = time.time()
    writer = None
    if events_path:
        from .report import EventWriter  # report imports rich: only when there is an event file

        writer = EventWriter(events_path)
    try:
        outcomes = await run_fleet(hosts, playbook, settings, aggregate,
                                   events=writer,
                                   observer=observer, interrupted=interrupted)
    finally:
        if writer is not None:
            writer.close()
    run = RunInfo(run_id=run_id, playbook=playbook.name, playbook_path=playbook.source,
                  playbook_sha256=playbook.sha256, started=started, ended=time.time(),
                  inventory=inventory, argv=list(argv or []), version=__version__)
    return FleetReport(run, aggregate, outcomes)
