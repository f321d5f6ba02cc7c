"""A MIPS64 kernel binds syscall events shared by its n64 and n32 ABIs to n32: fleetprobe says so.

Stored facts of the lab's real guests (tests/data/facts/): the mips64el kernels have the n32 ABI
(``sysn32_rt_sigreturn``), the mipsel one (32-bit, o32 only) and the other arches do not.
"""

from __future__ import annotations

import dataclasses

import pytest

from fleetprobe.facts import SymbolFacts
from fleetprobe.syscall_abi import N32_MARKER, N32_SHARED, n64_blind
from fleetprobe.playbook import load_playbook
from test_plan import ROOT, facts, plan, skipped


@pytest.mark.parametrize("host", ["lab-mips64el-6.1", "lab-mips64el-6.12"])
def test_shared_syscall_events_are_skipped_with_the_reason_on_mips64(host: str) -> None:
    hp = plan("killsnoop", host)
    for probe in ("kill", "kill_ret", "tkill", "tgkill"):
        reason = skipped(hp, probe)
        assert "n64" in reason and "n32" in reason, reason
    assert "sigkill" in {p.name for p in hp.probes}  # signal_generate is not a syscall event
    # statfs(2) reaches n32 through compat_sys_statfs: its event keeps the n64 number and is placed.
    assert "statfs" in {p.name for p in plan("vfscount", host).probes}


@pytest.mark.parametrize("host", ["lab-mipsel-6.1", "lab-x86_64-6.1", "lab-ppc64le-6.1", "lab-arm64-6.1"])
def test_other_kernels_place_them(host: str) -> None:
    assert {"kill", "kill_ret"} <= {p.name for p in plan("killsnoop", host).probes}


def test_the_facts_decide_not_the_arch_name() -> None:
    """A MIPS64 kernel built without n32 traces n64 callers: nothing is skipped there."""
    f = facts("lab-mips64el-6.1")
    assert n64_blind(f, "syscalls/sys_enter_kill")
    no_n32 = dataclasses.replace(f, symbols={**f.symbols, N32_MARKER: SymbolFacts(N32_MARKER, False, False, False)})
    assert n64_blind(no_n32, "syscalls/sys_enter_kill") is None
    assert n64_blind(f, "syscalls/sys_enter_statfs") is None
    assert n64_blind(f, "sched/sched_process_exec") is None


def test_playbooks_with_syscall_events_ask_for_the_marker() -> None:
    assert N32_MARKER in load_playbook(ROOT / "playbooks" / "killsnoop.yml").kernel_symbols()
    assert N32_MARKER not in load_playbook(ROOT / "playbooks" / "execsnoop.yml").kernel_symbols()
    assert {"kill", "setuid", "sync", "fsync"} <= N32_SHARED and "statfs" not in N32_SHARED
