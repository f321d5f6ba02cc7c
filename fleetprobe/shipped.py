"""The playbooks and kernel modules that ship with fleetprobe, wherever it is installed.

A checkout (or an editable install) has them as the top-level ``playbooks/``
and ``modules/``; a wheel carries copies in ``fleetprobe/_shipped/`` (setup.py).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(part: str) -> Path | None:
    """``playbooks`` or ``modules`` as installed with this fleetprobe, or None."""
    for candidate in (_PACKAGE / "_shipped" / part, _PACKAGE.parent / part):
        if candidate.is_dir() and (part != "playbooks" or any(candidate.glob("*.yml"))):
            return candidate
    return None


def shipped_playbooks() -> dict[str, Path]:
    """Shipped playbooks by name (file stem)."""
    folder = shipped_dir("playbooks")
    return {p.stem: p for p in sorted(folder.glob("*.yml"))} if folder else {}


def shipped_playbook(name: str) -> Path | None:
    """The shipped playbook called ``name`` (``opensnoop`` or ``opensnoop.yml``), or None."""
    if "/" in name or "\\" in name:
        return None
    stem = Path(name).stem if Path(name).suffix in (".yml", ".yaml") else name
    return shipped_playbooks().get(stem)
