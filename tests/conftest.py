"""Test-wide isolation: nothing reads the developer's ~/.ssh, and nothing fleetprobe makes survives a test."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hostcheck import ensure_tracefs, fleetprobe_leftovers  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_home() -> Iterator[None]:
    """Point HOME at an empty directory and drop the agent: no test can read or use a real ~/.ssh."""
    old_home = os.environ.get("HOME")
    old_sock = os.environ.pop("SSH_AUTH_SOCK", None)
    # The history store and caches follow XDG_*: keep them inside the temporary HOME too.
    for var in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        os.environ.pop(var, None)
    with tempfile.TemporaryDirectory(prefix="fleetprobe-home-") as home:
        os.environ["HOME"] = home
        try:
            yield
        finally:
            if old_home is not None:
                os.environ["HOME"] = old_home
            if old_sock is not None:
                os.environ["SSH_AUTH_SOCK"] = old_sock


@pytest.fixture
def clean_tracefs() -> Iterator[None]:
    """Fail the test if it leaves any fleetprobe group, event or instance in this machine's tracefs."""
    if not ensure_tracefs():
        pytest.skip("needs root and tracefs")
    before = set(fleetprobe_leftovers())
    yield
    after = [x for x in fleetprobe_leftovers() if x not in before]
    assert not after, f"fleetprobe left these behind: {after}"
