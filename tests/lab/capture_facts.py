"""Capture stored facts from running lab guests: one file per (arch, kernel line) in tests/data/facts/.

    fleetprobe lab up --arch x86_64,arm64 --kernel 5.10,6.1,6.12
    .venv/bin/python tests/lab/capture_facts.py -i $FLEETPROBE_LAB_DIR/inventory.yml [-l lab_linux_6_12]

The facts are gathered the way `fleetprobe run` gathers them, for every kernel
symbol, tracepoint and binary any shipped playbook names (so tests/test_plan.py
can plan every shipped playbook against them).  Written as
``lab-<arch>-<line>.json`` (the host name without its index): the per-boot
values (boot_id, realtime) and other runs' live leftovers are blanked, everything else is what the guest said.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fleetprobe.cli.options import build_parser  # noqa: E402
from fleetprobe.cli.run import _inventory, _settings  # noqa: E402
from fleetprobe.orchestrate import facts_fleet  # noqa: E402
from fleetprobe.playbook import Playbook, load_playbook  # noqa: E402


def shipped_union() -> Playbook:
    """One playbook holding every shipped playbook's probes: its facts cover all of them."""
    books = [load_playbook(p) for p in sorted((REPO / "playbooks").glob("*.yml"))]
    return replace(books[0], probes=tuple(p for b in books for p in b.probes))


def stored_name(host: str) -> str:
    """lab-x86_64-6.12-1 -> lab-x86_64-6.12 (one file per arch and line)."""
    return re.sub(r"-\d+$", "", host)


def main() -> int:
    """Gather and write; returns 1 if any host gave no facts."""
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("-o", "--out", type=Path, default=REPO / "tests/data/facts")
    mine, rest = ours.parse_known_args()
    args = build_parser().parse_args(["facts", "--connect-timeout", "60s", "--setup-timeout", "120s", *rest])
    results = asyncio.run(facts_fleet(_inventory(args).hosts, _settings(args), shipped_union()))
    bad = 0
    for hf in results:
        if hf.facts is None:
            print(f"{hf.host.name}: no facts: {hf.error}", file=sys.stderr)
            bad += 1
            continue
        data = hf.facts.to_json()
        data["boot_id"], data["realtime"] = "", 0.0
        data["leftovers"] = []  # another run's live instances at capture time are not the kernel's
        path = mine.out / f"{stored_name(hf.host.name)}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {data['arch']} "
              f"{data['kernel_release']} features={','.join(data['features'])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
