"""One host resolved as ``ssh -G`` would: command-line options, then the config files, then the
ProxyJump chain hop by hop."""

from __future__ import annotations

import functools
import os
import pwd
from dataclasses import dataclass, replace
from typing import Protocol

from ..inventory import Host
from .cmdline import parse_ssh_args
from .configfile import (DEFAULT_IDENTITIES, Ctx, Options, Reader, expand_hostname, expand_path, expand_tokens,
                         key_name, token_map)
from .model import Resolved, SSHConfigError, system_dir


# --- resolution ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigSources:
    """Which config files to read: ``files`` None = ~/.ssh/config then the system's ssh_config (ssh's
    default); a tuple = those files only (like ``ssh -F``; empty: none)."""

    files: tuple[str, ...] | None = None
    extra_known_hosts: tuple[str, ...] = ()     # --known-hosts, fleetprobe_known_hosts: replace UserKnownHostsFile
    identities: tuple[str, ...] = ()            # --identity: like -i
    accept_new: bool = False                    # --accept-new-host-keys: like -o StrictHostKeyChecking=accept-new


class _OptionsLike(Protocol):
    """The fields of the transports' SSHOptions that say which settings apply."""

    @property
    def ssh_config(self) -> tuple[str, ...] | None: ...
    @property
    def known_hosts(self) -> tuple[str, ...] | None: ...
    @property
    def identities(self) -> tuple[str, ...]: ...
    @property
    def accept_new_host_keys(self) -> bool: ...


def sources_of(options: _OptionsLike) -> ConfigSources:
    """The config files and fleetprobe-wide settings (--ssh-config, --known-hosts, --identity,
    --accept-new-host-keys) that :func:`resolve` applies, from a transport's SSHOptions."""
    return ConfigSources(files=options.ssh_config, extra_known_hosts=tuple(options.known_hosts or ()),
                         identities=options.identities, accept_new=options.accept_new_host_keys)


def where(host: Host, r: Resolved | None) -> str:
    """`` (user@address:port via ...)`` for an error message, never repeating the host's name (the
    error already starts with it): empty when there is nothing to add."""
    if r is None:
        return "" if host.target == host.name else f" ({host.target})"
    if r.hostname == host.name:
        via = f", via {r.jump.describe()}" if r.jump else ", via ProxyCommand" if r.proxy_command else ""
        return f" (user {r.user}, port {r.port}{via})"
    return f" ({r.describe()})"


def resolve(host: Host, sources: ConfigSources | None = None) -> Resolved:
    """How ``ssh`` would reach ``host`` as Ansible calls it, or SSHConfigError naming what cannot be honoured."""
    sources = sources or ConfigSources()
    if host.connection not in (None, "ssh", "smart", "paramiko", "ansible.builtin.ssh", "ansible.builtin.paramiko_ssh"):
        raise SSHConfigError(host.name, f"ansible_connection={host.connection} is not supported by fleetprobe",
                             hint="fleetprobe reaches every host over SSH")
    pre = parse_ssh_args(host, host.ssh_pre_args, "ansible_ssh_args/ssh_args (ansible.cfg)")
    cl = parse_ssh_args(host, host.ssh_args)
    opts: list[tuple[str, list[str]]] = []
    known = list(sources.extra_known_hosts) + ([host.known_hosts] if host.known_hosts else [])
    if known:
        opts.append(("userknownhostsfile", known))
    if sources.accept_new:
        opts.append(("stricthostkeychecking", ["accept-new"]))
    if host.jump:
        opts.append(("-J", [host.jump]))
    opts += pre.options
    # Ansible's ssh plugin: -o Port, -o IdentityFile, -o User before the user's args.
    if host.port is not None:
        opts.append(("port", [str(host.port)]))
    if host.key_file:
        opts.append(("identityfile", [host.key_file]))
    if host.user:
        opts.append(("user", [host.user]))
    opts += cl.options
    for ident in sources.identities:
        opts.append(("-i", [ident]))
    files = sources.files
    config_file = cl.config_file if cl.config_file is not None else pre.config_file  # ssh: the last -F counts
    if config_file is not None:
        files = () if config_file == "none" else (config_file,)
    return _resolve(host, host.address, opts, files, sources, inherited_key=host.key_file, depth=0)


def _resolve(host: Host, name: str, cmdline: list[tuple[str, list[str]]], files: tuple[str, ...] | None,
             sources: ConfigSources, *, inherited_key: str | None, depth: int) -> Resolved:
    """``name`` resolved: the command line, then the config files (first value wins), then its jump hosts."""
    if depth > 8:
        raise SSHConfigError(host.name, "ProxyJump chain longer than 8 hops (a loop?)")
    local_user = _local_user()
    opts = _read_settings(host, name, local_user, cmdline, files)
    hn = opts.get("hostname")
    hostname = expand_hostname(hn, name) if hn else name
    port = _port(host, opts)
    user = opts.get("user") or local_user
    alias = opts.get("hostkeyalias")
    tokens = token_map(hostname, name, str(port), user, local_user, alias)
    user_kh = _listing(host, opts, tokens, "userknownhostsfile", (os.path.expanduser("~/.ssh/known_hosts"),
                                                                  os.path.expanduser("~/.ssh/known_hosts2")))
    global_kh = _listing(host, opts, tokens, "globalknownhostsfile", (os.path.join(system_dir(), "ssh_known_hosts"),
                                                                      os.path.join(system_dir(), "ssh_known_hosts2")))
    strict = _strict(host, opts)
    hashed = _yes(opts.get("hashknownhosts"), host.name, "HashKnownHosts")
    explicit = bool(opts.identities)
    idents = [i for i in opts.identities if i.lower() != "none"] if explicit else list(DEFAULT_IDENTITIES)
    identity_files = tuple(expand_path(i, tokens, host.name, "IdentityFile") for i in idents)
    agent = _identity_agent(host, opts, tokens)
    jump: Resolved | None = None
    proxy_command: str | None = None
    proxy = opts.values.get("proxy")
    if proxy and proxy[1].lower() != "none":
        if proxy[0] == "proxycommand":
            proxy_command = expand_tokens(proxy[1], {"%": "%", "h": hostname, "n": name, "p": str(port), "r": user},
                                          host.name, "ProxyCommand")
        else:
            jump = _jump(host, proxy[1], files, sources, inherited_key=inherited_key, depth=depth)
    alive_i, count_i = _server_alive(host, opts)
    return Resolved(alias=name, hostname=hostname, port=port, user=user, identity_files=identity_files,
                    identities_only=_yes(opts.get("identitiesonly"), host.name, "IdentitiesOnly"),
                    identity_agent=agent, user_known_hosts=user_kh, global_known_hosts=global_kh, strict=strict,
                    hash_known_hosts=hashed, host_key_alias=alias, jump=jump, proxy_command=proxy_command,
                    ciphers=opts.get("ciphers"), macs=opts.get("macs"), kex=opts.get("kexalgorithms"),
                    host_key_algorithms=opts.get("hostkeyalgorithms"), server_alive_interval=alive_i,
                    server_alive_count_max=count_i, explicit_identities=explicit)


def _local_user() -> str:
    """%u and the default user: the passwd name of this process's uid, as ssh takes it (getpwuid, not
    $USER or $LOGNAME); its uid when the passwd database has none."""
    return _user_of(os.getuid())


@functools.lru_cache(maxsize=4)
def _user_of(uid: int) -> str:
    """One passwd lookup per uid and process: it was one per host (a getpwuid is ~0.1 ms, issue 15)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _read_settings(host: Host, name: str, local_user: str, cmdline: list[tuple[str, list[str]]],
                   files: tuple[str, ...] | None) -> Options:
    """The settings for ``name``: the command line's first, then each config file's (first value wins)."""
    opts = Options()
    reader = Reader(Ctx(host, name, local_user), opts)
    for key, args in cmdline:
        if key == "-J":
            if "proxy" not in opts.values:
                opts.values["proxy"] = ["proxyjump", args[0]]
                opts.origin["proxy"] = "-J"
        elif key == "-p":
            opts.values.setdefault("port", args)
        elif key == "-l":
            opts.values.setdefault("user", args)
        elif key == "-i":
            # ssh -i skips (with a warning) a file it cannot stat; -o IdentityFile keeps it
            if os.path.exists(os.path.expanduser(args[0])):
                opts.identities.append(os.path.expanduser(args[0]))
        else:
            reader.setting(key, args, "command line")
    if files is None:
        reader.read_file(os.path.expanduser("~/.ssh/config"), user_config=True)
        reader.read_file(os.path.join(system_dir(), "ssh_config"), user_config=False)
    else:
        for f in files:
            reader.read_file(os.path.expanduser(f), user_config=True, required=True)
    return opts


def _port(host: Host, opts: Options) -> int:
    port_s = opts.get("port") or "22"
    try:
        port = int(port_s)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise SSHConfigError(host.name, f"{opts.origin.get('port', 'Port')}: bad port {port_s!r}") from None
    return port


def _listing(host: Host, opts: Options, tokens: dict[str, str], key: str,
             default: tuple[str, ...]) -> tuple[str, ...]:
    """A list-of-files setting (known_hosts files): ``default`` when unset, none when ``none``."""
    v = opts.values.get(key)
    if v is None:
        return default
    if [x.lower() for x in v] == ["none"]:
        return ()
    return tuple(expand_path(x, tokens, host.name, key_name(key)) for x in v)


def _strict(host: Host, opts: Options) -> str:
    """StrictHostKeyChecking as one of yes, accept-new, no (ask counts as yes: nobody is asked)."""
    strict = (opts.get("stricthostkeychecking") or "ask").lower()
    strict = {"ask": "yes", "true": "yes", "false": "no", "off": "no", "on": "yes"}.get(strict, strict)
    if strict not in ("yes", "accept-new", "no"):
        raise SSHConfigError(host.name, f"{opts.origin.get('stricthostkeychecking')}: bad StrictHostKeyChecking "
                             f"{opts.get('stricthostkeychecking')!r}", hint="yes, accept-new, no or ask")
    return strict


def _identity_agent(host: Host, opts: Options, tokens: dict[str, str]) -> str | None:
    """IdentityAgent: None for $SSH_AUTH_SOCK (or unset), "none", or the socket's path."""
    agent = opts.get("identityagent")
    if agent is not None and agent.lower() != "none":
        agent = None if agent == "SSH_AUTH_SOCK" else expand_path(agent, tokens, host.name, "IdentityAgent")
    elif agent is not None:
        agent = "none"
    return agent


def _jump(host: Host, spec: str, files: tuple[str, ...] | None, sources: ConfigSources, *,
          inherited_key: str | None, depth: int) -> Resolved:
    """The last hop of a ProxyJump list, resolved as ssh does (``ssh -J rest -p port -l user last``)."""
    hops = [h.strip() for h in spec.split(",") if h.strip()]
    last, rest = hops[-1], hops[:-1]
    juser, jhost, jport = parse_jump(last, host.name)
    jcmd: list[tuple[str, list[str]]] = []
    if sources.extra_known_hosts or host.known_hosts:
        jcmd.append(("userknownhostsfile",
                     list(sources.extra_known_hosts) + ([host.known_hosts] if host.known_hosts else [])))
    if sources.accept_new:
        jcmd.append(("stricthostkeychecking", ["accept-new"]))
    if rest:
        jcmd.append(("-J", [",".join(rest)]))
    if jport is not None:
        jcmd.append(("-p", [str(jport)]))
    if juser is not None:
        jcmd.append(("-l", [juser]))
    for ident in sources.identities:
        jcmd.append(("-i", [ident]))
    jump = _resolve(host, jhost, jcmd, files, sources, inherited_key=inherited_key, depth=depth + 1)
    if inherited_key and inherited_key not in jump.identity_files:
        # fleetprobe offers the host's own key to its jump hosts too (ssh would not; see README)
        jump = replace(jump, identity_files=jump.identity_files + (inherited_key,)
                       if jump.explicit_identities else (inherited_key,), explicit_identities=True)
    return jump


def _server_alive(host: Host, opts: Options) -> tuple[int, int]:
    """ServerAliveInterval (0: off) and ServerAliveCountMax (ssh's default 3)."""
    alive = opts.get("serveraliveinterval")
    count = opts.get("serveralivecountmax")
    try:
        return (int(alive) if alive else 0), (int(count) if count else 3)
    except ValueError:
        raise SSHConfigError(host.name, f"bad ServerAliveInterval/ServerAliveCountMax ({alive!r}, {count!r})") from None


def _yes(value: str | None, host: str, setting: str) -> bool:
    if value is None:
        return False
    v = value.lower()
    if v in ("yes", "true"):
        return True
    if v in ("no", "false"):
        return False
    raise SSHConfigError(host, f"bad {setting} {value!r}", hint="yes or no")


def parse_jump(spec: str, host: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (or ``ssh://user@host:port``) -> (user, host, port)."""
    if spec.startswith("ssh://"):
        spec = spec[6:].rstrip("/")
    user = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    port: int | None = None
    addr = spec
    if spec.startswith("["):
        addr, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            port = _jport(rest[1:], spec, host)
    elif spec.count(":") == 1:
        addr, p = spec.split(":")
        port = _jport(p, spec, host)
    if not addr:
        raise SSHConfigError(host, f"ProxyJump: empty host in {spec!r}")
    return user, addr, port


def _jport(text: str, spec: str, host: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise SSHConfigError(host, f"ProxyJump: bad port in {spec!r}")
    return port
