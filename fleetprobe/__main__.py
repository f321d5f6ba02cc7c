"""``python -m fleetprobe``."""

from fleetprobe.cli import entry

entry()
