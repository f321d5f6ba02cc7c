"""The "N probes live on M hosts" line (issue 14 item 3): an Observer around the live view."""

from __future__ import annotations

import sys

from fleetprobe.aggtables import AggProgress
from fleetprobe.render.live import LiveView


class LiveLine:
    """An Observer: "N probes live on M hosts" on stderr once every host has its probes in place or ended.

    bpftrace says ``Attaching N probes...``: a user needs to know when to start the workload, and
    a script piping stdout must still see it (stderr).  Wraps the live view when there is one.
    """

    #: States after which a host will place no probe.
    ENDED = frozenset({"done", "skipped", "failed", "unreachable", "interrupted"})

    def __init__(self, hosts: list[str], inner: LiveView | None = None) -> None:
        """Watch ``hosts``; pass states and counts on to ``inner``."""
        self.hosts = set(hosts)
        self.inner = inner
        self.live: dict[str, int] = {}
        self.ended: set[str] = set()
        self.said = False

    def set_state(self, host: str, state: str, detail: str = "") -> None:
        """A host's state changed."""
        if self.inner is not None:
            self.inner.set_state(host, state, detail)
        if state in self.ENDED and host not in self.live:
            self.ended.add(host)
            self._maybe_say()

    def add_events(self, host: str, n: int) -> None:
        """Events arrived (the live view counts them)."""
        if self.inner is not None:
            self.inner.add_events(host, n)

    def set_aggregates(self, host: str, progress: tuple[AggProgress, ...]) -> None:
        """A host's aggregate tables so far (the live view shows them)."""
        if self.inner is not None:
            self.inner.set_aggregates(host, progress)

    def probes_live(self, host: str, n: int) -> None:
        """The runner on ``host`` placed its ``n`` probes."""
        self.live[host] = n
        self._maybe_say()

    def _maybe_say(self) -> None:
        """Say it once, when no host is still setting up."""
        if self.said or not self.live or len(self.live) + len(self.ended - set(self.live)) < len(self.hosts):
            return
        self.said = True
        n = sum(self.live.values())
        rest = len(self.hosts) - len(self.live)
        print(f"{n} probe{'s' if n != 1 else ''} live on {len(self.live)} host{'s' if len(self.live) != 1 else ''}"
              + (f" ({rest} host{'s' if rest != 1 else ''} not probing)" if rest else "")
              + "; Ctrl-C to stop", file=sys.stderr, flush=True)
