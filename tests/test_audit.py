"""Audits: rules and diffs on reports built from real trace lines, and real audits over sshd hosts.

The end-to-end tests run the shipped systemd unit's ExecStart line (expanded
the way systemd expands it) against real OpenSSH sshd hosts on 127.0.0.1,
probing this machine's real sched tracepoints; the 'change' is a marker
program executed during the second audit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprobe.render.safe import SafeConsole

from fleetprobe.audit import AuditResult, Thresholds, audit, check_rules, diff_reports
from fleetprobe.cli.main import main
from fleetprobe.playbook import parse_playbook
from fleetprobe.store import Store
from reports import build_report, expand_exec_start, extra_exec, host_text, leftovers_of, real_lines, tracefs_ready

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "contrib" / "systemd" / "fleetprobe-audit.service"
TIMER = REPO / "contrib" / "systemd" / "fleetprobe-audit.timer"

PLAYBOOK = """\
name: execaudit
description: nothing may exec the forbidden marker; forks stay under a cap
duration: 2s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
    max_per_host: 15
  - name: fork
    tracepoint: sched/sched_process_fork
"""


def _texts(extra_on: str | None = None, n_extra: int = 0) -> dict[str, str]:
    """Two hosts replaying the real lines; ``extra_on`` also runs insmod ``n_extra`` times."""
    lines = real_lines()
    out = {"web-1": host_text(lines, 0, 1795655000.0), "web-2": host_text(lines, 2, 1795655002.0)}
    if extra_on:
        out[extra_on] += "".join(extra_exec("insmod", "/usr/sbin/insmod", 130.0 + i, pid=5000 + i)
                                 for i in range(n_extra))
    return out


def test_playbook_audit_keys() -> None:
    pb = parse_playbook(PLAYBOOK + "baseline: k3x9q0\n", "audit.yml")
    assert pb.probe("exec").max_per_host == 15 and pb.probe("fork").max_per_host is None
    assert pb.baseline == "k3x9q0"
    assert parse_playbook(PLAYBOOK, "audit.yml").baseline is None


def test_max_per_host_names_only_the_host_over_it() -> None:
    pb = parse_playbook(PLAYBOOK, "audit.yml")
    base_exec = build_report(_texts()).aggregate.hits("exec")["web-1"]
    assert base_exec <= 15  # the real lines alone stay under the cap
    report = build_report(_texts("web-2", 16 - base_exec))
    [f] = check_rules(report, pb)
    assert (f.kind, f.severity, f.host, f.probe) == ("max-per-host", "fail", "web-2", "exec")
    assert "fired 16 times (at most 15 allowed per host)" in f.message and "comm=" in f.message


def test_expect_none_fails_with_evidence_from_the_host() -> None:
    pb = parse_playbook(PLAYBOOK.replace("  - name: fork\n", "  - name: fork\n    expect: none\n"), "a.yml")
    report = build_report(_texts())
    findings = check_rules(report, pb)
    assert {(f.kind, f.host) for f in findings} == {("expect-none", "web-1"), ("expect-none", "web-2")}
    # Evidence comes from the host's own sampled events (real comm and fields).
    assert all("(expected none): comm=capture.sh" in f.message for f in findings)


def test_rule_unchecked_when_its_probe_was_skipped() -> None:
    pb = parse_playbook(PLAYBOOK, "audit.yml")
    report = build_report(_texts())
    report.aggregate.outcomes["web-1"].skipped_probes["exec"] = "tracepoint sched/sched_process_exec not found"
    [f] = check_rules(report, pb)
    assert (f.kind, f.host) == ("rule-unchecked", "web-1") and "not found" in f.message


def test_diff_names_what_changed() -> None:
    base = build_report(_texts(), run_id="base01", statuses={"db-1": "ok"})
    new = build_report(_texts("web-2", 40), run_id="new001", statuses={"db-1": "unreachable", "db-2": "ok"})
    findings = diff_reports(base, new, Thresholds(factor=2.0, min_count=10))
    kinds = {(f.kind, f.host, f.probe) for f in findings}
    assert ("newly-failing", "db-1", None) in kinds
    assert ("new-host", "db-2", None) in kinds
    assert ("count-moved", "web-2", "exec") in kinds and ("count-moved", "web-1", "exec") not in kinds
    [insmod] = [f for f in findings if f.kind == "new-value" and "'insmod'" in f.message and "comm" in f.message]
    assert insmod.host == "web-2" and "40 times on web-2" in insmod.message
    assert not any(f.kind == "new-value" and "pid" in f.message.split("new ")[1][:4] for f in findings), \
        "numeric fields (pids) change every run and are not reported unless asked for"
    # Asking for a numeric field reports it.
    named = diff_reports(base, new, Thresholds(value_fields=("pid",)))
    assert any(f.kind == "new-value" and "new pid 5000" in f.message for f in named)
    # The same run against itself: nothing changed.
    assert diff_reports(base, base) == []


def test_audit_verdict_and_strict_mode() -> None:
    pb = parse_playbook(PLAYBOOK, "audit.yml")
    base = build_report(_texts(), run_id="base01")
    same = build_report(_texts(), run_id="run002")
    assert audit(same, pb, base).passed
    changed = build_report(_texts("web-1", 3), run_id="run003")
    result = audit(changed, pb, base)
    assert result.passed and any(f.kind == "new-value" for f in result.findings)  # notes only
    strict = audit(changed, pb, base, strict=True)
    assert not strict.passed and strict.failed_hosts() == ["web-1"]
    again = AuditResult.from_json(strict.to_json())
    assert again.to_json() == strict.to_json() and not again.passed
    # A host that could not be audited fails the audit, with or without a baseline.
    down = build_report(_texts(), run_id="run004", statuses={"db-1": "unreachable"})
    for b in (None, base):
        r = audit(down, pb, b)
        assert not r.passed and r.failed_hosts() == ["db-1"]
        assert "nothing was checked there" in r.failures[0].message


# --- real audits over sshd ------------------------------------------------------------------------

#: Where docs/audit.md installs fleetprobe (a venv: Debian 12 refuses a system-wide pip install).
INSTALLED = "/opt/fleetprobe/bin/fleetprobe"


def test_unit_files_verify(tmp_path: Path) -> None:
    """systemd's own checker accepts the shipped service and timer (it rejects unknown keys and bad paths)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit runs the venv install of docs/audit.md by its path; here that path is this venv's
    # fleetprobe (tests/test_systemd_unit.py installs it as documented and verifies the same way).
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} audit " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED, str(Path(sys.executable).parent / "fleetprobe")))
    r = subprocess.run([analyze, "verify", str(copy), str(TIMER)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OnCalendar=hourly" in TIMER.read_text()


@pytest.fixture
def sshd_fleet(tmp_path: Path) -> Iterator[object]:
    """Two real sshd hosts on 127.0.0.1 (they share this machine's kernel)."""
    from sshhosts import free_port, new_fleet

    if not tracefs_ready():
        pytest.skip("needs root and tracefs")

    fleet = new_fleet(tmp_path / "fleet")
    try:
        fleet.start_sshd("alpha", "127.0.0.1", free_port())
        fleet.start_sshd("beta", "127.0.0.1", free_port())
        yield fleet
    finally:
        fleet.stop()


def _audit_by_unit(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One timer-triggered audit: the unit's ExecStart run as systemd would (fresh process, its env)."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    argv = expand_exec_start(UNIT, env, state)
    assert argv[:2] == [INSTALLED, "audit"]
    argv[0] = str(Path(sys.executable).parent / "fleetprobe")   # this venv's (see test_unit_files_verify)
    run_env = dict(os.environ, XDG_DATA_HOME=str(state),
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", COLUMNS="200")
    (state / "fleetprobe").mkdir(exist_ok=True)  # StateDirectory=
    return subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=180)


@pytest.mark.sshd
@pytest.mark.tracefs
def test_timer_audit_fails_after_a_change_and_names_the_host(tmp_path: Path, sshd_fleet: object, busy: None) -> None:
    from sshhosts import Fleet

    assert isinstance(sshd_fleet, Fleet)
    marker_dir = tmp_path / "bin"
    marker_dir.mkdir()
    marker = marker_dir / "fp-forbidden"
    marker.write_text("#!/bin/sh\nexit 0\n")
    marker.chmod(0o755)
    playbook = tmp_path / "execaudit.yml"
    playbook.write_text("""\
name: execaudit
description: nothing may run the forbidden marker
duration: 2s
probes:
  - name: forbidden
    tracepoint: sched/sched_process_exec
    filter: filename ~ "*fp-forbidden*"
    expect: none
  - name: fork
    tracepoint: sched/sched_process_fork
    max_per_host: 1000000
""")
    env = {"FLEETPROBE_PLAYBOOK": str(playbook), "FLEETPROBE_INVENTORY": str(sshd_fleet.inventory()),
           "FLEETPROBE_ARGS": "--no-agent --ssh-config none"}
    state = tmp_path / "state" / "fleetprobe"

    first = _audit_by_unit(tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "audit PASSED" in first.stdout and "no baseline run" in first.stdout

    stop = threading.Event()

    def trigger() -> None:
        while not stop.is_set():
            subprocess.run([str(marker)])
            time.sleep(0.1)

    t = threading.Thread(target=trigger)
    t.start()
    try:
        second = _audit_by_unit(tmp_path, env)
    finally:
        stop.set()
        t.join()
    assert second.returncode == 4, second.stdout + second.stderr
    assert re.search(r"audit FAILED against baseline run \w+: alpha, beta", second.stdout), second.stdout
    assert "alpha: probe 'forbidden' fired" in second.stdout and str(marker) in second.stdout

    # One host stops answering: the third audit fails naming only that host.
    os.killpg(sshd_fleet.hosts[1].proc.pid, 15)
    sshd_fleet.hosts[1].proc.wait(5)
    third = _audit_by_unit(tmp_path, env)
    assert third.returncode == 4, third.stdout + third.stderr
    assert re.search(r"audit FAILED against baseline run \w+: beta\n", third.stdout), third.stdout
    assert "newly-failing: beta: newly unreachable" in third.stdout

    # Everything is in the history, with verdicts, raw events and the reports the unit writes.
    with Store(state / "history.sqlite3") as store:
        rows = store.runs()
        assert [r.audit for r in rows] == ["fail", "fail", "pass"]
        assert all(r.state == "complete" and r.has_events for r in rows)
        second_id = rows[1].run_id
        stored = store.audit_result(second_id)
        assert stored is not None and not stored["passed"]
        forbidden = [e for e in store.events(second_id) if e["probe"] == "forbidden"]
        assert forbidden and all(e["fields"]["filename"] == str(marker) for e in forbidden), [e for e in forbidden if e["fields"]["filename"] != str(marker)][:3]
        assert store.playbook_text(second_id) == playbook.read_text()
        assert set(store.host_facts(rows[2].run_id)) == {"alpha", "beta"}
        assert store.integrity() == "ok"
        assert leftovers_of([r.run_id for r in rows]) == []
    html = (state / "last-audit.html").read_text()
    assert "Audit FAILED" in html and "beta" in html
    assert "newly-failing" in (state / "last-audit.md").read_text()

    # history / show / diff over the same store, in-process.
    console = SafeConsole(record=True, width=200)
    store_args = ["--store", str(state / "history.sqlite3")]
    assert main(["history", *store_args], console) == 0
    listing = console.export_text()
    assert listing.count("execaudit") == 3 and "FAIL" in listing and "pass" in listing
    console = SafeConsole(record=True, width=200)
    assert main(["show", second_id, *store_args, "--markdown", str(tmp_path / "show.md")], console) == 0
    assert "audit FAILED" in console.export_text()
    assert "fp-forbidden" in (tmp_path / "show.md").read_text()
    console = SafeConsole(record=True, width=200)
    assert main(["diff", "last~2", second_id, *store_args], console) == 4
    assert "new-host-hitting: alpha: probe 'forbidden'" in console.export_text()
    console = SafeConsole(record=True, width=200)
    assert main(["diff", second_id, second_id, *store_args], console) == 0
    assert console.export_text().endswith(f"changes from run {second_id} to run {second_id}: none\n")


@pytest.mark.sshd
@pytest.mark.tracefs
def test_run_stores_shards_and_writes_reports(tmp_path: Path, sshd_fleet: object) -> None:
    """`run --shard` probes only its hosts and stores the run; `--no-store` stores nothing."""
    from sshhosts import Fleet

    assert isinstance(sshd_fleet, Fleet)
    inv = str(sshd_fleet.inventory())
    playbook = tmp_path / "forks.yml"
    playbook.write_text("name: forks\ndescription: forks\nduration: 1s\nprobes:\n"
                        "  - name: fork\n    tracepoint: sched/sched_process_fork\n")
    store = str(tmp_path / "h.sqlite3")
    from fleetprobe.shard import shard_of

    owner = {h.name: shard_of(h.name, 2) for h in sshd_fleet.hosts}
    console = SafeConsole(record=True, width=200)
    rc = main(["run", str(playbook), "-i", inv, "--no-live", "--shard", f"{owner['alpha']}/2", "--store", store,
               "--json", str(tmp_path / "a.json"), "--no-agent", "--ssh-config", "none"], console)
    assert rc == 0, console.export_text()
    with Store(store) as s:
        [row] = s.runs()
        report = s.load_report(row.run_id)
        assert {o.host for o in report.hosts} == {h for h, i in owner.items() if i == owner["alpha"]}
        assert leftovers_of([row.run_id]) == []
    rc = main(["run", str(playbook), "-i", inv, "--no-live", "--no-store", "--store", store,
               "--no-agent", "--ssh-config", "none"], SafeConsole(record=True, width=200))
    assert rc == 0
    with Store(store) as s:
        assert len(s.runs()) == 1
