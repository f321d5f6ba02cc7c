"""`fleetprobe lab up|down|status`: the parser and its argument checks (loaded by `fleetprobe --help`; the command itself is cli/labrun.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleetprobe.errors import InputError
from fleetprobe.lab.arches import ARCHES, DEFAULT_FLEET, lab_arch
from fleetprobe.lab.fleet import DEFAULT_TIMEOUT_S
from fleetprobe.lab.lines import DEFAULT_LINE, LINES, kernel_line


def add_lab_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `lab` command and its up/down/status subcommands to fleetprobe's parser."""
    lab = subparsers.add_parser(
        "lab", help="boot qemu VMs from Debian kernels as a local test fleet",
        description="Boot small qemu VMs (TCG) from Debian's own kernels, reachable over SSH on "
                    "127.0.0.1, and write an inventory for them.")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    dir_help = ("lab directory (images, keys, inventory); default $FLEETPROBE_LAB_DIR or "
                "$XDG_CACHE_HOME/fleetprobe/lab")

    p_up = lab_sub.add_parser("up", help="boot the lab fleet and write its inventory")
    default = ", ".join(f"{n} x {a}" for a, n in DEFAULT_FLEET.items())
    p_up.add_argument("--arch", default=None,
                      help=f"comma-separated arches ({', '.join(ARCHES)}); default fleet: {default}")
    p_up.add_argument("--count", default=None,
                      help="VMs per arch: N for every arch, or per arch as x86_64=3,ppc64le=1")
    p_up.add_argument("--kernel", default=None,
                      help=f"kernel lines: {', '.join(LINES)} (or a Debian suite, e.g. trixie-backports, or "
                           f"'all' for every line the archive serves for the arch), for every arch "
                           f"(5.10,6.12) or per arch (x86_64:5.10,arm64:6.12); each (arch, line) gets the "
                           f"arch's --count; default {DEFAULT_LINE}")
    p_up.add_argument("--dir", type=Path, default=None, help=dir_help)
    p_up.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                      help="seconds to wait for all VMs to accept SSH logins (default %(default)s)")

    p_down = lab_sub.add_parser("down", help="stop the lab's VMs")
    p_down.add_argument("--dir", type=Path, default=None, help=dir_help)

    p_status = lab_sub.add_parser("status", help="show the lab's VMs")
    p_status.add_argument("--dir", type=Path, default=None, help=dir_help)


def parse_counts(arch_arg: str | None, count_arg: str | None) -> tuple[list[str] | None, dict[str, int] | None]:
    """Turn ``--arch`` and ``--count`` into (arches, count per arch) for `up`."""
    arches = [a.strip() for a in arch_arg.split(",") if a.strip()] if arch_arg else None
    if arches:
        arches = [lab_arch(a).name for a in arches]
    if count_arg is None:
        return arches, None
    counts: dict[str, int] = {}
    try:
        if "=" in count_arg:
            for item in count_arg.split(","):
                name, _, n = item.partition("=")
                counts[lab_arch(name.strip()).name] = int(n)
            if arches is None:
                arches = list(counts)
        else:
            each = int(count_arg)
            counts = {a: each for a in (arches or list(DEFAULT_FLEET))}
            arches = arches or list(DEFAULT_FLEET)
    except ValueError as exc:
        raise InputError(f"--count {count_arg!r}: expected N or ARCH=N[,ARCH=N...]") from exc
    if any(n < 0 for n in counts.values()):
        raise InputError(f"--count {count_arg!r}: counts must be >= 0")
    return arches, counts


def parse_kernels(kernel_arg: str | None) -> dict[str, tuple[str, ...]] | None:
    """Turn ``--kernel`` into lines per arch: ``5.10,6.1`` -> {"*": ("5.10", "6.1")}; ``arm64:6.12`` -> {"arm64": ...}."""
    if kernel_arg is None:
        return None
    out: dict[str, list[str]] = {}
    for item in (i.strip() for i in kernel_arg.split(",")):
        if not item:
            continue
        arch, sep, line = item.rpartition(":")
        key = lab_arch(arch.strip()).name if sep else "*"
        line = line.strip()
        if line != "all":
            kernel_line(line)
        if line not in out.setdefault(key, []):
            out[key].append(line)
    if not out:
        raise InputError(f"--kernel {kernel_arg!r}: no kernel line given",
                         hint="e.g. --kernel 5.10,6.1,6.12 or --kernel x86_64:5.10,arm64:6.12")
    return {k: tuple(v) for k, v in out.items()}
