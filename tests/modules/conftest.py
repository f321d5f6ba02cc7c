"""Fixtures for real module builds: the lab's Debian kernels, a shared package cache, a loopback sshd."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetprobe.kmod import debian
from fleetprobe.kmod.cache import default_cache_dir
from fleetprobe.lab.arches import ARCHES


def shared_cache() -> Path:
    """Where downloaded .debs and unpacked kernel trees persist between test runs.

    ``FLEETPROBE_TEST_CACHE`` if set, else the user's fleetprobe cache: these
    are large, network-fetched and keyed by exact version, so reusing them is
    safe and keeps reruns offline.  (test_build_real.py computes the same path.)
    """
    env = os.environ.get("FLEETPROBE_TEST_CACHE")
    return Path(env) if env else default_cache_dir()


@dataclass(frozen=True)
class LabKernel:
    """One lab arch's current Debian kernel: release, package version, uname -m."""

    lab_arch: str
    debian_arch: str
    uname_m: str
    release: str
    package_version: str


@pytest.fixture(scope="session")
def lab_kernels() -> dict[str, LabKernel]:
    """The kernels the lab boots, resolved from the Debian archive the way the lab does."""
    out = {}
    for name, arch in ARCHES.items():
        try:
            image, release = debian.kernel_for_metapackage(arch.kernel_meta, arch.debian_arch,
                                                           shared_cache() / "debian")
        except debian.DebianError as exc:
            pytest.skip(f"cannot resolve the lab kernels from the Debian archive: {exc}")
        out[name] = LabKernel(name, arch.debian_arch, arch.uname_m, release, image.version)
    return out


def _free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class LoopbackSshd:
    """A real OpenSSH sshd on 127.0.0.1 with keys made for this test only."""

    port: int
    client_key: Path
    known_hosts: Path


@pytest.fixture
def loopback_sshd(tmp_path: Path) -> Iterator[LoopbackSshd]:
    """Start sshd on a free loopback port (root login with a fresh key); stop it afterwards."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if os.geteuid() != 0 or not os.path.exists(sshd):
        pytest.skip("needs root and openssh-server")
    d = tmp_path / "sshd"
    d.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = _free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} " + (d / "host.pub").read_text())
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", f"PidFile {d / 'sshd.pid'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "UsePAM no",
        "StrictModes no", "Subsystem sftp internal-sftp", "LogLevel ERROR", ""]))
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation dir (normally made by the init script)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    if s.recv(8).startswith(b"SSH-2.0"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"sshd did not start on 127.0.0.1:{port}: {err}")
            time.sleep(0.05)
        yield LoopbackSshd(port, d / "client", d / "known_hosts")
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
