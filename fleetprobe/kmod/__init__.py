"""Kernel-module probes: source.py (read + hash a module folder), plan.py (pure build planning),
debian.py (Debian's archive: headers packages), compile.py (build on a host or the controller),
ko.py (.ko ELF header, modinfo, vermagic, renaming), cache.py (built modules), deploy.py (per host:
module or error, checks on the host)."""
