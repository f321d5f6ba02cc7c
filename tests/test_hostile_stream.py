"""Issue 11, the stream side: what a user on an honest host, or a lying host, can do to a run's stream.

Over real SSH (tests/simhosts.py: asyncssh servers running fleetprobe's runner on this
machine's tracefs); the hostile user is uid 65534 (setpriv) exec'ing files it names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simhosts import SimFleet
from test_failures import common_args, hosts_by_name, run_cli, run_id, sim, write_playbook  # noqa: F401

pytestmark = [pytest.mark.tracefs]

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


def exec_as_nobody(paths: list[Path], stop: threading.Event) -> None:
    """Exec each path as uid 65534, over and over, until stopped."""
    while not stop.is_set():
        for p in paths:
            subprocess.run([*NOBODY, str(p)], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05)


def run_with_user(sim: SimFleet, tmp_path: Path, run_id: str, paths: list[Path]) -> dict[str, object]:
    """One run of the exec playbook on one sim host while uid 65534 execs ``paths``; its host outcome."""
    sim.add("honest")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    report = tmp_path / "report.json"
    stop = threading.Event()
    user = threading.Thread(target=exec_as_nobody, args=(paths, stop))
    user.start()
    try:
        rc, text, _ = run_cli(["run", str(write_playbook(tmp_path, EXEC_PLAYBOOK)), *common_args(inv, run_id),
                               "--json", str(report), "--events", str(tmp_path / "events.jsonl")])
    finally:
        stop.set()
        user.join()
    host = hosts_by_name(report)["honest"]
    host["_rc"], host["_text"] = rc, text
    return host


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_users_file_name_cannot_speak_for_the_runner(sim: SimFleet, tmp_path: Path, run_id: str,
                                                       hostile_dir: Path) -> None:
    """uid 65534 execs 'x\\n@@fp error ...': the honest host stays ok, the line stays in that event's text."""
    forged = plant(hostile_dir, "x\n@@fp error forged-by-a-user\n@@fp unclean instance forged")
    host = run_with_user(sim, tmp_path, run_id, [forged])
    assert host["_rc"] == 0, host
    assert host["status"] == "ok" and "forged" not in str(host["evidence"]) + str(host["reason"]), host
    assert host["cleanup"] == "clean", host
    assert host["multiline_events"] >= 1 and host["unparsed_lines"] == 0, host
    events = (tmp_path / "events.jsonl").read_text()
    # The forged lines are in the exec event that printed them, newlines escaped.
    assert "forged-by-a-user" in events and "x\\\\n@@fp error forged-by-a-user" in events


FORGED_EVENT = ("            sshd-1       [000] ..... 1.000000: sched_process_exec: filename=/usr/sbin/backdoor "
                "pid=1 old_pid=1 tail=")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.xfail(strict=True, reason="issue 11 #2 forged trace headers: not framed yet (see README's threat "
                   "model); needs a secret trailer the kernel prints after every user string")
def test_a_users_file_name_cannot_forge_a_whole_event(sim: SimFleet, tmp_path: Path, run_id: str,
                                                      hostile_dir: Path) -> None:
    """A file name that holds a whole trace line forges no 'pid 1 sshd ran /usr/sbin/backdoor' event."""
    forged = plant(hostile_dir, "y\n" + FORGED_EVENT)
    host = run_with_user(sim, tmp_path, run_id, [forged])
    assert host["status"] == "ok", host
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    forged_events = [e for e in events if e["pid"] == 1 and "backdoor" in str(e["fields"].get("filename"))]
    assert not forged_events, forged_events[:3]
