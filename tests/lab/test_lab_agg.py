"""aggregate: on the lab fleet: counts, a histogram and a latency, exact, in the kernel where it can.

x86_64 and ppc64le (Debian 6.1) have hist triggers and synthetic events: the tables come
from the kernel and the probes' events are never enabled. mips64el's 5kc-malta kernel has
no hist triggers: the same tables come from the stream. Either way the counts are exact
and nothing (trigger, synthetic event, event, instance) is left in tracefs.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from labssh import ssh
from test_lab_probes import COMMON, REPO, _background, _run, leftovers

if TYPE_CHECKING:
    from conftest import LabForTests  # type: ignore[import-not-found]

pytestmark = pytest.mark.lab


def test_count_histogram_latency_exact_on_every_arch(lab_fleet: LabForTests, tmp_path: Path) -> None:
    lab = lab_fleet
    marker = f"/tmp/fp-agg-{uuid.uuid4().hex[:8]}"   # absent: statfs fails with ENOENT, still counted
    calls, signals = 12, 9
    # Each VM starts its workload once its run's instance exists (setup under TCG takes a while,
    # and not as long on every arch), plus time for the triggers to be placed.
    threads = _background(lab, "n=0; until ls /sys/kernel/tracing/instances | grep -q fp_ || [ $n -ge 90 ]; do "
                               "sleep 1; n=$((n+1)); done; sleep 4; "
                               f"i=0; while [ $i -lt {calls} ]; do stat -f {marker} >/dev/null 2>&1; "
                               f"i=$((i+1)); done; sh -c 'trap : QUIT; sleep 30' & s=$!; sleep 1; i=0; "
                               f"while [ $i -lt {signals} ]; do kill -QUIT $s; i=$((i+1)); done; kill $s")
    report_path = tmp_path / "agg.json"
    rc, out = _run(["run", str(REPO / "tests/data/playbooks/lab/agg-exact.yml"), "-i", str(lab.inventory),
                    "--duration", "16s", "--json", str(report_path), *COMMON])
    for t in threads:
        t.join(150)
    assert rc == 0, out
    report = json.loads(report_path.read_text())
    hosts = {h["host"]: h for h in report["hosts"]}
    aggs = report["aggregate"]["aggregates"]
    for vm in lab.vms:
        h = hosts[vm.name]
        assert h["status"] == "ok" and h["cleanup"] == "clean" and h["kernel_oopses"] == 0, h
        parts = aggs["hosts"][vm.name]
        want = "stream" if vm.uname_m.startswith("mips") else "kernel"
        assert {p["mode"] for p in parts.values()} == {want}, (vm.name, parts)
        if want == "kernel":
            assert h["events"] == 0, "kernel-aggregated probes stream nothing"
        assert h["loss"]["hist_dropped"] == 0
        rid = report["run"]["run_id"]
        assert leftovers(lab, vm, rid) == "", vm.name
        left = ssh(lab, vm, f"cd /sys/kernel/tracing; cat synthetic_events 2>/dev/null | grep fp_{rid}_; "
                            f"grep -v '^#' events/*/*/trigger 2>/dev/null | grep fp_{rid}_; true").stdout.strip()
        assert left == "", (vm.name, left)
    n = len(lab.vms)
    tables = {(t["probe"], t["kind"], t["field"]): {tuple(k): (c, hs) for k, c, hs in t["rows"]}
              for t in aggs["tables"]}
    assert tables[("st", "count", "comm")][("stat",)] == (calls * n, n)
    assert tables[("st", "count", "path")][(marker,)] == (calls * n, n)
    # Each host timed every one of its statfs calls (entry -> return, by comm).
    timed = sum(c for k, (c, _) in tables[("st_ret", "latency", "ns")].items() if k[0] == "stat")
    assert timed == calls * n
    # SIGQUIT is 3 (2^1 < 3 <= 2^2); the filter keeps only it, in the kernel and in the stream.
    assert tables[("sig", "histogram", "sig")] == {(2,): (signals * n, n)}
    assert "in kernel on" in out


def test_cleanup_removes_stale_triggers_and_synthetic_events(lab_fleet: LabForTests) -> None:
    """A dead aggregating run's triggers (in dependency order), synthetic events, events and instance go."""
    lab = lab_fleet
    vm = next(v for v in lab.vms if v.uname_m == "x86_64")
    script = (Path(__file__).parent / "stale_hist_run.sh").read_text()
    placed = ssh(lab, vm, script + "\necho 'fp_zz8stale_abcd_x u64 lat; int pid' >> /sys/kernel/tracing/synthetic_events")
    assert placed.stdout.split()[0] == "5", placed.stdout        # five triggers in place
    inv = lab.inventory
    rc, out = _run(["cleanup", "-i", str(inv), "--limit", vm.name, "--connect-timeout", "60s"])
    assert rc == 0, out
    left = ssh(lab, vm, "cd /sys/kernel/tracing; grep zz kprobe_events synthetic_events; ls instances | grep zz; "
                        "true").stdout.strip()
    assert left == "", left


def test_kernel_tables_do_not_count_the_runners_own_teardown(lab_fleet: LabForTests, tmp_path: Path) -> None:
    """opencount in the kernel of the x86_64 guests: no open by the runner's teardown children.

    A trigger keeps its event live after the run disables it, and its filter names only the
    processes the runner had at the start; the teardown's sed (reading the hist files), grep and
    sleep opened files while the triggers still counted. The runner now pauses them first.
    """
    vms = [vm for vm in lab_fleet.vms if vm.uname_m == "x86_64"][:1]
    if not vms:
        pytest.skip("no x86_64 guest in this lab")
    report_path = tmp_path / "opencount.json"
    rc, out = _run(["run", str(REPO / "playbooks/opencount.yml"), "-i", str(lab_fleet.inventory),
                    "--limit", vms[0].name, "--duration", "6s", "--json", str(report_path), *COMMON])
    assert rc == 0, out
    report = json.loads(report_path.read_text())
    parts = report["aggregate"]["aggregates"]["hosts"][vms[0].name]
    assert {p["mode"] for p in parts.values()} == {"kernel"}, parts
    tables = {(t["probe"], t["kind"], t["field"]): t for t in report["aggregate"]["aggregates"]["tables"]}
    comms = {k[0] for k, _n, _h in tables[("open", "count", "comm")]["rows"]}
    assert not comms & {"sed", "grep", "sleep", "tail", "tr", "cat", "date"}, comms
