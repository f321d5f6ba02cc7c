"""``fleetprobe list --playbooks``: the shipped playbooks, each with the question it answers.

The question is the first quoted question of the playbook's ``Answers:`` header paragraph (the
bcc-style header every shipped playbook has); a playbook without one shows its description.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleetprobe.errors import PlaybookError
from fleetprobe.playbook import load_playbook
from fleetprobe.shipped import shipped_dir, shipped_playbooks

_QUESTION = re.compile(r'"([^"]+\?)"')


@dataclass(frozen=True)
class ShippedEntry:
    """One shipped playbook as the listing shows it."""

    name: str
    question: str
    kinds: tuple[str, ...]
    #: Probes carrying an audit rule, as ``probe: rule``.
    rules: tuple[str, ...]


def question_of(text: str) -> str | None:
    """The first quoted question in the ``Answers:`` paragraph of a playbook's header comment."""
    header: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    paragraph: list[str] = []
    for line in header:
        if line.startswith("Answers:"):
            paragraph = [line]
        elif paragraph:
            if not line:
                break
            paragraph.append(line)
    m = _QUESTION.search(" ".join(paragraph))
    return m.group(1) if m else None


def shipped_entries() -> list[ShippedEntry]:
    """Every shipped playbook, by name (PlaybookError if one does not load: a broken install)."""
    out = []
    for name, path in shipped_playbooks().items():
        pb = load_playbook(path)
        question = question_of(path.read_text(encoding="utf-8")) or pb.description
        rules = tuple(f"{p.name}: " + ("expect none" if p.expect == "none" else f"max {p.max_per_host}/host")
                      for p in pb.probes if p.expect == "none" or p.max_per_host is not None)
        out.append(ShippedEntry(name, question, tuple(dict.fromkeys(p.kind for p in pb.probes)), rules))
    return out


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    """Print the shipped playbooks (the only listing so far: ``--playbooks`` is the default)."""
    folder = shipped_dir("playbooks")
    if folder is None:
        raise PlaybookError("no shipped playbooks found next to this fleetprobe", file=str(Path(__file__).resolve().parent / "_shipped"),
                            hint="reinstall fleetprobe: a wheel carries them in fleetprobe/_shipped/playbooks")
    t = Table(title=Text(f"shipped playbooks ({folder}): fleetprobe run NAME -i INVENTORY"), title_justify="left")
    for col in ("playbook", "answers", "probes", "audit rules"):
        t.add_column(col)
    for e in shipped_entries():
        t.add_row(Text(e.name), Text(e.question), Text(", ".join(e.kinds)), Text("; ".join(e.rules)))
    console.print(t)
    return 0
