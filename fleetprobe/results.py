"""Results: a run's report value (:class:`RunInfo` + :class:`FleetReport`) and its JSON file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from fleetprobe.errors import InputError
from fleetprobe.merge import FleetAggregate
from fleetprobe.outcome import HostOutcome
from fleetprobe.outfiles import write_atomic

SCHEMA_VERSION = 1


@dataclass
class RunInfo:
    """What was run, when and how: enough to reproduce or audit a report."""

    run_id: str
    playbook: str
    playbook_path: str = ""
    playbook_sha256: str = ""
    started: float = 0.0
    ended: float = 0.0
    inventory: str = ""
    argv: list[str] = field(default_factory=list)
    version: str = ""
    shards: list[str] = field(default_factory=list)
    #: --events: the events on disk, and why the file stopped short of the run ("" = it did not).
    events_written: int | None = None
    events_truncated: str = ""

    @property
    def duration(self) -> float:
        """Seconds from start to end."""
        return max(0.0, self.ended - self.started)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"run_id": self.run_id, "playbook": self.playbook, "playbook_path": self.playbook_path,
                "playbook_sha256": self.playbook_sha256, "started": self.started, "ended": self.ended,
                "duration": self.duration, "inventory": self.inventory, "argv": list(self.argv),
                "version": self.version, "shards": list(self.shards), "events_written": self.events_written,
                "events_truncated": self.events_truncated}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunInfo:
        """Inverse of :meth:`to_json`."""
        keys = ("run_id", "playbook", "playbook_path", "playbook_sha256", "started", "ended",
                "inventory", "argv", "version", "shards", "events_written", "events_truncated")
        return cls(**{k: d[k] for k in keys if k in d})


@dataclass
class FleetReport:
    """A run's report: what ran, what every host did, and what the fleet saw."""

    run: RunInfo
    aggregate: FleetAggregate
    hosts: list[HostOutcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Give the aggregate every outcome it has not seen; ``hosts`` lists them all, by name."""
        for o in self.hosts:
            if o.host not in self.aggregate.outcomes:
                self.aggregate.add_host(o)
        self.hosts = [self.aggregate.outcomes[h] for h in sorted(self.aggregate.outcomes)]

    def merge(self, other: FleetReport) -> FleetReport:
        """The report of both shards: one run spanning both host sets.

        The merged run keeps the first shard's id/playbook, spans both time
        ranges, and lists the shard run ids.  Shards of different playbooks
        (by sha256) are refused.
        """
        a, b = self.run, other.run
        if a.playbook_sha256 and b.playbook_sha256 and a.playbook_sha256 != b.playbook_sha256:
            raise InputError(f"reports ran different playbooks ({a.playbook} {a.playbook_sha256[:12]} vs "
                             f"{b.playbook} {b.playbook_sha256[:12]})", hint="merge shards of one playbook")
        first, second = (a, b) if (a.started, a.run_id) <= (b.started, b.run_id) else (b, a)
        shards = sorted(set(first.shards or [first.run_id]) | set(second.shards or [second.run_id]))
        run = RunInfo(first.run_id, first.playbook, first.playbook_path, first.playbook_sha256,
                      min(a.started, b.started), max(a.ended, b.ended), first.inventory,
                      list(first.argv), first.version, shards if len(shards) > 1 else [])
        return FleetReport(run, self.aggregate.merge(other.aggregate))

    def to_json(self) -> dict[str, Any]:
        """The report as written by ``--json`` (validates against data/report.schema.json)."""
        agg = self.aggregate.to_json()
        outcomes = agg.pop("outcomes")
        return {"schema": SCHEMA_VERSION, "run": self.run.to_json(),
                "hosts": [outcomes[o.host] for o in self.hosts], "aggregate": agg}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FleetReport:
        """Inverse of :meth:`to_json`; refuses a report written by a newer fleetprobe."""
        if int(d.get("schema", 0)) > SCHEMA_VERSION:
            raise InputError(f"report schema {d.get('schema')} is newer than this fleetprobe's "
                             f"({SCHEMA_VERSION})", hint="upgrade fleetprobe to read it")
        agg_d = dict(d["aggregate"])
        agg_d["outcomes"] = {o["host"]: o for o in d["hosts"]}
        return cls(RunInfo.from_json(d["run"]), FleetAggregate.from_json(agg_d))



def write_json(report: FleetReport, path: str | os.PathLike[str]) -> None:
    """Write the report as JSON atomically (a reader never sees half a file), mode 0600 (``-``: stdout)."""
    def write(f: IO[str]) -> None:
        json.dump(report.to_json(), f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")

    write_atomic(path, write)


def load_json(path: str | os.PathLike[str]) -> FleetReport:
    """Read a report written by :func:`write_json`."""
    with open(path, encoding="utf-8") as f:
        data: Any = json.load(f)
    return FleetReport.from_json(data)
