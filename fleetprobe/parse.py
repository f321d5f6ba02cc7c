"""Parse: trace_pipe lines (and kernel-log records) into events, tolerant of every kernel's format."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TraceEvent:
    """One event seen on one host.

    ``time`` is wall-clock seconds since the epoch (the host's trace clock
    converted with a (trace time, realtime) pair taken on the host);
    ``trace_ts`` is the raw trace timestamp.  ``fields`` maps argument names
    to values: ints for numbers (hex or decimal), str for strings.
    ``site`` is ``sym+off/size`` for entry probes, ``caller <- func`` for
    return probes, else empty.
    """

    host: str
    probe: str
    time: float
    trace_ts: float
    cpu: int
    pid: int
    comm: str
    fields: dict[str, int | str] = field(default_factory=dict)
    site: str = ""
