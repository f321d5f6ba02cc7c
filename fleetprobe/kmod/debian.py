"""Debian packages for any Debian architecture, fetched into a private cache.

The machine's own dpkg/apt state is never touched: every apt call gets its own
``Dir::State`` (package lists, an empty dpkg status) and ``Dir::Cache`` under
``<cache>/apt/<arch>/``, and ``APT::Architecture(s)`` set to the target arch.
Sources and keyrings stay the machine's (``/etc/apt``), so whatever mirror and
trust the administrator configured is what we use.  Packages are unpacked with
``dpkg-deb -x``, never installed.

Used by the lab (kernels, busybox, dropbear for the VM images) and by the
module builder (``linux-headers-<release>`` for a foreign arch).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fleetprobe.errors import FleetprobeError

# Debian architecture names dpkg knows (dpkg-architecture -L, the ones with a
# Debian port or a release); anything else is almost certainly a typo such as
# "x86_64" for "amd64".
DEBIAN_ARCHES = frozenset({
    "amd64", "arm64", "armel", "armhf", "i386", "mips64el", "mipsel",
    "ppc64el", "s390x", "riscv64", "ppc64", "powerpc", "sparc64", "alpha",
    "hppa", "m68k", "sh4", "x32", "loong64",
})

# Package lists older than this are refreshed before resolving versions; a
# fresh lab on the same day then needs no network at all to reuse its images.
LISTS_MAX_AGE_S = 24 * 3600

# Where an explicit suite list (see AptState) fetches from.  The machine's own
# sources are used when no suites are given; a lab kernel line (bullseye's 5.10,
# trixie's 6.12) usually lives in a suite the machine does not list.
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# The tools this module runs, and the Debian package that provides each.
_TOOLS = {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg"}


class DebianError(FleetprobeError):
    """Fetching or unpacking Debian packages failed; says which package and what to do."""


@dataclass(frozen=True)
class PackageRef:
    """One exact package version as the archive offers it (not yet downloaded)."""

    name: str
    version: str
    arch: str
    depends: str = ""

    @property
    def spec(self) -> str:
        """The ``name=version`` form apt-get accepts to pin exactly this version."""
        return f"{self.name}={self.version}"


@dataclass(frozen=True)
class DebPackage:
    """A downloaded .deb file; ``version`` is exact, so caches can be keyed by it."""

    name: str
    version: str
    arch: str
    path: Path


def require_tools(tools: dict[str, str] | None = None) -> None:
    """Raise one DebianError naming the Debian package to install for each missing tool."""
    wanted = _TOOLS if tools is None else tools
    missing = {tool: pkg for tool, pkg in wanted.items() if shutil.which(tool) is None}
    if missing:
        names = ", ".join(sorted(missing))
        pkgs = " ".join(sorted(set(missing.values())))
        raise DebianError(f"required program(s) not found on PATH: {names}",
                          hint=f"apt-get install {pkgs}")


def check_arch(arch: str) -> None:
    """Reject a name that is not a Debian architecture (e.g. uname's x86_64 for amd64)."""
    if arch not in DEBIAN_ARCHES:
        raise DebianError(f"unknown Debian architecture {arch!r}",
                          hint="use Debian's names: amd64, arm64, ppc64el, mips64el, mipsel, ...")


def deb_filename(name: str, version: str, arch: str) -> str:
    """The file name apt itself uses for a .deb (the epoch colon escaped as %3a)."""
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def parse_control_stanzas(text: str) -> list[dict[str, str]]:
    """Parse deb822 stanzas (apt-cache show output) into dicts; continuation lines are joined."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def mirrors() -> tuple[str, str]:
    """(archive, security) mirror URLs: $FLEETPROBE_DEBIAN_MIRROR / $FLEETPROBE_DEBIAN_SECURITY_MIRROR or deb.debian.org."""
    return (os.environ.get("FLEETPROBE_DEBIAN_MIRROR") or DEBIAN_MIRROR,
            os.environ.get("FLEETPROBE_DEBIAN_SECURITY_MIRROR") or SECURITY_MIRROR)


def sources_text(suites: tuple[str, ...]) -> str:
    """A deb822 sources file for ``suites`` (main only); ``*-security`` suites come from the security mirror."""
    if not suites or any(not re.fullmatch(r"[a-z][a-z0-9-]*", s) for s in suites):
        raise DebianError(f"bad Debian suite list {suites!r}",
                          hint="suite names look like bookworm, trixie-security, bookworm-backports")
    archive, security = mirrors()
    stanzas = []
    for suite in suites:
        uri = security if suite.endswith("-security") else archive
        stanzas.append(f"Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\n"
                       f"Signed-By: {ARCHIVE_KEYRING}\n")
    return "\n".join(stanzas)


def depends_names(depends: str) -> list[str]:
    """Package names in a Depends field, first alternative of each, version and arch stripped."""
    names = []
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        if first:
            names.append(re.split(r"[\s(:\[]", first, maxsplit=1)[0])
    return names


class AptState:
    """A private apt state for one Debian architecture under ``<cache>/apt/<arch>``.

    With ``suites`` (e.g. ``("trixie", "trixie-security")``) the state has its
    own sources list naming exactly those suites (under
    ``<cache>/apt/<arch>/suites/<suite+suite>``) instead of the machine's.
    """

    def __init__(self, arch: str, cache: Path, suites: tuple[str, ...] = ()) -> None:
        """Prepare (but do not populate) the private directories for ``arch``."""
        check_arch(arch)
        self.arch = arch
        self.cache = cache
        self.suites = tuple(suites)
        self.root = cache / "apt" / arch
        if self.suites:
            text = sources_text(self.suites)
            self.root = self.root / "suites" / "+".join(self.suites)
            (self.root / "sources.list.d").mkdir(parents=True, exist_ok=True)
            sources = self.root / "sources.list.d" / "fleetprobe.sources"
            if not sources.is_file() or sources.read_text() != text:
                sources.write_text(text)
        self.state = self.root / "state"
        self.archives = self.root / "cache"
        self.debs = cache / "debs"
        for d in (self.state / "lists" / "partial", self.archives / "archives" / "partial", self.debs):
            d.mkdir(parents=True, exist_ok=True)
        status = self.state / "status"
        if not status.exists():
            # An empty dpkg status: nothing counts as installed, so nothing the
            # machine has installed leaks into version choices.
            status.write_text("")
        self.warnings: list[str] = []

    def options(self) -> list[str]:
        """The ``-o`` options that point apt at this private state."""
        opts = {
            "APT::Architecture": self.arch,
            "APT::Architectures": self.arch,
            "Dir::State": str(self.state),
            "Dir::State::status": str(self.state / "status"),
            "Dir::Cache": str(self.archives),
            "Acquire::Languages": "none",
            # Translations and DEP-11 are never read here; Packages is all we need.
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled": "false",
        }
        if self.suites:
            # Only our deb822 file: an empty one-line list plus our parts dir.
            opts["Dir::Etc::SourceList"] = "/dev/null"
            opts["Dir::Etc::SourceParts"] = str(self.root / "sources.list.d")
        if os.geteuid() == 0:
            # apt drops to _apt for downloads, which cannot enter a private
            # cache under /root (mode 0700): it would warn and go on as root
            # anyway, so say so up front and keep the output clean.
            opts["APT::Sandbox::User"] = "root"
        args = []
        for key, value in opts.items():
            args += ["-o", f"{key}={value}"]
        return args

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock so two fleetprobe processes never share a half-updated state."""
        with open(self.root / "fleetprobe.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _lists(self) -> list[Path]:
        """The Packages index files present in the private state."""
        return sorted((self.state / "lists").glob("*_Packages*"))

    def lists_age(self) -> float | None:
        """Seconds since the oldest-fresh Packages list was written, or None if there are none."""
        lists = self._lists()
        if not lists:
            return None
        return time.time() - max(p.stat().st_mtime for p in lists)

    def update(self, *, max_age_s: float = LISTS_MAX_AGE_S, force: bool = False) -> None:
        """Run ``apt-get update`` into the private state unless its lists are fresh enough.

        A failure of one index (a mirror mid-sync, a third-party source without
        this arch) is a warning as long as some Packages list exists: resolving
        a package then says clearly if it is missing.
        """
        require_tools()
        age = self.lists_age()
        if not force and age is not None and age < max_age_s:
            return
        errors: list[str] = []
        for attempt in range(3):
            proc = subprocess.run(["apt-get", "-q", *self.options(), "update"],
                                  capture_output=True, text=True, check=False)
            errors = [ln[3:].strip() for ln in proc.stderr.splitlines() if ln.startswith("E: ")]
            if proc.returncode == 0 and not errors:
                # A successful update may leave lists untouched (304): mark them fresh.
                for p in self._lists():
                    p.touch()
                return
            time.sleep(1 + attempt)
        if self._lists():
            self.warnings += [f"apt-get update ({self.arch}): {e}" for e in errors]
            for p in self._lists():
                p.touch()
            return
        raise DebianError(f"apt-get update for architecture {self.arch} fetched no package lists",
                          where=str(self.root),
                          hint="check /etc/apt/sources.list(.d) and network access to the Debian "
                               "archive; apt said: " + "; ".join(errors[-3:]))

    def resolve(self, packages: list[str]) -> list[PackageRef]:
        """Exact versions apt would download for ``packages`` (``name`` or ``name=version``)."""
        if not packages:
            return []
        # One apt-cache call for all: each call re-reads every package list.
        proc = subprocess.run(["apt-cache", *self.options(), "show", "--no-all-versions", *packages],
                              capture_output=True, text=True, check=False)
        found: dict[str, dict[str, str]] = {}
        for stanza in parse_control_stanzas(proc.stdout):
            found.setdefault(stanza.get("Package", ""), stanza)
        refs = []
        for spec in packages:
            name = spec.split("=", 1)[0]
            s = found.get(name)
            if s is None:
                why = [ln for ln in proc.stderr.splitlines() if name in ln][:1] or ["not found"]
                hint = ("the package name or pinned version may be wrong for this release"
                        + ("; apt reported index failures: " + "; ".join(self.warnings)
                           if self.warnings else ""))
                raise DebianError(f"no Debian package {spec!r} for architecture {self.arch}: {why[0]}",
                                  where=str(self.root), hint=hint)
            refs.append(PackageRef(name=name, version=s["Version"],
                                   arch=s.get("Architecture", self.arch),
                                   depends=s.get("Depends", "")))
        return refs

    def download(self, refs: list[PackageRef]) -> list[DebPackage]:
        """Download exactly these versions into ``<cache>/debs`` (already present ones are reused)."""
        require_tools()
        out: list[DebPackage] = []
        todo: list[PackageRef] = []
        for ref in refs:
            path = self.debs / deb_filename(ref.name, ref.version, ref.arch)
            if not path.exists():
                todo.append(ref)
            out.append(DebPackage(ref.name, ref.version, ref.arch, path))
        if todo:
            with tempfile.TemporaryDirectory(dir=self.debs, prefix=".dl-") as tmp:
                for attempt in range(3):
                    proc = subprocess.run(
                        ["apt-get", "-q", *self.options(), "download",
                         *[f"{r.name}:{r.arch}={r.version}" if r.arch != "all" else r.spec
                           for r in todo]],
                        cwd=tmp, capture_output=True, text=True, check=False)
                    if proc.returncode == 0:
                        break
                    time.sleep(1 + attempt)
                else:
                    raise DebianError(f"apt-get download failed for {', '.join(r.spec for r in todo)}",
                                      where=f"arch {self.arch}",
                                      hint="check network access to the Debian archive; apt said: "
                                           + proc.stderr.strip()[-400:])
                for ref in todo:
                    got = Path(tmp) / deb_filename(ref.name, ref.version, ref.arch)
                    if not got.exists():
                        raise DebianError(f"apt-get download did not produce {got.name}",
                                          where=f"arch {self.arch}",
                                          hint="files present: " + ", ".join(os.listdir(tmp)))
                    os.replace(got, self.debs / got.name)
        return out


def fetch(packages: list[str], arch: str, cache: Path, suites: tuple[str, ...] = ()) -> list[DebPackage]:
    """Download ``packages`` (``name`` or ``name=version``) for Debian ``arch`` into ``cache``.

    Returns one DebPackage per requested package, in order, with its exact
    version.  Nothing outside ``cache`` is written.  ``suites``: see AptState.
    """
    state = AptState(arch, cache, suites)
    with state.locked():
        state.update()
        return state.download(state.resolve(packages))


def resolve(packages: list[str], arch: str, cache: Path, suites: tuple[str, ...] = ()) -> list[PackageRef]:
    """Exact versions of ``packages`` for ``arch`` without downloading them (``suites``: see AptState)."""
    state = AptState(arch, cache, suites)
    with state.locked():
        state.update()
        return state.resolve(packages)


#: Debian kernel lines and the suites that serve each, the release's own first
#: (fleetprobe.lab.lines builds on this; the module builder looks headers up here).
KERNEL_LINE_SUITES: dict[str, tuple[tuple[str, ...], ...]] = {
    "5.10": (("bullseye", "bullseye-security"),),
    "6.1": (("bookworm", "bookworm-security"),),
    "6.12": (("trixie", "trixie-security"), ("bookworm-backports",)),
}

#: Debian release numbers in kernel ABI names (``6.12.118+deb13-amd64``) and their codenames.
_CODENAMES = {"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}


def release_suites(release: str) -> tuple[tuple[str, ...], ...]:
    """Suite sets that may carry kernel ``release`` (``uname -r``), most likely first.

    From 6.12 Debian names the ABI after the release it was built for:
    ``+deb13`` is trixie's own, ``+deb12`` bookworm's backport.  Older names
    (``5.10.0-46-amd64``) are looked up by line.  Unknown: no suites.
    """
    m = re.search(r"\+deb(\d+)", release)
    if m and m.group(1) in _CODENAMES:
        name = _CODENAMES[m.group(1)]
        own = (name, f"{name}-security")
        return (own, (f"{name}-backports",)) if name == "trixie" else ((f"{name}-backports",), own)
    line = re.match(r"(\d+\.\d+)\.", release)
    return KERNEL_LINE_SUITES.get(line.group(1), ()) if line else ()


def resolve_in_suites(packages: list[str], arch: str, cache: Path,
                      candidates: tuple[tuple[str, ...], ...]) -> tuple[list[PackageRef], tuple[str, ...]]:
    """Resolve ``packages`` from the machine's sources, else from the first candidate suite set that has them all.

    Returns the refs and the suites they came from (``()``: the machine's), so
    the caller downloads from the same place.  The error lists every answer.
    """
    errors: list[str] = []
    for suites in ((), *candidates):
        try:
            return resolve(packages, arch, cache, suites), suites
        except DebianError as exc:
            errors.append(f"{'+'.join(suites) or 'the machine sources'}: {exc.message}")
    raise DebianError(f"no suite has {', '.join(packages)} for {arch}: " + "; ".join(errors),
                      hint="the package may be gone from the archive (try snapshot.debian.org in "
                           "/etc/apt/sources.list.d)")


def extract(pkg: DebPackage, dest: Path) -> None:
    """Unpack a .deb's data into ``dest`` with ``dpkg-deb -x`` (no maintainer scripts run)."""
    require_tools({"dpkg-deb": "dpkg"})
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(pkg.path), str(dest)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DebianError(f"dpkg-deb -x failed for {pkg.path.name}: {proc.stderr.strip()}",
                          where=str(pkg.path),
                          hint="the cached .deb may be truncated; delete it and fetch again")


def kernel_image_package(release: str) -> str:
    """The linux-image package name that ships kernel ``release`` (e.g. 6.1.0-50-powerpc64le)."""
    if not re.fullmatch(r"[0-9]+\.[0-9]+[0-9A-Za-z.+~-]*", release):
        raise DebianError(f"{release!r} does not look like a kernel release (uname -r)",
                          hint="pass the exact `uname -r` of the host, e.g. 6.1.0-50-powerpc64le")
    return f"linux-image-{release}"


def kernel_for_release(release: str, arch: str, cache: Path) -> PackageRef:
    """The Debian package (exact version) that provides kernel ``release`` on ``arch``.

    amd64 ships the signed image as ``linux-image-<release>`` and the same
    kernel unsigned as ``linux-image-<release>-unsigned``; both carry the same
    source version, which is what linux-headers-<release> must match.
    """
    refs = resolve([kernel_image_package(release)], arch, cache)
    return refs[0]


def kernel_for_metapackage(meta: str, arch: str, cache: Path,
                           suites: tuple[str, ...] = ()) -> tuple[PackageRef, str]:
    """Follow a kernel metapackage (linux-image-amd64) to its image package and kernel release."""
    state = AptState(arch, cache, suites)
    with state.locked():
        state.update()
        (meta_ref,) = state.resolve([meta])
        images = [n for n in depends_names(meta_ref.depends) if n.startswith("linux-image-")]
        if not images:
            raise DebianError(f"{meta} {meta_ref.version} ({arch}) depends on no linux-image package",
                              hint=f"Depends was: {meta_ref.depends!r}")
        (image,) = state.resolve([images[0]])
    release = image.name.removeprefix("linux-image-").removesuffix("-unsigned")
    return image, release
