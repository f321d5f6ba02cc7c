"""Inventory: which hosts to probe and how to reach them.

Reads every inventory source Ansible reads, as ansible-core reads it
(:mod:`fleetprobe.ansible_inventory`: YAML, INI, directories, scripts,
``ansible-inventory --list`` JSON, group_vars/host_vars), and the ad-hoc form
``-i host1,user@host2:2222,``.  ``--limit`` evaluates Ansible's host patterns
exactly as ansible-core does (:func:`select_ordered`).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ansible_inventory
from .errors import InventoryError


@dataclass(frozen=True)
class Host:
    """One host of the fleet and how to reach it.

    ``name`` is the inventory name (used in reports); ``address`` what to
    connect to.  ``known_hosts`` is a known_hosts file to trust for this host
    and its jump hosts (``fleetprobe_known_hosts``; None: what OpenSSH's config
    says); ``jump`` a ProxyJump spec (``fleetprobe_jump``: ``user@bastion:22``,
    comma-separated for a chain).  ``ssh_args`` are the words of
    ``ansible_ssh_common_args`` and ``ansible_ssh_extra_args``, ``ssh_pre_args``
    those of ``ansible_ssh_args`` (ansible.cfg's ``ssh_args``) and host_key_checking,
    applied as ssh applies them (:mod:`fleetprobe.sshconfig`).  ``connection`` is
    ``ansible_connection``.  ``become`` runs the on-host part under ``sudo -n``
    when the login user is not root.
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
    ssh_args: tuple[str, ...] = ()
    connection: str | None = None
    ssh_pre_args: tuple[str, ...] = ()

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
        selected = set(select_ordered(self, pattern))
        if not selected:
            raise InventoryError(f"--limit {pattern!r} matches no host",
                                 where=self.source or "inventory",
                                 hint=f"groups: {', '.join(sorted(self.groups)) or '(none)'}; "
                                      f"hosts: {', '.join(h.name for h in self.hosts[:8])}"
                                      f"{' ...' if len(self.hosts) > 8 else ''}")
        return Inventory(tuple(h for h in self.hosts if h.name in selected),
                         self.groups, self.source)


def expand_host_pattern(name: str) -> list[str]:
    """Expand Ansible's ``web[01:03]`` / ``x[a:c]`` / ``h[1:9:2]`` ranges (zero padding kept)."""
    return ansible_inventory.expand_host_pattern(name)


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
        hosts.append(Host(name=name, address=addr, port=port, user=user, groups=("all", "ungrouped")))
    if not hosts:
        raise InventoryError("no hosts given", where="-i", hint="e.g. -i db1,db2,admin@db3:2222")
    _check_unique(hosts, "-i")
    names = tuple(h.name for h in hosts)
    return Inventory(tuple(hosts), {"all": names, "ungrouped": names}, "-i")


def _port(text: str, raw: str, where: str) -> int:
    """A TCP port from text, or an InventoryError naming where it came from."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise InventoryError(f"bad port {text!r} in {raw!r}", where=where, hint="a port is 1-65535")
    return port


def load_inventory(source: str | Sequence[str] | None = None, *, reader: str = "builtin") -> Inventory:
    """Load inventory sources as Ansible does.

    ``source``: one ``-i`` value or several (each an inventory file, directory or script, or a
    comma list of hosts); None: Ansible's default (ANSIBLE_INVENTORY, ansible.cfg's ``inventory``,
    /etc/ansible/hosts).  ``reader``: ``builtin`` (fleetprobe's reading of the static formats) or
    ``ansible`` (the installed ansible-core reads them: Jinja, vault, plugins).  ansible.cfg's
    ``remote_user`` and ``private_key_file`` apply to hosts that set no user or key.
    """
    cfg = ansible_inventory.ansible_config()
    sources = list(cfg.inventory) if source is None else [source] if isinstance(source, str) else list(source)
    label = ",".join(sources)
    if reader not in ("builtin", "ansible"):
        raise InventoryError(f"unknown inventory reader {reader!r}", where="--inventory-reader",
                             hint="builtin or ansible")
    if reader == "builtin" and len(sources) == 1 and ansible_inventory.looks_like_host_list(sources[0]):
        return parse_adhoc(sources[0])
    defaults = cfg.defaults()
    if reader == "ansible":
        for s in sources:
            if not ansible_inventory.looks_like_host_list(s) and not Path(s).expanduser().exists():
                raise InventoryError("inventory source not found", where=s)
        reading = ansible_inventory.load_with_ansible(sources)
        hosts = []
        for name, hv, groups in reading.hosts:
            merged = {**defaults, **hv}
            hosts.append(_host_from_vars(name, merged, tuple(groups), label))
        inv = Inventory(tuple(hosts), {g: tuple(m) for g, m in reading.groups.items()}, label)
    else:
        data = ansible_inventory.InventoryData()
        for s in sources:
            if ansible_inventory.looks_like_host_list(s):
                for h in parse_adhoc(s).hosts:
                    data.add_host(h.address, "ungrouped", "-i")
                    if h.port is not None:
                        data.set_host_var(h.address, "ansible_port", h.port, "-i")
                    if h.user is not None:
                        data.set_host_var(h.address, "ansible_user", h.user, "-i")
            else:
                ansible_inventory.add_source(data, s)
        data.reconcile()
        all_vars = data.host_vars(defaults)
        memberships = data.host_groups()
        order = data.group_hosts("all")
        hosts = []
        for name in order:
            hv, origin = all_vars[name]
            ansible_inventory.check_evaluable(name, hv, origin)
            hosts.append(_host_from_vars(name, hv, tuple(memberships[name]), origin.get("ansible_port", label)))
        inv = Inventory(tuple(hosts), {g: tuple(data.group_hosts(g)) for g in data.groups}, label)
    if not inv.hosts:
        raise InventoryError("inventory has no hosts", where=label)
    return inv


def parse_inventory(data: Any, source: str) -> Inventory:
    """Build an inventory from parsed YAML in Ansible's layout (no group_vars/host_vars: no directory)."""
    inv = ansible_inventory.InventoryData()
    ansible_inventory.parse_yaml_groups(inv, data, source)
    inv.reconcile()
    all_vars = inv.host_vars()
    memberships = inv.host_groups()
    hosts = []
    for name in inv.group_hosts("all"):
        hv, origin = all_vars[name]
        ansible_inventory.check_evaluable(name, hv, origin)
        hosts.append(_host_from_vars(name, hv, tuple(memberships[name]), source))
    if not hosts:
        raise InventoryError("inventory has no hosts", where=source)
    return Inventory(tuple(hosts), {g: tuple(inv.group_hosts(g)) for g in inv.groups}, source)


def _truthy(value: Any) -> bool:
    """Ansible's booleans: true/yes/1/on."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y")
    return bool(value)


def ssh_args_of(name: str, hv: dict[str, Any], source: str,
                keys: tuple[str, ...] = ("ansible_ssh_common_args", "ansible_ssh_extra_args")) -> tuple[str, ...]:
    """The words of ``ansible_ssh_common_args`` then ``ansible_ssh_extra_args``, as Ansible's ssh plugin adds them."""
    words: list[str] = []
    for key in keys:
        value = hv.get(key)
        if value in (None, ""):
            continue
        try:
            words.extend(shlex.split(str(value)))
        except ValueError as exc:
            raise InventoryError(f"{key} of host {name!r} cannot be split into words: {exc}", where=source,
                                 hint="check its quotes") from None
    return tuple(words)


def _pre_args(name: str, hv: dict[str, Any], source: str) -> tuple[str, ...]:
    """What Ansible's ssh plugin puts before its own -o Port/-o User: ``ssh_args`` (ansible.cfg, or
    ``ansible_ssh_args``; its default ``-C -o ControlMaster=auto -o ControlPersist=60s`` changes nothing
    for fleetprobe), then ``-o StrictHostKeyChecking=no`` when host_key_checking is off."""
    words = list(ssh_args_of(name, hv, source, ("ansible_ssh_args",)))
    checking = hv.get("ansible_host_key_checking", hv.get("ansible_ssh_host_key_checking"))
    if checking is not None and not ansible_inventory.ansible_bool(checking):
        words += ["-o", "StrictHostKeyChecking=no"]
    return tuple(words)


def _host_from_vars(name: str, hv: dict[str, Any], groups: tuple[str, ...], source: str) -> Host:
    """Turn Ansible host variables into a Host."""
    port = hv.get("ansible_port", hv.get("ansible_ssh_port"))
    if port is not None:
        port = _port(str(port), f"ansible_port of {name}", source)
    jump = hv.get("fleetprobe_jump")
    known = hv.get("fleetprobe_known_hosts")
    become = _truthy(hv.get("ansible_become", hv.get("become", False)))
    key = hv.get("ansible_ssh_private_key_file", hv.get("ansible_private_key_file"))
    password = hv.get("ansible_password", hv.get("ansible_ssh_pass"))
    return Host(
        name=name,
        address=str(hv.get("ansible_host", hv.get("ansible_ssh_host", name))),
        port=port,
        user=(str(hv["ansible_user"]) if "ansible_user" in hv
              else str(hv["ansible_ssh_user"]) if "ansible_ssh_user" in hv else None),
        key_file=str(Path(str(key)).expanduser()) if key else None,
        password=str(password) if password else None,
        become=become,
        become_user=str(hv.get("ansible_become_user", "root")),
        known_hosts=str(Path(str(known)).expanduser()) if known else None,
        jump=str(jump) if jump else None,
        groups=groups,
        vars=hv,
        ssh_args=ssh_args_of(name, hv, source),
        ssh_pre_args=_pre_args(name, hv, source),
        connection=str(hv["ansible_connection"]) if hv.get("ansible_connection") else None,
    )


def _check_unique(hosts: list[Host], where: str) -> None:
    """Refuse two hosts with one name: reports are keyed by it."""
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise InventoryError(f"host {h.name!r} is listed twice", where=where)
        seen.add(h.name)


def select_hosts(inv: Inventory, pattern: str) -> set[str]:
    """The host names an Ansible ``--limit`` pattern selects (see :func:`select_ordered`)."""
    return set(select_ordered(inv, pattern))


def split_host_pattern(pattern: str) -> list[str]:
    """ansible-core's split_host_pattern: commas separate; else ``:`` does, unless the whole is one address."""
    if "," in pattern:
        parts = pattern.split(",")
    elif _one_address(pattern):
        parts = [pattern]
    else:
        parts = re.findall(r"(?:[^\s:\[\]]|\[[^\]]*\])+", pattern)
    return [p.strip() for p in parts if p.strip()]


_HOSTNAME = re.compile(r"^(?:(?:[\w]|\[[0-9a-z]+:[0-9a-z]+(?::[0-9]+)?\])(?:[\w_-]|\[[0-9a-z]+:[0-9a-z]+(?::[0-9]+)?\])*"
                       r"(?<![_-])\.?)+$", re.IGNORECASE)


def _one_address(pattern: str) -> bool:
    """parse_address(pattern, allow_ranges=True) succeeds: a host name, IPv4/IPv6 address, host:port or [host]:port."""
    host = pattern
    m = re.match(r"^\[(.+)\]:([0-9]+)$", pattern) or re.match(r"^((?:[^:\[\]]|\[[^\]]*\])+):([0-9]+)$", pattern)
    if m:
        host = m.group(1)
    if re.fullmatch(r"[0-9a-f:.\[\]]+", host, re.IGNORECASE) and host.count(":") >= 2:
        return True  # an IPv6 address (possibly with ranges)
    return _HOSTNAME.match(host) is not None


_SUBSCRIPT = re.compile(r"^(.+)\[(?:(-?[0-9]+)|([0-9]+)([:-])([0-9]*))\]$")


def select_ordered(inv: Inventory, pattern: str, *, base: Path | None = None) -> list[str]:
    """Evaluate ``--limit PATTERN`` exactly as ansible-core's InventoryManager.subset + get_hosts("all") does.

    Patterns: group or host names, globs, ``~regex`` (matched from the start), ``a:b`` / ``a,b``
    (union), ``&a`` (intersection), ``!a`` (exclusion: applied after every union and intersection,
    whatever their order), ``group[i]`` / ``group[i:j]`` / ``group[i:]`` subscripts, ``@file``
    (one pattern a line).  Hosts come back in inventory order.
    """
    patterns: list[str] = []
    for x in split_host_pattern(pattern):
        if x.startswith("@"):
            path = Path(x[1:]).expanduser()
            if base is not None and not path.is_absolute():
                path = base / path
            if not path.exists():
                raise InventoryError("limit file not found", where=x[1:])
            if not path.is_file():
                raise InventoryError("a limit starting with @ must be a file, not a directory", where=x[1:])
            try:
                patterns.extend(line.strip() for line in path.read_text().split("\n"))
            except (OSError, UnicodeDecodeError) as exc:
                raise InventoryError(f"cannot read limit file: {exc}", where=x[1:]) from None
        else:
            patterns.append(x)
    chosen = set(_evaluate(inv, patterns))
    return [h.name for h in inv.hosts if h.name in chosen]


def _evaluate(inv: Inventory, patterns: list[str]) -> list[str]:
    """_evaluate_patterns: the plain ones first, then the &s, then the !s."""
    regular = [p for p in patterns if p and p[0] not in "!&"]
    ordered = (regular or ["all"]) + [p for p in patterns if p and p[0] == "&"] + [p for p in patterns if p and p[0] == "!"]
    names = {h.name for h in inv.hosts}
    hosts: list[str] = []
    for p in ordered:
        if p in names:
            hosts.append(p)
            continue
        that = _match_one_pattern(inv, p)
        if p[0] == "!":
            drop = set(that)
            hosts = [h for h in hosts if h not in drop]
        elif p[0] == "&":
            keep = set(that)
            hosts = [h for h in hosts if h in keep]
        else:
            have = set(hosts)
            hosts.extend(h for h in that if h not in have)
    return list(dict.fromkeys(hosts))


def _match_one_pattern(inv: Inventory, pattern: str) -> list[str]:
    """One pattern (its & or ! dropped): a subscript applied to what the rest of it matches."""
    if pattern[0] in "&!":
        pattern = pattern[1:]
    expr, subscript = pattern, None
    if pattern and pattern[0] != "~":
        m = _SUBSCRIPT.match(pattern)
        if m:
            expr, idx, start, _sep, end = m.groups()
            subscript = (int(idx), None) if idx else (int(start), int(end) if end else -1)
    hosts = _enumerate_matches(inv, expr)
    if not hosts or subscript is None:
        return hosts
    first, last = subscript
    try:
        if last:
            if last == -1:
                last = len(hosts) - 1
            return hosts[first:last + 1]
        return [hosts[first]]
    except IndexError:
        raise InventoryError(f"no hosts matched the subscripted pattern {pattern!r}", where="--limit") from None


def _match_list(items: Iterable[str], pattern: str) -> list[str]:
    """Names matching a glob, or ``~regex`` (re.match: anchored at the start, as Ansible does)."""
    try:
        rx = re.compile(fnmatch.translate(pattern) if pattern[0] != "~" else pattern[1:])
    except re.error as exc:
        raise InventoryError(f"invalid host pattern {pattern!r}: {exc}", where="--limit") from None
    return [i for i in items if rx.match(i)]


def _enumerate_matches(inv: Inventory, pattern: str) -> list[str]:
    """Groups the pattern names (all their hosts), and hosts it names when no group matched or it is a glob/regex."""
    if not pattern:
        return []
    results: list[str] = []
    groups = _match_list(inv.groups, pattern)
    for g in groups:
        results.extend(inv.groups[g])
    if not groups or pattern[0] == "~" or any(c in pattern for c in ".?*["):
        results.extend(_match_list([h.name for h in inv.hosts], pattern))
    return results
