"""ssh_config files read as OpenSSH reads them: Host/Match blocks, Include, first value wins, and
the expansion of %-tokens and ${VAR} in the values."""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import os
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..inventory import Host
from .model import SSHConfigError, system_dir


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

DEFAULT_IDENTITIES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk", "~/.ssh/id_ed25519",
                       "~/.ssh/id_ed25519_sk", "~/.ssh/id_xmss", "~/.ssh/id_dsa")


@dataclass
class Options:
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
class Ctx:
    host: Host
    original: str          # the name given to ssh (%n)
    local_user: str
    final: bool = False


#: Keywords whose value is the rest of the line as written (readconf.c keeps it unsplit, quotes and all).
_RAW = {"proxycommand", "localcommand", "remotecommand", "knownhostscommand"}


def option_words(line: str, where: str, host: str) -> list[str]:
    """A config line's keyword and arguments (``key=value`` or ``key value``, quotes, trailing comment);
    for a command keyword, its one argument is the rest of the line unsplit, as ssh keeps it."""
    words = _split_line(line)
    if isinstance(words, str):
        raise SSHConfigError(host, f"{where}: {words}")
    return list(words)


@functools.lru_cache(maxsize=4096)
def _split_line(line: str) -> tuple[str, ...] | str:
    """:func:`option_words` without the host (cached: every host of a fleet reads the same lines), or the error."""
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


def match_pattern_list(name: str, patterns: list[str]) -> bool:
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


class Reader:
    """Reads OpenSSH config files into Options for one host (readconf.c's semantics)."""

    def __init__(self, ctx: Ctx, opts: Options) -> None:
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
        words = option_words(line, where, self.ctx.host.name)
        key, args = words[0].lower(), words[1:]
        if key == "host":
            return match_pattern_list(self.ctx.original, args)
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
                    ok = match_pattern_list(expand_hostname(hn, self.ctx.original) if hn else self.ctx.original,
                                             [arg])
                elif crit == "originalhost":
                    ok = match_pattern_list(self.ctx.original, [arg])
                elif crit == "user":
                    ok = match_pattern_list(self.opts.get("user") or self.ctx.local_user, [arg])
                elif crit == "localuser":
                    ok = match_pattern_list(self.ctx.local_user, [arg])
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
        hostname = expand_hostname(hn, self.ctx.original) if hn else self.ctx.original
        port = self.opts.get("port") or "22"
        user = self.opts.get("user") or self.ctx.local_user
        return expand_tokens(text, token_map(hostname, self.ctx.original, port, user, self.ctx.local_user, None),
                              self.ctx.host.name, "Match exec")


#: OpenSSH's spelling of the lower-cased keywords messages name (one dict, not one per call).
_KEY_NAMES = {"stricthostkeychecking": "StrictHostKeyChecking", "userknownhostsfile": "UserKnownHostsFile",
              "proxyjump": "ProxyJump", "proxycommand": "ProxyCommand", "localforward": "LocalForward",
              "remoteforward": "RemoteForward", "dynamicforward": "DynamicForward", "remotecommand": "RemoteCommand",
              "knownhostscommand": "KnownHostsCommand", "bindaddress": "BindAddress", "bindinterface": "BindInterface",
              "certificatefile": "CertificateFile", "pkcs11provider": "PKCS11Provider", "checkhostip": "CheckHostIP",
              "verifyhostkeydns": "VerifyHostKeyDNS", "canonicalizehostname": "CanonicalizeHostname",
              "tunnel": "Tunnel", "addressfamily": "AddressFamily", "proxyusefdpass": "ProxyUseFdpass",
              "securitykeyprovider": "SecurityKeyProvider"}


def key_name(key: str) -> str:
    """OpenSSH's spelling of a lower-cased keyword, for messages."""
    return _KEY_NAMES.get(key, key)


def expand_hostname(value: str, original: str) -> str:
    return value.replace("%%", "\0").replace("%h", original).replace("\0", "%")


@functools.lru_cache(maxsize=1)
def _local_hostname() -> str:
    return socket.gethostname()


def token_map(hostname: str, original: str, port: str, user: str, local_user: str,
               alias: str | None) -> dict[str, str]:
    long_host = _local_hostname()
    home = os.path.expanduser("~")
    c = hashlib.sha1(f"{long_host}{hostname}{port}{user}".encode()).hexdigest()
    return {"%": "%", "h": hostname, "n": original, "p": port, "r": user, "u": local_user, "d": home,
            "l": long_host, "L": long_host.split(".")[0], "i": str(os.getuid()), "C": c,
            "k": alias or original}


def expand_tokens(text: str, tokens: dict[str, str], host: str, setting: str) -> str:
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


def expand_path(text: str, tokens: dict[str, str], host: str, setting: str) -> str:
    return os.path.expanduser(_expand_env(expand_tokens(text, tokens, host, setting), host, setting))
