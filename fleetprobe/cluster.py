"""Cluster: the slices of fleetprobe.workers as Dask distributed tasks, each on a worker of its hosts' zone.

Real fleets are partitioned: the hosts of a zone are reachable only from that zone's bastion.
Each bastion runs a Dask worker that says which zone it serves with a resource
(``fleetprobe-zone-<zone>``, see :func:`serve_zone`); :func:`run_playbook_cluster` sends each
zone's hosts, in slices (one per worker of the zone), as tasks that only those workers can run.
A task is today's pipeline on its slice (:func:`fleetprobe.workers.run_slice`, its own event
loop in a thread of the worker); what it would send a local parent it puts in a Dask queue
instead, so partial results (finished hosts, live states, facts, raw event lines) stream back
while the run goes on, and the report is the one local workers or one loop would give.

* A host's zone is its ``fleetprobe_zone`` inventory variable, else the one group of the host
  named as a zone some worker serves.  A host with no zone, or whose zone no worker serves,
  fails with that reason before any connection.
* Ctrl-C: the parent sets a Dask event every task watches; each stops its runners (teardown).
* A worker that dies mid-run (its address leaves the scheduler): the hosts of its slice whose
  results had not arrived fail saying so; their runners remove their probes when their SSH
  links drop (their on-host timers by the deadline otherwise).  A slice never runs twice: a
  task that the scheduler retries elsewhere after its worker died finds its guard set and
  returns at once (its hosts would otherwise be probed twice in one run).
* Raw events (``--events FILE``, ``--events -``, ``--print``, a playbook's ``print:``) come back to
  the client: a task's writers (fleetprobe.eventout.Forwarded) hand each flush of whole lines to
  its sender, which puts them in the queue with the partial results; the client writes them into
  the one file or on stdout as they come (eventout.Received: one loop's writers).  Why here, when
  local workers append to the file themselves: a cluster worker is on another machine, and the
  scheduler is the one address both ends reach.  Bounded: an item carries at most ITEM_BYTES of
  lines, the scheduler holds at most QUEUE_ITEMS items (a put waits for room, the client takes as
  the queue fills), and a slice holds at most IN_FLIGHT_BYTES of lines the scheduler has not
  taken; lines past it are dropped (a slice's hosts never wait for the client), counted, and the
  report says so.  A worker that dies: the lines the client had are in the file, the rest of
  its slice's are lost with its hosts' results.

Dask is the optional extra ``fleetprobe[cluster]``; nothing here is imported by a local run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from fleetprobe.errors import InputError
from fleetprobe.eventout import FILE, STDOUT, EventOutputs, Forwarded, Received
from fleetprobe.inventory import Host
from fleetprobe.plan import new_run_id
from fleetprobe.playbook import Playbook
from fleetprobe.results import FleetReport
from fleetprobe.settings import Observer, RunSettings
from fleetprobe.workers import Merger, WorkerJob, _Slice, fork_shares, run_slice, split_hosts

#: A worker serving zone Z has the resource ``fleetprobe-zone-Z``.
RESOURCE = "fleetprobe-zone-"
ZONE_VAR = "fleetprobe_zone"
#: How often a slice puts what it has in the run's queue (one item: states, facts, finished hosts).
#: Each put is a round trip through the scheduler, pickled twice: a local worker's 0.2 s frames cost
#: 5 of them a second per slice; once a second keeps partial results streaming at a fifth of that.
SEND_SECONDS = 1.0
#: How often the parent takes the queue (one batch) and asks which of its slices' workers are alive
#: (``ncores`` for those addresses: a few bytes, where ``identity`` sends every worker's metrics).
POLL_SECONDS = 1.0
#: A queue item carries at most this many bytes of event lines (whole lines; a flush larger than it
#: goes in pieces, a single line larger than it is dropped, counted).
ITEM_BYTES = 1 << 20
#: Bytes of lines a slice holds that the scheduler has not taken yet; lines past it are dropped and
#: counted (the report's events_truncated), never waited for: the slice's hosts keep streaming.
IN_FLIGHT_BYTES = 8 << 20
#: Items the run's queue holds on the scheduler (a put waits while it is full, the client takes as
#: they come): at most QUEUE_ITEMS * ITEM_BYTES of lines wait there.
QUEUE_ITEMS = 32
#: A put waits this long for room, then asks again whether the run is still taken from.
PUT_WAIT = 5.0
#: A slice that ended waits at most this long for room for its last items (its client may be gone).
CLOSE_WAIT = 60.0
#: Dask settings of fleetprobe's workers: no statistical profiler (by default it samples every
#: thread's stack 100 times a second; a slice's thread is an event loop with deep stacks).
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


def _dask() -> Any:
    """``distributed``, or an InputError saying how to install it."""
    try:
        import distributed  # lazy: Dask is the optional extra fleetprobe[cluster]
    except ImportError:
        raise InputError("--cluster needs Dask distributed, which is not installed",
                         hint="pip install 'fleetprobe[cluster]'") from None
    return distributed


def zone_of(host: Host, zones: set[str]) -> tuple[str | None, str]:
    """(the host's zone, "") or (None, why it has none)."""
    given = host.vars.get(ZONE_VAR)
    if given is not None:
        return str(given), ""
    named = sorted(g for g in host.groups if g in zones)
    if len(named) == 1:
        return named[0], ""
    if named:
        return None, (f"its groups {', '.join(named)} are all zones some worker serves: set {ZONE_VAR} "
                      "to say which")
    return None, (f"no zone: set {ZONE_VAR} or put the host in a group named as a zone (zones with workers: "
                  f"{', '.join(sorted(zones)) or 'none'})")


def worker_zones(info: dict[str, Any]) -> dict[str, list[str]]:
    """{zone: worker addresses} from the scheduler's information."""
    out: dict[str, list[str]] = {}
    for address, w in info.get("workers", {}).items():
        for name in w.get("resources", {}) or {}:
            if name.startswith(RESOURCE):
                out.setdefault(name[len(RESOURCE):], []).append(address)
    return out


def _task(job: WorkerJob, queue: str, stop: str, guard: str) -> str:
    """One slice, on a Dask worker (in one of its threads): what it learns goes to the run's queue."""
    distributed = _dask()
    client = distributed.get_client()
    address = distributed.get_worker().address
    once = distributed.Variable(guard, client=client)
    try:
        once.get(timeout=0.2)
        return "refused: this slice already ran on a worker that died"
    except TimeoutError:
        once.set(address)
    q = distributed.Queue(queue, client=client)
    stopped = distributed.Event(stop, client=client)
    outbox = _Sender(lambda items, wait: q.put((job.index, items), timeout=wait), stopped.is_set,
                     f"fleetprobe-send-{job.index}")
    outbox.put([("worker", address)])
    if isinstance(job.outputs, Forwarded):
        job = replace(job, outputs=replace(job.outputs, send=outbox.lines))

    async def go() -> None:
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        over = threading.Event()

        def watch() -> None:
            while not over.is_set():
                if stopped.wait(timeout=0.5):
                    if not over.is_set():
                        try:
                            loop.call_soon_threadsafe(interrupted.set)
                        except RuntimeError:
                            pass  # the slice ended (its loop closed) as the stop came
                    return

        watcher = threading.Thread(target=watch, name=f"fleetprobe-stop-{job.index}", daemon=True)
        watcher.start()
        try:
            await run_slice(job, outbox.put, interrupted, SEND_SECONDS)
        finally:
            over.set()

    try:
        asyncio.run(go())
    finally:
        outbox.close()
    return "done"


def _pieces(data: bytes, events: int, cap: int) -> list[tuple[bytes, int]]:
    """``data`` (whole lines, ``events`` of them) as pieces of whole lines, each at most ``cap`` bytes
    where a line allows (a longer line is a piece of its own); each piece with its line count."""
    if len(data) <= cap:
        return [(data, events)]
    pieces: list[tuple[bytes, int]] = []
    at = 0
    while at < len(data):
        end = data.rfind(b"\n", at, at + cap) + 1
        if end <= at:  # one line longer than cap
            end = data.find(b"\n", at) + 1 or len(data)
        piece = data[at:end]
        pieces.append((piece, piece.count(b"\n") if events else 0))
        at = end
    return pieces


class _Sender:
    """A slice's queue puts, made by a thread of their own: a put is a round trip through the scheduler
    (pickled, sent, acknowledged), and made on the slice's loop it would stall every host of the slice
    for that long.  What piles up while a put is under way goes out after it, in order, in items of at
    most ITEM_BYTES of event lines; lines past IN_FLIGHT_BYTES not yet put are dropped and counted
    (sent as ``("dropped", {stream: [events, bytes]})``, the totals so far)."""

    def __init__(self, put: Callable[[list[tuple[Any, ...]], float], None], stopped: Callable[[], bool], name: str,
                 *, item_bytes: int | None = None, in_flight: int | None = None) -> None:
        """Start the thread; ``put(items, timeout)`` sends one list of items (TimeoutError: no room yet),
        ``stopped()`` says whether the client has stopped the run; the caps default to ITEM_BYTES and
        IN_FLIGHT_BYTES."""
        self._put, self._stopped = put, stopped
        self._item_bytes = ITEM_BYTES if item_bytes is None else item_bytes
        self._in_flight = IN_FLIGHT_BYTES if in_flight is None else in_flight
        self._cond = threading.Condition()
        self._items: deque[tuple[tuple[Any, ...], int]] = deque()  # (item, its bytes of lines)
        self._held = 0
        self._closing = False
        self.dropped: dict[str, list[int]] = {}
        self._drops_told = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, items: list[tuple[Any, ...]]) -> None:
        """Queue ``items`` (never blocks, never drops: they are small)."""
        with self._cond:
            self._items.extend((item, 0) for item in items)
            self._cond.notify()

    def lines(self, stream: str, data: bytes, events: int) -> None:
        """Queue whole lines for the client's ``stream`` (never blocks: past the caps they are dropped, counted)."""
        with self._cond:
            for piece, n in _pieces(data, events, self._item_bytes):
                if len(piece) > self._item_bytes or self._held + len(piece) > self._in_flight:
                    self._drop(stream, n, len(piece))
                    continue
                self._held += len(piece)
                self._items.append((("lines", stream, piece, n), len(piece)))
            self._cond.notify()

    def _drop(self, stream: str, events: int, size: int) -> None:
        """Count lines that will not reach the client (the lock held)."""
        d = self.dropped.setdefault(stream, [0, 0])
        d[0] += events
        d[1] += size

    def _gather(self) -> tuple[list[tuple[Any, ...]], int, bool]:
        """The next item's worth: (items, their bytes of lines, whether the sender is closing and empty)."""
        with self._cond:
            while not self._items and not self._closing:
                self._cond.wait()
            batch: list[tuple[Any, ...]] = []
            size = 0
            while self._items and (not batch or size + self._items[0][1] <= self._item_bytes):
                item, n = self._items.popleft()
                batch.append(item)
                size += n
            drops = sum(d[1] for d in self.dropped.values())
            if drops != self._drops_told:
                self._drops_told = drops
                batch.append(("dropped", {k: list(v) for k, v in self.dropped.items()}))
            return batch, size, self._closing and not self._items

    def _run(self) -> None:
        last = False
        while not last:
            batch, size, last = self._gather()
            if batch:
                self._send(batch)
            with self._cond:
                self._held -= size

    def _send(self, batch: list[tuple[Any, ...]]) -> None:
        """Put ``batch``, waiting for room while the run is taken from (lines given up on are counted)."""
        waited = 0.0
        while True:
            try:
                self._put(batch, PUT_WAIT)
                return
            except TimeoutError:
                waited += PUT_WAIT
            if self._stopped() or (self._closing and waited >= CLOSE_WAIT):
                with self._cond:
                    for item in batch:
                        if item[0] == "lines":
                            self._drop(item[1], item[3], len(item[2]))
                    self._drops_told = -1  # the totals go with the next item (this one carried them)
                return

    def close(self) -> None:
        """Send what is queued and stop (the slice's last item, ``done``, is among it)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()


@dataclass
class _Remote(_Slice):
    """A slice run as a Dask task."""

    zone: str = ""
    worker: str = ""
    #: What its sender dropped past its caps, per stream: (events, bytes).
    dropped: dict[str, tuple[int, int]] = field(default_factory=dict)


async def run_playbook_cluster(hosts: Sequence[Host], playbook: Playbook, settings: RunSettings, *,
                               scheduler: str, observer: Observer | None = None,
                               events_path: str | None = None, outputs: EventOutputs | None = None,
                               interrupted: asyncio.Event | None = None,
                               inventory: str = "", argv: list[str] | None = None) -> FleetReport:
    """Run the playbook over the cluster at ``scheduler`` (``tcp://host:8786``): one merged report.

    Raw events go to ``outputs`` (``events_path`` alone is ``EventOutputs(path=events_path)``), written
    here as the tasks send them; the report counts those of the user's destination, as workers do."""
    distributed = _dask()
    if events_path and outputs is not None:
        raise ValueError("run_playbook_cluster: pass events_path or outputs, not both")
    outputs = outputs or EventOutputs(path=events_path)
    hosts = list(hosts)
    if playbook.needs_module_consent():
        raise InputError("module playbooks cannot run over a cluster yet (builds are shared in one process)",
                         hint="run them without --cluster")
    interrupted = interrupted or asyncio.Event()
    run_id = settings.run_id or new_run_id()
    settings = replace(settings, run_id=run_id)
    merger = Merger(playbook, settings, observer, None)
    received = outputs.receive() if outputs.any else None
    try:
        async with await _client(distributed, scheduler, settings.ssh.connect_timeout) as client:
            zones = worker_zones(await client.scheduler.identity())
            slices = _zone_slices(hosts, zones, merger)
            queue = await distributed.Queue(f"fleetprobe-{run_id}", client=client, maxsize=QUEUE_ITEMS)
            stop = distributed.Event(f"fleetprobe-{run_id}-stop", client=client)
            forwarded = outputs.forward() if outputs.any else None
            futures = []
            for sl, forks in zip(slices, fork_shares(settings.forks, max(1, len(slices)))):
                job = WorkerJob(sl.index, sl.hosts, playbook, replace(settings, forks=forks, on_facts=None), forwarded)
                futures.append(client.submit(_task, job, queue.name, stop.name, f"fleetprobe-{run_id}-{sl.index}",
                                             resources={RESOURCE + sl.zone: 1}, pure=False, retries=0,
                                             key=f"fleetprobe-{run_id}-slice-{sl.index}"))
            take = partial(_take, slices, merger, received)
            try:
                lost = await _follow(client, queue, stop, slices, futures, take, interrupted)
                await _fail_unfinished(slices, futures, lost, merger)
            finally:
                await stop.set()
                for fut in futures:
                    if not fut.done():
                        await fut.cancel()
    finally:
        if received is not None:
            received.close()
    report = merger.report(hosts, playbook, run_id, inventory, argv)
    counted = received.counted if received is not None else None
    if counted is not None:
        report.run.events_written = counted.written
        report.run.events_truncated = "; ".join(filter(None, [counted.error, *_dropped(slices, outputs)]))
    return report


async def _client(distributed: Any, scheduler: str, timeout: float) -> Any:
    """A Dask client of ``scheduler``, or an InputError saying it cannot be reached (before any host)."""
    client = distributed.Client(scheduler, asynchronous=True, timeout=timeout)
    try:
        return await client
    except (OSError, TimeoutError, ValueError) as exc:
        await client.close()   # else its finaliser leaves a close never awaited
        raise InputError(f"--cluster {scheduler}: cannot reach the Dask scheduler: {exc}",
                         hint="is the scheduler running there (dask scheduler), and the address tcp://HOST:PORT? "
                              "--connect-timeout bounds the wait") from None


def _dropped(slices: list[_Remote], outputs: EventOutputs) -> list[str]:
    """What the slices dropped past their caps, in words (nothing if they dropped nothing)."""
    out = []
    for stream, what in ((FILE, f"events for {outputs.path}"), (STDOUT, "events for stdout" if outputs.stdout_json
                                                                 else "bytes of --print lines for stdout")):
        events = sum(sl.dropped.get(stream, (0, 0))[0] for sl in slices)
        size = sum(sl.dropped.get(stream, (0, 0))[1] for sl in slices)
        if size:
            count = f"{events} {what} ({size} bytes)" if events else f"{size} {what}"
            out.append(f"{count} dropped on the cluster: their slices' lines outran what the scheduler took "
                       f"(at most {IN_FLIGHT_BYTES >> 20} MiB in flight a slice)")
    return out


def _zone_slices(hosts: list[Host], zones: dict[str, list[str]], merger: Merger) -> list[_Remote]:
    """Each zone's hosts in slices, one per worker of the zone; a host with no served zone fails in ``merger``."""
    by_zone: dict[str, list[Host]] = {}
    for h in hosts:
        zone, why = zone_of(h, set(zones))
        if zone is not None and zone not in zones:
            why = f"no cluster worker serves its zone {zone} (start one: fleetprobe worker --zone {zone})"
        if why:
            merger.fail_lost(_Slice(-1, [h]), why, "", "not-needed")
        else:
            assert zone is not None
            by_zone.setdefault(zone, []).append(h)
    slices: list[_Remote] = []
    for zone, zone_hosts in sorted(by_zone.items()):
        for part in split_hosts(zone_hosts, min(len(zones[zone]), len(zone_hosts))):
            slices.append(_Remote(len(slices), part, zone=zone))
    return slices


def _take(slices: list[_Remote], merger: Merger, received: Received | None, batch: list[Any]) -> None:
    """What the tasks put in the queue: a slice's worker address, its lines (written at once) and what it
    dropped, else its items for the merger."""
    for index, items in batch:
        sl = slices[index]
        rest = []
        for item in items:
            kind = item[0]
            if kind == "worker":
                sl.worker = item[1]
            elif kind == "lines":
                if received is not None:
                    received.take(item[1], item[2], item[3])
            elif kind == "dropped":
                sl.dropped = {k: (v[0], v[1]) for k, v in item[1].items()}
            else:
                rest.append(item)
        merger.apply(sl, rest)


async def _take_some(queue: Any, wait: float) -> list[Any]:
    """The queue's items once there are some, or [] after about ``wait`` seconds: asked again at once
    while items come, then less and less often (a get with a timeout would cost the scheduler an
    error in its log at every quiet second)."""
    pause, waited = 0.01, 0.0
    while True:
        got: list[Any] = await queue.get(batch=True)
        if got or waited >= wait:
            return got
        await asyncio.sleep(pause)
        waited += pause
        pause = min(pause * 2, wait / 4)


async def _follow(client: Any, queue: Any, stop: Any, slices: list[_Remote], futures: list[Any],
                  take: Callable[[list[Any]], None], interrupted: asyncio.Event) -> dict[int, str]:
    """Take the queue as it fills until every task is done or its worker left: {slice index: why it is lost}."""
    loop = asyncio.get_running_loop()
    lost: dict[int, str] = {}
    told_stop = False
    checked = loop.time()
    while True:
        take(await _take_some(queue, POLL_SECONDS))
        if interrupted.is_set() and not told_stop:
            told_stop = True
            await stop.set()
        if loop.time() - checked < POLL_SECONDS:
            continue
        checked = loop.time()
        alive = set(await client.scheduler.ncores(workers=sorted({sl.worker for sl in slices if sl.worker})))
        for sl in slices:
            # A future may be done though its slice is not: the scheduler re-ran the task of a dead worker
            # elsewhere and it refused to run twice. Its worker's leaving is still why the hosts are lost.
            if sl.index in lost or sl.done:
                continue
            if sl.worker and sl.worker not in alive:
                lost[sl.index] = f"its cluster worker {sl.worker} (zone {sl.zone}) left the cluster mid-run"
        if all(f.done() or sl.index in lost for sl, f in zip(slices, futures)):
            break
    take(await queue.get(batch=True))
    return lost


async def _fail_unfinished(slices: list[_Remote], futures: list[Any], lost: dict[int, str], merger: Merger) -> None:
    """The hosts of a slice lost, failed or ended without its results fail, saying which."""
    for sl, fut in zip(slices, futures):
        reason = lost.get(sl.index)
        if reason is None and fut.status == "error":
            reason = f"its task on zone {sl.zone} failed: {fut.exception()!r}"
        elif reason is None and not sl.done:
            reason = f"its task on zone {sl.zone} ended without sending the host's results"
        if reason:
            if not fut.done():
                await fut.cancel()
            merger.fail_lost(sl, reason + ": the host's results are lost; its runner removes the probes "
                             "when the SSH link drops (its on-host timer does by the deadline otherwise)",
                             "", "timer (its cluster worker died)")


def serve_zone(scheduler: str, zone: str, nworkers: int) -> int:
    """Dask workers serving one zone until stopped (``fleetprobe worker``); their exit status.

    A thin wrapper over ``dask worker``: ``nworkers`` processes, one thread each (a slice is one
    event loop), each with the resource ``fleetprobe-zone-<zone>`` = 1, so a run gives the zone one
    slice per worker process.  ``dask worker`` runs in a session of its own and gets each SIGINT or
    SIGTERM this process gets exactly once, forwarded: a terminal's Ctrl-C and a service manager's
    stop (to this process alone) both close it the graceful way (its slices stop their runners, which
    tear down), where a second copy of the signal from the terminal's group would cut that short.
    """
    _dask()
    env = dict(os.environ)
    for key, value in WORKER_CONFIG.items():
        # Dask reads DASK_A__B__C as a.b.c (its documented environment form).
        env["DASK_" + key.upper().replace(".", "__").replace("-", "_")] = str(value)
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", scheduler, "--nthreads", "1",
                             "--nworkers", str(nworkers), "--resources", f"{RESOURCE}{zone}=1",
                             # No HTTP dashboard on a bastion (Dask serves one on :8787 by default).
                             "--no-dashboard"],
                            env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # this process is ending for another reason: leave no worker behind
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
