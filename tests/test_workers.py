"""Local workers (fleetprobe.workers): N worker processes, one merged report, the same as one loop.

* Property tests of the merge path in process: each host's events in its own aggregate, folded
  into chunks at random points and the chunks into the parent's aggregate, give the aggregate
  one FleetAggregate fed every event gives (hits, value tables, latency, in-kernel tables).
* One loop against 2 and 3 workers over the same deterministic simulated hosts
  (bench/simhost.py --vary: each host its own stream, seeded by its port), plus a refused port:
  same hits, top values, histograms, loss counters and host statuses.
* Worker processes against in-process asyncssh sim hosts (tests/simhosts.py) that run the real
  runner on this kernel: one report, one --events file, one stored run, nothing left in tracefs;
  a worker SIGKILLed mid-run fails its hosts with the reason and leaves the others' data intact.

The OpenSSH e2e tests (tests/test_e2e_sshd.py: five sshd hosts, Ctrl-C, a killed controller)
run with the default worker count, i.e. over worker processes on any machine of 2+ cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from fleetprobe.aggtables import AggTable, HostTable
from fleetprobe.inventory import Host
from fleetprobe.merge import FleetAggregate
from fleetprobe.outcome import HostOutcome, LossCounters
from fleetprobe.playbook import parse_playbook
from fleetprobe.session import SSHOptions
from fleetprobe.settings import RunSettings
from fleetprobe.sketches import TopValues
from fleetprobe.workers import (_PerHost, default_workers, fork_shares, run_playbook_workers, split_hosts,
                                worker_count)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# --- the mechanism's small parts -------------------------------------------------------------------


def test_slices_forks_and_count() -> None:
    hosts = [Host(name=f"h{i}", address="127.0.0.1") for i in range(7)]
    slices = split_hosts(hosts, 3)
    assert [[h.name for h in s] for s in slices] == [["h0", "h3", "h6"], ["h1", "h4"], ["h2", "h5"]]
    assert fork_shares(200, 3) == [67, 67, 66] and sum(fork_shares(7, 2)) == 7
    pb = parse_playbook("name: x\nprobes:\n  - name: e\n    tracepoint: sched/sched_process_exec\n", "x.yml")
    assert worker_count(4, 2, 200, pb) == 2, "never more workers than hosts"
    assert worker_count(4, 100, 3, pb) == 3, "never more workers than forks: the bound is fleet-wide"
    assert worker_count(None, 100, 200, pb) == min(100, default_workers())
    assert default_workers() == len(os.sched_getaffinity(0))


values = st.one_of(st.integers(-5, 40), st.sampled_from(["a", "b", "/etc/passwd", "x y", ""]))


@given(st.lists(st.tuples(values, st.integers(1, 9)), max_size=60),
       st.lists(st.tuples(values, st.integers(1, 9)), max_size=60), st.integers(2, 30))
@settings(max_examples=200, deadline=None)
def test_topvalues_absorb_is_merged(a: list[tuple[Any, int]], b: list[tuple[Any, int]], cap: int) -> None:
    """absorb() in place gives what merged() returns, prunes and error bounds included."""
    x, y = TopValues(cap), TopValues(cap + 3)
    for v, n in a:
        x.add(v, n, hosts=1)
    for v, n in b:
        y.add(v, n, hosts=1)
    want = x.merged(y)
    x.absorb(y)
    assert x.to_json() == want.to_json()


# Events: (host, probe, pid, comm, args); "ret" pairs with "ent" for latency.
PAIRS = {"ret": "ent"}
event = st.tuples(st.sampled_from(["h1", "h2", "h3", "h4", "h5"]), st.sampled_from(["ent", "ret", "other"]),
                  st.integers(1, 6), st.sampled_from(["sh", "bash", "my worker 1", "x"]),
                  st.sampled_from(["", "path=/a flags=0x1", "path=/b flags=0x2", "n=3", 'path="q r"']))


def _feed(agg: Any, i: int, ev: tuple[str, str, int, str, str]) -> None:
    host, probe, pid, comm, args = ev
    agg.add_line(host, probe, 100.0 + i * 1e-4, 1000.0 + i * 1e-4, i % 4, pid, comm, args)


def _outcome(host: str) -> HostOutcome:
    n = int(host[1:])
    return HostOutcome(host=host, status="ok" if n % 3 else "failed", stage="done", events=n,
                       loss=LossCounters(overrun=n, capped=n % 2), hits={"kern": n * 10} if n % 2 else {})


def _table(host: str) -> tuple[HostTable, AggTable]:
    """A host's in-kernel count table (aggregate: results routed per host)."""
    n = int(host[1:])
    t = AggTable("kern", "count", "comm", (), 20, {("sh",): n, (f"c{n % 2}",): 2 * n})
    return HostTable("kernel", "", hits=3 * n, entries=2), t


@given(st.lists(event, max_size=150), st.integers(1, 4), st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_hosts_split_over_workers_merge_to_the_one_loop_aggregate(events: list[tuple[str, str, int, str, str]],
                                                                  workers: int, rnd: random.Random) -> None:
    """The worker path (a per-host sink, hosts folded into chunks as they end, chunks into the parent)
    gives the aggregate of one loop, whatever the slices and the moments the chunks are sent."""
    hosts = sorted({e[0] for e in events} | {"h5"})
    one = FleetAggregate(PAIRS)
    for i, ev in enumerate(events):
        _feed(one, i, ev)
    for h in hosts:
        part, table = _table(h)
        one.aggregates.add_host(h, "kern:count:comm", part, table)
    for h in hosts:
        one.add_host(_outcome(h))

    slices = {h: rnd.randrange(workers) for h in hosts}
    sinks = [_PerHost(PAIRS) for _ in range(workers)]
    for i, ev in enumerate(events):
        _feed(sinks[slices[ev[0]]], i, ev)
    for h in hosts:
        part, table = _table(h)
        sinks[slices[h]].aggregates.add_host(h, "kern:count:comm", part, table)
    parent = FleetAggregate(PAIRS)
    chunks: list[FleetAggregate | None] = [None] * workers
    order = list(hosts)
    rnd.shuffle(order)   # hosts end in any order
    for h in order:
        w = slices[h]
        done = sinks[w].finished(_outcome(h))
        if chunks[w] is None:
            chunks[w] = FleetAggregate(PAIRS)
        chunks[w].absorb(done)  # type: ignore[union-attr]
        if rnd.random() < 0.4:  # a send
            parent.absorb(chunks[w])  # type: ignore[arg-type]
            chunks[w] = None
    for c in chunks:
        if c is not None:
            parent.absorb(c)
    assert parent.to_json() == one.to_json()
    # ...and absorb() is merge(): the same value as merging copies.
    assert FleetAggregate(PAIRS).merge(parent).to_json() == one.to_json()


def test_absorb_refuses_a_host_twice() -> None:
    a, b = FleetAggregate(), FleetAggregate()
    a.add_host(HostOutcome(host="h1"))
    b.add_host(HostOutcome(host="h1"))
    with pytest.raises(Exception, match="h1"):
        a.absorb(b)


# --- one loop vs workers over the same deterministic simulated hosts ------------------------------

VARY_PLAYBOOK = """\
name: workers-equal
description: two tracepoints paired for a latency histogram, the first also counted per comm (streamed, as the facts have no hist triggers)
duration: 1s
probes:
  - name: ent
    tracepoint: sched/sched_process_fork
    aggregate: {count: [comm]}
  - name: ret
    tracepoint: sched/sched_process_exec
    pair_with: ent
"""


def _free_block(n: int) -> int:
    """A first port of ``n`` consecutive free ports on 127.0.0.1 (other checkouts run benchmarks too)."""
    for _ in range(50):
        base = random.randrange(15000, 32000 - n)  # below the ephemeral range (32768-)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def _projection(report: Any) -> dict[str, Any]:
    """What must not depend on how the hosts were split: everything but times, clocks and samples."""
    agg = report.aggregate
    hosts = {}
    for o in report.hosts:
        hosts[o.host] = {"status": o.status, "stage": o.stage, "events": o.events, "hits": o.hits,
                         "loss": o.loss.__dict__, "cleanup": o.cleanup, "placed": o.placed_probes,
                         "skipped": o.skipped_probes, "reason": o.reason.split(" [Errno")[0]}
    summaries = {h: {"events": s.events, "hits": s.hits, "latency": {p: v.to_json() for p, v in s.latency.items()}}
                 for h, s in agg.hosts.items()}
    values = {f"{p}/{n}": t.to_json() for (p, n), t in agg.values.items()}
    return {"hosts": hosts, "summaries": summaries, "values": values, "aggregates": agg.aggregates.to_json(),
            "latency": {p: agg.latency(p).to_json() for p in agg.probes()}}


VARY = True


@pytest.fixture(scope="module")
def vary_fleet() -> Iterator[tuple[Any, list[int]]]:
    """24 deterministic simulated hosts in 2 server processes (bench/simhost.py --vary)."""
    import fanout

    n = 24
    first = _free_block(n)
    fanout.FIRST_PORT = first
    fleet = fanout.SimFleet(Path(tempfile.mkdtemp(prefix="fp-workers-")), n)
    try:
        fleet.start(2, lines=40, vary=VARY)
        yield fleet, fleet.ports
    finally:
        fleet.stop()


def test_one_loop_and_workers_give_the_same_report(vary_fleet: tuple[Any, list[int]], tmp_path: Path) -> None:
    fleet, ports = vary_fleet
    pb = parse_playbook(VARY_PLAYBOOK, str(tmp_path / "pb.yml"))
    hosts = [Host(name=f"sim{p}", address="127.0.0.1", port=p, user="root", key_file=str(fleet.work / "client_key"))
             for p in ports]
    closed = _free_block(1)  # nothing listens there: an unreachable host in every run
    hosts.append(Host(name="refused", address="127.0.0.1", port=closed, user="root",
                      key_file=str(fleet.work / "client_key")))
    ssh = SSHOptions(known_hosts=(str(fleet.work / "known_hosts"),), ssh_config=(), use_agent=False,
                     connect_timeout=20.0)
    s = RunSettings(ssh=ssh, forks=20, setup_timeout=60.0)
    got = {}
    for w in (1, 2, 3):
        events = tmp_path / f"events-{w}.jsonl"
        report = asyncio.run(run_playbook_workers(hosts, pb, s, workers=w, events_path=str(events)))
        got[w] = _projection(report)
        # First the statuses, with their reasons: the comparisons below mean nothing without them.
        assert {o.host: o.reason for o in report.hosts if o.status != "ok"} == \
            {"refused": got[w]["hosts"]["refused"]["reason"]}, f"{w} worker(s)"
        lines = events.read_text().splitlines()
        assert report.run.events_written == len(lines) == sum(o.events for o in report.hosts)
        # Event times depend on each run's clock markers; the rest of every line must be the same.
        got[w]["event_lines"] = sorted(json.dumps({k: v for k, v in json.loads(x).items() if k != "time"})
                                       for x in lines)
    ok = [h for h, o in got[1]["hosts"].items() if o["status"] == "ok"]
    assert len(ok) == 24 and got[1]["hosts"]["refused"]["status"] == "unreachable"
    assert got[1]["summaries"][f"sim{ports[0]}"]["latency"]["ret"]["buckets"], "the pairs make a histogram"
    assert got[1]["aggregates"]["tables"], "the streamed count table is there"
    for w in (2, 3):
        for key in got[1]:
            assert got[w][key] == got[1][key], f"{w} workers differ from one loop in {key}"


# --- worker processes over sim hosts that run the real runner --------------------------------------

from simhosts import SimFleet, strict_sim  # noqa: E402
from test_failures import PLAYBOOK, leftovers, run_cli, common_args  # noqa: E402

TRACEFS = Path("/sys/kernel/tracing")


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimFleet]:
    """A sim fleet whose hosts' commands all end by themselves (the workers' runs check their own run ids)."""
    with strict_sim(tmp_path / "sim") as fleet:
        yield fleet


def _run_id() -> str:
    from hostcheck import own_run_id
    return own_run_id("w")


def four_hosts(sim: SimFleet, tmp_path: Path, prefix: str, duration: str = "2s") -> tuple[Path, Path]:
    """Four sim hosts ``<prefix>0..3`` and test_failures' PLAYBOOK for ``duration``: (inventory, playbook) paths."""
    for i in range(4):
        sim.add(f"{prefix}{i}")
    inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh"))
    pb = tmp_path / "pb.yml"
    pb.write_text(PLAYBOOK.replace("duration: 2s", f"duration: {duration}"))
    return inv, pb


@pytest.mark.tracefs
def test_cli_workers_one_report_one_events_file_one_stored_run(sim: SimFleet, tmp_path: Path, busy: None) -> None:
    inv, pb = four_hosts(sim, tmp_path, "w")
    rid = _run_id()
    store = tmp_path / "history.db"
    report, events = tmp_path / "r.json", tmp_path / "events.jsonl"
    rc, text, _ = run_cli(["run", str(pb), *common_args(inv, rid), "--workers", "2", "--json", str(report),
                           "--events", str(events), "--store", str(store)])
    assert rc == 0, text
    data = json.loads(report.read_text())
    assert [h["host"] for h in data["hosts"]] == ["w0", "w1", "w2", "w3"]
    assert all(h["status"] == "ok" and h["cleanup"] == "clean" and h["events"] > 0 for h in data["hosts"]), text
    lines = events.read_text().splitlines()
    assert data["run"]["events_written"] == len(lines) == sum(h["events"] for h in data["hosts"])
    assert {json.loads(x)["host"] for x in lines} == {"w0", "w1", "w2", "w3"}
    assert not list(tmp_path.glob(".fp-events-*")), "the workers' event parts are removed"
    with sqlite3.connect(store) as db:
        runs = db.execute("select run_id from runs").fetchall()
        facts = db.execute("select host, facts from host_runs").fetchall()
    assert runs == [(rid,)], "one run in the history, not one per worker"
    assert sorted(h for h, f in facts if f and json.loads(f)["kernel_release"] == os.uname().release) == \
        ["w0", "w1", "w2", "w3"], "each host's facts, gathered in a worker, are stored"
    assert leftovers(rid) == []


@pytest.mark.tracefs
def test_killed_worker_fails_its_hosts_and_keeps_the_others(sim: SimFleet, tmp_path: Path, busy: None) -> None:
    """SIGKILL one worker while every host probes: its hosts fail saying so, the other worker's are intact,
    and the runners of the dead worker's hosts remove their probes when their SSH links drop."""
    for i in range(4):
        sim.add(f"k{i}")
    inv_path = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh"))
    from fleetprobe.inventory import load_inventory
    hosts = load_inventory(str(inv_path)).hosts
    rid = _run_id()
    pb = parse_playbook(PLAYBOOK.replace("duration: 2s", "duration: 6s"), str(tmp_path / "pb.yml"))
    s = RunSettings(ssh=SSHOptions(ssh_config=(), use_agent=False, connect_timeout=5), setup_timeout=10,
                    run_id=rid)
    killed: list[int] = []

    class Killer:
        """Observer: once all four hosts probe, SIGKILL the worker probing k0 and k2 (worker 0)."""

        def __init__(self) -> None:
            self.probing: set[str] = set()

        def set_state(self, host: str, state: str, detail: str = "") -> None:
            if state == "probing":
                self.probing.add(host)
            if len(self.probing) == 4 and not killed:
                asyncio.get_running_loop().call_later(1.5, self.kill)
                killed.append(0)

        def kill(self) -> None:
            pid = _worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        def add_events(self, host: str, n: int) -> None:
            pass

    events = tmp_path / "events.jsonl"
    report = asyncio.run(run_playbook_workers(hosts, pb, s, workers=2, observer=Killer(), events_path=str(events)))
    assert len(killed) == 2, "the worker was killed mid-run"
    by = {o.host: o for o in report.hosts}
    for dead in ("k0", "k2"):
        o = by[dead]
        assert o.status == "failed" and o.stage == "probe", o
        assert f"worker process 0 (pid {killed[1]}) was killed by SIGKILL" in o.reason, o.reason
    for alive in ("k1", "k3"):
        o = by[alive]
        assert o.status == "ok" and o.cleanup == "clean" and o.events > 0, o
        assert report.aggregate.hosts[alive].events == o.events
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert {x["host"] for x in lines} >= {"k1", "k3"}, "the live worker's events are in the one file"
    assert report.run.events_written == len(lines)
    assert _worker_pids() == [], "no worker process outlives the run"
    # The dead worker's runners saw their links drop: they remove their probes by themselves.
    deadline = time.monotonic() + 20
    while leftovers(rid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(rid) == []


def _worker_pids() -> list[int]:
    """This process's worker children (python -m fleetprobe.workers), oldest first."""
    return sorted(p for p in _children_of(os.getpid()) if b"fleetprobe.workers" in _cmdline(p))


@pytest.mark.tracefs
def test_ctrl_c_reaches_every_worker_and_every_host_tears_down(sim: SimFleet, tmp_path: Path, busy: None) -> None:
    """SIGINT to the CLI (the workers are in their own sessions: only the parent gets it) while
    four hosts probe over two workers: exit 130, every host interrupted and clean, no worker left."""
    import subprocess

    hosts = [sim.add(f"c{i}") for i in range(4)]
    inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh"))
    pb = tmp_path / "pb.yml"
    pb.write_text(PLAYBOOK.replace("duration: 2s", "duration: 60s"))
    rid = _run_id()
    report = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "fleetprobe", "run", str(pb), *common_args(inv, rid),
                             "--workers", "2", "--json", str(report), "--no-store"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 30

        def probing() -> int:
            # Hosts, not instances: a host with a guarded tracepoint has its guard instance too
            # (the same group, deadline + 1 s).
            return len({x.split()[1].rsplit("_", 1)[0] for x in leftovers(rid) if x.startswith("instance")})

        while probing() < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert probing() == 4, "four hosts never probed"
        workers = [p for p in _children_of(proc.pid) if b"fleetprobe.workers" in _cmdline(p)]
        assert len(workers) == 2, workers
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 130, text
    data = json.loads(report.read_text())
    assert all(h["status"] == "interrupted" and h["cleanup"] == "clean" for h in data["hosts"]), data["hosts"]
    assert sum(h["events"] for h in data["hosts"]) > 0, "what was collected before Ctrl-C is kept"
    assert leftovers(rid) == []
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a worker outlived the run"
    assert all(h.ran("runner")[0].exit_status == 0 for h in hosts), "every runner finished its own teardown"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children_of(parent: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(parent):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@pytest.mark.tracefs
def test_waiting_for_a_forks_slot_is_not_counted_as_the_host_being_slow(sim: SimFleet, tmp_path: Path) -> None:
    """A fleet larger than --forks (10,000 hosts at 200 forks, or here 4 at 1): the setup timeout starts when
    a host gets its slot. The last of four slow hosts waits ~3 x 1.5 s for its slot, longer than
    2 x --setup-timeout; it must not fail for that."""
    from fleetprobe.inventory import load_inventory
    from fleetprobe.orchestrate import run_playbook

    for i in range(4):
        sim.add(f"s{i}", "slow", delay=1.5)
    hosts = load_inventory(str(sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh")))).hosts
    rid = _run_id()
    pb = parse_playbook(PLAYBOOK.replace("duration: 2s", "duration: 1s"), str(tmp_path / "pb.yml"))
    s = RunSettings(ssh=SSHOptions(ssh_config=(), use_agent=False, connect_timeout=5), setup_timeout=2.0,
                    forks=1, run_id=rid)
    t0 = time.monotonic()
    report = asyncio.run(run_playbook(hosts, pb, s))
    took = time.monotonic() - t0
    assert [(o.host, o.status) for o in report.hosts] == [(f"s{i}", "ok") for i in range(4)], \
        [o.reason for o in report.hosts]
    assert took > 2 * s.setup_timeout, "the hosts did wait for their slots longer than the setup limit"
    assert leftovers(rid) == []


def test_a_parent_slow_to_read_loses_nothing(tmp_path: Path) -> None:
    """A worker's last frames must all reach a parent that reads late (a busy machine): the worker
    waits for every byte to be written before it exits. 2000 hosts on a closed port end at once;
    their outcomes are far more than the pipe and the stream's buffer hold."""
    from fleetprobe.workers import Merger, WorkerJob, _serve, _start

    port = _free_block(1)
    hosts = [Host(name=f"r{i:04d}", address="127.0.0.1", port=port, user="root") for i in range(2000)]
    pb = parse_playbook(VARY_PLAYBOOK, str(tmp_path / "pb.yml"))
    s = RunSettings(ssh=SSHOptions(ssh_config=(), use_agent=False, connect_timeout=5), forks=2000, run_id="tslow1")

    async def go() -> Any:
        merger = Merger(pb, s, None, None)
        child = await _start(WorkerJob(0, hosts, pb, s))
        await asyncio.sleep(4)  # the worker is done with its hosts long before this
        await _serve(child, merger.apply)
        return child, merger

    child, merger = asyncio.run(go())
    assert child.done and not child.problem, child.stderr.decode()
    assert len(child.reported) == 2000 and all(o.status == "unreachable" for o in merger.total.outcomes.values())
