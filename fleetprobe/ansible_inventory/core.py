"""--inventory-reader ansible: the installed ansible-core reads the sources and templates the used variables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from ..errors import InventoryError
from .sources import USED_VARS

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
