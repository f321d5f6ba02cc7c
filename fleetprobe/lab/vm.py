"""Start, wait for and stop one lab VM (a daemonized qemu process under TCG)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetprobe.errors import FleetprobeError
from fleetprobe.lab.arches import LabArch


class VMError(FleetprobeError):
    """A lab VM failed to start, boot or stop; says which VM and where its console log is."""


@dataclass(frozen=True)
class VMPaths:
    """The files of one VM under ``<lab_dir>/vms/<name>/``."""

    root: Path

    @property
    def pidfile(self) -> Path:
        """qemu writes its pid here (-pidfile)."""
        return self.root / "qemu.pid"

    @property
    def serial_log(self) -> Path:
        """The guest console (ttyS0 / hvc0)."""
        return self.root / "serial.log"

    @property
    def initramfs(self) -> Path:
        """The shared image with this VM's overlay appended."""
        return self.root / "initramfs.cpio.gz"

    @property
    def host_key(self) -> Path:
        """This VM's ed25519 host key (OpenSSH format; the guest gets dropbear's)."""
        return self.root / "ssh_host_ed25519_key"


def require_qemu(arch: LabArch) -> str:
    """The qemu binary for ``arch``, or one clear error naming the Debian package to install."""
    path = shutil.which(arch.qemu_binary)
    if path is None:
        raise VMError(f"{arch.qemu_binary} not found: needed to boot {arch.name} lab VMs",
                      hint=f"apt-get install {arch.qemu_package}")
    if arch.extract_vmlinux and not Path("/usr/share/qemu/qboot.rom").exists():
        raise VMError("/usr/share/qemu/qboot.rom not found: x86_64 lab VMs boot with qboot",
                      hint="apt-get install qemu-system-data")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (qemu binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def qemu_command(arch: LabArch, binary: str, kernel: Path, initramfs: Path, paths: VMPaths,
                 port: int) -> list[str]:
    """The full qemu command line for one VM (daemonized, pid file, console to a file)."""
    return [
        binary, *arch.machine_args,
        "-m", str(arch.memory_mib), "-smp", "1",
        "-nodefaults", "-display", "none", "-vga", "none",
        "-kernel", str(kernel), "-initrd", str(paths.initramfs),
        "-append", f"console={arch.console} {arch.append}",
        "-serial", f"file:{paths.serial_log}",
        # hostfwd binds only loopback: the VM's root login is for this machine.
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        # A kernel panic (panic=-1 reboots) ends qemu instead of looping.
        "-no-reboot",
        "-pidfile", str(paths.pidfile), "-daemonize",
    ]


def start(arch: LabArch, kernel: Path, initramfs_parts: list[bytes], paths: VMPaths,
          name: str) -> tuple[int, int]:
    """Start the VM's qemu in the background; returns (pid, forwarded port).

    The port is picked free and bound by qemu a moment later; if another
    process takes it in between, qemu fails to set up the forwarding and we
    try another port.
    """
    binary = require_qemu(arch)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.initramfs.write_bytes(b"".join(initramfs_parts))
    last_error = ""
    for _attempt in range(5):
        port = free_port()
        paths.pidfile.unlink(missing_ok=True)
        paths.serial_log.unlink(missing_ok=True)
        cmd = qemu_command(arch, binary, kernel, paths.initramfs, paths, port)
        # -daemonize: qemu outlives `fleetprobe lab up`; the parent exits only
        # after setup, so setup errors (port in use) arrive here on stderr.
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, start_new_session=True)
        if proc.returncode == 0:
            pid = read_pid(paths)
            if pid is None:
                raise VMError(f"qemu started but wrote no pid file {paths.pidfile}", where=name)
            return pid, port
        last_error = proc.stderr.strip()
        if "hostfwd" not in last_error and "forwarding" not in last_error:
            break
    raise VMError(f"qemu failed to start: {last_error}", where=name,
                  hint=f"command: {' '.join(cmd)}")


def read_pid(paths: VMPaths) -> int | None:
    """The pid in the VM's pid file, or None if there is none."""
    try:
        return int(paths.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_our_qemu(pid: int, paths: VMPaths) -> bool:
    """True if ``pid`` is alive and is the qemu started for this VM (not a reused pid).

    The check reads /proc/PID/cmdline: a qemu-system-* whose -pidfile is this
    VM's pid file.  After a controller crash and a reboot of the machine the
    pid in the file may belong to anything; only our qemu is ever signalled.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if not argv or b"qemu-system-" not in Path(argv[0].decode(errors="replace")).name.encode():
        return False
    return str(paths.pidfile).encode() in argv


def running_pid(paths: VMPaths) -> int | None:
    """The pid of this VM's qemu if it is running, else None."""
    pid = read_pid(paths)
    if pid is not None and is_our_qemu(pid, paths):
        return pid
    return None


def stop(paths: VMPaths, timeout_s: float = 10.0) -> bool:
    """Stop this VM's qemu (SIGTERM, then SIGKILL); True if one was running."""
    pid = running_pid(paths)
    if pid is None:
        paths.pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_our_qemu(pid, paths):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        while is_our_qemu(pid, paths):
            time.sleep(0.05)
    paths.pidfile.unlink(missing_ok=True)
    return True


def serial_tail(paths: VMPaths, lines: int = 15) -> str:
    """The last lines of the VM's console, for error messages."""
    try:
        text = paths.serial_log.read_text(errors="replace")
    except FileNotFoundError:
        return "(no console output)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no console output)"


async def wait_banner(port: int, deadline: float, alive: Callable[[], bool] | None = None) -> None:
    """Wait until the SSH server in the guest sends its ``SSH-2.0-`` banner.

    qemu's user-mode forwarding accepts TCP connections as soon as qemu
    starts, long before the guest listens (LAB.md), so a connect alone proves
    nothing: slirp then closes the connection without a byte.
    """
    while True:
        if alive is not None and not alive():
            raise ConnectionError("qemu exited")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no SSH banner")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), timeout=min(5.0, remaining))
            try:
                data = await asyncio.wait_for(reader.read(64), timeout=min(5.0, remaining))
            finally:
                writer.close()
            if data.startswith(b"SSH-2.0-"):
                return
        except (TimeoutError, OSError):
            pass
        await asyncio.sleep(0.5)


async def login(port: int, key: Path, known_hosts: Path, timeout_s: float) -> tuple[str, str]:
    """One real root login with the lab key and strict host key checking; returns (uname -r, uname -m).

    Key exchange in a loaded emulated guest can take seconds (LAB.md), hence
    a generous timeout. Raises LoginRefused or LoginFailed (fleetprobe.errors).
    """
    # here, not at the top: `fleetprobe --help` imports this module, the connector loads asyncssh (issue 5)
    from fleetprobe.connectors.asyncssh import login_once

    stdout = await login_once(port, key, known_hosts, "uname -r; uname -m", timeout_s)
    out = stdout.split()
    if len(out) != 2:
        raise VMError(f"unexpected `uname -r; uname -m` output {stdout!r}")
    return out[0], out[1]
