"""One inventory source (file or directory) to the plugin that reads it, as ansible-core's auto
plugin chooses; and the check that the variables fleetprobe uses need no Ansible to evaluate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InventoryError
from .files import WAY_OUT, YAML_EXTS, IGNORE_EXTS, Unsafe, Vaulted, read_text, read_yaml
from .ini import parse_ini
from .model import InventoryData
from .scripts import is_list_json, parse_list_json, is_script, run_script
from .yamlgroups import parse_yaml_groups

#: Variables fleetprobe reads from a host: a value of these it cannot evaluate is refused.
USED_VARS = ("ansible_host", "ansible_ssh_host", "ansible_port", "ansible_ssh_port", "ansible_user",
             "ansible_ssh_user", "ansible_ssh_private_key_file", "ansible_private_key_file", "ansible_password",
             "ansible_ssh_pass", "ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_become",
             "ansible_become_user", "become", "fleetprobe_known_hosts", "fleetprobe_jump", "ansible_connection",
             "ansible_ssh_args", "ansible_host_key_checking", "ansible_ssh_host_key_checking")


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
        raise InventoryError("TOML inventories are read by ansible-core only", where=where, hint=WAY_OUT)
    if is_script(path):
        parse_list_json(inv, run_script(path), where)
    elif path.suffix in YAML_EXTS:
        data = read_yaml(path)
        if isinstance(data, dict) and isinstance(data.get("plugin"), str):
            raise InventoryError(f"an inventory plugin configuration (plugin: {data['plugin']}) needs ansible-core",
                                 where=where, hint=WAY_OUT)
        if is_list_json(data):
            parse_list_json(inv, data, where)
        else:
            parse_yaml_groups(inv, data, where)
    else:
        text = read_text(path)
        if text.lstrip().startswith("$ANSIBLE_VAULT;"):
            raise InventoryError("file is encrypted with ansible-vault", where=where, hint=WAY_OUT)
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
                                 "decrypt", where=value.origin, hint=WAY_OUT)
        if isinstance(value, str) and not isinstance(value, Unsafe) and ("{{" in value or "{%" in value):
            raise InventoryError(f"{key} of host {name!r} is a Jinja template ({value!r}), which the built-in "
                                 "reader does not evaluate", where=where, hint=WAY_OUT)
