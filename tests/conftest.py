"""Test-wide isolation: nothing reads the developer's ~/.ssh, and nothing fleetprobe makes survives a test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hostcheck import OWN_RUN_IDS, ensure_tracefs, fleetprobe_leftovers  # noqa: E402
from simhosts import SimFleet  # noqa: E402


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
        # This machine's /etc/ssh (ssh_config, ssh_known_hosts) is no test's business either.
        os.makedirs(os.path.join(home, "etc-ssh"))
        os.environ["FLEETPROBE_SSH_ETC"] = os.path.join(home, "etc-ssh")
        try:
            yield
        finally:
            if old_home is not None:
                os.environ["HOME"] = old_home
            if old_sock is not None:
                os.environ["SSH_AUTH_SOCK"] = old_sock


@pytest.fixture
def clean_tracefs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if it leaves any group, event or instance of its OWN runs in this machine's tracefs.

    Another fleetprobe run may be live on the same machine (another checkout's tests, another
    operator): its names come and go during the test and are none of this test's business.  So
    only names carrying a run id this process used count: every run id that reaches
    ``plan.names_for`` in-process, and those handed to child processes via ``own_run_id``.
    """
    if not ensure_tracefs():
        pytest.skip("needs root and tracefs")
    import fleetprobe.plan as plan

    used: set[str] = set()
    real = plan.names_for

    def recording(run_id: str, host: str, deadline: int) -> tuple[str, str]:
        used.add(run_id)
        return real(run_id, host, deadline)

    monkeypatch.setattr(plan, "names_for", recording)
    # A run over worker processes (fleetprobe.workers) names its hosts' probes in the workers, where
    # names_for is not recorded: its run id is made here, in this process, by new_run_id.
    import fleetprobe.cli.extras as cli_extras  # RunExtras makes the CLI's run id
    import fleetprobe.orchestrate as orchestrate

    def new_id() -> str:
        rid = real_new_run_id()
        used.add(rid)
        return rid

    real_new_run_id = plan.new_run_id
    for module in (plan, cli_extras, orchestrate):
        monkeypatch.setattr(module, "new_run_id", new_id)
    before = set(fleetprobe_leftovers())
    yield
    ours = used | OWN_RUN_IDS
    after = [x for x in fleetprobe_leftovers()
             if x not in before and any(f"fp_{rid}_" in x for rid in ours)]
    assert not after, f"fleetprobe left these behind: {after}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``lab_matrix`` tests (every arch x kernel line, many VMs) run only when ``-m`` names them.

    The default run (and ``-m lab``) leaves them out: CI time stays bounded; run them with
    ``scripts/test.sh -m lab_matrix``.
    """
    if "lab_matrix" in (config.getoption("markexpr") or ""):
        return
    keep = [i for i in items if i.get_closest_marker("lab_matrix") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("lab_matrix")])
        items[:] = keep


@pytest.fixture
def busy() -> Iterator[None]:
    """Keep execs and forks happening on this machine while a test probes."""
    proc = subprocess.Popen(["sh", "-c", "while :; do /bin/true; sleep 0.02; done"], start_new_session=True)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimFleet]:
    """One sim fleet (tests/simhosts.py), stopped with nothing left running."""
    if os.geteuid() != 0 or not Path("/sys/kernel/tracing/instances").is_dir():
        pytest.skip("needs root and tracefs")
    fleet = SimFleet(tmp_path / "sim")
    try:
        yield fleet
    finally:
        assert fleet.stop() == []
