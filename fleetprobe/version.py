"""fleetprobe's version, in a module of its own so nothing inside the package imports ``fleetprobe/__init__``."""

__version__ = "0.1.0"
