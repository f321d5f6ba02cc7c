"""Issue 14 item 6: ``fleetprobe facts``'s clock estimate is unbiased.

A sim host runs on this machine: its clock IS the controller's, so the true offset is 0.  Before,
the host read its clock at the end of the interval (after receiving the whole script byte by byte)
while the estimate assumed its middle, so the offset always came out equal to its error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from simhosts import SimFleet

from fleetprobe.inventory import load_inventory
from fleetprobe.orchestrate import facts_fleet
from fleetprobe.session import SSHOptions
from fleetprobe.settings import RunSettings


def test_facts_clock_offset_is_centred_on_the_truth(sim: SimFleet, tmp_path: Path) -> None:
    sim.add("same-clock")
    inv = load_inventory(str(sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh"))))
    settings = RunSettings(ssh=SSHOptions(ssh_config=(), use_agent=False, connect_timeout=5), setup_timeout=20)
    offsets, errors = [], []
    for _ in range(10):
        [hf] = asyncio.run(facts_fleet(inv.hosts, settings))
        assert hf.error is None and hf.clock_offset is not None and hf.clock_error is not None, hf.error
        offsets.append(hf.clock_offset)
        errors.append(hf.clock_error)
    # The truth (0) is inside every estimate's bounds ...
    assert all(abs(o) <= e + 1e-4 for o, e in zip(offsets, errors)), list(zip(offsets, errors))
    # ... and on average they sit near the middle of their bounds, not at the positive edge: the old
    # estimate (its host read the clock at the end of the interval) gave offset/error +0.19..+0.91,
    # a mean of +0.41..+0.80 over 7 samples in each of 4 runs here; the new one -0.25..+0.17.
    # One-sided: the regression is the positive bias. A loaded machine (scheduling delay before the
    # host's first read) pulls the mean the other way (-0.42 seen with three suites at once), still
    # with the truth inside every bound.
    ratios = [o / e for o, e in zip(offsets, errors)]
    assert sum(ratios) / len(ratios) < 0.35, [round(r, 2) for r in ratios]
