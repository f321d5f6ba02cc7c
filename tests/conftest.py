"""Test-wide isolation: nothing reads the developer's ~/.ssh, and nothing fleetprobe makes survives a test."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

TRACEFS = Path("/sys/kernel/tracing")


@pytest.fixture(autouse=True, scope="session")
def _isolated_home() -> Iterator[None]:
    """Point HOME at an empty directory and drop the agent: no test can read or use a real ~/.ssh."""
    old_home = os.environ.get("HOME")
    old_sock = os.environ.pop("SSH_AUTH_SOCK", None)
    with tempfile.TemporaryDirectory(prefix="fleetprobe-home-") as home:
        os.environ["HOME"] = home
        try:
            yield
        finally:
            if old_home is not None:
                os.environ["HOME"] = old_home
            if old_sock is not None:
                os.environ["SSH_AUTH_SOCK"] = old_sock


def fleetprobe_leftovers() -> list[str]:
    """fp_ instances, dynamic events and modules on this machine's kernel."""
    found: list[str] = []
    inst = TRACEFS / "instances"
    if inst.is_dir():
        found += [f"instance {p.name}" for p in inst.iterdir() if p.name.startswith("fp_")]
    for f in ("kprobe_events", "uprobe_events"):
        p = TRACEFS / f
        if p.exists():
            found += [f"{f}: {line}" for line in p.read_text().splitlines() if ":fp_" in line]
    return found


def ensure_tracefs() -> bool:
    """Mount tracefs when it is not (CI machines start without it); True when usable."""
    if (TRACEFS / "README").exists():
        return True
    if os.geteuid() != 0:
        return False
    os.system("mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null")
    return (TRACEFS / "README").exists()


@pytest.fixture
def clean_tracefs() -> Iterator[None]:
    """Fail the test if it leaves any fleetprobe group, event or instance in this machine's tracefs."""
    if not ensure_tracefs():
        pytest.skip("needs root and tracefs")
    before = set(fleetprobe_leftovers())
    yield
    after = [x for x in fleetprobe_leftovers() if x not in before]
    assert not after, f"fleetprobe left these behind: {after}"
