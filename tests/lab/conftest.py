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
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetprobe import lab


@dataclass(frozen=True)
class LabForTests:
    """What a lab test needs: where the lab is, its inventory and one record per VM."""

    lab_dir: Path
    inventory: Path
    key: Path
    known_hosts: Path
    vms: list[lab.LabVM]
    up_seconds: float


def lab_test_dir(tmp_root: Path) -> Path:
    """$FLEETPROBE_LAB_DIR, or a lab dir under this session's temporary root."""
    env = os.environ.get("FLEETPROBE_LAB_DIR")
    return Path(env).resolve() if env else tmp_root / "lab"


@pytest.fixture(scope="session")
def lab_fleet() -> Iterator[LabForTests]:
    """Bring up the default lab fleet (3 x x86_64, ppc64le, mips64el) for the session."""
    with tempfile.TemporaryDirectory(prefix="fleetprobe-lab-") as tmp:
        lab_dir = lab_test_dir(Path(tmp))
        t0 = time.monotonic()
        fleet = lab.up(lab_dir=lab_dir, timeout_s=float(os.environ.get("FLEETPROBE_LAB_TIMEOUT", "300")))
        try:
            yield LabForTests(lab_dir=fleet.lab_dir, inventory=fleet.inventory, key=fleet.key,
                              known_hosts=fleet.known_hosts, vms=fleet.vms,
                              up_seconds=time.monotonic() - t0)
        finally:
            lab.down(fleet.lab_dir, names=fleet.started)
