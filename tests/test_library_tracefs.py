"""The shipped playbooks' tracepoints, filters and aggregate fields, held against this machine's real kernel.

The stored lab facts say whether a tracepoint exists, not what fields it has; a filter naming a
field the event lacks is refused by the kernel only when a run writes it, on every host at once.
This machine's kernel (x86_64, real tracefs, syscall tracepoints) reads each filter of a shipped
tracepoint probe in a private instance of our own, and its format files list the fields the
aggregates and filters name.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprobe.playbook import ProbeSpec, load_playbook
from fleetprobe.plan import names_for
from hostcheck import TRACEFS, ensure_tracefs, own_run_id

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "playbooks").glob("*.yml"))
pytestmark = [
    pytest.mark.tracefs,
    pytest.mark.skipif(os.geteuid() != 0 or not ensure_tracefs(), reason="needs root and tracefs"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the absent-here list below is x86_64's"),
]

#: Tracepoints a shipped playbook names that an x86_64 kernel does not have, and why: each host
#: has one of a pair of names, and the planner skips the other with "does not exist on this kernel".
ABSENT_ON_X86_64 = {
    "syscalls/sys_enter_sync_file_range2": "powerpc's (and 32-bit arm's) name for sync_file_range",
    "syscalls/sys_enter_statfs64": "statfs64(2) exists on powerpc and 32-bit ABIs only (lab: ppc64le, mipsel)",
}


def _tracepoint_probes() -> list[tuple[str, ProbeSpec]]:
    return [(path.stem, p) for path in SHIPPED for p in load_playbook(path).probes if p.kind == "tracepoint"]


def _fields(tp: str) -> set[str]:
    """The field names in this kernel's format file of ``tp``."""
    fmt = (TRACEFS / "events" / tp / "format").read_text()
    return set(re.findall(r"field:[^;]*?\b(\w+)(?:\[[^\]]*\])?;", fmt))


@pytest.fixture
def instance() -> Iterator[Path]:
    """A private tracefs instance named as fleetprobe names them (sweeps know it); removed afterwards."""
    _, name = names_for(own_run_id(), f"pytest-{os.getpid()}", int(time.time()) + 120)
    path = TRACEFS / "instances" / name
    path.mkdir()
    yield path
    path.rmdir()
    assert not path.exists(), f"instance {name} left behind"


def test_every_shipped_tracepoint_exists_here_or_is_another_arches() -> None:
    known = set(ABSENT_ON_X86_64)
    if not Path("/proc/modules").exists():
        # A kernel without CONFIG_MODULES (this repository's CI machines) has no module events.
        known |= {"module/module_load", "module/module_free"}
    absent = {p.targets[0] for _, p in _tracepoint_probes() if not (TRACEFS / "events" / str(p.targets[0])).is_dir()}
    assert absent <= known, absent - known


@pytest.mark.parametrize("book,probe", [pytest.param(b, p, id=f"{b}-{p.name}") for b, p in _tracepoint_probes()
                                        if p.filter or p.aggregate])
def test_kernel_takes_each_tracepoint_filter_and_has_each_aggregate_field(book: str, probe: ProbeSpec,
                                                                          instance: Path) -> None:
    tp = str(probe.targets[0])
    if tp in ABSENT_ON_X86_64:
        pytest.skip(f"{tp}: {ABSENT_ON_X86_64[tp]}")
    fields = _fields(tp)
    agg = probe.aggregate
    if agg is not None:
        for name in (*agg.fields, *([agg.value] if agg.value else [])):
            assert name in fields | {"comm", "pid"}, (book, probe.name, name, sorted(fields))
    if probe.filter:
        filter_file = instance / "events" / tp / "filter"
        try:
            filter_file.write_text(probe.filter + "\n")
        except OSError as e:
            assert e.errno != errno.EINVAL, f"{book}: the kernel refused filter {probe.filter!r} on {tp}"
            raise
        try:
            assert filter_file.read_text().strip() == probe.filter, (book, filter_file.read_text())
        finally:
            filter_file.write_text("0\n")
        assert filter_file.read_text().strip() == "none"


#: Kernel functions a shipped playbook probes that this machine's kernel (6.18, no module support)
#: lacks, and why: the playbooks name them for other kernels and skip them, saying so, elsewhere.
NO_SYMBOL_HERE = {
    ("tcpdrop", "tcp_drop"): "TCP's drop function of 5.10-era kernels, replaced by tcp_drop_reason",
    ("mdflush", "flush"): "md_flush_request is in md_mod, which this kernel does not have",
}


def test_every_shipped_kprobe_names_a_function_this_kernel_or_an_older_one_has() -> None:
    """A misspelt symbol would be skipped on every host, 'not in kallsyms': catch it here, in 6.18's kallsyms."""
    with open("/proc/kallsyms") as f:
        have = {line.split()[2] for line in f}
    assert "kernel_clone" in have, "kallsyms shows no names (kptr_restrict?)"
    missing = {(path.stem, p.name): [t.symbol for t in p.kernel_targets()]
               for path in SHIPPED for p in load_playbook(path).probes
               if p.kernel_targets() and not any(t.symbol in have for t in p.kernel_targets())}
    assert set(missing) <= set(NO_SYMBOL_HERE), {k: v for k, v in missing.items() if k not in NO_SYMBOL_HERE}
