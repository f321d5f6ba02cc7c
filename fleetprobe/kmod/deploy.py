"""Deploy: group build results -> per host a module or a HostError; the last checks on the host itself."""

from __future__ import annotations

from collections.abc import Iterable

from fleetprobe.errors import BuildError, HostError
from fleetprobe.kmod.compile import BuiltModule, GroupResult, read_host_vermagic
from fleetprobe.kmod.ko import vermagic_problem
from fleetprobe.session import Session


def results_by_host(results: Iterable[GroupResult]) -> dict[str, dict[str, BuiltModule | HostError]]:
    """Per host, per module name: the built module, or the HostError (stage ``build``) that host gets."""
    out: dict[str, dict[str, BuiltModule | HostError]] = {}
    for r in results:
        for host in r.group.hosts:
            slot = out.setdefault(host, {})
            if r.module is not None:
                slot[r.module.key.module] = r.module
            else:
                err = r.error or BuildError("not built", where=str(r.group.key))
                slot[r.group.key.module] = HostError(host, "build", f"{err.where}: {err.message}",
                                                     evidence=err.evidence or None, hint=err.hint)
        for host, reason in r.group.blocked:
            out.setdefault(host, {})[r.group.key.module] = HostError(
                host, "build", f"cannot load {r.group.key.module}: {reason}")
    return out


def host_module_error(host: str, module: BuiltModule, release: str, host_vermagic: str | None) -> HostError | None:
    """A HostError if ``module`` would be refused by this host's kernel (vermagic), else None."""
    problem = vermagic_problem(module.modinfo, release, host_vermagic)
    if problem is None:
        return None
    return HostError(host, "build", f"{module.key.module}.ko does not match the running kernel: {problem}",
                     evidence=f"module vermagic: {module.modinfo.vermagic}",
                     hint="the host's kernel changed since its facts were gathered, or its build tree is "
                          "for another kernel: reboot into the matching kernel or install matching headers")


async def verify_on_host(session: Session, host: str, module: BuiltModule, release: str) -> HostError | None:
    """Before insmod: compare the module's vermagic with ``release`` and with one of the host's own modules.

    Costs two round trips (find + read one small .ko); a host without plain
    ``.ko`` files (compressed modules) is checked against ``release`` only.
    """
    return host_module_error(host, module, release, await read_host_vermagic(session, release))
