"""Uprobes: (binary, symbol) -> file offset on a host, one fetch and one ELF parse per distinct binary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from fleetprobe.errors import HostError
from fleetprobe.facts import Facts
from fleetprobe.session import Session


class ElfOffsets:
    """Resolves uprobe (binary, symbol) to file offsets, fetching each distinct binary once per run.

    Hosts with the same binary (same md5) share one fetch and one ELF parse:
    a fleet of 300 identical hosts costs one transfer, not 300.
    """

    def __init__(self) -> None:
        self._results: dict[tuple[str, str], asyncio.Future[int | str]] = {}

    async def resolve(self, session: Session, facts: Facts,
                      targets: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int | str]:
        """Offsets (or reasons) for this host's uprobe targets."""
        out: dict[tuple[str, str], int | str] = {}
        by_path: dict[str, list[str]] = {}
        for path, symbol in targets:
            by_path.setdefault(path, []).append(symbol)
        for path, symbols in by_path.items():
            ff = facts.files.get(path)
            if ff is None or not ff.exists:
                for s in symbols:
                    out[(path, s)] = f"{path} does not exist on this host"
                continue
            keys = [(ff.md5, s) for s in symbols]
            if any(k not in self._results for k in keys):
                loop = asyncio.get_running_loop()
                futs = {k: loop.create_future() for k in keys if k not in self._results}
                self._results.update(futs)
                try:
                    data = await session.get(path)
                except HostError as exc:
                    for f in futs.values():
                        f.set_result(f"cannot read {path}: {exc.evidence or exc.message}")
                else:
                    from fleetprobe import elf  # the ELF reader loads only for playbooks with uprobes

                    for (_, sym), f in futs.items():
                        try:
                            f.set_result(elf.symbol_file_offset(data, sym))
                        except ValueError as exc:
                            f.set_result(str(exc))
            for (md5, s) in keys:
                out[(path, s)] = await self._results[(md5, s)]
        return out
