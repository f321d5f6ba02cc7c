"""The lab fleet for end-to-end tests: real Debian kernels under qemu, reached over real SSH.

The lab directory is $FLEETPROBE_LAB_DIR if set (point it at a persistent
directory to reuse downloaded packages and images between runs), else a
fresh directory for the session.  VMs already running in that directory are
reused; the fixture stops only the VMs it booted.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprobe import lab
from labfleet import LabForTests, fleet_from_env, lab_test_dir


@pytest.fixture(scope="session")
def lab_fleet() -> Iterator[LabForTests]:
    """Bring up the default lab fleet (3 x x86_64, ppc64le, mips64el, arm64, on 6.1) for the session.

    ``FLEETPROBE_LAB_FLEET`` (e.g. ``x86_64:6.1=2,arm64:6.1``) boots another fleet instead, to run
    the lab tests on a few VMs at a time.
    """
    with tempfile.TemporaryDirectory(prefix="fleetprobe-lab-") as tmp:
        lab_dir = lab_test_dir(Path(tmp))
        t0 = time.monotonic()
        env = os.environ.get("FLEETPROBE_LAB_FLEET")
        arches, counts, lines = fleet_from_env(env) if env else (None, None, None)
        fleet = lab.up(arches, counts, lab_dir=lab_dir, kernels=lines,
                       timeout_s=float(os.environ.get("FLEETPROBE_LAB_TIMEOUT", "300")))
        try:
            # Only the fleet asked for: other VMs may be running in a shared lab directory.
            names = set(fleet.started) | set(fleet.reused)
            yield LabForTests(lab_dir=fleet.lab_dir, inventory=fleet.inventory, key=fleet.key,
                              known_hosts=fleet.known_hosts, vms=[v for v in fleet.vms if v.name in names],
                              up_seconds=time.monotonic() - t0)
        finally:
            lab.down(fleet.lab_dir, names=fleet.started)
