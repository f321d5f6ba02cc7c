"""ELF file offsets for uprobes, checked against binutils on real binaries (this machine's and cross-built ones)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetprobe.elf import symbol_file_offset, symbols

SOURCE = """\
int fp_counter;
int fp_target(int a, int b) { fp_counter += a; return a * 3 + b + fp_counter; }
int fp_other(int a) { return fp_target(a, 1) + 7; }
void _start(void) { for (;;) fp_other(1); }
"""

# (id, compiler, flags, binutils prefix): ELF32/ELF64, both endians, PIE and not.
CROSS = [
    ("x86_64-nopie", "x86_64-linux-gnu-gcc", ["-no-pie", "-static"], "x86_64-linux-gnu-"),
    ("x86_64-pie", "x86_64-linux-gnu-gcc", ["-pie", "-fPIE"], "x86_64-linux-gnu-"),
    ("i386", "x86_64-linux-gnu-gcc", ["-m32", "-no-pie", "-static"], "x86_64-linux-gnu-"),
    ("ppc64le-elfv2", "powerpc64le-linux-gnu-gcc", ["-static"], "powerpc64le-linux-gnu-"),
    ("ppc64-elfv1-be", "powerpc64le-linux-gnu-gcc", ["-static", "-mbig-endian", "-mabi=elfv1"],
     "powerpc64le-linux-gnu-"),
    ("mips64el-n64", "mips64el-linux-gnuabi64-gcc", ["-static"], "mips64el-linux-gnuabi64-"),
    ("mips64-n64-be", "mips64el-linux-gnuabi64-gcc", ["-static", "-EB"], "mips64el-linux-gnuabi64-"),
    ("mipsel-o32", "mipsel-linux-gnu-gcc", ["-static"], "mipsel-linux-gnu-"),
    ("mips-o32-be", "mipsel-linux-gnu-gcc", ["-static", "-EB"], "mipsel-linux-gnu-"),
    ("mipsel-micromips", "mipsel-linux-gnu-gcc", ["-static", "-mmicromips"], "mipsel-linux-gnu-"),
]


def readelf_offset(path: Path, symbol: str, readelf: str = "readelf", objdump: str = "objdump") -> int:
    """The file offset binutils implies: code address (readelf/objdump) mapped through readelf's PT_LOADs."""
    syms = subprocess.run([readelf, "-sW", str(path)], check=True, capture_output=True, text=True).stdout
    address = None
    for line in syms.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[-1].split("@")[0] == symbol and cols[-2] != "UND":
            address = int(cols[1], 16)
            m = re.search(r"\[<localentry>: (\d+)\]", line)
            if m:
                address += int(m.group(1))
            break
    assert address is not None, f"readelf does not list {symbol}"
    header = subprocess.run([readelf, "-hW", str(path)], check=True, capture_output=True, text=True).stdout
    if "PowerPC64" in header and "big endian" in header:
        # ELFv1: the symbol is a function descriptor; objdump names the code ".symbol".
        dis = subprocess.run([objdump, "-d", str(path)], check=True, capture_output=True, text=True).stdout
        m = re.search(rf"^([0-9a-f]+) <\.{re.escape(symbol)}>:", dis, re.M)
        assert m, "objdump shows no code label"
        address = int(m.group(1), 16)
    progs = subprocess.run([readelf, "-lW", str(path)], check=True, capture_output=True, text=True).stdout
    for line in progs.splitlines():
        cols = line.split()
        if cols and cols[0] == "LOAD":
            offset, vaddr, filesz = int(cols[1], 16), int(cols[2], 16), int(cols[4], 16)
            if vaddr <= address < vaddr + filesz:
                return address - vaddr + offset
    raise AssertionError(f"{symbol} at {address:#x} is in no LOAD segment")


@pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils (readelf) not installed")
@pytest.mark.parametrize("path,symbol", [("/bin/bash", "readline"), ("/bin/bash", "main"),
                                         ("/lib/x86_64-linux-gnu/libc.so.6", "malloc"),
                                         ("/lib/x86_64-linux-gnu/libc.so.6", "open")])
def test_offsets_of_this_machines_binaries_match_readelf(path: str, symbol: str) -> None:
    if not Path(path).exists():
        pytest.skip(f"{path} not on this machine")
    data = Path(path).read_bytes()
    expected = readelf_offset(Path(path), symbol)
    assert symbol_file_offset(data, symbol) == expected


def test_bash_readline_is_in_dynsym() -> None:
    data = Path("/bin/bash").read_bytes()
    tables = {s.table for s in symbols(data) if s.name == "readline"}
    assert ".dynsym" in tables


@pytest.mark.parametrize("case", CROSS, ids=lambda c: c[0])
def test_cross_built_binaries_match_binutils(case: tuple[str, str, list[str], str], tmp_path: Path) -> None:
    name, cc, flags, prefix = case
    if shutil.which(cc) is None or shutil.which(prefix + "readelf") is None:
        pytest.skip(f"{cc} or {prefix}readelf not installed")
    src = tmp_path / "t.c"
    src.write_text(SOURCE)
    out = tmp_path / name
    subprocess.run([cc, "-O1", "-nostdlib", *flags, "-o", str(out), str(src)], check=True, capture_output=True)
    data = out.read_bytes()
    for symbol in ("fp_target", "fp_other"):
        expected = readelf_offset(out, symbol, prefix + "readelf", prefix + "objdump")
        assert symbol_file_offset(data, symbol) == expected, symbol


def test_ppc64le_uses_the_local_entry_point(tmp_path: Path) -> None:
    cc = "powerpc64le-linux-gnu-gcc"
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    src = tmp_path / "t.c"
    src.write_text(SOURCE)
    out = tmp_path / "ppc"
    subprocess.run([cc, "-O1", "-nostdlib", "-static", "-o", str(out), str(src)], check=True)
    data = out.read_bytes()
    sym = next(s for s in symbols(data) if s.name == "fp_target")
    # fp_target touches a global, so it sets up the TOC: its local entry is 8 bytes in.
    assert (sym.other >> 5) & 7 == 3
    offset = symbol_file_offset(data, "fp_target")
    assert offset == readelf_offset(out, "fp_target", "powerpc64le-linux-gnu-readelf")
    # The 8 bytes skipped are the global entry's TOC setup: addis/lis r2, ... (opcode 15, rD 2).
    first = int.from_bytes(data[offset - 8:offset - 4], "little")
    assert first >> 26 == 15 and (first >> 21) & 31 == 2


def test_not_an_elf_file() -> None:
    with pytest.raises(ValueError, match="not an ELF file"):
        symbol_file_offset(b"#!/bin/sh\necho hi\n", "main")


def test_truncated_elf_file() -> None:
    data = Path("/bin/bash").read_bytes()
    with pytest.raises(ValueError, match="truncated|outside the file"):
        symbol_file_offset(data[:4096], "readline")


def test_absent_symbol_lists_near_names() -> None:
    data = Path("/bin/bash").read_bytes()
    with pytest.raises(ValueError, match=r"symbol 'readlin' is not in .symtab or .dynsym; near names: .*readline"):
        symbol_file_offset(data, "readlin")


def test_imported_symbol_is_explained() -> None:
    data = Path("/bin/bash").read_bytes()
    undefined = next(s.name for s in symbols(data) if s.shndx == 0 and s.name == "endgrent")
    with pytest.raises(ValueError, match="undefined here .imported from a shared library"):
        symbol_file_offset(data, undefined)


def test_fully_stripped_binary(tmp_path: Path) -> None:
    cc = "x86_64-linux-gnu-gcc"
    if shutil.which(cc) is None or shutil.which("strip") is None:
        pytest.skip("gcc or strip not installed")
    src = tmp_path / "t.c"
    src.write_text(SOURCE)
    out = tmp_path / "s"
    subprocess.run([cc, "-O1", "-nostdlib", "-static", "-no-pie", "-o", str(out), str(src)], check=True)
    subprocess.run(["strip", "--strip-all", str(out)], check=True)
    with pytest.raises(ValueError, match="fully stripped"):
        symbol_file_offset(out.read_bytes(), "fp_target")
