"""Every shipped tracefs playbook, run for real on the lab's arm64 guest(s).

arm64 is planned from stored facts in the unit tests; here each playbook is
placed, run and torn down on a real Debian arm64 kernel: every probe is either
placed or skipped with the planner's reason (the guests have busybox, no bash:
bashreadline's uprobe has nothing to attach to), nothing is left behind and
the kernel never oopses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fleetprobe.playbook import load_playbook
from test_lab_probes import COMMON, REPO, _run, leftovers

if TYPE_CHECKING:
    from conftest import LabForTests  # type: ignore[import-not-found]

pytestmark = [pytest.mark.lab, pytest.mark.lab_matrix]  # the full matrix run only: boots kernels beyond the default fleet, ~4-7 min

TRACEFS_PLAYBOOKS = sorted(p for p in (REPO / "playbooks").glob("*.yml")
                           if not any(pr.kind == "module" for pr in load_playbook(p).probes))


@pytest.mark.parametrize("playbook", TRACEFS_PLAYBOOKS, ids=lambda p: p.stem)
def test_shipped_tracefs_playbook_on_arm64(lab_fleet: LabForTests, playbook: Path, tmp_path: Path) -> None:
    vms = [vm for vm in lab_fleet.vms if vm.arch == "arm64"]
    if not vms:
        pytest.skip("no arm64 guest in this lab fleet (FLEETPROBE_LAB_FLEET)")
    pb = load_playbook(playbook)
    report_path = tmp_path / "report.json"
    rc, out = _run(["run", str(playbook), "-i", str(lab_fleet.inventory), "--limit", ",".join(v.name for v in vms),
                    "--duration", "3s", "--json", str(report_path), *COMMON])
    report = json.loads(report_path.read_text())
    for h in report["hosts"]:
        placed, skipped = set(h["placed_probes"]), dict(h["skipped_probes"])
        assert placed | set(skipped) == {p.name for p in pb.probes}, (h["host"], placed, skipped)
        assert all(reason.strip() for reason in skipped.values()), skipped
        assert h["kernel_oopses"] == 0 and h["arch"] == "aarch64", h
        if placed:
            assert h["status"] == "ok" and h["cleanup"] == "clean", (h["host"], h["reason"], h["evidence"])
        else:
            assert h["status"] != "ok" and h["reason"], h
    if any(h["placed_probes"] for h in report["hosts"]):
        assert rc == 0, out
    for vm in vms:
        assert leftovers(lab_fleet, vm) == "", vm.name
