"""Issue 11, the stream side: what a user on an honest host, or a lying host, can do to a run's stream.

Over real SSH (tests/simhosts.py: asyncssh servers running fleetprobe's runner on this
machine's tracefs); the hostile user is uid 65534 (setpriv) exec'ing files it names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simhosts import SimFleet
import test_failures
from test_failures import common_args, hosts_by_name, run_cli, write_playbook

pytestmark = [pytest.mark.tracefs]

ROOT = Path(__file__).resolve().parent.parent
# The sim fleet and run id fixtures of the failure tests, shared.
sim = test_failures.sim
run_id = test_failures.run_id

EXEC_PLAYBOOK = """\
name: hostile-exec
description: Program executions, while a user execs files with newlines in their names.
duration: 3s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
"""

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]


@pytest.fixture
def hostile_dir() -> Iterator[Path]:
    """A folder uid 65534 can reach, with an executable whose name holds runner and trace lines."""
    top = Path(tempfile.mkdtemp(prefix="fp-hostile-", dir="/tmp"))
    try:
        top.chmod(0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def plant(top: Path, name: str) -> Path:
    """An executable file (a tiny sh script) at top/name, parents made; name may hold newlines and slashes."""
    path = top / name
    path.parent.mkdir(parents=True, exist_ok=True)
    for d in [path.parent, *path.parent.parents]:
        if d == top.parent:
            break
        d.chmod(0o755)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def as_nobody(commands: list[list[str]], stop: threading.Event) -> None:
    """Run each command as uid 65534, over and over, until stopped."""
    while not stop.is_set():
        for argv in commands:
            subprocess.run([*NOBODY, *argv], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05)


def run_while_nobody_runs(sim: SimFleet, tmp_path: Path, run_id: str, playbook: str,
                          commands: list[list[str]]) -> dict[str, object]:
    """One run of ``playbook`` on one sim host while uid 65534 runs ``commands``; its host outcome.

    The run's events are in ``tmp_path / "events.jsonl"``.
    """
    sim.add("honest")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    report = tmp_path / "report.json"
    stop = threading.Event()
    user = threading.Thread(target=as_nobody, args=(commands, stop))
    user.start()
    try:
        rc, text, _ = run_cli(["run", str(write_playbook(tmp_path, playbook)), *common_args(inv, run_id),
                               "--json", str(report), "--events", str(tmp_path / "events.jsonl")])
    finally:
        stop.set()
        user.join()
    host = hosts_by_name(report)["honest"]
    host["_rc"], host["_text"] = rc, text
    return host


def run_with_user(sim: SimFleet, tmp_path: Path, run_id: str, paths: list[Path], playbook: str = EXEC_PLAYBOOK,
                  via_bash: bool = False) -> dict[str, object]:
    """One run of ``playbook`` while uid 65534 execs ``paths`` (through bash's shell_execve if ``via_bash``)."""
    commands = [["/bin/bash", "-c", 'exec "$0"', str(p)] if via_bash else [str(p)] for p in paths]
    return run_while_nobody_runs(sim, tmp_path, run_id, playbook, commands)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_users_file_name_cannot_speak_for_the_runner(sim: SimFleet, tmp_path: Path, run_id: str,
                                                       hostile_dir: Path) -> None:
    """uid 65534 execs 'x\\n@@fp error ...': the honest host stays ok; the exec is kept out by the
    newline guard and counted, and the process's comm (the name's first 15 bytes, newline and all,
    printed at the head of its later events) stays that event's comm."""
    forged = plant(hostile_dir, "x\n@@fp error forged-by-a-user\n@@fp unclean instance forged")
    host = run_with_user(sim, tmp_path, run_id, [forged])
    assert host["_rc"] == 0, host
    assert host["status"] == "ok" and "forged" not in str(host["evidence"]) + str(host["reason"]), host
    assert host["cleanup"] == "clean", host
    assert host["framing"] == {"exec": "guarded"} and not host["forgeable"], host
    # The user exec'd it ~every 50 ms for 3 s: each exec is counted by the guard instance.
    assert host["guarded_out"] >= 10 and not host["guard_uncounted"], host
    assert host["guarded_out_by_probe"] == {"exec": host["guarded_out"]}, host
    assert host["unparsed_lines"] == 0 and host["unattributed_lines"] == 0, host
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if "forged-by-a-user" in json.dumps(e)]


FORGED_EVENT = ("            sshd-1       [000] ..... 1.000000: sched_process_exec: filename=/usr/sbin/backdoor "
                "pid=1 old_pid=1 tail=")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_users_file_name_cannot_forge_a_whole_event(sim: SimFleet, tmp_path: Path, run_id: str,
                                                      hostile_dir: Path) -> None:
    """A file name that holds a whole trace line forges no 'pid 1 sshd ran /usr/sbin/backdoor' event."""
    forged = plant(hostile_dir, "y\n" + FORGED_EVENT)
    host = run_with_user(sim, tmp_path, run_id, [forged])
    assert host["status"] == "ok", host
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    forged_events = [e for e in events if e["pid"] == 1 and "backdoor" in str(e["fields"].get("filename"))]
    assert not forged_events, forged_events[:3]


UPROBE_PLAYBOOK = """\
name: hostile-uprobe
description: bash's exec path (a sealed uprobe with the path as a string) and the exec tracepoint (guarded).
duration: 3s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
  - name: bash_exec
    uprobe: /bin/bash:shell_execve
    args:
      path: +0(arg1):ustring
"""
FORGED_UPROBE = '            sshd-1       [000] ..... 1.000000: bash_exec: (0x1) path="/usr/sbin/backdoor"'


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_users_path_in_a_sealed_uprobe_stays_in_its_event(sim: SimFleet, tmp_path: Path, run_id: str,
                                                            hostile_dir: Path) -> None:
    """bash execs 'y\\n<an exec line>\\n<a bash_exec line>' for uid 65534: the uprobe's line is sealed
    (kept whole, the user's lines inside its path), the tracepoint's is guarded (kept out, counted);
    neither forged line is an event."""
    forged = plant(hostile_dir, "y\n" + FORGED_EVENT + "\n" + FORGED_UPROBE)
    host = run_with_user(sim, tmp_path, run_id, [forged], UPROBE_PLAYBOOK, via_bash=True)
    assert host["_rc"] == 0 and host["status"] == "ok", host
    assert host["framing"] == {"exec": "guarded", "bash_exec": "sealed"} and not host["forgeable"], host
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["pid"] == 1], [e for e in events if e["pid"] == 1][:3]
    mine = [e for e in events if e["probe"] == "bash_exec" and "backdoor" in str(e["fields"].get("path"))]
    assert mine, "the user's sealed uprobe events were lost"
    # Every event whose fields speak of the backdoor is one of the user's own, the forged lines inside
    # it (its process is named 'backdoor"' by its file name; other sessions' sshd exec on this machine).
    assert [e for e in events if "backdoor" in json.dumps(e["fields"])] == mine
    assert all(str(e["fields"]["path"]).startswith(str(hostile_dir)) and "y\\n" in e["fields"]["path"]
               for e in mine), mine[:2]
    assert host["multiline_events"] >= len(mine) and host["guarded_out"] >= 1, host
    # The guard kept the user's execs out of the exec probe; the sealed uprobe has no guard.
    assert set(host["guarded_out_by_probe"]) == {"exec"} and host["guarded_out_by_probe"]["exec"] >= 1, host
    assert f"kept out by the newline guard (exec {host['guarded_out_by_probe']['exec']})" in host["_text"], host
    assert host["unparsed_lines"] == 0 and host["unattributed_lines"] == 0, host


BUSY_PLAYBOOK = """\
name: hostile-busy
description: Program executions and forks, many of them.
duration: 3s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
  - name: fork
    tracepoint: sched/sched_process_fork
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs of the test's own, unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "fp-test-small", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def busy_loop(stop: threading.Event) -> None:
    """Exec and fork, over and over, until stopped."""
    while not stop.is_set():
        subprocess.run(["/bin/true"], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_a_full_disk_for_events_truncates_them_and_the_run_finishes(sim: SimFleet, tmp_path: Path, run_id: str,
                                                                    small_disk: Path) -> None:
    """--events on a 64 KiB file system: the events stop (whole lines), the report says so, the run ends ok."""
    sim.add("busy")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    report, events = tmp_path / "report.json", small_disk / "events.jsonl"
    stop = threading.Event()
    load = threading.Thread(target=busy_loop, args=(stop,))
    load.start()
    try:
        rc, text, _ = run_cli(["run", str(write_playbook(tmp_path, BUSY_PLAYBOOK)), *common_args(inv, run_id),
                               "--json", str(report), "--events", str(events)])
    finally:
        stop.set()
        load.join()
    assert rc == 0, text
    data = json.loads(report.read_text())
    host = data["hosts"][0]
    assert host["status"] == "ok" and host["events"] > 0, host
    run = data["run"]
    assert "No space left on device" in run["events_truncated"], run
    lines = events.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])   # whole lines only
    assert run["events_written"] == len(lines) - 1 < host["events"], (run, host["events"])
    assert "events TRUNCATED" in text


def test_kill_9_of_the_controller_keeps_the_events_of_the_last_second(sim: SimFleet, tmp_path: Path,
                                                                     run_id: str) -> None:
    """SIGKILL mid-run: the events file holds what came until about a second before, in whole lines."""
    sim.add("busy")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    pb = write_playbook(tmp_path, BUSY_PLAYBOOK.replace("duration: 3s", "duration: 60s"))
    events = tmp_path / "events.jsonl"
    stop = threading.Event()
    load = threading.Thread(target=busy_loop, args=(stop,))
    load.start()
    proc = subprocess.Popen([sys.executable, "-m", "fleetprobe", "run", str(pb), *common_args(inv, run_id),
                             "--events", str(events)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None and not _probing(run_id):
            time.sleep(0.1)
        assert _probing(run_id), "the run never created its instance"
        time.sleep(4)                                        # probing, events arriving
        proc.kill()
        proc.wait()
    finally:
        stop.set()
        load.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    data = events.read_bytes()
    assert data, "nothing on disk after 4 s of probing"
    lines = data.split(b"\n")
    assert lines[-1] == b"", "a half line at the end"
    assert len(lines) > 10 and all(json.loads(line)["probe"] in ("exec", "fork") for line in lines[:-1])
    # The killed controller's runner saw the link drop and removed its probes itself.
    assert sim.wait_quiet(20) == []


def _probing(run_id: str) -> bool:
    """Has the run's instance appeared in this machine's tracefs?"""
    return any(p.name.startswith(f"fp_{run_id}_") for p in Path("/sys/kernel/tracing/instances").iterdir())


def _remove_instance_like_cleanup_force(run_id: str) -> list[str]:
    """What a sweep with a negative grace (``cleanup --force``) does to this run only: stop its
    instance's readers, disable its events, remove it. Only our run's names: other test sessions
    may be probing this kernel."""
    removed = []
    for inst in Path("/sys/kernel/tracing/instances").iterdir():
        if not inst.name.startswith(f"fp_{run_id}_"):
            continue
        for fd in Path("/proc").glob("[0-9]*/fd/*"):
            try:
                if os.readlink(fd).startswith(str(inst) + "/"):
                    os.kill(int(fd.parts[2]), 15)
            except OSError:
                continue
        (inst / "events" / "enable").write_text("0\n")
        for _ in range(50):
            try:
                inst.rmdir()
                removed.append(inst.name)
                break
            except OSError:
                time.sleep(0.1)
    return removed


def test_probes_removed_under_the_run_fail_the_host_with_the_window_seen(sim: SimFleet, tmp_path: Path,
                                                                         run_id: str) -> None:
    """Another operator removes the run's instance 2 s in: the host fails, saying how much it saw."""
    sim.add("victim")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    report = tmp_path / "report.json"
    pb = write_playbook(tmp_path, BUSY_PLAYBOOK.replace("duration: 3s", "duration: 30s"))
    removed: list[str] = []

    def remover() -> None:
        deadline = time.monotonic() + 30
        while not _probing(run_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)
        removed.extend(_remove_instance_like_cleanup_force(run_id))

    t = threading.Thread(target=remover)
    t.start()
    try:
        rc, text, took = run_cli(["run", str(pb), *common_args(inv, run_id), "--json", str(report)])
    finally:
        t.join()
    assert removed, "the test never found the run's instance"
    host = hosts_by_name(report)["victim"]
    assert rc != 0 and host["status"] == "failed", host
    assert "removed under the run" in host["reason"] and "of its 30 s" in host["reason"], host
    assert host["probed_seconds"] is not None and 1 < host["probed_seconds"] < 10, host
    assert took < 25, took


def test_numbers_past_their_bounds_are_no_event_and_break_no_output(tmp_path: Path) -> None:
    """A 400-digit timestamp, a 5000-digit pid or field: never an event, never inf, never unreadable JSON."""
    from fleetprobe.events import EventWriter
    from fleetprobe.merge import FleetAggregate
    from fleetprobe.parse import TraceStream

    agg = FleetAggregate()
    with EventWriter(tmp_path / "ev.jsonl") as w:
        s = TraceStream("h", {"e": "e"}, aggregate=agg, on_batch=lambda b: w.write_batch("h", b, {"e": "e"}))
        s.feed(f"   c-3 [000] ..... {'9' * 400}.5: e: a=1\n".encode()
               + f"   c-{'7' * 5000} [000] ..... 1.5: e: a=1\n".encode()
               + f"   c-3 [000] ..... 2.5: e: big={'9' * 5000} hex=0x{'f' * 300}\n".encode())
        s.close()
    agg.finish()
    assert s.stats.events == 1 and s.stats.unparsed == 2, s.stats
    rows = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["trace_ts"] == 2.5
    text = json.dumps(agg.to_json(), allow_nan=False)
    assert "9" * 1025 not in text                          # values are cut at MAX_VALUE_CHARS


def test_floods_from_hostile_hosts_keep_the_controller_under_1_gib(sim: SimFleet, tmp_path: Path,
                                                                   run_id: str) -> None:
    """30 lines of 20 MB, 1500 field names, 400 MB without a newline, 2 M stray control lines, 300 MB of facts:
    the controller (a child process, its peak RSS measured) stays under 1 GiB and writes the report."""
    kinds = ["flood_lines", "flood_fields", "flood_nonl", "flood_control", "flood_facts"]
    for kind in kinds:
        sim.add(kind, kind)
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    report = tmp_path / "report.json"
    pb = write_playbook(tmp_path, EXEC_PLAYBOOK.replace("duration: 3s", "duration: 2s"))
    proc = subprocess.Popen([sys.executable, "-m", "fleetprobe", "run", str(pb), *common_args(inv, run_id),
                             "--json", str(report)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * 1024
    text = out.decode("utf-8", "replace")
    assert report.exists(), text[-3000:]
    hosts = hosts_by_name(report)
    assert sorted(hosts) == sorted(kinds), text[-2000:]
    assert peak < 1 << 30, f"controller peak RSS {peak >> 20} MiB"
    assert hosts["flood_lines"]["overlong_lines"] == 30, hosts["flood_lines"]
    assert hosts["flood_nonl"]["overlong_lines"] == 1, hosts["flood_nonl"]
    assert hosts["flood_control"]["unparsed_lines"] >= 2_000_000, hosts["flood_control"]
    assert hosts["flood_control"]["status"] == "ok", hosts["flood_control"]     # no forged error
    # Bounded by size (32 MiB) or by the setup deadline, whichever comes first on a loaded machine.
    assert hosts["flood_facts"]["status"] == "failed" and hosts["flood_facts"]["stage"] == "facts", hosts["flood_facts"]
    data = json.loads(report.read_text())
    tables = [v["field"] for v in data["aggregate"]["values"] if v["probe"] == "exec"]
    flooded = [t for t in tables if t.startswith("f") and "_" in t]
    assert 0 < len(flooded) <= 64, len(flooded)                    # at most 64 tables per probe per host
    assert hosts["flood_fields"]["hits"]["exec"] >= 60_000, hosts["flood_fields"]
    print(f"controller peak RSS {peak >> 20} MiB")
