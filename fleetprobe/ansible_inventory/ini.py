"""The ini inventory plugin: [group], [group:vars], [group:children] sections and host lines."""

from __future__ import annotations

import ast
import re
import shlex
from typing import Any

from ..errors import InventoryError
from .model import InventoryData, expand_host_pattern, split_host_port

_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")
_GROUPNAME = re.compile(r"^([^:\]\s]+)\s*(?:[#;].*)?$")


def _ini_value(text: str) -> Any:
    """The ini plugin's _parse_value: a Python literal where it is one, else the string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    if value is ... or isinstance(value, complex):
        return text
    return value


def parse_ini(inv: InventoryData, text: str, source: str) -> None:
    """The ini plugin: ``[group]``, ``[group:vars]``, ``[group:children]``, ``host k=v ...`` lines."""
    group, state = "ungrouped", "hosts"
    pending: dict[str, tuple[str, int, list[str]]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"{source}:{lineno}"
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = _SECTION.match(line)
        if m:
            group, state = m.group(1), m.group(2) or "hosts"
            if state not in ("hosts", "children", "vars"):
                raise InventoryError(f"section [{group}:{state}] has unknown type {state!r}", where=where,
                                     hint="sections are [group], [group:vars] and [group:children]")
            if group not in inv.groups:
                if state == "vars" and group not in pending:
                    pending[group] = ("vars", lineno, [])
                inv.add_group(group)
            if group in pending and state != "vars":
                if pending[group][0] == "children":
                    _add_pending(inv, group, pending, where)
                else:
                    del pending[group]
            continue
        if line.startswith("[") and line.endswith("]"):
            raise InventoryError(f"invalid section {line!r} (no spaces allowed in a section name)", where=where)
        if state == "hosts":
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as exc:
                raise InventoryError(f"cannot parse host line: {exc}", where=where) from None
            if not tokens:
                continue
            pattern = tokens[0]
            if pattern == "---" or pattern.endswith(":") and split_host_port(pattern)[1] is None:
                raise InventoryError(f"invalid host pattern {pattern!r}"
                                     + (" (a YAML file? name it .yml)" if pattern == "---" else ""), where=where)
            variables: dict[str, Any] = {}
            for t in tokens[1:]:
                if "=" not in t:
                    raise InventoryError(f"expected key=value host variable, got {t!r}", where=where)
                k, v = t.split("=", 1)
                variables[k] = _ini_value(v)
            base, port = split_host_port(pattern)
            for name in expand_host_pattern(base, where):
                inv.add_host(name, group, where)
                if port is not None:
                    inv.set_host_var(name, "ansible_port", port, where)
                for k, v in variables.items():
                    inv.set_host_var(name, k, v, where)
        elif state == "vars":
            if "=" not in line:
                raise InventoryError(f"expected key=value, got {line!r}", where=where)
            k, v = (e.strip() for e in line.split("=", 1))
            inv.set_group_var(group, k, _ini_value(v), where)
        else:
            cm = _GROUPNAME.match(line)
            if not cm:
                raise InventoryError(f"expected a group name, got {line!r}", where=where)
            child = cm.group(1)
            if child not in inv.groups:
                if child not in pending:
                    pending[child] = ("children", lineno, [group])
                else:
                    pending[child][2].append(group)
            else:
                inv.add_child(group, child, where)
    for name, (kind, lineno, parents) in pending.items():
        if kind == "vars":
            raise InventoryError(f"section [{name}:vars] is for a group that is never defined",
                                 where=f"{source}:{lineno}")
        raise InventoryError(f"section [{parents[-1]}:children] names group {name!r}, which is never defined",
                             where=f"{source}:{lineno}")


def _add_pending(inv: InventoryData, group: str, pending: dict[str, tuple[str, int, list[str]]], where: str) -> None:
    for parent in pending[group][2]:
        inv.add_child(parent, group, where)
        if parent in pending and pending[parent][0] == "children":
            _add_pending(inv, parent, pending, where)
    del pending[group]
