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
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import getpass
import glob
import hashlib
import hmac
import os
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from .errors import TransportError
from .inventory import Host

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


# --- settings ---------------------------------------------------------------------------------

#: Keywords fleetprobe applies (lower case).
_HONOURED = {"hostname", "port", "user", "identityfile", "identitiesonly", "identityagent", "proxyjump",
             "proxycommand", "userknownhostsfile", "globalknownhostsfile", "stricthostkeychecking",
             "hashknownhosts", "hostkeyalias", "ciphers", "macs", "kexalgorithms", "hostkeyalgorithms",
             "serveraliveinterval", "serveralivecountmax", "include", "host", "match", "ignoreunknown"}
#: Keywords that change nothing fleetprobe does (it never forwards, never multiplexes, always runs
#: in batch mode, sets its own connect timeout, and never forwards the agent: issue 11).
_IGNORED = {"forwardagent", "forwardx11", "forwardx11trusted", "forwardx11timeout", "xauthlocation",
            "controlmaster", "controlpath", "controlpersist", "compression", "loglevel", "logverbose",
            "syslogfacility", "sendenv", "setenv", "addkeystoagent", "tcpkeepalive", "batchmode",
            "connecttimeout", "connectionattempts", "preferredauthentications", "pubkeyauthentication",
            "passwordauthentication", "kbdinteractiveauthentication", "challengeresponseauthentication",
            "kbdinteractivedevices", "gssapiauthentication", "gssapidelegatecredentials", "hostbasedauthentication",
            "enablesshkeysign", "numberofpasswordprompts", "updatehostkeys", "visualhostkey", "requesttty",
            "escapechar", "ipqos", "rekeylimit", "usekeychain", "protocol",
            "useroaming", "pubkeyacceptedalgorithms", "pubkeyacceptedkeytypes", "hostbasedacceptedalgorithms",
            "hostbasedkeytypes", "casignaturealgorithms", "exitonforwardfailure", "clearallforwardings",
            "gatewayports", "streamlocalbindmask", "streamlocalbindunlink", "obscurekeystroketiming",
            "channeltimeout", "requiredrsasize", "sessiontype", "stdinnull", "forkafterauthentication",
            "enableescapecommandline", "permitlocalcommand", "localcommand", "tag", "fingerprinthash",
            "nohostauthenticationforlocalhost", "permitremoteopen", "canonicaldomains",
            "canonicalizefallbacklocal", "canonicalizemaxdots", "canonicalizepermittedcnames"}
#: Keywords refused whatever their value, and those refused unless they have their default value.
_REFUSED = {"localforward", "remoteforward", "dynamicforward", "remotecommand", "knownhostscommand",
            "bindaddress", "bindinterface", "certificatefile", "pkcs11provider", "securitykeyprovider",
            "proxyusefdpass", "revokedhostkeys"}
_DEFAULT_ONLY = {"checkhostip": ("no",), "verifyhostkeydns": ("no",), "canonicalizehostname": ("no",),
                 "tunnel": ("no",), "addressfamily": ("any",), "proxyusefdpass": ("no",)}
_MULTI = {"identityfile"}

_DEFAULT_IDENTITIES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk", "~/.ssh/id_ed25519",
                       "~/.ssh/id_ed25519_sk", "~/.ssh/id_xmss", "~/.ssh/id_dsa")


@dataclass
class _Options:
    """Settings as obtained so far (first value wins)."""

    values: dict[str, list[str]] = field(default_factory=dict)
    identities: list[str] = field(default_factory=list)
    ignore_unknown: list[str] = field(default_factory=list)
    # where each value came from, for errors
    origin: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> str | None:
        v = self.values.get(key)
        return v[0] if v else None


@dataclass
class _Ctx:
    host: Host
    original: str          # the name given to ssh (%n)
    local_user: str
    final: bool = False


#: Keywords whose value is the rest of the line as written (readconf.c keeps it unsplit, quotes and all).
_RAW = {"proxycommand", "localcommand", "remotecommand", "knownhostscommand"}


def _words(line: str, where: str, host: str) -> list[str]:
    """A config line's keyword and arguments (``key=value`` or ``key value``, quotes, trailing comment);
    for a command keyword, its one argument is the rest of the line unsplit, as ssh keeps it."""
    words = _split_line(line)
    if isinstance(words, str):
        raise SSHConfigError(host, f"{where}: {words}")
    return list(words)


@functools.lru_cache(maxsize=4096)
def _split_line(line: str) -> tuple[str, ...] | str:
    """:func:`_words` without the host (cached: every host of a fleet reads the same lines), or the error."""
    m = re.match(r"^\s*([A-Za-z0-9]+)\s*(?:=\s*|\s+|$)(.*)$", line)
    if not m:
        return f"cannot parse {line.strip()!r}"
    if m.group(1).lower() in _RAW:
        return (m.group(1), m.group(2).strip()) if m.group(2).strip() else (m.group(1),)
    try:
        rest = shlex.split(m.group(2), comments=True)
    except ValueError as exc:
        return f"{exc} in {line.strip()!r}"
    return (m.group(1), *rest)


def _glob(name: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: only ``*`` and ``?`` are special (``[`` is literal: ``[host]:port``)."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.DOTALL) is not None


def _match_pattern_list(name: str, patterns: list[str]) -> bool:
    """OpenSSH's match_pattern_list: any positive pattern matches and no negated one does (case-insensitive)."""
    got = False
    for p in patterns:
        for sub in p.split(","):
            if not sub:
                continue
            neg = sub.startswith("!")
            pat = sub[1:] if neg else sub
            if _glob(name.lower(), pat.lower()):
                if neg:
                    return False
                got = True
    return got


#: Config file texts by (path, mtime, size, inode): every host of a fleet reads the same files.
_TEXT_CACHE: dict[tuple[str, int, int, int], str] = {}


def _config_text(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    text = _TEXT_CACHE.get(key)
    if text is None:
        text = Path(path).read_text(errors="replace")
        if len(_TEXT_CACHE) >= 64:
            _TEXT_CACHE.clear()
        _TEXT_CACHE[key] = text
    return text


class _Reader:
    """Reads OpenSSH config files into _Options for one host (readconf.c's semantics)."""

    def __init__(self, ctx: _Ctx, opts: _Options) -> None:
        self.ctx = ctx
        self.opts = opts

    def read_file(self, path: str, *, user_config: bool, depth: int = 0, required: bool = False) -> None:
        if depth > 16:
            raise SSHConfigError(self.ctx.host.name, f"{path}: Include nested too deep")
        try:
            text = _config_text(path)
        except FileNotFoundError:
            if required:
                raise SSHConfigError(self.ctx.host.name, f"ssh config file {path} does not exist") from None
            return
        except OSError as exc:
            raise SSHConfigError(self.ctx.host.name, f"cannot read ssh config {path}: {exc.strerror}") from None
        active = True
        for lineno, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            active = self.line(s, f"{path}:{lineno}", active, user_config=user_config, depth=depth)

    def line(self, line: str, where: str, active: bool, *, user_config: bool, depth: int) -> bool:
        """Process one line; returns whether the following lines are active."""
        words = _words(line, where, self.ctx.host.name)
        key, args = words[0].lower(), words[1:]
        if key == "host":
            return _match_pattern_list(self.ctx.original, args)
        if key == "match":
            return self._match(args, where)
        if not active:
            return active
        if key == "include":
            base = Path(os.path.expanduser("~/.ssh")) if user_config else Path(system_dir())
            for arg in args:
                pat = os.path.expanduser(arg)
                pat = pat if os.path.isabs(pat) else str(base / pat)
                for f in sorted(glob.glob(pat)):
                    self.read_file(f, user_config=user_config, depth=depth + 1)
            return active
        self.setting(key, args, where)
        return active

    def setting(self, key: str, args: list[str], where: str) -> None:
        host = self.ctx.host.name
        if key == "ignoreunknown":
            if "ignoreunknown" not in self.opts.values:
                self.opts.values["ignoreunknown"] = args
                self.opts.ignore_unknown = [a for p in args for a in p.split(",")]
            return
        if key in _REFUSED:
            raise SSHConfigError(host, f"{where}: {key_name(key)} is not supported by fleetprobe",
                                 hint="fleetprobe opens one plain SSH session per host; remove it for these hosts")
        if key in _DEFAULT_ONLY:
            if args and args[0].lower() not in _DEFAULT_ONLY[key]:
                raise SSHConfigError(host, f"{where}: {key_name(key)} {' '.join(args)} is not supported by fleetprobe",
                                     hint=f"only {key_name(key)} {_DEFAULT_ONLY[key][0]} (the default) is")
            return
        if key in _IGNORED:
            return
        if key not in _HONOURED:
            if any(fnmatch.fnmatchcase(key, p.lower()) for p in self.opts.ignore_unknown):
                return
            raise SSHConfigError(host, f"{where}: unknown or unsupported ssh option {key!r}",
                                 hint="ssh itself refuses unknown options too (IgnoreUnknown lists ones to skip)")
        if not args:
            raise SSHConfigError(host, f"{where}: {key_name(key)} needs a value")
        if key in _MULTI:
            for a in args:
                self.opts.identities.append(a)
                self.opts.origin.setdefault("identityfile", where)
            return
        if key in ("proxyjump", "proxycommand"):
            # ssh keeps the first of the two it sees; the other is then ignored
            if "proxy" in self.opts.values:
                return
            self.opts.values["proxy"] = [key, " ".join(args) if key == "proxycommand" else args[0]]
            self.opts.origin["proxy"] = where
            return
        if key not in self.opts.values:
            self.opts.values[key] = args
            self.opts.origin[key] = where

    def _match(self, args: list[str], where: str) -> bool:
        host = self.ctx.host.name
        result = True
        i = 0
        if not args:
            raise SSHConfigError(host, f"{where}: Match needs criteria")
        while i < len(args):
            crit = args[i].lower()
            neg = crit.startswith("!")
            crit = crit.lstrip("!")
            if crit == "all":
                ok = True
                i += 1
            elif crit in ("host", "originalhost", "user", "localuser", "exec"):
                if i + 1 >= len(args):
                    raise SSHConfigError(host, f"{where}: Match {crit} needs an argument")
                arg = args[i + 1]
                i += 2
                if crit == "host":
                    hn = self.opts.get("hostname")
                    ok = _match_pattern_list(_expand_hostname(hn, self.ctx.original) if hn else self.ctx.original,
                                             [arg])
                elif crit == "originalhost":
                    ok = _match_pattern_list(self.ctx.original, [arg])
                elif crit == "user":
                    ok = _match_pattern_list(self.opts.get("user") or self.ctx.local_user, [arg])
                elif crit == "localuser":
                    ok = _match_pattern_list(self.ctx.local_user, [arg])
                else:
                    cmd = self._tokens_partial(arg)
                    try:
                        ok = subprocess.run(["/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            timeout=30).returncode == 0
                    except subprocess.TimeoutExpired:
                        raise SSHConfigError(host, f"{where}: Match exec {arg!r} did not finish within 30s") from None
            elif crit in ("canonical", "final"):
                # fleetprobe never canonicalises host names, so there is no second (final) pass.
                raise SSHConfigError(host, f"{where}: Match {crit} is not supported by fleetprobe")
            else:
                raise SSHConfigError(host, f"{where}: Match {crit} is not supported by fleetprobe")
            if neg:
                ok = not ok
            result = result and ok
        return result

    def _tokens_partial(self, text: str) -> str:
        hn = self.opts.get("hostname")
        hostname = _expand_hostname(hn, self.ctx.original) if hn else self.ctx.original
        port = self.opts.get("port") or "22"
        user = self.opts.get("user") or self.ctx.local_user
        return _expand_tokens(text, _token_map(hostname, self.ctx.original, port, user, self.ctx.local_user, None),
                              self.ctx.host.name, "Match exec")


def key_name(key: str) -> str:
    """OpenSSH's spelling of a lower-cased keyword, for messages."""
    names = {"stricthostkeychecking": "StrictHostKeyChecking", "userknownhostsfile": "UserKnownHostsFile",
             "proxyjump": "ProxyJump", "proxycommand": "ProxyCommand", "localforward": "LocalForward",
             "remoteforward": "RemoteForward", "dynamicforward": "DynamicForward", "remotecommand": "RemoteCommand",
             "knownhostscommand": "KnownHostsCommand", "bindaddress": "BindAddress", "bindinterface": "BindInterface",
             "certificatefile": "CertificateFile", "pkcs11provider": "PKCS11Provider", "checkhostip": "CheckHostIP",
             "verifyhostkeydns": "VerifyHostKeyDNS", "canonicalizehostname": "CanonicalizeHostname",
             "tunnel": "Tunnel", "addressfamily": "AddressFamily", "proxyusefdpass": "ProxyUseFdpass",
             "securitykeyprovider": "SecurityKeyProvider"}
    return names.get(key, key)


def _expand_hostname(value: str, original: str) -> str:
    return value.replace("%%", "\0").replace("%h", original).replace("\0", "%")


@functools.lru_cache(maxsize=1)
def _local_hostname() -> str:
    return socket.gethostname()


def _token_map(hostname: str, original: str, port: str, user: str, local_user: str,
               alias: str | None) -> dict[str, str]:
    long_host = _local_hostname()
    home = os.path.expanduser("~")
    c = hashlib.sha1(f"{long_host}{hostname}{port}{user}".encode()).hexdigest()
    return {"%": "%", "h": hostname, "n": original, "p": port, "r": user, "u": local_user, "d": home,
            "l": long_host, "L": long_host.split(".")[0], "i": str(os.getuid()), "C": c,
            "k": alias or original}


def _expand_tokens(text: str, tokens: dict[str, str], host: str, setting: str) -> str:
    def sub(m: re.Match[str]) -> str:
        t = m.group(1)
        if t not in tokens:
            raise SSHConfigError(host, f"{setting}: unknown token %{t} in {text!r}")
        return tokens[t]

    return re.sub(r"%(.)", sub, text)


def _expand_env(text: str, host: str, setting: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            raise SSHConfigError(host, f"{setting}: environment variable {m.group(1)} is not set ({text!r})")
        return os.environ[m.group(1)]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, text)


def _path(text: str, tokens: dict[str, str], host: str, setting: str) -> str:
    return os.path.expanduser(_expand_env(_expand_tokens(text, tokens, host, setting), host, setting))


# --- the command line Ansible would run --------------------------------------------------------

#: ssh flags that change nothing fleetprobe does (no argument).
_FLAGS_IGNORED = set("qvCTtnxaAkKXYMNg")
#: ssh flags with an argument that change nothing fleetprobe does.
_ARGS_IGNORED = set("EeSP")


@dataclass
class _CommandLine:
    options: list[tuple[str, list[str]]] = field(default_factory=list)   # (-o key, args) in order
    config_file: str | None = None


def _parse_ssh_args(host: Host, words: tuple[str, ...],
                    setting: str = "ansible_ssh_common_args/ansible_ssh_extra_args") -> _CommandLine:
    """``ansible_ssh_common_args`` + ``ansible_ssh_extra_args`` words as ssh's getopt reads them."""
    cl = _CommandLine()
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith("-") or w == "-":
            raise SSHConfigError(host.name, f"{setting}: {w!r} is not an ssh option",
                                 hint="only options (-o, -F, -J, -p, -l, -i ...) belong there")
        j = 1
        while j < len(w):
            flag = w[j]
            if flag in _FLAGS_IGNORED:
                j += 1
                continue
            if flag in "oFJpli" or flag in _ARGS_IGNORED or flag in "cmLRDWwbBIOQEs":
                arg = w[j + 1:]
                if not arg:
                    i += 1
                    if i >= len(words):
                        raise SSHConfigError(host.name, f"{setting}: -{flag} needs an argument")
                    arg = words[i]
                if flag == "o":
                    kw = _words(arg, setting, host.name)
                    cl.options.append((kw[0].lower(), kw[1:]))
                elif flag == "F":
                    cl.config_file = arg
                elif flag == "J":
                    if any(k in ("proxyjump", "proxycommand", "-J") for k, _ in cl.options):
                        raise SSHConfigError(host.name, f"{setting}: -J given with another ProxyJump/ProxyCommand",
                                             hint="ssh refuses that too: give one proxy")
                    cl.options.append(("-J", [arg]))
                elif flag == "p":
                    cl.options.append(("-p", [arg]))
                elif flag == "l":
                    cl.options.append(("-l", [arg]))
                elif flag == "i":
                    cl.options.append(("-i", [arg]))
                elif flag == "c":
                    cl.options.append(("ciphers", [arg]))
                elif flag == "m":
                    cl.options.append(("macs", [arg]))
                elif flag in _ARGS_IGNORED:
                    pass
                else:
                    raise SSHConfigError(host.name, f"{setting}: ssh -{flag} is not supported by fleetprobe",
                                         hint="fleetprobe opens one plain SSH session per host")
                break
            raise SSHConfigError(host.name, f"{setting}: ssh -{flag} is not supported by fleetprobe")
        i += 1
    return cl


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
    pre = _parse_ssh_args(host, host.ssh_pre_args, "ansible_ssh_args/ssh_args (ansible.cfg)")
    cl = _parse_ssh_args(host, host.ssh_args)
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
    if depth > 8:
        raise SSHConfigError(host.name, "ProxyJump chain longer than 8 hops (a loop?)")
    try:
        local_user = getpass.getuser()
    except (KeyError, OSError):
        local_user = str(os.getuid())
    ctx = _Ctx(host, name, local_user)
    opts = _Options()
    reader = _Reader(ctx, opts)
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
    hn = opts.get("hostname")
    hostname = _expand_hostname(hn, name) if hn else name
    port_s = opts.get("port") or "22"
    try:
        port = int(port_s)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise SSHConfigError(host.name, f"{opts.origin.get('port', 'Port')}: bad port {port_s!r}") from None
    user = opts.get("user") or local_user
    alias = opts.get("hostkeyalias")
    tokens = _token_map(hostname, name, str(port), user, local_user, alias)

    def listing(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = opts.values.get(key)
        if v is None:
            return default
        if [x.lower() for x in v] == ["none"]:
            return ()
        return tuple(_path(x, tokens, host.name, key_name(key)) for x in v)

    user_kh = listing("userknownhostsfile", (os.path.expanduser("~/.ssh/known_hosts"),
                                             os.path.expanduser("~/.ssh/known_hosts2")))
    global_kh = listing("globalknownhostsfile", (os.path.join(system_dir(), "ssh_known_hosts"),
                                                 os.path.join(system_dir(), "ssh_known_hosts2")))
    strict = (opts.get("stricthostkeychecking") or "ask").lower()
    strict = {"ask": "yes", "true": "yes", "false": "no", "off": "no", "on": "yes"}.get(strict, strict)
    if strict not in ("yes", "accept-new", "no"):
        raise SSHConfigError(host.name, f"{opts.origin.get('stricthostkeychecking')}: bad StrictHostKeyChecking "
                             f"{opts.get('stricthostkeychecking')!r}", hint="yes, accept-new, no or ask")
    hashed = _yes(opts.get("hashknownhosts"), host.name, "HashKnownHosts")
    explicit = bool(opts.identities)
    idents = [i for i in opts.identities if i.lower() != "none"] if explicit else list(_DEFAULT_IDENTITIES)
    identity_files = tuple(_path(i, tokens, host.name, "IdentityFile") for i in idents)
    agent = opts.get("identityagent")
    if agent is not None and agent.lower() != "none":
        agent = None if agent == "SSH_AUTH_SOCK" else _path(agent, tokens, host.name, "IdentityAgent")
    elif agent is not None:
        agent = "none"
    jump: Resolved | None = None
    proxy_command: str | None = None
    proxy = opts.values.get("proxy")
    if proxy and proxy[1].lower() != "none":
        if proxy[0] == "proxycommand":
            proxy_command = _expand_tokens(proxy[1], {"%": "%", "h": hostname, "n": name, "p": str(port), "r": user},
                                           host.name, "ProxyCommand")
        else:
            hops = [h.strip() for h in proxy[1].split(",") if h.strip()]
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
    alive = opts.get("serveraliveinterval")
    count = opts.get("serveralivecountmax")
    try:
        alive_i = int(alive) if alive else 0
        count_i = int(count) if count else 3
    except ValueError:
        raise SSHConfigError(host.name, f"bad ServerAliveInterval/ServerAliveCountMax ({alive!r}, {count!r})") from None
    return Resolved(alias=name, hostname=hostname, port=port, user=user, identity_files=identity_files,
                    identities_only=_yes(opts.get("identitiesonly"), host.name, "IdentitiesOnly"),
                    identity_agent=agent, user_known_hosts=user_kh, global_known_hosts=global_kh, strict=strict,
                    hash_known_hosts=hashed, host_key_alias=alias, jump=jump, proxy_command=proxy_command,
                    ciphers=opts.get("ciphers"), macs=opts.get("macs"), kex=opts.get("kexalgorithms"),
                    host_key_algorithms=opts.get("hostkeyalgorithms"), server_alive_interval=alive_i,
                    server_alive_count_max=count_i, explicit_identities=explicit)


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


# --- known_hosts --------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnownKeys:
    """What known_hosts says about one lookup name: trusted keys, CA keys, revoked keys (``type base64``)."""

    keys: tuple[tuple[str, str], ...]
    ca_keys: tuple[tuple[str, str], ...]
    revoked: tuple[tuple[str, str], ...]

    @property
    def any(self) -> bool:
        return bool(self.keys or self.ca_keys)


def _host_matches(field_: str, name: str) -> bool:
    if field_.startswith("|1|"):
        try:
            _, _, salt, digest = field_.split("|")
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(mac, base64.b64decode(digest))
        except (ValueError, TypeError):
            return False
    return _match_pattern_list(name, [field_])


@dataclass
class _ParsedKnownHosts:
    """One known_hosts file: entries by plain host name, and the others (patterns, hashed) to scan."""

    exact: dict[str, list[tuple[str | None, str, str]]] = field(default_factory=dict)
    scan: list[tuple[str, str | None, str, str]] = field(default_factory=list)


#: Parsed known_hosts files by (path, mtime, size, inode): a fleet's connections look up one file
#: again and again, and parsing it for each would cost O(hosts^2) (bench/fanout.py, issue 5).
_KH_CACHE: dict[tuple[str, int, int, int], _ParsedKnownHosts] = {}


def _parsed(path: str) -> _ParsedKnownHosts | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # a file that does not exist (yet) holds nothing, as for ssh
    key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    got = _KH_CACHE.get(key)
    if got is not None:
        return got
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    parsed = _ParsedKnownHosts()
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        marker = None
        if parts[0].startswith("@"):
            marker, parts = parts[0], parts[1:]
        if len(parts) < 3:
            continue
        names = parts[0]
        if names.startswith("|") or any(c in names for c in "*?!"):
            parsed.scan.append((names, marker, parts[1], parts[2]))
        else:
            for n in names.split(","):
                parsed.exact.setdefault(n.lower(), []).append((marker, parts[1], parts[2]))
    if len(_KH_CACHE) >= 64:
        _KH_CACHE.clear()
    _KH_CACHE[key] = parsed
    return parsed


def lookup(files: tuple[str, ...], name: str) -> KnownKeys:
    """Every entry for ``name`` in ``files`` (files that do not exist hold nothing)."""
    keys: list[tuple[str, str]] = []
    cas: list[tuple[str, str]] = []
    revoked: list[tuple[str, str]] = []
    for f in files:
        parsed = _parsed(f)
        if parsed is None:
            continue
        hits = list(parsed.exact.get(name.lower(), []))
        hits += [(m, t, k) for names, m, t, k in parsed.scan if _host_matches(names, name)]
        for marker, kind, b64 in hits:
            if marker == "@revoked":
                revoked.append((kind, b64))
            elif marker == "@cert-authority":
                cas.append((kind, b64))
            elif marker is None:
                keys.append((kind, b64))
    return KnownKeys(tuple(keys), tuple(cas), tuple(revoked))


def known_keys(r: Resolved) -> KnownKeys:
    """known_hosts entries for a resolved connection (user files, then global ones)."""
    return lookup(r.user_known_hosts + r.global_known_hosts, r.known_hosts_name)


def check_host_key(r: Resolved, key_type: str, key_b64: str) -> str:
    """OpenSSH's verdict on a server key: ``ok``, ``revoked``, ``changed`` (other keys known for the name),
    ``unknown`` (nothing known: accept-new may record it), or ``untrusted`` (UserKnownHostsFile none)."""
    known = known_keys(r)
    if (key_type, key_b64) in known.revoked:
        return "revoked"
    if (key_type, key_b64) in known.keys:
        return "ok"
    if known.any:
        return "changed"
    if not r.user_known_hosts:
        return "untrusted"
    return "unknown"


def may_record(r: Resolved) -> bool:
    """Whether an unknown key may be accepted and recorded (accept-new or no; never with no known_hosts file)."""
    return r.strict in ("accept-new", "no") and bool(r.user_known_hosts)


def host_key_line(r: Resolved, key_type: str, key_b64: str, salt: bytes | None = None) -> str:
    """The line ssh would append for this key: the lookup name, hashed if HashKnownHosts."""
    name = r.known_hosts_name
    if r.hash_known_hosts:
        salt = salt or os.urandom(20)
        mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        name = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(mac).decode()}"
    return f"{name} {key_type} {key_b64}\n"


def record_host_key(r: Resolved, key_type: str, key_b64: str) -> str:
    """Append the key to the first UserKnownHostsFile (created 0600, its directory 0700, as ssh does)."""
    target = Path(r.user_known_hosts[0])
    line = host_key_line(r, key_type, key_b64)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(line)
    return line
