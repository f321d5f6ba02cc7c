"""fp_kprobe and fp_kretprobe loaded into real Debian kernels (the qemu lab), read back through /dev/kmsg.

For each lab arch: cross-build on the controller, compare vermagic with the
guest's own modules, copy the .ko over real SSH, insmod with run/probe
parameters, fork, stream /dev/kmsg back and parse it with fleetprobe.kmsg,
check the per-arch registers, rmmod, and check /proc/modules is clean.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetprobe.kmod.cache import ModuleCache, default_cache_dir
from fleetprobe.kmod.compile import build_groups, read_host_vermagic
from fleetprobe.kmod.deploy import verify_on_host
from fleetprobe.kmod.ko import with_module_name
from fleetprobe.kmod.plan import plan_builds
from fleetprobe.kmod.source import load_module_source
from fleetprobe.facts import Facts
from fleetprobe.inventory import Host
from fleetprobe.kmsg import KmsgCollector
from fleetprobe.traceline import TraceEvent
from fleetprobe.connectors.asyncssh import AsyncsshSession, connect
from fleetprobe.session import SSHOptions

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent.parent
SHARED_CACHE = Path(os.environ.get("FLEETPROBE_TEST_CACHE") or default_cache_dir())
LAB_ARCHES = ["x86_64", "ppc64le", "mips64el", "mipsel", "arm64"]

# The registers each arch's line carries, and where that arch's kernel text lives
# (x86_64 and mips64 CKSEG0 at 0xffffffff8..., ppc64 at 0xc000..., mips32 KSEG0 at 0x8...,
# arm64 at 0xffff8...).
REGISTERS = {
    "x86_64": (("ip", "flags"), 0xffffffff80000000),
    "ppc64le": (("nip", "msr"), 0xc000000000000000),
    "mips64el": (("cp0_epc", "cp0_status"), 0xffffffff80000000),
    "mipsel": (("cp0_epc", "cp0_status"), 0x80000000),
    "arm64": (("pc", "pstate"), 0xffff800000000000),   # arm64 kernel VA space (48-bit, TTBR1)
}


@pytest.fixture(scope="module")
def lab_vms() -> Iterator[Any]:
    """One VM per lab arch; stops only the VMs this fixture started.

    Like tests/lab/conftest.py's lab_fleet (which tests outside tests/lab cannot
    see) it uses $FLEETPROBE_LAB_DIR when set, so both reuse one set of VMs;
    otherwise a persistent lab directory in the test cache, so images are
    built once.  mipsel is included for a 32-bit kernel.
    """
    from fleetprobe.lab import fleet

    env = os.environ.get("FLEETPROBE_LAB_DIR")
    lab_dir = Path(env).resolve() if env else SHARED_CACHE / "lab-modules"
    try:
        lab = fleet.up(LAB_ARCHES, lab_dir=lab_dir,
                       timeout_s=float(os.environ.get("FLEETPROBE_LAB_TIMEOUT", "300")))
    except Exception as exc:  # the lab's own error names the VM and shows its console
        pytest.fail(f"lab did not come up: {exc}")
    try:
        yield lab
    finally:
        fleet.down(lab_dir, names=lab.started)


def vm_for(lab: Any, arch: str) -> Any:
    """The lab VM of ``arch``."""
    return next(v for v in lab.vms if v.arch == arch)


def vm_facts(vm: Any) -> Facts:
    """Facts as the lab VM reports them (what the facts stage would gather)."""
    return Facts(host=vm.name, arch=vm.uname_m, kernel_release=vm.kernel_release,
                 kernel_version=f"#1 SMP Debian {vm.kernel_version}", endian="little",
                 elf_class=32 if vm.uname_m == "mips" else 64)


async def vm_session(lab: Any, vm: Any) -> AsyncsshSession:
    """A real SSH session to a lab VM with the lab's key and known_hosts."""
    host = Host(name=vm.name, address="127.0.0.1", port=vm.port, user="root",
                key_file=str(lab.key), known_hosts=str(lab.known_hosts))
    options = SSHOptions(known_hosts=(str(lab.known_hosts),), ssh_config=(), identities=(str(lab.key),),
                         connect_timeout=60)
    return await connect(host, options)


async def read_kmsg(stream: Any, collectors: list[KmsgCollector], probe: str,
                    seconds: float = 60) -> list[list[TraceEvent]]:
    """Feed /dev/kmsg to every collector until each has ``probe``'s final record (unregistered or failed).

    Ends quietly at ``seconds`` or end of stream: the caller says what was missing, with the
    kernel's log. Returns each collector's events.
    """
    def done(c: KmsgCollector) -> bool:
        st = c.status.get(probe)
        return bool(st and (st.unregistered or st.failed))

    events: list[list[TraceEvent]] = [[] for _ in collectors]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(map(done, collectors)):
        try:
            chunk = await asyncio.wait_for(stream.read(65536), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if not chunk:
            break
        for c, got in zip(collectors, events):
            got += c.feed(chunk)
    for c, got in zip(collectors, events):
        got += c.flush()
    return events


async def load_fork_unload(session: AsyncsshSession, ko: bytes, module: str, params: str,
                           collector: KmsgCollector, probe: str) -> tuple[list[TraceEvent], str, str]:
    """insmod, fork a few times, rmmod, while streaming /dev/kmsg; return (events, insmod output, /proc/modules)."""
    path = f"/tmp/{module}-{collector.run}.ko"
    await session.put(ko, path)
    stream = await session.stream("exec cat /dev/kmsg")
    events: list[TraceEvent] = []
    try:
        script = (f"insmod {shlex.quote(path)} {params} 2>&1 || echo insmod-failed; "
                  "for i in 1 2 3; do sh -c 'exit 0'; done; "
                  f"grep -q '^{module} ' /proc/modules && rmmod {module}; rm -f {shlex.quote(path)}")
        res = await session.run(script, timeout=120)
        insmod_out = res.stdout.decode(errors="replace")
        events += (await read_kmsg(stream, [collector], probe))[0]
    finally:
        stream.close()
        # Whatever happened above, leave no module and no file behind.
        await session.run(f"grep -q '^{module} ' /proc/modules && rmmod {module}; rm -f {shlex.quote(path)}; true",
                          timeout=60)
    modules = (await session.run("cat /proc/modules", timeout=60)).stdout.decode(errors="replace")
    return events, insmod_out, modules


async def explain_missing(session: AsyncsshSession, vm: Any, collector: KmsgCollector, probe: str,
                          oops_before: int) -> None:
    """The module's final status line never arrived: say why, from the kernel itself.

    On the lab's MIPS guests the known single-step fault (see README) can oops the
    kernel under the probe and kill the insmod/rmmod task; that is an expected
    failure (xfail, with the kernel's words). Anything else fails with the log.
    """
    st = collector.status.get(probe)
    if st and (st.unregistered or st.failed):
        return
    oopses = int((await session.run("cat /sys/kernel/oops_count", timeout=60)).stdout) - oops_before
    # The kernel's last oops/WARN and what follows it (at most 60 lines): the one in this window.
    last_oops = ("dmesg | awk '/Break instruction|Oops|BUG:|WARNING:/{b=\"\"} {b=b $0 \"\\n\"} "
                 "END{printf \"%s\", b}'")
    log = (await session.run(last_oops + " | head -n 60", timeout=60)).stdout.decode(errors="replace")
    loaded = (await session.run("cat /proc/modules", timeout=60)).stdout.decode(errors="replace")
    what = f"{vm.name}: no unregister/failure record from probe {probe!r} ({st}); oopses {oopses}"
    if str(vm.uname_m).startswith("mips") and oopses and "Break instruction in kernel code" in log:
        pytest.xfail(f"{what}: the known MIPS kprobe single-step fault; modules now:\n{loaded}\n{log}")
    pytest.fail(f"{what}\nmodules now:\n{loaded}\nkernel log:\n{log}")


async def build_for(vm: Any, tmp_path: Path) -> dict[str, Any]:
    """Cross-build both modules for the VM's kernel; return name -> BuiltModule."""
    mods = [load_module_source(ROOT / "modules" / n) for n in ("fp_kprobe", "fp_kretprobe")]
    results = await build_groups(plan_builds([vm_facts(vm)], mods), cache=ModuleCache(tmp_path / "m"),
                                 trees=SHARED_CACHE / "kernel-trees", debian_cache=SHARED_CACHE / "debian")
    for r in results:
        assert r.module is not None, f"{r.error}\n{r.error.evidence if r.error else ''}"
    return {r.group.key.module: r.module for r in results}


@pytest.mark.parametrize("arch", LAB_ARCHES)
def test_kprobe_module_on_lab_kernel(arch: str, lab_vms: Any, tmp_path: Path) -> None:
    vm = vm_for(lab_vms, arch)
    run = "t" + secrets.token_hex(3)
    fields, text_base = REGISTERS[arch]

    async def go() -> None:
        """Build, check vermagic against the guest, load, fork, parse, unload."""
        built = await build_for(vm, tmp_path)
        session = await vm_session(lab_vms, vm)
        try:
            oops_before = int((await session.run("cat /sys/kernel/oops_count", timeout=60)).stdout)
            host_vermagic = await read_host_vermagic(session, vm.kernel_release)
            assert host_vermagic, "the guest has its NIC modules under /lib/modules/<release>"
            for m in built.values():
                assert await verify_on_host(session, vm.name, m, vm.kernel_release) is None
                assert m.modinfo.vermagic.split() == host_vermagic.split()
                # The same module against a kernel the host does not run: refused, with evidence.
                err = await verify_on_host(session, vm.name, m, vm.kernel_release + "x")
                assert err is not None and err.host == vm.name and "does not match the running kernel" in str(err)

            # fp_kprobe: pre and post lines with this arch's registers.
            col = KmsgCollector(vm.name, run)
            events, out, modules = await load_fork_unload(
                session, built["fp_kprobe"].data(), "fp_kprobe",
                f"run={run} probe=fork symbol=kernel_clone rate=1000", col, "fork")
            await explain_missing(session, vm, col, "fork", oops_before)
            assert "insmod-failed" not in out, out
            st = col.status["fork"]
            assert st.planted_at.startswith("kernel_clone+"), st
            pre = [e for e in events if e.fields["ev"] == "pre"]
            post = [e for e in events if e.fields["ev"] == "post"]
            assert len(pre) >= 3 and len(post) >= 3, events
            assert st.unregistered and st.hits is not None and st.hits >= len(pre)
            assert st.suppressed == 0 and st.printed == len(pre) + len(post)
            for e in pre + post:
                assert e.host == vm.name and e.probe == "fork" and e.site == "kernel_clone+0x0"
                assert e.pid > 0 and e.comm and e.cpu >= 0 and e.trace_ts > 0
                assert set(fields) <= set(e.fields), e.fields
                pc = e.fields[fields[0]]
                assert isinstance(pc, int) and pc >= text_base, hex(pc) if isinstance(pc, int) else pc
            if arch == "x86_64":
                assert all(int(e.fields["flags"]) & 0x2 for e in pre)  # EFLAGS bit 1 always reads 1
            if arch == "ppc64le":
                assert all(int(e.fields["msr"]) >> 63 == 1 and int(e.fields["msr"]) & 1 for e in pre)  # SF, LE
            if arch == "arm64":
                assert all(int(e.fields["pstate"]) & 0xF == 0x5 for e in pre)  # PSTATE.M = EL1h: kernel mode
            assert col.stream.malformed == 0 and col.stream.duplicates == 0
            assert "fp_kprobe " not in modules

            # fp_kretprobe: return value (the child's pid) and latency.
            col = KmsgCollector(vm.name, run + "r")
            events, out, modules = await load_fork_unload(
                session, built["fp_kretprobe"].data(), "fp_kretprobe",
                f"run={run}r probe=forkret", col, "forkret")
            await explain_missing(session, vm, col, "forkret", oops_before)
            assert "insmod-failed" not in out, out
            rets = [e for e in events if e.fields["ev"] == "ret"]
            assert len(rets) >= 3
            for e in rets:
                retval, lat = e.fields["retval"], e.fields["lat_ns"]
                assert isinstance(retval, int) and 0 < retval < 4194304  # a new pid (pid_max limit)
                assert isinstance(lat, int) and 0 < lat < 10_000_000_000
            assert col.status["forkret"].unregistered and col.status["forkret"].missed == 0
            assert "fp_kretprobe " not in modules

            # A symbol that does not exist: insmod fails cleanly and the module says why.
            col = KmsgCollector(vm.name, run + "b")
            events, out, modules = await load_fork_unload(
                session, built["fp_kprobe"].data(), "fp_kprobe",
                f"run={run}b probe=bad symbol=fleetprobe_no_such_function", col, "bad")
            assert "insmod-failed" in out
            assert events == []
            assert col.status["bad"].failed == "sym=fleetprobe_no_such_function+0x0 err=-2"
            assert "fp_kprobe " not in modules
            left = await session.run("ls /tmp/*.ko 2>/dev/null; true", timeout=60)
            assert left.stdout == b""
            # No oops during this test. The taint bit (TAINT_DIE) is sticky for the VM's life, so count
            # oopses over this test's own window. On the lab's MIPS guests a kprobe intermittently oopses
            # the kernel at the single-step slot (qemu TCG + Debian 6.1; see README): reported, not hidden.
            oopses = int((await session.run("cat /sys/kernel/oops_count", timeout=60)).stdout) - oops_before
            if arch.startswith("mips") and oopses:
                warnings.warn(f"{vm.name}: the kernel oopsed {oopses} time(s) under the module's kprobe "
                              "(known MIPS single-step fault in the lab)", stacklevel=1)
            else:
                assert oopses == 0, f"the kernel oopsed {oopses} time(s): see dmesg on {vm.name}"
        finally:
            await session.close()

    asyncio.run(go())


@pytest.mark.parametrize("arch", LAB_ARCHES)
def test_one_module_loaded_twice_under_run_names(arch: str, lab_vms: Any, tmp_path: Path) -> None:
    """Two runs of the same module on one kernel at once (two operators): each under its own name.

    with_module_name renames the built .ko per load; both copies must load side by
    side, each with its own run parameter in /sys/module/<name>, both must see the
    calls, and each must unload by its own name. A quiet function (user_statfs),
    so the lab's MIPS single-step fault on hot functions stays out of the way.
    """
    vm = vm_for(lab_vms, arch)
    runs = ["t" + secrets.token_hex(3) for _ in range(2)]
    names = [f"fp_{r}_fork" for r in runs]

    async def go() -> None:
        """Load both copies, call statfs, unload both, read both runs' records."""
        built = await build_for(vm, tmp_path)
        ko = built["fp_kprobe"].data()
        session = await vm_session(lab_vms, vm)
        stream = await session.stream("exec cat /dev/kmsg")
        cols = [KmsgCollector(vm.name, r) for r in runs]
        try:
            for n, _r in zip(names, runs):
                await session.put(with_module_name(ko, n), f"/tmp/{n}.ko")
            script = "; ".join(
                [f"insmod /tmp/{n}.ko run={r} probe=statfs symbol=user_statfs 2>&1 || echo insmod-failed"
                 for n, r in zip(names, runs)]
                + [f"echo {n}=$(cat /sys/module/{n}/parameters/run)" for n in names]
                + ["for i in 1 2 3; do stat -f / >/dev/null; done"]
                + [f"rmmod {n} || echo rmmod-failed" for n in names])
            out = (await session.run(script, timeout=120)).stdout.decode(errors="replace")
            assert "insmod-failed" not in out and "rmmod-failed" not in out, out
            for n, r in zip(names, runs):
                assert f"{n}={r}" in out.split(), out  # each kernel module is its own run's
            await read_kmsg(stream, cols, "statfs")
        finally:
            stream.close()
            await session.run("; ".join(f"rmmod {n} 2>/dev/null; rm -f /tmp/{n}.ko" for n in names) + "; true",
                              timeout=60)
        try:
            for c in cols:
                st = c.status.get("statfs")
                assert st is not None and st.unregistered and st.planted_at.startswith("user_statfs+"), st
                assert st.hits is not None and st.hits >= 3, st
            left = (await session.run("cat /proc/modules; ls /tmp", timeout=60)).stdout.decode(errors="replace")
            assert not any(n in left for n in names), left
        finally:
            await session.close()

    asyncio.run(go())
