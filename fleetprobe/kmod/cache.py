"""The module cache: built ``.ko`` files by (arch, kernel release, source hash), shared by runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

from fleetprobe.errors import FleetprobeError
from fleetprobe.kmod.plan import BuildKey, release_problem


def default_cache_dir() -> Path:
    """``$FLEETPROBE_CACHE`` or ``$XDG_CACHE_HOME/fleetprobe`` or ``~/.cache/fleetprobe``."""
    if os.environ.get("FLEETPROBE_CACHE"):
        return Path(os.environ["FLEETPROBE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetprobe"


class ModuleCache:
    """Built ``.ko`` files by (arch, release, module, source hash) under ``root``.

    Layout: ``<root>/<debian arch>/<release>/<module>-<hash>/`` holding
    ``<module>.ko``, ``build.log`` and ``build.json`` (where it was built, by whom, its sha256).
    Only shareable builds enter: the controller's, and those of hosts the user trusts.  An entry is written
    to a temporary folder and renamed into place, so a reader never sees half
    a build and two concurrent builders simply keep the first.
    """

    def __init__(self, root: Path | None = None) -> None:
        """Use ``root`` (default ``default_cache_dir()/modules``)."""
        self.root = root if root is not None else default_cache_dir() / "modules"

    def entry(self, key: BuildKey) -> Path:
        """The folder for ``key``; a key whose parts would leave the cache root is refused.

        The release comes from the host (``uname -r``): a lying host must not make the
        controller, as root, write outside its cache (``../..``).
        """
        parts = (key.debian_arch, key.release, f"{key.module}-{key.source_hash}")
        if key.built_by or release_problem(key.release) or any(
                not part or "/" in part or part in (".", "..") or ".." in part for part in parts):
            raise FleetprobeError(f"refusing module cache entry for {key}: not a shareable, plain key",
                                  hint="a host's own build is never cached; a release must be a plain name")
        path = self.root.joinpath(*parts)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise FleetprobeError(f"refusing module cache entry {path}: outside {self.root}")
        return path

    def lookup(self, key: BuildKey, trusted: Collection[str] = ()) -> Path | None:
        """The cached .ko for ``key``, or None; a host-built entry counts only if its build host is trusted.

        Every entry records where it was built and the sha256 of its bytes: an entry whose
        bytes do not match, or that a host built and this run does not trust, is not used.
        """
        if key.built_by:
            return None
        entry = self.entry(key)
        ko = entry / f"{key.module}.ko"
        if not ko.is_file():
            return None
        try:
            meta = json.loads((entry / "build.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
        if meta.get("where") == "host" and meta.get("build_host") not in set(trusted):
            return None
        if meta.get("sha256") != hashlib.sha256(ko.read_bytes()).hexdigest():
            return None
        return ko

    def store(self, key: BuildKey, ko: bytes, log: str, meta: dict[str, object]) -> Path:
        """Put a built module in the cache; return its path (the existing one if another build won)."""
        final = self.entry(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key.module}-", dir=final.parent))
        (tmp / f"{key.module}.ko").write_bytes(ko)
        (tmp / "build.log").write_text(log)
        meta = {**meta, "sha256": hashlib.sha256(ko).hexdigest()}
        (tmp / "build.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.lookup(key) is None:
                raise
        return final / f"{key.module}.ko"
