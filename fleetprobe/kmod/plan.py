"""Build planning (pure): hosts grouped by (target arch, kernel release, source hash), and where each group builds.

``host`` (on one host of the group, in its ``/lib/modules/$(uname -r)/build``) or ``controller``
(cross-built against Debian's ``linux-headers-<release>``).  ``fleetprobe plan`` prints these groups.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from fleetprobe.arches import Target, cross_compiler_package, target_for
from fleetprobe.errors import FleetprobeError
from fleetprobe.arches import kernel_arch
from fleetprobe.facts import Facts
from fleetprobe.kmod.source import ModuleSource

WHERE_CHOICES = ("auto", "host", "controller")


@dataclass(frozen=True)
class BuildKey:
    """What makes two hosts share one ``.ko``: target arch, kernel release, module source."""

    debian_arch: str
    release: str
    module: str
    source_hash: str
    #: "" for a build any host of the kernel may load (the controller's, or a trusted host's);
    #: else the host whose own build this is: loaded by that host only, never cached (issue 11).
    built_by: str = ""

    def __str__(self) -> str:
        own = f" (own build of {self.built_by})" if self.built_by else ""
        return f"{self.module}@{self.source_hash[:8]} for {self.release} ({self.debian_arch}){own}"


#: A kernel release as it may appear in a build key, a cache path or a Debian package name
#: (``6.1.0-57-amd64``, ``6.12.118+deb13-arm64``, ``5.10.0-35-5kc-malta``): no ``/``, no ``..``.
#: A host reports its release itself; a lying one must not name a path outside the cache.
_SAFE_RELEASE = re.compile(r"[0-9][0-9A-Za-z.+_~-]{0,99}")


def release_problem(release: str) -> str | None:
    """Why ``release`` (a host's ``uname -r``) may not name a build or a cache path, or None."""
    if not _SAFE_RELEASE.fullmatch(release) or ".." in release:
        return (f"kernel release {release!r} is not a plain release name (digits, letters, . + _ ~ -; "
                "no '/' or '..'): fleetprobe will not build for it")
    return None


@dataclass(frozen=True)
class BuildGroup:
    """One build serving every host in ``hosts``.

    ``where`` is ``host`` (``build_host`` builds it in ``build_dir``),
    ``controller`` (cross-built against Debian's headers for ``release``,
    package version ``package_version`` when ``uname -v`` told it), or
    ``none`` when it cannot be built: ``error`` says why and what to do.
    ``blocked`` lists hosts of this kernel that cannot load any module
    (modules_disabled, lockdown) with the reason; they get no build.
    """

    key: BuildKey
    module: ModuleSource
    target: Target
    hosts: tuple[str, ...]
    where: str
    reason: str
    build_host: str | None = None
    build_dir: str | None = None
    package_version: str | None = None
    compiler: str | None = None
    error: str | None = None
    hint: str | None = None
    blocked: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """One line for ``fleetprobe plan``: what is built, where, for how many hosts."""
        n = len(self.hosts)
        text = f"{self.key}: {n} host{'s' if n != 1 else ''}: "
        if self.where == "host":
            text += f"build on {self.build_host} ({self.build_dir})"
        elif self.where == "controller":
            text += f"cross-build on the controller with {self.compiler}"
        else:
            text += f"cannot build: {self.error}"
        if self.blocked:
            text += f"; {len(self.blocked)} host(s) cannot load modules"
        return text


def module_load_blocker(facts: Facts) -> str | None:
    """Why this host cannot load an unsigned module we build, or None."""
    if facts.modules_disabled:
        return "module loading is disabled (/proc/sys/kernel/modules_disabled = 1; only a reboot clears it)"
    if facts.lockdown in ("integrity", "confidentiality"):
        return (f"kernel lockdown is '{facts.lockdown}': only modules signed with a key the kernel "
                "trusts load; fleetprobe builds unsigned modules (use tracefs probes instead)")
    return None


def _have_program(name: str) -> bool:
    """True if ``name`` is on the controller's PATH."""
    return shutil.which(name) is not None


def _host_build_problem(f: Facts) -> str:
    """What a host lacks to build modules itself."""
    missing = []
    if not f.build_dir:
        missing.append(f"no /lib/modules/{f.kernel_release}/build (install the kernel headers package)")
    if not f.make:
        missing.append("no make")
    if not f.cc:
        missing.append("no cc/gcc")
    return ", ".join(missing)


def plan_builds(hosts_facts: Iterable[Facts] | Mapping[str, Facts],
                modules: Sequence[ModuleSource] | Mapping[str, Sequence[ModuleSource]],
                *, where: str = "auto", trusted: Collection[str] = (),
                have_program: Callable[[str], bool] = _have_program) -> list[BuildGroup]:
    """Group hosts by (arch, release, module source) and choose where each group builds.

    ``modules`` is either the modules every host needs, or a map from host
    name to the modules that host needs.  ``where`` is ``auto`` (the controller
    for a Debian kernel with a cross compiler installed, else each host that can
    build, for itself), ``host`` or ``controller``.  A host's build is loaded by
    other hosts only when the user trusts that host (``trusted``, from
    ``--trust-build-host``): a compromised host must not choose the kernel code its
    whole group loads.  ``have_program`` answers whether the controller has a
    program (the cross compiler); tests pass their own.  Nothing is touched: this
    only decides.
    """
    if where not in WHERE_CHOICES:
        raise FleetprobeError(f"unknown build location {where!r}", hint="use one of: auto, host, controller")
    facts_list = list(hosts_facts.values()) if isinstance(hosts_facts, Mapping) else list(hosts_facts)
    members: dict[BuildKey, list[Facts]] = {}
    sources: dict[BuildKey, ModuleSource] = {}
    targets: dict[BuildKey, Target] = {}
    unknown: list[BuildGroup] = []
    for f in sorted(facts_list, key=lambda x: x.host):
        wanted = modules.get(f.host, ()) if isinstance(modules, Mapping) else modules
        target = target_for(f)
        for mod in wanted:
            bad_release = release_problem(f.kernel_release)
            if bad_release:
                unknown.append(BuildGroup(
                    key=BuildKey(target.debian_arch if target else f.arch, "invalid", mod.name, mod.source_hash,
                                 built_by=f.host),
                    module=mod, target=target or Target(f.arch, kernel_arch(f.arch), "", 0, f.elf_class, f.endian),
                    hosts=(f.host,), where="none", reason="invalid kernel release", error=bad_release,
                    hint="the host's uname -r must be a release name; check the host"))
                continue
            if target is None:
                key = BuildKey(f.arch, f.kernel_release, mod.name, mod.source_hash)
                unknown.append(BuildGroup(
                    key=key, module=mod, target=Target(f.arch, kernel_arch(f.arch), "", 0, f.elf_class, f.endian),
                    hosts=(f.host,), where="none", reason="unknown machine",
                    error=f"fleetprobe does not know how to build for machine {f.arch!r} ({f.endian} endian)",
                    hint="use tracefs probes on this host, or add the arch to fleetprobe/arches.py"))
                continue
            key = BuildKey(target.debian_arch, f.kernel_release, mod.name, mod.source_hash)
            members.setdefault(key, []).append(f)
            sources[key] = mod
            targets[key] = target
    groups = [g for key, hosts in members.items()
              for g in _plan_group(key, sources[key], targets[key], hosts, where, frozenset(trusted), have_program)]
    return sorted(groups + unknown, key=lambda g: (g.key.debian_arch, g.key.release, g.key.module))


def _plan_group(key: BuildKey, mod: ModuleSource, target: Target, hosts: list[Facts], where: str,
                trusted: frozenset[str], have_program: Callable[[str], bool]) -> list[BuildGroup]:
    """Decide where one kernel's hosts get their module (see :func:`plan_builds`).

    The controller's build (from Debian's signed archive) is shareable; so is the build of a
    host the user trusts. Any other host that can build builds for itself only; a host that
    can do neither gets a ``none`` group saying why and what to do.
    """
    blocked = tuple((f.host, r) for f in hosts if (r := module_load_blocker(f)) is not None)
    loadable = [f for f in hosts if module_load_blocker(f) is None]
    base = BuildGroup(key=key, module=mod, target=target, hosts=tuple(f.host for f in loadable),
                      where="none", reason="", blocked=blocked)
    if not loadable:
        return [replace(base, reason="no host can load modules", error="no host of this kernel can load modules",
                        hint=blocked[0][1] if blocked else None)]
    reasons: list[str] = []
    if where in ("auto", "controller"):
        problem = _controller_problem(key, target, loadable[0], have_program)
        if problem is None:
            compiler = f"{target.triplet}-gcc"
            return [replace(base, where="controller", compiler=compiler,
                            package_version=debian_package_version(loadable[0].kernel_version),
                            reason=f"Debian kernel; {compiler} on the controller")]
        reasons.append(problem)
    if where in ("auto", "host"):
        return _host_groups(base, loadable, trusted, reasons)
    hint = ("install the kernel headers, make and gcc on the hosts of this kernel (each builds for itself), "
            f"or install {cross_compiler_package(target.debian_arch)} on the controller (Debian kernels only)")
    return [replace(base, reason="cannot build", error="; ".join(reasons), hint=hint)]


def _controller_problem(key: BuildKey, target: Target, f: Facts, have_program: Callable[[str], bool]) -> str | None:
    """Why the controller cannot cross-build for this kernel, or None."""
    compiler = f"{target.triplet}-gcc"
    if not is_debian_kernel(key.release, f.kernel_version):
        return (f"{key.release} is not a Debian kernel (uname -v: {f.kernel_version or '?'}), "
                "so its headers cannot be fetched")
    if not have_program(compiler):
        return (f"cross compiler {compiler} is not installed on the controller "
                f"(apt-get install {cross_compiler_package(target.debian_arch)})")
    return None


def host_build_group(base: BuildGroup, b: Facts, *, shared: bool) -> BuildGroup:
    """``b`` builds on itself: for the whole group when ``shared`` (a trusted host), else for itself only."""
    key = base.key if shared else replace(base.key, built_by=b.host)
    hosts = base.hosts if shared else (b.host,)
    why = f"{b.host} has the kernel's build tree, make and {b.cc}"
    return replace(base, key=key, hosts=hosts, where="host", build_host=b.host,
                   build_dir=b.build_dir or f"/lib/modules/{base.key.release}/build",
                   reason=why + ("; trusted with --trust-build-host" if shared else "; builds for itself only"))


def _host_groups(base: BuildGroup, loadable: list[Facts], trusted: frozenset[str],
                 reasons: list[str]) -> list[BuildGroup]:
    """Host builds: one trusted builder for everyone, else each builder for itself and the rest told why."""
    builders = [f for f in loadable if f.can_build_modules]
    for b in builders:
        if b.host in trusted:
            return [host_build_group(base, b, shared=True)]
    groups = [host_build_group(base, b, shared=False) for b in builders]
    rest = tuple(f.host for f in loadable if not f.can_build_modules)
    if rest:
        first = next(f for f in loadable if not f.can_build_modules)
        why = [*reasons, f"no host can build ({first.host}: {_host_build_problem(first)})"]
        hint = ("install the kernel headers, make and gcc on this host, or install the cross compiler on the "
                "controller (Debian kernels only)")
        if builders:
            why.append(f"{builders[0].host} can build, but a host's build is loaded only by itself unless you "
                       "trust that host")
            hint = f"--trust-build-host {builders[0].host} to load its build on the other hosts of this kernel"
        groups.append(replace(base, hosts=rest, reason="cannot build", error="; ".join(why), hint=hint))
    return groups


# 6.1.0-50-amd64 (up to bookworm), 6.12.118+deb13-amd64 / 6.12.95+deb12-amd64 (trixie, bookworm-backports).
_DEBIAN_RELEASE = re.compile(r"^\d+\.\d+\.\d+(?:-\d+|\+deb\d+)(?:-[a-z0-9][a-z0-9-]*)?$")


_DEBIAN_VERSION = re.compile(r"\bDebian (\d[\w.+~:-]*)")


def debian_package_version(kernel_version: str) -> str | None:
    """The Debian source version from ``uname -v`` (``... Debian 6.1.176-1 (2025-06-01)``)."""
    m = _DEBIAN_VERSION.search(kernel_version)
    return m.group(1) if m else None


def is_debian_kernel(release: str, kernel_version: str) -> bool:
    """True if ``uname -r``/``uname -v`` say this is a Debian kernel (headers in Debian's archive).

    Ubuntu's releases look the same (``5.15.0-91-generic``) but its ``uname -v``
    says Ubuntu, so ``uname -v`` must name Debian when the facts have it.
    """
    if not _DEBIAN_RELEASE.match(release):
        return False
    return not kernel_version or "Debian" in kernel_version
