"""Fabric: fleetprobe over Fabric/paramiko connections, for fleets that standardise on them.

Two ways in:

* From a fabfile (fleetprobe/fabfile.py): ``run_playbook_on`` takes a Fabric
  ``Connection`` or ``Group`` the user already has and runs a playbook through
  those very connections (:func:`sessions_of` wraps them), returning the same
  :class:`~fleetprobe.results.FleetReport` as ``fleetprobe run``.
* ``fleetprobe run --transport fabric``: :func:`connect` opens a
  :class:`FabricSession` per host from the inventory; it plugs into
  ``RunSettings.connect`` and the rest of the pipeline does not change.

paramiko is blocking, so each open stream has one reader thread for stdout
and one for stderr that hand chunks to the event loop.  That is two threads
per probing host: fine for tens of hosts; the asyncssh transport (the
default) needs none and suits large fleets.

Host keys: Fabric's Connection accepts any host key by default
(paramiko's AutoAddPolicy).  :func:`connect` verifies them like the asyncssh
transport does (known_hosts, refuse unknown keys unless
``accept_new_host_keys``), and :func:`harden` does the same for a user's own
Connection.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fabric
import paramiko

from fleetprobe.errors import TransportError
from fleetprobe.inventory import Host
from fleetprobe.session import CommandResult, Session, SSHOptions, Stream, get_file, parse_jump, put_file

#: stderr kept per stream (the tail of a long error is rarely needed).
STDERR_LIMIT = 65536
#: How often wait() looks at the channel's exit status.
POLL = 0.02


class _RecordNewKey(paramiko.MissingHostKeyPolicy):
    """accept-new: trust a host with no known_hosts entry and append its key to ``path``."""

    def __init__(self, path: str) -> None:
        """Record to ``path``."""
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        """Add the key to the client and to the known_hosts file."""
        client.get_host_keys().add(hostname, key.get_name(), key)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def harden(conn: fabric.Connection, known_hosts: Iterable[str] = (), *, accept_new: bool = False) -> fabric.Connection:
    """Make a Fabric Connection verify host keys: trust only ``known_hosts`` (default: the user's OpenSSH one).

    Call before the connection opens.  A changed key is always refused
    (paramiko raises BadHostKeyException); an unknown one is refused unless
    ``accept_new``, which records it in the first file.
    """
    files = [str(f) for f in known_hosts] or [str(Path("~/.ssh/known_hosts").expanduser())]
    keys = conn.client.get_host_keys()
    for f in files:
        if Path(f).exists():
            keys.load(f)
    conn.client.set_missing_host_key_policy(_RecordNewKey(files[0]) if accept_new else paramiko.RejectPolicy())
    return conn


def _translate(host: Host, exc: BaseException, stage: str) -> TransportError:
    """A paramiko/socket error as one clear TransportError (same wording as the asyncssh transport)."""
    name = host.name
    if isinstance(exc, paramiko.BadHostKeyException):
        return TransportError(name, "connect", "host key CHANGED", evidence=str(exc),
                              hint="check with the host's owner before trusting the new key")
    if isinstance(exc, paramiko.AuthenticationException):
        return TransportError(name, "connect", f"authentication failed as {host.user or 'the default user'}",
                              evidence=str(exc),
                              hint="set ansible_user / ansible_ssh_private_key_file, or load the key into ssh-agent")
    if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
        return TransportError(name, "connect", "host key not verified", evidence=str(exc),
                              hint="add the host's key to known_hosts, or pass --accept-new-host-keys")
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return TransportError(name, stage, f"connection refused by {host.target}",
                              hint="is sshd running and the port right (ansible_port)?")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransportError(name, stage, f"timed out connecting to {host.target}",
                              hint="is the host up and the port right? raise --connect-timeout for slow links")
    if isinstance(exc, EOFError) or isinstance(exc, paramiko.SSHException) and "closed" in str(exc).lower():
        return TransportError(name, stage, "connection lost", evidence=str(exc) or None)
    if isinstance(exc, OSError):
        return TransportError(name, stage, f"cannot reach {host.target}: {exc.strerror or exc}")
    return TransportError(name, stage, f"{type(exc).__name__}: {exc}")


class FabricStream:
    """A Stream over one paramiko channel: reader threads feed the event loop."""

    def __init__(self, channel: paramiko.Channel, host: Host, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the channel's stdout and stderr."""
        self._chan = channel
        self._host = host
        self._loop = loop
        self._chunks: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._eof = False
        self._err = bytearray()
        self._err_done = threading.Event()
        threading.Thread(target=self._pump_stdout, name=f"fleetprobe-fabric-out-{host.name}", daemon=True).start()
        threading.Thread(target=self._pump_stderr, name=f"fleetprobe-fabric-err-{host.name}", daemon=True).start()

    def _pump_stdout(self) -> None:
        """Thread: stdout chunks into the queue; b'' (or the error) at the end."""
        try:
            while True:
                data = self._chan.recv(65536)
                self._loop.call_soon_threadsafe(self._chunks.put_nowait, data)
                if not data:
                    return
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._loop.call_soon_threadsafe(self._chunks.put_nowait, exc)
        except RuntimeError:
            return  # the event loop closed under us: nobody is reading any more

    def _pump_stderr(self) -> None:
        """Thread: keep the first STDERR_LIMIT bytes of stderr."""
        try:
            while True:
                data = self._chan.recv_stderr(8192)
                if not data:
                    return
                if len(self._err) < STDERR_LIMIT:
                    self._err += data
        except (OSError, EOFError, paramiko.SSHException):
            return
        finally:
            self._err_done.set()

    async def read(self, n: int = 65536) -> bytes:
        """The next chunk of stdout (at most what paramiko delivered); b'' at the end."""
        if self._eof:
            return b""
        item = await self._chunks.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise _translate(self._host, item, "probe")
        if not item:
            self._eof = True
        return item

    def write(self, data: bytes) -> None:
        """Send to the command's stdin (ignored once the channel is gone)."""
        try:
            self._chan.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def write_eof(self) -> None:
        """Close the command's stdin."""
        try:
            self._chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    async def wait(self, timeout: float | None = None) -> int:
        """The command's exit status (-1 when it died by signal or with the link); TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._chan.exit_status_ready():
            if self._chan.closed and not self._chan.exit_status_ready():
                return -1
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError()
            await asyncio.sleep(POLL)
        # Let the stderr thread catch up with what arrived before the exit status.
        await asyncio.get_running_loop().run_in_executor(None, self._err_done.wait, 1.0)
        status = self._chan.recv_exit_status()
        return status if status >= 0 else -1

    def stderr(self) -> bytes:
        """stderr collected so far (bounded)."""
        return bytes(self._err)

    def close(self) -> None:
        """Close the channel (its reader threads end with it)."""
        self._chan.close()


class FabricSession:
    """A Session over a Fabric Connection (owned: closed by :meth:`close`; borrowed: left open)."""

    def __init__(self, host: Host, conn: fabric.Connection, *, owned: bool = True) -> None:
        """Wrap an open ``conn`` for ``host``."""
        self.host = host
        self.conn = conn
        self._owned = owned

    def _transport(self) -> paramiko.Transport:
        """The live paramiko transport, or a TransportError when the link is gone."""
        transport: paramiko.Transport | None = self.conn.client.get_transport()
        if transport is None or not transport.is_active():
            raise TransportError(self.host.name, "run", "connection lost")
        return transport

    async def stream(self, cmd: str) -> Stream:
        """Start a long-running command and return its stream."""
        try:
            chan = self._transport().open_session()
            chan.exec_command(cmd)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise _translate(self.host, exc, "probe") from None
        return FabricStream(chan, self.host, asyncio.get_running_loop())

    async def run(self, cmd: str, *, input: bytes | None = None, timeout: float | None = None) -> CommandResult:
        """Run a command to completion (stdin from ``input``); exit 124 with what it printed on timeout."""
        stream = await self.stream(cmd)
        assert isinstance(stream, FabricStream)
        if input:
            stream.write(input)
        stream.write_eof()
        out = bytearray()

        async def collect() -> int:
            while chunk := await stream.read():
                out.extend(chunk)
            return await stream.wait()

        try:
            status = await asyncio.wait_for(collect(), timeout)
        except TimeoutError:
            stream.close()
            return CommandResult(124, bytes(out), stream.stderr() + b"\n(timed out)")
        finally:
            stream.close()
        return CommandResult(status, bytes(out), stream.stderr())

    async def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write a file on the host (see :func:`put_file`)."""
        await put_file(self, data, path, mode)

    async def get(self, path: str) -> bytes:
        """Read a file from the host (see :func:`get_file`)."""
        return await get_file(self, path)

    async def close(self) -> None:
        """Close the connection if this session opened it."""
        if self._owned:
            await asyncio.get_running_loop().run_in_executor(None, self.conn.close)


def _config(options: SSHOptions) -> fabric.Config:
    """Fabric config honouring ``ssh_config`` (None: the user's default; () none; else those files)."""
    if options.ssh_config is None:
        return fabric.Config()
    if not options.ssh_config:
        return fabric.Config(overrides={"load_ssh_configs": False})
    ssh = paramiko.SSHConfig()
    for path in options.ssh_config:
        with open(path) as f:
            ssh.parse(f)
    return fabric.Config(ssh_config=ssh)


def _connection(host: Host, options: SSHOptions, address: str, port: int | None, user: str | None,
                gateway: fabric.Connection | None) -> fabric.Connection:
    """An unopened, hardened Connection."""
    keys = ([host.key_file] if host.key_file else []) + list(options.identities)
    kwargs: dict[str, Any] = {"allow_agent": options.use_agent, "look_for_keys": not keys,
                              "banner_timeout": options.connect_timeout, "auth_timeout": options.connect_timeout * 2}
    if keys:
        kwargs["key_filename"] = keys
    if host.password:
        kwargs["password"] = host.password
    conn = fabric.Connection(address, user=user, port=port, config=_config(options), gateway=gateway,
                             connect_timeout=options.connect_timeout, connect_kwargs=kwargs)
    known = ([host.known_hosts] if host.known_hosts else []) + list(options.known_hosts or ())
    return harden(conn, known, accept_new=options.accept_new_host_keys)


def _open(host: Host, options: SSHOptions) -> fabric.Connection:
    """Blocking: open a Connection to ``host`` (through its ProxyJump chain), keepalives on."""
    gateway: fabric.Connection | None = None
    for hop in (host.jump.split(",") if host.jump else []):
        user, addr, port = parse_jump(hop.strip())
        gateway = _connection(host, options, addr, port, user or host.user, gateway)
    conn = _connection(host, options, host.address, host.port, host.user, gateway)
    conn.open()
    conn.client.get_transport().set_keepalive(int(options.keepalive_interval))
    return conn


async def connect(host: Host, options: SSHOptions) -> Session:
    """Open a FabricSession to ``host`` (RunSettings.connect for ``--transport fabric``), retrying network errors."""
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        try:
            conn = await loop.run_in_executor(None, _open, host, options)
            return FabricSession(host, conn)
        except (paramiko.BadHostKeyException, paramiko.AuthenticationException) as exc:
            raise _translate(host, exc, "connect") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            err = _translate(host, exc, "connect")
            if attempt >= options.retries or "known_hosts" in str(exc):
                raise err from None
            attempt += 1
            await asyncio.sleep(options.retry_backoff * attempt)


# --- fabfile helpers -------------------------------------------------------------------------------

def _host_of(conn: fabric.Connection, name: str) -> Host:
    """The fleetprobe Host describing a Fabric Connection (probing runs as root unless the login is root)."""
    user = str(conn.user) if conn.user else None
    return Host(name=name, address=str(conn.host), port=int(conn.port) if conn.port else None, user=user,
                become=user not in (None, "root"))


def sessions_of(target: fabric.Connection | Iterable[fabric.Connection]) -> dict[str, FabricSession]:
    """A borrowed FabricSession per Connection, named by host (``host:port`` where two share a host)."""
    conns = [target] if isinstance(target, fabric.Connection) else list(target)
    seen: dict[str, int] = {}
    for c in conns:
        seen[str(c.host)] = seen.get(str(c.host), 0) + 1
    out: dict[str, FabricSession] = {}
    for c in conns:
        name = str(c.host) if seen[str(c.host)] == 1 else f"{c.host}:{c.port}"
        out[name] = FabricSession(_host_of(c, name), c, owned=False)
    return out


def open_sessions(sessions: dict[str, FabricSession]) -> None:
    """Open each borrowed session's Connection if it is not open yet; a failure is a TransportError."""
    for s in sessions.values():
        try:
            s.conn.open()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise _translate(s.host, exc, "connect") from None
