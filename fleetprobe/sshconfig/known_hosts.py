"""known_hosts read and written as OpenSSH does (lookup name, hashed entries, patterns, CA and revoked keys)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from .configfile import match_pattern_list
from .model import Resolved


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
    return match_pattern_list(name, [field_])


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
