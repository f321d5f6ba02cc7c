"""The ``.ko`` file: its ELF header, ``.modinfo`` (vermagic), and the module-name rewrite.

Read in pure Python: the controller need not have binutils or kmod for the target arch.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from fleetprobe.arches import EM_NAMES



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
