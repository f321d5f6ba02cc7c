"""The yaml inventory plugin: top-level groups holding hosts:, children: and vars:."""

from __future__ import annotations

from typing import Any

from ..errors import InventoryError
from .model import InventoryData, expand_host_pattern, split_host_port

def parse_yaml_groups(inv: InventoryData, data: Any, source: str) -> None:
    """The yaml plugin: top-level keys are groups holding ``hosts:``, ``children:`` and ``vars:``."""
    if data is None:
        raise InventoryError("inventory is empty", where=source)
    if not isinstance(data, dict):
        raise InventoryError("inventory must be a mapping of groups (all: hosts: ...)", where=source)
    for gname, gbody in data.items():
        _walk(inv, str(gname), gbody, source)


def _walk(inv: InventoryData, group: str, body: Any, source: str) -> None:
    """One group's body: its vars, then its children (depth first), then its hosts."""
    inv.add_group(group)
    if body is None:
        return
    if not isinstance(body, dict):
        raise InventoryError(f"group {group!r} must be a mapping with hosts:/children:/vars:", where=source)
    unknown = set(body) - {"hosts", "children", "vars"}
    if unknown:
        raise InventoryError(f"group {group!r} has unknown key(s) {sorted(map(str, unknown))}", where=source,
                             hint="a group holds hosts:, children: and vars:")
    own = body.get("vars") or {}
    if not isinstance(own, dict):
        raise InventoryError(f"vars of group {group!r} must be a mapping", where=source)
    for k, v in own.items():
        inv.set_group_var(group, str(k), v, source)
    children = body.get("children") or {}
    if not isinstance(children, dict):
        raise InventoryError(f"children of group {group!r} must be a mapping", where=source)
    for child, cbody in children.items():
        _walk(inv, str(child), cbody, source)
        inv.add_child(group, str(child), source)
    _add_hosts(inv, group, body.get("hosts") or {}, source)


def _add_hosts(inv: InventoryData, group: str, hosts: Any, source: str) -> None:
    """A group's ``hosts:`` (a mapping of pattern -> variables, or a list of patterns)."""
    if isinstance(hosts, list):
        hosts = {h: None for h in hosts}
    if not isinstance(hosts, dict):
        raise InventoryError(f"hosts of group {group!r} must be a mapping", where=source)
    for pattern, hv in hosts.items():
        if hv is not None and not isinstance(hv, dict):
            raise InventoryError(f"host {pattern!r} in group {group!r}: variables must be a mapping",
                                 where=source)
        base, port = split_host_port(str(pattern))
        for name in expand_host_pattern(base, source):
            inv.add_host(name, group, source)
            if port is not None:
                inv.set_host_var(name, "ansible_port", port, source)
            for k, v in (hv or {}).items():
                inv.set_host_var(name, str(k), v, source)
