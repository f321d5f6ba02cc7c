#!/usr/bin/env python3
"""Write each shipped playbook's "Example" header from a real lab run's report.

    FLEETPROBE_LAB_EXAMPLES=/tmp/ex FLEETPROBE_LAB_FLEET=x86_64,ppc64le,mips64el,mipsel,arm64 \\
        scripts/test.sh -m lab_matrix tests/lab/test_lab_library.py
    .venv/bin/python scripts/playbook_examples.py /tmp/ex --date 2026-12-02

tests/lab/test_lab_library.py saves every run's JSON report there (one guest per lab arch, the
playbook's workload running in each).  This renders each report the way `fleetprobe merge` prints
it, 100 columns wide, with the lab's host names shortened to their arch (``lab-arm64-6.1-1`` ->
``arm64-6.1``) so the per-host columns fit, drops what only that run had (report paths, clock
offsets), and puts it in the playbook's header in place of its previous example lines.  Nothing in
an example is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAB_HOST = re.compile(r"\blab-([a-z0-9_]+-\d+\.\d+)-\d+\b")
MAX_LINES = 28
WIDTH = 100


def render(report: Path) -> list[str]:
    """The terminal summary of one saved report, lab host names shortened."""
    text = LAB_HOST.sub(r"\1", report.read_text())
    json.loads(text)  # still a report: the renaming touched whole host names only
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "report.json", Path(tmp) / "merged.json"
        src.write_text(text)
        env = dict(os.environ, COLUMNS=str(WIDTH), TERM="dumb", NO_COLOR="1")
        proc = subprocess.run([sys.executable, "-m", "fleetprobe", "merge", str(src), "-o", str(out)],
                              capture_output=True, text=True, env=env, check=True, cwd=tmp)
    lines, skipping = [], False
    for line in proc.stdout.splitlines():
        line = line.rstrip()
        if line.startswith("clock offsets"):
            skipping = True
            continue
        if skipping and line.startswith("  "):
            continue
        skipping = False
        if line.startswith(("merged ", "report written", "run ")) and (" into " in line or "written" in line
                                                                     or "stored in" in line):
            continue
        lines.append(line)
    if len(lines) > MAX_LINES:
        lines = [*lines[:MAX_LINES], "..."]
    return lines


def header_block(stem: str, lines: list[str], date: str) -> list[str]:
    """The comment lines of one playbook's example."""
    head = (f"# Example (a lab run, {date}: one guest per arch, the test's workload looping in each;"
            f" `fleetprobe run {stem}`):")
    return [head, *(f"#   {line}".rstrip() for line in lines)]


def replace_example(text: str, block: list[str]) -> str:
    """``text`` with its "# Example" paragraph's example lines replaced by ``block``.

    The old example is the "# Example" line and, after it, the lines indented as output
    ("#   ...") or continuing a "not yet taken" sentence; prose after the example stays.
    """
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("# Example")), None)
    if start is None:
        end_of_header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        return "\n".join([*lines[:end_of_header], "#", *block, *lines[end_of_header:]])
    end = start + 1
    not_yet = "not yet" in lines[start]
    while end < len(lines) and lines[end].startswith("#") and lines[end] != "#":
        if not (lines[end].startswith("#   ") or not_yet):
            break
        end += 1
    return "\n".join([*lines[:start], *block, *lines[end:]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("saved", type=Path, help="the folder FLEETPROBE_LAB_EXAMPLES named")
    ap.add_argument("--date", required=True, help="the lab run's date, written into each header")
    args = ap.parse_args()
    done = 0
    for report in sorted(args.saved.glob("*.json")):
        book = REPO / "playbooks" / f"{report.stem}.yml"
        if not book.exists():
            print(f"{report}: no playbook {book.name}", file=sys.stderr)
            continue
        block = header_block(report.stem, render(report), args.date)
        book.write_text(replace_example(book.read_text(), block))
        done += 1
    print(f"{done} playbook example(s) written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
