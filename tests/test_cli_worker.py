"""``fleetprobe worker``: a zone's Dask workers started from the CLI serve ``run --cluster``, and stop on Ctrl-C.

A Dask scheduler runs in this process (no workers of its own); ``fleetprobe worker`` is a real
process tree (the command, ``dask worker``, its nanny and worker process), started in its own
session so that the test can Ctrl-C it the way a terminal does (SIGINT to the whole group) and
check that nothing of it is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from fleetprobe.cluster import RESOURCE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _zone_workers(client: object, zone: str) -> list[str]:
    info = client.scheduler_info()  # type: ignore[attr-defined]
    return [a for a, w in info["workers"].items() if RESOURCE + zone in (w.get("resources") or {})]


def _session_pids(sid: int) -> list[int]:
    """Processes still in session ``sid`` (the worker's tree)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def test_bad_zone_is_refused_before_anything_starts() -> None:
    done = subprocess.run([sys.executable, "-m", "fleetprobe", "worker", "--scheduler", "tcp://127.0.0.1:1",
                           "--zone", "eu1,us1"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--zone" in done.stderr and "'eu1,us1'" in done.stderr, done.stderr


@pytest.mark.tracefs
def test_fleetprobe_worker_serves_its_zone_and_stops_on_ctrl_c(tmp_path: Path, busy: None) -> None:
    from hostcheck import own_run_id, wait_for
    from simhosts import SimFleet
    from test_failures import PLAYBOOK, common_args, leftovers, run_cli

    if os.geteuid() != 0 or not Path("/sys/kernel/tracing/instances").is_dir():
        pytest.skip("needs root and tracefs")
    cluster = distributed.LocalCluster(n_workers=0, processes=False, host="127.0.0.1", protocol="tcp",
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    sim = SimFleet(tmp_path / "sim")
    proc = subprocess.Popen([sys.executable, "-m", "fleetprobe", "worker", "--scheduler", cluster.scheduler_address,
                             "--zone", "eu1", "--nworkers", "1"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.err", "wb"))
    try:
        wait_for(lambda: len(_zone_workers(client, "eu1")) == 1, 90, "the zone's worker at the scheduler")
        for i in range(2):
            sim.add(f"w{i}")
        inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh"),
                            extra={f"w{i}": {"fleetprobe_zone": "eu1"} for i in range(2)})
        pb = tmp_path / "pb.yml"
        pb.write_text(PLAYBOOK)
        rid = own_run_id("w")
        report = tmp_path / "r.json"
        rc, text, _ = run_cli(["run", str(pb), *common_args(inv, rid), "--cluster", cluster.scheduler_address,
                               "--json", str(report), "--no-store"])
        assert rc == 0, text
        hosts = json.loads(report.read_text())["hosts"]
        assert [(h["host"], h["status"], h["cleanup"]) for h in hosts] == [("w0", "ok", "clean"), ("w1", "ok", "clean")]
        assert all(h["events"] > 0 for h in hosts), hosts
        assert leftovers(rid) == []
        # Ctrl-C on the bastion's terminal: SIGINT to the whole foreground group.
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        wait_for(lambda: not _zone_workers(client, "eu1"), 30, "the worker to leave the scheduler")
        wait_for(lambda: not _session_pids(proc.pid), 30, "every process of the worker's tree to end")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        client.close()
        cluster.close()
        assert sim.stop(grace=15) == []
