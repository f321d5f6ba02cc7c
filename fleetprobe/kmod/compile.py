"""Compile: kernel modules built once per (arch, kernel release, module source), on a host or the controller.

Stages, in order:

1. :func:`load_module_source` reads a module folder (``modules/fp_kprobe``) and
   hashes the files the build reads.
2. :func:`plan_builds` (pure) groups hosts by (target arch, kernel release,
   source hash) and decides where each group builds: ``host`` (on one host of
   the group, in its ``/lib/modules/$(uname -r)/build``) or ``controller``
   (cross-built against Debian's ``linux-headers-<release>`` fetched with
   :mod:`fleetprobe.kmod.debian`).  ``fleetprobe plan`` prints these groups.
3. :func:`build_groups` runs the builds (bounded, one per group, never one per
   host), caches each ``.ko`` by (arch, release, source hash) and checks its
   ELF machine and vermagic before anyone loads it.
4. :func:`results_by_host` turns group results into a per-host map of
   :class:`BuiltModule` or :class:`~fleetprobe.errors.HostError`.

The ``.ko`` is read in pure Python (:func:`read_elf_info`, :func:`read_modinfo`):
the controller need not have binutils or kmod for the target arch.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from fleetprobe.errors import BuildError
from fleetprobe.arches import _TARGETS, EM_NAMES, Target, controller_debian_arch, cross_compiler_package
from fleetprobe.kmod import debian
from fleetprobe.kmod.cache import ModuleCache
from fleetprobe.kmod.ko import ElfFormatError, ElfInfo, ModInfo, read_elf_info, read_modinfo, vermagic_problem
from fleetprobe.kmod.plan import BuildGroup, BuildKey
from fleetprobe.session import Session


@dataclass(frozen=True)
class BuiltModule:
    """A built, checked ``.ko`` in the cache, ready to copy to the group's hosts."""

    key: BuildKey
    path: Path
    modinfo: ModInfo
    elf: ElfInfo
    cached: bool
    where: str
    seconds: float
    #: A host's own build (never cached): its bytes, held for that host alone.
    blob: bytes | None = None

    def data(self) -> bytes:
        """The .ko's bytes (to put on a host)."""
        return self.blob if self.blob is not None else self.path.read_bytes()


@dataclass
class GroupResult:
    """The outcome of one group's build: a module, or the error every host of the group gets."""

    group: BuildGroup
    module: BuiltModule | None = None
    error: BuildError | None = None
    notes: list[str] = field(default_factory=list)


#: Most lines of compiler output kept as evidence of a failed build.
EVIDENCE_LINES = 25


def compiler_messages(output: str, limit: int = EVIDENCE_LINES) -> str:
    """The lines of a kbuild run that explain a failure: errors first, else the tail."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    wanted = [ln for ln in lines
              if re.search(r"\b(error|Error \d+|undefined|No such file|not found|No rule)\b", ln)
              or ln.lstrip().startswith("|") or re.match(r"^\s+\d+ \|", ln)]
    chosen = wanted if wanted else lines
    return "\n".join(chosen[:limit] if wanted else chosen[-limit:])


def check_module(ko: bytes, key: BuildKey, target: Target, *, where: str) -> tuple[ModInfo, ElfInfo]:
    """Check a freshly built .ko: right ELF class, byte order and machine, vermagic for the release."""
    try:
        elf = read_elf_info(ko, name=f"{key.module}.ko")
        modinfo = read_modinfo(ko, name=f"{key.module}.ko")
    except ElfFormatError as exc:
        raise BuildError(f"build of {key} produced an unreadable module", where=where, evidence=str(exc)) from None
    if (elf.machine, elf.elf_class, elf.endian) != (target.elf_machine, target.elf_class, target.endian):
        raise BuildError(
            f"build of {key} produced a {elf.elf_class}-bit {elf.endian}-endian {elf.machine_name} module, "
            f"expected {target.elf_class}-bit {target.endian}-endian {EM_NAMES.get(target.elf_machine, '?')}",
            where=where, hint="the build tree or compiler is for another architecture")
    problem = vermagic_problem(modinfo, key.release)
    if problem:
        raise BuildError(f"build of {key}: {problem}", where=where, evidence=modinfo.vermagic,
                         hint="the build tree is not the one of this kernel release")
    return modinfo, elf


async def _run_local(argv: list[str], *, cwd: Path | None = None, timeout: float) -> tuple[int, str]:
    """Run a command on the controller; return (exit status, stdout+stderr)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C",
           "HOME": os.environ.get("HOME", "/")}
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {timeout:.0f}s: {' '.join(argv)}"
    return proc.returncode if proc.returncode is not None else -1, out.decode("utf-8", "replace")


@dataclass(frozen=True)
class KernelTree:
    """An unpacked, relocated Debian headers tree for one release, usable as ``make -C`` target."""

    path: Path
    release: str
    package_version: str
    cc: str


#: Debian's ``include /usr/src/linux-headers-<abi>-common/Makefile``, or a tree fixed by an older
#: fleetprobe to an absolute path (which broke when the cache was reached through a path that went away).
_HEADERS_INCLUDE = re.compile(r"^include \S*/usr/src/(linux-headers-[^/\s]+/Makefile)$", re.M)


def _fix_makefile(makefile: Path) -> None:
    """Point the release Makefile's include at its sibling -common tree relative to itself.

    ``$(dir $(lastword $(MAKEFILE_LIST)))`` is the folder of the Makefile being
    read, so the tree works wherever the cache lives (moved, copied, or reached
    through a symlink that later goes away).
    """
    text = makefile.read_text()
    fixed = _HEADERS_INCLUDE.sub(r"include $(dir $(lastword $(MAKEFILE_LIST)))../\1", text)
    if fixed != text:
        makefile.write_text(fixed)


def _fix_tree(root: Path, release: str) -> None:
    """Make an unpacked Debian headers tree work outside /usr/src, wherever it is.

    Debian's ``linux-headers-<release>/Makefile`` includes
    ``/usr/src/linux-headers-<abi>-common/Makefile`` (absolute): made relative to
    itself.  ``/lib/modules/<release>/{build,source}`` are absolute symlinks: made
    relative into the tree (unpacked in ``root``, then renamed into the cache).
    The ``scripts``/``tools`` symlinks into linux-kbuild are relative and already right.
    """
    _fix_makefile(root / "usr/src" / f"linux-headers-{release}" / "Makefile")
    for link in root.rglob("*"):
        if link.is_symlink():
            dest = os.readlink(link)
            if dest.startswith("/"):
                link.unlink()
                link.symlink_to(os.path.relpath(root / dest.lstrip("/"), link.parent))


def _kernel_cc(tree: Path, triplet: str, cross: bool) -> str:
    """The compiler the tree's make will call (Debian sets ``CC = $(CROSS_COMPILE)gcc-12``)."""
    variables = tree / ".kernelvariables"
    cc = "gcc"
    if variables.is_file():
        m = re.search(r"^CC\s*=.*\$\(CROSS_COMPILE\)(\S+)", variables.read_text(), re.M)
        if m:
            cc = m.group(1)
    return f"{triplet}-{cc}" if cross else cc


def prepare_debian_tree(release: str, debian_arch: str, package_version: str | None, *,
                        trees: Path, debian_cache: Path) -> KernelTree:
    """Fetch and unpack linux-headers-<release> (+ -common, + the controller's linux-kbuild) once.

    linux-kbuild is pinned to the headers' exact version: the security suite
    may carry a newer one whose scripts do not match these headers.
    Blocking (apt, dpkg-deb): call it in a thread.
    """
    trees.mkdir(parents=True, exist_ok=True)
    # One preparer per release at a time, across threads and processes (flock
    # is per open file description): the others then find the marker.
    with open(trees / f".{debian_arch}_{release}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _prepare_debian_tree(release, debian_arch, package_version,
                                        trees=trees, debian_cache=debian_cache)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare_debian_tree(release: str, debian_arch: str, package_version: str | None, *,
                         trees: Path, debian_cache: Path) -> KernelTree:
    """prepare_debian_tree's work, under its lock."""
    headers = f"linux-headers-{release}"
    target = _TARGETS[debian_arch]
    cross = controller_debian_arch() != debian_arch
    # A tree unpacked once serves every later build of that kernel without asking the archive:
    # Debian keeps only the newest build of each kernel line, so the headers of a host that has
    # not been upgraded leave the archive while the host (and our cached tree) stays on them.
    cached = _cached_tree(trees / debian_arch, release, package_version)
    if cached is not None:
        tree, version = cached
        _fix_makefile(tree / "Makefile")  # trees prepared by older fleetprobes used an absolute include
        return KernelTree(tree, release, version, _kernel_cc(tree, target.triplet, cross))
    spec = f"{headers}={package_version}" if package_version else headers
    # Headers of a kernel from another suite (bullseye's 5.10, trixie's 6.12) are not in the
    # machine's sources: release_suites says where else to look.
    candidates = debian.release_suites(release)
    try:
        (ref,), suites = debian.resolve_in_suites([spec], debian_arch, debian_cache, candidates)
    except debian.DebianError as exc:
        if not package_version:
            raise
        # uname -v names the source version; an arch may carry a later binNMU: take what exists.
        (ref,), suites = debian.resolve_in_suites([headers], debian_arch, debian_cache, candidates)
        if ref.version.split("+")[0] != package_version:
            raise exc from None
    dest = trees / debian_arch / f"{release}_{ref.version}"
    marker = dest / ".fleetprobe-ready"
    host_arch = controller_debian_arch()
    tree = dest / "usr/src" / headers
    deps = debian.depends_names(ref.depends)
    common = [d for d in deps if d.startswith("linux-headers-") and d.endswith("-common")]
    kbuild = [d for d in deps if d.startswith("linux-kbuild-")]
    if not common or not kbuild:
        raise debian.DebianError(f"{headers} {ref.version} does not depend on a -common and a linux-kbuild package",
                                 hint=f"Depends was {ref.depends!r}; is this a Debian kernel?")
    pkgs = debian.fetch([ref.spec, f"{common[0]}={ref.version}"], debian_arch, debian_cache, suites)
    pkgs += debian.fetch([f"{kbuild[0]}={ref.version}"], host_arch, debian_cache, suites)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{release}-", dir=dest.parent))
    try:
        for pkg in pkgs:
            debian.extract(pkg, tmp)
        _fix_tree(tmp, release)
        (tmp / ".fleetprobe-ready").write_text(" ".join(p.path.name for p in pkgs) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return KernelTree(tree, release, ref.version, _kernel_cc(tree, target.triplet, cross))


def _cached_tree(arch_dir: Path, release: str, package_version: str | None) -> tuple[Path, str] | None:
    """(tree, package version) of a complete unpacked tree for ``release``, or None.

    With a ``package_version`` (from ``uname -v``) only a tree of that source version counts
    (a binNMU suffix ``+bN`` aside); without one, the most recently unpacked tree of that release.
    """
    found: list[tuple[float, str, Path]] = []
    for d in arch_dir.glob(f"{glob.escape(release)}_*") if arch_dir.is_dir() else ():
        version = d.name[len(release) + 1:]
        marker = d / ".fleetprobe-ready"
        if not marker.is_file():
            continue
        if package_version and version.split("+")[0] != package_version:
            continue
        found.append((marker.stat().st_mtime, version, d / "usr/src" / f"linux-headers-{release}"))
    if not found:
        return None
    _, version, tree = max(found)
    return tree, version


async def build_on_controller(group: BuildGroup, *, trees: Path, debian_cache: Path,
                              timeout: float = 600.0) -> tuple[bytes, str]:
    """Cross-build one group's module against Debian's headers; return (.ko bytes, build log)."""
    key, target = group.key, group.target
    where = f"controller build of {key}"
    try:
        tree = await asyncio.to_thread(prepare_debian_tree, key.release, key.debian_arch,
                                       group.package_version, trees=trees, debian_cache=debian_cache)
    except debian.DebianError as exc:
        raise BuildError(f"cannot get the kernel headers for {key.release} ({key.debian_arch})",
                         where=where, evidence=str(exc),
                         hint="the release may be too old for the configured Debian mirror "
                              "(try snapshot.debian.org in /etc/apt/sources.list.d), or build on a host") from None
    cross = controller_debian_arch() != key.debian_arch
    if shutil.which(tree.cc) is None:
        raise BuildError(f"compiler {tree.cc} (the one {key.release} was built with) is not installed",
                         where=where,
                         hint=f"apt-get install {cross_compiler_package(key.debian_arch, tree.cc.rsplit('-', 1)[-1])}")
    with tempfile.TemporaryDirectory(prefix=f"fleetprobe-{key.module}-") as tmp:
        work = Path(tmp)
        for rel, data in group.module.files:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        argv = ["make", "-C", str(tree.path), f"M={work}", f"ARCH={target.kernel_arch}"]
        if cross:
            argv.append(f"CROSS_COMPILE={target.triplet}-")
        argv.append("modules")
        status, log = await _run_local(argv, timeout=timeout)
        log = f"$ {shlex.join(argv)}\n{log}"
        ko = work / f"{key.module}.ko"
        if status != 0 or not ko.is_file():
            raise BuildError(f"build of {key} failed (make exit status {status})", where=where,
                             evidence=compiler_messages(log), hint="fix the module source; the full log is above")
        return ko.read_bytes(), log


async def build_on_host(group: BuildGroup, session: Session, *, timeout: float = 900.0) -> tuple[bytes, str]:
    """Build one group's module on its build host, in a temporary folder removed afterwards."""
    key = group.key
    host = group.build_host or "?"
    where = f"{host}: build of {key}"
    res = await session.run("mktemp -d /tmp/fleetprobe-build.XXXXXX", timeout=30)
    work = res.stdout.decode(errors="replace").strip()
    if res.exit_status != 0 or not work.startswith("/tmp/fleetprobe-build."):
        raise BuildError("cannot make a build folder on the host", where=where,
                         evidence=res.stderr.decode(errors="replace"), hint="is /tmp writable?")
    try:
        dirs = sorted({os.path.dirname(rel) for rel, _ in group.module.files} - {""})
        if dirs:
            await session.run("mkdir -p " + " ".join(shlex.quote(f"{work}/{d}") for d in dirs), timeout=30)
        for rel, data in group.module.files:
            await session.put(data, f"{work}/{rel}")
        build_dir = group.build_dir or f"/lib/modules/{key.release}/build"
        cmd = f"make -C {shlex.quote(build_dir)} M={shlex.quote(work)} modules 2>&1"
        res = await session.run(cmd, timeout=timeout)
        log = f"$ {cmd}\n" + res.stdout.decode("utf-8", "replace") + res.stderr.decode("utf-8", "replace")
        if res.exit_status != 0:
            raise BuildError(f"build of {key} failed on {host} (make exit status {res.exit_status})",
                             where=where, evidence=compiler_messages(log),
                             hint="fix the module source, or check the host's headers match its kernel")
        try:
            ko = await session.get(f"{work}/{key.module}.ko")
        except Exception as exc:  # the transport's own error type: report it, whatever it is
            raise BuildError(f"make succeeded but {key.module}.ko could not be read back", where=where,
                             evidence=str(exc)) from None
        return ko, log
    finally:
        await session.run(f"rm -rf {shlex.quote(work)}", timeout=30)


async def read_host_vermagic(session: Session, release: str) -> str | None:
    """The vermagic of one of the host's own modules (a plain .ko under /lib/modules/<release>), or None."""
    cmd = (f"find /lib/modules/{shlex.quote(release)}/ -name '*.ko' -type f 2>/dev/null | head -n 1")
    res = await session.run(cmd, timeout=30)
    path = res.stdout.decode(errors="replace").strip()
    if res.exit_status != 0 or not path:
        return None
    try:
        return read_modinfo(await session.get(path), name=path).vermagic or None
    except (ElfFormatError, OSError):
        return None


async def build_group(group: BuildGroup, *, cache: ModuleCache, session: Session | None = None,
                      trees: Path | None = None, debian_cache: Path | None = None,
                      trusted: Collection[str] = ()) -> GroupResult:
    """Build (or find in the cache) one group's module and check it; never raises for build failures.

    A shareable build (the controller's, a trusted host's) goes into the cache with its
    provenance; a host's own build is kept in memory for that host only.
    """
    key = group.key
    where = f"build of {key}"
    if group.where == "none" or not group.hosts:
        return GroupResult(group, error=BuildError(group.error or "nothing to build", where=where, hint=group.hint))
    cached = cache.lookup(key, trusted)
    start = time.monotonic()
    try:
        if cached is not None:
            modinfo, elf = check_module(cached.read_bytes(), key, group.target, where=where)
            return GroupResult(group, module=BuiltModule(key, cached, modinfo, elf, cached=True,
                                                         where="cache", seconds=0.0))
        if group.where == "host":
            if session is None:
                raise BuildError(f"no session to build host {group.build_host}", where=where)
            ko, log = await build_on_host(group, session)
        else:
            root = cache.root.parent
            ko, log = await build_on_controller(group, trees=trees or root / "kernel-trees",
                                                debian_cache=debian_cache or root / "debian")
        modinfo, elf = check_module(ko, key, group.target, where=where)
        seconds = time.monotonic() - start
        if key.built_by and key.built_by not in set(trusted):
            return GroupResult(group, module=BuiltModule(key, Path(f"{key.built_by}:{key.module}.ko"), modinfo, elf,
                                                         cached=False, where=group.where, seconds=seconds, blob=ko))
        # Shareable: the controller's build, or a trusted host's (kept with who built it).
        path = cache.store(replace(key, built_by=""), ko, log, {"module": key.module, "source_hash": key.source_hash,
                                          "release": key.release, "debian_arch": key.debian_arch,
                                          "where": group.where, "build_host": group.build_host,
                                          "vermagic": modinfo.vermagic, "seconds": round(seconds, 2),
                                          "built_at": time.time()})
        return GroupResult(group, module=BuiltModule(key, path, modinfo, elf, cached=False,
                                                     where=group.where, seconds=seconds))
    except BuildError as exc:
        return GroupResult(group, error=exc)


async def build_groups(groups: Sequence[BuildGroup], *, cache: ModuleCache | None = None,
                       sessions: Mapping[str, Session] | None = None,
                       trees: Path | None = None, debian_cache: Path | None = None,
                       jobs: int | None = None) -> list[GroupResult]:
    """Build every group, at most ``jobs`` at once (default: the controller's CPUs), in the given order."""
    cache = cache or ModuleCache()
    limit = asyncio.Semaphore(jobs or os.cpu_count() or 2)

    async def one(group: BuildGroup) -> GroupResult:
        """One group under the concurrency limit."""
        async with limit:
            session = sessions.get(group.build_host) if sessions and group.build_host else None
            return await build_group(group, cache=cache, session=session, trees=trees, debian_cache=debian_cache)

    return list(await asyncio.gather(*(one(g) for g in groups)))
