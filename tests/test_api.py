"""The Python API as the package docstring shows it, against a real sshd on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

import fleetprobe
from fleetprobe import RunSettings, SSHOptions, load_inventory, load_playbook, run_playbook
from sshhosts import free_port, new_fleet

pytestmark = pytest.mark.sshd


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists(), reason="needs root and sshd")
def test_run_playbook_from_python(tmp_path: Path, clean_tracefs: None) -> None:
    fl = new_fleet(tmp_path / "api")
    try:
        fl.start_sshd("api-host", "127.0.0.1", free_port())
        pb = tmp_path / "execs.yml"
        pb.write_text("name: execs\ndescription: exec tracepoint\nduration: 2s\nprobes:\n"
                      "  - name: exec\n    tracepoint: sched/sched_process_exec\n")
        inv = load_inventory(str(fl.inventory())).limit("api-host")
        settings = RunSettings(ssh=SSHOptions(ssh_config=(), use_agent=False))
        # Execs for the host to see: fleetprobe's own are never events (issue 9), so a quiet
        # machine would rightly report none.
        trigger = subprocess.Popen(["sh", "-c", "while :; do /bin/true; sleep 0.1; done"], start_new_session=True)
        try:
            report = asyncio.run(run_playbook(inv.hosts, load_playbook(pb), settings))
        finally:
            trigger.kill()
            trigger.wait()
        assert isinstance(report, fleetprobe.FleetReport)
        (host,) = report.hosts
        assert host.host == "api-host" and host.status == "ok" and host.cleanup == "clean"
        assert host.events > 0 and host.hits["exec"] == host.events
        assert report.run.playbook == "execs" and report.run.version == fleetprobe.__version__
        assert set(fleetprobe.__all__) <= set(dir(fleetprobe))
    finally:
        fl.stop()
