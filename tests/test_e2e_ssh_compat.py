"""Both transports against real OpenSSH sshd: ssh_config, known_hosts, proxies and the agent as ssh has them.

Each test also asks the OpenSSH client about the same files, so "as ssh does" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from fleetprobe.render.safe import SafeConsole
from fleetprobe.connectors import fabric as fp_fabric
from fleetprobe.connectors import asyncssh as transport
from fleetprobe.errors import TransportError
from fleetprobe.inventory import Host
from fleetprobe.session import Session, SSHOptions

from sshhosts import SUBNET, Fleet, SshdHost, free_port, new_fleet
from test_e2e_jump_become import jump_fleet  # noqa: F401  (the bastion + unreachable inner host fixture)

pytestmark = [pytest.mark.sshd, pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ssh"),
                                                   reason="needs root, sshd and ssh")]

Connect = Callable[[Host, SSHOptions], Awaitable[Session]]
TRANSPORTS: dict[str, Connect] = {"asyncssh": transport.connect, "fabric": fp_fabric.connect}


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[Fleet, SshdHost]]:
    fl = new_fleet(tmp_path / "fleet")
    try:
        h = fl.start_sshd("web", "127.0.0.1", free_port())
        yield fl, h
    finally:
        fl.stop()


async def _run(connect: Connect, host: Host, options: SSHOptions, cmd: str = "echo ok") -> str:
    s = await connect(host, options)
    try:
        res = await s.run(cmd)
        assert res.ok, res.stderr_text()
        return res.stdout.decode()
    finally:
        await s.close()


def run(connect: Connect, host: Host, options: SSHOptions, cmd: str = "echo ok") -> str:
    return asyncio.run(_run(connect, host, options, cmd))


def fail(connect: Connect, host: Host, options: SSHOptions) -> TransportError:
    with pytest.raises(TransportError) as ei:
        run(connect, host, options)
    return ei.value


def plain_ssh(cfg: Path, name: str, *args: str, cmd: str = "true") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-F", str(cfg), "-o", "BatchMode=yes", *args, name, cmd], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=30)


@pytest.mark.parametrize("how", ["accept-new", "no", "--accept-new-host-keys"])
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_accept_new_writes_what_ssh_accepts(sshd: tuple[Fleet, SshdHost], tmp_path: Path, kind: str,
                                            how: str) -> None:
    """HostName/Port from an Included config, a per-host UserKnownHostsFile that does not exist yet,
    HashKnownHosts: the key is recorded hashed as [127.0.0.1]:PORT in that file; ssh and the next run accept it.
    First-seen keys are allowed by StrictHostKeyChecking accept-new or no in the config, or by the flag
    (then with the config in ~/.ssh/config, where ssh looks by default)."""
    fl, h = sshd
    connect = TRANSPORTS[kind]
    kh = tmp_path / "kh" / f"port{h.port}_known"
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "web.conf").write_text(
        f"Host web1\n  HostName 127.0.0.1\n  Port {h.port}\n  User root\n  IdentityFile {fl.client_key}\n"
        f"  UserKnownHostsFile {tmp_path}/kh/port%p_known\n  HashKnownHosts yes\n")
    strict = tmp_path / "strict.conf"
    strict.write_text(f"Include {tmp_path}/conf.d/*.conf\nHost *\n  StrictHostKeyChecking yes\n")
    accept = tmp_path / "accept.conf"
    accept.write_text(f"Include {tmp_path}/conf.d/*.conf\nHost *\n  StrictHostKeyChecking {how}\n")
    user_config = Path("~/.ssh/config").expanduser()
    if how == "--accept-new-host-keys":
        user_config.parent.mkdir(exist_ok=True)
        user_config.write_text(strict.read_text())
        first = SSHOptions(use_agent=False, accept_new_host_keys=True)
    else:
        first = SSHOptions(ssh_config=(str(accept),), use_agent=False)
    web1 = Host(name="web1", address="web1")
    try:
        # strict, and the file does not exist yet: "not verified", naming the file (not "No such file")
        e = fail(connect, web1, SSHOptions(ssh_config=(str(strict),), use_agent=False))
        assert "host key not verified" in e.message and str(kh) in e.message and "No such file" not in str(e)
        assert str(e).count("web1") == 1, str(e)
        assert not kh.exists()
        assert run(connect, web1, first) == "ok\n"
    finally:
        user_config.unlink(missing_ok=True)
    lines = kh.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("|1|") and h.host_key_pub.split()[1] in lines[0]
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{h.port}", "-f", str(kh)], capture_output=True)
    assert found.returncode == 0
    # plain ssh accepts the recorded key with strict checking, and so does the next fleetprobe run
    res = plain_ssh(strict, "web1")
    assert res.returncode == 0, res.stderr
    assert run(connect, web1, SSHOptions(ssh_config=(str(strict),), use_agent=False)) == "ok\n"
    assert len(kh.read_text().splitlines()) == 1


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_userknownhostsfile_none_trusts_nothing(sshd: tuple[Fleet, SshdHost], tmp_path: Path, kind: str) -> None:
    """UserKnownHostsFile none: no key is trusted, whatever accept-new says (issue 11: asyncssh trusted all)."""
    fl, h = sshd
    cfg = tmp_path / "none.conf"
    cfg.write_text(f"Host web1\n  HostName 127.0.0.1\n  Port {h.port}\n  User root\n  IdentityFile {fl.client_key}\n"
                   "  UserKnownHostsFile none\n  GlobalKnownHostsFile none\n  StrictHostKeyChecking accept-new\n")
    web1 = Host(name="web1", address="web1")
    for accept in (False, True):
        e = fail(TRANSPORTS[kind], web1, SSHOptions(ssh_config=(str(cfg),), use_agent=False,
                                                    accept_new_host_keys=accept))
        assert "host key not verified" in e.message and "none" in e.message
    assert plain_ssh(cfg, "web1", "-o", "StrictHostKeyChecking=yes").returncode != 0


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_proxycommand_is_used_and_never_bypassed(sshd: tuple[Fleet, SshdHost], tmp_path: Path, kind: str) -> None:
    """ansible_ssh_common_args ProxyCommand: the connection goes through it (the host's address is a name
    that cannot resolve), run by the shell as ssh runs it."""
    fl, h = sshd
    kh = fl.write_known_hosts()
    target_kh = tmp_path / "target_kh"
    target_kh.write_text(f"direct.invalid {h.host_key_pub}\n")
    mark = tmp_path / "proxy-ran"
    # ssh runs "exec COMMAND" in sh: a command with ; needs its own sh -c, as it would for ssh
    proxy = (f"sh -c 'touch {mark}; exec ssh -F /dev/null -i {fl.client_key} -o UserKnownHostsFile={kh} "
             f"-o StrictHostKeyChecking=yes -o BatchMode=yes -p {h.port} -W 127.0.0.1:{h.port} root@127.0.0.1' "
             "2>/dev/null")
    host = Host(name="inner", address="direct.invalid", user="root", key_file=str(fl.client_key),
                ssh_args=("-o", f"ProxyCommand={proxy}", "-o", f"UserKnownHostsFile={target_kh}"))
    assert run(TRANSPORTS[kind], host, SSHOptions(ssh_config=(), use_agent=False)) == "ok\n"
    assert mark.exists()
    # "direct.invalid" cannot resolve (RFC 6761), so only the proxy can have carried the session; the test
    # never tries the direct path itself: that would send a DNS query off this machine.


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway ssh-agent (this test's own) holding a key, as SSH_AUTH_SOCK."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_agent_is_never_forwarded(sshd: tuple[Fleet, SshdHost], agent: Path, tmp_path: Path, kind: str) -> None:
    """ForwardAgent yes in ssh_config: ssh forwards the agent to this sshd, fleetprobe never does (issue 11)."""
    fl, h = sshd
    kh = fl.write_known_hosts()
    cfg = tmp_path / "fwd.conf"
    cfg.write_text(f"Host web1\n  HostName 127.0.0.1\n  Port {h.port}\n  User root\n  IdentityFile {fl.client_key}\n"
                   f"  UserKnownHostsFile {kh}\n  ForwardAgent yes\n")
    probe = 'printf %s "${SSH_AUTH_SOCK:-none}"'
    control = plain_ssh(cfg, "web1", cmd=probe)
    assert control.returncode == 0 and control.stdout not in ("", "none"), control  # ssh does forward here
    out = run(TRANSPORTS[kind], Host(name="web1", address="web1"), SSHOptions(ssh_config=(str(cfg),)), probe)
    assert out == "none"


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_system_ssh_config_and_its_includes_are_read(sshd: tuple[Fleet, SshdHost], tmp_path: Path, kind: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The system ssh_config (here a test directory standing for /etc/ssh) and ssh_config.d/*.conf."""
    fl, h = sshd
    etc = tmp_path / "etc-ssh"
    (etc / "ssh_config.d").mkdir(parents=True)
    (etc / "ssh_config").write_text("Include ssh_config.d/*.conf\n")
    (etc / "ssh_config.d" / "fleet.conf").write_text(
        f"Host sysweb\n  HostName 127.0.0.1\n  Port {h.port}\n  User root\n  IdentityFile {fl.client_key}\n")
    (etc / "ssh_known_hosts").write_text(h.known_hosts_line())
    monkeypatch.setenv("FLEETPROBE_SSH_ETC", str(etc))
    assert run(TRANSPORTS[kind], Host(name="sysweb", address="sysweb"), SSHOptions(use_agent=False)) == "ok\n"


def test_errors_name_the_host_once(tmp_path: Path) -> None:
    """A refused port: the host's name once, what was tried, the hint."""
    port = free_port()
    for host in (Host(name="127.0.0.1", address="127.0.0.1", port=port, user="root"),
                 Host(name="db2", address="127.0.0.1", port=port, user="root")):
        e = fail(transport.connect, host, SSHOptions(ssh_config=(), use_agent=False, retries=0))
        assert str(e).count(host.name) == 1, str(e)
        assert str(port) in str(e) and "connection refused" in str(e)


def test_a_refused_port_retried_past_the_budget_says_refused_not_timed_out() -> None:
    """Retries of a refused connection that outlast --connect-timeout: the host's answer, not "timed out"
    (whose hint, a longer --connect-timeout, would not help)."""
    port = free_port()
    e = fail(transport.connect, Host(name="db3", address="127.0.0.1", port=port, user="root"),
             SSHOptions(ssh_config=(), use_agent=False, retries=1000, connect_timeout=0.6))
    assert "connection refused" in str(e) and "within --connect-timeout 0.6s" in str(e), str(e)
    assert "timed out" not in str(e) and "sshd running" in (e.hint or ""), (str(e), e.hint)


@pytest.mark.netns
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_proxyjump_from_ssh_args_reaches_a_host_only_the_bastion_can(jump_fleet: tuple[Fleet, str],  # noqa: F811
                                                                    kind: str) -> None:
    """-o ProxyJump in ansible_ssh_common_args, both transports: the inner host has no route from here,
    so reaching it proves the jump was taken (and a host in a network namespace of its own, not this one)."""
    fl, _ = jump_fleet
    kh = fl.write_known_hosts()
    host = Host(name="inner", address="10.232.0.2", user="root", key_file=str(fl.client_key), known_hosts=str(kh),
                ssh_args=("-o", f"ProxyJump=root@{SUBNET}.31.2"))
    out = run(TRANSPORTS[kind], host, SSHOptions(ssh_config=(), use_agent=False), "cat /proc/sys/kernel/hostname; "
              "ip -o addr show | grep -c 10.232.0.2")
    assert out.splitlines()[-1] == "1", out   # the command ran where 10.232.0.2 lives
    # and not over a route of this namespace (never tried directly: that would leave the machine)
    direct = subprocess.run(["ip", "route", "get", "10.232.0.2"], capture_output=True, text=True)
    assert f"{SUBNET}.31." not in direct.stdout


def test_facts_through_an_ini_inventory_with_group_and_host_vars(sshd: tuple[Fleet, SshdHost], tmp_path: Path) -> None:
    """As a new user would: ``fleetprobe facts -i hosts`` where the address, port, user and key come only
    from group_vars/ and host_vars/ beside an INI file (ignored, the host would go to web1:22)."""
    import json


    from fleetprobe.cli.main import main

    fl, h = sshd
    inv = tmp_path / "inv"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "host_vars").mkdir()
    (inv / "hosts").write_text("[web]\nweb1\n")
    (inv / "group_vars" / "web.yml").write_text(f"ansible_user: root\nansible_ssh_private_key_file: {fl.client_key}\n"
                                                f"fleetprobe_known_hosts: {fl.write_known_hosts()}\n")
    (inv / "host_vars" / "web1").write_text(f"ansible_host: 127.0.0.1\nansible_port: {h.port}\n")
    console = SafeConsole(record=True, width=200)
    out = tmp_path / "facts.json"
    rc = main(["facts", "-i", str(inv / "hosts"), "--ssh-config", "none", "--no-agent", "--json", str(out)], console)
    assert rc == 0, console.export_text()
    facts = json.loads(out.read_text())
    assert [f["host"] for f in facts] == ["web1"] and facts[0]["facts"]["arch"] == os.uname().machine
