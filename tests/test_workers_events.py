"""Raw events over worker processes (fleetprobe.eventout): streamed into the one file during the run,
on stdout for ``--events -`` and ``--print``, and ``audit`` over workers.

* The shared append itself, in process: a line cut by a writer killed mid-write is cut back before
  the next writer appends; a write error cuts the file back to its last whole line.
* The CLI over 2 worker processes against in-process asyncssh sim hosts running the real runner
  (tests/simhosts.py): the parent SIGKILLed mid-run leaves an events file of whole lines that grew
  during the run (issue 11 #16: flushed at least once a second); ``--events -`` and ``--print``
  give whole lines, each host's in its kernel's order; ``--print | head`` ends the run with no host
  failed; ``audit --workers 2`` prints its one result line and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprobe.events import SharedFd, cut_to_whole_lines

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from hostcheck import wait_for  # noqa: E402
from simhosts import SimFleet, strict_sim  # noqa: E402
from test_failures import leftovers, common_args  # noqa: E402
from test_workers import _children_of, _cmdline, _run_id, four_hosts  # noqa: E402


# --- the shared append ------------------------------------------------------------------------------

def test_a_line_cut_by_a_killed_writer_is_cut_back_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')  # a worker killed in the middle of its write
    lock = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fd = os.open(path, os.O_RDWR)
    try:
        SharedFd(fd, lock).append(fd, b'{"d":4}\n')
    finally:
        os.close(fd)
        os.close(lock)
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n{"d":4}\n'


def test_cut_to_whole_lines_of_a_file_with_no_newline_at_all(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"x" * 200_000)
    fd = os.open(path, os.O_RDWR)
    try:
        assert cut_to_whole_lines(fd, 200_000) == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == b""


def test_a_failed_append_leaves_the_file_at_its_last_whole_line(tmp_path: Path) -> None:
    """A file size limit (as a full disk) stops the write part way: the part is removed."""
    import resource

    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a":1}\n')
    lock = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fd = os.open(path, os.O_RDWR)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        with pytest.raises(OSError):
            SharedFd(fd, lock).append(fd, b'{"b":"' + b"y" * 10_000 + b'"}\n')
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
        os.close(fd)
        os.close(lock)
    assert path.read_bytes() == b'{"a":1}\n'


# --- the CLI over worker processes -------------------------------------------------------------------

@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimFleet]:
    """A sim fleet whose hosts' commands all end by themselves."""
    with strict_sim(tmp_path / "sim") as fleet:
        yield fleet


def _workers_of(pid: int) -> list[int]:
    return [p for p in _children_of(pid) if b"fleetprobe.workers" in _cmdline(p)]


def _probing(rid: str) -> int:
    # Hosts, not instances: a guarded tracepoint has its guard instance too (the same group).
    return len({x.split()[1].rsplit("_", 1)[0] for x in leftovers(rid) if x.startswith("instance")})


def _spawn(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "fleetprobe", *args], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})


def _whole_json_lines(data: bytes) -> list[dict[str, object]]:
    assert data.endswith(b"\n"), f"the file ends in half a line: {data[-200:]!r}"
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.tracefs
def test_parent_killed_mid_run_leaves_whole_lines_streamed_during_the_run(sim: SimFleet, tmp_path: Path,
                                                                          busy: None) -> None:
    inv, pb = four_hosts(sim, tmp_path, "e", "60s")
    rid = _run_id()
    events = tmp_path / "events.jsonl"
    proc = _spawn(["run", str(pb), *common_args(inv, rid), "--workers", "2", "--events", str(events),
                   "--no-store"], tmp_path / "out.txt")
    try:
        wait_for(lambda: _probing(rid) == 4 or proc.poll() is not None, 40, "four hosts probing")
        assert _probing(rid) == 4, (tmp_path / "out.txt").read_text()
        workers = _workers_of(proc.pid)
        assert len(workers) == 2, workers
        # Events reach the file while the run goes on (each worker flushes at least once a second).
        wait_for(lambda: events.exists() and events.stat().st_size > 0, 10, "events in the file during the run")
        time.sleep(1.5)
        during = events.read_bytes()
        hosts_during = {json.loads(x)["host"] for x in during.splitlines() if x.endswith(b"}")}
        assert hosts_during == {"e0", "e1", "e2", "e3"}, "both workers' hosts stream into the one file"
        proc.kill()  # SIGKILL: the parent writes nothing more, ever
        proc.wait(10)
        # The workers see their stdin end, stop their hosts (teardown) and flush their last whole lines.
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 30, "the workers to end")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = _whole_json_lines(events.read_bytes())
    assert len(lines) >= len(during.splitlines()), "nothing written during the run was lost"
    assert {x["host"] for x in lines} == {"e0", "e1", "e2", "e3"}
    assert all(x["probe"] in ("exec", "fork") for x in lines)
    wait_for(lambda: leftovers(rid) == [], 20, "the runners to remove their probes")


def _per_host_in_order(rows: list[tuple[str, float]]) -> None:
    last: dict[str, float] = {}
    for host, ts in rows:
        assert ts >= last.get(host, 0.0), f"{host}'s lines out of its kernel's order"
        last[host] = ts


def _run_over_two_workers(pb: Path, inv: Path, rid: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """``fleetprobe run PB`` over 2 workers, no store, in a process of its own; it must exit 0."""
    done = subprocess.run([sys.executable, "-m", "fleetprobe", "run", str(pb), *common_args(inv, rid),
                           "--workers", "2", "--no-store", *extra], cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return done


@pytest.mark.tracefs
def test_events_to_stdout_and_print_over_workers(sim: SimFleet, tmp_path: Path, busy: None) -> None:
    """``--events -`` over two workers: whole JSON lines, each host's in order, counted in the report;
    ``--print`` and a playbook's ``print:`` format over two workers: whole lines, host first, every host."""
    inv, pb = four_hosts(sim, tmp_path, "p")
    rid = _run_id()
    report = tmp_path / "r.json"
    done = _run_over_two_workers(pb, inv, rid, "--events", "-", "--json", str(report))
    lines = _whole_json_lines(done.stdout)
    data = json.loads(report.read_text())
    assert data["run"]["events_written"] == len(lines) == sum(h["events"] for h in data["hosts"]) > 0
    assert {x["host"] for x in lines} == {"p0", "p1", "p2", "p3"}
    _per_host_in_order([(str(x["host"]), float(x["trace_ts"])) for x in lines])  # type: ignore[arg-type]
    assert leftovers(rid) == []

    rid = _run_id()
    done = _run_over_two_workers(pb, inv, rid, "--print")
    out = done.stdout.decode()
    assert out.endswith("\n")
    printed = out.splitlines()
    assert printed and all(len(line.split()) >= 4 and line.split()[1] in ("exec", "fork") for line in printed), \
        printed[:5]
    assert {line.split()[0] for line in printed} == {"p0", "p1", "p2", "p3"}
    assert "stdout" not in done.stderr.decode(), "no reader went away"
    assert leftovers(rid) == []

    # A playbook's print: format (FormatPrinter, rebuilt in each worker): its lines from every worker.
    rid = _run_id()
    fmt = tmp_path / "fmt.yml"
    fmt.write_text("name: execprint\nduration: 2s\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                   "    print: \"{comm} ran {filename}\"\n")
    done = _run_over_two_workers(fmt, inv, rid)
    printed = done.stdout.decode().splitlines()
    assert printed and all(line.split()[1] == "exec" and " ran /" in line for line in printed), \
        [line for line in printed if not (line.split()[1] == "exec" and " ran /" in line)][:5]
    assert {line.split()[0] for line in printed} == {"p0", "p1", "p2", "p3"}
    assert leftovers(rid) == []


@pytest.mark.tracefs
def test_print_into_head_ends_the_run_over_workers(sim: SimFleet, tmp_path: Path, busy: None) -> None:
    """The reader of stdout goes away: every worker stops its hosts (clean teardown), exit 0, no worker left."""
    inv, pb = four_hosts(sim, tmp_path, "h", "60s")
    rid = _run_id()
    report = tmp_path / "r.json"
    cli = " ".join(["exec", sys.executable, "-m", "fleetprobe", "run", str(pb), *common_args(inv, rid),
                    "--workers", "2", "--print", "--no-store", "--json", str(report)])
    t0 = time.monotonic()
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {cli} 2>{tmp_path / 'err.txt'} | head -n 5"],
                          cwd=ROOT, capture_output=True, timeout=90)
    took = time.monotonic() - t0
    err = (tmp_path / "err.txt").read_text()
    assert done.returncode == 0, err
    assert len(done.stdout.decode().splitlines()) == 5
    assert took < 45, f"the run went on for {took:.0f}s after its reader left"
    assert "stdout was closed by its reader" in err
    data = json.loads(report.read_text())
    assert all(h["status"] == "interrupted" and h["cleanup"] == "clean" for h in data["hosts"]), data["hosts"]
    assert leftovers(rid) == []


@pytest.mark.tracefs
def test_audit_over_two_workers_one_result_line_and_its_exit(sim: SimFleet, tmp_path: Path, busy: None) -> None:
    inv, pb = four_hosts(sim, tmp_path, "a", "4s")
    store = tmp_path / "history.db"
    args = ["audit", str(pb), "-i", str(inv), "--ssh-config", "none", "--no-agent", "--connect-timeout", "2",
            "--setup-timeout", "3", "--store", str(store), "--workers", "2", "--json", str(tmp_path / "r.json")]
    proc = _spawn(args, tmp_path / "out.txt")
    seen: set[int] = set()
    try:
        while proc.poll() is None:
            seen.update(_workers_of(proc.pid))
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 0, out
    assert len(seen) == 2, f"the audit ran over {len(seen)} worker processes"
    verdicts = [line for line in out.splitlines() if line.startswith("fleetprobe-audit ")]
    assert len(verdicts) == 1 and "verdict=pass" in verdicts[0] and "hosts=4 hosts_ok=4" in verdicts[0], out
    assert out.rstrip().splitlines()[-1] == verdicts[0], "the result line is the last line"
    data = json.loads((tmp_path / "r.json").read_text())
    assert [h["status"] for h in data["hosts"]] == ["ok"] * 4
    import sqlite3
    with sqlite3.connect(store) as db:
        assert len(db.execute("select run_id from runs").fetchall()) == 1
