"""The exact statfs probe on one guest of every (arch, kernel line) Debian serves, in one run.

Not in the default run (a VM per arch and line: 11 on 2 cores): run it with

    scripts/test.sh -m lab_matrix

``FLEETPROBE_LAB_MATRIX`` (e.g. ``x86_64:5.10,arm64:6.12``) narrows it to some
pairs, to run the matrix a few VMs at a time on a busy machine.  Which lines an
arch has is read from the archive (``--kernel all``), so a new line or a
dropped architecture changes the matrix without editing this test.
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
from test_lab_exact import check_exact_statfs

pytestmark = [pytest.mark.lab, pytest.mark.lab_matrix]


@pytest.fixture(scope="module")
def matrix_fleet() -> Iterator[LabForTests]:
    """One VM of every (arch, line) the archive serves (or those FLEETPROBE_LAB_MATRIX names)."""
    with tempfile.TemporaryDirectory(prefix="fleetprobe-lab-") as tmp:
        lab_dir = lab_test_dir(Path(tmp))
        env = os.environ.get("FLEETPROBE_LAB_MATRIX")
        if env:
            arches, counts, lines = fleet_from_env(env)
        else:
            arches, counts, lines = list(lab.ARCHES), {a: 1 for a in lab.ARCHES}, {"*": ("all",)}
        t0 = time.monotonic()
        fleet = lab.up(arches, counts, lab_dir=lab_dir, kernels=lines,
                       timeout_s=float(os.environ.get("FLEETPROBE_LAB_TIMEOUT", "600")))
        try:
            yield LabForTests(lab_dir=fleet.lab_dir, inventory=fleet.inventory, key=fleet.key,
                              known_hosts=fleet.known_hosts,
                              vms=[v for v in fleet.vms if v.name in fleet.started or v.name in fleet.reused],
                              up_seconds=time.monotonic() - t0)
        finally:
            lab.down(fleet.lab_dir, names=fleet.started)


def test_exact_statfs_on_every_arch_and_kernel_line(matrix_fleet: LabForTests, tmp_path: Path) -> None:
    """Exact counts, decoded strings, return values and clean teardown on each (arch, line), one run."""
    lab_ = matrix_fleet
    pairs = sorted((vm.arch, vm.line) for vm in lab_.vms)
    assert len(pairs) == len(set(pairs)), "one guest per (arch, line)"
    if not os.environ.get("FLEETPROBE_LAB_MATRIX"):
        # Every arch has at least its default line; the 64-bit arches Debian still builds have 6.12.
        assert {a for a, _l in pairs} == set(lab.ARCHES)
        assert {("x86_64", "6.12"), ("arm64", "6.12"), ("ppc64le", "6.12"), ("x86_64", "5.10"),
                ("arm64", "5.10")} <= set(pairs)
    print(f"\nmatrix up in {lab_.up_seconds:.1f} s: "
          + ", ".join(f"{v.name} {v.kernel_release} boot {v.boot_seconds} s" for v in lab_.vms))
    t0 = time.monotonic()
    # 60 s: the slowest guest (MIPS, 1 vCPU under TCG, often on a busy machine) must finish its calls.
    check_exact_statfs(lab_, tmp_path, duration="60s")
    print(f"statfs run on {len(pairs)} guests in {time.monotonic() - t0:.1f} s")
