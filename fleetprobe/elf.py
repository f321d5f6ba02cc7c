"""ELF: the file offset of a function in a user-space binary, for uprobe_events.

uprobe_events takes ``PATH:OFFSET`` where OFFSET is a *file* offset, not a
virtual address: offset = st_value - p_vaddr + p_offset of the PT_LOAD
segment holding the symbol (the same computation perf probe does).  This
module reads ELF32/ELF64, little and big endian, PIE and non-PIE, from bytes
the controller fetched from a host; it never runs a tool on the host.
"""

from __future__ import annotations

import difflib
import struct
from dataclasses import dataclass

_PT_LOAD = 1
_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_SHN_UNDEF = 0
_SHN_ABS = 0xFFF1
_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_EM_ARM = 40
_EM_PPC64 = 21
_EM_MIPS = 8


@dataclass(frozen=True)
class _Header:
    """The parts of the ELF header this module needs."""

    is64: bool
    endian: str          # "<" or ">" for struct
    machine: int
    flags: int
    phoff: int
    phentsize: int
    phnum: int
    shoff: int
    shentsize: int
    shnum: int


@dataclass(frozen=True)
class _Section:
    """One section header."""

    name: int
    type: int
    offset: int
    size: int
    link: int
    entsize: int
    addr: int


@dataclass(frozen=True)
class ElfSymbol:
    """One symbol table entry, with its table's name (.symtab or .dynsym)."""

    name: str
    value: int
    size: int
    type: int
    bind: int
    other: int
    shndx: int
    table: str


def _header(data: bytes) -> _Header:
    """Parse the ELF header or raise ValueError saying why the bytes are not a usable ELF file."""
    if len(data) < 16 or data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file (no \\x7fELF magic)")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2):
        raise ValueError(f"unknown ELF class {ei_class}")
    if ei_data not in (1, 2):
        raise ValueError(f"unknown ELF data encoding {ei_data}")
    is64 = ei_class == 2
    e = "<" if ei_data == 1 else ">"
    fmt = e + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
    need = 16 + struct.calcsize(fmt)
    if len(data) < need:
        raise ValueError("truncated ELF header")
    (_type, machine, _version, _entry, phoff, shoff, flags, _ehsize, phentsize, phnum,
     shentsize, shnum, _shstrndx) = struct.unpack_from(fmt, data, 16)
    return _Header(is64, e, machine, flags, phoff, phentsize, phnum, shoff, shentsize, shnum)


def _table_in_file(data: bytes, what: str, offset: int, entsize: int, count: int, need: int) -> None:
    """Refuse a table (headers, symbols) whose entries are smaller than their struct or that does not
    lie wholly inside the file.  The bytes come from a host that may lie: an entsize of 1 over a
    21 MB "table" made 21 million symbols (3.6 GiB); every count is bounded by the file this way."""
    if count and entsize < need:
        raise ValueError(f"{what}: entry size {entsize} is smaller than the {need} bytes of one entry")
    if offset < 0 or offset + entsize * count > len(data):
        raise ValueError(f"{what} ({count} x {entsize} bytes at {offset:#x}) lies outside the "
                         f"{len(data)}-byte file (truncated or forged ELF)")


def _sections(data: bytes, h: _Header) -> list[_Section]:
    """All section headers (empty when the file has none, e.g. a stripped-by-sstrip binary)."""
    fmt = h.endian + ("IIQQQQIIQQ" if h.is64 else "IIIIIIIIII")
    _table_in_file(data, "section header table", h.shoff, h.shentsize, h.shnum, struct.calcsize(fmt))
    out = []
    for i in range(h.shnum):
        off = h.shoff + i * h.shentsize
        if off + struct.calcsize(fmt) > len(data):
            raise ValueError(f"section header {i} lies outside the file (truncated ELF?)")
        name, typ, _flags, addr, offset, size, link, _info, _align, entsize = struct.unpack_from(fmt, data, off)
        out.append(_Section(name, typ, offset, size, link, entsize, addr))
    return out


def _load_segments(data: bytes, h: _Header) -> list[tuple[int, int, int, int]]:
    """PT_LOAD segments as (p_vaddr, p_offset, p_filesz, p_memsz)."""
    _table_in_file(data, "program header table", h.phoff, h.phentsize, h.phnum, 56 if h.is64 else 32)
    out = []
    for i in range(h.phnum):
        off = h.phoff + i * h.phentsize
        if h.is64:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align = struct.unpack_from(
                h.endian + "IIQQQQQQ", data, off)
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _flags, _align = struct.unpack_from(
                h.endian + "IIIIIIII", data, off)
        if p_type == _PT_LOAD:
            out.append((p_vaddr, p_offset, p_filesz, p_memsz))
    return out


def _cstr(data: bytes, offset: int, limit: int | None = None) -> str:
    """A NUL-terminated string from a string table (that ends at ``limit``)."""
    limit = len(data) if limit is None else limit
    end = data.find(b"\0", offset, limit)
    return data[offset:end if end >= 0 else limit].decode("utf-8", "replace")


def symbols(data: bytes) -> list[ElfSymbol]:
    """Every entry of .symtab and .dynsym (in that order)."""
    h = _header(data)
    secs = _sections(data, h)
    out: list[ElfSymbol] = []
    fmt = h.endian + ("IBBHQQ" if h.is64 else "IIIBBH")
    size = struct.calcsize(fmt)
    for table_type, table_name in ((_SHT_SYMTAB, ".symtab"), (_SHT_DYNSYM, ".dynsym")):
        for sec in secs:
            if sec.type != table_type or sec.link >= len(secs):
                continue
            strtab = secs[sec.link]
            entsize = sec.entsize or size
            count = sec.size // entsize
            _table_in_file(data, table_name, sec.offset, entsize, count, size)
            _table_in_file(data, f"{table_name}'s string table", strtab.offset, 1, strtab.size, 1)
            for i in range(1, count):  # entry 0 is the reserved null symbol
                off = sec.offset + i * (sec.entsize or size)
                if off + size > len(data):
                    raise ValueError(f"{table_name} entry {i} lies outside the file (truncated ELF?)")
                if h.is64:
                    st_name, st_info, st_other, st_shndx, st_value, st_size = struct.unpack_from(fmt, data, off)
                else:
                    st_name, st_value, st_size, st_info, st_other, st_shndx = struct.unpack_from(fmt, data, off)
                if st_name >= strtab.size:
                    raise ValueError(f"{table_name} entry {i} names byte {st_name} of a {strtab.size}-byte "
                                     "string table (forged ELF)")
                name = _cstr(data, strtab.offset + st_name, strtab.offset + strtab.size)
                if name:
                    out.append(ElfSymbol(name, st_value, st_size, st_info & 0xF, st_info >> 4, st_other,
                                         st_shndx, table_name))
    return out


def _entry_address(data: bytes, h: _Header, sym: ElfSymbol, segments: list[tuple[int, int, int, int]]) -> int:
    """The address a call to ``sym`` executes first (per-arch ELF quirks)."""
    value = sym.value
    if h.machine == _EM_PPC64:
        abi = h.flags & 3
        if abi == 2:
            # ELFv2 (ppc64le): local calls enter at the local entry point,
            # st_other bits 5-7 (PPC64_LOCAL_ENTRY_OFFSET in elf.h); a uprobe
            # on the global entry would miss them, as perf probe knows.
            bits = (sym.other >> 5) & 7
            value += ((1 << bits) >> 2) << 2 if bits >= 2 else 0
        elif sym.type == _STT_FUNC:
            # ELFv1 (big-endian ppc64): the symbol points at a function
            # descriptor in .opd whose first doubleword is the code address.
            desc = _file_offset(value, segments)
            if desc is not None and desc + 8 <= len(data):
                value = struct.unpack_from(h.endian + "Q", data, desc)[0]
    elif h.machine in (_EM_ARM, _EM_MIPS) and sym.type == _STT_FUNC:
        # Thumb functions, and MIPS16/microMIPS ones in a .dynsym, carry the
        # ISA mode in bit 0 of st_value; the instruction starts at the even address.
        value &= ~1
    return value


def _file_offset(vaddr: int, segments: list[tuple[int, int, int, int]]) -> int | None:
    """File offset of a virtual address inside a PT_LOAD segment's file image, else None."""
    for p_vaddr, p_offset, p_filesz, _memsz in segments:
        if p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    return None


def symbol_file_offset(data: bytes, symbol: str) -> int:
    """File offset of ``symbol``'s code in an ELF image, for ``uprobe_events``.

    Raises ValueError with the reason: not an ELF file, no symbol tables
    (stripped), symbol absent (with near names), undefined (imported from a
    library: probe the library instead), or outside every PT_LOAD segment.
    """
    try:
        return _symbol_file_offset(data, symbol)
    except struct.error as exc:  # a table check missed: still this binary's error, never the fleet's
        raise ValueError(f"malformed ELF: {exc}") from None


def _symbol_file_offset(data: bytes, symbol: str) -> int:
    h = _header(data)
    syms = symbols(data)
    if not syms:
        raise ValueError("the binary has no .symtab or .dynsym (fully stripped): probe it by 0xOFFSET")
    matches = [s for s in syms if s.name == symbol]
    if not matches:
        near = difflib.get_close_matches(symbol, list({s.name for s in syms}), n=3, cutoff=0.7)
        hint = f"; near names: {', '.join(near)}" if near else ""
        raise ValueError(f"symbol {symbol!r} is not in .symtab or .dynsym{hint}")
    defined = [s for s in matches if s.shndx != _SHN_UNDEF]
    if not defined:
        raise ValueError(f"symbol {symbol!r} is undefined here (imported from a shared library): "
                         "probe the library that defines it")
    # Prefer a function with code over other symbol kinds of the same name.
    defined.sort(key=lambda s: (s.type not in (_STT_FUNC, _STT_GNU_IFUNC), s.shndx == _SHN_ABS))
    sym = defined[0]
    segments = _load_segments(data, h)
    address = _entry_address(data, h, sym, segments)
    offset = _file_offset(address, segments)
    if offset is None:
        raise ValueError(f"symbol {symbol!r} at {address:#x} is outside every PT_LOAD segment's file image")
    return offset
