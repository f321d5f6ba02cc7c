"""End to end over real OpenSSH: five hosts, each sshd in its own network namespace.

The hosts share this machine's kernel (uprobes and tracepoints work here;
kprobes do not — the qemu lab tests cover those), so each host's run owns its
own group and instance in the same tracefs, exactly as two operators probing
one host at once would.  Every test checks that nothing fleetprobe made is
left in tracefs afterwards, on every exit path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprobe.render.safe import SafeConsole

from hostcheck import ensure_tracefs, fleetprobe_leftovers, wait_for
from fleetprobe.cli.main import main
from hostcheck import own_run_id
from sshhosts import SUBNET, Fleet, free_port, new_fleet

pytestmark = [pytest.mark.sshd, pytest.mark.netns]

if os.geteuid() != 0 or not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
    pytest.skip("needs root and OpenSSH sshd (apt-get install openssh-server)", allow_module_level=True)

PLAYBOOK = """\
name: e2e
description: exec tracepoint and a uprobe on bash's exec path, with a decoded string argument
duration: 4s
event_cap: 200000
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
  - name: bash_exec
    uprobe: /bin/bash:shell_execve
    args:
      path: +0(arg1):ustring
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Five sshd hosts in five network namespaces (tracefs mounted in each, as on a real host)."""
    if not ensure_tracefs():
        pytest.skip("needs tracefs")
    fl = new_fleet(tmp_path_factory.mktemp("netns-fleet"))
    try:
        for i in range(1, 6):
            fl.add_netns_host(f"web{i}", i)
        yield fl
    finally:
        mine = list(fl.namespaces)
        fl.stop()
    # Only this fleet's own namespaces (other test runs on the machine may have theirs live).
    live = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not set(mine) & set(live), "a test namespace survived"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A uniquely named executable: its exec is the event every host must report."""
    path = tmp_path / f"fp-marker-{uuid.uuid4().hex[:8]}"
    shutil.copy("/bin/true", path)
    return path


def _run_id() -> str:
    """A run id of this test's own, so it watches only its own names in the shared tracefs."""
    return own_run_id("e2e")


def _our_instances(run_id: str) -> list[str]:
    return [x for x in fleetprobe_leftovers() if x.startswith(f"instance fp_{run_id}_")]


def _probing_hosts(run_id: str) -> int:
    """How many hosts have the run's instances: each has its own and, with a newline guard, a guard
    instance of the same group (deadline + 1 s)."""
    from fleetprobe.plan import group_of_instance
    return len({group_of_instance(x.partition(" ")[2]) for x in _our_instances(run_id)})


def _trigger_while_running(marker: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Exec the marker through bash (shell_execve) repeatedly for a while, in the background."""
    script = f"end=$(( $(date +%s) + {int(seconds)} )); while [ $(date +%s) -lt $end ]; do {marker}; :; sleep 0.3; done"
    return subprocess.Popen(["bash", "-c", script])


def test_run_five_hosts_one_merged_report(fleet: Fleet, marker: Path, tmp_path: Path,
                                          clean_tracefs: None) -> None:
    pb = tmp_path / "e2e.yml"
    pb.write_text(PLAYBOOK)
    inv = fleet.inventory()
    report_path, events_path = tmp_path / "report.json", tmp_path / "events.jsonl"
    trigger = _trigger_while_running(marker, 12)
    try:
        console = SafeConsole(record=True, width=200)
        rc = main(["run", str(pb), "-i", str(inv), "--duration", "4s", "--json", str(report_path),
                   "--events", str(events_path), "--no-live"], console)
    finally:
        trigger.kill()
        trigger.wait()
    out = console.export_text()
    assert rc == 0, out
    report = json.loads(report_path.read_text())
    hosts = {h["host"]: h for h in report["hosts"]}
    assert sorted(hosts) == [f"web{i}" for i in range(1, 6)]
    uname_r = os.uname().release
    for name, h in hosts.items():
        assert h["status"] == "ok", (name, h)
        assert h["arch"] == "x86_64" and h["kernel_release"] == uname_r
        assert h["cleanup"] == "clean", (name, h)
        assert h["hits"].get("exec", 0) > 0 and h["hits"].get("bash_exec", 0) > 0, (name, h["hits"])
        assert set(h["loss"]) >= {"overrun", "dropped", "lost_lines", "probe_misses", "capped"}
        assert h["clock_error"] is not None and h["clock_error"] < 0.5
        # The uprobe's definition names the host's own group and a file offset the controller resolved.
        assert h["placed_probes"]["bash_exec"].startswith("p:fp_")
        assert "/bin/bash:0x" in h["placed_probes"]["bash_exec"]
    values = {(v["probe"], v["field"]): v for v in report["aggregate"]["values"]}
    seen_exec = {val: (count, nhosts) for val, count, nhosts in values[("exec", "filename")]["values"]}
    assert str(marker) in seen_exec and seen_exec[str(marker)][1] == 5, "every host saw the marker exec"
    seen_path = {val: nhosts for val, _count, nhosts in values[("bash_exec", "path")]["values"]}
    assert seen_path.get(str(marker)) == 5, "the uprobe's string argument was decoded on every host"
    # Raw events went to disk as JSON lines, with wall-clock times inside the run.
    lines = [json.loads(x) for x in events_path.read_text().splitlines()]
    assert {e["host"] for e in lines} == set(hosts)
    run = report["run"]
    assert all(run["started"] - 1 <= e["time"] <= run["ended"] + 1 for e in lines)
    assert any(e["probe"] == "bash_exec" and e["fields"].get("path") == str(marker) for e in lines)
    assert "web1" in out and "exec" in out


def test_plan_changes_nothing(fleet: Fleet, tmp_path: Path, clean_tracefs: None) -> None:
    pb = tmp_path / "e2e.yml"
    pb.write_text(PLAYBOOK)
    before = Path("/sys/kernel/tracing/uprobe_events").read_text()
    console = SafeConsole(record=True, width=200)
    rc = main(["plan", str(pb), "-i", str(fleet.inventory()), "--json", str(tmp_path / "plan.json")], console)
    assert rc == 0, console.export_text()
    plans = json.loads((tmp_path / "plan.json").read_text())
    assert len(plans) == 5
    for p in plans:
        kinds = {x["name"]: x for x in p["probes"]}
        assert kinds["exec"]["event"] == "sched/sched_process_exec"
        assert kinds["bash_exec"]["file"] == "uprobe_events"
        assert kinds["bash_exec"]["definition"].startswith(f"p:{p['group']}/bash_exec /bin/bash:0x")
        assert "+0(%di):ustring" in kinds["bash_exec"]["definition"] or "ustring" in kinds["bash_exec"]["definition"]
    assert Path("/sys/kernel/tracing/uprobe_events").read_text() == before


def test_facts_table(fleet: Fleet, tmp_path: Path) -> None:
    console = SafeConsole(record=True, width=250)
    rc = main(["facts", "-i", str(fleet.inventory()), "--json", str(tmp_path / "facts.json")], console)
    assert rc == 0
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert [f["host"] for f in facts] == [f"web{i}" for i in range(1, 6)]
    for f in facts:
        assert f["facts"]["arch"] == "x86_64"
        assert f["facts"]["tracefs"] == "/sys/kernel/tracing"
        assert f["facts"]["uprobe_events"] is True
    text = console.export_text()
    assert "web3" in text and "x86_64" in text


def test_unknown_host_key_fails_strictly_then_accept_new_records_it(fleet: Fleet, tmp_path: Path) -> None:
    inv = fleet.inventory(extra_vars={"fleetprobe_known_hosts": str(tmp_path / "empty_known_hosts")})
    console = SafeConsole(record=True, width=200)
    rc = main(["facts", "-i", str(inv), "--limit", "web1"], console)
    assert rc == 3
    assert "host key not verified" in console.export_text()
    console = SafeConsole(record=True, width=200)
    rc = main(["facts", "-i", str(inv), "--limit", "web1", "--accept-new-host-keys"], console)
    assert rc == 0, console.export_text()
    recorded = (tmp_path / "empty_known_hosts").read_text()
    assert f"{SUBNET}.1.2" in recorded and fleet.hosts[0].host_key_pub.split()[1] in recorded


def _runner_pids(netns: str) -> list[int]:
    """PIDs of fleetprobe runners in a network namespace: ``sh -c <runner>`` whose parent is sshd."""
    ns_ino = os.stat(f"/run/netns/{netns}").st_ino
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.stat(d / "ns" / "net").st_ino != ns_ino:
                continue
            argv = (d / "cmdline").read_bytes().split(b"\0")
            ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except OSError:
            continue
        if argv[:2] == [b"sh", b"-c"] and argv[3:4] == [b"fleetprobe-runner"] and parent.startswith(b"sshd"):
            found.append(int(d.name))
    return found


def _spawn_cli(args: list[str], tmp_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    return subprocess.Popen([sys.executable, "-m", "fleetprobe", *args], stdout=open(tmp_path / "out.txt", "wb"),
                            stderr=subprocess.STDOUT, env=env)


def test_ctrl_c_stops_cleans_and_reports(fleet: Fleet, marker: Path, tmp_path: Path,
                                         clean_tracefs: None) -> None:
    pb = tmp_path / "e2e.yml"
    pb.write_text(PLAYBOOK)
    trigger = _trigger_while_running(marker, 20)
    rid = _run_id()
    proc = _spawn_cli(["run", str(pb), "-i", str(fleet.inventory()), "--duration", "60s", "--no-live",
                       "--run-id", rid, "--json", str(tmp_path / "r.json")], tmp_path)
    try:
        wait_for(lambda: _probing_hosts(rid) == 5, 30, "five instances probing")
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    finally:
        trigger.kill()
        trigger.wait()
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "out.txt").read_text()
    assert rc == 130, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert all(h["status"] == "interrupted" and h["cleanup"] == "clean" for h in report["hosts"]), report["hosts"]
    assert sum(h["events"] for h in report["hosts"]) > 0, "what was collected before Ctrl-C is kept"
    assert not _our_instances(rid)


def test_controller_killed_runner_cleans_when_link_drops(fleet: Fleet, tmp_path: Path,
                                                         clean_tracefs: None) -> None:
    pb = tmp_path / "e2e.yml"
    pb.write_text(PLAYBOOK)
    rid = _run_id()
    proc = _spawn_cli(["run", str(pb), "-i", str(fleet.inventory()), "--limit", "web1:web2",
                       "--duration", "120s", "--no-live", "--run-id", rid], tmp_path)
    try:
        wait_for(lambda: _probing_hosts(rid) == 2, 30, "two instances probing")
        proc.kill()  # SIGKILL: no teardown from the controller at all
        proc.wait(10)
        # The kernel closes the dead controller's sockets; sshd closes the channel; each runner
        # sees EOF on stdin and removes its probes by itself, long before its deadline.
        wait_for(lambda: not _our_instances(rid), 20, "runners to clean up after the link dropped")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not any(f"fp_{rid}_" in line for line in Path("/sys/kernel/tracing/uprobe_events").read_text().splitlines())


def test_runner_killed_watchdog_removes_probes(fleet: Fleet, tmp_path: Path, clean_tracefs: None) -> None:
    pb = tmp_path / "e2e.yml"
    pb.write_text(PLAYBOOK)
    # deadline = start + 3 s + 2 s slack; the watchdog fires at deadline + 1 s grace.
    rid = _run_id()
    proc = _spawn_cli(["run", str(pb), "-i", str(fleet.inventory()), "--limit", "web3", "--duration", "3s",
                       "--teardown-slack", "2", "--grace", "1", "--no-live", "--run-id", rid], tmp_path)
    try:
        wait_for(lambda: _probing_hosts(rid) == 1, 30, "the instance")
        ns = fleet.hosts[2].netns
        assert ns
        # SIGKILL the runner shell itself on the host (not its reader, not the watchdog).
        runner: list[int] = []
        wait_for(lambda: bool(runner.extend(_runner_pids(ns)) or runner), 10, "the runner process")
        assert len(runner) == 1, runner
        os.kill(runner[0], signal.SIGKILL)
        assert _our_instances(rid), "killing the runner alone leaves the probes in place..."
        wait_for(lambda: not _our_instances(rid), 30, "...until the on-host watchdog removes them")
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sweep_removes_stale_leftovers_and_spares_live_ones(fleet: Fleet, tmp_path: Path) -> None:
    """A dead run's group and instance (deadline long past) are swept; a live one is not touched."""
    t = Path("/sys/kernel/tracing")
    stale_group, live_group = "fp_dead01_beef", "fp_live01_cafe"
    # Stale by 40 s only, swept with --grace 5: another fleetprobe run on this machine (other suites,
    # default grace 60 s) sweeps this tracefs too, and must not take the planted group first.
    stale_inst = f"{stale_group}_{int(time.time()) - 40}"
    live_inst = f"{live_group}_{int(time.time()) + 3600}"
    offset = "0x" + subprocess.run(["sh", "-c", "readelf -sW /bin/bash | awk '$8==\"readline\"{print $2; exit}'"],
                                   capture_output=True, text=True).stdout.strip().lstrip("0")
    try:
        for g, i in ((stale_group, stale_inst), (live_group, live_inst)):
            (t / "instances" / i).mkdir()
            # One write(2) with O_APPEND: Python's buffered "a" mode gets EINVAL from uprobe_events on 6.18.
            fd = os.open(t / "uprobe_events", os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, f"p:{g}/rl /bin/bash:{offset}\n".encode())
            finally:
                os.close(fd)
        console = SafeConsole(record=True, width=200)
        rc = main(["cleanup", "-i", str(fleet.inventory()), "--limit", "web4", "--grace", "5"], console)
        assert rc in (0, 2), console.export_text()
        left = fleetprobe_leftovers()
        assert not any(stale_group in x for x in left), left
        assert any(live_inst in x for x in left), "a live run is never swept"
        assert "fp_dead01" in console.export_text(), "the sweep says what it removed"
    finally:
        for g, i in ((stale_group, stale_inst), (live_group, live_inst)):
            subprocess.run(["sh", "-c", f"echo '-:{g}/rl' >> {t}/uprobe_events"], capture_output=True)
            if (t / "instances" / i).exists():
                (t / "instances" / i).rmdir()


def test_loopback_sshd_and_adhoc_inventory(tmp_path: Path, clean_tracefs: None) -> None:
    """`-i user@127.0.0.1:PORT` works with --known-hosts/--identity and no inventory file."""
    fl = new_fleet(tmp_path / "lo")
    try:
        h = fl.start_sshd("lo", "127.0.0.1", free_port())
        kh = fl.write_known_hosts()
        pb = tmp_path / "e2e.yml"
        pb.write_text(PLAYBOOK.replace("duration: 4s", "duration: 2s"))
        console = SafeConsole(record=True, width=200)
        rc = main(["run", str(pb), "-i", f"root@127.0.0.1:{h.port},", "--known-hosts", str(kh),
                   "--identity", str(fl.client_key), "--ssh-config", "none", "--no-agent", "--no-live",
                   "--json", str(tmp_path / "r.json")], console)
        assert rc == 0, console.export_text()
        r = json.loads((tmp_path / "r.json").read_text())
        assert r["hosts"][0]["host"] == f"127.0.0.1:{h.port}" and r["hosts"][0]["status"] == "ok"
    finally:
        fl.stop()
