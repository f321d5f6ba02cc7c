"""The lab fleet as the lab tests see it, and FLEETPROBE_LAB_FLEET / FLEETPROBE_LAB_MATRIX parsing.

A module of its own (not conftest.py) so test modules can import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fleetprobe import lab
from fleetprobe.lab.lines import DEFAULT_LINE


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


def fleet_from_env(text: str) -> tuple[list[str], dict[str, int], dict[str, tuple[str, ...]]]:
    """``x86_64:6.1=2,arm64:5.10,arm64:6.12`` -> arches, count per arch, lines per arch (for lab.up).

    One count per arch (the largest given); a line defaults to the default line.
    """
    arches: list[str] = []
    counts: dict[str, int] = {}
    lines: dict[str, list[str]] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        spec, _, n = item.partition("=")
        arch, _, line = spec.partition(":")
        arch = lab.lab_arch(arch).name
        if arch not in arches:
            arches.append(arch)
        counts[arch] = max(counts.get(arch, 0), int(n or 1))
        lines.setdefault(arch, []).append(line or DEFAULT_LINE)
    return arches, counts, {a: tuple(v) for a, v in lines.items()}
