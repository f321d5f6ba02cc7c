"""Real SSH hosts for tests: OpenSSH sshd on loopback or inside network namespaces the test creates.

Keys are generated per test session; nothing reads the developer's ~/.ssh
(conftest points HOME at a temporary directory).  Every process, namespace
and veth started here is removed by :meth:`Fleet.stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import yaml

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

#: The first two octets of the namespaces' veth addresses (SUBNET.<index>.1/30 outside, .2 inside).
#: Two test runs live on one machine at once (two checkouts, two users) set different values, so
#: their root-namespace veth addresses never collide.
SUBNET = os.environ.get("FLEETPROBE_TEST_SUBNET", "10.231")


def make_key(path: Path) -> str:
    """Write an ed25519 private key (OpenSSH format) and its .pub; return the public key line."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    pub = key.export_public_key().decode().strip()
    Path(str(path) + ".pub").write_text(pub + "\n")
    os.chmod(path, 0o600)
    return pub


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_banner(address: str, port: int, timeout: float = 15.0) -> None:
    """Wait until an SSH server answers with its SSH-2.0 banner (an open port alone proves nothing).

    A namespace's address is reached from here over its veth, like any other host.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no SSH banner from {address}:{port} within {timeout}s")


@dataclass
class SshdHost:
    """One sshd: where it listens, its host key, its process."""

    name: str
    address: str
    port: int
    host_key_pub: str
    proc: subprocess.Popen[bytes]
    netns: str | None = None
    workdir: Path = Path(".")

    def known_hosts_line(self) -> str:
        """This host's line for a known_hosts file."""
        where = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{where} {self.host_key_pub}\n"


@dataclass
class Fleet:
    """A set of real sshd hosts plus the client key and known_hosts that reach them."""

    workdir: Path
    client_key: Path
    hosts: list[SshdHost] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    veths: list[str] = field(default_factory=list)

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    def write_known_hosts(self) -> Path:
        """known_hosts naming every host's key."""
        self.known_hosts.write_text("".join(h.known_hosts_line() for h in self.hosts))
        return self.known_hosts

    def inventory(self, name: str = "inventory.yml", extra_vars: dict[str, object] | None = None) -> Path:
        """An Ansible-layout inventory for the fleet."""
        hosts = {h.name: {"ansible_host": h.address, "ansible_port": h.port} for h in self.hosts}
        data = {"all": {"vars": {"ansible_user": "root",
                                 "ansible_ssh_private_key_file": str(self.client_key),
                                 "fleetprobe_known_hosts": str(self.write_known_hosts()),
                                 **(extra_vars or {})},
                        "children": {"testfleet": {"hosts": hosts}}}}
        path = self.workdir / name
        path.write_text(yaml.safe_dump(data))
        return path

    def ssh_args(self) -> list[str]:
        """Common ssh client arguments (strict, our key only, no user config)."""
        return ["-F", "/dev/null", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.write_known_hosts()}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes"]

    def start_sshd(self, name: str, address: str, port: int, netns: str | None = None,
                   extra_config: str = "", mount_tracefs: bool = False,
                   keys_dir: Path | None = None) -> SshdHost:
        """Start one OpenSSH sshd (in netns when given) accepting the client key for root."""
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        hostkey = d / "ssh_host_ed25519_key"
        pub = make_key(hostkey)
        # sshd reads AuthorizedKeysFile as the logging-in user: a non-root login needs keys_dir,
        # a directory that user can reach (the test's own temp dirs are 0700 root).
        auth = (keys_dir or d) / "authorized_keys"
        auth.write_text(Path(str(self.client_key) + ".pub").read_text())
        os.chmod(auth, 0o644 if keys_dir else 0o600)
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Port {port}\nListenAddress {address}\nHostKey {hostkey}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {auth}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel ERROR\n"
            "MaxSessions 100\nMaxStartups 1000\nUseDNS no\nPrintMotd no\nAcceptEnv LANG\n"
            f"{extra_config}")
        Path("/run/sshd").mkdir(exist_ok=True)
        cmd = [SSHD, "-D", "-e", "-f", str(cfg)]
        if mount_tracefs:
            cmd = ["sh", "-c", 'mount -t tracefs nodev /sys/kernel/tracing && exec "$@"', "sshd", *cmd]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        log = open(d / "sshd.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        host = SshdHost(name, address, port, pub, proc, netns, d)
        self.hosts.append(host)
        wait_banner(address, port)
        return host

    def add_netns_host(self, name: str, index: int, *, tracefs: bool = True,
                       keys_dir: Path | None = None) -> SshdHost:
        """A host in its own network namespace, reached over a veth pair at SUBNET.<index>.2.

        ``ip netns exec`` gives the host a fresh /sys without tracefs, like a
        host that never mounted it; ``tracefs=True`` mounts it there, as a
        real host would have it.
        """
        # The whole pid: names stay unique among test runs live on this machine (interface names
        # are at most 15 characters: "fpo" + 7 + 2 digits fits).
        tag = f"{os.getpid()}x{index}"
        ns = f"fpt{tag}"
        outer, inner = f"fpo{tag}", f"fpi{tag}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        subprocess.run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner], check=True)
        self.veths.append(outer)
        subprocess.run(["ip", "link", "set", inner, "netns", ns], check=True)
        subprocess.run(["ip", "addr", "add", f"{SUBNET}.{index}.1/30", "dev", outer], check=True)
        subprocess.run(["ip", "link", "set", outer, "up"], check=True)
        for c in ([ "ip", "addr", "add", f"{SUBNET}.{index}.2/30", "dev", inner],
                  ["ip", "link", "set", inner, "up"], ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *c], check=True)
        return self.start_sshd(name, f"{SUBNET}.{index}.2", 22, netns=ns, mount_tracefs=tracefs, keys_dir=keys_dir)

    def stop(self) -> None:
        """Stop every sshd (and its sessions) and remove every namespace and veth."""
        for h in self.hosts:
            try:
                os.killpg(h.proc.pid, 15)
            except ProcessLookupError:
                pass
        for h in self.hosts:
            try:
                h.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(h.proc.pid, 9)
                h.proc.wait(5)
        for ns in self.namespaces:
            # sessions started by sshd inside the namespace (runners) die with it
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for v in self.veths:
            subprocess.run(["ip", "link", "del", v], capture_output=True)
        self.hosts.clear()
        self.namespaces.clear()
        self.veths.clear()


def new_fleet(workdir: Path) -> Fleet:
    """An empty fleet with a fresh client key."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = workdir / "id_ed25519"
    make_key(key)
    return Fleet(workdir, key)
