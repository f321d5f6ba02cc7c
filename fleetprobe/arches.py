"""Arches: every per-architecture table fleetprobe needs, in one place.

``uname -m`` + endianness -> Debian architecture, kernel ``ARCH``, GNU triplet and ELF header
values (what a module is built for and checked against), the controller's own Debian arch, and
the function-argument registers and syscall ``pt_regs`` offsets that ``argN`` lowers to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetprobe.facts import Facts  # for types only: facts imports arches (kernel_arch)


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


# --- uname -m -> the kernel's ARCH --------------------------------------------

_KERNEL_ARCH = {
    "x86_64": "x86", "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86",
    "ppc64le": "powerpc", "ppc64": "powerpc", "ppc": "powerpc", "ppcle": "powerpc",
    "mips": "mips", "mips64": "mips", "mipsel": "mips", "mips64el": "mips",
    "aarch64": "arm64", "arm64": "arm64", "riscv64": "riscv", "s390x": "s390",
}


def kernel_arch(machine: str) -> str:
    """Map ``uname -m`` to the kernel's ARCH name; arm* maps to arm."""
    if machine in _KERNEL_ARCH:
        return _KERNEL_ARCH[machine]
    if machine.startswith("arm"):
        return "arm"
    return machine


# --- argument registers ----------------------------------------------------

# Function-argument registers by calling convention, named as tracefs accepts
# them (regs_query_register_offset() of each arch).  The kernel and user-space
# conventions match except on i386: the kernel is built with -mregparm=3,
# user space passes every argument on the stack (cdecl).
_X86_64 = ("%di", "%si", "%dx", "%cx", "%r8", "%r9")
_I386_KERNEL = ("%ax", "%dx", "%cx")
_PPC = tuple(f"%r{i}" for i in range(3, 11))           # r3..r10; %a0/$argN rejected on 6.1 (LAB.md)
_MIPS_N64 = tuple(f"%r{i}" for i in range(4, 12))      # a0..a7 = r4..r11; %a0 is rejected
_MIPS_O32 = tuple(f"%r{i}" for i in range(4, 8))       # a0..a3 = r4..r7
_ARM64 = tuple(f"%x{i}" for i in range(0, 8))
_ARM = tuple(f"%r{i}" for i in range(0, 4))            # AAPCS r0..r3 (not lab-verified)
_RISCV = tuple(f"%a{i}" for i in range(0, 8))          # riscv names its pt_regs a0..a7 (not lab-verified)
_S390 = tuple(f"%r{i}" for i in range(2, 7))           # s390x r2..r6 (not lab-verified)
I386_MACHINES = ("i386", "i486", "i586", "i686")

# x86_64 syscall entry points since 4.17 (commit fa697140f9a2, "syscalls/x86:
# Use 'struct pt_regs' based syscall calling convention") take one
# struct pt_regs * in %di; the real arguments live in it.  Offsets from
# arch/x86/include/asm/ptrace.h struct pt_regs (64-bit): r10=56 r9=64 r8=72
# dx=96 si=104 di=112.  The 4th syscall argument is r10, not cx.
X64_SYSCALL_PT_REGS = (112, 104, 96, 56, 72, 64)
# arm64 does the same since 4.19 (__arm64_sys_*): struct pt_regs begins with
# regs[31] (arch/arm64/include/asm/ptrace.h), so argument N is regs[N-1].
ARM64_SYSCALL_PT_REGS = (0, 8, 16, 24, 32, 40)


def kernel_arg_registers(facts: Facts) -> tuple[str, ...] | None:
    """The kernel's function-argument registers on this host, or None when unknown."""
    machine = facts.arch
    if machine == "x86_64":
        return _X86_64
    if machine in I386_MACHINES:
        return _I386_KERNEL
    if machine.startswith("ppc"):
        return _PPC
    if machine.startswith("mips"):
        # uname -m says mips64 for a 64-bit kernel (n64); mips is a 32-bit (o32) kernel.
        return _MIPS_N64 if machine.startswith("mips64") else _MIPS_O32
    if machine in ("aarch64", "arm64"):
        return _ARM64
    if machine.startswith("arm"):
        return _ARM
    if machine == "riscv64":
        return _RISCV
    if machine == "s390x":
        return _S390
    return None


def user_arg_registers(facts: Facts) -> tuple[str, ...] | None:
    """User-space function-argument registers on this host; None when arguments are on the stack or unknown."""
    machine = facts.arch
    if machine in I386_MACHINES:
        return None
    if machine.startswith("mips"):
        # The userland ABI follows the host's binaries: ELF32 => o32 (n32 is not told apart).
        return _MIPS_O32 if facts.elf_class == 32 else _MIPS_N64
    return kernel_arg_registers(facts)
