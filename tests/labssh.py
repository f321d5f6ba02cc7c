"""Reaching lab VMs from tests with the OpenSSH client: the lab's key and known_hosts, strict checking."""

from __future__ import annotations

import subprocess
from typing import Any


def ssh_argv(lab: Any, vm: Any, command: str) -> list[str]:
    """The ssh command line for a lab VM (no user config, our key only, host key checked strictly)."""
    return ["ssh", "-F", "/dev/null", "-i", str(lab.key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-p", str(vm.port), "root@127.0.0.1", command]


def ssh(lab: Any, vm: Any, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command on a lab VM."""
    return subprocess.run(ssh_argv(lab, vm, command), capture_output=True, text=True, timeout=timeout)


def is_mips(vm: Any) -> bool:
    """MIPS guests (whose kernels intermittently oops under a kprobe in the lab)."""
    return str(vm.uname_m).startswith("mips")
