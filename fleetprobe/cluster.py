"""Cluster: the slices of fleetprobe.workers as Dask distributed tasks, each on a worker of its hosts' zone.

Real fleets are partitioned: the hosts of a zone are reachable only from that zone's bastion.
Each bastion runs a Dask worker that says which zone it serves with a resource
(``fleetprobe-zone-<zone>``, see :func:`worker_main`); :func:`run_playbook_cluster` sends each
zone's hosts, in slices (one per worker of the zone), as tasks that only those workers can run.
A task is today's pipeline on its slice (:func:`fleetprobe.workers.run_slice`, its own event
loop in a thread of the worker); what it would send a local parent it puts in a Dask queue
instead, so partial results (finished hosts, live states, facts) stream back while the run
goes on, and the report is the one local workers or one loop would give.

* A host's zone is its ``fleetprobe_zone`` inventory variable, else the one group of the host
  named as a zone some worker serves.  A host with no zone, or whose zone no worker serves,
  fails with that reason before any connection.
* Ctrl-C: the parent sets a Dask event every task watches; each stops its runners (teardown).
* A worker that dies mid-run (its address leaves the scheduler): the hosts of its slice whose
  results had not arrived fail saying so; their runners remove their probes when their SSH
  links drop (their on-host timers by the deadline otherwise).  A slice never runs twice: a
  task that the scheduler retries elsewhere after its worker died finds its guard set and
  returns at once (its hosts would otherwise be probed twice in one run).
* Raw events (``--events``) stay with the workers: not collected over a cluster yet (the report
  says so).

Dask is the optional extra ``fleetprobe[cluster]``; nothing here is imported by a local run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fleetprobe.errors import InputError
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
    q.put((job.index, [("worker", address)]))

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

    outbox = _Sender(lambda items: q.put((job.index, items)), f"fleetprobe-send-{job.index}")
    try:
        asyncio.run(go())
    finally:
        outbox.close()
    return "done"


class _Sender:
    """A slice's queue puts, made by a thread of their own: a put is a round trip through the scheduler
    (pickled, sent, acknowledged), and made on the slice's loop it would stall every host of the slice
    for that long.  What piles up while a put is under way goes out as one item after it (in order)."""

    def __init__(self, put: Callable[[list[tuple[Any, ...]]], None], name: str) -> None:
        """Start the thread; ``put`` sends one list of items."""
        self._put = put
        self._pending: queue.SimpleQueue[list[tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, items: list[tuple[Any, ...]]) -> None:
        """Queue ``items`` (never blocks)."""
        self._pending.put(items)

    def _run(self) -> None:
        last = False
        while not last:
            first = self._pending.get()
            if first is None:
                return
            batch = list(first)
            while not self._pending.empty():
                more = self._pending.get()
                if more is None:
                    last = True
                    break
                batch += more
            self._put(batch)

    def close(self) -> None:
        """Send what is queued and stop (the slice's last item, ``done``, is among it)."""
        self._pending.put(None)
        self._thread.join()


@dataclass
class _Remote(_Slice):
    """A slice run as a Dask task."""

    zone: str = ""
    worker: str = ""


async def run_playbook_cluster(hosts: Sequence[Host], playbook: Playbook, settings: RunSettings, *,
                               scheduler: str, observer: Observer | None = None,
                               events_path: str | None = None, interrupted: asyncio.Event | None = None,
                               inventory: str = "", argv: list[str] | None = None) -> FleetReport:
    """Run the playbook over the cluster at ``scheduler`` (``tcp://host:8786``): one merged report."""
    distributed = _dask()
    hosts = list(hosts)
    if playbook.needs_module_consent():
        raise InputError("module playbooks cannot run over a cluster yet (builds are shared in one process)",
                         hint="run them without --cluster")
    interrupted = interrupted or asyncio.Event()
    run_id = settings.run_id or new_run_id()
    settings = replace(settings, run_id=run_id)
    merger = Merger(playbook, settings, observer, None)
    async with distributed.Client(scheduler, asynchronous=True) as client:
        zones = worker_zones(await client.scheduler.identity())
        slices = _zone_slices(hosts, zones, merger)
        queue = await distributed.Queue(f"fleetprobe-{run_id}", client=client)
        stop = distributed.Event(f"fleetprobe-{run_id}-stop", client=client)
        futures = []
        for sl, forks in zip(slices, fork_shares(settings.forks, max(1, len(slices)))):
            job = WorkerJob(sl.index, sl.hosts, playbook, replace(settings, forks=forks, on_facts=None), None)
            futures.append(client.submit(_task, job, queue.name, stop.name, f"fleetprobe-{run_id}-{sl.index}",
                                         resources={RESOURCE + sl.zone: 1}, pure=False, retries=0,
                                         key=f"fleetprobe-{run_id}-slice-{sl.index}"))
        try:
            lost = await _follow(client, queue, stop, slices, futures, merger, interrupted)
            await _fail_unfinished(slices, futures, lost, merger)
        finally:
            await stop.set()
            for fut in futures:
                if not fut.done():
                    await fut.cancel()
    report = merger.report(hosts, playbook, run_id, inventory, argv)
    if events_path:
        report.run.events_written = 0
        report.run.events_truncated = "--cluster: raw events stay with the workers and are not collected yet"
    return report


def _zone_slices(hosts: list[Host], zones: dict[str, list[str]], merger: Merger) -> list[_Remote]:
    """Each zone's hosts in slices, one per worker of the zone; a host with no served zone fails in ``merger``."""
    by_zone: dict[str, list[Host]] = {}
    for h in hosts:
        zone, why = zone_of(h, set(zones))
        if zone is not None and zone not in zones:
            why = f"no cluster worker serves its zone {zone} (start one: fleetprobe-worker --zone {zone})"
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


def _take(slices: list[_Remote], merger: Merger, batch: list[Any]) -> None:
    """What the tasks put in the queue: a slice's worker address, else its items for the merger."""
    for index, items in batch:
        sl = slices[index]
        rest = []
        for item in items:
            if item[0] == "worker":
                sl.worker = item[1]
            else:
                rest.append(item)
        merger.apply(sl, rest)


async def _follow(client: Any, queue: Any, stop: Any, slices: list[_Remote], futures: list[Any], merger: Merger,
                  interrupted: asyncio.Event) -> dict[int, str]:
    """Take the queue until every task is done or its worker left: {slice index: why it is lost}."""
    lost: dict[int, str] = {}
    told_stop = False
    while True:
        _take(slices, merger, await queue.get(batch=True))
        if interrupted.is_set() and not told_stop:
            told_stop = True
            await stop.set()
        alive = set(await client.scheduler.ncores(workers=sorted({sl.worker for sl in slices if sl.worker})))
        for sl, fut in zip(slices, futures):
            if sl.index in lost or fut.done():
                continue
            if sl.worker and sl.worker not in alive:
                lost[sl.index] = f"its cluster worker {sl.worker} (zone {sl.zone}) left the cluster mid-run"
        if all(f.done() or sl.index in lost for sl, f in zip(slices, futures)):
            break
        await asyncio.sleep(POLL_SECONDS)
    _take(slices, merger, await queue.get(batch=True))
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


def worker_main(argv: list[str] | None = None) -> int:
    """``fleetprobe-worker --scheduler tcp://sched:8786 --zone eu1``: Dask workers serving one zone.

    A thin wrapper over ``dask worker``: ``--nworkers`` processes (one per core is sensible), one
    thread each (a slice is one event loop), each with the resource ``fleetprobe-zone-<zone>`` = 1,
    so a run gives the zone one slice per worker process.
    """
    ap = argparse.ArgumentParser(prog="fleetprobe-worker",
                                 description="Dask workers that run fleetprobe slices for the hosts of one zone")
    ap.add_argument("--scheduler", required=True, help="the scheduler's address, e.g. tcp://sched:8786")
    ap.add_argument("--zone", required=True, help="the zone whose hosts this bastion reaches")
    ap.add_argument("--nworkers", type=int, default=1, help="worker processes (one per core is sensible)")
    args = ap.parse_args(argv)
    _dask()
    env = dict(os.environ)
    for key, value in WORKER_CONFIG.items():
        # Dask reads DASK_A__B__C as a.b.c (its documented environment form).
        env["DASK_" + key.upper().replace(".", "__").replace("-", "_")] = str(value)
    return subprocess.call([sys.executable, "-m", "distributed.cli.dask_worker", args.scheduler,
                            "--nthreads", "1", "--nworkers", str(args.nworkers),
                            "--resources", f"{RESOURCE}{args.zone}=1"], env=env)


if __name__ == "__main__":
    raise SystemExit(worker_main())
