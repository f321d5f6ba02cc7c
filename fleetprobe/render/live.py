"""Live view: what every host is doing during a run, readable for 5 hosts and for 2000.

Small fleets get one row per host.  Big fleets get counts per state, the
event total and rate, and the most recent changes and failures: 2000 rows
would scroll away and tell nobody anything.  When the console is not a
terminal (CI logs, pipes) the view draws nothing; it still records states so
:meth:`LiveView.render` can be shown or tested.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table

from fleetprobe.aggtables import AggProgress
from fleetprobe.render.safe import add_row, plain

#: States in pipeline order (the order the counts line shows them).
STATES = ("waiting", "connecting", "facts", "planning", "building", "probing", "teardown",
          "done", "skipped", "failed", "unreachable", "interrupted")
BAD_STATES = frozenset({"failed", "unreachable", "interrupted"})
_STYLE = {"done": "green", "probing": "cyan", "failed": "red", "unreachable": "red",
          "interrupted": "yellow", "skipped": "yellow"}
#: Up to this many hosts, one row per host.
ROWS_LIMIT = 20
RECENT = 8
#: aggregate: tables shown before "N more".
AGG_LINES = 6


@dataclass
class _HostState:
    """One host's current state in the view."""

    state: str = "waiting"
    detail: str = ""
    events: int = 0
    since: float = 0.0


class LiveView:
    """Per-host run state on the terminal, refreshed a few times a second.

    ``set_state`` and ``add_events`` are cheap and may be called from the event
    loop at any rate; rich's refresh thread reads a consistent copy under a lock.
    """

    def __init__(self, console: Console, hosts: list[str], *, refresh_per_second: float = 4.0) -> None:
        """A view of ``hosts``, all ``waiting``."""
        self.console = console
        self.enabled = console.is_terminal
        self._lock = threading.Lock()
        self._hosts = {h: _HostState() for h in hosts}
        self._recent: deque[tuple[str, str, str]] = deque(maxlen=RECENT)
        self._failures: deque[tuple[str, str, str]] = deque(maxlen=RECENT)
        self._started = time.monotonic()
        self._refresh = refresh_per_second
        self._live: Live | None = None
        self._aggs: dict[str, tuple[AggProgress, ...]] = {}

    def set_state(self, host: str, state: str, detail: str = "") -> None:
        """Move ``host`` to ``state`` (see :data:`STATES`), with an optional one-line detail."""
        if state not in STATES:
            raise ValueError(f"unknown live state {state!r} for host {host}; expected one of {', '.join(STATES)}")
        with self._lock:
            hs = self._hosts.get(host)
            if hs is None:
                hs = self._hosts[host] = _HostState()
            hs.state, hs.detail, hs.since = state, detail, time.monotonic()
            self._recent.append((host, state, detail))
            if state in BAD_STATES:
                self._failures.append((host, state, detail))

    def add_events(self, host: str, n: int) -> None:
        """Count ``n`` more events from ``host``."""
        with self._lock:
            hs = self._hosts.get(host)
            if hs is None:
                hs = self._hosts[host] = _HostState()
            hs.events += n

    def set_aggregates(self, host: str, progress: tuple[AggProgress, ...]) -> None:
        """``host``'s aggregate: tables as far as they are known now (see hist.AggProgress)."""
        with self._lock:
            self._aggs[host] = progress

    def counts(self) -> dict[str, int]:
        """Hosts per state (states with no host left out)."""
        with self._lock:
            out: dict[str, int] = {}
            for hs in self._hosts.values():
                out[hs.state] = out.get(hs.state, 0) + 1
        return {s: out[s] for s in STATES if s in out}

    def render(self) -> RenderableType:
        """The current view (what the terminal shows)."""
        with self._lock:
            hosts = {h: _HostState(s.state, s.detail, s.events, s.since) for h, s in self._hosts.items()}
            recent = list(self._recent)
            failures = list(self._failures)
            progress = dict(self._aggs)
        aggs = [plain(line, overflow="ellipsis", no_wrap=True) for line in aggregate_lines(progress)]
        elapsed = max(time.monotonic() - self._started, 1e-9)
        total = sum(s.events for s in hosts.values())
        counts: dict[str, int] = {}
        for s in hosts.values():
            counts[s.state] = counts.get(s.state, 0) + 1
        # A rate over less than a second is noise.
        rate = f" ({total / elapsed:,.0f}/s)" if elapsed >= 1.0 else ""
        head = plain(f"{len(hosts)} hosts  {elapsed:.0f}s  {total:,} events{rate}  ")
        for i, state in enumerate(s for s in STATES if s in counts):
            if i:
                head.append("  ")
            head.append(f"{state} {counts[state]}", style=_STYLE.get(state, ""))
        if len(hosts) <= ROWS_LIMIT:
            table = Table(box=None, pad_edge=False, show_header=True)
            # A long failure reason must not squeeze the host name away: only detail gives way.
            table.add_column("host", no_wrap=True, min_width=min(max(map(len, hosts), default=4), 40))
            table.add_column("state", no_wrap=True, min_width=12)
            table.add_column("events", justify="right", no_wrap=True, min_width=7)
            table.add_column("detail", overflow="ellipsis", no_wrap=True)
            for h, s in hosts.items():
                state = f"{s.state} {s.events}" if s.state == "probing" else s.state
                add_row(table, h, plain(state, style=_STYLE.get(s.state, "")), f"{s.events:,}", s.detail)
            return Group(head, table, *aggs)
        parts: list[RenderableType] = [head]
        if recent:
            parts.append(plain("recent: " + "; ".join(_change(h, st, d) for h, st, d in recent[-4:]),
                              overflow="ellipsis", no_wrap=True))
        if failures:
            parts.append(plain(f"failures ({counts.get('failed', 0) + counts.get('unreachable', 0)} hosts):",
                              style="red"))
            for h, st, d in failures:
                parts.append(plain(f"  {_change(h, st, d)}", overflow="ellipsis", no_wrap=True))
        busiest = sorted(((s.events, h) for h, s in hosts.items() if s.events), reverse=True)[:3]
        if busiest:
            parts.append(plain("busiest: " + ", ".join(f"{h} {n:,}" for n, h in busiest)))
        return Group(*parts, *aggs)

    def __rich__(self) -> RenderableType:
        """rich calls this on every refresh."""
        return self.render()

    def __enter__(self) -> LiveView:
        """Start drawing (only on a terminal)."""
        if self.enabled:
            self._live = Live(self, console=self.console, refresh_per_second=self._refresh,
                              transient=False, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop drawing, leaving the final state on screen."""
        if self._live is not None:
            self._live.stop()
            self._live = None


def aggregate_lines(aggs: Mapping[str, tuple[AggProgress, ...]], limit: int = AGG_LINES) -> list[str]:
    """One line per aggregate table, folded over the hosts: what the stream counted so far, which hosts
    count it in their kernel (read when their run ends, then counted), which failed."""
    stream: dict[str, list[int]] = {}      # table -> [hits, hosts, largest host table, hosts done]
    kernel_wait: dict[str, int] = {}
    kernel_done: dict[str, list[int]] = {}  # table -> [hits, hosts]
    failed: dict[str, int] = {}
    for progress in aggs.values():
        for p in progress:
            if p.mode == "stream":
                st = stream.setdefault(p.table, [0, 0, 0, 0])
                st[0] += p.hits or 0
                st[1] += 1
                st[2] = max(st[2], p.keys or 0)
                st[3] += p.final
            elif p.mode == "kernel" and not p.final:
                kernel_wait[p.table] = kernel_wait.get(p.table, 0) + 1
            elif p.mode == "kernel":
                kd = kernel_done.setdefault(p.table, [0, 0])
                kd[0] += p.hits or 0
                kd[1] += 1
            else:
                failed[p.table] = failed.get(p.table, 0) + 1
    tables = sorted(set(stream) | set(kernel_wait) | set(kernel_done) | set(failed))
    out = []
    for tid in tables[:limit]:
        parts = []
        if tid in stream:
            hits, n, keys, done = stream[tid]
            parts.append(f"{hits:,}{'' if done == n else ' so far'} from {n} streaming host(s), up to {keys:,} keys each")
        if tid in kernel_done:
            hits, n = kernel_done[tid]
            parts.append(f"{hits:,} in kernel on {n} host(s)")
        if tid in kernel_wait:
            parts.append(f"in kernel on {kernel_wait[tid]} host(s): read at the end")
        if tid in failed:
            parts.append(f"FAILED on {failed[tid]} host(s)")
        out.append(f"aggregate {tid}: " + "; ".join(parts))
    if len(tables) > limit:
        out.append(f"... and {len(tables) - limit} more aggregate tables")
    return out


def _change(host: str, state: str, detail: str) -> str:
    """``host: state (detail)``."""
    return f"{host}: {state}" + (f" ({detail})" if detail else "")
