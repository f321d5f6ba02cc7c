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
    reader = _IniReader(inv, source)
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and line[0] not in "#;":
            reader.line(line, lineno)
    reader.finish()


#: Groups named before they are defined: name -> (the section kind that named it, its line, parent groups).
_Pending = dict[str, tuple[str, int, list[str]]]


class _IniReader:
    """The ini plugin's state between lines: the current section and the groups still pending."""

    def __init__(self, inv: InventoryData, source: str) -> None:
        self.inv, self.source = inv, source
        self.group, self.state = "ungrouped", "hosts"
        self.pending: _Pending = {}

    def line(self, line: str, lineno: int) -> None:
        """One non-blank, non-comment line (stripped)."""
        where = f"{self.source}:{lineno}"
        m = _SECTION.match(line)
        if m:
            self._section(m.group(1), m.group(2) or "hosts", lineno, where)
        elif line.startswith("[") and line.endswith("]"):
            raise InventoryError(f"invalid section {line!r} (no spaces allowed in a section name)", where=where)
        elif self.state == "hosts":
            self._host_line(line, where)
        elif self.state == "vars":
            if "=" not in line:
                raise InventoryError(f"expected key=value, got {line!r}", where=where)
            k, v = (e.strip() for e in line.split("=", 1))
            self.inv.set_group_var(self.group, k, _ini_value(v), where)
        else:
            self._child_line(line, lineno, where)

    def _section(self, group: str, state: str, lineno: int, where: str) -> None:
        inv, pending = self.inv, self.pending
        self.group, self.state = group, state
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

    def _host_line(self, line: str, where: str) -> None:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise InventoryError(f"cannot parse host line: {exc}", where=where) from None
        if not tokens:
            return
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
            self.inv.add_host(name, self.group, where)
            if port is not None:
                self.inv.set_host_var(name, "ansible_port", port, where)
            for k, v in variables.items():
                self.inv.set_host_var(name, k, v, where)

    def _child_line(self, line: str, lineno: int, where: str) -> None:
        cm = _GROUPNAME.match(line)
        if not cm:
            raise InventoryError(f"expected a group name, got {line!r}", where=where)
        child = cm.group(1)
        if child not in self.inv.groups:
            if child not in self.pending:
                self.pending[child] = ("children", lineno, [self.group])
            else:
                self.pending[child][2].append(self.group)
        else:
            self.inv.add_child(self.group, child, where)

    def finish(self) -> None:
        """Refuse a group that a [x:vars] or [x:children] section named and no section defined."""
        for name, (kind, lineno, parents) in self.pending.items():
            if kind == "vars":
                raise InventoryError(f"section [{name}:vars] is for a group that is never defined",
                                     where=f"{self.source}:{lineno}")
            raise InventoryError(f"section [{parents[-1]}:children] names group {name!r}, which is never defined",
                                 where=f"{self.source}:{lineno}")


def _add_pending(inv: InventoryData, group: str, pending: _Pending, where: str) -> None:
    for parent in pending[group][2]:
        inv.add_child(parent, group, where)
        if parent in pending and pending[parent][0] == "children":
            _add_pending(inv, parent, pending, where)
    del pending[group]
