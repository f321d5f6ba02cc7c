"""`fleetprobe lab up|down|status`: argument parsing and terminal output for the lab."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fleetprobe.errors import FleetprobeError, InputError
from fleetprobe.lab.arches import ARCHES, DEFAULT_FLEET, lab_arch
from fleetprobe.lab.fleet import DEFAULT_TIMEOUT_S, default_lab_dir, down, status, up
from fleetprobe.lab.lines import DEFAULT_LINE, LINES, kernel_line

if TYPE_CHECKING:
    from rich.console import Console  # imported by run_lab: `fleetprobe --help` renders nothing (issue 5)


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


def run_lab(args: argparse.Namespace, console: Console) -> int:
    """Run `lab up|down|status`; returns the exit status (0 ok, 1 bad input, 2 failure)."""
    # rich loads here, not at the top: `fleetprobe --help` imports this module for its parser (issue 5)
    from rich.markup import escape
    from rich.table import Table

    lab_dir = args.dir.resolve() if args.dir else default_lab_dir()
    try:
        if args.lab_command == "up":
            arches, counts = parse_counts(args.arch, args.count)
            kernels = parse_kernels(args.kernel)
            t0 = time.monotonic()
            with console.status("building images and booting lab VMs ..."):
                fleet = up(arches, counts, lab_dir, args.timeout, kernels=kernels)
            table = Table("host", "arch", "line", "kernel", "package version", "port", "boot s")
            for v in fleet.vms:
                boot = "running" if v.name in fleet.reused else f"{v.boot_seconds:.1f}"
                table.add_row(v.name, v.uname_m, v.line, v.kernel_release, v.kernel_version, str(v.port), boot)
            console.print(table)
            console.print(f"lab up in {time.monotonic() - t0:.1f} s: {len(fleet.started)} booted, "
                          f"{len(fleet.reused)} already running")
            console.print(f"inventory: {fleet.inventory}")
            return 0
        if args.lab_command == "down":
            stopped = down(lab_dir)
            console.print(f"stopped {len(stopped)} VM(s)" + (": " + ", ".join(stopped) if stopped else ""))
            return 0
        rows = status(lab_dir)
        if not rows:
            console.print(f"no lab VMs recorded in {lab_dir}")
            return 0
        table = Table("host", "arch", "line", "kernel", "port", "pid", "state")
        for s in rows:
            table.add_row(s.vm.name, s.vm.uname_m, s.vm.line, s.vm.kernel_release, str(s.vm.port),
                          str(s.vm.pid), "running" if s.running else "stopped")
        console.print(table)
        console.print(f"inventory: {lab_dir / 'inventory.yml'}")
        return 0
    except InputError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 1
    except FleetprobeError as exc:
        console.print(f"[red]lab {args.lab_command} failed:[/red] {escape(str(exc))}", highlight=False)
        return 2
