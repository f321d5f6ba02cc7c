"""Workers: one run over every core of the bastion, as N worker processes and one merged report.

One event loop is one core: ~3.6 ms controller CPU per host (bench/RESULTS.md) caps a single
loop near 250-300 hosts/s whatever the machine.  :func:`run_playbook_workers` splits the hosts
into N slices (round robin, in inventory order) and starts one worker process per slice
(``python -m fleetprobe.workers``), each running today's pipeline
(:func:`fleetprobe.orchestrate.run_fleet`) on its own event loop.  The parent:

* folds each worker's partial aggregate as it arrives (every :data:`SEND_SECONDS`: the hosts
  that ended since the last one, with their outcomes; :meth:`FleetAggregate.absorb`), so the
  report is the same value one loop would have built (tests/test_workers.py checks it);
* keeps the live view: each worker forwards its observer calls (per-host states, event counts);
* keeps each host's facts for the history store (``settings.on_facts``) and stores one run;
* writes ``--events`` as one file during the run, and ``--events -`` / ``--print`` on its stdout:
  each worker appends its hosts' whole lines itself to the descriptors the parent opened, under
  one lock (fleetprobe.eventout says why the workers write and not the parent); a host's lines
  keep their order (a host is in one worker), and a killed parent leaves the file whole;
* forwards Ctrl-C: the workers run in their own sessions (the terminal's SIGINT reaches only
  the parent), the first interrupt is passed on as SIGINT (each worker stops its runners, which
  tear down and say "clean"), a second as a second SIGINT (the worker cancels its hosts);
  a worker whose parent dies sees EOF on its stdin and stops the same way;
* reports a worker that dies mid-run: each of its hosts whose results had not reached the
  parent is FAILED with the worker's exit and stderr as evidence; the hosts of other workers,
  and its own hosts already sent, keep their data.  The runners of its hosts see their SSH
  link drop and remove their probes (their on-host timer does by the deadline otherwise).

``--forks`` stays a bound for the whole fleet: each worker gets its share (at most ``forks``
workers).  Module playbooks run on one loop: a module is built once per (arch, kernel
release, source) for all hosts of a run, and those hosts may sit in any slice.

Messages from a worker are pickled lists on its stdout, each frame a 4-byte length and the
pickle: the parent trusts its own child, never a host (what a host sent is already parsed
and bounded inside the worker, as in one loop).
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import resource
import signal
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fleetprobe.eventout import EventOutputs, Forwarded, Shared
from fleetprobe.facts import Facts
from fleetprobe.aggtables import AggProgress, AggResults, AggTable, HostTable
from fleetprobe.inventory import Host
from fleetprobe.merge import FleetAggregate
from fleetprobe.orchestrate import playbook_pairs, run_fleet, run_playbook
from fleetprobe.outcome import HostOutcome, Stage, Status
from fleetprobe.parse import EventBatch
from fleetprobe.plan import new_run_id
from fleetprobe.playbook import Playbook
from fleetprobe.results import FleetReport, RunInfo
from fleetprobe.settings import NullObserver, Observer, RunSettings
from fleetprobe.version import __version__

#: How often a worker sends what it has (states, event counts, facts, finished hosts).
SEND_SECONDS = 0.2
#: Bytes of a worker's stderr kept as evidence should it die.
STDERR_TAIL = 4000
#: How long the parent waits for workers to end after a second interrupt, before killing them.
CANCEL_WAIT = 10.0
_FRAME = struct.Struct(">I")
#: The live view's states, and the stage each means (a host whose worker died failed there).
_STAGE_OF_STATE = {"connecting": Stage.CONNECT, "facts": Stage.FACTS, "planning": Stage.PLAN,
                   "building": Stage.BUILD, "probing": Stage.PROBE}


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, as ``nproc`` counts them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_count(requested: int | None, hosts: int, forks: int, playbook: Playbook) -> int:
    """How many worker processes a run uses (1 = the single loop, in this process).

    Never more than the hosts or ``forks`` (each worker needs one setup slot of the fleet-wide
    bound); 1 for a module playbook (builds are shared across all its hosts in one process).
    """
    n = default_workers() if requested is None else requested
    if playbook.needs_module_consent():
        return 1
    return max(1, min(n, hosts, forks))


def split_hosts(hosts: Sequence[Host], n: int) -> list[list[Host]]:
    """``n`` slices, round robin in inventory order (a slow group is spread over every worker)."""
    return [list(hosts[i::n]) for i in range(n)]


def fork_shares(forks: int, n: int) -> list[int]:
    """``forks`` split over ``n`` workers (each at least 1, the sum ``forks`` when ``forks >= n``)."""
    return [max(1, forks // n + (1 if i < forks % n else 0)) for i in range(n)]


# --- the worker process ----------------------------------------------------------------------------

@dataclass
class WorkerStats:
    """What one worker process cost, as it said at its end (benchmarks report it)."""

    index: int
    pid: int
    hosts: int
    cpu_seconds: float
    peak_rss_kib: int


@dataclass
class WorkerJob:
    """What a worker runs: its slice, the playbook, the settings (its share of forks), where events go."""

    index: int
    hosts: list[Host]
    playbook: Playbook
    settings: RunSettings
    #: Where raw events go: a local worker's inherited descriptors, a cluster task's sends to the client.
    outputs: Shared | Forwarded | None = None


class _RoutedResults(AggResults):
    """The run's ``aggregate:`` results, each host's tables going to that host's own aggregate."""

    def __init__(self, sink: _PerHost) -> None:
        super().__init__()
        self._sink = sink

    def add_host(self, host: str, tid: str, part: HostTable, table: AggTable | None) -> None:
        """Route to the host's aggregate (see _PerHost); the host parts stay here too (small), so the
        live view's final line for the host (hist.final_progress) reads them as on one loop."""
        self._sink.aggregate(host).aggregates.add_host(host, tid, part, table)
        self.hosts.setdefault(host, {})[tid] = part


class _PerHost:
    """A LineSink keeping one FleetAggregate per host, so a host that ends is sent on its own.

    run_fleet folds everything into one aggregate; a worker must instead hand each host's
    numbers to the parent when that host ends, while the others still stream.
    """

    def __init__(self, pairs: Mapping[str, str]) -> None:
        self.pairs = dict(pairs)
        self.open: dict[str, FleetAggregate] = {}
        self.aggregates: AggResults = _RoutedResults(self)

    def aggregate(self, host: str) -> FleetAggregate:
        """The host's aggregate, made on first use."""
        agg = self.open.get(host)
        if agg is None:
            agg = self.open[host] = FleetAggregate(self.pairs)
        return agg

    def add_line(self, host: str, probe: str, trace_ts: float, time: float, cpu: int, pid: int,
                 comm: str, args: str) -> None:
        """One event, to its host's aggregate."""
        self.aggregate(host).add_line(host, probe, trace_ts, time, cpu, pid, comm, args)

    def add_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """A batch of one host's events, to its host's aggregate."""
        self.aggregate(host).add_batch(host, batch, probes)

    def finished(self, outcome: HostOutcome) -> FleetAggregate:
        """The host's aggregate with its outcome folded in; forgotten here."""
        agg = self.open.pop(outcome.host, None) or FleetAggregate(self.pairs)
        agg.add_host(outcome)
        return agg


class _Outbox:
    """What a worker tells its parent, sent every SEND_SECONDS as one frame (and at the end)."""

    def __init__(self, put: Callable[[list[tuple[Any, ...]]], None], pairs: Mapping[str, str]) -> None:
        self.put = put
        self.pairs = dict(pairs)
        self.messages: list[tuple[Any, ...]] = []
        self.events: dict[str, int] = {}
        self.chunk: FleetAggregate | None = None
        self.aggs: dict[str, tuple[AggProgress, ...]] = {}

    def set_state(self, host: str, state: str, detail: str = "") -> None:
        """Observer: a host's live state."""
        self.messages.append(("state", host, state, detail))

    def add_events(self, host: str, n: int) -> None:
        """Observer: events counted on a host (added up until the next send)."""
        self.events[host] = self.events.get(host, 0) + n

    def set_aggregates(self, host: str, progress: tuple[AggProgress, ...]) -> None:
        """Observer: a host's aggregate tables so far (only the latest per host is sent)."""
        self.aggs[host] = progress

    def probes_live(self, host: str, n: int) -> None:
        """Observer (optional part): the host's ``n`` probes are in place."""
        self.messages.append(("live", host, n))

    def facts(self, host: str, facts: Facts) -> None:
        """settings.on_facts: the parent keeps them for the store."""
        self.messages.append(("facts", host, facts))

    def host_done(self, agg: FleetAggregate) -> None:
        """A finished host's aggregate, folded into the chunk of the next send."""
        if self.chunk is None:
            self.chunk = FleetAggregate(self.pairs)
        self.chunk.absorb(agg)

    def send(self, *last: tuple[Any, ...]) -> None:
        """Hand everything pending to ``put`` as one list (a frame on the pipe, a cluster queue item)."""
        items: list[tuple[Any, ...]] = []
        if self.events:
            items.append(("events", self.events))
            self.events = {}
        items += self.messages
        self.messages = []
        if self.aggs:
            items.append(("aggs", self.aggs))
            self.aggs = {}
        if self.chunk is not None:
            items.append(("hosts", self.chunk))
            self.chunk = None
        items += last
        if items:
            self.put(items)


async def _worker(job: WorkerJob, out: asyncio.StreamWriter) -> int:
    """Run the job's slice and stream its results to the parent on ``out``; the exit status."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None

    signals = 0

    def on_signal() -> None:
        # As the CLI's single loop: the first stops the runners (they tear down), the second cancels.
        # Counted, not read off ``interrupted``: a worker that stopped by itself (stdout's reader gone)
        # then gets the parent's first SIGINT, which must not cancel its teardown.
        nonlocal signals
        signals += 1
        if signals > 1:
            main.cancel()
        interrupted.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    def on_stdin() -> None:
        # The parent keeps our stdin open for the whole run: EOF means it is gone.
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            interrupted.set()

    loop.add_reader(0, on_stdin)

    def frame(items: list[tuple[Any, ...]]) -> None:
        data = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_FRAME.pack(len(data)) + data)

    await run_slice(job, frame, interrupted)
    # drain() returns once the buffer is below its high-water mark, not empty: with the parent slow
    # to read (a busy machine) the end of the last frame, the hosts that ended last, would be lost
    # when the loop closes. With no high-water mark, drain() waits for every byte to be written.
    out.transport.set_write_buffer_limits(high=0)
    try:
        await out.drain()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the parent is gone (killed): our hosts tore down and our events are on disk
    return 0


async def run_slice(job: WorkerJob, put: Callable[[list[tuple[Any, ...]]], None],
                    interrupted: asyncio.Event, every: float = SEND_SECONDS) -> None:
    """The job's slice through run_fleet; what a parent needs goes to ``put`` every ``every`` seconds
    (one list of everything pending), ``done`` last.

    A local worker's ``put`` writes a frame on its stdout; a cluster task's puts a Dask queue item.
    """
    loop = asyncio.get_running_loop()
    pairs = playbook_pairs(job.playbook)
    box = _Outbox(put, pairs)
    sink = _PerHost(pairs)
    settings = replace(job.settings, on_facts=box.facts)

    def stdout_closed() -> None:
        # Our hosts stop now; the parent hears it at once and stops the other workers (as one loop does).
        interrupted.set()
        box.messages.append(("stdout_closed",))
        box.send()

    opened = job.outputs.open_in_worker(stdout_closed) if job.outputs is not None else None
    ticker: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal ticker
        box.send()
        ticker = loop.call_later(every, tick)

    ticker = loop.call_later(every, tick)
    try:
        await run_fleet(job.hosts, job.playbook, settings, sink, events=opened.sink if opened else None,
                        observer=box, interrupted=interrupted, on_outcome=lambda o: box.host_done(sink.finished(o)))
    finally:
        ticker.cancel()
        if opened is not None:
            opened.close()
    use = resource.getrusage(resource.RUSAGE_SELF)
    writer = opened.counted if opened is not None else None
    box.send(("done", writer.written if writer else None, writer.error if writer else "",
              WorkerStats(job.index, os.getpid(), len(job.hosts), use.ru_utime + use.ru_stime, use.ru_maxrss)))


def worker_main() -> int:
    """``python -m fleetprobe.workers``: read one pickled WorkerJob on stdin, run it, report on stdout."""
    head = _read_exactly(0, _FRAME.size)
    job: WorkerJob = pickle.loads(_read_exactly(0, _FRAME.unpack(head)[0]))
    # Our stdout carries the frames: anything else printing to it (a library) goes to stderr.
    frames = os.dup(1)
    os.dup2(2, 1)

    async def go() -> int:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                            os.fdopen(frames, "wb", buffering=0))
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        try:
            return await _worker(job, writer)
        finally:
            transport.close()

    gc.freeze()  # as the CLI does: collections stop walking the import-time objects
    try:
        return asyncio.run(go())
    except asyncio.CancelledError:
        return 130


def _read_exactly(fd: int, n: int) -> bytes:
    """``n`` bytes from ``fd`` (blocking), or SystemExit if it ends first."""
    parts: list[bytes] = []
    while n:
        data = os.read(fd, n)
        if not data:
            raise SystemExit("fleetprobe worker: the parent closed the job pipe before sending the job")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


# --- the parent ------------------------------------------------------------------------------------

@dataclass
class _Slice:
    """One slice of the hosts as the parent sees it, wherever it runs."""

    index: int
    hosts: list[Host]
    #: Hosts whose results arrived.
    reported: set[str] = field(default_factory=set)
    #: Last live state per host (where a host stood when its worker died).
    state: dict[str, str] = field(default_factory=dict)
    done: bool = False
    events_written: int | None = None
    events_error: str = ""


@dataclass
class _Child(_Slice):
    """A slice run by a local worker process."""

    proc: asyncio.subprocess.Process = field(kw_only=True)
    stderr: bytearray = field(default_factory=bytearray)
    problem: str = ""


class Merger:
    """The parent's side of a run over slices: one aggregate, the live view, facts, the lost hosts."""

    def __init__(self, playbook: Playbook, settings: RunSettings, observer: Observer | None,
                 stats: list[WorkerStats] | None) -> None:
        self.total = FleetAggregate(pairs=playbook_pairs(playbook))
        self.obs = observer or NullObserver()
        self.on_facts = settings.on_facts
        self.stats = stats
        #: Called once when a worker says stdout's reader is gone (``--print | head``).
        self.on_stdout_closed: Callable[[], None] | None = None
        self.started = time.time()

    def apply(self, sl: _Slice, items: list[tuple[Any, ...]]) -> None:
        """What one slice sent (see _Outbox.send), in order."""
        for item in items:
            kind = item[0]
            if kind == "state":
                _, host, state, detail = item
                sl.state[host] = state
                self.obs.set_state(host, state, detail)
            elif kind == "hosts":
                chunk: FleetAggregate = item[1]
                sl.reported.update(chunk.outcomes)
                self.total.absorb(chunk)
            elif kind == "done":
                sl.done, sl.events_written, sl.events_error = True, item[1], item[2]
                if self.stats is not None:
                    self.stats.append(item[3])
            else:
                self._tell(item)

    def _tell(self, item: tuple[Any, ...]) -> None:
        """The items that only inform (the live view, the store's facts, stdout's reader gone)."""
        kind = item[0]
        if kind == "events":
            for host, count in item[1].items():
                self.obs.add_events(host, count)
        elif kind == "live":
            live = getattr(self.obs, "probes_live", None)
            if live is not None:
                live(item[1], item[2])
        elif kind == "aggs":
            for host, progress in item[1].items():
                self.obs.set_aggregates(host, progress)
        elif kind == "facts":
            if self.on_facts is not None:
                self.on_facts(item[1], item[2])
        elif kind == "stdout_closed":
            told, self.on_stdout_closed = self.on_stdout_closed, None
            if told is not None:
                told()

    def fail_lost(self, sl: _Slice, why: str, evidence: str, cleanup: str) -> None:
        """Each host of ``sl`` whose results never arrived: FAILED where it stood, saying why."""
        for h in sl.hosts:
            if h.name in sl.reported:
                continue
            stage = _STAGE_OF_STATE.get(sl.state.get(h.name, ""), Stage.CONNECT)
            out = HostOutcome(host=h.name, status=Status.FAILED, stage=stage, started=self.started,
                              ended=time.time(), reason=why, evidence=evidence,
                              cleanup=cleanup if stage == Stage.PROBE else "not-needed")
            sl.reported.add(h.name)
            self.total.add_host(out)
            self.obs.set_state(h.name, "failed", why)

    def report(self, hosts: Sequence[Host], playbook: Playbook, run_id: str, inventory: str,
               argv: list[str] | None) -> FleetReport:
        """The run's report (every host has an outcome by now)."""
        run = RunInfo(run_id=run_id, playbook=playbook.name, playbook_path=playbook.source,
                      playbook_sha256=playbook.sha256, started=self.started, ended=time.time(),
                      inventory=inventory, argv=list(argv or []), version=__version__)
        return FleetReport(run, self.total, [self.total.outcomes[h.name] for h in hosts])


async def run_playbook_workers(hosts: Sequence[Host], playbook: Playbook, settings: RunSettings, *,
                               workers: int | None = None, observer: Observer | None = None,
                               events_path: str | None = None, outputs: EventOutputs | None = None,
                               interrupted: asyncio.Event | None = None, inventory: str = "",
                               argv: list[str] | None = None, stats: list[WorkerStats] | None = None) -> FleetReport:
    """:func:`fleetprobe.orchestrate.run_playbook` over worker processes: the same report.

    ``workers`` None: every core this process may use (see :func:`worker_count`); one worker
    is the single loop in this process, as is a run whose settings cannot go to another
    process (a ``connect`` hook that is not a module-level function).  Raw events go to
    ``outputs`` (``events_path`` alone is ``EventOutputs(path=events_path)``); the report's
    event counts are those of the user's destination (``--events -`` when given, else the file).
    ``stats`` gets each worker's CPU and peak memory as it ends.
    """
    if events_path and outputs is not None:
        raise ValueError("run_playbook_workers: pass events_path or outputs, not both")
    outputs = outputs or EventOutputs(path=events_path)
    hosts = list(hosts)
    n = worker_count(workers, len(hosts), settings.forks, playbook)
    if n > 1 and not _can_send(replace(settings, on_facts=None)):
        n = 1
    if n <= 1:
        return await _one_loop(hosts, playbook, settings, outputs, observer=observer, interrupted=interrupted,
                               inventory=inventory, argv=argv)
    interrupted = interrupted or asyncio.Event()
    run_id = settings.run_id or new_run_id()
    settings = replace(settings, run_id=run_id)
    merger = Merger(playbook, settings, observer, stats)
    merger.on_stdout_closed = outputs.on_stdout_closed
    shared = outputs.share() if outputs.any else None
    children: list[_Child] = []
    try:
        for i, (slice_, forks) in enumerate(zip(split_hosts(hosts, n), fork_shares(settings.forks, n))):
            job = WorkerJob(i, slice_, playbook, replace(settings, forks=forks, on_facts=None), shared)
            children.append(await _start(job))
        forward = asyncio.ensure_future(_forward_interrupt(interrupted, children))
        try:
            await asyncio.gather(*(_serve(c, merger.apply) for c in children))
        except asyncio.CancelledError:
            # A second interrupt: the workers cancel their hosts too, and are waited for (bounded).
            _signal_all(children, signal.SIGINT)
            await _reap(children, CANCEL_WAIT)
            raise
        finally:
            forward.cancel()
    finally:
        for c in children:
            if c.proc.returncode is None:
                c.proc.kill()
                await c.proc.wait()
        # A worker that died said nothing of the lines it flushed since its last frame: count the file.
        in_file = shared.settle() if shared is not None and not all(c.done for c in children) else None
        if shared is not None:
            shared.close()
    for c in children:
        merger.fail_lost(c, _died(c), c.stderr.decode("utf-8", "replace")[-STDERR_TAIL:],
                         "timer (its worker process died)")
    report = merger.report(hosts, playbook, run_id, inventory, argv)
    if outputs.path or outputs.stdout_json:
        counted = sum(c.events_written or 0 for c in children)
        report.run.events_written = in_file if in_file is not None and not outputs.stdout_json else counted
        report.run.events_truncated = "; ".join(c.events_error for c in children if c.events_error)
    return report


async def _one_loop(hosts: list[Host], playbook: Playbook, settings: RunSettings, outputs: EventOutputs, *,
                    observer: Observer | None, interrupted: asyncio.Event | None, inventory: str,
                    argv: list[str] | None) -> FleetReport:
    """The run on this process's loop, its raw events to ``outputs``' sinks written from here."""
    opened = outputs.open_here()
    try:
        report = await run_playbook(hosts, playbook, settings, observer=observer, events=opened.sink,
                                    interrupted=interrupted, inventory=inventory, argv=argv)
    finally:
        opened.close()
    if opened.counted is not None:
        report.run.events_written, report.run.events_truncated = opened.counted.written, opened.counted.error
    return report


def _can_send(settings: RunSettings) -> bool:
    """Whether the settings can be pickled for a worker (the Python API may pass any connect hook)."""
    try:
        pickle.dumps(settings)
    except (pickle.PicklingError, TypeError, AttributeError):
        return False
    return True


async def _start(job: WorkerJob) -> _Child:
    """Start one worker process (in its own session: Ctrl-C reaches it only through the parent)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetprobe.workers", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        # The events file, stdout and their lock, shared by every worker (fleetprobe.eventout).
        pass_fds=job.outputs.fds if isinstance(job.outputs, Shared) else (),
        # Frames can be large (a chunk of finished hosts): the reader's limit is not a line limit here.
        limit=1 << 20)
    data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    assert proc.stdin is not None
    proc.stdin.write(_FRAME.pack(len(data)) + data)
    await proc.stdin.drain()
    return _Child(job.index, job.hosts, proc=proc)


async def _serve(child: _Child, apply: Callable[[_Slice, list[tuple[Any, ...]]], None]) -> None:
    """Read a worker's frames until it ends; keep its stderr's tail."""
    proc = child.proc
    assert proc.stdout is not None and proc.stderr is not None
    err = proc.stderr

    async def drain_stderr() -> None:
        while chunk := await err.read(65536):
            child.stderr += chunk
            del child.stderr[:-STDERR_TAIL]

    drain = asyncio.ensure_future(drain_stderr())
    try:
        while True:
            try:
                head = await proc.stdout.readexactly(_FRAME.size)
                data = await proc.stdout.readexactly(_FRAME.unpack(head)[0])
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    child.problem = f"ended in the middle of a message ({len(exc.partial)} bytes of it came)"
                break
            try:
                items = pickle.loads(data)
            except Exception as exc:  # noqa: BLE001 - a broken frame ends this worker, not the run
                child.problem = f"sent a frame the parent cannot read ({type(exc).__name__}: {exc})"
                proc.kill()
                break
            apply(child, items)
        await proc.wait()
        await asyncio.wait([drain], timeout=5)
    finally:
        drain.cancel()
        if proc.stdin is not None:
            proc.stdin.close()


async def _forward_interrupt(interrupted: asyncio.Event, children: list[_Child]) -> None:
    """The parent's first interrupt, passed on to every worker (each stops its runners)."""
    await interrupted.wait()
    _signal_all(children, signal.SIGINT)


def _signal_all(children: list[_Child], sig: int) -> None:
    """Send ``sig`` to every worker still running."""
    for c in children:
        if c.proc.returncode is None:
            try:
                c.proc.send_signal(sig)
            except ProcessLookupError:
                pass


async def _reap(children: list[_Child], timeout: float) -> None:
    """Wait for every worker to end, killing those still there after ``timeout``."""
    waits = [asyncio.ensure_future(c.proc.wait()) for c in children]
    _, pending = await asyncio.wait(waits, timeout=timeout)
    for c in children:
        if c.proc.returncode is None:
            c.proc.kill()
    if pending:
        await asyncio.wait(pending, timeout=5)


def _died(child: _Child) -> str:
    """Why a worker's unreported hosts failed, in one line."""
    rc = child.proc.returncode
    if child.problem:
        how = child.problem
    elif rc is not None and rc < 0:
        how = f"was killed by {signal.Signals(-rc).name}"
    elif child.done:
        how = "ended without sending this host's result"
    else:
        how = f"exited with status {rc} before the end of the run"
    return (f"its worker process {child.index} (pid {child.proc.pid}) {how}: the host's results are lost; its "
            "runner removes the probes when the SSH link drops (its on-host timer does by the deadline otherwise)")


if __name__ == "__main__":
    # Run as fleetprobe.workers, not __main__: what a worker pickles (WorkerStats) must name the
    # module the parent knows it by.
    from fleetprobe.workers import worker_main as _worker_main

    sys.exit(_worker_main())
