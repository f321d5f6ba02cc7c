"""Session: what every stage talks to instead of an SSH library.

:class:`Session` (``run``, ``stream``, ``put``, ``get``, ``close``) and :class:`Stream` are the
protocols a connector implements (connectors/asyncssh.py, connectors/fabric.py); every connector
returns :class:`CommandResult`.  Also how a command line is built for a host (quoting, ``sudo -n``)
and how long scripts travel on stdin.  Imports no SSH library.
"""

from __future__ import annotations

import functools
import shlex
from dataclasses import dataclass
from typing import Protocol

from fleetprobe.errors import TransportError
from fleetprobe.inventory import Host


@dataclass(frozen=True)
class CommandResult:
    """What a remote command did: exit status and its raw output."""

    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def stderr_text(self, limit: int = 600) -> str:
        """stderr decoded and trimmed for an error message."""
        text = self.stderr.decode("utf-8", "replace").strip()
        return text if len(text) <= limit else text[:limit] + " ..."


#: AES-GCM ahead of asyncssh's default order (chacha20-poly1305 first); "^" puts these first and keeps
#: the rest, so a host without them still negotiates.  asyncssh builds three ChaCha20 contexts and a
#: Poly1305 per packet where AES-GCM is one call: bare asyncssh connect + one command costs 2.1 ms of
#: controller CPU instead of 2.9 (bench/fanout.py hosts, issue 5), and fleetprobe's runs send and
#: receive ~40 packets per host.  Both are AEAD ciphers OpenSSH enables by default.
PREFERRED_CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"


@dataclass(frozen=True)
class SSHOptions:
    """How to reach hosts, shared by the whole fleet (per-host settings live on Host).

    ``known_hosts``: files to trust instead of ``UserKnownHostsFile`` (for every host and jump host).
    ``ssh_config``: OpenSSH config files to read instead of ~/.ssh/config and the system's
    ssh_config, like ``ssh -F`` (None: those two; an empty tuple: none).  ``accept_new_host_keys``
    accepts and records the key of a host that has none in known_hosts, like
    ``-o StrictHostKeyChecking=accept-new`` (a changed key is always refused).  Everything is
    resolved as ssh resolves it: :mod:`fleetprobe.sshconfig`.
    ``ciphers``: the cipher preference in OpenSSH's ``Ciphers`` syntax, used
    unless the host's OpenSSH settings name ``Ciphers`` (None: asyncssh's order).
    """

    known_hosts: tuple[str, ...] | None = None
    ssh_config: tuple[str, ...] | None = None
    identities: tuple[str, ...] = ()
    accept_new_host_keys: bool = False
    connect_timeout: float = 15.0
    keepalive_interval: float = 10.0
    keepalive_count_max: int = 3
    retries: int = 1
    retry_backoff: float = 1.0
    use_agent: bool = True
    ciphers: str | None = PREFERRED_CIPHERS


class Stream(Protocol):
    """A long-running remote command: read its stdout in chunks, write its stdin."""

    async def read(self, n: int = 65536) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    async def wait(self, timeout: float | None = None) -> int: ...
    def stderr(self) -> bytes: ...
    def close(self) -> None: ...


class Session(Protocol):
    """One connected host."""

    host: Host

    async def run(self, cmd: str, *, input: bytes | None = None,
                  timeout: float | None = None) -> CommandResult: ...
    async def stream(self, cmd: str) -> Stream: ...
    async def put(self, data: bytes, path: str, mode: int = 0o644) -> None: ...
    async def get(self, path: str) -> bytes: ...
    async def close(self) -> None: ...


def shell_command(host: Host, script: str, *args: str, zero: str = "fleetprobe") -> str:
    """The command line that runs a short ``script`` under POSIX sh on ``host``, as root when asked.

    Data goes on stdin, never through ``echo``; every argument is quoted.
    A non-root login with ``become`` runs under ``sudo -n`` (never prompts).
    Long scripts go on stdin instead: :func:`script_command`.
    """
    words = ["sh", "-c", script, zero, *args]
    if host.become and (host.user or "") != host.become_user:
        words = ["sudo", "-n", "-u", host.become_user, "--", *words]
    return "exec " + " ".join(shlex.quote(w) for w in words)


#: Marks the end of a script sent on stdin to :data:`BOOTSTRAP`.
SCRIPT_END = "#fleetprobe-script-end"


#: Reads a script from stdin up to SCRIPT_END and runs it.  Scripts travel on stdin,
#: not on the command line, because dropbear (embedded hosts, the lab) refuses exec
#: commands over 9000 bytes (MAX_CMD_LEN).  The shell's ``read`` takes a pipe one
#: byte at a time, so whatever follows the script on stdin is left for the script.
BOOTSTRAP = (f's=; while IFS= read -r l; do [ "$l" = "{SCRIPT_END}" ] && break; s="$s$l\n"; done; '
             'eval "$s"')


def script_command(host: Host, name: str, *args: str) -> str:
    """The command line that runs a script sent on stdin (see :func:`script_input`); ``$0`` is ``name``."""
    return shell_command(host, BOOTSTRAP, *args, zero=name)


@functools.lru_cache(maxsize=16)
def script_input(script: str) -> bytes:
    """What to send first on stdin to a :func:`script_command`: the script without its comments.

    Comment lines, blank lines and indentation are dropped (computed once per script, not per
    host): they are 45% of the runner, and every byte is encrypted by the controller for every
    host and read one at a time by the host's bootstrap.  So a line of a multi-line string or
    here-document in a script must not start with ``#`` or a blank.
    """
    lines = (line.lstrip(" \t") for line in script.splitlines())
    body = "\n".join(line for line in lines if line and not line.startswith("#"))
    return (body + "\n" + SCRIPT_END + "\n").encode()


async def put_file(session: Session, data: bytes, path: str, mode: int = 0o644) -> None:
    """Write a file through ``cat`` on stdin: works on any transport and on busybox hosts without sftp."""
    script = f'umask 077; cat > "$1" && chmod {mode:o} "$1"'
    res = await session.run(shell_command(session.host, script, path), input=data)
    if not res.ok:
        raise TransportError(session.host.name, "put", f"cannot write {path}", evidence=res.stderr_text())


async def get_file(session: Session, path: str) -> bytes:
    """Read a file through ``cat``."""
    res = await session.run(shell_command(session.host, 'cat -- "$1"', path))
    if not res.ok:
        raise TransportError(session.host.name, "get", f"cannot read {path}", evidence=res.stderr_text())
    return res.stdout


def parse_jump(spec: str) -> tuple[str | None, str, int | None]:
    """A ProxyJump hop, ``user@host:port`` (``[v6]:port``) -> (user, host, port)."""
    user = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    port = None
    if spec.startswith("["):
        addr, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif spec.count(":") == 1:
        addr, p = spec.split(":")
        port = int(p)
    else:
        addr = spec
    return user, addr, port
