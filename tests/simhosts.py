"""Simulated SSH hosts: in-process asyncssh servers that really run what they are asked, with a personality.

Each :class:`SimHost` is a real SSH server (asyncssh, port 0 on 127.0.0.1,
host key generated here) that runs every exec request with a local
``/bin/sh -c COMMAND`` subprocess, so the facts script and the runner behave
exactly as on a host with this machine's kernel (tracefs uprobes and
tracepoints work, kprobes do not).  A :class:`Personality` then injects one
way a real host misbehaves:

``normal``      answers like sshd.
``slow``        waits ``delay`` seconds before starting each command.
``hang``        accepts the exec and never answers (no output, no exit).
``drop_after``  aborts the whole TCP connection ``delay`` seconds into the runner
                command, as a link loss would; the runner then sees EOF on stdin and a
                dead stdout, exactly what sshd gives it, and must clean up by itself.
``kill_runner`` SIGKILLs the runner's own shell ``delay`` seconds into the runner command
                (not its trace reader, not its on-host timer), as an oops in its context or
                the OOM killer would: the reader keeps streaming, the clock markers stop.
``hostile``     interleaves garbage into the runner's stdout at line boundaries:
                invalid UTF-8, NUL bytes, a 1 MB line, a fake ``@@fp error`` line.
``auth_fail``   accepts no client key.
``flood_*``     once the runner said "started", sends an attack on the controller's memory and CPU, then
                the runner's own output (issue 11 #5): ``flood_lines`` 30 lines of 20 MB,
                ``flood_fields`` exec events with 1500 distinct field names, ``flood_nonl`` 400 MB
                without a newline, ``flood_control`` a million unframed and framed-looking control lines;
                ``flood_facts`` 300 MB of facts before their end marker.

Any host can also lie in its facts: :attr:`SimHost.fake_facts` replaces whole sections of
the real facts script's output (``{"uname": ["x86_64", "[/]", "#1"]}``), as a compromised
host that prints what it likes would.

Host keys: :meth:`SimFleet.known_hosts_for` writes a known_hosts file with the
right key, a different key (a host whose key changed), or no line at all (a
host never seen before).

The servers run on their own event loop in a background thread, so code under
test can call ``asyncio.run`` (as ``fleetprobe.cli.main.main`` does) or run in a
subprocess.  :meth:`SimFleet.stop` closes every server and waits for every
command's process group to exit (killing what is left after a grace period),
so no test leaves a process behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest

T = TypeVar("T")

PERSONALITIES = ("normal", "slow", "hang", "drop_after", "kill_runner", "hostile", "auth_fail",
                 "flood_lines", "flood_fields", "flood_nonl", "flood_control", "flood_facts")

#: What the hostile personality injects, one item per injection point.
HOSTILE_GARBAGE: tuple[bytes, ...] = (
    b"\xff\xfe\xfd not utf-8 \xc3\x28 at all\n",
    b"nul\x00bytes\x00in\x00the\x00middle\n",
    b"@@fp error injected-by-simhost\n",
    b"x" * (1 << 20) + b"\n",          # one 1 MB line: read in 16 chunks with no newline
    b"   garbage-0  [000] ...1. notatime: nothing\n",
)


@dataclass(frozen=True)
class Personality:
    """How a simulated host misbehaves (see the module docstring)."""

    kind: str = "normal"
    delay: float = 0.0

    def __post_init__(self) -> None:
        """Refuse a typo: a test with an unknown personality would test nothing."""
        if self.kind not in PERSONALITIES:
            raise ValueError(f"unknown personality {self.kind!r}; one of {', '.join(PERSONALITIES)}")


def command_kind(command: str) -> str:
    """Which fleetprobe script a command runs: ``runner``, ``facts``, ``list`` or ``other``.

    Scripts sent on stdin are named by their ``$0`` (``fleetprobe-runner``); scripts on the
    command line by their header comment.
    """
    if "fleetprobe-runner" in command or "fleetprobe runner:" in command:
        return "runner"
    if "fleetprobe-facts" in command or "fleetprobe facts:" in command:
        return "facts"
    if "fleetprobe-list" in command:
        return "list"
    return "other"


@dataclass
class CommandLog:
    """One exec request a sim host received."""

    kind: str
    command: str
    started: float
    #: When the command really started (after a ``slow`` host's delay); None if it never did.
    begun: float | None = None
    exit_status: int | None = None
    pid: int | None = None


@dataclass
class SimHost:
    """One simulated host: its address, keys, personality and what it saw."""

    name: str
    personality: Personality
    host_key: asyncssh.SSHKey
    port: int = 0
    connections: int = 0
    commands: list[CommandLog] = field(default_factory=list)
    dropped: bool = False
    #: Runner shells a ``kill_runner`` host killed.
    killed: list[int] = field(default_factory=list)
    acceptor: asyncssh.SSHAcceptor | None = None
    pgids: set[int] = field(default_factory=set)
    open_connections: list[asyncssh.SSHServerConnection] = field(default_factory=list)
    hostile_injected: int = 0
    #: Facts sections this host lies about: section name -> the lines it prints instead.
    fake_facts: dict[str, list[str]] = field(default_factory=dict)
    #: The same for the listing script's sections (``fleetprobe list``: ``tracepoints``, ``functions`` ...).
    fake_list: dict[str, list[str]] = field(default_factory=dict)
    #: Files this host lies about when asked to read them (any command naming the path):
    #: the bytes it sends instead, or None for a read that never ends.
    fake_files: dict[str, bytes | None] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return "127.0.0.1"

    def known_hosts_line(self, key: asyncssh.SSHKey | None = None) -> str:
        """A known_hosts line for this host (with ``key`` instead of its own, to simulate a changed key)."""
        pub = (key or self.host_key).export_public_key().decode().strip()
        return f"[{self.address}]:{self.port} {pub}\n"

    def ran(self, kind: str) -> list[CommandLog]:
        """The commands of one kind this host ran."""
        return [c for c in self.commands if c.kind == kind]


class _Server(asyncssh.SSHServer):
    """Public-key auth against the fleet's client key (none for ``auth_fail``); counts connections."""

    def __init__(self, host: SimHost, client_key: asyncssh.SSHKey) -> None:
        self._host = host
        self._client_pub = client_key.export_public_key()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """Count every connection, authenticated or not (a playbook error must cause none)."""
        self._host.connections += 1
        self._host.open_connections.append(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget a closed connection."""
        self._host.open_connections[:] = [c for c in self._host.open_connections if not c.is_closed()]

    def begin_auth(self, username: str) -> bool:
        """Always require authentication."""
        return True

    def public_key_auth_supported(self) -> bool:
        """Keys only, like a hardened sshd."""
        return True

    def password_auth_supported(self) -> bool:
        """No passwords."""
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Accept the fleet's key, except on an ``auth_fail`` host."""
        if self._host.personality.kind == "auth_fail":
            return False
        return bool(key.export_public_key() == self._client_pub)


async def _pump_in(process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process) -> None:
    """Copy the channel's stdin to the command; EOF (or a dead link) closes its stdin, as sshd does."""
    assert proc.stdin is not None
    try:
        while True:
            data = await process.stdin.read(65536)
            if not data:
                break
            proc.stdin.write(data)
            await proc.stdin.drain()
    except (asyncssh.Error, OSError, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        try:
            proc.stdin.close()
        except (OSError, RuntimeError):
            pass


class _Session:
    """Runs one exec request under the host's personality."""

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.link_up = True

    async def handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """asyncssh's process_factory: run the command for real, misbehaving as told."""
        host = self.host
        p = host.personality
        command = process.command or ""
        log = CommandLog(command_kind(command), command, time.time())
        host.commands.append(log)
        if p.kind == "hang":
            # Accept the exec, then say nothing until the client gives up and closes the channel.
            await process.wait_closed()
            return
        if p.kind == "slow" and p.delay > 0:
            await asyncio.sleep(p.delay)
        fake = next((path for path in host.fake_files if log.kind == "other" and path in command), None)
        if fake is not None:
            await self._send_fake(process, host.fake_files[fake])
            return
        log.begun = time.time()
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        log.pid = proc.pid
        host.pgids.add(proc.pid)
        conn = process.get_extra_info("connection")
        dropper: asyncio.Task[None] | None = None
        if p.kind == "drop_after" and log.kind == "runner":
            dropper = asyncio.ensure_future(self._drop(conn, proc, p.delay))
        if p.kind == "kill_runner" and log.kind == "runner":
            dropper = asyncio.ensure_future(self._kill_runner(proc.pid, p.delay))
        hostile = p.kind == "hostile" and log.kind == "runner"
        flood = p.kind if p.kind.startswith("flood_") and log.kind == "runner" else ""
        lies = host.fake_facts if log.kind == "facts" else host.fake_list if log.kind == "list" else {}
        out = (self._pump_lies(proc.stdout, process.stdout, lies) if lies
               else self._pump_out(proc.stdout, process.stdout, hostile, flood))
        pumps = [asyncio.ensure_future(_pump_in(process, proc)),
                 asyncio.ensure_future(out),
                 asyncio.ensure_future(self._pump_out(proc.stderr, process.stderr, False))]
        status = await proc.wait()
        log.exit_status = status
        # A flood takes longer to send than the runner takes to finish: let it all out.
        await asyncio.wait(pumps[1:], timeout=300 if flood else 5)
        pumps[0].cancel()
        if dropper is not None:
            dropper.cancel()
        if self.link_up:
            try:
                process.exit(status)
            except (asyncssh.Error, OSError):
                pass

    async def _drop(self, conn: asyncssh.SSHServerConnection, proc: asyncio.subprocess.Process,
                    delay: float) -> None:
        """Abort the TCP connection as a link loss would, and close the command's pipes as sshd then does.

        The command sees EOF on stdin and EPIPE on its next write to stdout;
        it is not killed: cleaning up after a lost link is its own job.
        """
        await asyncio.sleep(delay)
        self.link_up = False
        self.host.dropped = True
        conn.abort()
        # asyncio.subprocess.Process has no public way to close one pipe's read end: use its transport.
        transport = getattr(proc, "_transport", None)
        for fd in (0, 1, 2):
            pipe = transport.get_pipe_transport(fd) if transport is not None else None
            if pipe is not None:
                pipe.close()

    async def _kill_runner(self, pgid: int, delay: float) -> None:
        """SIGKILL the runner's top shell in process group ``pgid``: the first ``fleetprobe-runner``
        process whose parent is not one (its subshells, reader and timer are)."""
        await asyncio.sleep(delay)

        def cmdline(pid: int | str) -> str:
            try:
                return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                return ""

        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or "fleetprobe-runner" not in cmdline(entry.name):
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(stat[2]) == pgid and "fleetprobe-runner" not in cmdline(stat[1]):
                os.kill(int(entry.name), signal.SIGKILL)
                self.host.killed.append(int(entry.name))

    async def _send_fake(self, process: asyncssh.SSHServerProcess[bytes], data: bytes | None) -> None:
        """Answer a read with ``data`` and exit 0, or (None) stream zeros until the client gives up."""
        try:
            if data is not None:
                process.stdout.write(data)
                await process.stdout.drain()
                process.exit(0)
                return
            chunk = b"\0" * 65536
            while not process.is_closing():
                process.stdout.write(chunk)
                await process.stdout.drain()
                await asyncio.sleep(0.01)
        except (asyncssh.Error, OSError, BrokenPipeError, ConnectionResetError):
            pass

    async def _pump_lies(self, src: asyncio.StreamReader | None, dst: asyncssh.SSHWriter[bytes],
                         lies: dict[str, list[str]]) -> None:
        """A script's whole output with the sections in ``lies`` (fake_facts, fake_list) replaced."""
        assert src is not None
        lines = (await src.read()).decode("utf-8", "surrogateescape").split("\n")
        out: list[str] = []
        skipping = False
        for line in lines:
            if line.startswith("@@") and " " not in line:
                skipping = line[2:] in lies
                out.append(line)
                if skipping:
                    out.extend(lies[line[2:]])
                continue
            if not skipping:
                out.append(line)
        try:
            dst.write("\n".join(out).encode("utf-8", "surrogateescape"))
            await dst.drain()
        except (asyncssh.Error, OSError, BrokenPipeError, ConnectionResetError):
            pass

    async def _pump_out(self, src: asyncio.StreamReader | None, dst: asyncssh.SSHWriter[bytes],
                        hostile: bool, flood: str = "") -> None:
        """Copy the command's output to the channel; once the link is gone, stop reading (the pipe closes).

        The hostile personality adds one garbage item after each of the first
        few newlines, so real lines stay whole and their events still count.
        """
        assert src is not None
        garbage = list(HOSTILE_GARBAGE) if hostile else []
        try:
            while self.link_up:
                data = await src.read(65536)
                if not data:
                    break
                if garbage and b"\n" in data:
                    cut = data.rindex(b"\n") + 1
                    data = data[:cut] + garbage.pop(0) + data[cut:]
                    self.host.hostile_injected += 1
                if flood == "flood_facts":
                    for piece in _flood(flood):
                        if not self.link_up:
                            return
                        dst.write(piece)
                        await dst.drain()
                    flood = ""
                if flood and b" started enabled=" in data:
                    cut = data.index(b" started enabled=")
                    cut = data.index(b"\n", cut) + 1
                    dst.write(data[:cut])
                    for piece in _flood(flood):
                        if not self.link_up:
                            return
                        dst.write(piece)
                        await dst.drain()
                    self.host.hostile_injected += 1
                    flood, data = "", data[cut:]
                dst.write(data)
                await dst.drain()
        except (asyncssh.Error, OSError, BrokenPipeError, ConnectionResetError):
            pass


def _flood(kind: str) -> Iterator[bytes]:
    """The bytes of one flood attack, in pieces of about 1 MiB (never held whole)."""
    mib = b"y" * (1 << 20)
    if kind == "flood_lines":
        for _ in range(30):
            yield from [mib] * 20
            yield b"\n"
    elif kind == "flood_fields":
        for i in range(30):
            names = " ".join(f"f{i}_{j}=1" for j in range(50))
            yield (f"   x-1 [000] ..... 1.{i:06d}: sched_process_exec: {names}\n" * 2000).encode()
    elif kind == "flood_nonl":
        yield from [mib] * 400
        yield b"\n"
    elif kind == "flood_facts":
        yield from [b"kernel_symbol=x " * 65536] * 300
    elif kind == "flood_control":
        for _ in range(100):
            yield b"@@fp placed x\n@@fp:0000 error y\n" * 10000


class SimFleet:
    """Simulated hosts on one background event loop, plus the client key that reaches them."""

    def __init__(self, workdir: Path) -> None:
        """Generate the client key in ``workdir`` and start the server loop."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key_path = workdir / "id_ed25519"
        self.client_key.write_private_key(str(self.client_key_path))
        os.chmod(self.client_key_path, 0o600)
        self.hosts: list[SimHost] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="simhosts", daemon=True)
        self._thread.start()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the server loop and wait for its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def add(self, name: str, kind: str = "normal", delay: float = 0.0) -> SimHost:
        """Start one simulated host listening on 127.0.0.1, port chosen by the kernel."""
        host = SimHost(name, Personality(kind, delay), asyncssh.generate_private_key("ssh-ed25519"))

        async def start() -> None:
            host.acceptor = await asyncssh.create_server(
                lambda: _Server(host, self.client_key), "127.0.0.1", 0,
                server_host_keys=[host.host_key], process_factory=lambda p: _Session(host).handle(p),
                encoding=None, allow_scp=False, sftp_factory=None, x11_forwarding=False,
                agent_forwarding=False, keepalive_interval=0)
            host.port = int(host.acceptor.sockets[0].getsockname()[1])

        self._call(start())
        self.hosts.append(host)
        return host

    def known_hosts_for(self, path: Path, *, changed: tuple[SimHost, ...] = (),
                        unknown: tuple[SimHost, ...] = ()) -> Path:
        """Write known_hosts: every host's key, a wrong key for ``changed``, no line for ``unknown``."""
        lines = []
        for h in self.hosts:
            if h in unknown:
                continue
            lines.append(h.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519") if h in changed
                                            else None))
        path.write_text("".join(lines))
        return path

    def inventory(self, path: Path, known_hosts: Path, hosts: list[SimHost] | None = None,
                  extra: dict[str, dict[str, Any]] | None = None) -> Path:
        """An Ansible-layout inventory reaching ``hosts`` (all by default) with the fleet's key."""
        import yaml

        entries: dict[str, dict[str, Any]] = {}
        for h in hosts if hosts is not None else self.hosts:
            entries[h.name] = {"ansible_host": h.address, "ansible_port": h.port}
        for name, hv in (extra or {}).items():
            entries.setdefault(name, {}).update(hv)
        data = {"all": {"vars": {"ansible_user": "root",
                                 "ansible_ssh_private_key_file": str(self.client_key_path),
                                 "fleetprobe_known_hosts": str(known_hosts)},
                        "children": {"sim": {"hosts": entries}}}}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def live_pgids(self) -> list[int]:
        """Process groups started by any sim host that still have a member."""
        out = []
        for h in self.hosts:
            for pg in sorted(h.pgids):
                try:
                    os.killpg(pg, 0)
                except ProcessLookupError:
                    continue
                except PermissionError:
                    pass
                out.append(pg)
        return out

    def wait_quiet(self, timeout: float) -> list[int]:
        """Wait until every command's process group is gone; the ones still alive after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.live_pgids()
            if not live or time.monotonic() >= deadline:
                return live
            time.sleep(0.1)

    def stop(self, grace: float = 8.0) -> list[int]:
        """Close every server and end every process it started; returns groups that had to be killed.

        The grace period lets a runner whose link dropped finish its own teardown
        (and its watchdog notice the instance is gone, which takes up to 2 s)
        before anything is killed.
        """
        async def close_all() -> None:
            for h in self.hosts:
                if h.acceptor is not None:
                    h.acceptor.close()
                    await h.acceptor.wait_closed()
            # Connections a client left open (a hung host's): close them so their sessions end too.
            conns = [c for h in self.hosts for c in h.open_connections]
            for c in conns:
                c.close()
            for c in conns:
                try:
                    await asyncio.wait_for(c.wait_closed(), 5)
                except TimeoutError:
                    pass
            await asyncio.sleep(0.1)

        try:
            self._call(close_all())
        finally:
            killed = self.wait_quiet(grace)
            for pg in killed:
                try:
                    os.killpg(pg, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()
        return killed


def refused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released, so no server grabs it at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TRACEFS = Path("/sys/kernel/tracing")


def run_leftovers(run_id: str) -> list[str]:
    """Instances and dynamic events of one run still in this machine's tracefs."""
    prefix = f"fp_{run_id}_"
    found = [f"instance {p.name}" for p in (TRACEFS / "instances").iterdir() if p.name.startswith(prefix)]
    for f in ("kprobe_events", "uprobe_events"):
        p = TRACEFS / f
        if p.exists():
            found += [f"{f}: {line}" for line in p.read_text().splitlines() if f":{prefix}" in line]
    return found


@contextmanager
def strict_sim(root: Path, run_id: str | None = None, grace: float = 15) -> Iterator[SimFleet]:
    """A sim fleet for tests that kill links and runners: afterwards every command its hosts ran must
    have ended by itself within ``grace`` seconds (a runner whose link dropped finishes its own teardown),
    and, given ``run_id``, tracefs must hold nothing of that run. Skips without root and tracefs."""
    if os.geteuid() != 0 or not (TRACEFS / "instances").is_dir():
        pytest.skip("needs root and tracefs")
    fleet = SimFleet(root)
    try:
        yield fleet
    finally:
        killed = fleet.stop(grace=grace)
    assert killed == [], f"processes started by sim hosts did not end by themselves: {killed}"
    if run_id is not None:
        assert run_leftovers(run_id) == [], f"run {run_id} left these in tracefs"
