"""Ansible inventory sources, read the way ansible-core reads them.

The built-in reader covers Ansible's static sources: YAML (the ``yaml``
plugin), INI (the ``ini`` plugin, a file named ``hosts`` included),
``ansible-inventory --list`` JSON and the output of executable inventory
scripts (the ``script`` plugin), directories of those (``-i inv/``), and
``group_vars/`` / ``host_vars/`` beside each source (the ``host_group_vars``
plugin: files and directories).  Variables are merged in ansible-core's
order (``VARIABLE_PRECEDENCE``'s default; groups sorted by depth, priority,
name).  What it cannot evaluate, Jinja and ``!vault``, is refused with an
error naming the file and the variable; ``--inventory-reader ansible`` then
asks the installed ansible-core itself (:func:`load_with_ansible`).

The default inventory follows Ansible: ``ANSIBLE_INVENTORY``, else the
``inventory`` of the ansible.cfg Ansible would use, else /etc/ansible/hosts;
``remote_user`` and ``private_key_file`` come from the same places.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InventoryError

#: Extensions ansible-core skips in an inventory directory (INVENTORY_IGNORE_EXTS's default).
IGNORE_EXTS = (".pyc", ".pyo", ".swp", ".bak", "~", ".rpm", ".md", ".txt", ".rst", ".orig", ".cfg", ".retry")
#: The yaml plugin's extensions (YAML_FILENAME_EXTENSIONS); other files are read as INI.
YAML_EXTS = (".yml", ".yaml", ".json")
#: How long an inventory script may take (Ansible has no limit; a hung script must not hang a run).
SCRIPT_TIMEOUT = 60.0
#: Variables fleetprobe reads from a host: a value of these it cannot evaluate is refused.
USED_VARS = ("ansible_host", "ansible_ssh_host", "ansible_port", "ansible_ssh_port", "ansible_user",
             "ansible_ssh_user", "ansible_ssh_private_key_file", "ansible_private_key_file", "ansible_password",
             "ansible_ssh_pass", "ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_become",
             "ansible_become_user", "become", "fleetprobe_known_hosts", "fleetprobe_jump", "ansible_connection",
             "ansible_ssh_args", "ansible_host_key_checking", "ansible_ssh_host_key_checking")

_WAY_OUT = ("read it with ansible-core instead: --inventory-reader ansible (needs ansible-core installed), "
            "or export it once: ansible-inventory -i SOURCE --list > inventory.json")


class Vaulted:
    """A ``!vault`` value: kept as a marker, refused where fleetprobe would use it."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def __repr__(self) -> str:
        return "<!vault value>"


class _Loader(yaml.SafeLoader):
    """YAML as Ansible reads it: ``!vault`` kept as a marker, ``!unsafe`` a plain (never templated) string."""


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
    text = _read_text(path)
    if text.lstrip().startswith("$ANSIBLE_VAULT;"):
        raise InventoryError("file is encrypted with ansible-vault", where=str(path), hint=_WAY_OUT)
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


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise InventoryError("not a text file", where=str(path)) from None
    except OSError as exc:
        raise InventoryError(f"cannot read: {exc.strerror}", where=str(path)) from None


# --- the inventory model: ansible-core's InventoryData, reduced to what fleetprobe needs -----------

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


# --- YAML -----------------------------------------------------------------------------------------

def parse_yaml_groups(inv: InventoryData, data: Any, source: str) -> None:
    """The yaml plugin: top-level keys are groups holding ``hosts:``, ``children:`` and ``vars:``."""
    if data is None:
        raise InventoryError("inventory is empty", where=source)
    if not isinstance(data, dict):
        raise InventoryError("inventory must be a mapping of groups (all: hosts: ...)", where=source)

    def walk(group: str, body: Any) -> None:
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
            walk(str(child), cbody)
            inv.add_child(group, str(child), source)
        hosts = body.get("hosts") or {}
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

    for gname, gbody in data.items():
        walk(str(gname), gbody)


# --- INI ------------------------------------------------------------------------------------------

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


# --- script output / ansible-inventory --list JSON -------------------------------------------------

def is_list_json(data: Any) -> bool:
    """Whether parsed data is the script format (``_meta``, or groups whose ``hosts`` is a list)."""
    if not isinstance(data, dict):
        return False
    if "_meta" in data:
        return True
    return any(isinstance(v, list) or isinstance(v, dict) and isinstance(v.get("hosts"), list)
               or isinstance(v, dict) and isinstance(v.get("children"), list) for v in data.values())


def parse_list_json(inv: InventoryData, data: Any, source: str,
                    host_vars: dict[str, dict[str, Any]] | None = None) -> None:
    """The script plugin's reading of ``--list`` output: groups (a list of hosts, or hosts/children/vars)
    and ``_meta.hostvars``."""
    if not isinstance(data, dict):
        raise InventoryError("inventory JSON must be an object of groups", where=source)
    meta = data.get("_meta") or {}
    if not isinstance(meta, dict):
        raise InventoryError("_meta must be an object", where=source)
    hostvars = meta.get("hostvars") if "hostvars" in meta else host_vars
    if hostvars is not None and not isinstance(hostvars, dict):
        raise InventoryError("_meta.hostvars must be an object of hosts", where=source)
    for gname, body in data.items():
        if gname == "_meta":
            continue
        gname = str(gname)
        inv.add_group(gname)
        if isinstance(body, list):
            body = {"hosts": body}
        if not isinstance(body, dict):
            raise InventoryError(f"group {gname!r} must be a list of hosts or an object", where=source)
        unknown = set(body) - {"hosts", "children", "vars"}
        if unknown:
            raise InventoryError(f"group {gname!r} has unknown key(s) {sorted(map(str, unknown))}", where=source)
        hosts = body.get("hosts") or []
        children = body.get("children") or []
        gvars = body.get("vars") or {}
        if not isinstance(hosts, list) or not isinstance(children, list) or not isinstance(gvars, dict):
            raise InventoryError(f"group {gname!r}: hosts and children must be lists, vars an object", where=source)
        for h in hosts:
            inv.add_host(str(h), gname, source)
        for c in children:
            inv.add_child(gname, str(c), source)
        for k, v in gvars.items():
            inv.set_group_var(gname, str(k), v, source)
    for hname, hv in (hostvars or {}).items():
        if not isinstance(hv, dict):
            raise InventoryError(f"_meta.hostvars of {hname!r} must be an object", where=source)
        inv.add_host(str(hname), None, source)
        for k, v in hv.items():
            inv.set_host_var(str(hname), str(k), v, source)


def _is_script(path: Path) -> bool:
    """The script plugin's test: executable, and starts with ``#!``."""
    try:
        if not os.access(path, os.X_OK):
            return False
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def run_script(path: Path) -> None | Any:
    """Run an executable inventory script with ``--list`` (and ``--host`` per host when it has no _meta)."""
    data = _script_json(path, ["--list"])
    if not isinstance(data, dict):
        raise InventoryError("inventory script's --list output must be a JSON object", where=str(path))
    if "_meta" not in data:
        # ansible-core asks each host for its variables when the script gives no _meta.
        hosts: list[str] = []
        for body in data.values():
            hs = body if isinstance(body, list) else body.get("hosts", []) if isinstance(body, dict) else []
            hosts.extend(str(h) for h in hs if str(h) not in hosts)
        data["_meta"] = {"hostvars": {h: _script_json(path, ["--host", h]) for h in hosts}}
    return data


def _script_json(path: Path, args: list[str]) -> Any:
    try:
        res = subprocess.run([str(path), *args], capture_output=True, timeout=SCRIPT_TIMEOUT, cwd=path.parent,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InventoryError(f"inventory script did not finish {' '.join(args)} within {SCRIPT_TIMEOUT:.0f}s",
                             where=str(path)) from None
    except OSError as exc:
        raise InventoryError(f"cannot run inventory script: {exc.strerror}", where=str(path)) from None
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", "replace").strip()[:600]
        raise InventoryError(f"inventory script {' '.join(args)} exited {res.returncode}", where=str(path),
                             hint=err or None)
    try:
        return json.loads(res.stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InventoryError(f"inventory script {' '.join(args)} printed no valid JSON: {exc}",
                             where=str(path)) from None


# --- sources --------------------------------------------------------------------------------------

def looks_like_host_list(source: str) -> bool:
    """The host_list plugin's test: a comma in it, and no such path."""
    return "," in source and not os.path.exists(os.path.expanduser(source))


def add_source(inv: InventoryData, source: str) -> None:
    """Read one inventory source (file or directory) into ``inv``, like ansible-core's auto/yaml/ini/script."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InventoryError("inventory source not found", where=source,
                             hint="give an inventory file or directory; for hosts on the command line end the "
                                  f"list with a comma, as Ansible does: -i {source},")
    inv.sources.append(str(path))
    if path.is_dir():
        inv.var_dirs.append(path)
        for entry in sorted(os.listdir(path)):
            p = path / entry
            if entry in ("group_vars", "host_vars") or entry.startswith(".") or entry.endswith(IGNORE_EXTS):
                continue
            if p.is_dir():
                continue  # ansible-core reads sub-directories as sources of their own only when named
            _add_file(inv, p)
    else:
        inv.var_dirs.append(path.parent)
        _add_file(inv, path)


def _add_file(inv: InventoryData, path: Path) -> None:
    where = str(path)
    if path.suffix == ".toml":
        raise InventoryError("TOML inventories are read by ansible-core only", where=where, hint=_WAY_OUT)
    if _is_script(path):
        parse_list_json(inv, run_script(path), where)
    elif path.suffix in YAML_EXTS:
        data = read_yaml(path)
        if isinstance(data, dict) and isinstance(data.get("plugin"), str):
            raise InventoryError(f"an inventory plugin configuration (plugin: {data['plugin']}) needs ansible-core",
                                 where=where, hint=_WAY_OUT)
        if is_list_json(data):
            parse_list_json(inv, data, where)
        else:
            parse_yaml_groups(inv, data, where)
    else:
        text = _read_text(path)
        if text.lstrip().startswith("$ANSIBLE_VAULT;"):
            raise InventoryError("file is encrypted with ansible-vault", where=where, hint=_WAY_OUT)
        parse_ini(inv, text, where)


def check_evaluable(name: str, hv: dict[str, Any], origin: dict[str, str]) -> None:
    """Refuse a used variable whose value needs Ansible to evaluate (Jinja, vault)."""
    for key in USED_VARS:
        if key not in hv:
            continue
        value = hv[key]
        where = origin.get(key, "inventory")
        if isinstance(value, Vaulted):
            raise InventoryError(f"{key} of host {name!r} is a !vault value, which the built-in reader cannot "
                                 "decrypt", where=value.origin, hint=_WAY_OUT)
        if isinstance(value, str) and not isinstance(value, Unsafe) and ("{{" in value or "{%" in value):
            raise InventoryError(f"{key} of host {name!r} is a Jinja template ({value!r}), which the built-in "
                                 "reader does not evaluate", where=where, hint=_WAY_OUT)


# --- ansible.cfg and the default inventory ---------------------------------------------------------

@dataclass(frozen=True)
class AnsibleConfig:
    """What fleetprobe takes from Ansible's configuration."""

    path: str | None
    inventory: tuple[str, ...]
    remote_user: str | None
    private_key_file: str | None
    #: [ssh_connection] ssh_args, ssh_common_args, ssh_extra_args and host_key_checking (None: not set)
    ssh_args: str | None = None
    ssh_common_args: str | None = None
    ssh_extra_args: str | None = None
    host_key_checking: bool | None = None

    def defaults(self) -> dict[str, Any]:
        """These settings as the host variables that override them (the lowest precedence: any
        inventory variable of the same name wins, as in Ansible)."""
        out: dict[str, Any] = {}
        for key, value in (("ansible_user", self.remote_user), ("ansible_ssh_private_key_file", self.private_key_file),
                           ("ansible_ssh_args", self.ssh_args), ("ansible_ssh_common_args", self.ssh_common_args),
                           ("ansible_ssh_extra_args", self.ssh_extra_args),
                           ("ansible_host_key_checking", self.host_key_checking)):
            if value is not None:
                out[key] = value
        return out


def find_ansible_cfg(cwd: Path | None = None) -> Path | None:
    """The config file ansible-core uses: $ANSIBLE_CONFIG, ./ansible.cfg (not in a world-writable
    directory), ~/.ansible.cfg, /etc/ansible/ansible.cfg."""
    env = os.environ.get("ANSIBLE_CONFIG")
    here = cwd or Path.cwd()
    candidates: list[Path] = []
    if env:
        p = Path(env).expanduser()
        candidates.append(p / "ansible.cfg" if p.is_dir() else p)
    try:
        world_writable = bool(os.stat(here).st_mode & stat.S_IWOTH)
    except OSError:
        world_writable = True
    if not world_writable:
        candidates.append(here / "ansible.cfg")
    candidates += [Path("~/.ansible.cfg").expanduser(), Path("/etc/ansible/ansible.cfg")]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _cfg_path(value: str, base: Path) -> str:
    """A path setting as ansible-core resolves it: ~ expanded, relative to the config file's directory."""
    p = Path(os.path.expandvars(value)).expanduser()
    return str(p if p.is_absolute() else base / p)


def ansible_config(cwd: Path | None = None) -> AnsibleConfig:
    """inventory, remote_user and private_key_file from the environment and ansible.cfg, as ansible-core reads them."""
    cfg_path = find_ansible_cfg(cwd)
    section: dict[str, str] = {}
    ssh: dict[str, str] = {}
    if cfg_path is not None:
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
        try:
            parser.read_string(_read_text(cfg_path), source=str(cfg_path))
        except configparser.Error as exc:
            raise InventoryError(f"not a valid ansible.cfg: {exc}", where=str(cfg_path)) from None
        if parser.has_section("defaults"):
            section = dict(parser.items("defaults"))
        if parser.has_section("ssh_connection"):
            ssh = dict(parser.items("ssh_connection"))
    base = cfg_path.parent if cfg_path is not None else Path.cwd()
    inventory: tuple[str, ...]
    env_inv = os.environ.get("ANSIBLE_INVENTORY")
    if env_inv:
        # a list of paths, as ansible-core reads it (DEFAULT_HOST_LIST is a pathlist: commas separate paths)
        inventory = tuple(_cfg_path(s.strip(), Path.cwd()) for s in env_inv.split(",") if s.strip())
    elif section.get("inventory") or section.get("hostfile"):
        raw = section.get("inventory") or section.get("hostfile") or ""
        inventory = tuple(_cfg_path(s.strip(), base) for s in raw.split(",") if s.strip())
    else:
        inventory = ("/etc/ansible/hosts",)
    user = os.environ.get("ANSIBLE_REMOTE_USER") or section.get("remote_user") or None
    key = os.environ.get("ANSIBLE_PRIVATE_KEY_FILE") or section.get("private_key_file") or None
    if key:
        key = _cfg_path(key, Path.cwd() if os.environ.get("ANSIBLE_PRIVATE_KEY_FILE") else base)
    checking = (os.environ.get("ANSIBLE_HOST_KEY_CHECKING") or os.environ.get("ANSIBLE_SSH_HOST_KEY_CHECKING")
                or ssh.get("host_key_checking") or section.get("host_key_checking"))
    return AnsibleConfig(str(cfg_path) if cfg_path else None, inventory, user, key,
                         ssh_args=os.environ.get("ANSIBLE_SSH_ARGS") or ssh.get("ssh_args") or None,
                         ssh_common_args=os.environ.get("ANSIBLE_SSH_COMMON_ARGS") or ssh.get("ssh_common_args") or None,
                         ssh_extra_args=os.environ.get("ANSIBLE_SSH_EXTRA_ARGS") or ssh.get("ssh_extra_args") or None,
                         host_key_checking=None if checking is None else ansible_bool(checking))


def ansible_bool(value: Any) -> bool:
    """ansible-core's boolean(): yes/on/1/true/t/y are true, everything else false."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("y", "yes", "on", "1", "true", "t", "1.0")


# --- ansible-core's own reading -----------------------------------------------------------------

#: Run by ansible-core's Python: the inventory as ansible-core builds it, with the variables fleetprobe
#: uses templated (Jinja, vault, plugins, precedence all ansible-core's).
_HELPER = r'''
import json, sys
from ansible import constants as C
from ansible.cli import CLI
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar
from ansible.vars.manager import VariableManager
args = json.loads(sys.argv[1])
loader = DataLoader()
secrets = CLI.setup_vault_secrets(loader, vault_ids=list(C.DEFAULT_VAULT_IDENTITY_LIST),
                                  vault_password_files=list(C.DEFAULT_VAULT_PASSWORD_FILE or []) if isinstance(C.DEFAULT_VAULT_PASSWORD_FILE, (list, tuple)) else ([C.DEFAULT_VAULT_PASSWORD_FILE] if C.DEFAULT_VAULT_PASSWORD_FILE else []),
                                  ask_vault_pass=False, auto_prompt=False)
loader.set_vault_secrets(secrets)
inv = InventoryManager(loader=loader, sources=args["sources"])
vm = VariableManager(loader=loader, inventory=inv)
out = {"hosts": [], "groups": {}, "errors": []}
for name, g in inv.groups.items():
    out["groups"][name] = {"hosts": [h.name for h in g.get_hosts()]}
for h in inv.get_hosts("all"):
    hv = vm.get_vars(host=h, include_hostvars=False)
    templar = Templar(loader=loader, variables=hv)
    got = {}
    for k in args["keys"]:
        if k in hv:
            try:
                v = templar.template(hv[k])
                json.dumps(v)
                got[k] = v
            except Exception as e:
                out["errors"].append([h.name, k, "%s: %s" % (type(e).__name__, e)])
    out["hosts"].append([h.name, got, [g.name for g in h.get_groups()]])
json.dump(out, sys.stdout)
'''


@dataclass(frozen=True)
class AnsibleReading:
    """What ansible-core said about the sources: hosts (with their used vars and groups) and groups."""

    hosts: list[tuple[str, dict[str, Any], list[str]]]
    groups: dict[str, list[str]]


def ansible_python() -> str:
    """The Python interpreter of the installed ansible-core (the one ``ansible-inventory`` runs under)."""
    exe = shutil.which("ansible-inventory")
    if exe is None:
        raise InventoryError("--inventory-reader ansible needs ansible-core, and ansible-inventory is not on PATH",
                             where="--inventory-reader",
                             hint="pip install ansible-core (or use the built-in reader: --inventory-reader builtin)")
    try:
        with open(exe, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
    except OSError as exc:
        raise InventoryError(f"cannot read {exe}: {exc.strerror}", where="--inventory-reader") from None
    if first.startswith("#!"):
        words = first[2:].split()
        if words and words[0].endswith("/env") and len(words) > 1:
            found = shutil.which(words[1])
            if found:
                return found
        elif words:
            return words[0]
    raise InventoryError(f"cannot tell which Python runs {exe}", where="--inventory-reader")


def load_with_ansible(sources: list[str]) -> AnsibleReading:
    """Ask ansible-core to read ``sources``."""
    py = ansible_python()
    arg = json.dumps({"sources": sources, "keys": list(USED_VARS)})
    env = dict(os.environ, ANSIBLE_HOST_PATTERN_MISMATCH="ignore", ANSIBLE_INVENTORY_UNPARSED_FAILED="True",
               ANSIBLE_NOCOLOR="1")
    try:
        res = subprocess.run([py, "-c", _HELPER, arg], capture_output=True, timeout=300, env=env,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InventoryError("ansible-core took over 300s to read the inventory", where=",".join(sources)) from None
    except OSError as exc:
        raise InventoryError(f"cannot run {py}: {exc.strerror}", where="--inventory-reader") from None
    err = res.stderr.decode("utf-8", "replace").strip()
    if res.returncode != 0:
        last = err.splitlines()[-1] if err else f"exit status {res.returncode}"
        raise InventoryError(f"ansible-core could not read the inventory: {last}", where=",".join(sources),
                             hint="run ansible-inventory -i SOURCE --list to see ansible-core's own message")
    try:
        out = json.loads(res.stdout)
    except ValueError:
        raise InventoryError("ansible-core's reading printed no JSON", where=",".join(sources),
                             hint=err[-600:] or None) from None
    if out["errors"]:
        host, key, msg = out["errors"][0]
        raise InventoryError(f"ansible-core cannot evaluate {key} of host {host!r}: {msg}", where=",".join(sources))
    return AnsibleReading([(h, hv, gs) for h, hv, gs in out["hosts"]],
                          {g: b["hosts"] for g, b in out["groups"].items()})
