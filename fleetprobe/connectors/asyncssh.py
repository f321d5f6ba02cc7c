"""The asyncssh connector (the default): keys, known_hosts, retries, error translation.

It implements :class:`fleetprobe.session.Session` (``run``, ``stream``, ``put``,
``get``, ``close``) and returns :class:`~fleetprobe.session.CommandResult`; asyncssh's errors
are translated here into :class:`fleetprobe.errors.TransportError` with a
message that says what to do.  One connection per host carries every step
of a run as channels on it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from ..errors import TransportError
from ..inventory import Host
from ..session import (parse_jump, CommandResult, SSHOptions, Stream,
                       get_file, put_file)



class _AsyncsshStream:
    """A Stream over one asyncssh channel."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes], host: Host) -> None:
        self._proc = process
        self._host = host
        self._err = bytearray()
        self._err_task = asyncio.ensure_future(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        try:
            while True:
                chunk = await self._proc.stderr.read(8192)
                if not chunk:
                    return
                if len(self._err) < 65536:
                    self._err += chunk
        except (asyncssh.Error, OSError, asyncio.CancelledError):
            return

    async def read(self, n: int = 65536) -> bytes:
        """Up to n bytes of stdout; b'' at end of stream. A dropped link raises TransportError."""
        try:
            return await self._proc.stdout.read(n)
        except (asyncssh.Error, OSError) as exc:
            raise _translate(self._host, exc, "probe") from None

    def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin (ignored once the channel is gone)."""
        try:
            self._proc.stdin.write(data)
        except (asyncssh.Error, OSError, BrokenPipeError):
            pass

    def write_eof(self) -> None:
        """Close the command's stdin: the runner takes that as 'stop'."""
        try:
            self._proc.stdin.write_eof()
        except (asyncssh.Error, OSError, BrokenPipeError):
            pass

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the command to exit; its exit status (-1 if it died by signal or the link)."""
        try:
            async with asyncio.timeout(timeout):
                result = await self._proc.wait(check=False)
        except (asyncssh.Error, OSError):
            return -1
        if not self._err_task.done():
            await asyncio.wait([self._err_task], timeout=1)
        return result.exit_status if result.exit_status is not None else -1

    def stderr(self) -> bytes:
        """stderr collected so far (bounded)."""
        return bytes(self._err)

    def close(self) -> None:
        """Close the channel."""
        self._proc.close()
        self._err_task.cancel()


def _as_bytes(data: bytes | str | None) -> bytes:
    """Channel output as bytes (we open channels with encoding=None, so it is bytes already)."""
    if data is None:
        return b""
    return data.encode() if isinstance(data, str) else bytes(data)


class AsyncsshSession:
    """A Session over one asyncssh connection."""

    def __init__(self, host: Host, conn: asyncssh.SSHClientConnection,
                 tunnel: asyncssh.SSHClientConnection | None = None) -> None:
        self.host = host
        self._conn = conn
        self._tunnel = tunnel

    async def run(self, cmd: str, *, input: bytes | None = None,
                  timeout: float | None = None) -> CommandResult:
        """Run a command to completion (stdin from ``input``); output captured as bytes."""
        try:
            res = await self._conn.run(cmd, input=input, encoding=None, check=False, timeout=timeout)
        except asyncssh.TimeoutError as exc:
            return CommandResult(124, _as_bytes(exc.stdout), _as_bytes(exc.stderr) + b"\n(timed out)")
        except (asyncssh.Error, OSError) as exc:
            raise _translate(self.host, exc, "run") from None
        status = res.exit_status if res.exit_status is not None else -1
        return CommandResult(status, _as_bytes(res.stdout), _as_bytes(res.stderr))

    async def stream(self, cmd: str) -> Stream:
        """Start a long-running command and return its stream."""
        try:
            proc = await self._conn.create_process(cmd, encoding=None)
        except (asyncssh.Error, OSError) as exc:
            raise _translate(self.host, exc, "probe") from None
        return _AsyncsshStream(proc, self.host)

    async def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write a file on the host (see :func:`put_file`)."""
        await put_file(self, data, path, mode)

    async def get(self, path: str) -> bytes:
        """Read a file from the host (see :func:`get_file`)."""
        return await get_file(self, path)

    async def close(self) -> None:
        """Close the connection (and its jump connection)."""
        self._conn.close()
        try:
            async with asyncio.timeout(5):
                await self._conn.wait_closed()
        except (TimeoutError, asyncssh.Error, OSError):
            pass
        if self._tunnel is not None:
            self._tunnel.close()


@dataclass
class _KnownHostsPolicy:
    """Strict host key checking, with an explicit accept-new opt-in."""

    files: list[str]
    accept_new: bool
    recorded: list[str] = field(default_factory=list)


def _known_files(host: Host, options: SSHOptions) -> list[str] | None:
    """The known_hosts files for host, or None for the user's OpenSSH defaults."""
    files: list[str] = []
    if host.known_hosts:
        files.append(host.known_hosts)
    if options.known_hosts:
        files.extend(options.known_hosts)
    return files or None


def _default_known_hosts() -> str:
    return str(Path("~/.ssh/known_hosts").expanduser())


def _stat(path: str) -> os.stat_result | None:
    """The file's stat, or None if it does not exist (or cannot be seen)."""
    try:
        return os.stat(path)
    except OSError:
        return None


def _version(path: str, st: os.stat_result | None) -> tuple[str, int, int, int]:
    """What identifies one version of a file: path, mtime, size, inode (zeros when it does not exist)."""
    return (path, st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else (path, 0, 0, 0)


#: Parsed known_hosts by the versions of its files; see _read_known_hosts.
_KNOWN_HOSTS_CACHE: dict[tuple[tuple[str, int, int, int], ...], asyncssh.SSHKnownHosts] = {}


def _read_known_hosts(files: list[tuple[str, os.stat_result]]) -> asyncssh.SSHKnownHosts:
    """The parsed known_hosts files (with their stat), parsed again only when one of them changes.

    Given paths, asyncssh re-reads and re-parses every file on every
    connection: with one line per host that is O(hosts^2) over a fleet
    (bench/fanout.py measured 12 ms per connection at 300 hosts, most of the
    controller's CPU).  Accept-new appends change the size, so the next
    connection sees the new key.  Raises OSError/ValueError like asyncssh would.
    """
    key = tuple(_version(f, st) for f, st in files)
    known = _KNOWN_HOSTS_CACHE.get(key)
    if known is None:
        known = asyncssh.read_known_hosts([f for f, _ in files])
        if len(_KNOWN_HOSTS_CACHE) >= 16:
            _KNOWN_HOSTS_CACHE.clear()
        _KNOWN_HOSTS_CACHE[key] = known
    return known


#: Loaded client key pairs by the versions of the key files and their certificates.
_KEYS_CACHE: dict[tuple[tuple[str, int, int, int], ...], Sequence[asyncssh.SSHKeyPair]] = {}


def _load_client_keys(paths: list[str]) -> Sequence[asyncssh.SSHKeyPair] | list[str]:
    """The key pairs (and ``-cert.pub`` certificates) in ``paths``, loaded again only when a file changes.

    Given paths, asyncssh reads and parses the key files on every connection
    (~0.1 ms each, issue 5).  On any error the paths themselves, for asyncssh
    to load and report as it always has (a missing file, a key that needs a passphrase).
    """
    try:
        versions = tuple(_version(f, _stat(f)) for p in paths for f in (p, p + "-cert.pub"))
        cached = _KEYS_CACHE.get(versions)
        if cached is not None:
            return cached
        pairs = asyncssh.load_keypairs(list(paths))
    except (ValueError, OSError, asyncssh.Error):
        return paths
    if len(_KEYS_CACHE) >= 16:
        _KEYS_CACHE.clear()
    _KEYS_CACHE[versions] = pairs
    return pairs


def _has_entry(files: list[str], host: str, addr: str, port: int | None) -> bool:
    """Whether any known_hosts file names this host at all (so a mismatch means CHANGED)."""
    existing = [(f, st) for f in files if (st := _stat(f)) is not None]
    if not existing:
        return False
    try:
        known = _read_known_hosts(existing)
    except (ValueError, OSError):
        return False
    for name in {host, addr}:
        res = known.match(name, addr, port)
        if any(res[:3]):
            return True
    return False


#: Whether a config file names Ciphers (or includes others), by (path, mtime, size).
_CONFIG_CIPHERS: dict[tuple[str, int, int], bool] = {}
_CIPHERS_LINE = re.compile(r"^\s*(ciphers|include)\b", re.IGNORECASE | re.MULTILINE)


def _config_sets_ciphers(configs: tuple[str, ...] | None) -> bool:
    """Whether an OpenSSH config in use may choose ciphers (then its choice stands, not ours).

    ``configs`` as in SSHOptions.ssh_config (None: ~/.ssh/config, as asyncssh reads it).  A file
    with ``Include`` counts as choosing: what it includes is not read here.
    """
    paths = [str(Path("~/.ssh/config").expanduser())] if configs is None else list(configs)
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (path, st.st_mtime_ns, st.st_size)
        found = _CONFIG_CIPHERS.get(key)
        if found is None:
            try:
                found = _CIPHERS_LINE.search(Path(path).read_text(errors="replace")) is not None
            except OSError:
                found = False
            _CONFIG_CIPHERS[key] = found
        if found:
            return True
    return False


class _Client(asyncssh.SSHClient):
    """An SSHClient that, only in accept-new mode, trusts and records an unknown host's key.

    One class for every host (made per host, a class cost ~0.1 ms of controller CPU: issue 5).
    """

    def __init__(self, policy: _KnownHostsPolicy, hostname: str, port: int | None) -> None:
        self._policy = policy
        self._hostname = hostname
        self._port = port

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        """Called for a key known_hosts does not vouch for: accept and record it only in accept-new mode."""
        policy, hostname = self._policy, self._hostname
        if not policy.accept_new or _has_entry(policy.files, hostname, addr, self._port):
            return False
        target = policy.files[0] if policy.files else _default_known_hosts()
        name = hostname if self._port in (None, 22) else f"[{hostname}]:{self._port}"
        line = f"{name} {key.export_public_key().decode().strip()}\n"
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as fh:
            fh.write(line)
        policy.recorded.append(line)
        return True


def _connect_kwargs(host: Host, options: SSHOptions, policy: _KnownHostsPolicy) -> dict[str, Any]:
    """asyncssh.connect keyword arguments for one host."""
    kw: dict[str, Any] = {
        "port": host.port if host.port is not None else (),
        "connect_timeout": options.connect_timeout,
        "login_timeout": options.connect_timeout * 2,
        "keepalive_interval": options.keepalive_interval,
        "keepalive_count_max": options.keepalive_count_max,
        "client_factory": functools.partial(_Client, policy, host.address, host.port),
    }
    if host.user:
        kw["username"] = host.user
    files = _known_files(host, options)
    if files is not None:
        existing = [(f, st) for f in files if (st := _stat(f)) is not None]
        if existing:
            try:
                kw["known_hosts"] = _read_known_hosts(existing)
            except (ValueError, OSError):
                # Let asyncssh read them itself and report the bad file as it always has.
                kw["known_hosts"] = [f for f, _ in existing]
        else:
            kw["known_hosts"] = ([], [], [])
    if options.ssh_config is not None:
        kw["config"] = list(options.ssh_config)
    if options.ciphers and not _config_sets_ciphers(options.ssh_config):
        kw["encryption_algs"] = options.ciphers
    keys = ([host.key_file] if host.key_file else []) + list(options.identities)
    if keys:
        kw["client_keys"] = _load_client_keys(keys)
    if host.password:
        kw["password"] = host.password
    if not options.use_agent:
        kw["agent_path"] = None
    return kw


def _translate(host: Host, exc: BaseException, stage: str) -> TransportError:
    """Turn an asyncssh/OS error into one clear TransportError."""
    name = host.name
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return TransportError(name, "connect", "host key not verified", evidence=str(exc),
                              hint="check the key with the host's owner and add it to known_hosts, "
                                   "or pass --accept-new-host-keys to trust a host seen for the first time")
    if isinstance(exc, asyncssh.PermissionDenied):
        return TransportError(name, "connect", f"authentication failed as {host.user or 'the default user'}",
                              evidence=str(exc),
                              hint="set ansible_user / ansible_ssh_private_key_file, or load the key into ssh-agent")
    if isinstance(exc, asyncssh.ConnectionLost):
        return TransportError(name, stage, "connection lost", evidence=str(exc) or None)
    if isinstance(exc, asyncssh.DisconnectError):
        return TransportError(name, stage, "disconnected by the host", evidence=exc.reason)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TransportError(name, stage, f"timed out connecting to {host.target}",
                              hint="is the host up and the port right? raise --connect-timeout for slow links")
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(name, stage, f"connection refused by {host.target}",
                              hint="is sshd running and the port right (ansible_port)?")
    if isinstance(exc, OSError):
        return TransportError(name, stage, f"cannot reach {host.target}: {exc.strerror or exc}")
    return TransportError(name, stage, f"{type(exc).__name__}: {exc}")


_RETRYABLE = (OSError, asyncio.TimeoutError, asyncssh.ConnectionLost)


async def connect(host: Host, options: SSHOptions) -> AsyncsshSession:
    """Connect to one host (through its jump host, if any), retrying once on network errors.

    Authentication and host key failures are not retried: they will not fix themselves.
    """
    files = _known_files(host, options) or [_default_known_hosts()]
    policy = _KnownHostsPolicy(files=files, accept_new=options.accept_new_host_keys)
    attempt = 0
    while True:
        tunnel: asyncssh.SSHClientConnection | None = None
        try:
            kw = _connect_kwargs(host, options, policy)
            if host.jump:
                tunnel = await _connect_jump(host, options)
                kw["tunnel"] = tunnel
            async with asyncio.timeout(options.connect_timeout * 3):
                conn = await asyncssh.connect(host.address, **kw)
            return AsyncsshSession(host, conn, tunnel)
        except TransportError:
            raise
        except (asyncssh.Error, *_RETRYABLE) as exc:
            if tunnel is not None:
                tunnel.close()
            retryable = isinstance(exc, _RETRYABLE) and not isinstance(
                exc, (asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied))
            if retryable and attempt < options.retries:
                attempt += 1
                await asyncio.sleep(options.retry_backoff * attempt * (1 + random.random()))
                continue
            raise _translate(host, exc, "connect") from None


async def _connect_jump(host: Host, options: SSHOptions) -> asyncssh.SSHClientConnection:
    """Open the ProxyJump chain for host (each hop verified like any host)."""
    assert host.jump
    conn: asyncssh.SSHClientConnection | None = None
    for hop in host.jump.split(","):
        user, addr, port = parse_jump(hop.strip())
        jh = Host(name=f"{host.name} (jump {hop})", address=addr, port=port, user=user or host.user,
                  key_file=host.key_file, known_hosts=host.known_hosts)
        files = _known_files(jh, options) or [_default_known_hosts()]
        kw = _connect_kwargs(jh, options, _KnownHostsPolicy(files, options.accept_new_host_keys))
        if conn is not None:
            kw["tunnel"] = conn
        try:
            conn = await asyncio.wait_for(asyncssh.connect(addr, **kw), options.connect_timeout * 3)
        except (asyncssh.Error, *_RETRYABLE) as exc:
            raise _translate(jh, exc, "connect") from None
    assert conn is not None
    return conn
