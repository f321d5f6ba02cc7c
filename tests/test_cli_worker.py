"""``fleetprobe worker``: a zone's Dask workers started from the CLI serve ``run --cluster``, and stop on
Ctrl-C (SIGINT to the terminal's whole group) or a service manager's SIGTERM (to the command alone).

A Dask scheduler runs in this process (no workers of its own); ``fleetprobe worker`` is a real
process tree (the command, ``dask worker`` in a session of its own, its nanny and worker process),
started in a session of its own, and every process of that tree must be gone after the stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from fleetprobe.cluster import RESOURCE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _zone_workers(client: object, zone: str) -> list[str]:
    info = client.scheduler_info()  # type: ignore[attr-defined]
    return [a for a, w in info["workers"].items() if RESOURCE + zone in (w.get("resources") or {})]


def _tree(root: int) -> set[int]:
    """``root`` and every process descended from it (by parent pid, across sessions)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def _start_worker(address: str, err: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fleetprobe", "worker", "--scheduler", address, "--zone", "eu1",
                             "--nworkers", "1"], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(err, "wb"))


def _stop_and_check(proc: subprocess.Popen[bytes], client: object, stop: Callable[[], None]) -> None:
    """Stop the worker with ``stop``: it leaves the scheduler, and every process of its tree ends."""
    from hostcheck import wait_for
    tree = _tree(proc.pid)
    assert len(tree) >= 3, tree      # fleetprobe worker, dask worker, its nanny (and the worker process)
    stop()
    assert proc.wait(60) == 0
    wait_for(lambda: not _zone_workers(client, "eu1"), 30, "the worker to leave the scheduler")
    wait_for(lambda: not _alive(tree), 30, f"every process of the worker's tree {sorted(tree)} to end")


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
    proc = _start_worker(cluster.scheduler_address, tmp_path / "worker.err")
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
        _stop_and_check(proc, client, lambda: os.killpg(proc.pid, signal.SIGINT))
    finally:
        _kill_tree(proc)
        client.close()
        cluster.close()
        assert sim.stop(grace=15) == []


def test_a_service_managers_sigterm_to_the_command_alone_stops_the_whole_tree(tmp_path: Path) -> None:
    """systemd's KillMode=mixed (or kill PID): SIGTERM to fleetprobe worker only; its dask worker goes too."""
    from hostcheck import wait_for
    cluster = distributed.LocalCluster(n_workers=0, processes=False, host="127.0.0.1", protocol="tcp",
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    proc = _start_worker(cluster.scheduler_address, tmp_path / "worker.err")
    try:
        wait_for(lambda: len(_zone_workers(client, "eu1")) == 1, 90, "the zone's worker at the scheduler")
        _stop_and_check(proc, client, lambda: os.kill(proc.pid, signal.SIGTERM))
    finally:
        _kill_tree(proc)
        client.close()
        cluster.close()


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Whatever of the worker's tree a failed test left running."""
    for pid in _alive(_tree(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if proc.poll() is None:
        proc.wait(10)
