"""The asyncssh connector (the default): keys, known_hosts, retries, error translation.

It implements :class:`fleetprobe.session.Session` (``run``, ``stream``, ``put``,
``get``, ``close``) and returns :class:`~fleetprobe.session.CommandResult`; asyncssh's errors
are translated here into :class:`fleetprobe.errors.TransportError` with a
message that says what to do.  One connection per host carries every step
of a run as channels on it.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncssh

from .. import sshconfig
from ..errors import LoginFailed, LoginRefused, TransportError
from ..inventory import Host
from ..session import CommandResult, SSHOptions, Stream, get_file, put_file


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
        self.proxies: list[asyncio.subprocess.Process] = []

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
        for proc in self.proxies:  # a ProxyCommand ends when its connection does; reap it
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()


def _stat(path: str) -> os.stat_result | None:
    """The file's stat, or None if it does not exist (or cannot be seen)."""
    try:
        return os.stat(path)
    except OSError:
        return None


def _version(path: str, st: os.stat_result | None) -> tuple[str, int, int, int]:
    """What identifies one version of a file: path, mtime, size, inode (zeros when it does not exist)."""
    return (path, st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else (path, 0, 0, 0)


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


class _Client(asyncssh.SSHClient):
    """Judges a server key known_hosts does not vouch for, as OpenSSH would (sshconfig.check_host_key):
    accepted and recorded only when StrictHostKeyChecking allows it and nothing is known for the name.

    One class for every host (made per host, a class cost ~0.1 ms of controller CPU: issue 5).
    """

    def __init__(self, resolved: sshconfig.Resolved) -> None:
        self._resolved = resolved
        self.verdict = ""

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        """Called for a key known_hosts does not vouch for."""
        kind, b64 = key.export_public_key().decode().split()[:2]
        r = self._resolved
        self.verdict = sshconfig.check_host_key(r, kind, b64)
        if self.verdict == "ok":
            return True
        if self.verdict == "unknown" and sshconfig.may_record(r):
            sshconfig.record_host_key(r, kind, b64)
            return True
        return False


def _trusted(r: sshconfig.Resolved) -> tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]]:
    """known_hosts entries for r's lookup name as asyncssh keys (trusted, CA, revoked)."""
    known = sshconfig.known_keys(r)

    def keys(entries: tuple[tuple[str, str], ...]) -> list[asyncssh.SSHKey]:
        out = []
        for kind, b64 in entries:
            try:
                out.append(asyncssh.import_public_key(f"{kind} {b64}"))
            except (asyncssh.KeyImportError, ValueError):
                continue  # a key type asyncssh cannot use cannot vouch for anything either
        return out

    return keys(known.keys), keys(known.ca_keys), keys(known.revoked)


def _connect_kwargs(r: sshconfig.Resolved, options: SSHOptions, client: _Client) -> dict[str, Any]:
    """asyncssh.connect keyword arguments for one resolved connection (nothing left for asyncssh to read)."""
    kw: dict[str, Any] = {
        "port": r.port,
        "username": r.user,
        "config": [],
        "connect_timeout": options.connect_timeout,
        "login_timeout": options.connect_timeout,
        "keepalive_interval": r.server_alive_interval or options.keepalive_interval,
        "keepalive_count_max": r.server_alive_count_max if r.server_alive_interval else options.keepalive_count_max,
        "client_factory": lambda: client,
        "known_hosts": _trusted(r),
        "agent_forwarding": False,   # never, whatever ForwardAgent says (issue 11)
        "x509_trusted_certs": None,
    }
    if r.ciphers:
        kw["encryption_algs"] = r.ciphers
    elif options.ciphers:
        kw["encryption_algs"] = options.ciphers
    if r.macs:
        kw["mac_algs"] = r.macs
    if r.kex:
        kw["kex_algs"] = r.kex
    if r.host_key_algorithms:
        kw["server_host_key_algs"] = r.host_key_algorithms
    keys = [f for f in r.identity_files if os.path.exists(f)]
    if keys:
        kw["client_keys"] = _load_client_keys(keys)
    elif r.explicit_identities:
        kw["client_keys"] = []
    if not options.use_agent or r.identity_agent == "none" or r.identities_only:
        kw["agent_path"] = None
    elif r.identity_agent:
        kw["agent_path"] = r.identity_agent
    return kw


def _translate(host: Host, exc: BaseException, stage: str, r: sshconfig.Resolved | None = None,
               evidence: str | None = None) -> TransportError:
    """Turn an asyncssh/OS error into one clear TransportError (the host named once: by the error itself)."""
    if evidence:
        err = _translate(host, exc, stage, r)
        return TransportError(err.host, err.stage, err.message, evidence=evidence, hint=err.hint)
    name = host.name
    at = sshconfig.where(host, r)
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return TransportError(name, "connect", "host key not verified", evidence=str(exc),
                              hint="check the key with the host's owner and add it to known_hosts, "
                                   "or pass --accept-new-host-keys to trust a host seen for the first time")
    if isinstance(exc, asyncssh.PermissionDenied):
        user = r.user if r is not None else host.user or "the default user"
        return TransportError(name, "connect", f"authentication failed as {user}{at}",
                              evidence=str(exc),
                              hint="set ansible_user / ansible_ssh_private_key_file, or load the key into ssh-agent")
    if isinstance(exc, asyncssh.ConnectionLost):
        return TransportError(name, stage, f"connection lost{at}", evidence=str(exc) or None)
    if isinstance(exc, asyncssh.DisconnectError):
        return TransportError(name, stage, f"disconnected by the host{at}", evidence=exc.reason)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TransportError(name, stage, f"timed out connecting{at}",
                              hint="is the host up and the port right? raise --connect-timeout for slow links")
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(name, stage, f"connection refused{at}",
                              hint="is sshd running and the port right (ansible_port)?")
    if isinstance(exc, OSError):
        return TransportError(name, stage, f"cannot reach{at or ' it'}: {exc.strerror or exc}")
    return TransportError(name, stage, f"{type(exc).__name__}: {exc}{at}")


_RETRYABLE = (ConnectionRefusedError, ConnectionResetError, asyncssh.ConnectionLost)


async def connect(host: Host, options: SSHOptions) -> AsyncsshSession:
    """Connect to one host as OpenSSH would (sshconfig.resolve: its config, proxies, known_hosts).

    The whole connection, through every jump host, takes at most ``options.connect_timeout``; a
    connection reset by the host is retried within that budget.  A setting fleetprobe cannot
    apply fails the host before anything is connected.
    """
    r = sshconfig.resolve(host, sshconfig.sources_of(options))
    attempt = 0
    last: BaseException | None = None
    try:
        async with asyncio.timeout(options.connect_timeout):
            while True:
                tunnels: list[asyncssh.SSHClientConnection] = []
                proxies: list[asyncio.subprocess.Process] = []
                try:
                    conn = await _open(host, r, options, tunnels, proxies)
                    # closing the first hop (the direct connection) closes the whole chain
                    session = AsyncsshSession(host, conn, tunnels[0] if tunnels else None)
                    session.proxies = proxies
                    return session
                except _RETRYABLE as exc:
                    for t in tunnels:
                        t.close()
                    if attempt >= options.retries:
                        raise
                    attempt += 1
                    last = exc
                    await asyncio.sleep(min(options.retry_backoff * attempt * (1 + random.random()), 1.0))
    except TransportError:
        raise
    except TimeoutError as exc:
        if last is not None:
            # The budget ran out between retries: what the host answered, not "timed out" (a refused
            # port is no slow link: more --connect-timeout would not help).
            err = _translate(host, last, "connect", r)
            raise TransportError(err.host, err.stage, f"{err.message}, tried {attempt}x within --connect-timeout "
                                 f"{options.connect_timeout:g}s", evidence=err.evidence, hint=err.hint) from None
        raise _translate(host, exc, "connect", r) from None
    except (asyncssh.Error, OSError) as exc:
        raise _translate(host, exc, "connect", r) from None


async def _open(host: Host, r: sshconfig.Resolved, options: SSHOptions, tunnels: list[asyncssh.SSHClientConnection],
                proxies: list[asyncio.subprocess.Process]) -> asyncssh.SSHClientConnection:
    """Open r's connection: its jump chain first (each hop verified like any host), or its ProxyCommand."""
    client = _Client(r)
    kw = _connect_kwargs(r, options, client)
    if r.jump is not None:
        hop = await _open(host, r.jump, options, tunnels, proxies)
        tunnels.append(hop)
        kw["tunnel"] = hop
    proxy: tuple[asyncio.subprocess.Process, str] | None = None
    if r.proxy_command is not None and r.jump is None:
        sock, proxy = await start_proxy(r.proxy_command)
        kw["sock"] = sock
        proxies.append(proxy[0])
    try:
        return await asyncssh.connect(r.hostname, **kw)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise _host_key_error(host, r, client.verdict, exc) from None
    except (asyncssh.Error, OSError) as exc:
        evidence = None
        if proxy is not None:
            if proxy[0].returncode is None:
                proxy[0].kill()
            evidence = _tail(proxy[1])
        if isinstance(exc, _RETRYABLE) and proxy is None:
            raise
        raise _translate(host, exc, "connect", r, evidence=evidence) from None
    finally:
        if proxy is not None:
            os.unlink(proxy[1])  # the running proxy keeps writing to its open file


async def start_proxy(command: str) -> tuple[socket.socket, tuple[asyncio.subprocess.Process, str]]:
    """Start a ProxyCommand as ssh does (``exec COMMAND`` in sh, stdin and stdout its connection).

    The command talks over one end of a socket pair and the SSH connection runs over the other
    (asyncssh's own proxy_command reads the proxy's stderr as if it were the SSH stream).  stderr
    goes to a log file, for the error message when the proxy fails.  The proxy ends when the
    connection closes its end (stdin EOF), as under ssh.
    """
    ours, theirs = socket.socketpair()
    log = tempfile.NamedTemporaryFile(prefix="fleetprobe-proxy-", suffix=".log", delete=False)
    try:
        proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", "exec " + command, stdin=theirs.fileno(),
                                                    stdout=theirs.fileno(), stderr=log, start_new_session=True)
    except OSError:
        ours.close()
        os.unlink(log.name)
        raise
    finally:
        theirs.close()
        log.close()
    return ours, (proc, log.name)


def _tail(path: str) -> str | None:
    """The end of what a proxy command wrote to stderr."""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return None
    return text[-600:] or None


def _host_key_error(host: Host, r: sshconfig.Resolved, verdict: str, exc: BaseException) -> TransportError:
    """The refusal of a host key, saying what OpenSSH would have said and where it looked."""
    files = ", ".join(r.user_known_hosts + r.global_known_hosts) or "(none)"
    name = r.known_hosts_name
    if verdict == "changed":
        return TransportError(host.name, "connect", f"host key not verified: it CHANGED for {name} (known_hosts: {files})",
                              hint="check with the host's owner before trusting the new key")
    if verdict == "revoked":
        return TransportError(host.name, "connect", f"host key not verified: revoked for {name} ({files})")
    if verdict == "untrusted":
        return TransportError(host.name, "connect", f"host key not verified for {name}: UserKnownHostsFile is "
                              "none, so no key is trusted", hint="set a UserKnownHostsFile holding the host's key")
    return TransportError(host.name, "connect", f"host key not verified for {name} (not in {files})",
                          evidence=str(exc) or None,
                          hint="check the key with the host's owner and add it to known_hosts, or pass "
                               "--accept-new-host-keys (or StrictHostKeyChecking accept-new) to trust a host "
                               "seen for the first time")


async def login_once(port: int, key: Path, known_hosts: Path, command: str, timeout_s: float) -> str:
    """One root login to 127.0.0.1:``port`` (the lab's guests) with one key and strict host keys; ``command``'s stdout.

    ``config=[]`` keeps the user's ~/.ssh/config out and no agent is asked. Raises LoginRefused for a
    refused host or login key, LoginFailed for anything a retry may cure.
    """
    try:
        async with asyncssh.connect(
                "127.0.0.1", port, username="root", client_keys=[str(key)],
                known_hosts=str(known_hosts), config=[], agent_path=None,
                login_timeout=timeout_s, connect_timeout=timeout_s) as conn:
            result = await asyncio.wait_for(conn.run(command, check=True), timeout=timeout_s)
    except (asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied) as exc:
        raise LoginRefused(f"SSH login refused: {exc}") from exc
    except (TimeoutError, asyncssh.Error, OSError) as exc:
        raise LoginFailed(f"{type(exc).__name__}: {exc}") from exc
    return str(result.stdout)
