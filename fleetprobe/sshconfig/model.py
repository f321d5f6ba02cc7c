"""What one resolution yields (:class:`Resolved`), its error type, and where /etc/ssh stands."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import TransportError


#: Where the system-wide OpenSSH client files live (ssh_config, ssh_known_hosts).  Tests point
#: FLEETPROBE_SSH_ETC elsewhere so that they never depend on this machine's own /etc/ssh.
DEFAULT_SYSTEM_DIR = "/etc/ssh"


def system_dir() -> str:
    """The directory standing for /etc/ssh."""
    return os.environ.get("FLEETPROBE_SSH_ETC") or DEFAULT_SYSTEM_DIR


class SSHConfigError(TransportError):
    """An SSH setting fleetprobe cannot apply as OpenSSH would: the host fails before any connection."""

    def __init__(self, host: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(host, "connect", message, hint=hint)


@dataclass(frozen=True)
class Resolved:
    """One SSH connection as ``ssh`` would make it."""

    alias: str                      # the name ssh was given (%n)
    hostname: str                   # where to connect (HostName)
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool
    identity_agent: str | None      # None: $SSH_AUTH_SOCK; "none": no agent
    user_known_hosts: tuple[str, ...]   # () : UserKnownHostsFile none
    global_known_hosts: tuple[str, ...]
    strict: str                     # yes | accept-new | no (ask is yes: nobody can answer)
    hash_known_hosts: bool
    host_key_alias: str | None
    jump: Resolved | None = None    # the connection to tunnel through (ProxyJump)
    proxy_command: str | None = None  # run with /bin/sh -c "exec ..." (ProxyCommand)
    ciphers: str | None = None
    macs: str | None = None
    kex: str | None = None
    host_key_algorithms: str | None = None
    server_alive_interval: int = 0
    server_alive_count_max: int = 3
    #: identity files that came from an explicit setting (not OpenSSH's defaults)
    explicit_identities: bool = False

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH looks up and records in known_hosts."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def describe(self) -> str:
        """``user@hostname:port via ...`` for messages."""
        via = f" via {self.jump.describe()}" if self.jump else f" via ProxyCommand {self.proxy_command!r}" \
            if self.proxy_command else ""
        return f"{self.user}@{self.hostname}:{self.port}{via}"
