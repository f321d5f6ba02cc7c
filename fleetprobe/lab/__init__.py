"""The fleetprobe lab: qemu VMs booted from Debian's own kernels, reachable over SSH on 127.0.0.1.

    fleet = up()                     # 3 x x86_64 + ppc64le + mips64el + arm64 (6.1)
    up(["arm64"], kernels={"arm64": ("5.10", "6.12")})   # one VM per kernel line
    fleet.inventory                  # <lab_dir>/inventory.yml for `fleetprobe run -i`
    down()                           # stops exactly the lab's qemu processes
"""

from fleetprobe.lab.arches import ARCHES, DEFAULT_FLEET, LabArch, lab_arch
from fleetprobe.lab.fleet import (DEFAULT_TIMEOUT_S, LabFleet, VMStatus, default_lab_dir, down,
                                  fleet_spec, status, up)
from fleetprobe.lab.inventory import LabVM, read_lab_json
from fleetprobe.lab.vm import VMError

__all__ = [
    "ARCHES", "DEFAULT_FLEET", "DEFAULT_TIMEOUT_S", "LabArch", "LabFleet", "LabVM", "VMError",
    "VMStatus", "default_lab_dir", "down", "fleet_spec", "lab_arch", "read_lab_json", "status", "up",
]
