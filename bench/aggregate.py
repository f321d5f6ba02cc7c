"""Benchmark: in-kernel aggregation (hist triggers) against streaming, on a lab x86_64 host.

    FLEETPROBE_LAB_DIR=... .venv/bin/python bench/aggregate.py [--host lab-x86_64-1] [--sizes 10000,100000,1000000]

For each storm size N, the same playbook (a kprobe on vfs_read, a log2 histogram of
its ``count`` argument per comm) runs twice on the same lab VM, back to back: once as
planned (the host's kernel has hist triggers: the tables are computed in the kernel
and the event is never enabled) and once with the host's hist features hidden from
the planner (the fallback: every event is streamed and the controller computes the
same tables).  While each run probes, the VM runs ``dd if=/dev/zero of=/dev/null
bs=1 count=N`` (N reads, N vfs_read hits); the run is stopped when dd is done.

Per run it prints: controller bytes received from the host (the runner's whole
stdout: trace lines, control lines, hist tables), controller CPU seconds for the
run (this process: connect, facts, plan, probe, teardown), the host's CPU seconds
during the storm (from the guest's /proc/stat) minus those of the same storm with
no probe, per event, and whether the dd's N reads were counted exactly.
The lab guest is a TCG-emulated x86_64 with one vCPU: host-side times are emulated
CPU, about 10-30x a real machine's; compare the two modes, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fleetprobe.orchestrate as orchestrate
import fleetprobe.plan as plan_mod
from fleetprobe.inventory import load_inventory
from fleetprobe.orchestrate import run_playbook
from fleetprobe.settings import RunSettings
from fleetprobe.parse import TraceStream
from fleetprobe.playbook import parse_playbook
from fleetprobe.session import SSHOptions

PLAYBOOK = """\
name: aggbench
description: vfs_read sizes per comm (kprobe), in the kernel or streamed
duration: 1800s
event_cap: 5000000
probes:
  - name: rd
    kprobe: vfs_read
    args: {count: arg3:u64}
    aggregate: {histogram: count, by: [comm]}
"""

HIST_FEATURES = frozenset({"hist", "hist_log2", "hist_buckets", "hist_usecs", "hist_execname", "common_timestamp",
                           "hist_onmatch", "hist_trace_action", "synthetic_events"})


class Bytes:
    """Bytes the controller's stream parser was fed, per host (everything the runner printed)."""

    def __init__(self) -> None:
        self.by_host: dict[str, int] = {}
        real = TraceStream.feed

        def feed(stream: TraceStream, data: bytes) -> None:
            self.by_host[stream.host] = self.by_host.get(stream.host, 0) + len(data)
            real(stream, data)

        TraceStream.feed = feed  # type: ignore[method-assign]


def hide_hist(enabled: bool) -> None:
    """Plan as if the host's kernel had no hist triggers (the stream fallback), or restore the planner."""
    real = getattr(plan_mod, "_real_plan_host", plan_mod.plan_host)
    plan_mod._real_plan_host = real  # type: ignore[attr-defined]

    def plan_host(playbook: Any, facts: Any, **kw: Any) -> Any:
        return real(playbook, dataclasses.replace(facts, features=facts.features - HIST_FEATURES), **kw)

    orchestrate.plan_host = plan_host if enabled else real  # type: ignore[assignment]


def guest(host: Any, command: str, timeout: float = 600) -> str:
    """Run a command on the lab VM over OpenSSH (outside the measured process's event loop)."""
    args = ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={host.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias=[{host.address}]:{host.port}",
            "-i", str(host.key_file), "-p", str(host.port), f"{host.user}@{host.address}", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True).stdout


def guest_cpu(host: Any) -> tuple[float, float]:
    """(busy, total) seconds of the guest's CPUs so far (/proc/stat, USER_HZ 100)."""
    f = [int(x) for x in guest(host, "head -1 /proc/stat").split()[1:]]
    idle = f[3] + f[4]
    return (sum(f) - idle) / 100, sum(f) / 100


STORM = "dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null"


def storm(host: Any, n: int) -> tuple[float, float]:
    """Run the storm on the guest: (busy CPU seconds of the guest meanwhile, wall seconds)."""
    b0, _ = guest_cpu(host)
    t0 = time.monotonic()
    guest(host, STORM.format(n=n))
    wall = time.monotonic() - t0
    b1, _ = guest_cpu(host)
    return b1 - b0, wall


async def one_run(host: Any, settings: RunSettings, n: int, stream: bool, counter: Bytes) -> dict[str, Any]:
    """One run of the playbook on the host with a storm of n events while it probes."""
    hide_hist(stream)
    pb = parse_playbook(PLAYBOOK, "aggbench.yml")
    interrupted = asyncio.Event()
    counter.by_host.clear()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    task = asyncio.create_task(run_playbook([host], pb, settings, interrupted=interrupted))
    loop = asyncio.get_running_loop()
    # The storm starts once the run's instance and its probe are in place on the guest.
    await loop.run_in_executor(None, guest, host,
                               "n=0; until grep -q ':fp_.*/rd ' /sys/kernel/tracing/kprobe_events || [ $n -ge 120 ]; "
                               "do sleep 0.5; n=$((n+1)); done; sleep 3")
    busy, wall = await loop.run_in_executor(None, storm, host, n)
    await asyncio.sleep(2)
    interrupted.set()
    report = await task
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    o = report.hosts[0]
    tables = report.aggregate.aggregates
    part = tables.hosts.get(host.name, {}).get("rd:histogram:count")
    table = tables.tables.get("rd:histogram:count")
    dd_ones = table.counts.get(("dd", 0), 0) if table else 0   # bs=1: count=1 -> bucket 0
    return {"mode": part.mode if part else "?", "n": n, "bytes": counter.by_host.get(host.name, 0),
            "controller_cpu": cpu, "guest_busy": busy, "storm_wall": wall, "dd_reads_counted": dd_ones,
            "events_streamed": o.events, "loss": o.loss.total, "status": o.status, "cleanup": o.cleanup}


async def main_async(args: argparse.Namespace) -> None:
    lab_dir = Path(os.environ.get("FLEETPROBE_LAB_DIR") or args.lab_dir)
    inv = load_inventory(str(lab_dir / "inventory.yml"))
    host = next(h for h in inv.hosts if h.name == args.host)
    settings = RunSettings(ssh=SSHOptions(known_hosts=(str(lab_dir / "known_hosts"),), ssh_config=(),
                                          use_agent=False, connect_timeout=60.0),
                           setup_timeout=120.0, teardown_timeout=120.0, grace=30)
    counter = Bytes()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"{'N':>8} {'mode':>7} {'bytes rx':>10} {'ctl CPU s':>9} {'guest s':>8} {'-base s':>8} "
          f"{'us/event':>8} {'counted':>8} {'streamed':>8} {'lost':>6} status", flush=True)
    for n in sizes:
        base, _ = storm(host, n)
        for stream in [m == "stream" for m in args.modes.split(",")]:
            r = await one_run(host, settings, n, stream, counter)
            extra = r["guest_busy"] - base
            print(f"{n:>8} {r['mode']:>7} {r['bytes']:>10} {r['controller_cpu']:>9.3f} {r['guest_busy']:>8.2f} "
                  f"{extra:>8.2f} {extra / n * 1e6:>8.2f} {r['dd_reads_counted']:>8} {r['events_streamed']:>8} "
                  f"{r['loss']:>6} {r['status']}/{r['cleanup']}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="lab-x86_64-1")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--modes", default="kernel,stream", help="kernel, stream or both (in that order)")
    p.add_argument("--lab-dir", default=str(Path.home() / ".cache/fleetprobe/lab"))
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
