"""Ingest: one host's parsed events -> the event cap -> the fleet aggregate and the raw-event file."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from fleetprobe.parse import EventBatch, LineSink


class _HostCap:
    """Counts one host's events per probe and enforces the playbook's event cap.

    Sits between the stream and the fleet aggregate (the hot path: batches of
    rows per chunk), so an event over the cap is counted as ``capped`` and
    neither aggregated nor written.
    """

    __slots__ = ("aggregate", "cap", "accepted", "capped", "counts", "written")

    def __init__(self, aggregate: LineSink, cap: int) -> None:
        self.aggregate = aggregate
        self.cap = cap
        self.accepted = 0
        self.capped = 0
        self.counts: Counter[str] = Counter()
        self.written = 0

    def add_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Count and forward a batch, cut at the cap."""
        room = max(self.cap - self.accepted, 0)
        if len(batch) > room:
            self.capped += len(batch) - room
            batch = batch.head(room)
        if not len(batch):
            return
        self.accepted += len(batch)
        for name, n in batch.counts.items():
            self.counts[probes[name]] += n
        add_batch = getattr(self.aggregate, "add_batch", None)
        if add_batch is not None:
            add_batch(host, batch, probes)
        else:
            for event in batch.events(probes):
                self.aggregate.add_line(host, *event)

    def add_line(self, host: str, probe: str, trace_ts: float, time: float, cpu: int, pid: int,
                 comm: str, args: str) -> None:
        """Count and forward one event unless the cap is reached."""
        if self.accepted >= self.cap:
            self.capped += 1
            return
        self.accepted += 1
        self.counts[probe] += 1
        self.aggregate.add_line(host, probe, trace_ts, time, cpu, pid, comm, args)

    def keep_for_writer(self) -> bool:
        """Whether the raw-event writer may write the next event (the same first ``cap`` events)."""
        if self.written >= self.cap:
            return False
        self.written += 1
        return True

    def take_for_writer(self, n: int) -> int:
        """How many of the next ``n`` events the writer may write (keep_for_writer for a whole batch)."""
        k = min(n, max(self.cap - self.written, 0))
        self.written += k
        return k
