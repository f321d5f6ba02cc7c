"""--cluster (fleetprobe.cluster): slices as Dask distributed tasks on the workers of each host's zone.

A scheduler and two workers in two zones run in this process (Dask's Scheduler and Worker on
one asyncio loop); the hosts are bench/simhost.py's deterministic simulated hosts (see
tests/test_workers.py).  The run over the cluster must give the report one loop gives; a host
whose zone has no worker fails before any connection, saying so.
"""

from __future__ import annotations

import asyncio
import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

from fleetprobe import cluster  # noqa: E402
from fleetprobe.cli.eventformat import FormatPrinter  # noqa: E402
from fleetprobe.cluster import RESOURCE, run_playbook_cluster, zone_of  # noqa: E402
from fleetprobe.eventout import EventOutputs  # noqa: E402
from fleetprobe.render.eventlines import EventPrinter  # noqa: E402
from fleetprobe.inventory import Host  # noqa: E402
from fleetprobe.playbook import parse_playbook  # noqa: E402
from fleetprobe.session import SSHOptions  # noqa: E402
from fleetprobe.settings import RunSettings  # noqa: E402
from fleetprobe.workers import run_playbook_workers  # noqa: E402
from test_workers import VARY_PLAYBOOK, _projection, vary_fleet  # noqa: E402,F401


def test_zone_from_the_variable_or_the_one_group_named_as_a_zone() -> None:
    zones = {"eu1", "us1"}
    assert zone_of(Host("a", "x", vars={"fleetprobe_zone": "ap1"}, groups=("eu1",)), zones) == ("ap1", "")
    assert zone_of(Host("a", "x", groups=("web", "eu1")), zones) == ("eu1", "")
    zone, why = zone_of(Host("a", "x", groups=("eu1", "us1")), zones)
    assert zone is None and "eu1, us1" in why and "fleetprobe_zone" in why
    zone, why = zone_of(Host("a", "x", groups=("web",)), zones)
    assert zone is None and "no zone" in why


def test_two_zone_cluster_gives_the_one_loop_report(vary_fleet: tuple[Any, list[int]],  # noqa: F811
                                                    tmp_path: Path) -> None:
    fleet, ports = vary_fleet
    pb = parse_playbook(VARY_PLAYBOOK, str(tmp_path / "pb.yml"))
    key = str(fleet.work / "client_key")
    # Half the hosts say their zone in a variable, half by their group.
    hosts = [Host(name=f"sim{p}", address="127.0.0.1", port=p, user="root", key_file=key,
                  vars={"fleetprobe_zone": "eu1"} if i % 2 else {}, groups=("sim",) if i % 2 else ("sim", "us1"))
             for i, p in enumerate(ports)]
    orphan = Host(name="orphan", address="127.0.0.1", port=ports[0], user="root", key_file=key,
                  vars={"fleetprobe_zone": "ap1"})
    ssh = SSHOptions(known_hosts=(str(fleet.work / "known_hosts"),), ssh_config=(), use_agent=False,
                     connect_timeout=20.0)
    s = RunSettings(ssh=ssh, forks=20, setup_timeout=60.0)
    one_events = tmp_path / "one.jsonl"
    one = _projection(asyncio.run(run_playbook_workers(hosts, pb, s, workers=1, events_path=str(one_events))))
    seen: dict[str, set[str]] = {}

    class States:
        def set_state(self, host: str, state: str, detail: str = "") -> None:
            seen.setdefault(host, set()).add(state)

        def add_events(self, host: str, n: int) -> None:
            pass

        def set_aggregates(self, host: str, progress: tuple[Any, ...]) -> None:
            pass

    cluster_events = tmp_path / "cluster.jsonl"
    report = asyncio.run(two_zones(run_playbook_cluster, hosts + [orphan], pb, s, observer=States(),
                                   events_path=str(cluster_events)))
    by = {o.host: o for o in report.hosts}
    assert by["orphan"].status == "failed" and by["orphan"].stage == "connect"
    assert "no cluster worker serves its zone ap1" in by["orphan"].reason
    got = _projection(report)
    del got["hosts"]["orphan"], got["summaries"]["orphan"]
    for key_ in ("hosts", "summaries", "values", "aggregates", "latency"):
        assert got[key_] == one[key_], f"the cluster run differs from one loop in {key_}"
    assert all({"connecting", "probing", "done"} <= seen[h.name] for h in hosts), "live states stream back"
    # The raw events came back to this process: the same lines as one loop's (times depend on each run's
    # clock markers), every one counted, none dropped.
    lines = cluster_events.read_text().splitlines()
    assert report.run.events_written == len(lines) == sum(o.events for o in report.hosts) > 0
    assert report.run.events_truncated == ""
    assert _event_lines(cluster_events) == _event_lines(one_events)


async def two_zones(run: Any, *args: Any, **kwargs: Any) -> Any:
    """``run(*args, scheduler=..., **kwargs)`` over a scheduler and two workers, zones eu1 and us1, in this process."""
    async with distributed.Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as sched:
        async with distributed.Worker(sched.address, host="127.0.0.1", nthreads=1, resources={RESOURCE + "eu1": 1}), \
                distributed.Worker(sched.address, host="127.0.0.1", nthreads=1, resources={RESOURCE + "us1": 1}):
            return await run(*args, scheduler=sched.address, **kwargs)


def _event_lines(path: Path) -> list[str]:
    """The file's event lines without their time, sorted (a multiset)."""
    return sorted(json.dumps({k: v for k, v in json.loads(x).items() if k != "time"})
                  for x in path.read_text().splitlines())


def _zoned(fleet: Any, ports: list[int]) -> tuple[list[Host], RunSettings]:
    """The vary fleet's hosts, alternately in zones eu1 and us1, and settings to reach them."""
    key = str(fleet.work / "client_key")
    hosts = [Host(name=f"sim{p}", address="127.0.0.1", port=p, user="root", key_file=key,
                  vars={"fleetprobe_zone": "eu1" if i % 2 else "us1"}) for i, p in enumerate(ports)]
    ssh = SSHOptions(known_hosts=(str(fleet.work / "known_hosts"),), ssh_config=(), use_agent=False,
                     connect_timeout=20.0)
    return hosts, RunSettings(ssh=ssh, forks=20, setup_timeout=60.0)


def test_print_over_a_cluster_prints_one_loops_lines(vary_fleet: tuple[Any, list[int]],  # noqa: F811
                                                     tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """--print (and a playbook's print:) over a cluster: the lines the tasks printed reach this process's
    stdout, whole, the same lines one loop prints; ``--events -`` likewise, counted in the report."""
    fleet, ports = vary_fleet
    hosts, s = _zoned(fleet, ports)
    names = [h.name for h in hosts]
    printed: dict[str, list[str]] = {}
    for name, text in (("plain", VARY_PLAYBOOK),
                       ("format", VARY_PLAYBOOK.replace("    pair_with: ent", "    pair_with: ent\n"
                                                        "    print: \"{comm} exec'd by {pid}\""))):
        pb = parse_playbook(text, str(tmp_path / f"{name}.yml"))
        formats = {p.name: p.print_format for p in pb.probes if p.print_format is not None}
        printer = partial(FormatPrinter, probes=[p.name for p in pb.probes], formats=formats, hosts=names) \
            if formats else partial(EventPrinter, probes=[p.name for p in pb.probes], hosts=names)
        capfd.readouterr()
        one = asyncio.run(run_playbook_workers(hosts, pb, s, workers=1, outputs=EventOutputs(printer=printer)))
        one_lines = capfd.readouterr().out.splitlines()
        report = asyncio.run(two_zones(run_playbook_cluster, hosts, pb, s, outputs=EventOutputs(printer=printer)))
        out = capfd.readouterr().out
        assert out.endswith("\n"), "whole lines"
        assert sorted(out.splitlines()) == sorted(one_lines), name
        assert len(one_lines) == sum(o.events for o in one.hosts) == sum(o.events for o in report.hosts) > 0
        printed[name] = one_lines
    assert any("exec'd by" in x for x in printed["format"]) and not any("exec'd by" in x for x in printed["plain"])
    pb = parse_playbook(VARY_PLAYBOOK, str(tmp_path / "pb.yml"))
    report = asyncio.run(two_zones(run_playbook_cluster, hosts, pb, s, outputs=EventOutputs(stdout_json=True)))
    out = capfd.readouterr().out
    assert out.endswith("\n")
    assert report.run.events_written == len(out.splitlines()) == sum(o.events for o in report.hosts) > 0
    assert all(json.loads(x)["host"] in names for x in out.splitlines())


def test_a_slice_over_its_cap_drops_lines_and_the_report_counts_them(vary_fleet: tuple[Any, list[int]],  # noqa: F811
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice holds at most IN_FLIGHT_BYTES of lines the scheduler has not taken: with a cap smaller than
    one host's flush, lines are dropped; the file holds whole lines only, the report counts what is in
    it and says how many were dropped, and the rest of the report is one loop's."""
    fleet, ports = vary_fleet
    hosts, s = _zoned(fleet, ports)
    pb = parse_playbook(VARY_PLAYBOOK, str(tmp_path / "pb.yml"))
    one = _projection(asyncio.run(run_playbook_workers(hosts, pb, s, workers=1)))
    monkeypatch.setattr(cluster, "ITEM_BYTES", 1500)
    monkeypatch.setattr(cluster, "IN_FLIGHT_BYTES", 3000)
    events = tmp_path / "events.jsonl"
    report = asyncio.run(two_zones(run_playbook_cluster, hosts, pb, s, events_path=str(events)))
    lines = events.read_text().splitlines()
    assert all(json.loads(x)["host"] in {h.name for h in hosts} for x in lines), "whole lines"
    total = sum(o.events for o in report.hosts)
    assert report.run.events_written == len(lines) < total
    m = re.fullmatch(r"(\d+) events for \S+ \((\d+) bytes\) dropped on the cluster: .*", report.run.events_truncated)
    assert m, report.run.events_truncated
    assert int(m.group(1)) == total - len(lines)
    got = _projection(report)
    for key_ in ("hosts", "summaries", "values", "aggregates", "latency"):
        assert got[key_] == one[key_], f"dropped lines changed the report's {key_}"


def test_the_sender_keeps_order_caps_items_and_counts_what_it_drops() -> None:
    """_Sender in process: a put stalls (the scheduler's queue full); what comes meanwhile is kept up
    to the in-flight cap, sent in order in items of at most ITEM_BYTES, the rest dropped and counted."""
    import threading

    sent: list[list[Any]] = []
    gate = threading.Event()

    def put(items: list[Any], timeout: float) -> None:
        gate.wait()
        sent.append(items)

    line = b"x" * 99 + b"\n"
    sender = cluster._Sender(put, lambda: False, "test-sender", item_bytes=1000, in_flight=2500)
    sender.put([("state", "h", "probing", "")])
    for _ in range(5):
        sender.lines("file", line * 10, 10)  # 1000 bytes each: 2 fit beside the one under way
    sender.put([("done",)])
    gate.set()
    sender.close()
    items = [item for batch in sent for item in batch]
    assert [i[0] for i in items if i[0] != "dropped"][0] == "state" and items[-1][0] in ("done", "dropped")
    kept = [i for i in items if i[0] == "lines"]
    assert all(sum(len(i[2]) for i in batch if i[0] == "lines") <= 1000 for batch in sent)
    dropped = [i for i in items if i[0] == "dropped"][-1][1]["file"]
    assert sum(i[3] for i in kept) + dropped[0] == 50 and dropped[1] == dropped[0] * 100
    assert 20 <= sum(i[3] for i in kept) <= 30 and dropped[0] > 0
    assert cluster._pieces(line * 25, 25, 1000) == [(line * 10, 10), (line * 10, 10), (line * 5, 5)]
    big = b"y" * 3000 + b"\n"
    assert cluster._pieces(line + big + line, 3, 1000) == [(line, 1), (big, 1), (line, 1)]


@pytest.mark.tracefs
def test_a_cluster_worker_killed_mid_run_fails_its_hosts_only(tmp_path: Path, busy: None) -> None:
    """Two zones, each a worker process (Nanny); SIGKILL eu1's while all four hosts probe (real runners on
    this kernel, tests/simhosts.py): eu1's hosts fail saying their worker left, us1's keep their data, the
    slice is not run twice, and the dead worker's runners remove their probes when their links drop."""
    import os
    import signal
    import time

    from hostcheck import own_run_id
    from simhosts import SimFleet
    from test_failures import PLAYBOOK, leftovers

    if os.geteuid() != 0 or not Path("/sys/kernel/tracing/instances").is_dir():
        pytest.skip("needs root and tracefs")
    sim = SimFleet(tmp_path / "sim")
    try:
        for i in range(4):
            sim.add(f"k{i}")
        kh = sim.known_hosts_for(tmp_path / "kh")
        hosts = [Host(name=h.name, address=h.address, port=h.port, user="root", key_file=str(sim.client_key_path),
                      known_hosts=str(kh), vars={"fleetprobe_zone": "eu1" if i < 2 else "us1"})
                 for i, h in enumerate(sim.hosts)]
        rid = own_run_id("c")
        pb = parse_playbook(PLAYBOOK.replace("duration: 2s", "duration: 8s"), str(tmp_path / "pb.yml"))
        s = RunSettings(ssh=SSHOptions(ssh_config=(), use_agent=False, connect_timeout=5), setup_timeout=20,
                        run_id=rid)
        killed: list[int] = []

        async def scenario() -> Any:
            async with distributed.Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as sched:
                async with distributed.Nanny(sched.address, host="127.0.0.1", nthreads=1,
                                             resources={RESOURCE + "eu1": 1}) as eu1, \
                        distributed.Nanny(sched.address, host="127.0.0.1", nthreads=1,
                                          resources={RESOURCE + "us1": 1}):
                    probing: set[str] = set()

                    class Killer:
                        def set_state(self, host: str, state: str, detail: str = "") -> None:
                            if state == "probing":
                                probing.add(host)
                            if len(probing) == 4 and not killed:
                                killed.append(0)
                                asyncio.get_running_loop().call_later(1.5, kill)

                        def add_events(self, host: str, n: int) -> None:
                            pass

                    def kill() -> None:
                        assert eu1.pid is not None
                        at_kill.append(events.stat().st_size)
                        killed.append(eu1.pid)
                        os.kill(eu1.pid, signal.SIGKILL)

                    return await run_playbook_cluster(hosts, pb, s, scheduler=sched.address, observer=Killer(),
                                                      events_path=str(events))

        events = tmp_path / "events.jsonl"
        at_kill: list[int] = []
        report = asyncio.run(scenario())
        assert len(killed) == 2, "the worker was killed mid-run"
        by = {o.host: o for o in report.hosts}
        for dead in ("k0", "k1"):
            assert by[dead].status == "failed" and by[dead].stage == "probe", by[dead]
            assert "left the cluster mid-run" in by[dead].reason or "failed" in by[dead].reason, by[dead].reason
        for alive in ("k2", "k3"):
            o = by[alive]
            assert o.status == "ok" and o.cleanup == "clean" and o.events > 0, o
            assert report.aggregate.hosts[alive].events == o.events
        # The lines that reached this process before the kill are in the file, whole; the live zone's all.
        lines = [json.loads(x) for x in events.read_text().splitlines()]
        assert report.run.events_written == len(lines)
        assert at_kill[0] > 0, "lines reach the client's file while the run goes on, not at its end"
        assert {h: sum(x["host"] == h for x in lines) for h in ("k2", "k3")} == {h: by[h].events for h in ("k2", "k3")}
        assert all(len(h.ran("runner")) == 1 for h in sim.hosts), "no slice ran twice"
        deadline = time.monotonic() + 20
        while leftovers(rid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftovers(rid) == []
    finally:
        assert sim.stop(grace=15) == []


@pytest.mark.tracefs
def test_cli_run_over_a_cluster(tmp_path: Path, busy: None) -> None:
    """``fleetprobe run --cluster ADDRESS``: the zone from the inventory, one stored run with its events,
    ``--events FILE`` written here; ``audit --cluster`` judges the one report."""
    import os
    import sqlite3

    from hostcheck import own_run_id
    from simhosts import SimFleet
    from test_failures import PLAYBOOK, common_args, leftovers, run_cli, ssh_args

    if os.geteuid() != 0 or not Path("/sys/kernel/tracing/instances").is_dir():
        pytest.skip("needs root and tracefs")
    sim = SimFleet(tmp_path / "sim")
    local = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tcp",
                                       dashboard_address=None, resources={RESOURCE + "eu1": 1})
    try:
        for i in range(2):
            sim.add(f"z{i}")
        inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh"),
                            extra={"z0": {"fleetprobe_zone": "eu1"}, "z1": {"fleetprobe_zone": "eu1"}})
        pb = tmp_path / "pb.yml"
        pb.write_text(PLAYBOOK)
        rid = own_run_id("c")
        store, report, events = tmp_path / "h.db", tmp_path / "r.json", tmp_path / "events.jsonl"
        rc, text, _ = run_cli(["run", str(pb), *common_args(inv, rid), "--cluster", local.scheduler_address,
                               "--json", str(report), "--store", str(store), "--events", str(events)])
        assert rc == 0, text
        data = json.loads(report.read_text())
        assert all(h["status"] == "ok" and h["events"] > 0 and h["cleanup"] == "clean" for h in data["hosts"]), text
        lines = events.read_text().splitlines()
        assert data["run"]["events_written"] == len(lines) == sum(h["events"] for h in data["hosts"])
        assert data["run"]["events_truncated"] == ""
        with sqlite3.connect(store) as db:
            assert db.execute("select run_id from runs").fetchall() == [(rid,)]
        assert leftovers(rid) == []
        # The stored run has its events too (the store's temporary file, written here over the cluster).
        rid2 = own_run_id("c")
        rc, text, _ = run_cli(["run", str(pb), *common_args(inv, rid2), "--cluster", local.scheduler_address,
                               "--store", str(store)])
        assert rc == 0, text
        from fleetprobe.store import Store

        with Store(store) as st:
            assert {e["host"] for e in st.events(rid2)} == {"z0", "z1"}
        assert leftovers(rid2) == []
        audited = tmp_path / "audit.json"
        rc, text, _ = run_cli(["audit", str(pb), *ssh_args(inv), "--cluster", local.scheduler_address,
                               "--store", str(store), "--json", str(audited)])
        assert rc == 0, text
        data = json.loads(audited.read_text())
        assert [h["status"] for h in data["hosts"]] == ["ok", "ok"], text
        with Store(store) as st:
            assert {e["host"] for e in st.events(data["run"]["run_id"])} == {"z0", "z1"}
        assert leftovers(data["run"]["run_id"]) == []
    finally:
        local.close()
        assert sim.stop(grace=15) == []


def test_the_clients_stdout_reader_gone_is_told_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a cluster the client writes --print's and --events -'s lines: when stdout's reader goes away
    (``| head``) the run is told once (the CLI stops it, as on one loop) and the rest is not written."""
    import os
    import sys

    from fleetprobe.eventout import STDOUT

    r, w = os.pipe()
    os.close(r)  # the reader is gone
    try:
        monkeypatch.setattr(sys, "stdout", os.fdopen(w, "w", closefd=False))
        told: list[int] = []
        received = EventOutputs(stdout_json=True, on_stdout_closed=lambda: told.append(1)).receive()
        received.take(STDOUT, b'{"a":1}\n', 1)
        received.take(STDOUT, b'{"b":2}\n{"c":3}\n', 2)
        received.close()
    finally:
        os.close(w)
    assert told == [1]
    counted = received.counted
    assert counted is not None and counted.written == 0 and counted.dropped == 3 and "Broken pipe" in counted.error


def test_an_unreachable_scheduler_is_one_clear_error_before_any_host(tmp_path: Path) -> None:
    """--cluster at an address nothing listens on: bad input naming it, within --connect-timeout, no host tried."""
    import time

    from sshhosts import free_port
    from test_failures import run_cli

    from fleetprobe.cli.options import Exit

    pb = tmp_path / "pb.yml"
    pb.write_text("name: x\nduration: 1s\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n")
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    rc, text, _ = run_cli(["run", str(pb), "-i", "root@127.0.0.1:1,", "--cluster", address, "--connect-timeout", "1",
                           "--no-store", "--no-live"])
    assert rc == Exit.BAD_INPUT, text
    assert f"--cluster {address}: cannot reach the Dask scheduler" in text and "dask scheduler" in text, text
    assert "127.0.0.1:1:" not in text, "no host is tried"
    assert time.monotonic() - t0 < 15
