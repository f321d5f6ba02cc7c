"""--cluster (fleetprobe.cluster): slices as Dask distributed tasks on the workers of each host's zone.

A scheduler and two workers in two zones run in this process (Dask's Scheduler and Worker on
one asyncio loop); the hosts are bench/simhost.py's deterministic simulated hosts (see
tests/test_workers.py).  The run over the cluster must give the report one loop gives; a host
whose zone has no worker fails before any connection, saying so.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

from fleetprobe.cluster import RESOURCE, run_playbook_cluster, zone_of  # noqa: E402
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
    one = _projection(asyncio.run(run_playbook_workers(hosts, pb, s, workers=1)))
    seen: dict[str, set[str]] = {}

    class States:
        def set_state(self, host: str, state: str, detail: str = "") -> None:
            seen.setdefault(host, set()).add(state)

        def add_events(self, host: str, n: int) -> None:
            pass

        def set_aggregates(self, host: str, progress: tuple[Any, ...]) -> None:
            pass

    async def over_cluster() -> Any:
        async with distributed.Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as sched:
            async with distributed.Worker(sched.address, host="127.0.0.1", nthreads=1, resources={RESOURCE + "eu1": 1}), \
                    distributed.Worker(sched.address, host="127.0.0.1", nthreads=1, resources={RESOURCE + "us1": 1}):
                return await run_playbook_cluster(hosts + [orphan], pb, s, scheduler=sched.address,
                                                  observer=States())

    report = asyncio.run(over_cluster())
    by = {o.host: o for o in report.hosts}
    assert by["orphan"].status == "failed" and by["orphan"].stage == "connect"
    assert "no cluster worker serves its zone ap1" in by["orphan"].reason
    got = _projection(report)
    del got["hosts"]["orphan"], got["summaries"]["orphan"]
    for key_ in ("hosts", "summaries", "values", "aggregates", "latency"):
        assert got[key_] == one[key_], f"the cluster run differs from one loop in {key_}"
    assert all({"connecting", "probing", "done"} <= seen[h.name] for h in hosts), "live states stream back"


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
                        killed.append(eu1.pid)
                        os.kill(eu1.pid, signal.SIGKILL)

                    return await run_playbook_cluster(hosts, pb, s, scheduler=sched.address, observer=Killer())

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
        assert all(len(h.ran("runner")) == 1 for h in sim.hosts), "no slice ran twice"
        deadline = time.monotonic() + 20
        while leftovers(rid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftovers(rid) == []
    finally:
        assert sim.stop(grace=15) == []


@pytest.mark.tracefs
def test_cli_run_over_a_cluster(tmp_path: Path, busy: None) -> None:
    """``fleetprobe run --cluster ADDRESS``: the zone from the inventory, one stored run, the events caveat said."""
    import json
    import os
    import sqlite3

    from hostcheck import own_run_id
    from simhosts import SimFleet
    from test_failures import PLAYBOOK, common_args, leftovers, run_cli

    if os.geteuid() != 0 or not Path("/sys/kernel/tracing/instances").is_dir():
        pytest.skip("needs root and tracefs")
    sim = SimFleet(tmp_path / "sim")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tcp",
                                       dashboard_address=None, resources={RESOURCE + "eu1": 1})
    try:
        for i in range(2):
            sim.add(f"z{i}")
        inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh"),
                            extra={"z0": {"fleetprobe_zone": "eu1"}, "z1": {"fleetprobe_zone": "eu1"}})
        pb = tmp_path / "pb.yml"
        pb.write_text(PLAYBOOK)
        rid = own_run_id("c")
        store, report = tmp_path / "h.db", tmp_path / "r.json"
        rc, text, _ = run_cli(["run", str(pb), *common_args(inv, rid), "--cluster", cluster.scheduler_address,
                               "--json", str(report), "--store", str(store)])
        assert rc == 0, text
        data = json.loads(report.read_text())
        assert all(h["status"] == "ok" and h["events"] > 0 and h["cleanup"] == "clean" for h in data["hosts"]), text
        assert "raw events stay with the workers" in data["run"]["events_truncated"]
        with sqlite3.connect(store) as db:
            assert db.execute("select run_id from runs").fetchall() == [(rid,)]
        assert leftovers(rid) == []
    finally:
        cluster.close()
        assert sim.stop(grace=15) == []
