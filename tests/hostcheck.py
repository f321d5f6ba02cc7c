"""What fleetprobe left on this machine's kernel, and tracefs set-up, for tests."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")

#: Run ids this test process chose itself (tests that start the CLI as a child pass ``--run-id``).
OWN_RUN_IDS: set[str] = set()


def own_run_id(prefix: str = "t") -> str:
    """A fresh run id, recorded as this test process's own for ``clean_tracefs``."""
    rid = prefix + uuid.uuid4().hex[:8]
    OWN_RUN_IDS.add(rid)
    return rid


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


def wait_enabled_sh(run_id: str, hosts: int, events: list[str], limit_s: int = 240) -> str:
    """A shell prefix that waits until every one of ``events`` (``system/name``) is enabled in each
    of the run's ``hosts`` instances, then goes on (after ``limit_s`` it goes on anyway).

    An instance exists before its events are enabled one by one: work started when it appears can
    fall before the last enable on a loaded machine, and would then be (correctly) not counted.
    """
    files = " ".join(f"{TRACEFS}/instances/fp_{run_id}_*/events/{ev}/enable" for ev in events)
    want = hosts * len(events)
    return (f"n=0; until [ $(cat {files} 2>/dev/null | grep -c 1) -ge {want} ] || [ $n -ge {limit_s * 5} ]; "
            "do sleep 0.2; n=$((n+1)); done; ")


def wait_for(pred: Callable[[], object], timeout: float, what: str, every: float = 0.1) -> None:
    """Poll ``pred`` every ``every`` s until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
