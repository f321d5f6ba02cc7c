"""``audit --prometheus FILE``: the run and its verdict as a node_exporter textfile (``*.prom``).

node_exporter's textfile collector reads every ``*.prom`` file of its directory at each scrape:
a cron or systemd timer audit writes ``/var/lib/prometheus/node-exporter/fleetprobe-PLAYBOOK.prom``
and alerting works from there (``fleetprobe_audit_passed == 0``, ``fleetprobe_host_up == 0``,
``increase(fleetprobe_host_lost_events[1h]) > 0``).

Per run: the verdict, when it ran, how long it took; per host: up (probed ok), failing findings,
events lost; per host and probe: hits and probe misses.  Every series carries ``playbook`` (one
file per playbook, so several audits can share a directory).  Label values are escaped as the
exposition format says (``\\``, ``"``, newline); metric and label names are fixed here.

The file is written whole and renamed into place (a scrape never reads half of it) with mode 0644:
node_exporter runs as its own user, and the file holds only names and counts, no event text.
"""

from __future__ import annotations

import os

from fleetprobe.audit import AuditResult
from fleetprobe.outfiles import write_text_atomic
from fleetprobe.results import FleetReport

#: Mode of the textfile: readable by node_exporter's user.
TEXTFILE_MODE = 0o644

_HELP = {
    "fleetprobe_audit_passed": ("gauge", "1 when the last audit of the playbook passed, 0 when it failed"),
    "fleetprobe_audit_timestamp_seconds": ("gauge", "when the audited run ended (Unix time)"),
    "fleetprobe_audit_duration_seconds": ("gauge", "how long the audited run took"),
    "fleetprobe_audit_failures": ("gauge", "findings that fail the audit (grouped per host below)"),
    "fleetprobe_host_up": ("gauge", "1 when the host was probed to the end (status ok), else 0"),
    "fleetprobe_host_audit_failures": ("gauge", "failing findings that name this host"),
    "fleetprobe_host_lost_events": ("gauge", "events the kernel or fleetprobe could not deliver in the run"),
    "fleetprobe_host_events": ("gauge", "events seen on the host in the run"),
    "fleetprobe_probe_hits": ("gauge", "events of the probe on the host in the run"),
    "fleetprobe_probe_misses": ("gauge", "kprobe misses of the probe on the host in the run (kprobe_profile)"),
}


def _label(value: str) -> str:
    """A label value as the text exposition format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _series(name: str, labels: dict[str, str], value: float) -> str:
    """One sample line; a float as repr (exact: a timestamp keeps its digits)."""
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value!r}"


def render_textfile(report: FleetReport, result: AuditResult) -> str:
    """The textfile for one audited run."""
    pb = {"playbook": report.run.playbook}
    lines: dict[str, list[str]] = {name: [] for name in _HELP}
    lines["fleetprobe_audit_passed"].append(_series("fleetprobe_audit_passed", pb, int(result.passed)))
    lines["fleetprobe_audit_timestamp_seconds"].append(
        _series("fleetprobe_audit_timestamp_seconds", pb, round(report.run.ended, 3)))
    lines["fleetprobe_audit_duration_seconds"].append(
        _series("fleetprobe_audit_duration_seconds", pb, round(report.run.duration, 3)))
    lines["fleetprobe_audit_failures"].append(_series("fleetprobe_audit_failures", pb, len(result.failures)))
    failing: dict[str, int] = {}
    for f in result.failures:
        if f.host:
            failing[f.host] = failing.get(f.host, 0) + 1
    for o in report.hosts:
        h = {**pb, "host": o.host}
        lines["fleetprobe_host_up"].append(_series("fleetprobe_host_up", h, int(o.status == "ok")))
        lines["fleetprobe_host_audit_failures"].append(
            _series("fleetprobe_host_audit_failures", h, failing.get(o.host, 0)))
        lines["fleetprobe_host_lost_events"].append(_series("fleetprobe_host_lost_events", h, o.loss.total))
        lines["fleetprobe_host_events"].append(_series("fleetprobe_host_events", h, o.events))
        # Every placed probe, with 0 when it saw nothing (an alert on "expect: none" needs the zero too).
        for probe in sorted(set(o.placed_probes) | set(o.hits)):
            lines["fleetprobe_probe_hits"].append(
                _series("fleetprobe_probe_hits", {**h, "probe": probe}, o.hits.get(probe, 0)))
        for probe, misses in sorted(o.loss.probe_misses.items()):
            lines["fleetprobe_probe_misses"].append(
                _series("fleetprobe_probe_misses", {**h, "probe": probe}, misses))
    out: list[str] = []
    for name, (kind, text) in _HELP.items():
        if lines[name]:
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *lines[name]]
    return "\n".join(out) + "\n"


def write_textfile(report: FleetReport, result: AuditResult, path: str | os.PathLike[str]) -> None:
    """Write the textfile atomically (``-``: stdout)."""
    write_text_atomic(path, render_textfile(report, result), mode=TEXTFILE_MODE)
