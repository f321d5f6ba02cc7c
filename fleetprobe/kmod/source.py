"""Module sources: a module folder (``modules/fp_kprobe``) read and hashed over the files a build reads."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fleetprobe.errors import FleetprobeError


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
