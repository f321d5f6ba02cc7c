"""Build planning (pure): hosts grouped by (target arch, kernel release, source hash), and where each group builds.

``host`` (on one host of the group, in its ``/lib/modules/$(uname -r)/build``) or ``controller``
(cross-built against Debian's ``linux-headers-<release>``).  ``fleetprobe plan`` prints these groups.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
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

    def __str__(self) -> str:
        return f"{self.module}@{self.source_hash[:8]} for {self.release} ({self.debian_arch})"


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
                *, where: str = "auto",
                have_program: Callable[[str], bool] = _have_program) -> list[BuildGroup]:
    """Group hosts by (arch, release, module source) and choose where each group builds.

    ``modules`` is either the modules every host needs, or a map from host
    name to the modules that host needs.  ``where`` is ``auto`` (a host of the
    group if one can build, else the controller for a Debian kernel with a
    cross compiler installed), ``host`` or ``controller``.  ``have_program``
    answers whether the controller has a program (the cross compiler); tests
    pass their own.  Nothing is touched: this only decides.
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
    groups = [_plan_group(key, sources[key], targets[key], hosts, where, have_program)
              for key, hosts in members.items()]
    return sorted(groups + unknown, key=lambda g: (g.key.debian_arch, g.key.release, g.key.module))


def _plan_group(key: BuildKey, mod: ModuleSource, target: Target, hosts: list[Facts],
                where: str, have_program: Callable[[str], bool]) -> BuildGroup:
    """Decide where one group builds (see :func:`plan_builds`)."""
    blocked = tuple((f.host, r) for f in hosts if (r := module_load_blocker(f)) is not None)
    loadable = [f for f in hosts if module_load_blocker(f) is None]
    base = BuildGroup(key=key, module=mod, target=target, hosts=tuple(f.host for f in loadable),
                      where="none", reason="", blocked=blocked)
    if not loadable:
        return replace(base, reason="no host can load modules", error="no host of this kernel can load modules",
                        hint=blocked[0][1] if blocked else None)
    builders = [f for f in loadable if f.can_build_modules]
    reasons: list[str] = []
    if where in ("auto", "host"):
        if builders:
            b = builders[0]
            return replace(base, where="host", build_host=b.host,
                            build_dir=b.build_dir or f"/lib/modules/{key.release}/build",
                            reason=f"{b.host} has the kernel's build tree, make and {b.cc}")
        reasons.append(f"no host can build ({loadable[0].host}: {_host_build_problem(loadable[0])})")
    if where in ("auto", "controller"):
        f = loadable[0]
        compiler = f"{target.triplet}-gcc"
        if not is_debian_kernel(key.release, f.kernel_version):
            reasons.append(f"{key.release} is not a Debian kernel (uname -v: {f.kernel_version or '?'}), "
                           "so its headers cannot be fetched")
        elif not have_program(compiler):
            reasons.append(f"cross compiler {compiler} is not installed on the controller "
                           f"(apt-get install {cross_compiler_package(target.debian_arch)})")
        else:
            return replace(base, where="controller", compiler=compiler,
                            package_version=debian_package_version(f.kernel_version),
                            reason=f"Debian kernel; {compiler} on the controller")
    hint = ("install the kernel headers, make and gcc on one host of this kernel, "
            f"or install {cross_compiler_package(target.debian_arch)} on the controller (Debian kernels only)")
    return replace(base, reason="cannot build", error="; ".join(reasons), hint=hint)


_DEBIAN_RELEASE = re.compile(r"^\d+\.\d+\.\d+-\d+(?:-[a-z0-9][a-z0-9-]*)?$")


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
