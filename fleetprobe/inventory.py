"""Inventory: which hosts to probe and how to reach them.

Reads Ansible's YAML inventory layout unchanged (``all: hosts: / children: /
vars:``, Ansible's ``ansible_*`` connection variables, ``db[01:20]`` ranges)
and the ad-hoc form ``-i host1,user@host2:2222``.  ``--limit`` takes
Ansible's patterns: ``web``, ``db*``, ``a:b`` (union), ``a:&b``
(intersection), ``a:!b`` (exclusion), also comma-separated.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InventoryError


@dataclass(frozen=True)
class Host:
    """One host of the fleet and how to reach it.

    ``name`` is the inventory name (used in reports); ``address`` what to
    connect to.  ``known_hosts`` is a known_hosts file to trust for this host
    (None: the user's OpenSSH defaults); ``jump`` an OpenSSH ProxyJump spec
    (``user@bastion:22``, comma-separated for a chain).  ``become`` runs the
    on-host part under ``sudo -n`` when the login user is not root.
    """

    name: str
    address: str
    port: int | None = None
    user: str | None = None
    key_file: str | None = None
    password: str | None = field(default=None, repr=False)
    become: bool = False
    become_user: str = "root"
    known_hosts: str | None = None
    jump: str | None = None
    groups: tuple[str, ...] = ()
    vars: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def target(self) -> str:
        """``user@address:port`` as a human would type it (for messages)."""
        t = self.address if self.user is None else f"{self.user}@{self.address}"
        return t if self.port is None else f"{t}:{self.port}"


@dataclass(frozen=True)
class Inventory:
    """The hosts in inventory order, and the groups each belongs to."""

    hosts: tuple[Host, ...]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    def limit(self, pattern: str | None) -> Inventory:
        """Hosts selected by an Ansible-style pattern (None or ``all``: every host)."""
        if not pattern or pattern.strip() in ("all", "*"):
            return self
        selected = select_hosts(self, pattern)
        if not selected:
            raise InventoryError(f"--limit {pattern!r} matches no host",
                                 where=self.source or "inventory",
                                 hint=f"groups: {', '.join(sorted(self.groups)) or '(none)'}; "
                                      f"hosts: {', '.join(h.name for h in self.hosts[:8])}"
                                      f"{' ...' if len(self.hosts) > 8 else ''}")
        return Inventory(tuple(h for h in self.hosts if h.name in selected),
                         self.groups, self.source)


_RANGE = re.compile(r"\[(\d+):(\d+)\]|\[([a-z]):([a-z])\]")


def expand_host_pattern(name: str) -> list[str]:
    """Expand Ansible's ``web[01:03]`` / ``x[a:c]`` ranges (zero padding kept)."""
    m = _RANGE.search(name)
    if not m:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    if m.group(1) is not None:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = [chr(c) for c in range(ord(m.group(3)), ord(m.group(4)) + 1)]
    out: list[str] = []
    for item in items:
        out.extend(expand_host_pattern(head + item + tail))
    return out


def parse_adhoc(spec: str) -> Inventory:
    """Parse ``-i host1,user@host2:2222,[::1]:22`` into an inventory (group ``ungrouped``)."""
    hosts: list[Host] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        user = None
        if "@" in item:
            user, item = item.rsplit("@", 1)
        port: int | None = None
        if item.startswith("["):
            addr, _, rest = item[1:].partition("]")
            if rest.startswith(":"):
                port = _port(rest[1:], raw, "-i")
        elif item.count(":") == 1:
            addr, p = item.split(":")
            port = _port(p, raw, "-i")
        else:
            addr = item
        if not addr:
            raise InventoryError(f"empty host name in {raw!r}", where="-i")
        name = addr if port is None else f"{addr}:{port}"
        hosts.append(Host(name=name, address=addr, port=port, user=user, groups=("ungrouped",)))
    if not hosts:
        raise InventoryError("no hosts given", where="-i", hint="e.g. -i db1,db2,admin@db3:2222")
    _check_unique(hosts, "-i")
    return Inventory(tuple(hosts), {"ungrouped": tuple(h.name for h in hosts)}, "-i")


def _port(text: str, raw: str, where: str) -> int:
    """A TCP port from text, or an InventoryError naming where it came from."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise InventoryError(f"bad port {text!r} in {raw!r}", where=where, hint="a port is 1-65535")
    return port


def load_inventory(source: str) -> Inventory:
    """Load ``source``: a YAML inventory file, or an ad-hoc comma list of hosts."""
    path = Path(source).expanduser()
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise InventoryError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where) from None
        except OSError as exc:
            raise InventoryError(f"cannot read: {exc.strerror}", where=str(path)) from None
        return parse_inventory(data, str(path))
    if "," in source or not (source.endswith((".yml", ".yaml", ".ini")) or "/" in source):
        return parse_adhoc(source)
    raise InventoryError("inventory file not found", where=source,
                         hint="give a YAML inventory file, or hosts as -i host1,host2,")


def parse_inventory(data: Any, source: str) -> Inventory:
    """Build an inventory from parsed YAML in Ansible's layout."""
    if data is None:
        raise InventoryError("inventory is empty", where=source)
    if not isinstance(data, dict):
        raise InventoryError("inventory must be a mapping of groups (all: hosts: ...)", where=source)
    # Ansible's precedence: host vars > deeper group vars > shallower group vars > all.
    explicit: dict[str, dict[str, Any]] = {}
    group_layers: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
    host_groups: dict[str, list[str]] = {}
    order: list[str] = []
    groups: dict[str, set[str]] = {}
    seq = 0

    def walk(group: str, body: Any, lineage: tuple[str, ...]) -> set[str]:
        nonlocal seq
        if group in lineage:
            raise InventoryError(f"group {group!r} contains itself", where=source)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InventoryError(f"group {group!r} must be a mapping with hosts:/children:/vars:",
                                 where=source)
        unknown = set(body) - {"hosts", "children", "vars"}
        if unknown:
            raise InventoryError(f"group {group!r} has unknown key(s) {sorted(unknown)}", where=source,
                                 hint="a group holds hosts:, children: and vars:")
        own = body.get("vars") or {}
        if not isinstance(own, dict):
            raise InventoryError(f"vars of group {group!r} must be a mapping", where=source)
        seq += 1
        layer = (len(lineage), seq, own)
        members: set[str] = set()
        hosts = body.get("hosts") or {}
        if isinstance(hosts, list):
            hosts = {h: None for h in hosts}
        if not isinstance(hosts, dict):
            raise InventoryError(f"hosts of group {group!r} must be a mapping", where=source)
        for pattern, hv in hosts.items():
            if hv is not None and not isinstance(hv, dict):
                raise InventoryError(f"host {pattern!r} in group {group!r}: variables must be a mapping",
                                     where=source)
            for name in expand_host_pattern(str(pattern)):
                if name not in explicit:
                    explicit[name] = {}
                    host_groups[name] = []
                    order.append(name)
                explicit[name].update(hv or {})
                host_groups[name].append(group)
                members.add(name)
        children = body.get("children") or {}
        if not isinstance(children, dict):
            raise InventoryError(f"children of group {group!r} must be a mapping", where=source)
        for child, cbody in children.items():
            members |= walk(str(child), cbody, lineage + (group,))
        for name in members:
            group_layers.setdefault(name, []).append(layer)
        groups.setdefault(group, set()).update(members)
        return members

    top = data if "all" in data else {"all": {"children": data}}
    for gname, gbody in top.items():
        walk(str(gname), gbody, ())
    host_vars: dict[str, dict[str, Any]] = {}
    for name in order:
        merged: dict[str, Any] = {}
        for _depth, _seq, gv in sorted(group_layers.get(name, []), key=lambda t: (t[0], t[1])):
            merged.update(gv)
        merged.update(explicit[name])
        host_vars[name] = merged
    hosts = [_host_from_vars(name, host_vars[name], tuple(host_groups[name]), source) for name in order]
    if not hosts:
        raise InventoryError("inventory has no hosts", where=source)
    return Inventory(tuple(hosts), {g: tuple(sorted(m)) for g, m in groups.items()}, source)


def _truthy(value: Any) -> bool:
    """Ansible's booleans: true/yes/1/on."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y")
    return bool(value)


def _ssh_args(text: str) -> dict[str, str]:
    """The OpenSSH options fleetprobe honours from ``ansible_ssh_common_args``/``extra_args``."""
    out: dict[str, str] = {}
    try:
        words = shlex.split(text)
    except ValueError:
        return out
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-J" and i + 1 < len(words):
            out["proxyjump"] = words[i + 1]
            i += 2
            continue
        if w.startswith("-o"):
            opt = w[2:] or (words[i + 1] if i + 1 < len(words) else "")
            i += 1 if w[2:] else 2
            key, sep, val = opt.partition("=")
            if not sep:
                key, _, val = opt.partition(" ")
            out[key.strip().lower()] = val.strip()
            continue
        i += 1
    return out


def _host_from_vars(name: str, hv: dict[str, Any], groups: tuple[str, ...], source: str) -> Host:
    """Turn Ansible host variables into a Host."""
    port = hv.get("ansible_port", hv.get("ansible_ssh_port"))
    if port is not None:
        port = _port(str(port), f"ansible_port of {name}", source)
    opts = _ssh_args(" ".join(str(hv.get(k, "")) for k in ("ansible_ssh_common_args", "ansible_ssh_extra_args")))
    jump = hv.get("fleetprobe_jump") or opts.get("proxyjump")
    known = hv.get("fleetprobe_known_hosts") or opts.get("userknownhostsfile")
    become = _truthy(hv.get("ansible_become", hv.get("become", False)))
    return Host(
        name=name,
        address=str(hv.get("ansible_host", hv.get("ansible_ssh_host", name))),
        port=port,
        user=(str(hv["ansible_user"]) if "ansible_user" in hv
              else str(hv["ansible_ssh_user"]) if "ansible_ssh_user" in hv else None),
        key_file=str(Path(str(hv["ansible_ssh_private_key_file"])).expanduser())
        if hv.get("ansible_ssh_private_key_file") else None,
        password=str(hv["ansible_password"]) if hv.get("ansible_password") else None,
        become=become,
        become_user=str(hv.get("ansible_become_user", "root")),
        known_hosts=str(Path(str(known)).expanduser()) if known else None,
        jump=str(jump) if jump else None,
        groups=groups,
        vars=hv,
    )


def _check_unique(hosts: list[Host], where: str) -> None:
    """Refuse two hosts with one name: reports are keyed by it."""
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise InventoryError(f"host {h.name!r} is listed twice", where=where)
        seen.add(h.name)


def select_hosts(inv: Inventory, pattern: str) -> set[str]:
    """Evaluate an Ansible host pattern against the inventory; returns host names."""
    names = [h.name for h in inv.hosts]
    result: set[str] = set()
    first = True
    for part in re.split(r"[,:]", pattern):
        part = part.strip()
        if not part:
            continue
        op = "|"
        if part[0] in "&!":
            op, part = part[0], part[1:]
        matched = _match_one(inv, names, part)
        if op == "&":
            result &= matched
        elif op == "!":
            if first:
                result = set(names)
            result -= matched
        else:
            result |= matched
        first = False
    return result


def _match_one(inv: Inventory, names: list[str], term: str) -> set[str]:
    """Hosts matched by one pattern term: a group, a host, a glob, or ``~regex``."""
    if term.startswith("~"):
        rx = re.compile(term[1:])
        return {n for n in names if rx.search(n)}
    if term in inv.groups:
        return set(inv.groups[term])
    if term in names:
        return {term}
    out = {n for n in names if fnmatch.fnmatchcase(n, term)}
    for g, members in inv.groups.items():
        if fnmatch.fnmatchcase(g, term):
            out |= set(members)
    return out
