"""Benchmark: module build dedup - how many builds a fleet of mixed kernels needs, and the cost to decide.

    .venv/bin/python bench/builds.py [--hosts 2000] [--quick]

Takes the stored real facts (tests/data/facts/*.json: x86_64 4.19/6.1/6.18,
aarch64, i686, ppc64le, mips64el, mipsel), deals them round-robin to N
named hosts, and asks :func:`fleetprobe.kmod.plan.plan_builds` to group them for
the bundled fp_kprobe module.  Builds must equal the number of distinct
(arch, kernel release) pairs, never the number of hosts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from fleetprobe.kmod.plan import plan_builds
from fleetprobe.kmod.source import load_module_source
from fleetprobe.facts import Facts
from fleetprobe.shipped import shipped_dir

FACTS_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "facts"


def main(argv: list[str] | None = None) -> int:
    """Group N hosts and print builds against hosts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="200 hosts")
    args = ap.parse_args(argv)
    n = 200 if args.quick else args.hosts
    stored = [Facts.from_json(json.loads(p.read_text())) for p in sorted(FACTS_DIR.glob("*.json"))]
    fleet = [replace(stored[i % len(stored)], host=f"h{i:05d}") for i in range(n)]
    distinct = {(f.arch, f.endian, f.kernel_release) for f in fleet}
    modules = shipped_dir("modules")
    assert modules is not None, "fleetprobe was installed without its modules"
    mod = load_module_source(modules / "fp_kprobe")
    t0 = time.process_time()
    groups = plan_builds(fleet, [mod], have_program=lambda name: False)
    cpu = time.process_time() - t0
    covered = sum(len(g.hosts) + len(g.blocked) for g in groups)
    print(f"{n} hosts of {len(distinct)} distinct (arch, endian, kernel release) -> {len(groups)} build groups "
          f"covering {covered} hosts (incl. hosts that cannot load modules), decided in {cpu * 1000:.1f} ms CPU ({cpu / n * 1e6:.1f} us/host)")
    for g in groups:
        print(f"  {g.describe()}")
    if len(groups) != len(distinct) or covered != n:
        print("MISMATCH: builds should equal distinct (arch, release) pairs and cover every host")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
