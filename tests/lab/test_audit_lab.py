"""The scheduled audit on real kernels: the systemd unit's command, run twice over the lab fleet.

The first audit is quiet and passes.  During the second, one VM loads a
kernel module and runs a forbidden program; the audit must fail (exit 4)
and name that VM, and only it: each VM is its own kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fleetprobe.store import Store

if TYPE_CHECKING:
    from conftest import LabForTests  # type: ignore[import-not-found]

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "fleetprobe-audit.service"

PLAYBOOK = """\
name: labaudit
description: no module loads, and nobody runs fp-forbidden
duration: 12s
probes:
  - name: load
    tracepoint: module/module_load
    expect: none
  - name: forbidden
    tracepoint: sched/sched_process_exec
    filter: filename ~ "*fp-forbidden*"
    expect: none
"""

# Load one module that is not loaded yet (the initramfs ships the NIC drivers'
# modules), then run a copy of busybox named fp-forbidden a few times.
CHANGE = r"""
sleep 4
for f in $(find /lib/modules -name '*.ko*' 2>/dev/null); do
  n=$(basename "$f"); n=${n%%.ko*}; n=$(echo "$n" | tr - _)
  grep -q "^$n " /proc/modules || { insmod "$f" 2>/dev/null && echo "loaded $n" && break; }
done
cp "$(command -v busybox)" /tmp/fp-forbidden
i=0; while [ $i -lt 10 ]; do /tmp/fp-forbidden true; i=$((i+1)); sleep 0.3; done
rm -f /tmp/fp-forbidden
"""


def _ssh(lab: Any, vm: Any, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A command on one VM, host key strictly checked."""
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(lab.key), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-p", str(vm.port), "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=timeout)


def _audit(tmp_path: Path, playbook: Path, inventory: Path) -> subprocess.CompletedProcess[str]:
    """The unit's ExecStart, expanded as systemd does, with its environment file's values."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_audit import expand_exec_start

    state = tmp_path / "state"
    (state / "fleetprobe").mkdir(parents=True, exist_ok=True)
    env = {"FLEETPROBE_PLAYBOOK": str(playbook), "FLEETPROBE_INVENTORY": str(inventory),
           "FLEETPROBE_ARGS": "--connect-timeout 60s --setup-timeout 120s --no-agent --ssh-config none"}
    argv = expand_exec_start(UNIT, env, state)
    run_env = dict(os.environ, XDG_DATA_HOME=str(state), COLUMNS="200",
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    return subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=600)


def test_timer_audit_fails_naming_the_host_that_loaded_a_module(lab_fleet: LabForTests, tmp_path: Path) -> None:
    lab = lab_fleet
    playbook = tmp_path / "labaudit.yml"
    playbook.write_text(PLAYBOOK)
    first = _audit(tmp_path, playbook, lab.inventory)
    assert first.returncode == 0, first.stdout + first.stderr

    target = next(vm for vm in lab.vms if vm.arch == "x86_64")
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    t = threading.Thread(target=lambda: result.setdefault("change", _ssh(lab, target, CHANGE)))
    t.start()
    try:
        second = _audit(tmp_path, playbook, lab.inventory)
    finally:
        t.join(180)
    change = result["change"]
    assert change.returncode == 0, change.stderr
    assert second.returncode == 4, second.stdout + second.stderr
    m = re.search(r"audit FAILED against baseline run \w+: (.*)\n", second.stdout)
    assert m and m.group(1) == target.name, second.stdout
    assert f"{target.name}: probe 'forbidden' fired" in second.stdout
    if "loaded " in change.stdout:
        module = change.stdout.split("loaded ", 1)[1].split()[0]
        assert f"{target.name}: probe 'load' fired" in second.stdout and module in second.stdout
        _ssh(lab, target, f"rmmod {module} || true")
    with Store(tmp_path / "state" / "fleetprobe" / "history.sqlite3") as store:
        assert [r.audit for r in store.runs()] == ["fail", "pass"]
    assert target.name in (tmp_path / "state" / "fleetprobe" / "last-audit.html").read_text()
    for vm in lab.vms:
        r = _ssh(lab, vm, "cd /sys/kernel/tracing && { grep fp_ kprobe_events; ls instances | grep fp_; }; true")
        assert r.stdout.strip() == "", (vm.name, r.stdout)
