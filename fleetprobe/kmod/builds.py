"""Module builds across a run: each (arch, kernel release, module source) built once, awaited by its hosts."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fleetprobe.errors import HostError
from fleetprobe.facts import Facts
from fleetprobe.plan import HostPlan
from fleetprobe.session import Session

from fleetprobe.kmod.cache import ModuleCache
from fleetprobe.kmod.plan import BuildGroup, BuildKey, plan_builds
from fleetprobe.kmod.source import ModuleSource, load_module_source
from fleetprobe.playbook import MODULE_PARAM_VALUE
from fleetprobe.runner.channel import HostFacts

if TYPE_CHECKING:
    # kmod.compile (and with it kmod.debian) is imported only when a module is built.
    from fleetprobe.kmod.compile import BuiltModule, GroupResult


class ModuleBuilds:
    """Builds each (arch, kernel release, module source) once per run; every host of that group awaits it.

    The first host of a group to arrive starts the build (on the controller,
    or on itself when it is the chosen build host) under an asyncio future;
    the others await the same future, so N hosts of one kernel cost one build
    (or one cache hit).  A host that can neither build nor have the controller
    build for it waits until every host has finished its setup, in case a host
    of its kernel that can build turns up, and then fails with the planner's
    reason.  ``results`` lists the group results in the order builds started:
    a result's position + 1 is its build number in this run.
    """

    def __init__(self, where: str = "auto", cache: ModuleCache | None = None,
                 have_program: Callable[[str], bool] | None = None, trusted: Iterable[str] = ()) -> None:
        """Build at ``where`` (auto/host/controller) into ``cache``; ``have_program`` and ``trusted`` as in plan_builds."""
        self.where = where
        self._cache = cache
        self.have_program = have_program
        self.trusted = frozenset(trusted)
        self.results: list[GroupResult] = []
        self._sources: dict[str, ModuleSource] = {}
        self._builds: dict[BuildKey, asyncio.Future[GroupResult]] = {}

    @property
    def cache(self) -> ModuleCache:
        """The build cache, opened when a run first needs a module."""
        if self._cache is None:
            self._cache = ModuleCache()
        return self._cache

    def source(self, path: str) -> ModuleSource:
        """The module folder's source, read and hashed once per run."""
        src = self._sources.get(path)
        if src is None:
            src = self._sources[path] = load_module_source(path)
        return src

    def build_number(self, key: BuildKey) -> int:
        """1-based position of ``key``'s build in this run (0: none)."""
        for i, r in enumerate(self.results):
            if r.group.key == key:
                return i + 1
        return 0

    async def module_for(self, facts: Facts, source: ModuleSource, everyone_set_up: asyncio.Event,
                         session: Session | None = None) -> BuiltModule:
        """This host's built module (shared with its group), or a HostError (stage ``build``) saying why not.

        ``session`` is the host's own, used when the host is the one that builds. With ``auto``,
        a controller build that fails (the headers left Debian's archive, say) falls back to the
        host building for itself when it can.
        """
        host = facts.host
        group = self._plan(facts, source, self.where)
        result = await self._result(facts, group, everyone_set_up, session)
        if (result.module is None and group.where == "controller" and self.where == "auto"
                and facts.can_build_modules and session is not None):
            own = self._plan(facts, source, "host")
            # Its own build, even for a trusted host: the group's shared key already holds the failure.
            own = replace(own, key=replace(own.key, built_by=host), hosts=(host,))
            if own.where == "host":
                result = await self._result(facts, own, everyone_set_up, session)
        if result.module is None and self.trusted:
            # A host of this kernel the user trusts may have built for itself: its build serves us too.
            await everyone_set_up.wait()
            result = self._trusted_build(group.key) or result
        if result.module is None:
            err = result.error
            message = f"{err.where}: {err.message}" if err else f"build of {result.group.key} failed"
            raise HostError(host, "build", message, evidence=(err.evidence if err else None) or None,
                            hint=err.hint if err else None)
        return result.module

    def _trusted_build(self, key: BuildKey) -> GroupResult | None:
        """A finished build of ``key``'s kernel and source by a host the user trusts, or None."""
        for r in self.results:
            k = r.group.key
            if (r.module is not None and k.built_by in self.trusted
                    and replace(k, built_by="") == replace(key, built_by="")):
                return r
        return None

    def _plan(self, facts: Facts, source: ModuleSource, where: str) -> BuildGroup:
        """This host's build group when building at ``where``."""
        kwargs = {"have_program": self.have_program} if self.have_program else {}
        groups = plan_builds([facts], [source], where=where, trusted=self.trusted, **kwargs)
        return next((g for g in groups if facts.host in g.hosts), groups[0])

    async def _result(self, facts: Facts, group: BuildGroup, everyone_set_up: asyncio.Event,
                      session: Session | None) -> GroupResult:
        """The result of ``group``'s build: started here if first, else awaited; a none group waits for the fleet."""
        from fleetprobe.kmod.compile import build_group  # the builder loads only when a module is built

        host = facts.host
        key = group.key
        fut = self._builds.get(key)
        if fut is None and group.where == "none" and not group.blocked:
            await everyone_set_up.wait()
            fut = self._builds.get(key)
        if fut is None:
            if group.where == "none":
                raise HostError(host, "build", f"cannot build {key}: {group.error or group.reason}",
                                hint=group.hint)
            fut = asyncio.get_running_loop().create_future()
            self._builds[key] = fut
            try:
                result = await build_group(group, cache=self.cache, session=session, trusted=self.trusted)
            except BaseException as exc:
                # Waiters must not hang on a build that died (a dropped link, a bug): they get its error.
                fut.set_exception(HostError(host, "build", f"the build of {key} on {host} broke off: {exc}"))
                fut.exception()  # mark retrieved: a group nobody else awaits must not warn
                raise
            self.results.append(result)
            fut.set_result(result)
        return await asyncio.shield(fut)

    def describe(self, module: BuiltModule) -> str:
        """Where a host's module came from, for its outcome: ``built on the controller, build 2 of this run``."""
        if module.where == "cache":
            how = "from the controller's module cache"
        elif module.where == "host":
            group = next((r.group for r in self.results if r.group.key == module.key), None)
            how = f"built on {group.build_host if group else 'a host'} in {module.seconds:.1f}s"
        else:
            how = f"built on the controller in {module.seconds:.1f}s"
        return f"{module.key.module}@{module.key.source_hash[:8]} {how}, build {self.build_number(module.key)} of this run"


def _module_cache(path: Path | None) -> ModuleCache | None:
    """The build cache at ``path`` (None: the default, opened when first needed)."""
    if not path:
        return None
    return ModuleCache(path)


#: What a module name, run id, probe name and parameter must look like: the modules print them as
#: key=value tokens (fp_kprobe refuses others) and the runner splits its directives at blanks.
#: The playbook's rule for a module parameter (checked there at file:line); the run checks again
#: what it adds itself (run id, probe name) and what an API caller built without the reader.
_MODULE_WORD = MODULE_PARAM_VALUE


def load_name(group: str, probe: str) -> str:
    """The kernel module name of ``probe``'s module in the run and host of ``group`` (fp_<run>_<host>)."""
    name = f"{group}_{probe}"
    if len(name) > 55:  # MODULE_NAME_LEN - 1 on 64-bit kernels
        name = f"{group}_{hashlib.sha256(probe.encode()).hexdigest()[:8]}"
    return name


def plan_module_builds(results: Iterable[tuple[HostFacts, HostPlan | None]],
                       where: str = "auto", trusted: Iterable[str] = ()) -> list[BuildGroup]:
    """The build groups a run of these plans would build (``fleetprobe plan`` shows them); pure."""
    facts: dict[str, Facts] = {}
    wanted: dict[str, list[ModuleSource]] = {}
    sources: dict[str, ModuleSource] = {}
    for hf, plan in results:
        if hf.facts is None or plan is None:
            continue
        for p in plan.probes:
            if p.kind == "module" and p.module:
                src = sources.get(p.module) or sources.setdefault(p.module, load_module_source(p.module))
                facts[hf.host.name] = hf.facts
                wanted.setdefault(hf.host.name, []).append(src)
    return plan_builds(facts, wanted, where=where, trusted=frozenset(trusted)) if facts else []
