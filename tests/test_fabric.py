"""Fabric transport and fabfile helpers against real OpenSSH sshd hosts on 127.0.0.1 (paramiko underneath)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import fabric
import pytest

from fleetprobe.render.safe import SafeConsole

from fleetprobe.cli.main import main
from fleetprobe.errors import TransportError
from fleetprobe.connectors.fabric import FabricSession, connect, harden
from fleetprobe.fabfile import run_playbook_on
from fleetprobe.inventory import Host
from fleetprobe.settings import RunSettings
from fleetprobe.results import load_json
from fleetprobe.session import SSHOptions, shell_command
from reports import leftovers_of, tracefs_ready
from sshhosts import Fleet, free_port, make_key, new_fleet

pytestmark = [pytest.mark.sshd]

PLAYBOOK = ("name: forks\ndescription: process forks\nduration: 1s\nprobes:\n"
            "  - name: fork\n    tracepoint: sched/sched_process_fork\n")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Two real sshd hosts on loopback."""
    if not tracefs_ready():
        pytest.skip("needs root and tracefs")
    f = new_fleet(tmp_path / "fleet")
    try:
        f.start_sshd("alpha", "127.0.0.1", free_port())
        f.start_sshd("beta", "127.0.0.1", free_port())
        yield f
    finally:
        f.stop()


def _host(fleet: Fleet, i: int = 0, **kw: object) -> Host:
    """Host record for one sshd of the fleet (its known_hosts, our key, root)."""
    h = fleet.hosts[i]
    args: dict[str, object] = {"name": h.name, "address": h.address, "port": h.port, "user": "root",
                               "key_file": str(fleet.client_key), "known_hosts": str(fleet.write_known_hosts())}
    args.update(kw)
    return Host(**args)  # type: ignore[arg-type]


OPTIONS = SSHOptions(ssh_config=(), use_agent=False, connect_timeout=10, retries=0)


def test_session_matches_the_transport_contract(fleet: Fleet) -> None:
    """run with stdin, exit status, stderr, binary get/put, timeouts, streams: as AsyncsshSession does."""
    async def go() -> None:
        host = _host(fleet)
        session = await connect(host, OPTIONS)
        assert isinstance(session, FabricSession)
        try:
            r = await session.run("cat; echo err >&2; exit 3", input=b"hello\x00world")
            assert (r.exit_status, r.stdout, r.stderr) == (3, b"hello\x00world", b"err\n")
            blob = bytes(range(256)) * 1000
            await session.put(blob, "/tmp/fp-fabric-test.bin", 0o600)
            try:
                assert await session.get("/tmp/fp-fabric-test.bin") == blob
                assert oct(os.stat("/tmp/fp-fabric-test.bin").st_mode & 0o777) == "0o600"
            finally:
                os.unlink("/tmp/fp-fabric-test.bin")
            with pytest.raises(TransportError, match="cannot read /nonexistent"):
                await session.get("/nonexistent")
            slow = await session.run("echo started; sleep 30", timeout=1)
            assert slow.exit_status == 124 and slow.stdout == b"started\n"
            stream = await session.stream(shell_command(host, 'while read x; do echo "got $x"; done; exit 7'))
            stream.write(b"one\ntwo\n")
            stream.write_eof()
            out = b""
            while chunk := await stream.read():
                out += chunk
            assert out == b"got one\ngot two\n"
            assert await stream.wait(10) == 7
        finally:
            await session.close()

    asyncio.run(go())


def test_host_keys_are_verified(fleet: Fleet, tmp_path: Path) -> None:
    """Fabric alone would accept any key (AutoAddPolicy); fleetprobe's connect refuses unknown and changed keys."""
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(TransportError, match="host key not verified") as info:
        asyncio.run(connect(_host(fleet, known_hosts=str(empty)), OPTIONS))
    assert "alpha" in str(info.value) and "--accept-new-host-keys" in str(info.value)
    wrong = tmp_path / "wrong_known_hosts"
    other = make_key(tmp_path / "other_key")
    wrong.write_text(f"[127.0.0.1]:{fleet.hosts[0].port} {other}\n")
    with pytest.raises(TransportError, match="CHANGED"):
        asyncio.run(connect(_host(fleet, known_hosts=str(wrong)), OPTIONS))
    # accept-new records the key of a host never seen, and the next connection trusts it.
    fresh = tmp_path / "fresh_known_hosts"
    opts = SSHOptions(ssh_config=(), use_agent=False, accept_new_host_keys=True, retries=0)

    async def twice() -> None:
        for o in (opts, OPTIONS):
            s = await connect(_host(fleet, known_hosts=str(fresh)), o)
            await s.close()

    asyncio.run(twice())
    assert f"[127.0.0.1]:{fleet.hosts[0].port} ssh-ed25519 " in fresh.read_text()


def test_refused_port_is_a_clear_error(fleet: Fleet) -> None:
    port = free_port()
    with pytest.raises(TransportError, match=rf"connection refused \(root@127.0.0.1:{port}\)"):
        asyncio.run(connect(_host(fleet, port=port), OPTIONS))


@pytest.mark.tracefs
def test_run_with_transport_fabric(fleet: Fleet, tmp_path: Path) -> None:
    """`fleetprobe run --transport fabric` runs the same pipeline: facts, plan, runner, teardown."""
    playbook = tmp_path / "forks.yml"
    playbook.write_text(PLAYBOOK)
    out = tmp_path / "r.json"
    console = SafeConsole(record=True, width=200)
    rc = main(["run", str(playbook), "-i", str(fleet.inventory()), "--transport", "fabric", "--no-live",
               "--no-store", "--json", str(out), "--no-agent", "--ssh-config", "none"], console)
    assert rc == 0, console.export_text()
    report = load_json(out)
    assert [(o.host, o.status, o.cleanup) for o in report.hosts] == [("alpha", "ok", "clean"), ("beta", "ok", "clean")]
    assert all(o.clock_offset is not None and o.kernel_release == os.uname().release for o in report.hosts)
    # Our own sshd sessions fork: both hosts saw forks.
    assert set(report.aggregate.hits("fork")) == {"alpha", "beta"}
    assert leftovers_of([report.run.run_id]) == []


@pytest.mark.tracefs
def test_fabfile_helper_runs_through_the_users_connections(fleet: Fleet, tmp_path: Path) -> None:
    playbook = tmp_path / "forks.yml"
    playbook.write_text(PLAYBOOK)
    known = str(fleet.write_known_hosts())
    conns = [harden(fabric.Connection("127.0.0.1", user="root", port=h.port,
                                      config=fabric.Config(overrides={"load_ssh_configs": False}),
                                      connect_kwargs={"key_filename": [str(fleet.client_key)],
                                                      "allow_agent": False, "look_for_keys": False}), [known])
             for h in fleet.hosts]
    group = fabric.ThreadingGroup.from_connections(conns)
    try:
        report = run_playbook_on(group, playbook, settings=RunSettings(duration=1.0))
        names = [f"127.0.0.1:{h.port}" for h in fleet.hosts]
        assert sorted(o.host for o in report.hosts) == sorted(names)
        assert all(o.status == "ok" and o.cleanup == "clean" for o in report.hosts), report.hosts
        assert report.aggregate.total_hits("fork") > 0
        assert leftovers_of([report.run.run_id]) == []
        # The connections are the caller's: still open and usable after the run.
        assert all(c.is_connected for c in conns)
        assert conns[0].run("echo still-here", hide=True, in_stream=False).stdout == "still-here\n"
    finally:
        group.close()


@pytest.mark.tracefs
def test_fab_dash_h_makes_one_merged_run_named_as_the_user_named_the_hosts(fleet: Fleet, tmp_path: Path,
                                                                            busy: None) -> None:
    """``fab -H alpha,beta forks`` (ssh_config aliases for two sshd on 127.0.0.1): Fabric calls the task once
    per host; run_playbook_once makes ONE run over both, named alpha and beta, and the second call runs
    nothing."""
    import subprocess
    import sys

    known = fleet.write_known_hosts()
    config = tmp_path / "ssh_config"
    config.write_text("".join(f"Host {h.name}\n  HostName 127.0.0.1\n  Port {h.port}\n  User root\n"
                              f"  IdentityFile {fleet.client_key}\n" for h in fleet.hosts))
    (tmp_path / "forks.yml").write_text(PLAYBOOK)
    (tmp_path / "fabfile.py").write_text(f"""
from fabric import task
from fleetprobe.fabfile import harden, run_playbook_once
from fleetprobe.settings import RunSettings

@task
def forks(c):
    report = run_playbook_once(c, {str(tmp_path / 'forks.yml')!r}, prepare=lambda x: harden(x, [{str(known)!r}]),
                               settings=RunSettings(duration=2.0))
    if report is None:
        print("SKIP", c.original_host)
    else:
        print("RUN", report.run.run_id, ",".join(o.host + "=" + o.status + "/" + o.cleanup for o in report.hosts),
              report.aggregate.total_hits("fork"))
""")
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    names = ",".join(h.name for h in fleet.hosts)
    done = subprocess.run([str(Path(sys.executable).parent / "fab"), "-r", str(tmp_path), "-S", str(config),
                           "-H", names, "forks"], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    runs = [line.split() for line in lines if line.startswith("RUN ")]
    assert len(runs) == 1, lines
    _, run_id, hosts, hits = runs[0]
    assert hosts == ",".join(f"{h.name}=ok/clean" for h in sorted(fleet.hosts, key=lambda h: h.name)), hosts
    assert int(hits) > 0
    assert [line for line in lines if line.startswith("SKIP ")] == [f"SKIP {fleet.hosts[1].name}"]
    assert leftovers_of([run_id]) == []
