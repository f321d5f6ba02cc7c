"""Plan: pure functions of (playbook, facts) that decide exactly what to write on each host.

Nothing here touches a host.  ``fleetprobe plan`` prints these plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PlannedProbe:
    """One probe as it will be placed on one host.

    ``event`` is the path under the instance's ``events/`` directory
    (``fp_k3x9q2_a1b2/openat`` for a dynamic event, ``sched/sched_process_exec``
    for a tracepoint).  ``definition`` is the exact line appended to
    ``events_file`` (``kprobe_events`` or ``uprobe_events``); None for tracepoints.
    ``trace_name`` is the event name as it appears in trace_pipe lines.
    ``pair_with`` names the entry probe a return probe pairs with, for latency.
    """

    name: str
    kind: str
    event: str
    trace_name: str
    definition: str | None = None
    events_file: str | None = None
    filter: str | None = None
    symbol: str | None = None
    fields: tuple[str, ...] = ()
    pair_with: str | None = None


@dataclass(frozen=True)
class SkippedProbe:
    """A probe not placed on a host, and why (e.g. no alternative symbol is probeable)."""

    name: str
    reason: str


@dataclass(frozen=True)
class HostPlan:
    """Everything one host will do in one run.

    ``group`` is the tracefs group owning this run's dynamic events on this host
    and ``instance`` the tracefs instance (private ring buffer) they are enabled in;
    both carry the run id and a per-host part so they never collide.
    ``failed`` is set when a probe with ``on_missing: fail`` cannot be placed:
    the host is then not probed at all.
    """

    host: str
    run_id: str
    group: str
    instance: str
    probes: tuple[PlannedProbe, ...] = ()
    skipped: tuple[SkippedProbe, ...] = ()
    failed: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
