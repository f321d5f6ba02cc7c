"""Build: kernel modules built once per (arch, kernel release, module source), on a host or the controller.

Stages, in order:

1. :func:`load_module_source` reads a module folder (``modules/fp_kprobe``) and
   hashes the files the build reads.
2. :func:`plan_builds` (pure) groups hosts by (target arch, kernel release,
   source hash) and decides where each group builds: ``host`` (on one host of
   the group, in its ``/lib/modules/$(uname -r)/build``) or ``controller``
   (cross-built against Debian's ``linux-headers-<release>`` fetched with
   :mod:`fleetprobe.debian`).  ``fleetprobe plan`` prints these groups.
3. :func:`build_groups` runs the builds (bounded, one per group, never one per
   host), caches each ``.ko`` by (arch, release, source hash) and checks its
   ELF machine and vermagic before anyone loads it.
4. :func:`results_by_host` turns group results into a per-host map of
   :class:`BuiltModule` or :class:`~fleetprobe.errors.HostError`.

The ``.ko`` is read in pure Python (:func:`read_elf_info`, :func:`read_modinfo`):
the controller need not have binutils or kmod for the target arch.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from fleetprobe import debian
from fleetprobe.errors import FleetprobeError, HostError
from fleetprobe.facts import Facts, kernel_arch

# --------------------------------------------------------------------------
# Module sources

#: Files a kbuild run writes into the module folder; they are not part of the source.
_BUILD_OUTPUT = re.compile(
    r"(\.o|\.ko|\.mod|\.mod\.c|\.a|\.dwo|\.order|\.symvers|\.cmd|\.tmp|~)$"
    r"|^(modules\.order|Module\.symvers)$")


@dataclass(frozen=True)
class ModuleSource:
    """A kernel module's source folder: its name (the .ko's), files and their hash.

    ``files`` holds (path relative to the folder, content); ``source_hash`` is
    the first 16 hex digits of a sha256 over those, so editing any source
    file gives a new build key and an old ``.ko`` is never reused.
    """

    name: str
    path: Path
    files: tuple[tuple[str, bytes], ...]
    source_hash: str


def _source_file(rel: str) -> bool:
    """True for files the kernel build reads: not build output, not documentation, not hidden."""
    base = rel.rsplit("/", 1)[-1]
    if base.startswith(".") or base.lower().startswith("readme") or base.endswith(".md"):
        return False
    return not _BUILD_OUTPUT.search(base)


def load_module_source(path: Path | str, name: str | None = None) -> ModuleSource:
    """Read a module folder (Kbuild + sources); the module name defaults to the folder name."""
    folder = Path(path)
    if not (folder / "Kbuild").is_file() and not (folder / "Makefile").is_file():
        raise FleetprobeError(f"{folder} is not a kernel module folder (no Kbuild or Makefile)",
                              where=str(folder),
                              hint="a module folder holds Kbuild (obj-m := NAME.o) and NAME.c")
    files: list[tuple[str, bytes]] = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and _source_file(rel):
            files.append((rel, p.read_bytes()))
    digest = hashlib.sha256()
    for rel, data in files:
        digest.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return ModuleSource(name=name or folder.name, path=folder, files=tuple(files),
                        source_hash=digest.hexdigest()[:16])


# --------------------------------------------------------------------------
# Targets: uname -m + endianness -> Debian architecture, compiler, ELF machine


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


# --------------------------------------------------------------------------
# Debian kernels

# 6.1.0-50-amd64 (up to bookworm), 6.12.118+deb13-amd64 / 6.12.95+deb12-amd64 (trixie, bookworm-backports).
_DEBIAN_RELEASE = re.compile(r"^\d+\.\d+\.\d+(?:-\d+|\+deb\d+)(?:-[a-z0-9][a-z0-9-]*)?$")
_DEBIAN_VERSION = re.compile(r"\bDebian (\d[\w.+~:-]*)")


def debian_package_version(kernel_version: str) -> str | None:
    """The Debian source version from ``uname -v`` (``... Debian 6.1.176-1 (2025-06-01)``)."""
    m = _DEBIAN_VERSION.search(kernel_version)
    return m.group(1) if m else None


def is_debian_kernel(release: str, kernel_version: str) -> bool:
    """True if ``uname -r``/``uname -v`` say this is a Debian kernel (headers in Debian's archive).

    Ubuntu's releases look the same (``5.15.0-91-generic``) but its ``uname -v``
    says Ubuntu, so ``uname -v`` must name Debian when the facts have it.
    """
    if not _DEBIAN_RELEASE.match(release):
        return False
    return not kernel_version or "Debian" in kernel_version


# --------------------------------------------------------------------------
# Planning (pure)

WHERE_CHOICES = ("auto", "host", "controller")


@dataclass(frozen=True)
class BuildKey:
    """What makes two hosts share one ``.ko``: target arch, kernel release, module source."""

    debian_arch: str
    release: str
    module: str
    source_hash: str

    def __str__(self) -> str:
        return f"{self.module}@{self.source_hash[:8]} for {self.release} ({self.debian_arch})"


@dataclass(frozen=True)
class BuildGroup:
    """One build serving every host in ``hosts``.

    ``where`` is ``host`` (``build_host`` builds it in ``build_dir``),
    ``controller`` (cross-built against Debian's headers for ``release``,
    package version ``package_version`` when ``uname -v`` told it), or
    ``none`` when it cannot be built: ``error`` says why and what to do.
    ``blocked`` lists hosts of this kernel that cannot load any module
    (modules_disabled, lockdown) with the reason; they get no build.
    """

    key: BuildKey
    module: ModuleSource
    target: Target
    hosts: tuple[str, ...]
    where: str
    reason: str
    build_host: str | None = None
    build_dir: str | None = None
    package_version: str | None = None
    compiler: str | None = None
    error: str | None = None
    hint: str | None = None
    blocked: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """One line for ``fleetprobe plan``: what is built, where, for how many hosts."""
        n = len(self.hosts)
        text = f"{self.key}: {n} host{'s' if n != 1 else ''}: "
        if self.where == "host":
            text += f"build on {self.build_host} ({self.build_dir})"
        elif self.where == "controller":
            text += f"cross-build on the controller with {self.compiler}"
        else:
            text += f"cannot build: {self.error}"
        if self.blocked:
            text += f"; {len(self.blocked)} host(s) cannot load modules"
        return text


def module_load_blocker(facts: Facts) -> str | None:
    """Why this host cannot load an unsigned module we build, or None."""
    if facts.modules_disabled:
        return "module loading is disabled (/proc/sys/kernel/modules_disabled = 1; only a reboot clears it)"
    if facts.lockdown in ("integrity", "confidentiality"):
        return (f"kernel lockdown is '{facts.lockdown}': only modules signed with a key the kernel "
                "trusts load; fleetprobe builds unsigned modules (use tracefs probes instead)")
    return None


def _have_program(name: str) -> bool:
    """True if ``name`` is on the controller's PATH."""
    return shutil.which(name) is not None


def _host_build_problem(f: Facts) -> str:
    """What a host lacks to build modules itself."""
    missing = []
    if not f.build_dir:
        missing.append(f"no /lib/modules/{f.kernel_release}/build (install the kernel headers package)")
    if not f.make:
        missing.append("no make")
    if not f.cc:
        missing.append("no cc/gcc")
    return ", ".join(missing)


def plan_builds(hosts_facts: Iterable[Facts] | Mapping[str, Facts],
                modules: Sequence[ModuleSource] | Mapping[str, Sequence[ModuleSource]],
                *, where: str = "auto",
                have_program: Callable[[str], bool] = _have_program) -> list[BuildGroup]:
    """Group hosts by (arch, release, module source) and choose where each group builds.

    ``modules`` is either the modules every host needs, or a map from host
    name to the modules that host needs.  ``where`` is ``auto`` (a host of the
    group if one can build, else the controller for a Debian kernel with a
    cross compiler installed), ``host`` or ``controller``.  ``have_program``
    answers whether the controller has a program (the cross compiler); tests
    pass their own.  Nothing is touched: this only decides.
    """
    if where not in WHERE_CHOICES:
        raise FleetprobeError(f"unknown build location {where!r}", hint="use one of: auto, host, controller")
    facts_list = list(hosts_facts.values()) if isinstance(hosts_facts, Mapping) else list(hosts_facts)
    members: dict[BuildKey, list[Facts]] = {}
    sources: dict[BuildKey, ModuleSource] = {}
    targets: dict[BuildKey, Target] = {}
    unknown: list[BuildGroup] = []
    for f in sorted(facts_list, key=lambda x: x.host):
        wanted = modules.get(f.host, ()) if isinstance(modules, Mapping) else modules
        target = target_for(f)
        for mod in wanted:
            if target is None:
                key = BuildKey(f.arch, f.kernel_release, mod.name, mod.source_hash)
                unknown.append(BuildGroup(
                    key=key, module=mod, target=Target(f.arch, kernel_arch(f.arch), "", 0, f.elf_class, f.endian),
                    hosts=(f.host,), where="none", reason="unknown machine",
                    error=f"fleetprobe does not know how to build for machine {f.arch!r} ({f.endian} endian)",
                    hint="use tracefs probes on this host, or add the arch to fleetprobe.build"))
                continue
            key = BuildKey(target.debian_arch, f.kernel_release, mod.name, mod.source_hash)
            members.setdefault(key, []).append(f)
            sources[key] = mod
            targets[key] = target
    groups = [_plan_group(key, sources[key], targets[key], hosts, where, have_program)
              for key, hosts in members.items()]
    return sorted(groups + unknown, key=lambda g: (g.key.debian_arch, g.key.release, g.key.module))


def _plan_group(key: BuildKey, mod: ModuleSource, target: Target, hosts: list[Facts],
                where: str, have_program: Callable[[str], bool]) -> BuildGroup:
    """Decide where one group builds (see :func:`plan_builds`)."""
    blocked = tuple((f.host, r) for f in hosts if (r := module_load_blocker(f)) is not None)
    loadable = [f for f in hosts if module_load_blocker(f) is None]
    base = BuildGroup(key=key, module=mod, target=target, hosts=tuple(f.host for f in loadable),
                      where="none", reason="", blocked=blocked)
    if not loadable:
        return replace(base, reason="no host can load modules", error="no host of this kernel can load modules",
                        hint=blocked[0][1] if blocked else None)
    builders = [f for f in loadable if f.can_build_modules]
    reasons: list[str] = []
    if where in ("auto", "host"):
        if builders:
            b = builders[0]
            return replace(base, where="host", build_host=b.host,
                            build_dir=b.build_dir or f"/lib/modules/{key.release}/build",
                            reason=f"{b.host} has the kernel's build tree, make and {b.cc}")
        reasons.append(f"no host can build ({loadable[0].host}: {_host_build_problem(loadable[0])})")
    if where in ("auto", "controller"):
        f = loadable[0]
        compiler = f"{target.triplet}-gcc"
        if not is_debian_kernel(key.release, f.kernel_version):
            reasons.append(f"{key.release} is not a Debian kernel (uname -v: {f.kernel_version or '?'}), "
                           "so its headers cannot be fetched")
        elif not have_program(compiler):
            reasons.append(f"cross compiler {compiler} is not installed on the controller "
                           f"(apt-get install {cross_compiler_package(target.debian_arch)})")
        else:
            return replace(base, where="controller", compiler=compiler,
                            package_version=debian_package_version(f.kernel_version),
                            reason=f"Debian kernel; {compiler} on the controller")
    hint = ("install the kernel headers, make and gcc on one host of this kernel, "
            f"or install {cross_compiler_package(target.debian_arch)} on the controller (Debian kernels only)")
    return replace(base, reason="cannot build", error="; ".join(reasons), hint=hint)


# --------------------------------------------------------------------------
# ELF and .modinfo, in pure Python


@dataclass(frozen=True)
class ElfInfo:
    """The ELF header facts that decide whether a .ko can load on a kernel."""

    elf_class: int
    endian: str
    machine: int

    @property
    def machine_name(self) -> str:
        """e_machine as a name (``x86-64``, ``PowerPC64``, ``MIPS``...)."""
        return EM_NAMES.get(self.machine, str(self.machine))


@dataclass(frozen=True)
class ModInfo:
    """A module's ``.modinfo`` section: ``vermagic``, ``name``, ``depends`` ... (all keys in ``fields``)."""

    fields: dict[str, list[str]]

    def get(self, key: str) -> str | None:
        """The first value of ``key``."""
        values = self.fields.get(key)
        return values[0] if values else None

    @property
    def vermagic(self) -> str:
        """``6.1.0-50-powerpc64le SMP mod_unload modversions ...``; empty when absent."""
        return self.get("vermagic") or ""

    @property
    def release(self) -> str:
        """vermagic's first word: the kernel release the module was built for."""
        return self.vermagic.split(" ", 1)[0]


class ElfFormatError(ValueError):
    """Not an ELF file, or one we cannot read; names the file."""


def read_elf_info(data: bytes, *, name: str = "module") -> ElfInfo:
    """Read class, byte order and e_machine from an ELF header."""
    if len(data) < 20 or data[:4] != b"\x7fELF":
        raise ElfFormatError(f"{name}: not an ELF file")
    if data[4] not in (1, 2) or data[5] not in (1, 2):
        raise ElfFormatError(f"{name}: unknown ELF class {data[4]} or data encoding {data[5]}")
    order = "<" if data[5] == 1 else ">"
    (machine,) = struct.unpack_from(order + "H", data, 18)
    return ElfInfo(elf_class=32 if data[4] == 1 else 64, endian="little" if data[5] == 1 else "big",
                   machine=machine)


def _section(data: bytes, wanted: str, *, name: str) -> bytes | None:
    """The bytes of section ``wanted`` of an ELF file, or None if it has none."""
    span = _section_span(data, wanted, name=name)
    return None if span is None else data[span[0]:span[1]]


def _section_span(data: bytes, wanted: str, *, name: str) -> tuple[int, int] | None:
    """(start, end) file offsets of section ``wanted`` of an ELF file, or None if it has none."""
    info = read_elf_info(data, name=name)
    o = "<" if info.endian == "little" else ">"
    try:
        if info.elf_class == 64:
            shoff, = struct.unpack_from(o + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(o + "HHH", data, 0x3A)
            fmt, off_i, size_i = o + "IIQQQQIIQQ", 4, 5
        else:
            shoff, = struct.unpack_from(o + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(o + "HHH", data, 0x2E)
            fmt, off_i, size_i = o + "IIIIIIIIII", 4, 5
        headers = [struct.unpack_from(fmt, data, shoff + i * shentsize) for i in range(shnum)]
        strtab = headers[shstrndx]
        names = data[strtab[off_i]:strtab[off_i] + strtab[size_i]]
        for h in headers:
            end = names.find(b"\0", h[0])
            if names[h[0]:end].decode("ascii", "replace") == wanted:
                if h[off_i] + h[size_i] > len(data):
                    raise ElfFormatError(f"{name}: section {wanted} runs past the end of the file")
                return h[off_i], h[off_i] + h[size_i]
    except (struct.error, IndexError) as exc:
        raise ElfFormatError(f"{name}: truncated or corrupt ELF section table ({exc})") from None
    return None


def read_modinfo(data: bytes, *, name: str = "module") -> ModInfo:
    """Parse a .ko's ``.modinfo`` section (NUL-separated ``key=value`` strings)."""
    section = _section(data, ".modinfo", name=name)
    if section is None:
        raise ElfFormatError(f"{name}: no .modinfo section: not a kernel module")
    fields: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    return ModInfo(fields)


#: A module name the kernel accepts and fleetprobe's sweep recognises: ``fp_`` and at most
#: MODULE_NAME_LEN - 1 bytes (MODULE_NAME_LEN is 64 - sizeof(long): 56 on 64-bit, 60 on 32-bit).
_LOAD_NAME = re.compile(r"fp_[A-Za-z0-9_]{1,52}")


def with_module_name(ko: bytes, new: str, *, name: str = "module") -> bytes:
    """The same module under another name, so one kernel can hold it once per run and probe.

    The kernel names a module after ``struct module``'s ``name`` field in the
    ``.gnu.linkonce.this_module`` section (a fixed MODULE_NAME_LEN array after
    ``state`` and ``list``: offset 24 on 64-bit, 12 on 32-bit); since 5.x it
    reads the name from ``.modinfo``'s ``name=`` first and falls back to that
    field when there is none. So: write ``new`` into the field (zero-padded,
    same size) and blank ``name=...`` in ``.modinfo`` with NULs (the kernel's
    modinfo walk skips NUL padding). No other byte moves; the printk prefix
    compiled into the code (KBUILD_MODNAME) stays the source's name.
    """
    if not _LOAD_NAME.fullmatch(new):
        raise ValueError(f"module name {new!r} must be fp_ and up to 52 letters, digits or _")
    info = read_elf_info(ko, name=name)
    span = _section_span(ko, ".gnu.linkonce.this_module", name=name)
    if span is None:
        raise ElfFormatError(f"{name}: no .gnu.linkonce.this_module section: not a kernel module")
    field = span[0] + (24 if info.elf_class == 64 else 12)
    size = 56 if info.elf_class == 64 else 60
    old = ko[field:field + size].split(b"\0", 1)[0]
    if field + size > span[1] or not old or ko[field + len(old):field + size].strip(b"\0"):
        raise ElfFormatError(f"{name}: unexpected struct module layout (no NUL-padded name at +{field - span[0]})")
    out = bytearray(ko)
    out[field:field + size] = new.encode().ljust(size, b"\0")
    info_span = _section_span(ko, ".modinfo", name=name)
    if info_span is not None:
        tag = b"name=" + old + b"\0"
        at = ko.find(tag, info_span[0], info_span[1])
        while at >= 0:
            if at == info_span[0] or ko[at - 1] == 0:  # a whole entry, not the tail of another
                out[at:at + len(tag)] = bytes(len(tag))
            at = ko.find(tag, at + 1, info_span[1])
    return bytes(out)


def vermagic_problem(modinfo: ModInfo, release: str, host_vermagic: str | None = None) -> str | None:
    """Why a module would be refused by a kernel (``uname -r`` = ``release``), or None.

    vermagic's first word must equal the release; when a vermagic of one of
    the host's own modules is known, the rest (SMP, preempt, mod_unload,
    modversions, arch flags) must match too, as the kernel's module loader
    compares the whole string when modversions are off.
    """
    if not modinfo.vermagic:
        return "the module has no vermagic"
    if modinfo.release != release:
        return f"module vermagic is for {modinfo.release!r} but the host runs {release!r}"
    if host_vermagic is not None and host_vermagic.split() != modinfo.vermagic.split():
        return (f"module vermagic {modinfo.vermagic!r} differs from the host's own modules' "
                f"{host_vermagic!r}")
    return None


# --------------------------------------------------------------------------
# Cache

def default_cache_dir() -> Path:
    """``$FLEETPROBE_CACHE`` or ``$XDG_CACHE_HOME/fleetprobe`` or ``~/.cache/fleetprobe``."""
    if os.environ.get("FLEETPROBE_CACHE"):
        return Path(os.environ["FLEETPROBE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetprobe"


class ModuleCache:
    """Built ``.ko`` files by (arch, release, module, source hash) under ``root``.

    Layout: ``<root>/<debian arch>/<release>/<module>-<hash>/`` holding
    ``<module>.ko``, ``build.log`` and ``build.json``.  An entry is written
    to a temporary folder and renamed into place, so a reader never sees half
    a build and two concurrent builders simply keep the first.
    """

    def __init__(self, root: Path | None = None) -> None:
        """Use ``root`` (default ``default_cache_dir()/modules``)."""
        self.root = root if root is not None else default_cache_dir() / "modules"

    def entry(self, key: BuildKey) -> Path:
        """The folder for ``key``."""
        return self.root / key.debian_arch / key.release / f"{key.module}-{key.source_hash}"

    def lookup(self, key: BuildKey) -> Path | None:
        """The cached .ko for ``key``, or None."""
        ko = self.entry(key) / f"{key.module}.ko"
        return ko if ko.is_file() else None

    def store(self, key: BuildKey, ko: bytes, log: str, meta: dict[str, object]) -> Path:
        """Put a built module in the cache; return its path (the existing one if another build won)."""
        final = self.entry(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key.module}-", dir=final.parent))
        (tmp / f"{key.module}.ko").write_bytes(ko)
        (tmp / "build.log").write_text(log)
        (tmp / "build.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.lookup(key) is None:
                raise
        return final / f"{key.module}.ko"


# --------------------------------------------------------------------------
# Running builds


class CommandResultLike(Protocol):
    """What a session's ``run`` returns (fleetprobe.transport.CommandResult)."""

    @property
    def exit_status(self) -> int: ...
    @property
    def stdout(self) -> bytes: ...
    @property
    def stderr(self) -> bytes: ...


class BuildSession(Protocol):
    """The part of a host session a host build needs (fleetprobe.transport.Session provides it)."""

    async def run(self, cmd: str, *, input: bytes | None = None,
                  timeout: float | None = None) -> CommandResultLike: ...
    async def put(self, data: bytes, path: str, mode: int = 0o644) -> None: ...
    async def get(self, path: str) -> bytes: ...


class BuildError(FleetprobeError):
    """A group's build failed; ``evidence`` holds the compiler's or tool's own words."""

    def __init__(self, message: str, *, where: str, evidence: str = "", hint: str | None = None) -> None:
        super().__init__(message, where=where, hint=hint)
        self.evidence = evidence


@dataclass(frozen=True)
class BuiltModule:
    """A built, checked ``.ko`` in the cache, ready to copy to the group's hosts."""

    key: BuildKey
    path: Path
    modinfo: ModInfo
    elf: ElfInfo
    cached: bool
    where: str
    seconds: float

    def data(self) -> bytes:
        """The .ko's bytes (to put on a host)."""
        return self.path.read_bytes()


@dataclass
class GroupResult:
    """The outcome of one group's build: a module, or the error every host of the group gets."""

    group: BuildGroup
    module: BuiltModule | None = None
    error: BuildError | None = None
    notes: list[str] = field(default_factory=list)


#: Most lines of compiler output kept as evidence of a failed build.
EVIDENCE_LINES = 25


def compiler_messages(output: str, limit: int = EVIDENCE_LINES) -> str:
    """The lines of a kbuild run that explain a failure: errors first, else the tail."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    wanted = [ln for ln in lines
              if re.search(r"\b(error|Error \d+|undefined|No such file|not found|No rule)\b", ln)
              or ln.lstrip().startswith("|") or re.match(r"^\s+\d+ \|", ln)]
    chosen = wanted if wanted else lines
    return "\n".join(chosen[:limit] if wanted else chosen[-limit:])


def check_module(ko: bytes, key: BuildKey, target: Target, *, where: str) -> tuple[ModInfo, ElfInfo]:
    """Check a freshly built .ko: right ELF class, byte order and machine, vermagic for the release."""
    try:
        elf = read_elf_info(ko, name=f"{key.module}.ko")
        modinfo = read_modinfo(ko, name=f"{key.module}.ko")
    except ElfFormatError as exc:
        raise BuildError(f"build of {key} produced an unreadable module", where=where, evidence=str(exc)) from None
    if (elf.machine, elf.elf_class, elf.endian) != (target.elf_machine, target.elf_class, target.endian):
        raise BuildError(
            f"build of {key} produced a {elf.elf_class}-bit {elf.endian}-endian {elf.machine_name} module, "
            f"expected {target.elf_class}-bit {target.endian}-endian {EM_NAMES.get(target.elf_machine, '?')}",
            where=where, hint="the build tree or compiler is for another architecture")
    problem = vermagic_problem(modinfo, key.release)
    if problem:
        raise BuildError(f"build of {key}: {problem}", where=where, evidence=modinfo.vermagic,
                         hint="the build tree is not the one of this kernel release")
    return modinfo, elf


async def _run_local(argv: list[str], *, cwd: Path | None = None, timeout: float) -> tuple[int, str]:
    """Run a command on the controller; return (exit status, stdout+stderr)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C",
           "HOME": os.environ.get("HOME", "/")}
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {timeout:.0f}s: {' '.join(argv)}"
    return proc.returncode if proc.returncode is not None else -1, out.decode("utf-8", "replace")


# -- controller builds: Debian headers ------------------------------------


@dataclass(frozen=True)
class KernelTree:
    """An unpacked, relocated Debian headers tree for one release, usable as ``make -C`` target."""

    path: Path
    release: str
    package_version: str
    cc: str


#: Debian's ``include /usr/src/linux-headers-<abi>-common/Makefile``, or a tree fixed by an older
#: fleetprobe to an absolute path (which broke when the cache was reached through a path that went away).
_HEADERS_INCLUDE = re.compile(r"^include \S*/usr/src/(linux-headers-[^/\s]+/Makefile)$", re.M)


def _fix_makefile(makefile: Path) -> None:
    """Point the release Makefile's include at its sibling -common tree relative to itself.

    ``$(dir $(lastword $(MAKEFILE_LIST)))`` is the folder of the Makefile being
    read, so the tree works wherever the cache lives (moved, copied, or reached
    through a symlink that later goes away).
    """
    text = makefile.read_text()
    fixed = _HEADERS_INCLUDE.sub(r"include $(dir $(lastword $(MAKEFILE_LIST)))../\1", text)
    if fixed != text:
        makefile.write_text(fixed)


def _fix_tree(root: Path, release: str) -> None:
    """Make an unpacked Debian headers tree work outside /usr/src, wherever it is.

    Debian's ``linux-headers-<release>/Makefile`` includes
    ``/usr/src/linux-headers-<abi>-common/Makefile`` (absolute): made relative to
    itself.  ``/lib/modules/<release>/{build,source}`` are absolute symlinks: made
    relative into the tree (unpacked in ``root``, then renamed into the cache).
    The ``scripts``/``tools`` symlinks into linux-kbuild are relative and already right.
    """
    _fix_makefile(root / "usr/src" / f"linux-headers-{release}" / "Makefile")
    for link in root.rglob("*"):
        if link.is_symlink():
            dest = os.readlink(link)
            if dest.startswith("/"):
                link.unlink()
                link.symlink_to(os.path.relpath(root / dest.lstrip("/"), link.parent))


def _kernel_cc(tree: Path, triplet: str, cross: bool) -> str:
    """The compiler the tree's make will call (Debian sets ``CC = $(CROSS_COMPILE)gcc-12``)."""
    variables = tree / ".kernelvariables"
    cc = "gcc"
    if variables.is_file():
        m = re.search(r"^CC\s*=.*\$\(CROSS_COMPILE\)(\S+)", variables.read_text(), re.M)
        if m:
            cc = m.group(1)
    return f"{triplet}-{cc}" if cross else cc


def prepare_debian_tree(release: str, debian_arch: str, package_version: str | None, *,
                        trees: Path, debian_cache: Path) -> KernelTree:
    """Fetch and unpack linux-headers-<release> (+ -common, + the controller's linux-kbuild) once.

    linux-kbuild is pinned to the headers' exact version: the security suite
    may carry a newer one whose scripts do not match these headers.
    Blocking (apt, dpkg-deb): call it in a thread.
    """
    trees.mkdir(parents=True, exist_ok=True)
    # One preparer per release at a time, across threads and processes (flock
    # is per open file description): the others then find the marker.
    with open(trees / f".{debian_arch}_{release}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _prepare_debian_tree(release, debian_arch, package_version,
                                        trees=trees, debian_cache=debian_cache)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare_debian_tree(release: str, debian_arch: str, package_version: str | None, *,
                         trees: Path, debian_cache: Path) -> KernelTree:
    """prepare_debian_tree's work, under its lock."""
    headers = f"linux-headers-{release}"
    spec = f"{headers}={package_version}" if package_version else headers
    # Headers of a kernel from another suite (bullseye's 5.10, trixie's 6.12) are not in the
    # machine's sources: release_suites says where else to look.
    candidates = debian.release_suites(release)
    try:
        (ref,), suites = debian.resolve_in_suites([spec], debian_arch, debian_cache, candidates)
    except debian.DebianError as exc:
        if not package_version:
            raise
        # uname -v names the source version; an arch may carry a later binNMU: take what exists.
        (ref,), suites = debian.resolve_in_suites([headers], debian_arch, debian_cache, candidates)
        if ref.version.split("+")[0] != package_version:
            raise exc from None
    dest = trees / debian_arch / f"{release}_{ref.version}"
    marker = dest / ".fleetprobe-ready"
    host_arch = controller_debian_arch()
    cross = host_arch != debian_arch
    tree = dest / "usr/src" / headers
    target = _TARGETS[debian_arch]
    if marker.is_file():
        _fix_makefile(tree / "Makefile")  # trees prepared by older fleetprobes used an absolute include
        return KernelTree(tree, release, ref.version, _kernel_cc(tree, target.triplet, cross))
    deps = debian.depends_names(ref.depends)
    common = [d for d in deps if d.startswith("linux-headers-") and d.endswith("-common")]
    kbuild = [d for d in deps if d.startswith("linux-kbuild-")]
    if not common or not kbuild:
        raise debian.DebianError(f"{headers} {ref.version} does not depend on a -common and a linux-kbuild package",
                                 hint=f"Depends was {ref.depends!r}; is this a Debian kernel?")
    pkgs = debian.fetch([ref.spec, f"{common[0]}={ref.version}"], debian_arch, debian_cache, suites)
    pkgs += debian.fetch([f"{kbuild[0]}={ref.version}"], host_arch, debian_cache, suites)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{release}-", dir=dest.parent))
    try:
        for pkg in pkgs:
            debian.extract(pkg, tmp)
        _fix_tree(tmp, release)
        (tmp / ".fleetprobe-ready").write_text(" ".join(p.path.name for p in pkgs) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return KernelTree(tree, release, ref.version, _kernel_cc(tree, target.triplet, cross))


async def build_on_controller(group: BuildGroup, *, trees: Path, debian_cache: Path,
                              timeout: float = 600.0) -> tuple[bytes, str]:
    """Cross-build one group's module against Debian's headers; return (.ko bytes, build log)."""
    key, target = group.key, group.target
    where = f"controller build of {key}"
    try:
        tree = await asyncio.to_thread(prepare_debian_tree, key.release, key.debian_arch,
                                       group.package_version, trees=trees, debian_cache=debian_cache)
    except debian.DebianError as exc:
        raise BuildError(f"cannot get the kernel headers for {key.release} ({key.debian_arch})",
                         where=where, evidence=str(exc),
                         hint="the release may be too old for the configured Debian mirror "
                              "(try snapshot.debian.org in /etc/apt/sources.list.d), or build on a host") from None
    cross = controller_debian_arch() != key.debian_arch
    if shutil.which(tree.cc) is None:
        raise BuildError(f"compiler {tree.cc} (the one {key.release} was built with) is not installed",
                         where=where,
                         hint=f"apt-get install {cross_compiler_package(key.debian_arch, tree.cc.rsplit('-', 1)[-1])}")
    with tempfile.TemporaryDirectory(prefix=f"fleetprobe-{key.module}-") as tmp:
        work = Path(tmp)
        for rel, data in group.module.files:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        argv = ["make", "-C", str(tree.path), f"M={work}", f"ARCH={target.kernel_arch}"]
        if cross:
            argv.append(f"CROSS_COMPILE={target.triplet}-")
        argv.append("modules")
        status, log = await _run_local(argv, timeout=timeout)
        log = f"$ {shlex.join(argv)}\n{log}"
        ko = work / f"{key.module}.ko"
        if status != 0 or not ko.is_file():
            raise BuildError(f"build of {key} failed (make exit status {status})", where=where,
                             evidence=compiler_messages(log), hint="fix the module source; the full log is above")
        return ko.read_bytes(), log


# -- host builds --------------------------------------------------------------


async def build_on_host(group: BuildGroup, session: BuildSession, *, timeout: float = 900.0) -> tuple[bytes, str]:
    """Build one group's module on its build host, in a temporary folder removed afterwards."""
    key = group.key
    host = group.build_host or "?"
    where = f"{host}: build of {key}"
    res = await session.run("mktemp -d /tmp/fleetprobe-build.XXXXXX", timeout=30)
    work = res.stdout.decode(errors="replace").strip()
    if res.exit_status != 0 or not work.startswith("/tmp/fleetprobe-build."):
        raise BuildError("cannot make a build folder on the host", where=where,
                         evidence=res.stderr.decode(errors="replace"), hint="is /tmp writable?")
    try:
        dirs = sorted({os.path.dirname(rel) for rel, _ in group.module.files} - {""})
        if dirs:
            await session.run("mkdir -p " + " ".join(shlex.quote(f"{work}/{d}") for d in dirs), timeout=30)
        for rel, data in group.module.files:
            await session.put(data, f"{work}/{rel}")
        build_dir = group.build_dir or f"/lib/modules/{key.release}/build"
        cmd = f"make -C {shlex.quote(build_dir)} M={shlex.quote(work)} modules 2>&1"
        res = await session.run(cmd, timeout=timeout)
        log = f"$ {cmd}\n" + res.stdout.decode("utf-8", "replace") + res.stderr.decode("utf-8", "replace")
        if res.exit_status != 0:
            raise BuildError(f"build of {key} failed on {host} (make exit status {res.exit_status})",
                             where=where, evidence=compiler_messages(log),
                             hint="fix the module source, or check the host's headers match its kernel")
        try:
            ko = await session.get(f"{work}/{key.module}.ko")
        except Exception as exc:  # the transport's own error type: report it, whatever it is
            raise BuildError(f"make succeeded but {key.module}.ko could not be read back", where=where,
                             evidence=str(exc)) from None
        return ko, log
    finally:
        await session.run(f"rm -rf {shlex.quote(work)}", timeout=30)


async def read_host_vermagic(session: BuildSession, release: str) -> str | None:
    """The vermagic of one of the host's own modules (a plain .ko under /lib/modules/<release>), or None."""
    cmd = (f"find /lib/modules/{shlex.quote(release)}/ -name '*.ko' -type f 2>/dev/null | head -n 1")
    res = await session.run(cmd, timeout=30)
    path = res.stdout.decode(errors="replace").strip()
    if res.exit_status != 0 or not path:
        return None
    try:
        return read_modinfo(await session.get(path), name=path).vermagic or None
    except (ElfFormatError, OSError):
        return None


# -- all groups ---------------------------------------------------------------


async def build_group(group: BuildGroup, *, cache: ModuleCache, session: BuildSession | None = None,
                      trees: Path | None = None, debian_cache: Path | None = None) -> GroupResult:
    """Build (or find in the cache) one group's module and check it; never raises for build failures."""
    key = group.key
    where = f"build of {key}"
    if group.where == "none" or not group.hosts:
        return GroupResult(group, error=BuildError(group.error or "nothing to build", where=where, hint=group.hint))
    cached = cache.lookup(key)
    start = time.monotonic()
    try:
        if cached is not None:
            modinfo, elf = check_module(cached.read_bytes(), key, group.target, where=where)
            return GroupResult(group, module=BuiltModule(key, cached, modinfo, elf, cached=True,
                                                         where="cache", seconds=0.0))
        if group.where == "host":
            if session is None:
                raise BuildError(f"no session to build host {group.build_host}", where=where)
            ko, log = await build_on_host(group, session)
        else:
            root = cache.root.parent
            ko, log = await build_on_controller(group, trees=trees or root / "kernel-trees",
                                                debian_cache=debian_cache or root / "debian")
        modinfo, elf = check_module(ko, key, group.target, where=where)
        seconds = time.monotonic() - start
        path = cache.store(key, ko, log, {"module": key.module, "source_hash": key.source_hash,
                                          "release": key.release, "debian_arch": key.debian_arch,
                                          "where": group.where, "build_host": group.build_host,
                                          "vermagic": modinfo.vermagic, "seconds": round(seconds, 2),
                                          "built_at": time.time()})
        return GroupResult(group, module=BuiltModule(key, path, modinfo, elf, cached=False,
                                                     where=group.where, seconds=seconds))
    except BuildError as exc:
        return GroupResult(group, error=exc)


async def build_groups(groups: Sequence[BuildGroup], *, cache: ModuleCache | None = None,
                       sessions: Mapping[str, BuildSession] | None = None,
                       trees: Path | None = None, debian_cache: Path | None = None,
                       jobs: int | None = None) -> list[GroupResult]:
    """Build every group, at most ``jobs`` at once (default: the controller's CPUs), in the given order."""
    cache = cache or ModuleCache()
    limit = asyncio.Semaphore(jobs or os.cpu_count() or 2)

    async def one(group: BuildGroup) -> GroupResult:
        """One group under the concurrency limit."""
        async with limit:
            session = sessions.get(group.build_host) if sessions and group.build_host else None
            return await build_group(group, cache=cache, session=session, trees=trees, debian_cache=debian_cache)

    return list(await asyncio.gather(*(one(g) for g in groups)))


def results_by_host(results: Iterable[GroupResult]) -> dict[str, dict[str, BuiltModule | HostError]]:
    """Per host, per module name: the built module, or the HostError (stage ``build``) that host gets."""
    out: dict[str, dict[str, BuiltModule | HostError]] = {}
    for r in results:
        for host in r.group.hosts:
            slot = out.setdefault(host, {})
            if r.module is not None:
                slot[r.module.key.module] = r.module
            else:
                err = r.error or BuildError("not built", where=str(r.group.key))
                slot[r.group.key.module] = HostError(host, "build", f"{err.where}: {err.message}",
                                                     evidence=err.evidence or None, hint=err.hint)
        for host, reason in r.group.blocked:
            out.setdefault(host, {})[r.group.key.module] = HostError(
                host, "build", f"cannot load {r.group.key.module}: {reason}")
    return out


def host_module_error(host: str, module: BuiltModule, release: str, host_vermagic: str | None) -> HostError | None:
    """A HostError if ``module`` would be refused by this host's kernel (vermagic), else None."""
    problem = vermagic_problem(module.modinfo, release, host_vermagic)
    if problem is None:
        return None
    return HostError(host, "build", f"{module.key.module}.ko does not match the running kernel: {problem}",
                     evidence=f"module vermagic: {module.modinfo.vermagic}",
                     hint="the host's kernel changed since its facts were gathered, or its build tree is "
                          "for another kernel: reboot into the matching kernel or install matching headers")


async def verify_on_host(session: BuildSession, host: str, module: BuiltModule, release: str) -> HostError | None:
    """Before insmod: compare the module's vermagic with ``release`` and with one of the host's own modules.

    Costs two round trips (find + read one small .ko); a host without plain
    ``.ko`` files (compressed modules) is checked against ``release`` only.
    """
    return host_module_error(host, module, release, await read_host_vermagic(session, release))
