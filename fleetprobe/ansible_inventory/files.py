"""Reading inventory files as ansible-core does: YAML with ``!vault``/``!unsafe`` (aliases bounded),
text, and the group_vars/host_vars files of a name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import InventoryError

#: Extensions ansible-core skips in an inventory directory (INVENTORY_IGNORE_EXTS's default).
IGNORE_EXTS = (".pyc", ".pyo", ".swp", ".bak", "~", ".rpm", ".md", ".txt", ".rst", ".orig", ".cfg", ".retry")
#: The yaml plugin's extensions (YAML_FILENAME_EXTENSIONS); other files are read as INI.
YAML_EXTS = (".yml", ".yaml", ".json")

WAY_OUT = ("read it with ansible-core instead: --inventory-reader ansible (needs ansible-core installed), "
            "or export it once: ansible-inventory -i SOURCE --list > inventory.json")


class Vaulted:
    """A ``!vault`` value: kept as a marker, refused where fleetprobe would use it."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def __repr__(self) -> str:
        return "<!vault value>"


#: Nodes a YAML inventory file may hold with every alias expanded.  Aliases share one parsed node,
#: but everything after the parse (vars merging, copying per host) walks the expansion: ten levels of
#: ten aliases is 10^10 nodes from a 1 kB file (MemoryError, or a segfault in deep copies).
MAX_YAML_NODES = 1_000_000


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` is once every alias in it is expanded (each shared node counted
    once per use, computed once: linear in the parsed size)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a recursive alias (&a [*a]) counts once, not for ever
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        if memo[key] > MAX_YAML_NODES:
            raise yaml.YAMLError(f"aliases expand to more than {MAX_YAML_NODES} nodes")
    return memo[key]


class _Loader(yaml.SafeLoader):
    """YAML as Ansible reads it: ``!vault`` kept as a marker, ``!unsafe`` a plain (never templated) string.

    A document whose aliases expand past :data:`MAX_YAML_NODES` is refused before it is constructed.
    """

    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is not None:
            try:
                _expanded_size(node, {})
            except yaml.YAMLError as exc:
                raise InventoryError(f"not accepted: {exc}", where=f"{self.name}:{node.start_mark.line + 1}",
                                     hint="use fewer nested aliases") from None
        return node


class Unsafe(str):
    """An ``!unsafe`` string: Ansible never templates it, so Jinja in it is literal text."""


def _vault(loader: _Loader, node: yaml.Node) -> Vaulted:
    return Vaulted(f"{node.start_mark.name}:{node.start_mark.line + 1}")


def _unsafe(loader: _Loader, node: yaml.Node) -> Unsafe:
    return Unsafe(loader.construct_scalar(node))  # type: ignore[arg-type]


_Loader.add_constructor("!vault", _vault)
_Loader.add_constructor("!unsafe", _unsafe)


def read_yaml(path: Path) -> Any:
    """A YAML (or JSON) file, errors naming file and line; a whole-file vault is refused."""
    text = read_text(path)
    if text.lstrip().startswith("$ANSIBLE_VAULT;"):
        raise InventoryError("file is encrypted with ansible-vault", where=str(path), hint=WAY_OUT)
    try:
        loader = _Loader(text)
        loader.name = str(path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InventoryError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where) from None


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise InventoryError("not a text file", where=str(path)) from None
    except OSError as exc:
        raise InventoryError(f"cannot read: {exc.strerror}", where=str(path)) from None




def find_vars_files(base: Path, name: str) -> list[Path]:
    """DataLoader.find_vars_files: ``name``, ``name.yml``, ``.yaml``, ``.json`` (the first that exists), a directory
    read recursively in sorted order (hidden and ``~`` files skipped, other extensions than those skipped)."""
    for ext in ("",) + YAML_EXTS:
        p = base / (name + ext)
        if p.is_dir():
            return _dir_files(p)
        if p.exists():
            return [p]
    return []


def _dir_files(d: Path) -> list[Path]:
    out: list[Path] = []
    for entry in sorted(os.listdir(d)):
        if entry.startswith(".") or entry.endswith("~"):
            continue
        p = d / entry
        ext = os.path.splitext(entry)[1]
        if not ext or ext in YAML_EXTS:
            out.extend(_dir_files(p) if p.is_dir() else [p])
    return out
