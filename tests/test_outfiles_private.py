"""Reports and events are written as root in folders others may share (issue 11, finding 11 and 8).

A report is written to a temporary file made with mkstemp in the target's folder and renamed
over the target: no predictable temporary name for a planted symlink to catch. Everything
fleetprobe writes (JSON, HTML, Markdown, events) is 0600: it holds what hosts printed.
An events path that is a symlink is refused, never followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from rich.console import Console

from simhosts import SimFleet

from fleetprobe.cli.main import main
from fleetprobe.cli.options import Exit
from fleetprobe.outfiles import open_private, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
TRACEFS = Path("/sys/kernel/tracing")




def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_every_output_of_a_run_is_private_and_written_whole(sim: SimFleet, tmp_path: Path,
                                                            clean_tracefs: None) -> None:
    sim.add("h1")
    inv = sim.inventory(tmp_path / "inventory.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    out = tmp_path / "shared"
    out.mkdir()
    os.chmod(out, 0o1777)  # a shared, sticky folder like /tmp
    # Predictable names of the old temporary files, planted as symlinks: nothing may write through them.
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    for name in ("r.json", "r.html", "r.md"):
        for pid in range(os.getpid() - 5, os.getpid() + 50):
            (out / f".{name}.{pid}.tmp").symlink_to(victim)
    old = os.umask(0o022)
    try:
        rc = main(["run", str(ROOT / "playbooks" / "execsnoop.yml"), "-i", str(inv), "--ssh-config", "none",
                   "--no-agent", "--duration", "1s", "--no-live", "--no-store",
                   "--json", str(out / "r.json"), "--html", str(out / "r.html"), "--markdown", str(out / "r.md"),
                   "--events", str(out / "e.jsonl")], console=Console(record=True, width=200))
    finally:
        os.umask(old)
    assert rc in (Exit.OK, Exit.SOME_FAILED), rc
    assert victim.read_text() == "untouched\n"
    for name in ("r.json", "r.html", "r.md", "e.jsonl"):
        assert not (out / name).is_symlink() and _mode(out / name) == 0o600, (name, oct(_mode(out / name)))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()], "no temporary left"


def test_an_events_path_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    link = tmp_path / "events.jsonl"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        open_private(link)
    assert victim.read_text() == "untouched\n"
    write_text_atomic(tmp_path / "report.json", "{}\n")
    assert _mode(tmp_path / "report.json") == 0o600
