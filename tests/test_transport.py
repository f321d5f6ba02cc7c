"""Transport: remote command quoting (checked by a real shell), and a Session over real SSH to sim hosts."""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simhosts import SimFleet, refused_port

from fleetprobe.errors import TransportError
from fleetprobe.inventory import Host
from fleetprobe.connectors.asyncssh import connect
from fleetprobe.session import SSHOptions, shell_command

NASTY = ["plain", "two words", "it's", 'say "hi"', "$HOME", "`id`", "$(id)", "back\\slash", "semi;colon",
         "glob*?[a]", "new\nline", "", "-n", "tab\there", "ünïcødé"]


def echo_args_script() -> str:
    """A script that prints each of its arguments framed, so quoting mistakes show."""
    return 'for a in "$@"; do printf "<%s>\\n" "$a"; done'


def test_shell_command_round_trips_every_argument() -> None:
    """What the host's shell receives is exactly the arguments given: no expansion, splitting or globbing."""
    host = Host(name="h", address="h")
    cmd = shell_command(host, echo_args_script(), *NASTY)
    assert cmd.startswith("exec sh -c ")
    out = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, check=True, env={"PATH": os.defpath,
                                                                                       "HOME": "/nonexistent"})
    assert out.stdout.decode() == "".join(f"<{a}>\n" for a in NASTY)


def test_shell_command_script_is_one_word() -> None:
    """The script itself, with quotes and $ in it, arrives as sh -c's one argument; $0 is 'fleetprobe'."""
    host = Host(name="h", address="h")
    script = "echo \"$0\" '$1' \"$1\""
    words = shlex.split(shell_command(host, script, "x y"))
    assert words == ["exec", "sh", "-c", script, "fleetprobe", "x y"]
    out = subprocess.run(["/bin/sh", "-c", shell_command(host, script, "x y")], capture_output=True, check=True)
    assert out.stdout == b"fleetprobe $1 x y\n"


def test_become_wraps_with_sudo_n() -> None:
    """A non-root login with become runs under sudo -n (never prompts) as become_user; root needs no sudo."""
    user = Host(name="h", address="h", user="deploy", become=True)
    words = shlex.split(shell_command(user, "id -u", "a b"))
    assert words == ["exec", "sudo", "-n", "-u", "root", "--", "sh", "-c", "id -u", "fleetprobe", "a b"]
    other = Host(name="h", address="h", user="deploy", become=True, become_user="tracer")
    assert shlex.split(shell_command(other, "true"))[1:6] == ["sudo", "-n", "-u", "tracer", "--"]
    root = Host(name="h", address="h", user="root", become=True)
    assert shlex.split(shell_command(root, "true"))[:3] == ["exec", "sh", "-c"]
    plain = Host(name="h", address="h", user="deploy")
    assert "sudo" not in shell_command(plain, "true")


# --- real SSH to simulated hosts ------------------------------------------------------------

@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimFleet]:
    """A sim fleet, stopped afterwards with nothing left running."""
    fleet = SimFleet(tmp_path / "sim")
    try:
        yield fleet
    finally:
        killed = fleet.stop()
    assert killed == []


def options(**kw: object) -> SSHOptions:
    """No user config, no agent, short timeouts."""
    base: dict[str, object] = {"ssh_config": (), "use_agent": False, "connect_timeout": 2.0, "retries": 0}
    base.update(kw)
    return SSHOptions(**base)  # type: ignore[arg-type]


def sim_host(sim: SimFleet, name: str, kh: Path, port: int | None = None) -> Host:
    """A Host reaching a sim host with the fleet's key."""
    h = next(x for x in sim.hosts if x.name == name)
    return Host(name=name, address="127.0.0.1", port=port or h.port, user="root",
                key_file=str(sim.client_key_path), known_hosts=str(kh))


def test_session_run_stream_put_get(sim: SimFleet, tmp_path: Path) -> None:
    """run with stdin and exit status, stream both ways, put/get a file through cat, over one connection."""
    sim.add("a")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    target = tmp_path / "put" / "file.bin"
    target.parent.mkdir()
    data = bytes(range(256)) * 100

    async def go() -> None:
        s = await connect(sim_host(sim, "a", kh), options())
        try:
            r = await s.run(shell_command(s.host, 'cat; echo "$1" >&2; exit 3', "arg"), input=b"in\x00put")
            assert (r.exit_status, r.stdout, r.stderr, r.ok) == (3, b"in\x00put", b"arg\n", False)
            assert r.stderr_text() == "arg"
            st = await s.stream(shell_command(s.host, 'while read -r l; do echo "got $l"; done; echo done'))
            st.write(b"one\ntwo\n")
            st.write_eof()
            buf = b""
            while True:
                chunk = await st.read()
                if not chunk:
                    break
                buf += chunk
            assert buf == b"got one\ngot two\ndone\n"
            assert await st.wait(5) == 0
            await s.put(data, str(target), mode=0o640)
            assert target.read_bytes() == data and (target.stat().st_mode & 0o777) == 0o640
            assert await s.get(str(target)) == data
            with pytest.raises(TransportError, match="cannot read /no/such/file") as ei:
                await s.get("/no/such/file")
            assert "No such file" in (ei.value.evidence or "")
            slow = await s.run("sleep 1.5", timeout=0.3)
            assert slow.exit_status == 124 and b"timed out" in slow.stderr
        finally:
            await s.close()

    asyncio.run(go())
    assert sim.hosts[0].connections == 1


def test_cipher_preference_and_an_ssh_config_that_names_ciphers(sim: SimFleet, tmp_path: Path) -> None:
    """AES-GCM by default (cheaper per packet for the controller); an OpenSSH config's Ciphers wins; None: asyncssh's."""
    sim.add("a")
    kh = sim.known_hosts_for(tmp_path / "known_hosts")
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  Ciphers aes256-ctr\n")
    plain = tmp_path / "ssh_config_plain"
    plain.write_text("Host *\n  ServerAliveInterval 5\n")

    async def cipher(opts: SSHOptions) -> str:
        s = await connect(sim_host(sim, "a", kh), opts)
        try:
            return str(s._conn.get_extra_info("send_cipher"))
        finally:
            await s.close()

    async def go() -> list[str]:
        return [await cipher(options()), await cipher(options(ssh_config=(str(plain),))),
                await cipher(options(ssh_config=(str(config),))), await cipher(options(ciphers=None))]

    assert asyncio.run(go()) == ["aes128-gcm@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr",
                                 "chacha20-poly1305@openssh.com"]


def test_connect_errors_are_translated(sim: SimFleet, tmp_path: Path) -> None:
    """Auth failure, refused port, changed key: one TransportError each, with a message that says what to do."""
    sim.add("ok")
    sim.add("nokey", "auth_fail")
    changed = sim.add("changed")
    kh = sim.known_hosts_for(tmp_path / "known_hosts", changed=(changed,))

    async def error(host: Host, **kw: object) -> TransportError:
        with pytest.raises(TransportError) as ei:
            s = await connect(host, options(**kw))
            await s.close()
        return ei.value

    async def go() -> None:
        e = await error(sim_host(sim, "nokey", kh))
        assert e.stage == "connect" and e.message.startswith("authentication failed as root (") and e.hint
        e = await error(sim_host(sim, "ok", kh, port=refused_port()))
        assert e.message.startswith("connection refused (root@127.0.0.1:") and "ansible_port" in (e.hint or "")
        # a changed key is never "accept it as new": the message says CHANGED and the hint does not offer that
        e = await error(sim_host(sim, "changed", kh))
        assert e.message.startswith("host key not verified: it CHANGED for [127.0.0.1]:") and str(kh) in e.message
        assert "owner" in (e.hint or "") and "--accept-new-host-keys" not in (e.hint or "")
        e = await error(sim_host(sim, "changed", kh), accept_new_host_keys=True)
        assert e.message.startswith("host key not verified: it CHANGED")

    asyncio.run(go())


def test_connect_retries_network_errors_once(tmp_path: Path) -> None:
    """A refused connection is retried (retries=1) and then reported; an auth failure would not be."""
    host = Host(name="gone", address="127.0.0.1", port=refused_port(), user="root")
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="connection refused"):
        asyncio.run(connect(host, options(retries=1, retry_backoff=0.3)))
    assert time.monotonic() - t0 >= 0.3                  # it waited and tried again


def test_silent_server_times_out(tmp_path: Path) -> None:
    """A port that accepts TCP but never speaks SSH (a hung sshd) fails after connect_timeout, with a hint."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept)
    t.start()
    try:
        host = Host(name="mute", address="127.0.0.1", port=listener.getsockname()[1], user="root")
        t0 = time.monotonic()
        with pytest.raises(TransportError) as ei:
            asyncio.run(connect(host, options(connect_timeout=1.0)))
        took = time.monotonic() - t0
    finally:
        stop.set()
        t.join()
        for c in accepted:
            c.close()
        listener.close()
    assert "timed out" in ei.value.message and "--connect-timeout" in (ei.value.hint or "")
    # the timeout the user set, not a multiple of it: no hidden retry or longer login timeout (issue 12)
    assert 1.0 <= took < 1.5, took
