"""OpenSSH settings, resolved for one host exactly as ``ssh`` resolves them (``ssh -G``), and known_hosts.

:func:`resolve` takes a host as Ansible's ssh connection would call ``ssh``: the inventory's
``ansible_host``/``ansible_port``/``ansible_user``/``ansible_ssh_private_key_file`` as ``-o``
options first, then the words of ``ansible_ssh_common_args`` and ``ansible_ssh_extra_args``
(``-o``, ``-F``, ``-J``, ``-p``, ``-l``, ``-i``, ...), then the user's ~/.ssh/config, then the
system's ssh_config (``Include``d ssh_config.d files with it), first value wins, ``Host`` and
``Match`` blocks, tokens and ``${VAR}`` as OpenSSH expands them.  A ProxyJump chain is resolved
hop by hop as ssh does (each hop with its own config).  A setting fleetprobe cannot apply as
OpenSSH would is an :class:`SSHConfigError` naming it, raised before any connection.

:func:`check_host_key` and :func:`record_host_key` read and write known_hosts as OpenSSH does:
the lookup name is ``[HostName]:port`` for a port other than 22 (or ``HostKeyAlias``), hashed
entries and patterns match, a new key goes to the first ``UserKnownHostsFile``, hashed when
``HashKnownHosts`` is on; ``UserKnownHostsFile none`` trusts nothing.


The modules: :mod:`.model` (Resolved, SSHConfigError), :mod:`.configfile` (reading ssh_config,
tokens), :mod:`.cmdline` (the ssh words Ansible passes), :mod:`.resolve` (one host, hop by hop),
:mod:`.known_hosts`.  The names below are what the connectors and tests use.
"""

from __future__ import annotations

from .known_hosts import (KnownKeys, check_host_key, host_key_line, known_keys, lookup, may_record,
                          record_host_key)
from .model import DEFAULT_SYSTEM_DIR, Resolved, SSHConfigError, system_dir
from .resolve import ConfigSources, parse_jump, resolve, sources_of, where

__all__ = ["DEFAULT_SYSTEM_DIR", "ConfigSources", "KnownKeys", "Resolved", "SSHConfigError", "check_host_key",
           "host_key_line", "known_keys", "lookup", "may_record", "parse_jump", "record_host_key", "resolve",
           "sources_of", "system_dir", "where"]
