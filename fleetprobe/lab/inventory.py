"""What `lab up` leaves behind for others: inventory.yml, lab.json and known_hosts.

Pure functions from VM records to file contents, so they are unit-tested
without booting anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fleetprobe.errors import InputError
from fleetprobe.lab.keys import known_hosts_line
from fleetprobe.lab.lines import DEFAULT_LINE, KernelLine


@dataclass(frozen=True)
class LabVM:
    """One lab VM as recorded in lab.json."""

    name: str
    arch: str              # lab arch name: x86_64, ppc64le, mips64el, mipsel
    debian_arch: str       # amd64, ppc64el, mips64el, mipsel
    uname_m: str           # what the guest's `uname -m` says (mips64 for mips64el)
    kernel_release: str    # the guest's `uname -r`
    kernel_package: str    # e.g. linux-image-6.1.0-50-powerpc64le
    kernel_version: str    # its exact Debian version, e.g. 6.1.176-1
    port: int              # 127.0.0.1:port forwards to the guest's port 22
    pid: int
    serial_log: str
    host_key_public: str
    boot_seconds: float | None = None
    image_key: str = ""
    line: str = DEFAULT_LINE  # kernel line: major.minor of kernel_version (6.1, 6.12, 5.10)

    @property
    def group(self) -> str:
        """The inventory group of this VM's arch."""
        return f"lab_{self.arch}"

    @property
    def line_group(self) -> str:
        """The inventory group of this VM's kernel line (``lab_linux_6_12``)."""
        return KernelLine(self.line, ()).group


def vm_name(arch: str, line: str, index: int) -> str:
    """The host name of the ``index``-th (1-based) VM of ``arch`` on kernel ``line``: lab-x86_64-6.12-1."""
    return f"lab-{arch}-{line}-{index}"


def inventory_data(vms: list[LabVM], key: Path, known_hosts: Path) -> dict[str, Any]:
    """The Ansible-layout inventory (all.vars + a child group per arch and per kernel line) for ``vms``.

    A host's address is given once, in its arch group; its line group lists it
    again without variables (`--limit lab_linux_6_12` picks that line).
    """
    children: dict[str, Any] = {}
    for vm in sorted(vms, key=lambda v: (v.arch, v.name)):
        group = children.setdefault(vm.group, {"hosts": {}})
        group["hosts"][vm.name] = {"ansible_host": "127.0.0.1", "ansible_port": vm.port}
    for vm in sorted(vms, key=lambda v: (v.line_group, v.name)):
        children.setdefault(vm.line_group, {"hosts": {}})["hosts"][vm.name] = None
    return {"all": {
        "vars": {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key.resolve()),
            "fleetprobe_known_hosts": str(known_hosts.resolve()),
        },
        "children": children,
    }}


def known_hosts_text(vms: list[LabVM]) -> str:
    """known_hosts lines (``[127.0.0.1]:PORT ssh-ed25519 ...``) for ``vms``."""
    return "".join(known_hosts_line("127.0.0.1", vm.port, vm.host_key_public) + "\n"
                   for vm in sorted(vms, key=lambda v: v.name))


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_known_hosts(path: Path, vms: list[LabVM]) -> None:
    """Write the lab's known_hosts file."""
    _write_atomic(path, known_hosts_text(vms))


def write_inventory(path: Path, vms: list[LabVM], key: Path, known_hosts: Path) -> None:
    """Write inventory.yml for ``vms``."""
    header = ("# Written by `fleetprobe lab up`; rewritten on every lab up/down.\n"
              "# Hosts are qemu VMs on this machine; ports forward to each guest's sshd.\n")
    _write_atomic(path, header + yaml.safe_dump(inventory_data(vms, key, known_hosts),
                                                sort_keys=False, default_flow_style=False))


def write_lab_json(path: Path, vms: list[LabVM]) -> None:
    """Write lab.json: every VM's arch, kernel package and version, port, pid and console log."""
    data = {"vms": {vm.name: asdict(vm) for vm in sorted(vms, key=lambda v: v.name)}}
    _write_atomic(path, json.dumps(data, indent=2) + "\n")


def read_lab_json(path: Path) -> list[LabVM]:
    """The VMs recorded in lab.json (empty if there is none); unknown keys are ignored."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg})", where=f"{path}:{exc.lineno}",
                         hint="delete it, stop stray VMs with `fleetprobe lab down`, "
                              "and run `lab up` again") from exc
    names = {f.name for f in fields(LabVM)}
    return [LabVM(**{k: v for k, v in rec.items() if k in names})
            for rec in data.get("vms", {}).values()]
