"""The script inventory plugin: executable scripts' --list/--host JSON, and saved
``ansible-inventory --list`` JSON."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ..errors import InventoryError
from .model import InventoryData

#: How long an inventory script may take (Ansible has no limit; a hung script must not hang a run).
SCRIPT_TIMEOUT = 60.0


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
        if gname != "_meta":
            _add_group(inv, str(gname), body, source)
    for hname, hv in (hostvars or {}).items():
        if not isinstance(hv, dict):
            raise InventoryError(f"_meta.hostvars of {hname!r} must be an object", where=source)
        inv.add_host(str(hname), None, source)
        for k, v in hv.items():
            inv.set_host_var(str(hname), str(k), v, source)


def _add_group(inv: InventoryData, gname: str, body: Any, source: str) -> None:
    """One group of ``--list`` output: a list of hosts, or an object of hosts/children/vars."""
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


def is_script(path: Path) -> bool:
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
