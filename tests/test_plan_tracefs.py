"""The kernel of this machine accepts the uprobe definitions the planner writes (real tracefs)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprobe.elf import symbol_file_offset
from fleetprobe.facts import Facts, FileFacts
from fleetprobe.plan import HostPlan, PlannedProbe, new_run_id, plan_host
from fleetprobe.playbook import load_playbook

TRACEFS = Path("/sys/kernel/tracing")
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.tracefs,
    pytest.mark.skipif(os.geteuid() != 0 or not (TRACEFS / "uprobe_events").exists(),
                       reason="needs root and uprobe_events in /sys/kernel/tracing"),
]


def _append(line: str) -> None:
    """Append one definition to uprobe_events (never truncate: other users' probes live there)."""
    # Python's open(..., "a") seeks to the end, which tracefs refuses with EINVAL: use O_APPEND directly.
    fd = os.open(TRACEFS / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@pytest.fixture
def planned() -> Iterator[list[PlannedProbe]]:
    """Probes this test defined; removed afterwards whatever happens."""
    placed: list[PlannedProbe] = []
    yield placed
    for p in placed:
        try:
            _append(f"-:{p.event}")
        except OSError:
            pass
    for p in placed:
        assert not (TRACEFS / "events" / p.event).exists(), f"{p.event} left behind"


def _plan(playbook: str) -> HostPlan:
    """Plan a shipped or test playbook for this machine, with uprobe offsets from its real ELF files.

    Every binary the playbook names is looked up on this machine (as the facts stage does on a
    host): the ones that exist get their symbols' offsets from their own bytes.
    """
    stored = json.loads((Path(__file__).parent / "data" / "facts" / "x86_64-6.18-controller.json").read_text())
    pb = load_playbook(playbook)
    files = {path: FileFacts(path, Path(path).exists(), 0, "") for path in pb.user_binaries()}
    facts = dataclasses.replace(Facts.from_json(stored), host=f"pytest-{os.getpid()}", files=files)
    offsets: dict[tuple[str, str], int | str] = {}
    for path, symbol in pb.uprobe_targets():
        if files[path].exists:
            try:
                offsets[(path, symbol)] = symbol_file_offset(Path(path).read_bytes(), symbol)
            except ValueError as e:
                offsets[(path, symbol)] = str(e)
    return plan_host(pb, facts, run_id=new_run_id(), deadline=int(time.time()) + 60, uprobe_offsets=offsets)


@pytest.mark.parametrize("playbook,probes", [
    (ROOT / "playbooks" / "bashreadline.yml", ("line",)),
    # libc's getaddrinfo and libssl's SSL_* of this machine (Debian multiarch paths, the first alternatives).
    (ROOT / "playbooks" / "gethostlatency.yml", ("lookup", "lookup_ret")),
    (ROOT / "playbooks" / "ssllatency.yml", ("read", "read_ret", "write", "write_ret", "handshake", "handshake_ret")),
    (ROOT / "tests" / "data" / "playbooks" / "good" / "kitchen-sink.yml", ("line", "at_offset")),
])
def test_kernel_accepts_planned_uprobes(playbook: Path, probes: tuple[str, ...],
                                        planned: list[PlannedProbe]) -> None:
    hp = _plan(str(playbook))
    chosen = [p for p in hp.probes if p.name in probes]
    assert [p.name for p in chosen] == list(probes)
    for p in chosen:
        assert p.definition is not None and p.events_file == "uprobe_events"
        _append(p.definition)
        planned.append(p)
        event_dir = TRACEFS / "events" / p.event
        assert event_dir.is_dir()
        # The kernel's own view of the fields: every planned field is in the event format.
        fmt = (event_dir / "format").read_text()
        for name in p.fields:
            assert f" {name};" in fmt or f" {name}[" in fmt or f"__data_loc char[] {name};" in fmt, fmt
