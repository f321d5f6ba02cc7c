"""`fleetprobe lab up|down|status`: what the command does (its parser is fleetprobe.cli.lab, which
`fleetprobe --help` loads; this module, and rich, load only when the command runs)."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleetprobe.cli.lab import parse_counts, parse_kernels
from fleetprobe.errors import FleetprobeError, InputError
from fleetprobe.lab.fleet import default_lab_dir, down, status, up


def run_lab(args: argparse.Namespace, console: Console) -> int:
    """Run `lab up|down|status`; returns the exit status (0 ok, 1 bad input, 2 failure)."""
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
