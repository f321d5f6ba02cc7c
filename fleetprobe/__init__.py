"""fleetprobe: run kernel probes across a fleet over SSH and merge what they see into one report."""

__version__ = "0.1.0"
