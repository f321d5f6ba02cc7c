"""Failure modes, end to end over real SSH: simulated hosts that are slow, hang, drop, lie, refuse.

Every host here is an in-process asyncssh server (tests/simhosts.py) that runs
fleetprobe's scripts for real on this machine's kernel, so tracepoint events
are real and the runner really creates and removes its tracefs instance.
Several sim "hosts" share this one kernel: each run has its own run id, and
the checks afterwards look only at names carrying it (other test sessions may
be probing this kernel at the same time).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetprobe.render.safe import SafeConsole

from simhosts import SimFleet, refused_port, run_leftovers, strict_sim

from fleetprobe.cli.main import main
from fleetprobe.connectors.asyncssh import connect
from fleetprobe.errors import HostError
from fleetprobe.inventory import Host, load_inventory
from fleetprobe.orchestrate import cleanup_fleet, facts_fleet, plan_fleet
from fleetprobe.playbook import parse_playbook
from fleetprobe.session import Session, SSHOptions
from fleetprobe.settings import RunSettings

pytestmark = [pytest.mark.tracefs]

ROOT = Path(__file__).resolve().parent.parent
TRACEFS = Path("/sys/kernel/tracing")

PLAYBOOK = """\
name: simfleet
description: Program executions and forks, seen by every simulated host (they share this kernel).
duration: 2s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
  - name: fork
    tracepoint: sched/sched_process_fork
"""


leftovers = run_leftovers


def group_prefix(run_id: str, host: str) -> str:
    """The group name fleetprobe gives ``host`` in run ``run_id`` (see fleetprobe.plan.names_for)."""
    return f"fp_{run_id}_{hashlib.sha256(host.encode()).hexdigest()[:4]}"


@pytest.fixture
def run_id() -> str:
    """A run id of this test's own (lowercase letters and digits, as names_for requires)."""
    return "t" + secrets.token_hex(4)


@pytest.fixture
def sim(tmp_path: Path, run_id: str) -> Iterator[SimFleet]:
    """A sim fleet; afterwards every command it ran must have ended by itself and tracefs be clean of the run."""
    with strict_sim(tmp_path / "sim", run_id) as fleet:
        yield fleet


def write_playbook(tmp_path: Path, text: str = PLAYBOOK) -> Path:
    """Write a playbook into the test's directory."""
    path = tmp_path / "simfleet.yml"
    path.write_text(text)
    return path


def run_cli(args: list[str]) -> tuple[int, str, float]:
    """fleetprobe in-process: exit status, everything it printed, seconds taken."""
    console = SafeConsole(record=True, width=200)
    t0 = time.monotonic()
    rc = main(args, console=console)
    return rc, console.export_text(), time.monotonic() - t0


def ssh_args(inventory: Path, *, setup: float = 3, connect: float = 2) -> list[str]:
    """Connection options every command here shares: no user SSH config or agent, short timeouts."""
    return ["-i", str(inventory), "--ssh-config", "none", "--no-agent", "--connect-timeout", str(connect),
            "--setup-timeout", str(setup)]


def common_args(inventory: Path, run_id: str, *, setup: float = 3, connect: float = 2) -> list[str]:
    """``run`` options: the shared ones, no live view, our run id."""
    return [*ssh_args(inventory, setup=setup, connect=connect), "--no-live", "--run-id", run_id]


def hosts_by_name(report_path: Path) -> dict[str, dict[str, Any]]:
    """The JSON report's host outcomes by host name."""
    data = json.loads(report_path.read_text())
    return {h["host"]: h for h in data["hosts"]}


def test_mixed_fleet_good_hosts_report_bad_hosts_say_why(sim: SimFleet, tmp_path: Path, run_id: str,
                                                         busy: None) -> None:
    """One run over good, slow, hostile, dropping, hanging, auth-failing and refusing hosts."""
    good = sim.add("good")
    slow = sim.add("slow", "slow", delay=0.5)
    hostile = sim.add("hostile", "hostile")
    drop = sim.add("drop", "drop_after", delay=1.5)
    hang = sim.add("hang", "hang")
    sim.add("authfail", "auth_fail")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh,
                        extra={"refused": {"ansible_host": "127.0.0.1", "ansible_port": refused_port()}})
    report = tmp_path / "report.json"
    setup = 3.0
    rc, text, took = run_cli(["run", str(write_playbook(tmp_path)), *common_args(inv, run_id, setup=setup),
                              "--json", str(report)])
    assert rc == 2, text
    hosts = hosts_by_name(report)
    assert sorted(hosts) == ["authfail", "drop", "good", "hang", "hostile", "refused", "slow"]

    for name in ("good", "slow"):
        h = hosts[name]
        assert h["status"] == "ok", h
        assert h["events"] > 0 and h["hits"].get("exec", 0) > 0 and h["hits"].get("fork", 0) > 0, h
        assert h["cleanup"] == "clean", h
        assert h["unparsed_lines"] == 0, h
    # One command per host for the whole run: facts, plan, probes and teardown on the runner's channel.
    assert [c.kind for c in good.commands] == ["runner"] and [c.kind for c in slow.commands] == ["runner"]
    # The slow host really waited before its command, and still finished.
    assert slow.commands[0].begun is not None and slow.commands[0].begun - slow.commands[0].started >= 0.5

    h = hosts["hostile"]
    # Garbage in its stream is counted (or kept in the event it follows), its real events still count,
    # the 1 MB line is dropped unkept, and the unframed runner error speaks for nobody (issue 11 #2).
    assert hostile.hostile_injected == 5
    assert h["events"] > 0 and h["hits"].get("exec", 0) > 0, h
    assert h["unparsed_lines"] + h["multiline_events"] >= 2 and h["overlong_lines"] == 1, h
    assert h["status"] == "ok" and "injected-by-simhost" not in h["evidence"] + h["reason"], h
    assert h["cleanup"] == "clean", h

    h = hosts["drop"]
    assert drop.dropped
    assert h["status"] == "failed" and h["stage"] == "probe", h
    assert "connection lost" in h["reason"], h
    assert h["events"] > 0, h                      # what arrived before the drop is kept
    assert h["cleanup"] == "timer", h              # the controller never heard "clean"

    h = hosts["hang"]
    assert h["status"] == "failed" and h["stage"] == "facts", h
    assert "did not finish in 3s" in h["reason"], h
    assert [c.kind for c in hang.commands] == ["runner"]     # asked for facts, never answered

    h = hosts["authfail"]
    assert h["status"] == "unreachable" and "authentication failed as root" in h["reason"], h
    h = hosts["refused"]
    assert h["status"] == "unreachable" and "connection refused" in h["reason"], h

    # The summary names every bad host with its reason.
    for name in ("authfail", "hang", "refused"):
        assert name in text
    # Nobody waited on the hung host: the good host ended within duration + runner teardown,
    # and the whole run within the hung host's setup deadline plus that.
    assert hosts["good"]["ended"] - hosts["good"]["started"] < 2 + 6, hosts["good"]
    assert took < 2 * setup + 2 + 8, took

    # The dropped runner saw EOF and removed its own instance, without any help.
    assert sim.wait_quiet(10) == []
    assert not [p for p in (TRACEFS / "instances").iterdir() if p.name.startswith(group_prefix(run_id, "drop"))]
    assert good.connections == 1 and hostile.connections == 1


def test_no_host_ok_exits_3_within_deadlines(sim: SimFleet, tmp_path: Path, run_id: str) -> None:
    """Only bad hosts: exit 3, each with its reason, finished within the setup deadlines."""
    sim.add("hang", "hang")
    sim.add("authfail", "auth_fail")
    slow = sim.add("tooslow", "slow", delay=6)
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh,
                        extra={"refused": {"ansible_host": "127.0.0.1", "ansible_port": refused_port()}})
    report = tmp_path / "report.json"
    rc, text, took = run_cli(["run", str(write_playbook(tmp_path)), *common_args(inv, run_id, setup=2),
                              "--json", str(report)])
    assert rc == 3, text
    hosts = hosts_by_name(report)
    assert {n: h["status"] for n, h in hosts.items()} == {
        "hang": "failed", "authfail": "unreachable", "tooslow": "failed", "refused": "unreachable"}
    assert "facts script did not finish in 2s" in hosts["tooslow"]["reason"]
    # Its one command (the runner, asked for facts first) never began: nothing was placed.
    assert [(c.kind, c.begun) for c in slow.commands] == [("runner", None)]
    assert all(h["events"] == 0 for h in hosts.values())
    assert took < 2 * 2 + 4, took


def test_event_cap_stops_a_host(sim: SimFleet, tmp_path: Path, run_id: str, busy: None) -> None:
    """A busy tracepoint and a small cap: exactly cap events kept, the rest counted as capped."""
    sim.add("busy")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    pb = write_playbook(tmp_path, PLAYBOOK.replace("duration: 2s", "duration: 3s").replace(
        "sched/sched_process_fork", "sched/sched_switch"))
    report = tmp_path / "report.json"
    rc, text, _ = run_cli(["run", str(pb), *common_args(inv, run_id), "--event-cap", "25",
                           "--json", str(report)])
    assert rc == 0, text
    h = hosts_by_name(report)["busy"]
    assert h["status"] == "ok", h
    assert h["events"] == 25, h
    assert sum(h["hits"].values()) == 25, h
    assert h["loss"]["capped"] > 0, h
    assert h["cleanup"] == "clean", h
    # The report says the cap cut the run short, how many read events were not kept, and what to do.
    cap_alerts = [a for a in h["alerts"] if a.startswith("the event cap (25 events) was reached")]
    assert len(cap_alerts) == 1 and f"{h['loss']['capped']} event(s) already read were not kept" in cap_alerts[0], h
    assert "raise --event-cap" in " ".join(text.split()), text


def test_playbook_error_touches_no_host(sim: SimFleet, tmp_path: Path, run_id: str) -> None:
    """A playbook mistake is found before connecting: exit 1, file:line in the message, no connection."""
    host = sim.add("untouched")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    bad = write_playbook(tmp_path, PLAYBOOK.replace("tracepoint: sched/sched_process_fork",
                                                    "tracepoint: sched sched_process_fork"))
    rc, text, _ = run_cli(["run", str(bad), *common_args(inv, run_id)])
    assert rc == 1, text
    assert f"{bad}:8 (probes.fork.tracepoint)" in text, text
    assert host.connections == 0


def test_host_keys_changed_unknown_and_accept_new(sim: SimFleet, tmp_path: Path, run_id: str) -> None:
    """A changed key always fails; an unknown key fails unless --accept-new-host-keys, which records it."""
    sim.add("known")
    changed = sim.add("changed")
    unknown = sim.add("unknown")
    kh = sim.known_hosts_for(tmp_path / "known_hosts", changed=(changed,), unknown=(unknown,))
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    before = kh.read_text()
    assert f"[127.0.0.1]:{unknown.port} " not in before

    out = tmp_path / "facts.json"
    rc, text, _ = run_cli(["facts", *ssh_args(inv), "--json", str(out)])
    assert rc == 2, text
    res = {r["host"]: r for r in json.loads(out.read_text())}
    assert res["known"]["facts"]["arch"] == os.uname().machine
    for name in ("changed", "unknown"):
        assert res[name]["facts"] is None
        assert "host key not verified" in res[name]["error"], res[name]
    assert kh.read_text() == before                      # nothing recorded without the option

    rc, text, _ = run_cli(["facts", *ssh_args(inv), "--accept-new-host-keys", "--json", str(out)])
    assert rc == 2, text
    res = {r["host"]: r for r in json.loads(out.read_text())}
    assert res["unknown"]["facts"]["arch"] == os.uname().machine
    assert res["changed"]["facts"] is None and "host key not verified" in res["changed"]["error"]
    added = kh.read_text()[len(before):]
    assert added == unknown.known_hosts_line(), added   # exactly the unknown host's real key, appended
    assert kh.read_text().startswith(before)

    # Recorded: the next run trusts it without the option.
    rc, text, _ = run_cli(["facts", *ssh_args(inv), "--limit", "unknown", "--json", str(out)])
    assert rc == 0, text


def test_ctrl_c_stops_probing_prints_summary_and_cleans(sim: SimFleet, tmp_path: Path, run_id: str,
                                                       busy: None) -> None:
    """SIGINT while probing: exit 130, the summary with what was collected, the host left clean."""
    host = sim.add("interrupted")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    pb = write_playbook(tmp_path, PLAYBOOK.replace("duration: 2s", "duration: 60s"))
    report = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "fleetprobe", "run", str(pb), *common_args(inv, run_id),
                             "--json", str(report)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 20
        while not leftovers(run_id) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert leftovers(run_id), "the run never created its instance"
        time.sleep(1.5)                                   # probing: let some events arrive
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 130, text
    assert took < 10, took                                # well before the 60 s duration
    h = hosts_by_name(report)["interrupted"]
    assert h["status"] == "interrupted", h
    assert h["events"] > 0 and h["cleanup"] == "clean", h
    assert "interrupted" in text and "exec" in text, text
    assert leftovers(run_id) == []
    assert host.ran("runner")[0].exit_status == 0         # the runner finished its own teardown


def test_killed_runner_is_noticed_by_its_stopped_markers_and_torn_down(sim: SimFleet, tmp_path: Path, run_id: str,
                                                                      busy: None) -> None:
    """The runner's shell dies mid-run while its trace reader keeps streaming events.

    The controller must notice by the clock markers stopping in the stream's own trace time
    (runner_silent), remove the run over the same connection, and say so; the healthy host
    in the same run is not affected.
    """
    victim_host = sim.add("victim", "kill_runner", delay=4)
    sim.add("healthy")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    inv = sim.inventory(tmp_path / "inventory.yml", kh)
    pb = write_playbook(tmp_path, PLAYBOOK.replace("duration: 2s", "duration: 40s"))
    report = tmp_path / "report.json"
    rc, text, took = run_cli(["run", str(pb), *common_args(inv, run_id), "--json", str(report)])
    hosts = hosts_by_name(report)
    victim, healthy = hosts["victim"], hosts["healthy"]
    assert victim_host.killed, "the personality killed the runner"
    assert (victim["status"], victim["stage"]) == ("failed", "probe"), victim
    assert "the runner stopped responding" in victim["reason"], victim
    assert victim["cleanup"] == "controller", victim  # removed by the controller over the same connection
    assert victim["events"] > 0, "events streamed before (and after) the runner died"
    assert healthy["status"] == "ok" and healthy["cleanup"] == "clean", healthy
    assert rc == 2, text
    assert leftovers(run_id) == []



def test_an_unexpected_exception_on_one_host_is_its_error_for_facts_plan_and_cleanup(
        sim: SimFleet, tmp_path: Path, run_id: str) -> None:
    """A bug that raises something no stage expects (here: in a connector) fails that host only, every command."""
    sim.add("good")
    sim.add("buggy")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    hosts = load_inventory(str(sim.inventory(tmp_path / "inventory.yml", kh))).hosts

    async def connect_or_break(host: Host, options: SSHOptions) -> Session:
        if host.name == "buggy":
            raise RuntimeError("connector bug")
        return await connect(host, options)

    settings = RunSettings(ssh=SSHOptions(ssh_config=(), use_agent=False, connect_timeout=5), setup_timeout=15,
                           connect=connect_or_break, run_id=run_id)
    playbook = parse_playbook(PLAYBOOK, "simfleet.yml")

    def check(error: HostError | str | None) -> None:
        assert error is not None
        text = str(error)
        assert "buggy" in text and "internal error: RuntimeError: connector bug" in text, text

    facts = {hf.host.name: hf for hf in asyncio.run(facts_fleet(hosts, settings))}
    assert facts["good"].facts is not None and facts["good"].error is None, facts["good"].error
    check(facts["buggy"].error)
    assert facts["buggy"].error is not None and facts["buggy"].error.stage == "connect"
    assert "Traceback" in (facts["buggy"].error.evidence or "")

    plans = {hf.host.name: (hf, plan) for hf, plan in asyncio.run(plan_fleet(hosts, playbook, settings))}
    assert plans["good"][1] is not None and not plans["good"][1].failed
    assert plans["buggy"][1] is None
    check(plans["buggy"][0].error)

    cleaned = {r.host: r for r in asyncio.run(cleanup_fleet(hosts, settings))}
    assert cleaned["good"].error == "", cleaned["good"].error
    check(cleaned["buggy"].error)
