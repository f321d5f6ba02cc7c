"""Uprobes: (binary, symbol) -> file offset on a host, one ELF parse per distinct binary.

The md5 a host's facts claim for a binary is its word, not evidence: a host that lies could make
every other host's uprobe land where it chose (a breakpoint inside an instruction crashes every
process that runs it).  So a parse result is shared only under the md5 the controller computed
from bytes it fetched itself; a host whose claimed md5 names such a result reuses it without a
fetch (if it lied, the offsets are wrong for it alone), any other host fetches its own binary.
Fetches are bounded in time and size, and every failure (a read error, a malformed or forged
ELF, a bug) is this host's reason, never another host's: no one waits on a future nobody resolves.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable

from fleetprobe.errors import HostError
from fleetprobe.facts import Facts
from fleetprobe.session import Session, shell_command

#: The largest binary fetched for its symbols (a big libxul is ~150 MB).
MAX_BINARY_BYTES = 256 << 20
#: Seconds one binary's fetch may take.
FETCH_TIMEOUT = 120.0


class ElfOffsets:
    """Resolves uprobe (binary, symbol) to file offsets, parsing each distinct binary once per run.

    Hosts with the same binary (same md5, computed here from fetched bytes) share one parse; a
    fleet of identical honest hosts costs one transfer, as each later host's claimed md5 names the
    verified result.
    """

    def __init__(self, *, max_bytes: int = MAX_BINARY_BYTES, fetch_timeout: float = FETCH_TIMEOUT) -> None:
        self.max_bytes = max_bytes
        self.fetch_timeout = fetch_timeout
        #: md5 (computed by the controller) -> symbol -> offset or reason.
        self._verified: dict[str, dict[str, int | str]] = {}
        #: Fetches in flight by claimed md5: later hosts with that claim wait, then look again.
        self._inflight: dict[str, asyncio.Event] = {}

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
            results = await self._for_binary(session, path, ff.md5, symbols)
            for s in symbols:
                out[(path, s)] = results[s]
        return out

    async def _for_binary(self, session: Session, path: str, claimed: str,
                          symbols: list[str]) -> dict[str, int | str]:
        """Offsets of ``symbols`` in this host's ``path``: a verified shared parse, or its own fetch."""
        if claimed:
            while (event := self._inflight.get(claimed)) is not None:
                await event.wait()
            known = self._verified.get(claimed)
            if known is not None and all(s in known for s in symbols):
                return known
        event = asyncio.Event()
        if claimed:
            self._inflight[claimed] = event
        try:
            try:
                data = await self._fetch(session, path)
            except HostError as exc:
                return {s: f"cannot read {path}: {exc.evidence or exc.message}" for s in symbols}
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            results = self._verified.setdefault(md5, {})
            for s in symbols:
                if s not in results:
                    results[s] = _parse(data, s)
            if claimed and md5 != claimed:
                # The host's facts named other bytes than it sent: its offsets are its own, unshared.
                return {s: f"{path}: the facts said md5 {claimed[:40]!r}, the bytes fetched have md5 {md5} "
                           "(the binary changed during the run, or the host lies)"
                           + (f"; and they do not parse: {results[s]}" if isinstance(results[s], str) else "")
                        for s in symbols}
            return {s: results[s] for s in symbols}
        finally:
            if claimed and self._inflight.get(claimed) is event:
                del self._inflight[claimed]
            event.set()

    async def _fetch(self, session: Session, path: str) -> bytes:
        """The binary's bytes, at most ``max_bytes`` within ``fetch_timeout`` seconds."""
        cmd = shell_command(session.host, 'exec head -c "$2" -- "$1"', path, str(self.max_bytes + 1))
        try:
            async with asyncio.timeout(self.fetch_timeout):
                res = await session.run(cmd)
        except TimeoutError:
            raise HostError(session.host.name, "plan", f"reading {path} took more than {self.fetch_timeout:.0f}s",
                            evidence=f"no end of {path} within {self.fetch_timeout:.0f}s") from None
        if not res.ok:
            raise HostError(session.host.name, "plan", f"cannot read {path}", evidence=res.stderr_text())
        if len(res.stdout) > self.max_bytes:
            raise HostError(session.host.name, "plan", f"{path} is larger than {self.max_bytes >> 20} MiB",
                            evidence=f"more than {self.max_bytes} bytes")
        return res.stdout


def _parse(data: bytes, symbol: str) -> int | str:
    """``symbol``'s file offset in ``data``, or why not: every parse failure is a reason, not an exception."""
    from fleetprobe import elf  # the ELF reader loads only for playbooks with uprobes

    try:
        return elf.symbol_file_offset(data, symbol)
    except ValueError as exc:
        return str(exc)
    except (MemoryError, RecursionError, IndexError, OverflowError) as exc:
        return f"malformed ELF: {type(exc).__name__}"
