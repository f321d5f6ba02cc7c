"""The inventory model: ansible-core's InventoryData reduced to what fleetprobe needs, variable
precedence, and host patterns (ranges, host:port)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InventoryError
from .files import find_vars_files, read_yaml

@dataclass
class _Group:
    name: str
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    depth: int = 0
    priority: int = 1


@dataclass
class _HostData:
    name: str
    vars: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)


@dataclass
class InventoryData:
    """Groups and hosts as ansible-core holds them (insertion order kept)."""

    groups: dict[str, _Group] = field(default_factory=dict)
    hosts: dict[str, _HostData] = field(default_factory=dict)
    #: Directories whose group_vars/ and host_vars/ apply (one per source, in source order).
    var_dirs: list[Path] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.add_group("all")
        self.add_group("ungrouped")
        self.add_child("all", "ungrouped", "(built in)")

    def add_group(self, name: str) -> None:
        if name not in self.groups:
            self.groups[name] = _Group(name)

    def add_host(self, name: str, group: str | None, where: str) -> _HostData:
        if not name:
            raise InventoryError("empty host name", where=where)
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = _HostData(name)
        if group is not None:
            self.add_group(group)
            if name not in self.groups[group].hosts:
                self.groups[group].hosts.append(name)
        return host

    def add_child(self, parent: str, child: str, where: str) -> None:
        self.add_group(parent)
        self.add_group(child)
        p, c = self.groups[parent], self.groups[child]
        if parent == child or parent in self._descendants(child):
            raise InventoryError(f"group {parent!r} contains itself (through {child!r})", where=where)
        if child not in p.children:
            p.children.append(child)
        if parent not in c.parents:
            c.parents.append(parent)
        self._deepen(c, p.depth + 1)

    def _deepen(self, g: _Group, depth: int) -> None:
        if g.depth < depth:
            g.depth = depth
            for c in g.children:
                self._deepen(self.groups[c], depth + 1)

    def _descendants(self, name: str) -> set[str]:
        out: set[str] = set()
        todo = list(self.groups[name].children)
        while todo:
            g = todo.pop()
            if g not in out:
                out.add(g)
                todo.extend(self.groups[g].children)
        return out

    def set_group_var(self, group: str, key: str, value: Any, where: str) -> None:
        self.add_group(group)
        g = self.groups[group]
        if key == "ansible_group_priority":
            try:
                g.priority = int(value)
            except (TypeError, ValueError):
                raise InventoryError(f"ansible_group_priority of group {group!r} is not a number: {value!r}",
                                     where=where) from None
            return
        g.vars[key] = value
        g.origin[key] = where

    def set_host_var(self, host: str, key: str, value: Any, where: str) -> None:
        h = self.hosts[host]
        h.vars[key] = value
        h.origin[key] = where

    def reconcile(self) -> None:
        """ansible-core's reconcile_inventory: parentless groups go under all; hosts in no group in ungrouped."""
        for name, g in list(self.groups.items()):
            if name != "all" and not g.parents:
                self.add_child("all", name, "(built in)")
        grouped: set[str] = set()
        for name, g in self.groups.items():
            if name not in ("all", "ungrouped"):
                grouped.update(g.hosts)
        ung = self.groups["ungrouped"]
        ung.hosts = [h for h in ung.hosts if h not in grouped]
        for h in self.hosts:
            if h not in grouped and h not in ung.hosts:
                ung.hosts.append(h)

    def group_hosts(self, name: str) -> list[str]:
        """Group.get_hosts(): its own hosts, then its descendants' level by level, each host once."""
        g = self.groups[name]
        ordered = [name] + list(g.children)
        seen = set(ordered)
        level = list(g.children)
        while level:
            nxt: list[str] = []
            for lg in level:
                for c in self.groups[lg].children:
                    if c not in seen:
                        seen.add(c)
                        ordered.append(c)
                        nxt.append(c)
            level = nxt
        out: list[str] = []
        got: set[str] = set()
        for gname in ordered:
            for h in self.groups[gname].hosts:
                if h not in got:
                    got.add(h)
                    out.append(h)
        return out

    def host_groups(self) -> dict[str, list[str]]:
        """Each host's groups (ancestors included), in group order."""
        out: dict[str, list[str]] = {h: [] for h in self.hosts}
        for gname in self.groups:
            for h in self.group_hosts(gname):
                out[h].append(gname)
        return out

    def sort_groups(self, names: Iterable[str]) -> list[str]:
        """ansible-core's sort_groups: by depth, priority, name."""
        return sorted(names, key=lambda n: (self.groups[n].depth, self.groups[n].priority, n))

    def host_vars(self, defaults: dict[str, Any] | None = None) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
        """Every host's merged variables and where each came from, in ansible-core's precedence.

        all (inventory) < other groups (inventory) < group_vars/all < group_vars/<group> < host (inventory)
        < host_vars/<host>; groups sorted by depth, priority, name.  ``defaults`` (ansible.cfg's
        remote_user, private_key_file) sit below everything, as Ansible's connection options do.
        """
        cache: dict[tuple[str, str], tuple[dict[str, Any], dict[str, str]]] = {}

        def files_of(kind: str, name: str) -> tuple[dict[str, Any], dict[str, str]]:
            key = (kind, name)
            if key not in cache:
                vals: dict[str, Any] = {}
                orig: dict[str, str] = {}
                for d in self.var_dirs:
                    for f in find_vars_files(d / kind, name):
                        data = read_yaml(f)
                        if data is None:
                            continue
                        if not isinstance(data, dict):
                            raise InventoryError(f"{kind} file must be a mapping of variables", where=str(f))
                        for k, v in data.items():
                            vals[str(k)] = v
                            orig[str(k)] = str(f)
                cache[key] = (vals, orig)
            return cache[key]

        out: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        memberships = self.host_groups()
        for hname, h in self.hosts.items():
            vals: dict[str, Any] = {}
            orig: dict[str, str] = {}
            for k, v in (defaults or {}).items():
                vals[k], orig[k] = v, "ansible.cfg"
            others = self.sort_groups(g for g in memberships[hname] if g != "all")
            layers: list[tuple[dict[str, Any], dict[str, str]]] = [(self.groups["all"].vars, self.groups["all"].origin)]
            layers += [(self.groups[g].vars, self.groups[g].origin) for g in others]
            layers.append(files_of("group_vars", "all"))
            layers += [files_of("group_vars", g) for g in others]
            layers.append((h.vars, h.origin))
            layers.append(files_of("host_vars", hname))
            for lv, lo in layers:
                for k, v in lv.items():
                    vals[k] = v
                    orig[k] = lo.get(k, "?")
            out[hname] = (vals, orig)
        return out


# --- host patterns and ranges ----------------------------------------------------------------------

_RANGE = re.compile(r"\[(?:([0-9]+):([0-9]+)|([a-zA-Z]):([a-zA-Z]))(?::([0-9]+))?\]")
#: Upper bound on hosts one range line expands to (a typo like [1:99999999] must not eat the controller).
MAX_RANGE_HOSTS = 100000


def expand_host_pattern(name: str, where: str = "inventory") -> list[str]:
    """Expand Ansible's ``web[01:03]``, ``x[a:c]``, ``h[1:9:2]`` ranges (zero padding kept), nested."""
    m = _RANGE.search(name)
    if not m:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    step = int(m.group(5)) if m.group(5) else 1
    if step <= 0:
        raise InventoryError(f"range step must be positive in {name!r}", where=where)
    if m.group(1) is not None:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        if int(hi) - int(lo) > MAX_RANGE_HOSTS:
            raise InventoryError(f"range in {name!r} expands to more than {MAX_RANGE_HOSTS} hosts", where=where)
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1, step)]
    else:
        items = [chr(c) for c in range(ord(m.group(3)), ord(m.group(4)) + 1, step)]
    if not items:
        raise InventoryError(f"range in {name!r} is empty (start after end)", where=where)
    out: list[str] = []
    for item in items:
        out.extend(expand_host_pattern(head + item + tail, where))
        if len(out) > MAX_RANGE_HOSTS:
            raise InventoryError(f"range in {name!r} expands to more than {MAX_RANGE_HOSTS} hosts", where=where)
    return out


_HOSTPORT = re.compile(r"^((?:[^:\[\]]|\[[^\]]*\])+):([0-9]+)$")
_BRACKETED = re.compile(r"^\[(.+)\]:([0-9]+)$")


def split_host_port(pattern: str) -> tuple[str, int | None]:
    """parse_address(allow_ranges=True), for inventory host keys: ``host:port``, ``[v6]:port``, or no port."""
    m = _BRACKETED.match(pattern) or _HOSTPORT.match(pattern)
    if m:
        return m.group(1), int(m.group(2))
    return pattern, None
