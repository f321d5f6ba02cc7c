"""ProxyJump and become, over real OpenSSH.

- A host that only a bastion can reach: namespace "inner" is wired to namespace
  "bastion" alone; the controller reaches it through ``ansible_ssh_common_args:
  -J root@bastion`` as an unchanged Ansible inventory would say.
- A non-root login with ``ansible_become: true``: the on-host part runs under
  ``sudo -n`` (a user the test creates with NOPASSWD sudo, removed afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fleetprobe.render.safe import SafeConsole

from fleetprobe.cli.main import main
from hostcheck import ensure_tracefs
from sshhosts import SUBNET, Fleet, new_fleet

pytestmark = [pytest.mark.sshd, pytest.mark.netns]

if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists():
    pytest.skip("needs root and OpenSSH sshd", allow_module_level=True)

PLAYBOOK = """\
name: execs
description: exec tracepoint
duration: 2s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
"""


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(cmd, check=True)


@pytest.fixture
def jump_fleet(tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    """bastion (reachable from here) and inner (reachable only from the bastion's namespace)."""
    if not ensure_tracefs():
        pytest.skip("needs tracefs")
    fl = new_fleet(tmp_path / "jump")
    tag = f"{os.getpid() % 10000}"
    inner_ns, a, b = f"fpj{tag}i", f"fpj{tag}a", f"fpj{tag}b"
    try:
        bastion = fl.add_netns_host("bastion", 31)
        subprocess.run(["ip", "netns", "add", inner_ns], check=True)
        fl.namespaces.append(inner_ns)
        assert bastion.netns
        # veth between the two namespaces only: nothing in the root namespace routes to 10.232.0.0/30
        _ip("link", "add", a, "netns", bastion.netns, "type", "veth", "peer", "name", b, "netns", inner_ns)
        _ip("addr", "add", "10.232.0.1/30", "dev", a, ns=bastion.netns)
        _ip("link", "set", a, "up", ns=bastion.netns)
        _ip("addr", "add", "10.232.0.2/30", "dev", b, ns=inner_ns)
        _ip("link", "set", b, "up", ns=inner_ns)
        _ip("link", "set", "lo", "up", ns=inner_ns)
        # started in its namespace; the banner check from here cannot reach it, so start by hand
        inner = _start_unreachable_sshd(fl, "inner", inner_ns)
        yield fl, inner
    finally:
        fl.stop()


def _start_unreachable_sshd(fl: Fleet, name: str, ns: str) -> str:
    """An sshd in ``ns`` at 10.232.0.2:22; returns its known_hosts line."""
    from sshhosts import SSHD, SshdHost, make_key

    d = fl.workdir / name
    d.mkdir(parents=True, exist_ok=True)
    hostkey = d / "ssh_host_ed25519_key"
    pub = make_key(hostkey)
    auth = d / "authorized_keys"
    auth.write_text(Path(str(fl.client_key) + ".pub").read_text())
    cfg = d / "sshd_config"
    cfg.write_text(f"Port 22\nListenAddress 10.232.0.2\nHostKey {hostkey}\nPidFile {d / 'sshd.pid'}\n"
                   f"AuthorizedKeysFile {auth}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                   "UsePAM no\nStrictModes no\nLogLevel ERROR\n")
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c",
                             'mount -t tracefs nodev /sys/kernel/tracing && exec "$@"', "sshd",
                             SSHD, "-D", "-e", "-f", str(cfg)],
                            stdout=open(d / "sshd.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    host = SshdHost(name, "10.232.0.2", 22, pub, proc, ns, d)
    fl.hosts.append(host)
    # sshd writes its pid file once it listens (nothing here can reach the address to read a banner)
    deadline = time.monotonic() + 15
    while not (d / "sshd.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return host.known_hosts_line()


def test_proxyjump_from_an_ansible_inventory(jump_fleet: tuple[Fleet, str], tmp_path: Path) -> None:
    fl, _inner_line = jump_fleet
    kh = fl.write_known_hosts()  # bastion and inner, as a real known_hosts would hold them
    pb = tmp_path / "pb.yml"
    pb.write_text(PLAYBOOK)
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump({"all": {
        "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(fl.client_key),
                 "fleetprobe_known_hosts": str(kh)},
        "hosts": {"inner": {"ansible_host": "10.232.0.2",
                            "ansible_ssh_common_args": f"-o ProxyJump=root@{SUBNET}.31.2"}}}}))
    # Without the jump the host is unreachable from here (no route): the test is not vacuous.
    direct = subprocess.run(["ip", "route", "get", "10.232.0.2"], capture_output=True, text=True)
    assert f"{SUBNET}.31." not in direct.stdout
    console = SafeConsole(record=True, width=200)
    rc = main(["run", str(pb), "-i", str(inv), "--no-live", "--ssh-config", "none", "--no-agent",
               "--json", str(tmp_path / "r.json")], console)
    assert rc == 0, console.export_text()
    h = json.loads((tmp_path / "r.json").read_text())["hosts"][0]
    assert h["host"] == "inner" and h["status"] == "ok" and h["cleanup"] == "clean", h


@pytest.fixture
def sudo_user() -> Iterator[str]:
    """A throwaway login user with NOPASSWD sudo; removed afterwards."""
    if not shutil.which("sudo") or not shutil.which("useradd"):
        pytest.skip("needs sudo and useradd")
    user = f"fpb{uuid.uuid4().hex[:6]}"
    # "*": no password, but not locked ("!"), which sshd without PAM refuses even for key logins
    subprocess.run(["useradd", "-M", "-p", "*", "-s", "/bin/sh", "-d", "/nonexistent", user], check=True)
    sudoers = Path(f"/etc/sudoers.d/{user}")
    sudoers.write_text(f"{user} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    try:
        yield user
    finally:
        sudoers.unlink(missing_ok=True)
        subprocess.run(["userdel", user], capture_output=True)


def test_become_runs_the_on_host_part_under_sudo(sudo_user: str, tmp_path: Path, busy: None) -> None:
    if not ensure_tracefs():
        pytest.skip("needs tracefs")
    fl = new_fleet(tmp_path / "become")
    keys = Path(tempfile.mkdtemp(prefix="fp-become-keys-"))
    keys.chmod(0o755)
    try:
        fl.add_netns_host("nonroot", 32, keys_dir=keys)
        pb = tmp_path / "pb.yml"
        pb.write_text(PLAYBOOK)
        inv = fl.inventory(extra_vars={"ansible_user": sudo_user, "ansible_become": True})
        console = SafeConsole(record=True, width=200)
        rc = main(["run", str(pb), "-i", str(inv), "--no-live", "--json", str(tmp_path / "r.json")], console)
        assert rc == 0, console.export_text()
        h = json.loads((tmp_path / "r.json").read_text())["hosts"][0]
        assert h["status"] == "ok" and h["cleanup"] == "clean" and h["events"] > 0, h
        # and without become the same user cannot touch tracefs: a clear failure, not a hang
        inv2 = fl.inventory("inv2.yml", extra_vars={"ansible_user": sudo_user})
        console = SafeConsole(record=True, width=200)
        rc = main(["run", str(pb), "-i", str(inv2), "--no-live", "--json", str(tmp_path / "r2.json")], console)
        h2 = json.loads((tmp_path / "r2.json").read_text())["hosts"][0]
        assert rc == 3 and h2["status"] in ("failed", "skipped"), h2
    finally:
        fl.stop()
        shutil.rmtree(keys, ignore_errors=True)
