"""Kernel features that differ by line, chosen by what each guest's tracefs README says.

Two real guests on both sides of the changes: bullseye's 5.10 and trixie's 6.12
(x86_64).  Measured on them (tests/data/readme/): 5.10's README lists no symstr,
no fprobe (f:) events, no BTF argument names and no hist triggers; 6.12's lists
them all; both list %return.  The test reads each README itself and holds
fleetprobe's facts and plan to it, so it says the same whatever Debian uploads
next on either line.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetprobe import lab
from labfleet import LabForTests, lab_test_dir
from labssh import ssh
from test_lab_probes import COMMON, REPO, _run, leftovers

pytestmark = [pytest.mark.lab, pytest.mark.lab_matrix]  # the full matrix run only: boots kernels beyond the default fleet, ~4-7 min

#: The README text that proves each feature (what fleetprobe.facts looks for, written out again
#: here from the kernel's trace.c so a wrong marker in facts.py fails this test).
MARKERS = {
    "symstr": "symstr",
    "fprobe": "f[:[<group>/][<event>]] <func-name>[%return]",
    "btf_args": "<argname>[->field[->field|.field...]]",
    "return_suffix": "<symbol>[+<offset>]%return",
}

WAIT_ENABLED = ("t=0; until [ \"$(cat /sys/kernel/tracing/instances/fp_*/events/*/caller/enable 2>/dev/null)\" = 1 ]; "
                "do sleep 0.2; t=$((t+1)); [ $t -gt 1200 ] && break; done;")


@pytest.fixture(scope="module")
def two_lines() -> Iterator[LabForTests]:
    """One x86_64 guest of 5.10 and one of 6.12 (reused if already running); stops only what it booted."""
    with tempfile.TemporaryDirectory(prefix="fleetprobe-lab-") as tmp:
        lab_dir = lab_test_dir(Path(tmp))
        t0 = time.monotonic()
        fleet = lab.up(["x86_64"], {"x86_64": 1}, lab_dir=lab_dir, kernels={"x86_64": ("5.10", "6.12")},
                       timeout_s=float(os.environ.get("FLEETPROBE_LAB_TIMEOUT", "300")))
        try:
            names = set(fleet.started) | set(fleet.reused)
            yield LabForTests(lab_dir=fleet.lab_dir, inventory=fleet.inventory, key=fleet.key,
                              known_hosts=fleet.known_hosts, vms=[v for v in fleet.vms if v.name in names],
                              up_seconds=time.monotonic() - t0)
        finally:
            lab.down(fleet.lab_dir, names=fleet.started)


def _by_line(lab_: LabForTests) -> dict[str, Any]:
    return {vm.line: vm for vm in lab_.vms}


def _readme(lab_: LabForTests, vm: Any) -> str:
    r = ssh(lab_, vm, "cat /sys/kernel/tracing/README")
    assert r.returncode == 0 and "kprobe_events" in r.stdout, (vm.name, r.stderr)
    return r.stdout


def test_facts_follow_each_guests_readme(two_lines: LabForTests, tmp_path: Path) -> None:
    """`fleetprobe facts` reports a feature exactly when the guest's README lists it, on both lines."""
    vms = _by_line(two_lines)
    assert set(vms) == {"5.10", "6.12"}
    out = tmp_path / "facts.json"
    rc, text = _run(["facts", "-i", str(two_lines.inventory), "--limit", ",".join(v.name for v in vms.values()),
                     "--json", str(out), "--connect-timeout", "60s", "--setup-timeout", "120s"])
    assert rc == 0, text
    facts = {r["host"]: r["facts"] for r in json.loads(out.read_text())}
    seen: dict[str, dict[str, bool]] = {}
    for line, vm in vms.items():
        readme = _readme(two_lines, vm)
        features = set(facts[vm.name]["features"])
        seen[line] = {}
        for feature, marker in MARKERS.items():
            assert (feature in features) == (marker in readme), (vm.name, feature, sorted(features))
            seen[line][feature] = feature in features
    # Both sides of each change are really in the lab (else this test proves nothing).
    for feature in ("symstr", "fprobe", "btf_args"):
        assert (seen["5.10"][feature], seen["6.12"][feature]) == (False, True), (feature, seen)
    assert seen["5.10"]["return_suffix"] and seen["6.12"]["return_suffix"]


def test_symstr_is_used_where_the_readme_lists_it(two_lines: LabForTests, tmp_path: Path) -> None:
    """$stack0:symstr at user_statfs: `symstr` on 6.12, `symbol` with the planner's note on 5.10; both decode."""
    vms = _by_line(two_lines)
    names = ",".join(v.name for v in vms.values())
    calls = 5
    threads = [threading.Thread(
        target=ssh, args=(two_lines, vm, WAIT_ENABLED + f" for i in $(seq {calls}); do stat -f /proc >/dev/null; "
                                                         "sleep 0.2; done", 300),
        daemon=True) for vm in vms.values()]
    for t in threads:
        t.start()
    report_path, events_path = tmp_path / "caller.json", tmp_path / "caller.jsonl"
    rc, out = _run(["run", str(REPO / "tests/data/playbooks/lab/statfs-caller-symstr.yml"),
                    "-i", str(two_lines.inventory), "--limit", names, "--duration", "30s",
                    "--json", str(report_path), "--events", str(events_path), *COMMON])
    for t in threads:
        t.join(300)
    assert rc == 0, out
    report = json.loads(report_path.read_text())
    hosts = {h["host"]: h for h in report["hosts"]}
    old, new = hosts[vms["5.10"].name], hosts[vms["6.12"].name]
    for h in (old, new):
        assert h["status"] == "ok" and h["cleanup"] == "clean" and h["hits"] == {"caller": calls}, h
    assert new["placed_probes"]["caller"].endswith("caller=$stack0:symstr"), new["placed_probes"]
    assert old["placed_probes"]["caller"].endswith("caller=$stack0:symbol"), old["placed_probes"]
    # `fleetprobe plan` says why 5.10 got symbol (a run prints no plan notes).
    plan_path = tmp_path / "plan.json"
    rc, text = _run(["plan", str(REPO / "tests/data/playbooks/lab/statfs-caller-symstr.yml"),
                     "-i", str(two_lines.inventory), "--limit", names, "--json", str(plan_path),
                     "--connect-timeout", "60s", "--setup-timeout", "120s"])
    assert rc == 0, text
    notes = {x["host"]: x["notes"] for x in json.loads(plan_path.read_text())}
    assert notes[vms["6.12"].name] == [], notes
    assert notes[vms["5.10"].name] == [f"caller: symstr unsupported on {vms['5.10'].kernel_release} "
                                       "(not in its tracefs README): using symbol"], notes
    # Both kernels decode the return address to the statfs syscall (symbol+off/size).
    callers: dict[str, set[str]] = {}
    for line in events_path.read_text().splitlines():
        e = json.loads(line)
        callers.setdefault(e["host"], set()).add(str(e["fields"]["caller"]))
    for h in (old, new):
        assert callers[h["host"]] and all(re.fullmatch(r"__(do|x64)_sys_statfs\+0x[0-9a-f]+/0x[0-9a-f]+", c)
                                          for c in callers[h["host"]]), (h["host"], callers[h["host"]])
    for vm in vms.values():
        assert leftovers(two_lines, vm) == "", vm.name
