"""``fleetprobe worker``: on a zone's bastion, the Dask workers that run that zone's slices of ``--cluster`` runs."""

from __future__ import annotations

import argparse

from rich.console import Console

from fleetprobe.cluster import worker_main
from fleetprobe.workers import default_workers


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    """``fleetprobe worker --scheduler tcp://sched:8786 --zone eu1 [--nworkers N]`` (fleetprobe-worker's)."""
    nworkers = args.nworkers or default_workers()
    return worker_main(["--scheduler", args.scheduler, "--zone", args.zone, "--nworkers", str(nworkers)])
