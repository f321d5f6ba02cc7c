"""Reading a playbook's YAML node tree: each bad item a PlaybookError at its file:line.

:class:`NodeReader` holds the generic checks (mappings with a fixed set of keys, strings without
control characters, numbers, choices); :mod:`fleetprobe.playbook` adds what a probe means.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fleetprobe.errors import PlaybookError, did_you_mean

#: A control character (C0, DEL, C1) in a playbook string; newline and tab only where text may
#: span lines (a description).  A ``\r`` in a filter rewrites what the operator reads.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f]")


def line_of(node: Node) -> int:
    """1-based line of a YAML node."""
    return int(node.start_mark.line) + 1


def describe(node: Node) -> str:
    """A short description of a YAML node for error messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return repr(node.value) if isinstance(node, ScalarNode) else "nothing"


class NodeReader:
    """Walks a YAML node tree, turning each bad item into a PlaybookError at its line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = yaml.SafeLoader("")

    def error(self, node: Node, key: str, message: str, hint: str | None = None) -> PlaybookError:
        """A PlaybookError located at ``node``."""
        return PlaybookError(message, file=self.source, line=line_of(node), key=key, hint=hint)

    def mapping(self, node: Node, key: str, allowed: tuple[str, ...]) -> dict[str, tuple[Node, Node]]:
        """A mapping node as {key: (key node, value node)}; unknown or repeated keys are errors."""
        if not isinstance(node, MappingNode):
            raise self.error(node, key, f"{key} must be a mapping of keys to values, got {describe(node)}")
        out: dict[str, tuple[Node, Node]] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode):
                raise self.error(knode, key, "keys must be plain words")
            k = str(knode.value)
            if k not in allowed:
                raise self.error(knode, f"{key}.{k}" if key != "playbook" else k,
                                 f"unknown key {k!r}{did_you_mean(k, list(allowed))}; allowed: "
                                 + ", ".join(allowed))
            if k in out:
                raise self.error(knode, k, f"key {k!r} appears twice (first at line {line_of(out[k][0])})")
            out[k] = (knode, vnode)
        return out

    def require(self, items: dict[str, tuple[Node, Node]], key: str, parent: Node, where: str) -> Node:
        """The value node of a required key."""
        if key not in items:
            raise self.error(parent, key, f"{where} has no {key!r}")
        return items[key][1]

    def scalar(self, node: Node) -> Any:
        """The Python value of a scalar node (YAML 1.1 typing, as yaml.safe_load would give)."""
        return self._constructor.construct_object(node, deep=True)

    def string(self, node: Node, key: str) -> str:
        """A non-empty string scalar."""
        if not isinstance(node, ScalarNode):
            raise self.error(node, key, f"{key} must be a string, got {describe(node)}")
        value = self.scalar(node)
        if value is None or value == "":
            raise self.error(node, key, f"{key} must not be empty")
        if isinstance(value, bool):
            raise self.error(node, key, f"{key} must be a string, got {value!r} (quote it)")
        text = str(value)
        # A description may span lines; a filter's line breaks get their own message (below).
        pattern = _CONTROL if key.endswith(("description", "filter")) else _CONTROL_ONE_LINE
        if (bad := pattern.search(text)) is not None:
            raise self.error(node, key, f"{key} holds the control character {bad.group(0)!r}",
                             hint="write it as text; fleetprobe writes playbook strings to tracefs and "
                                  "the terminal, where control characters change what is done or read")
        return text

    def boolean(self, node: Node, key: str) -> bool:
        """A true/false scalar."""
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            raise self.error(node, key, f"{key} must be true or false")
        return value

    def positive_int(self, node: Node, key: str) -> int:
        """An integer >= 1."""
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(node, key, f"{key} must be a whole number >= 1, got {describe(node)}")
        return value

    def count(self, node: Node, key: str) -> int:
        """An integer >= 0."""
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(node, key, f"{key} must be a whole number >= 0, got {describe(node)}")
        return value

    def string_list(self, node: Node, key: str) -> tuple[tuple[str, int], ...]:
        """A string or a non-empty list of strings, each with its line."""
        if isinstance(node, SequenceNode):
            if not node.value:
                raise self.error(node, key, f"{key} must list at least one alternative")
            return tuple((self.string(n, key), line_of(n)) for n in node.value)
        return ((self.string(node, key), line_of(node)),)

    def choice(self, node: Node, key: str, allowed: tuple[str, ...]) -> str:
        """One of a fixed set of words."""
        value = self.string(node, key)
        if value not in allowed:
            raise self.error(node, key, f"{value!r} is not allowed{did_you_mean(value, list(allowed))}; "
                             f"use one of: {', '.join(allowed)}")
        return value

    def mapping_any(self, node: Node, key: str) -> dict[str, tuple[Node, Node]]:
        """A mapping whose keys are the user's own (no fixed set)."""
        if not isinstance(node, MappingNode):
            raise self.error(node, key, f"{key} must be a mapping, got {describe(node)}")
        out: dict[str, tuple[Node, Node]] = {}
        for knode, vnode in node.value:
            k = str(knode.value) if isinstance(knode, ScalarNode) else ""
            if k in out:
                raise self.error(knode, f"{key}.{k}", f"{k!r} appears twice (first at line {line_of(out[k][0])})")
            out[k] = (knode, vnode)
        return out
