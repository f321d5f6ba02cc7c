"""Every lab VM boots its Debian kernel, accepts a strict-host-key SSH login and can take a kprobe."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh
import pytest

from fleetprobe import lab
from fleetprobe.lab import vm as lab_vm

if TYPE_CHECKING:  # the fixture's type; conftest is not importable as a module
    from conftest import LabForTests

pytestmark = pytest.mark.lab

EXPECTED_UNAME = {"x86_64": "x86_64", "ppc64le": "ppc64le", "mips64el": "mips64", "mipsel": "mips",
                  "arm64": "aarch64"}

# Append (>>) and delete only our own event: never truncate kprobe_events.
KPROBE_SCRIPT = r"""
set -e
grep -q ' /sys/kernel/tracing tracefs ' /proc/mounts && echo TRACEFS_MOUNTED
test -e /sys/kernel/tracing/kprobe_events && echo KPROBE_EVENTS_EXISTS
echo 'p:fplabtest/t do_sys_openat2' >> /sys/kernel/tracing/kprobe_events
echo "ADDED: $(grep fplabtest /sys/kernel/tracing/kprobe_events)"
test -d /sys/kernel/tracing/events/fplabtest/t && echo EVENT_DIR
echo '-:fplabtest/t' >> /sys/kernel/tracing/kprobe_events
echo "AFTER: $(grep -c fplabtest /sys/kernel/tracing/kprobe_events || true)"
"""


async def _run(vm: lab.LabVM, fleet: LabForTests, command: str) -> asyncssh.SSHCompletedProcess:
    """Run one command on a lab VM over SSH, strict host key checking against the lab's known_hosts."""
    async with asyncssh.connect("127.0.0.1", vm.port, username="root",
                                client_keys=[str(fleet.key)], known_hosts=str(fleet.known_hosts),
                                config=[], agent_path=None, connect_timeout=60,
                                login_timeout=60) as conn:
        return await conn.run(command, check=False)


def test_fleet_is_the_default(lab_fleet: LabForTests) -> None:
    """`up` with no arguments gives 3 x86_64 + 1 ppc64le + 1 mips64el + 1 arm64 VMs on 6.1, on distinct ports."""
    if os.environ.get("FLEETPROBE_LAB_FLEET"):
        pytest.skip("FLEETPROBE_LAB_FLEET chose another fleet")
    arches = sorted(v.arch for v in lab_fleet.vms)
    assert arches == ["arm64", "mips64el", "ppc64le", "x86_64", "x86_64", "x86_64"]
    assert {v.line for v in lab_fleet.vms} == {"6.1"}
    assert all(v.name.startswith(f"lab-{v.arch}-6.1-") for v in lab_fleet.vms)
    assert len({v.port for v in lab_fleet.vms}) == len(lab_fleet.vms)
    print(f"\nlab up took {lab_fleet.up_seconds:.1f} s; boot times: "
          + ", ".join(f"{v.name}={v.boot_seconds}" for v in lab_fleet.vms))


def test_every_vm_runs_its_kernel_and_takes_a_kprobe(lab_fleet: LabForTests) -> None:
    """uname -m/-r match lab.json, tracefs is mounted, and a kprobe can be added and removed by hand."""
    async def check_all() -> list[tuple[lab.LabVM, asyncssh.SSHCompletedProcess]]:
        results = await asyncio.gather(*[_run(v, lab_fleet, "uname -m; uname -r\n" + KPROBE_SCRIPT)
                                         for v in lab_fleet.vms])
        return list(zip(lab_fleet.vms, results))

    for vm, result in asyncio.run(check_all()):
        out = str(result.stdout).splitlines()
        assert result.exit_status == 0, f"{vm.name}: {result.stderr}"
        assert out[0] == EXPECTED_UNAME[vm.arch], vm.name
        assert out[1] == vm.kernel_release, vm.name
        assert vm.kernel_release in vm.kernel_package, vm.name
        assert vm.kernel_version.startswith(vm.line + "."), (vm.name, vm.kernel_version)
        assert "TRACEFS_MOUNTED" in out and "KPROBE_EVENTS_EXISTS" in out, f"{vm.name}: {out}"
        assert "ADDED: p:fplabtest/t do_sys_openat2" in out, f"{vm.name}: {out}"
        assert "EVENT_DIR" in out, f"{vm.name}: {out}"
        assert "AFTER: 0" in out, f"{vm.name}: {out}"


def test_sftp_and_module_prerequisites(lab_fleet: LabForTests, tmp_path: Path) -> None:
    """Files go over SFTP (what scp uses) and insmod, rmmod, /dev/kmsg and /lib/modules/$(uname -r) exist."""
    payload = os.urandom(4096)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)

    async def one(vm: lab.LabVM) -> str:
        async with asyncssh.connect("127.0.0.1", vm.port, username="root",
                                    client_keys=[str(lab_fleet.key)],
                                    known_hosts=str(lab_fleet.known_hosts), config=[],
                                    agent_path=None, connect_timeout=60, login_timeout=60) as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(src), "/tmp/payload.bin")
            result = await conn.run(
                "md5sum /tmp/payload.bin; for c in insmod rmmod setsid; do command -v $c; done; test -c /dev/kmsg && echo KMSG; "
                "test -d /lib/modules/$(uname -r) && echo MODDIR", check=True)
            return str(result.stdout)

    want = hashlib.md5(payload).hexdigest()
    async def all_vms() -> list[str]:
        return list(await asyncio.wait_for(asyncio.gather(*[one(v) for v in lab_fleet.vms]), 300))

    outs = asyncio.run(all_vms())
    for vm, out in zip(lab_fleet.vms, outs):
        assert out.startswith(want), f"{vm.name}: {out}"
        assert "insmod" in out and "rmmod" in out and "setsid" in out, f"{vm.name}: {out}"
        assert "KMSG" in out and "MODDIR" in out, f"{vm.name}: {out}"


def test_wrong_host_key_is_refused(lab_fleet: LabForTests, tmp_path: Path) -> None:
    """Strict host key checking is real: another VM's key for this port fails the login."""
    a, b = lab_fleet.vms[0], lab_fleet.vms[1]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{a.port} {b.host_key_public}\n")

    async def attempt() -> None:
        async with asyncssh.connect("127.0.0.1", a.port, username="root",
                                    client_keys=[str(lab_fleet.key)], known_hosts=str(wrong),
                                    config=[], agent_path=None, connect_timeout=60):
            pass

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(attempt())


def _qemu_pids_for(lab_dir: Path) -> list[int]:
    """Live qemu processes whose command line names a file under ``lab_dir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X"):
            continue
        if argv and b"qemu-system-" in argv[0] and any(str(lab_dir).encode() in a for a in argv):
            pids.append(int(proc.name))
    return pids


def test_down_after_controller_crash_stops_only_our_qemu(lab_fleet: LabForTests, tmp_path: Path) -> None:
    """A `lab up` killed mid-boot leaves qemu running; `lab down` from a new process stops it,
    and a pid file pointing at an unrelated process is never acted on."""
    lab_dir = tmp_path / "crashlab"
    code = ("import sys; from pathlib import Path; from fleetprobe import lab; "
            "lab.up(['x86_64'], None, Path(sys.argv[1]), 300, Path(sys.argv[2]))")
    controller = subprocess.Popen([sys.executable, "-c", code, str(lab_dir), str(lab_fleet.lab_dir)],
                                  start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        pidfile = lab_dir / "vms" / "lab-x86_64-6.1-1" / "qemu.pid"
        deadline = time.monotonic() + 120
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pidfile.exists(), "the controller never started qemu"
        os.kill(controller.pid, signal.SIGKILL)
        controller.wait()
        # qemu -daemonize: the foreground parent exits once the daemon is set
        # up, shortly after the pid file appears; then exactly one is left.
        deadline = time.monotonic() + 30
        while len(_qemu_pids_for(lab_dir)) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        qemu = _qemu_pids_for(lab_dir)
        assert len(qemu) == 1, qemu
        assert qemu[0] == int(pidfile.read_text()), (qemu, pidfile.read_text())

        # A stale record whose pid is now some other process must be left alone.
        decoy = lab_dir / "vms" / "lab-decoy-1"
        decoy.mkdir(parents=True)
        (decoy / "qemu.pid").write_text(f"{bystander.pid}\n")

        stopped = lab.down(lab_dir)
        assert stopped == ["lab-x86_64-6.1-1"]
        assert _qemu_pids_for(lab_dir) == []
        assert bystander.poll() is None, "lab down signalled a process that is not its qemu"
        assert not lab_vm.VMPaths(lab_dir / "vms" / "lab-x86_64-6.1-1").pidfile.exists()
    finally:
        bystander.kill()
        bystander.wait()
        if controller.poll() is None:
            os.kill(controller.pid, signal.SIGKILL)
            controller.wait()
        lab.down(lab_dir)
