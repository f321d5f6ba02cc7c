"""Benchmark: event ingest through the real SSH path, from 1 host and from 50 hosts at once.

    .venv/bin/python bench/ingest_ssh.py [--hosts 1,50] [--lines N] [--quick] [--events FILE] [--workers 1,2]

bench/ingest.py measures the parser and aggregate alone (no network).  This
one puts the transport in front of them: simulated hosts (bench/simhost.py
``--flood``) stream trace_pipe lines of the planned events as fast as their
channel takes them, and this process runs fleetprobe's own ``run_fleet``
(connect, facts, plan, runner protocol, 64 KiB reads, TraceStream,
FleetAggregate).  For each host count it prints events per controller CPU
second (one event loop = one core), MB/s per core, wall events/s, and the
controller's RSS sampled every half second (must not grow with events).
The simulated hosts run in their own processes and are not counted.
With ``--events FILE`` every event is also written to FILE as JSON lines,
exactly as ``fleetprobe run --events FILE`` does (``run_playbook`` with
``events_path``); without it, no raw events are written.

``--cluster N`` runs it over a Dask LocalCluster of N worker processes in one zone instead
(``fleetprobe run --cluster``: the raw events come back to this process through the scheduler);
compare its lines/s for the fleet (wall) with ``--workers N``'s.

``--workers 1,2`` runs each host count once per worker count, through
``fleetprobe.workers.run_playbook_workers`` (1 = the single loop in this process, 2 = two worker
processes, as ``fleetprobe run --workers 2``): lines/s for the fleet (wall) is the figure to compare;
controller CPU then is this process plus its waited workers, and the simulated hosts' own CPU is
printed beside it (they share the machine's cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import fanout
from fanout import BENCH, SimFleet, _hosts, _settings
from simhost import trace_lines

from fleetprobe.orchestrate import run_playbook
from fleetprobe.playbook import load_playbook
from fleetprobe.workers import WorkerStats, run_playbook_workers


def rss_mib() -> float:
    """This process's resident set now (not its peak), in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class EventCounter:
    """Observer that counts events as they are accepted (for the RSS-versus-events samples)."""

    def __init__(self) -> None:
        self.events = 0

    def set_state(self, host: str, state: str, detail: str = "") -> None:
        """Not needed here."""

    def add_events(self, host: str, n: int) -> None:
        """Count."""
        self.events += n


@dataclass
class IngestResult:
    """Controller-side figures of one ingest run."""

    events: int
    sent: int
    wall: float
    cpu: float
    line_bytes: float
    first: tuple[float, float, int]
    last: tuple[float, float, int]
    rss_max: float
    curve: list[tuple[float, float, int]]
    failed: list[str]
    conn_min: int
    conn_max: int
    events_bytes: int
    workers: int = 0
    sim_cpu: float = 0.0
    worker_cpu: tuple[float, ...] = ()


async def ingest(hosts_n: int, total_lines: int, servers: int, events_path: str | None = None,
                 workers: int = 0, cluster: str = "") -> IngestResult:
    """Stream ``total_lines`` split over ``hosts_n`` simulated hosts through fleetprobe; controller figures.

    ``workers`` 0: run_playbook in this process (as before); N: run_playbook_workers(workers=N)."""
    work = Path(tempfile.mkdtemp(prefix="fp-ingest-"))
    fleet = SimFleet(work, hosts_n)
    per_host = -(-total_lines // hosts_n)
    try:
        fleet.start(min(servers, hosts_n), lines=per_host, flood=True)
        spec = {"ports": fleet.ports, "forks": 50, "key": str(work / "client_key"),
                "known_hosts": str(work / "known_hosts"), "duration": 3600.0}
        # The simulated runner ends by itself after its lines (as "duration"); no event cap.
        settings = replace(_settings(spec), event_cap=10**12)
        playbook = load_playbook(BENCH.parent / "playbooks" / "execsnoop.yml")
        counter = EventCounter()
        samples: list[tuple[float, float, int]] = []
        done = asyncio.Event()
        t0 = time.monotonic()

        async def sample() -> None:
            while not done.is_set():
                samples.append((time.monotonic() - t0, rss_mib(), counter.events))
                try:
                    await asyncio.wait_for(done.wait(), 0.5)
                except TimeoutError:
                    pass

        sampler = asyncio.ensure_future(sample())
        times0 = os.times()
        sim0 = fleet.cpu_seconds()
        stats: list[WorkerStats] = []
        # The whole run as the CLI does it: aggregate, and the raw-event writer when asked for.
        if cluster:
            # Local: Dask is the optional extra fleetprobe[cluster], needed only for --cluster.
            from fleetprobe.cluster import ZONE_VAR, run_playbook_cluster

            zoned = [replace(h, vars={**h.vars, ZONE_VAR: "bench"}) for h in _hosts(spec)]
            report = await run_playbook_cluster(zoned, playbook, settings, scheduler=cluster, observer=counter,
                                                events_path=events_path)
        elif workers:
            report = await run_playbook_workers(_hosts(spec), playbook, settings, observer=counter,
                                                events_path=events_path, workers=workers, stats=stats)
        else:
            report = await run_playbook(_hosts(spec), playbook, settings, observer=counter, events_path=events_path)
        outcomes = report.hosts
        times1 = os.times()
        sim_cpu = fleet.cpu_seconds() - sim0
        # This process and its waited children (the worker processes, start-up included).
        cpu = sum(times1[:4]) - sum(times0[:4])
        wall = time.monotonic() - t0
        done.set()
        await sampler
        samples.append((wall, rss_mib(), counter.events))
        server = fleet.stats(fleet.ports)
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    events = sum(o.events for o in outcomes)
    chunk = trace_lines(["sched_process_exec"], 600, 1, 100.0)[0]
    line_bytes = len(chunk) / chunk.count(b"\n")
    streaming = [s for s in samples if s[2] > 0]
    first = streaming[0] if streaming else samples[0]
    return IngestResult(events=events, sent=int(server["lines_sent"]), wall=wall, cpu=cpu, line_bytes=line_bytes,
                        first=first, last=samples[-1], rss_max=max(r for _, r, _ in samples),
                        curve=[(round(t, 1), round(r, 1), e) for t, r, e in samples[:: max(1, len(samples) // 10)]],
                        failed=[f"{o.host}: {o.status} {o.reason}" for o in outcomes if o.status != "ok"][:3],
                        conn_min=int(server["conn_min"]), conn_max=int(server["conn_max"]),
                        events_bytes=Path(events_path).stat().st_size if events_path else 0,
                        workers=workers, sim_cpu=sim_cpu, worker_cpu=tuple(w.cpu_seconds for w in stats))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for each host count and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", default="1,50", help="comma-separated host counts")
    ap.add_argument("--lines", type=int, default=4_000_000, help="lines in total per host count")
    ap.add_argument("--servers", type=int, default=2, help="simulated-host processes")
    ap.add_argument("--quick", action="store_true", help="smoke run: 300,000 lines (< 60 s)")
    ap.add_argument("--events", metavar="FILE", help="also write raw events to FILE, as `fleetprobe run --events`")
    ap.add_argument("--workers", help="comma-separated worker counts, each through run_playbook_workers "
                                      "(1 = one loop); default: run_playbook in this process")
    ap.add_argument("--cluster", type=int, metavar="N", help="run over a Dask LocalCluster of N worker processes "
                                                                "(fleetprobe run --cluster) instead")
    ap.add_argument("--first-port", type=int, help="first port of the simulated hosts (see bench/fanout.py)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lines = 300_000
    if args.first_port:
        fanout.FIRST_PORT = args.first_port
    counts = [int(x) for x in args.workers.split(",")] if args.workers else [0]
    walls: dict[tuple[int, int], float] = {}
    rates: dict[tuple[int, int], float] = {}
    if args.cluster:
        return _over_cluster(args)
    for n, w in ((int(x), w) for x in args.hosts.split(",") for w in counts):
        r = asyncio.run(ingest(n, args.lines, args.servers, args.events, w))
        (t1, _, e1), (t2, _, e2) = r.first, r.last
        # While the events flow (first sampled event to the end; samples every 0.5 s): the setup of
        # 50 hosts (connect, facts, plan) is seconds on a loaded machine, and no ingest.
        streaming = (e2 - e1) / (t2 - t1) if t2 > t1 else float("nan")
        walls[(n, w)] = r.events / r.wall
        rates[(n, w)] = streaming
        (_, rss1, e1), (_, rss2, e2) = r.first, r.last
        label = f" over {w} worker(s)" if w else ""
        print(f"{n:3d} host(s){label}: {r.events:,} events of {r.sent:,} sent, {r.line_bytes:.0f} B/line; "
              f"{r.wall:.1f} s wall, {r.cpu:.1f} s controller CPU -> {r.events / r.cpu:,.0f} events/s per core, "
              f"{r.events * r.line_bytes / r.cpu / 1e6:.1f} MB/s per core, {r.events / r.wall:,.0f} events/s wall",
              flush=True)
        print(f"     RSS {rss1:.1f} MiB at {e1:,} events -> {rss2:.1f} MiB at {e2:,} events "
              f"(max {r.rss_max:.1f}); connections per host {r.conn_min}-{r.conn_max}", flush=True)
        print(f"     (t s, RSS MiB, events): {r.curve}", flush=True)
        if args.events:
            print(f"     raw events: {r.events_bytes / 1e6:.1f} MB written to {args.events}", flush=True)
        if w:
            own = f"workers {', '.join(f'{c:.1f}' for c in r.worker_cpu)} s" if r.worker_cpu else "one loop"
            print(f"     controller CPU {r.cpu:.1f} s ({own}); "
                  f"simulated hosts' CPU {r.sim_cpu:.1f} s; (controller + hosts) / wall = "
                  f"{(r.cpu + r.sim_cpu) / r.wall:.2f} cores busy", flush=True)
            print(f"     lines/s for the fleet while streaming: {streaming:,.0f}", flush=True)
            if (n, 1) in walls and w != 1:
                print(f"     lines/s for the fleet: {walls[(n, w)] / walls[(n, 1)]:.2f}x 1 worker over the whole run, "
                      f"{rates[(n, w)] / rates[(n, 1)]:.2f}x while streaming", flush=True)
        if r.failed:
            print(f"     FAILED hosts: {r.failed}", flush=True)
    return 0


def _over_cluster(args: argparse.Namespace) -> int:
    """``--cluster N``: each host count over a LocalCluster of N worker processes (zone ``bench``)."""
    # Local: Dask is the optional extra fleetprobe[cluster], needed only for --cluster.
    import dask
    import distributed

    from fleetprobe.cluster import RESOURCE, WORKER_CONFIG

    with dask.config.set(WORKER_CONFIG), \
            distributed.LocalCluster(n_workers=args.cluster, threads_per_worker=1, processes=True, host="127.0.0.1",
                                     dashboard_address=None, resources={RESOURCE + "bench": 1}) as local:
        for n in (int(x) for x in args.hosts.split(",")):
            r = asyncio.run(ingest(n, args.lines, args.servers, args.events, cluster=local.scheduler_address))
            (t1, _, e1), (t2, _, e2) = r.first, r.last
            streaming = (e2 - e1) / (t2 - t1) if t2 > t1 else float("nan")
            print(f"{n:3d} host(s) over a cluster of {args.cluster} worker(s): {r.events:,} events of {r.sent:,} "
                  f"sent; {r.wall:.1f} s wall -> {r.events / r.wall:,.0f} events/s wall, {streaming:,.0f} while "
                  f"streaming; this process {r.cpu:.1f} s CPU, RSS max {r.rss_max:.1f} MiB", flush=True)
            if args.events:
                print(f"     raw events: {r.events_bytes / 1e6:.1f} MB written to {args.events}", flush=True)
            if r.failed:
                print(f"     FAILED hosts: {r.failed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
