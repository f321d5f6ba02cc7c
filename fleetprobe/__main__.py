"""``python -m fleetprobe``."""

from fleetprobe.cli.main import entry

entry()
