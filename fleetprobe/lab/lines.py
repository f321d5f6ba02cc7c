"""Debian kernel lines the lab can boot, and the suites that serve each.

A line is what a fleet calls a kernel generation: bullseye's 5.10, bookworm's
6.1, trixie's 6.12.  Which exact package (and so which `uname -r`) a line
means is resolved from the archive at `lab up` time, never pinned here: a
pinned version vanishes from deb.debian.org when the next one is uploaded.

Not every arch has every line.  Measured on deb.debian.org (December 2026):
bullseye (now LTS) serves only amd64, arm64, armhf and i386; trixie dropped
mips64el and mipsel; bookworm-backports builds 6.12 for mips64el but not for
mipsel.  Asking for a line an arch lacks is an error that says which lines
the arch has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fleetprobe.kmod.debian import KERNEL_LINE_SUITES
from fleetprobe.errors import InputError


@dataclass(frozen=True)
class KernelLine:
    """A kernel line: its name (``6.12``) and the suite lists tried in order to find it."""

    name: str
    # Each entry is one apt source set; the first whose kernel metapackage
    # exists for the arch (and whose version is on this line) is used.
    sources: tuple[tuple[str, ...], ...]

    @property
    def group(self) -> str:
        """The inventory group of this line: ``lab_linux_6_12`` (no dots in Ansible group names)."""
        return "lab_linux_" + self.name.replace(".", "_").replace("-", "_")


# The release's own suite first (what a host of that release runs), then
# backports of the release before (what a not-yet-upgraded host gets).
LINES: dict[str, KernelLine] = {name: KernelLine(name, sources)
                                for name, sources in KERNEL_LINE_SUITES.items()}

#: A single suite named instead of a line (``--kernel trixie-backports``): its line is
#: read from the kernel version found there.
_SUITE = re.compile(r"[a-z]+(?:-[a-z]+)?")

DEFAULT_LINE = "6.1"


def kernel_line(name: str) -> KernelLine:
    """A known line (``5.10``), or a suite (``trixie-backports``) whose line is found at resolve time."""
    name = name.strip()
    if name in LINES:
        return LINES[name]
    if _SUITE.fullmatch(name):
        security = (f"{name}-security",) if "-" not in name else ()
        return KernelLine(name, ((name, *security),))
    raise InputError(f"unknown kernel line {name!r}",
                     hint="use a line (" + ", ".join(LINES) + ") or a Debian suite (e.g. trixie-backports)")


def line_of_version(version: str) -> str:
    """``6.12.118-1`` or ``6.12.95-1~bpo12+1`` -> ``6.12`` (major.minor of a Debian kernel version)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise InputError(f"kernel version {version!r} has no major.minor")
    return f"{m.group(1)}.{m.group(2)}"
