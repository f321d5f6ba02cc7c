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
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fabric
import paramiko

from fleetprobe import sshconfig
from fleetprobe.errors import TransportError
from fleetprobe.inventory import Host
from fleetprobe.session import CommandResult, Session, SSHOptions, Stream, get_file, put_file

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
    at = sshconfig.where(host, None)  # the host's name is already in front of the message
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
        return TransportError(name, stage, f"connection refused{at}",
                              hint="is sshd running and the port right (ansible_port)?")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransportError(name, stage, f"timed out connecting{at}",
                              hint="is the host up and the port right? raise --connect-timeout for slow links")
    if isinstance(exc, EOFError) or isinstance(exc, paramiko.SSHException) and "closed" in str(exc).lower():
        return TransportError(name, stage, "connection lost", evidence=str(exc) or None)
    if isinstance(exc, OSError):
        return TransportError(name, stage, f"cannot reach{at or ' it'}: {exc.strerror or exc}")
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


class _HostKeyRefused(paramiko.SSHException):
    """A server key OpenSSH would refuse (the verdict says why)."""


class _OpenSSHPolicy(paramiko.MissingHostKeyPolicy):
    """Every server key judged as OpenSSH would (sshconfig.check_host_key), recorded as ssh records it."""

    def __init__(self, resolved: sshconfig.Resolved) -> None:
        self.resolved = resolved

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        r = self.resolved
        verdict = sshconfig.check_host_key(r, key.get_name(), key.get_base64())
        if verdict == "ok":
            return
        if verdict == "unknown" and sshconfig.may_record(r):
            sshconfig.record_host_key(r, key.get_name(), key.get_base64())
            return
        files = ", ".join(r.user_known_hosts + r.global_known_hosts) or "(none: UserKnownHostsFile none)"
        what = {"changed": "host key not verified: it CHANGED for", "revoked": "host key not verified: revoked for",
                "untrusted": "host key not verified (UserKnownHostsFile none trusts nothing) for"}.get(
                    verdict, "host key not verified for")
        raise _HostKeyRefused(f"{what} {r.known_hosts_name} (known_hosts: {files})")


def _refuse_unsupported(host: Host, r: sshconfig.Resolved) -> None:
    """Settings paramiko cannot apply as OpenSSH would: the host fails before connecting."""
    for name, value in (("Ciphers", r.ciphers), ("MACs", r.macs), ("KexAlgorithms", r.kex),
                        ("HostKeyAlgorithms", r.host_key_algorithms)):
        if value:
            raise sshconfig.SSHConfigError(host.name, f"{name} {value} is not honoured by --transport fabric",
                                           hint="use the default transport (asyncssh), or drop the setting")
    if r.jump is not None:
        _refuse_unsupported(host, r.jump)


def _connection(host: Host, r: sshconfig.Resolved, options: SSHOptions) -> fabric.Connection:
    """An unopened Connection for one resolved hop (its gateway chain included), verifying host keys as ssh."""
    gateway: fabric.Connection | str | None = None
    if r.jump is not None:
        gateway = _connection(host, r.jump, options)
    elif r.proxy_command is not None:
        # paramiko splits the command into words itself: hand it the shell, as ssh runs it
        gateway = "/bin/sh -c " + shlex.quote("exec " + r.proxy_command)
    keys = [f for f in r.identity_files if Path(f).exists()]
    use_agent = options.use_agent and r.identity_agent != "none" and not r.identities_only
    kwargs: dict[str, Any] = {"allow_agent": use_agent, "look_for_keys": False,
                              "banner_timeout": options.connect_timeout, "auth_timeout": options.connect_timeout}
    if keys:
        kwargs["key_filename"] = keys
    if host.password:
        kwargs["password"] = host.password
    config = fabric.Config(overrides={"load_ssh_configs": False, "forward_agent": False})
    conn = fabric.Connection(r.hostname, user=r.user, port=r.port, config=config, gateway=gateway,
                             connect_timeout=options.connect_timeout, connect_kwargs=kwargs,
                             forward_agent=False)
    conn.client.get_host_keys().clear()
    conn.client._system_host_keys.clear()  # only what sshconfig finds for the OpenSSH lookup name counts
    conn.client.set_missing_host_key_policy(_OpenSSHPolicy(r))
    return conn


def _open(host: Host, options: SSHOptions) -> fabric.Connection:
    """Blocking: open a Connection to ``host`` as OpenSSH would reach it (proxies, known_hosts), keepalives on."""
    r = sshconfig.resolve(host, sshconfig.sources_of(options))
    _refuse_unsupported(host, r)
    conn = _connection(host, r, options)
    conn.open()
    conn.client.get_transport().set_keepalive(int(r.server_alive_interval or options.keepalive_interval))
    return conn


async def connect(host: Host, options: SSHOptions) -> Session:
    """Open a FabricSession to ``host`` (RunSettings.connect for ``--transport fabric``) within --connect-timeout."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(options.connect_timeout):
            conn = await loop.run_in_executor(None, _open, host, options)
        return FabricSession(host, conn)
    except TransportError:
        raise
    except _HostKeyRefused as exc:
        raise TransportError(host.name, "connect", str(exc),
                             hint="check the key with the host's owner, or pass --accept-new-host-keys for a host "
                                  "seen for the first time") from None
    except TimeoutError as exc:
        raise _translate(host, exc, "connect") from None
    except (paramiko.BadHostKeyException, paramiko.AuthenticationException) as exc:
        raise _translate(host, exc, "connect") from None
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise _translate(host, exc, "connect") from None


# --- fabfile helpers -------------------------------------------------------------------------------

def _host_of(conn: fabric.Connection, name: str) -> Host:
    """The fleetprobe Host describing a Fabric Connection (probing runs as root unless the login is root)."""
    user = str(conn.user) if conn.user else None
    return Host(name=name, address=str(conn.host), port=int(conn.port) if conn.port else None, user=user,
                become=user not in (None, "root"))


def connection_name(conn: fabric.Connection) -> str:
    """The host as the user named it (``fab -H db1`` with an ssh_config alias: ``db1``, not its HostName)."""
    return str(getattr(conn, "original_host", None) or conn.host)


def sibling_connection(name: str, like: fabric.Connection) -> fabric.Connection:
    """A Connection to ``name`` with ``like``'s config, as ``fab -H`` opens one (not opened yet)."""
    return fabric.Connection(name, config=like.config)


def sessions_of(target: fabric.Connection | Iterable[fabric.Connection]) -> dict[str, FabricSession]:
    """A borrowed FabricSession per Connection, named as the user named the host (``name:port`` where two
    share a name)."""
    conns = [target] if isinstance(target, fabric.Connection) else list(target)
    seen: dict[str, int] = {}
    for c in conns:
        seen[connection_name(c)] = seen.get(connection_name(c), 0) + 1
    out: dict[str, FabricSession] = {}
    for c in conns:
        name = connection_name(c) if seen[connection_name(c)] == 1 else f"{connection_name(c)}:{c.port}"
        out[name] = FabricSession(_host_of(c, name), c, owned=False)
    return out


def open_sessions(sessions: dict[str, FabricSession]) -> None:
    """Open each borrowed session's Connection if it is not open yet; a failure is a TransportError."""
    for s in sessions.values():
        try:
            s.conn.open()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise _translate(s.host, exc, "connect") from None


def fab_invocation_hosts() -> list[str]:
    """The hosts of this ``fab -H a,b,c`` invocation, as typed (empty when not run by ``fab -H``)."""
    # fab's command-line program (fabric.main) holds the parsed -H; ``fab`` itself imported it.
    program = getattr(sys.modules.get("fabric.main"), "program", None)
    core = getattr(program, "core", None)
    try:
        value = core[0].args.hosts.value if core else None
    except (AttributeError, IndexError, KeyError):
        return []
    return [h for h in str(value).split(",") if h] if value else []
