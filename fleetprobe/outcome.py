"""HostOutcome: what happened on one host in one run, as a value (a failed host is data, not a crash)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """How a host's run ended (a str: equal to its value, written as it in JSON and the store)."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"


class Stage(StrEnum):
    """The last stage a host reached; for a failed host, where it failed."""

    CONNECT = "connect"
    FACTS = "facts"
    PLAN = "plan"
    BUILD = "build"
    PROBE = "probe"
    TEARDOWN = "teardown"
    DONE = "done"


#: Host statuses, in report order.
STATUSES = tuple(Status)


@dataclass
class LossCounters:
    """Events the kernel or fleetprobe could not deliver, as deltas over the run.

    ``overrun`` and ``dropped`` sum per_cpu/cpuN/stats of the run's instance;
    ``lost_lines`` sums ``[LOST n EVENTS]`` lines seen in trace_pipe;
    ``probe_misses`` is the kprobe_profile miss count delta per probe;
    ``kmsg_gaps`` counts kernel-log records lost (sequence gaps);
    ``capped`` counts events discarded after the playbook's event cap;
    ``hist_dropped`` counts events in-kernel aggregation could not count (a hist
    table full: its ``Dropped:``, per-task timestamp tables of latencies included).
    """

    overrun: int = 0
    dropped: int = 0
    lost_lines: int = 0
    probe_misses: dict[str, int] = field(default_factory=dict)
    kmsg_gaps: int = 0
    capped: int = 0
    hist_dropped: int = 0

    @property
    def total(self) -> int:
        return (self.overrun + self.dropped + self.lost_lines + sum(self.probe_misses.values())
                + self.kmsg_gaps + self.capped + self.hist_dropped)

    def merge(self, other: LossCounters) -> LossCounters:
        misses = dict(self.probe_misses)
        for k, v in other.probe_misses.items():
            misses[k] = misses.get(k, 0) + v
        return LossCounters(self.overrun + other.overrun, self.dropped + other.dropped,
                            self.lost_lines + other.lost_lines, misses,
                            self.kmsg_gaps + other.kmsg_gaps, self.capped + other.capped,
                            self.hist_dropped + other.hist_dropped)


@dataclass
class HostOutcome:
    """One host's result in one run.

    ``status`` is a :class:`Status`; ``stage`` the last :class:`Stage` reached and,
    for a failed host, where it failed; ``reason`` says why in one line and ``evidence``
    holds what the host said.  ``cleanup`` says how the host was left: ``clean`` (the
    runner removed everything), ``controller`` (the runner died and the controller's
    teardown over the same connection removed it), ``timer`` or ``timer (...why)`` (left
    to the on-host timer: the link dropped, or the controller's teardown failed),
    ``not-needed`` (nothing was placed), or ``failed: ...`` (what the runner could not remove).  ``unparsed_lines`` counts lines of the runner's stream that were
    neither an event, a marker, a loss line nor a control line (garbage a login
    script or a broken host printed); the events around them still count.  ``clock_offset`` is host realtime minus controller
    realtime in seconds, ``clock_error`` its uncertainty (half the round trip).
    """

    host: str
    status: str = Status.OK
    stage: str = Stage.CONNECT
    reason: str = ""
    evidence: str = ""
    arch: str = ""
    kernel_release: str = ""
    boot_id: str = ""
    events: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    loss: LossCounters = field(default_factory=LossCounters)
    skipped_probes: dict[str, str] = field(default_factory=dict)
    placed_probes: dict[str, str] = field(default_factory=dict)
    clock_offset: float | None = None
    clock_error: float | None = None
    started: float = 0.0
    ended: float = 0.0
    cleanup: str = "not-needed"
    #: Kernel oopses and WARNs counted while the run was on the host (/sys/kernel/oops_count,
    #: warn_count deltas; -1 when the kernel does not count them).
    kernel_oopses: int = 0
    kernel_warnings: int = 0
    #: Things an operator must hear about even when the host is "ok" (an oops during the run ...).
    alerts: list[str] = field(default_factory=list)
    unparsed_lines: int = 0
    #: Events whose text went on over several lines (a newline in a string the kernel printed raw:
    #: a file name a user chose); each is one event, its text with the newlines escaped.
    multiline_events: int = 0
    #: Seconds between the runner's "started" and "stopping" (controller clock): the window probed.
    probed_seconds: float | None = None
    #: Lines dropped unread for their length (parse.MAX_LINE_BYTES).
    overlong_lines: int = 0
    #: Event lines of the run's own instance that are no probe's (printed under a name the plan did
    #: not expect): counted, by printed name, with a few examples. Such a host is not audited.
    unattributed_lines: int = 0
    unattributed: dict[str, int] = field(default_factory=dict)
    unattributed_examples: list[str] = field(default_factory=list)
    #: fleetprobe's own processes on the host, kept out of the events (in the kernel by a
    #: ``common_pid`` filter; where the kernel refused it, ``own_unfiltered`` names the events and
    #: ``own_events`` counts what the controller dropped instead).
    own_pids: list[int] = field(default_factory=list)
    own_unfiltered: dict[str, str] = field(default_factory=dict)
    own_events: int = 0
    #: How each placed tracefs probe's lines are framed against a user's text (plan.PlannedProbe.framing).
    framing: dict[str, str] = field(default_factory=dict)
    #: Why a user on this host could have forged events in its stream ('' when no one could):
    #: then ``unverified_events`` counts this host's events, none of which is proven the kernel's.
    forgeable: str = ""
    unverified_events: int = 0
    #: Events the newline guards kept out of the stream (a string or the comm held a newline: a user
    #: who tried to forge lines, or a very odd name), as the kernel counted them; not in ``events``.
    guarded_out: int = 0
    #: Why some guarded-out events could not be counted (then ``guarded_out`` is a lower bound).
    guard_uncounted: list[str] = field(default_factory=list)
    #: ``guarded_out`` by probe: {probe: events its guard kept out}, for every guarded probe counted.
    guarded_out_by_probe: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostOutcome:
        """Inverse of :meth:`to_json`."""
        d = dict(data)
        d["loss"] = LossCounters(**d.get("loss", {}))
        d["alerts"] = list(d.get("alerts", []))
        return cls(**d)
