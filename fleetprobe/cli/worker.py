"""``fleetprobe worker`` (and the ``fleetprobe-worker`` script): on a zone's bastion, the Dask workers that
run that zone's slices of ``--cluster`` runs."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from fleetprobe.cli.main import main as cli_main
from fleetprobe.cluster import serve_zone
from fleetprobe.workers import default_workers


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe worker --scheduler tcp://sched:8786 --zone eu1 [--nworkers N]``: until stopped."""
    return serve_zone(args.scheduler, args.zone, args.nworkers or default_workers())


def entry() -> None:
    """``fleetprobe-worker ARGS``: ``fleetprobe worker ARGS`` (one parser, one set of defaults)."""
    sys.exit(cli_main(["worker", *sys.argv[1:]]))
