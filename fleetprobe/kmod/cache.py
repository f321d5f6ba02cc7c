"""The module cache: built ``.ko`` files by (arch, kernel release, source hash), shared by runs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from fleetprobe.kmod.plan import BuildKey


def default_cache_dir() -> Path:
    """``$FLEETPROBE_CACHE`` or ``$XDG_CACHE_HOME/fleetprobe`` or ``~/.cache/fleetprobe``."""
    if os.environ.get("FLEETPROBE_CACHE"):
        return Path(os.environ["FLEETPROBE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetprobe"


class ModuleCache:
    """Built ``.ko`` files by (arch, release, module, source hash) under ``root``.

    Layout: ``<root>/<debian arch>/<release>/<module>-<hash>/`` holding
    ``<module>.ko``, ``build.log`` and ``build.json``.  An entry is written
    to a temporary folder and renamed into place, so a reader never sees half
    a build and two concurrent builders simply keep the first.
    """

    def __init__(self, root: Path | None = None) -> None:
        """Use ``root`` (default ``default_cache_dir()/modules``)."""
        self.root = root if root is not None else default_cache_dir() / "modules"

    def entry(self, key: BuildKey) -> Path:
        """The folder for ``key``."""
        return self.root / key.debian_arch / key.release / f"{key.module}-{key.source_hash}"

    def lookup(self, key: BuildKey) -> Path | None:
        """The cached .ko for ``key``, or None."""
        ko = self.entry(key) / f"{key.module}.ko"
        return ko if ko.is_file() else None

    def store(self, key: BuildKey, ko: bytes, log: str, meta: dict[str, object]) -> Path:
        """Put a built module in the cache; return its path (the existing one if another build won)."""
        final = self.entry(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key.module}-", dir=final.parent))
        (tmp / f"{key.module}.ko").write_bytes(ko)
        (tmp / "build.log").write_text(log)
        (tmp / "build.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.lookup(key) is None:
                raise
        return final / f"{key.module}.ko"
