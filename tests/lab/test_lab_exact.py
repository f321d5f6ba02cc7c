"""Exact kprobe results on every lab architecture: a quiet function only this test calls.

Runs (alphabetically) before the busy-probe and module lab tests: on the lab's
MIPS guests a kprobe on a hot function intermittently oopses the kernel (see
test_lab_probes), and this is the test that holds MIPS to exact numbers.
test_lab_matrix.py runs the same check on every (arch, kernel line).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from labssh import ssh
from test_lab_probes import COMMON, REPO, _background, _run, leftovers

if TYPE_CHECKING:
    from conftest import LabForTests  # type: ignore[import-not-found]

pytestmark = pytest.mark.lab

#: The first argument's register where the kernel's tracefs README lists no $arg<N>.
FIRST_ARG_REGISTER = {"x86_64": "%di", "ppc64le": "%r3", "mips64": "%r4", "mips": "%r4", "aarch64": "%x0"}

#: Arches whose lab kernel fleetprobe refuses kprobes on, and the reason it must give: Debian's
#: 4kc-malta (mipsel) lacks CONFIG_RCU_NOCB_CPU, so rcu_nocbs=0 cannot stop the MIPS kprobe oops
#: (plan.mips_kprobe_oops; 5kc-malta, mips64el, has it and is probed).
REFUSED_ARCHES = {"mipsel": "kprobes oops this MIPS kernel"}


#: Wait (at most 240 s) until the statfs run's instance has both probes enabled.
WAIT_ENABLED = ("t=0; until [ \"$(cat /sys/kernel/tracing/instances/fp_*/events/*/statfs/enable "
                "/sys/kernel/tracing/instances/fp_*/events/*/statfs_ret/enable 2>/dev/null)\" = \"$(printf '1\\n1')\" ]; "
                "do sleep 0.2; t=$((t+1)); [ $t -gt 1200 ] && break; done;")


def expected_first_arg(lab: LabForTests, vm: Any) -> str:
    """What fleetprobe must write for arg1 on this guest: $arg1 if its README lists $arg<N> as a fetcharg, else the register."""
    # The fetcharg list's "$comm, $arg<N>,": 6.12 prints "$arg<N>" in its return-probe line on every arch.
    r = ssh(lab, vm, "grep -c 'comm, [$]arg<N>' /sys/kernel/tracing/README; true")
    assert r.returncode == 0, (vm.name, r.stderr)
    return "$arg1" if int(r.stdout.strip() or 0) > 0 else FIRST_ARG_REGISTER[vm.uname_m]


def check_exact_statfs(lab: LabForTests, tmp_path: Path, calls: int = 10, duration: str = "20s") -> dict[str, Any]:
    """One run of the statfs playbook on every VM of ``lab``: exact counts, strings, retvals, teardown.

    The calls must all fall inside the run's ``duration``: 10 rounds of two busybox execs take
    ~6 s on an idle TCG guest, ~20 s on the MIPS guests when the machine is loaded.  Returns the report.
    """
    marker = f"/tmp/fp-statfs-{uuid.uuid4().hex[:8]}"  # absent: statfs fails with -ENOENT
    first_arg = {vm.name: expected_first_arg(lab, vm) for vm in lab.vms}
    # The calls start once both probes are enabled in the run's instance (never a fixed sleep: on a
    # loaded 2-core machine a run's setup took 10-30 s, and calls made before it are not counted).
    threads = _background(lab, f"{WAIT_ENABLED} i=0; while [ $i -lt {calls} ]; do stat -f {marker} >/dev/null 2>&1; "
                               "stat -f /proc >/dev/null; i=$((i+1)); sleep 0.3; done")
    report_path = tmp_path / "statfs.json"
    rc, out = _run(["run", str(REPO / "tests/data/playbooks/lab/statfs.yml"), "-i", str(lab.inventory),
                    "--limit", ",".join(vm.name for vm in lab.vms),
                    "--duration", duration, "--json", str(report_path), *COMMON])
    for t in threads:
        t.join(150)
    assert rc == 0, out
    report = json.loads(report_path.read_text())
    hosts = {h["host"]: h for h in report["hosts"]}
    assert set(hosts) == {vm.name for vm in lab.vms}
    # Every host is checked and every failure named (a matrix run says which cells failed).
    failures: dict[str, str] = {}
    probing = []
    for vm in lab.vms:
        h = hosts[vm.name]
        if vm.arch in REFUSED_ARCHES and h["status"] == "skipped":
            # The planner's refusal is the result here, and it must say why (never a silent zero).
            assert REFUSED_ARCHES[vm.arch] in h["reason"], (vm.name, h["reason"])
            assert not h["placed_probes"] and h["hits"] == {}, (vm.name, h["placed_probes"], h["hits"])
            assert leftovers(lab, vm, report["run"]["run_id"]) == "", f"{vm.name}: leftovers of this run"
            continue
        probing.append(vm)
        try:
            assert h["status"] == "ok", (h["status"], h["stage"], h["reason"], h["evidence"])
            assert h["arch"] == vm.uname_m and h["kernel_release"] == vm.kernel_release
            assert f"path=+0({first_arg[vm.name]}):ustring" in h["placed_probes"]["statfs"], h["placed_probes"]
            assert h["hits"] == {"statfs": 2 * calls, "statfs_ret": 2 * calls}, ("hits", h["hits"], h["loss"])
            assert h["cleanup"] == "clean" and h["kernel_oopses"] == 0, (h["cleanup"], h["alerts"])
            assert {"overrun", "dropped", "lost_lines", "probe_misses", "capped"} <= set(h["loss"])
            lat = report["aggregate"]["hosts"][vm.name]["latency"]["statfs_ret"]
            assert sum(lat["buckets"].values() if isinstance(lat["buckets"], dict) else lat["buckets"]) == 2 * calls
            assert leftovers(lab, vm, report["run"]["run_id"]) == "", "leftovers of this run"
            assert set(h["loss"]["probe_misses"]) == {"statfs", "statfs_ret"}, (
                "kprobe_profile misses missing from the report", h["loss"], "unparsed", h["unparsed_lines"])
        except (AssertionError, KeyError) as exc:
            failures[vm.name] = f"{type(exc).__name__}: {exc}"
    assert not failures, "\n".join(f"{n}: {why}" for n, why in failures.items())
    values = {(v["probe"], v["field"]): {val: (n, k) for val, n, k in v["values"]} for v in report["aggregate"]["values"]}
    n = len(probing)
    assert n, "no guest probed"
    assert values[("statfs", "path")][marker] == (calls * n, n)
    assert values[("statfs", "path")]["/proc"] == (calls * n, n)
    assert values[("statfs_ret", "ret")][-2] == (calls * n, n), "kretprobe values"
    assert values[("statfs_ret", "ret")][0] == (calls * n, n)
    return report


def test_exact_hits_and_decoded_arguments_on_every_arch(lab_fleet: LabForTests, tmp_path: Path) -> None:
    """argN lowered per arch (x86/arm64 $argN, ppc %r3, mips %r4), strings decoded, retvals, exact counts."""
    check_exact_statfs(lab_fleet, tmp_path)
