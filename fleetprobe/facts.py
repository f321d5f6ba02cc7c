"""Facts: what one host can do, gathered in one round trip and parsed by a pure function."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SymbolFacts:
    """Whether a kernel symbol the playbook names can carry a kprobe on this host.

    ``probeable`` is decided from the host, never from its version:
    in available_filter_functions (or, failing that, kallsyms text) and not in
    the kprobe blacklist.  ``clones`` lists GCC clones seen (``foo.isra.0``,
    ``foo.constprop.0``) which may be probed under their full name.
    """

    name: str
    in_filter_functions: bool
    in_kallsyms: bool
    blacklisted: bool
    clones: tuple[str, ...] = ()

    @property
    def probeable(self) -> bool:
        return (self.in_filter_functions or self.in_kallsyms) and not self.blacklisted

    @property
    def why_not(self) -> str:
        if self.blacklisted:
            return f"{self.name} is in the kprobe blacklist"
        if not (self.in_filter_functions or self.in_kallsyms):
            if self.clones:
                return f"{self.name} exists only as GCC clone(s) {', '.join(self.clones)}"
            return f"{self.name} is not in available_filter_functions or kallsyms (inlined, renamed or absent)"
        return ""


@dataclass(frozen=True)
class FileFacts:
    """A user-space binary named by a uprobe: exists on the host, and its content hash."""

    path: str
    exists: bool
    size: int = 0
    md5: str = ""


@dataclass(frozen=True)
class Facts:
    """Everything the planner needs to know about one host.

    ``arch`` is ``uname -m`` (x86_64, ppc64le, mips64, mips, aarch64, i686 ...);
    ``endian`` and ``elf_class`` come from the ELF header of the host's
    /bin/sh because ``uname -m`` says ``mips64`` for both mips64 and mips64el.
    ``features`` holds what the tracefs README advertises: ``arg_n``
    (``$arg<N>``), ``ustring``, ``symstr``, ``return_suffix`` (``%return``),
    ``user_deref`` (``+u<off>``), ``btf_args``, ``hist``, ``eprobe``.
    """

    host: str
    arch: str
    kernel_release: str
    kernel_version: str = ""
    endian: str = "little"
    elf_class: int = 64
    ncpus: int = 1
    boot_id: str = ""
    realtime: float = 0.0
    uid: int = 0
    tracefs: str | None = None
    tracefs_mounted_by_us: bool = False
    features: frozenset[str] = frozenset()
    kprobe_events: bool = False
    uprobe_events: bool = False
    instances: bool = False
    lockdown: str = "none"
    modules_disabled: bool = False
    kprobes_enabled: bool = True
    symbols: dict[str, SymbolFacts] = field(default_factory=dict)
    tracepoints: dict[str, bool] = field(default_factory=dict)
    files: dict[str, FileFacts] = field(default_factory=dict)
    build_dir: str | None = None
    make: bool = False
    cc: str | None = None
    leftovers: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def can_build_modules(self) -> bool:
        return bool(self.build_dir and self.make and self.cc)

    @property
    def kernel_arch(self) -> str:
        """The kernel's ARCH= name for this machine (x86, powerpc, mips, arm64 ...)."""
        return kernel_arch(self.arch)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (used by stored facts in tests and by reports)."""
        return {
            "host": self.host, "arch": self.arch, "kernel_release": self.kernel_release,
            "kernel_version": self.kernel_version, "endian": self.endian, "elf_class": self.elf_class,
            "ncpus": self.ncpus, "boot_id": self.boot_id, "realtime": self.realtime, "uid": self.uid,
            "tracefs": self.tracefs, "tracefs_mounted_by_us": self.tracefs_mounted_by_us,
            "features": sorted(self.features), "kprobe_events": self.kprobe_events,
            "uprobe_events": self.uprobe_events, "instances": self.instances,
            "lockdown": self.lockdown, "modules_disabled": self.modules_disabled,
            "kprobes_enabled": self.kprobes_enabled,
            "symbols": {k: {"in_filter_functions": v.in_filter_functions, "in_kallsyms": v.in_kallsyms,
                            "blacklisted": v.blacklisted, "clones": list(v.clones)}
                        for k, v in self.symbols.items()},
            "tracepoints": dict(self.tracepoints),
            "files": {k: {"exists": v.exists, "size": v.size, "md5": v.md5} for k, v in self.files.items()},
            "build_dir": self.build_dir, "make": self.make, "cc": self.cc,
            "leftovers": list(self.leftovers), "problems": list(self.problems),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Facts:
        """Inverse of :meth:`to_json`."""
        d = dict(data)
        d["features"] = frozenset(d.get("features", ()))
        d["symbols"] = {k: SymbolFacts(name=k, in_filter_functions=v["in_filter_functions"],
                                       in_kallsyms=v["in_kallsyms"], blacklisted=v["blacklisted"],
                                       clones=tuple(v.get("clones", ())))
                        for k, v in d.get("symbols", {}).items()}
        d["files"] = {k: FileFacts(path=k, exists=v["exists"], size=v.get("size", 0), md5=v.get("md5", ""))
                      for k, v in d.get("files", {}).items()}
        d["leftovers"] = tuple(d.get("leftovers", ()))
        d["problems"] = tuple(d.get("problems", ()))
        return cls(**d)


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
