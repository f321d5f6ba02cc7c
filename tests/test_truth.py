"""Reports tell the truth (issue 9): no silent zeros, and fleetprobe does not observe itself.

Real parts only: OpenSSH sshd hosts on loopback sharing this machine's kernel (which has
syscall tracepoints), the runner under dash, bash and busybox ash, and an observer of the
test's own — a tracefs instance outside fleetprobe's names — that sees every fork on the
machine, so "the runner forks nothing while it runs" is checked by the kernel, not by the
runner's word.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fleetprobe.cli.main import main
from fleetprobe.runner.runner import runner_script
from fleetprobe.session import BOOTSTRAP, script_input
from hostcheck import ensure_tracefs, own_run_id
from sshhosts import Fleet, free_port, new_fleet

pytestmark = [pytest.mark.tracefs]

TRACEFS = Path("/sys/kernel/tracing")
REPO = Path(__file__).parent.parent
ROOT = os.geteuid() == 0

needs_root_tracefs = pytest.mark.skipif(not ROOT or not (TRACEFS / "instances").is_dir(),
                                        reason="needs root and tracefs")

SYSCALL_AUDIT = """\
name: noopen
description: nothing may open a file (an audit that must fail on any busy host)
duration: {duration}s
probes:
  - name: open
    tracepoint: syscalls/sys_enter_openat
    expect: none
  - name: open_ret
    tracepoint: syscalls/sys_exit_openat
"""

#: opensnoop on a kernel without kprobes (this machine): the same opens, from syscall tracepoints.
OPENSNOOP_TP = """\
name: opensnoop-tp
description: file opens from the syscall tracepoints
duration: {duration}s
event_cap: 1000000
probes:
  - name: open
    tracepoint: syscalls/sys_enter_openat
  - name: open_ret
    tracepoint: syscalls/sys_exit_openat
"""


class Observer:
    """A tracefs instance of the test's own (not fp_: no sweep touches it) recording forks and execs.

    Same trace clock as the runs' instances (mono), so their event timestamps and ours compare.
    """

    def __init__(self, name: str) -> None:
        self.dir = TRACEFS / "instances" / name

    def __enter__(self) -> Observer:
        self.dir.mkdir()
        (self.dir / "buffer_size_kb").write_text("8192\n")
        (self.dir / "trace_clock").write_text("mono\n")
        for ev in ("sched/sched_process_fork", "sched/sched_process_exec"):
            (self.dir / "events" / ev / "enable").write_text("1\n")
        return self

    def lines(self) -> list[str]:
        """Everything recorded so far (the trace file; not consumed)."""
        return [x for x in (self.dir / "trace").read_text(errors="replace").splitlines() if not x.startswith("#")]

    def __exit__(self, *exc: object) -> None:
        (self.dir / "events" / "enable").write_text("0\n")
        for _ in range(20):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.2)
        self.dir.rmdir()


_FORK = re.compile(r" (\d+\.\d+): sched_process_fork: comm=.* pid=(\d+) child_comm=(.*) child_pid=(\d+)")
_EXEC = re.compile(r"-(\d+) +(?:\(.*?\) +)?\[\d+\] +\S* *(\d+\.\d+): sched_process_exec: filename=(\S+) pid=(\d+)")


def forks_by(lines: list[str], parents: set[int], start: float, end: float) -> list[str]:
    """Fork lines (observer's) whose parent is one of ``parents``, between two trace timestamps."""
    out = []
    for line in lines:
        m = _FORK.search(line)
        if m and int(m[2]) in parents and start <= float(m[1]) <= end:
            out.append(line.strip())
    return out


# ---- the runner alone, under each shell ---------------------------------------------------------

def shells() -> list[list[str]]:
    """dash, bash and busybox ash, where installed."""
    found = [[p] for p in (shutil.which("dash"), shutil.which("bash")) if p]
    if shutil.which("busybox"):
        found.append([shutil.which("busybox") or "busybox", "sh"])
    return found


@needs_root_tracefs
@pytest.mark.parametrize("shell", shells(), ids=lambda s: os.path.basename(s[0]) if len(s) == 1 else "busybox")
def test_runner_forks_nothing_per_tick(shell: list[str]) -> None:
    """While it runs, the runner's processes fork nothing (seen by an independent observer), on every shell.

    The old runner forked date and sleep every second (and the watchdog date and sleep every 2 s).
    """
    group = f"fp_{own_run_id('tk')}_0d0d"
    instance = f"{group}_{int(time.time()) + 120}"
    plan = (f"ping\ntracefs {TRACEFS}\ngroup {group}\ninstance {instance}\nduration 7\n"
            f"deadline {int(time.time()) + 60}\ngrace 60\nenable sched/sched_process_exec\n"
            "enable sched/sched_process_fork\ngo\n")
    with Observer(f"t3obs{os.getpid()}") as obs:
        proc = subprocess.Popen([*shell, "-c", BOOTSTRAP, "fleetprobe-runner"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            assert proc.stdin is not None
            proc.stdin.write(script_input(runner_script()) + plan.encode())
            proc.stdin.flush()
            # Ticks, as the controller sends them (every TICK_SECONDS; faster here for more beats).
            for _ in range(5):
                time.sleep(1)
                proc.stdin.write(b"tick\n")
                proc.stdin.flush()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        lines = obs.lines()
    text = out.decode("utf-8", "replace")
    assert "@@fp clean" in text, (text[-2000:], err[-500:])
    # "PID:START" words: the runner's processes and their start times.
    own = {int(w.split(":")[0]) for w in re.search(r"@@fp own ([\d: ]+)", text)[1].split()}  # type: ignore[index]
    assert len(own) >= 4, own
    beats = [float(m[1]) for m in re.finditer(r" (\d+\.\d+): tracing_mark_write: fpbeat", text)]
    assert len(beats) >= 3, text[-2000:]
    # Between the first and the last heartbeat the runner only waited, woke and wrote a marker.
    assert forks_by(lines, own, beats[0], beats[-1]) == []
    # The observer does see the runner's forks where it makes them (setup): it is watching.
    assert forks_by(lines, own, 0, beats[0]), "the observer saw no fork of the runner at all"
    # And no event of the run's own instance came from the runner's processes.
    for line in text.splitlines():
        m = re.match(r" *.*?-(\d+) +(?:\(.*?\) +)?\[\d+\]", line)
        if m and int(m[1]) in own:
            assert "tracing_mark_write" in line, line


# ---- over SSH ------------------------------------------------------------------------------------

@pytest.fixture
def sshd_host(tmp_path: Path) -> Iterator[Fleet]:
    """One real sshd on 127.0.0.1 (sharing this machine's kernel, its syscall tracepoints included)."""
    if not ROOT or not ensure_tracefs() or not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        pytest.skip("needs root, tracefs and OpenSSH sshd")
    fleet = new_fleet(tmp_path / "fleet")
    try:
        fleet.start_sshd("alpha", "127.0.0.1", free_port())
        yield fleet
    finally:
        fleet.stop()


def _opens_while(seconds: float, path: Path) -> threading.Thread:
    """Open ``path`` a few times a second for a while, from this process (an open the hosts must see)."""
    def work() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            path.read_bytes()
            time.sleep(0.05)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def _cli(args: list[str]) -> tuple[int, str]:
    console = Console(record=True, width=250)
    rc = main(args, console)
    return rc, console.export_text()


def _conn(fleet: Fleet) -> list[str]:
    return ["-i", str(fleet.inventory()), "--ssh-config", "none", "--no-agent"]


def _run_args(prefix: str) -> list[str]:
    return ["--no-live", "--run-id", own_run_id(prefix)]


@pytest.mark.sshd
def test_expect_none_on_a_syscall_tracepoint_fails_the_audit(sshd_host: Fleet, tmp_path: Path,
                                                             clean_tracefs: None) -> None:
    """The audit that PASSED with 0 events: syscall tracepoints print as ``sys_openat(...)``, not their name."""
    pb = tmp_path / "noopen.yml"
    pb.write_text(SYSCALL_AUDIT.format(duration=2))
    marker = tmp_path / "fp-opened-marker"
    marker.write_text("x")
    report_path = tmp_path / "r.json"
    worker = _opens_while(6, marker)
    rc, out = _cli(["audit", str(pb), *_conn(sshd_host), "--store", str(tmp_path / "h.sqlite3"),
                    "--json", str(report_path), "--markdown", str(tmp_path / "r.md"), "--html",
                    str(tmp_path / "r.html")])
    worker.join()
    assert rc == 4, out
    assert "audit FAILED" in out and "alpha: probe 'open' fired" in out, out
    report = json.loads(report_path.read_text())
    (h,) = report["hosts"]
    assert h["status"] == "ok", h
    assert h["hits"]["open"] > 0 and h["hits"]["open_ret"] > 0, h["hits"]
    # Every line of the run's instance was one of its probes'.
    assert h["unattributed_lines"] == 0 and h["unparsed_lines"] == 0, h
    # The fields are the syscall's arguments, as numbers; the return value is signed.
    values = {(v["probe"], v["field"]): v for v in report["aggregate"]["values"]}
    assert {("open", "dfd"), ("open", "filename"), ("open", "flags"), ("open", "mode"),
            ("open_ret", "ret")} <= set(values)
    rets = [val for val, _c, _n in values[("open_ret", "ret")]["values"]]
    assert all(isinstance(r, int) for r in rets) and any(r >= 0 for r in rets)
    assert any(val == 0xffffff9c for val, _c, _n in values[("open", "dfd")]["values"]), "AT_FDCWD"


@pytest.mark.sshd
def test_lines_no_probe_claims_are_counted_everywhere_and_fail_the_audit(sshd_host: Fleet, tmp_path: Path,
                                                                         clean_tracefs: None) -> None:
    """A line in the run's own instance that is no probe's is counted per host, shown in every report,
    and the host is not audited (the rule's probe may be firing under a name the plan did not expect)."""
    pb = tmp_path / "execaudit.yml"
    pb.write_text("name: execaudit\ndescription: no exec of the marker\nduration: 3s\nprobes:\n"
                  "  - name: forbidden\n    tracepoint: sched/sched_process_exec\n"
                  "    filter: filename ~ \"*fp-never-run*\"\n    expect: none\n")
    stop = threading.Event()

    def intrude() -> None:
        # Someone (a person, another tool) writes into fleetprobe's instance while it runs.
        while not stop.is_set():
            for inst in (TRACEFS / "instances").glob("fp_*"):
                try:
                    if not (inst / "events" / "sched" / "sched_process_exec" / "filter").read_text().startswith(
                            '(filename ~ "*fp-never-run*")'):
                        continue  # another run's instance (another test on this machine): not ours to touch
                    (inst / "trace_marker").write_text("intruder was here\n")
                except OSError:
                    pass
            time.sleep(0.2)

    t = threading.Thread(target=intrude, daemon=True)
    t.start()
    try:
        rc, out = _cli(["audit", str(pb), *_conn(sshd_host), "--store", str(tmp_path / "h.sqlite3"),
                        "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
                        "--html", str(tmp_path / "r.html")])
    finally:
        stop.set()
        t.join()
    (h,) = json.loads((tmp_path / "r.json").read_text())["hosts"]
    assert h["status"] == "ok" and h["hits"].get("forbidden", 0) == 0, h
    assert h["unattributed_lines"] > 0 and h["unattributed"].get("tracing_mark_write", 0) > 0, h
    assert any("intruder" in e for e in h["unattributed_examples"]), h
    # Fail closed: 0 hits is not a pass when lines went unattributed.
    assert rc == 4 and "audit FAILED" in out, out
    assert "host-not-audited" in out and "matched no probe" in out, out
    n = str(h["unattributed_lines"])
    for where in (out, (tmp_path / "r.md").read_text(), (tmp_path / "r.html").read_text()):
        assert "matched no probe" in where and n in where


@pytest.mark.sshd
def test_skipped_probes_say_skipped_in_every_report(sshd_host: Fleet, tmp_path: Path, clean_tracefs: None) -> None:
    """A probe that could not be placed reads "skipped" with its reason, never as 0 hits."""
    pb = tmp_path / "mixed.yml"
    pb.write_text("name: mixed\ndescription: one probe this host has, one it lacks\nduration: 1s\nprobes:\n"
                  "  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                  "  - name: nosuch\n    tracepoint: nosuchsys/nosuch_event\n")
    rc, out = _cli(["run", str(pb), *_conn(sshd_host), "--json", str(tmp_path / "r.json"),
                    "--markdown", str(tmp_path / "r.md"), "--html", str(tmp_path / "r.html"),
                    *_run_args("sk")])
    assert rc == 0, out
    md, html = (tmp_path / "r.md").read_text(), (tmp_path / "r.html").read_text()
    reason = "does not exist on this kernel"
    assert re.search(r"nosuch\s.*skipped", out) and reason in out, out
    row = next(line for line in md.splitlines() if line.startswith("| nosuch |"))
    assert "skipped" in row and reason in row, row
    cell = re.search(r"<td class='heat skipped'[^>]*>skipped</td>", html)
    assert cell and reason in html, html[:3000]


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.sshd
@pytest.mark.parametrize("playbook", ["execsnoop", "opensnoop-tp"])
def test_fleetprobe_does_not_observe_itself(sshd_host: Fleet, tmp_path: Path, clean_tracefs: None,
                                            playbook: str) -> None:
    """execsnoop and opensnoop on an sshd host: not one event of fleetprobe's own processes, and none
    of them forks while the probes are on (the observer would see it)."""
    if playbook == "execsnoop":
        pb = REPO / "playbooks" / "execsnoop.yml"
        args = ["--duration", "7s"]
    else:
        pb = tmp_path / "opensnoop-tp.yml"
        pb.write_text(OPENSNOOP_TP.format(duration=7))
        args = []
    report_path, events_path = tmp_path / "r.json", tmp_path / "e.jsonl"
    with Observer(f"t3obs{os.getpid()}") as obs:
        # Until the run ends (it is killed then), not a fixed 8 s: a loaded machine's setup can eat that.
        trigger = subprocess.Popen(["sh", "-c", "while :; do /bin/true; sleep 0.2; done"])
        try:
            rc, out = _cli(["run", str(pb), *_conn(sshd_host), *args, "--json", str(report_path),
                            "--events", str(events_path), *_run_args("so")])
        finally:
            trigger.kill()
            trigger.wait()
        lines = obs.lines()
    assert rc == 0, out
    (h,) = json.loads(report_path.read_text())["hosts"]
    own = set(h["own_pids"])
    assert len(own) >= 4 and h["own_unfiltered"] == {} and h["own_events"] == 0, h
    events = _events(events_path)
    assert len(events) > 10, len(events)
    assert [e for e in events if e["pid"] in own] == []
    # The run saw the fleet's work: the trigger's execs (execsnoop) or the opens of everything (opensnoop).
    start, end = min(e["trace_ts"] for e in events), max(e["trace_ts"] for e in events)
    assert end - start > 4, (start, end)
    assert forks_by(lines, own, start, end) == [], "a fleetprobe process forked while the probes were on"
    # Children of ours (made at setup) that ran while the probes were on would be ours too.
    children = {int(m[4]) for m in map(_FORK.search, lines) if m and int(m[2]) in own}
    assert [e for e in events if e["pid"] in children] == []
