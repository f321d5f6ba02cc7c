"""Arches: every per-architecture table fleetprobe needs, in one place.

``uname -m`` + endianness -> Debian architecture, kernel ``ARCH``, GNU triplet and ELF header
values (what a module is built for and checked against), and the controller's own Debian arch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fleetprobe.facts import Facts


@dataclass(frozen=True)
class Target:
    """What a module must be built for: Debian arch, kernel ARCH, GNU triplet, ELF header values."""

    debian_arch: str
    kernel_arch: str
    triplet: str
    elf_machine: int
    elf_class: int
    endian: str


# e_machine values from the ELF spec (include/uapi/linux/elf-em.h).
EM_NAMES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S390", 40: "ARM",
            62: "x86-64", 183: "AArch64", 243: "RISC-V"}


_TARGETS = {t.debian_arch: t for t in (
    Target("amd64", "x86", "x86_64-linux-gnu", 62, 64, "little"),
    Target("i386", "x86", "i686-linux-gnu", 3, 32, "little"),
    Target("ppc64el", "powerpc", "powerpc64le-linux-gnu", 21, 64, "little"),
    Target("ppc64", "powerpc", "powerpc64-linux-gnu", 21, 64, "big"),
    Target("powerpc", "powerpc", "powerpc-linux-gnu", 20, 32, "big"),
    Target("mips64el", "mips", "mips64el-linux-gnuabi64", 8, 64, "little"),
    Target("mipsel", "mips", "mipsel-linux-gnu", 8, 32, "little"),
    Target("arm64", "arm64", "aarch64-linux-gnu", 183, 64, "little"),
    Target("armhf", "arm", "arm-linux-gnueabihf", 40, 32, "little"),
    Target("s390x", "s390", "s390x-linux-gnu", 22, 64, "big"),
    Target("riscv64", "riscv", "riscv64-linux-gnu", 243, 64, "little"),
)}


def target_for(facts: Facts) -> Target | None:
    """The build target of a host's kernel, or None for a machine we do not know.

    ``uname -m`` names the kernel's machine but not its byte order on MIPS
    (``mips64`` for both), so the endianness comes from the facts (the ELF
    header of the host's /bin/sh); a 64-bit ``uname -m`` means a 64-bit kernel
    even under a 32-bit userland.
    """
    m, little = facts.arch, facts.endian == "little"
    if m == "x86_64":
        name = "amd64"
    elif m in ("i386", "i486", "i586", "i686"):
        name = "i386"
    elif m in ("ppc64le", "ppc64"):
        name = "ppc64el" if little else "ppc64"
    elif m == "ppc":
        name = "powerpc"
    elif m in ("mips64", "mips64el"):
        name = "mips64el" if little else "mips64"
    elif m in ("mips", "mipsel"):
        name = "mipsel" if little else "mips"
    elif m in ("aarch64", "arm64"):
        name = "arm64"
    elif m.startswith("armv7") or m == "armv6l":
        name = "armhf"
    elif m == "s390x":
        name = "s390x"
    elif m == "riscv64":
        name = "riscv64"
    else:
        return None
    return _TARGETS.get(name)


_CONTROLLER_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el", "i686": "i386",
                    "s390x": "s390x", "riscv64": "riscv64"}


def controller_debian_arch() -> str:
    """The controller's own Debian architecture (whose linux-kbuild binaries can run here)."""
    machine = os.uname().machine
    return _CONTROLLER_ARCH.get(machine, machine)


def cross_compiler_package(debian_arch: str, gcc_version: str = "12") -> str:
    """The Debian package that provides the compiler for building for ``debian_arch`` here."""
    target = _TARGETS[debian_arch]
    if debian_arch == controller_debian_arch():
        return f"gcc-{gcc_version}"
    return f"gcc-{gcc_version}-{target.triplet.replace('_', '-')}"
