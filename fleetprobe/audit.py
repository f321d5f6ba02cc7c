"""Audit: judge a run by the playbook's rules and by what changed since a baseline run.

Rules come from the playbook: a probe with ``expect: none`` must never fire,
and a probe with ``max_per_host: N`` must not fire more than N times on any
host.  The diff compares two reports of the same playbook: hosts that newly
fail, hosts newly hitting a probe, new values (comms, file names ...), and
hit counts that moved by more than a factor.

Every finding names its host (when it has one) and probe and says what was
seen.  ``fail`` findings fail the audit; ``note`` findings are shown and fail
it only in strict mode.  Audits fail closed: a host that could not be probed,
or where a rule's probe could not be placed, was not audited, and says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fleetprobe.caveats import unattributed_reason
from fleetprobe.merge import COMM_FIELD
from fleetprobe.outcome import HostOutcome
from fleetprobe.results import FleetReport
from fleetprobe.sketches import Value
from fleetprobe.playbook import Playbook

#: Finding kinds and their default severity.
KINDS: dict[str, str] = {
    "expect-none": "fail",       # an expect: none probe fired on a host
    "max-per-host": "fail",      # a probe fired more than max_per_host times on a host
    "rule-unchecked": "fail",    # a rule's probe could not be placed on a host that ran
    "host-not-audited": "fail",  # the host did not finish (unreachable, failed, ...)
    "newly-failing": "fail",     # ... and it was ok in the baseline
    "new-host-hitting": "note",  # a host hit a probe it did not hit in the baseline
    "new-value": "note",         # a comm / string value the baseline never saw
    "count-moved": "note",       # hits on a host moved by more than the threshold factor
    "recovered": "note",         # a host that failed in the baseline is ok now
    "new-host": "note",          # a host not in the baseline
    "gone-host": "note",         # a baseline host not in this run
}
#: New values listed per (probe, field) before "and N more".
NEW_VALUES_SHOWN = 10


@dataclass(frozen=True)
class Thresholds:
    """How big a change must be to count.

    A host's hits of a probe moved when both the larger count is at least
    ``min_count`` and (new+1)/(old+1) is at least ``factor`` (or at most
    1/``factor``).  ``value_fields`` names the fields whose new values are
    reported (None: ``comm`` and every string field; numbers like pids change
    every run and are left out unless named).
    """

    factor: float = 2.0
    min_count: int = 10
    value_fields: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Finding:
    """One thing the audit or diff found."""

    kind: str
    severity: str
    message: str
    host: str | None = None
    probe: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Finding:
        """Inverse of :meth:`to_json`."""
        return cls(str(d["kind"]), str(d["severity"]), str(d["message"]), d.get("host"), d.get("probe"))


def _finding(kind: str, message: str, host: str | None = None, probe: str | None = None) -> Finding:
    """A finding with its kind's default severity."""
    return Finding(kind, KINDS[kind], message, host, probe)


@dataclass
class AuditResult:
    """The verdict on one run: its findings and the baseline it was compared with."""

    run_id: str
    playbook: str
    baseline: str | None
    findings: list[Finding] = field(default_factory=list)
    strict: bool = False

    @property
    def failures(self) -> list[Finding]:
        """Findings that fail the audit (notes too, in strict mode)."""
        return [f for f in self.findings if f.severity == "fail" or self.strict]

    @property
    def passed(self) -> bool:
        """True when nothing fails the audit."""
        return not self.failures

    def failed_hosts(self) -> list[str]:
        """Hosts named by failing findings, sorted."""
        return sorted({f.host for f in self.failures if f.host})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (stored with the run)."""
        return {"run_id": self.run_id, "playbook": self.playbook, "baseline": self.baseline,
                "strict": self.strict, "passed": self.passed,
                "findings": [f.to_json() for f in self.findings]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AuditResult:
        """Inverse of :meth:`to_json`."""
        return cls(str(d["run_id"]), str(d["playbook"]), d.get("baseline"),
                   [Finding.from_json(f) for f in d["findings"]], bool(d.get("strict", False)))


def _examples(report: FleetReport, host: str, probe: str, limit: int = 2) -> str:
    """A few sampled events of ``probe`` on ``host`` as evidence (``comm=modprobe pid=5120 name=...``)."""
    summary = report.aggregate.hosts.get(host)
    if summary is None:
        return ""
    out: list[str] = []
    for ev in summary.sample.first + summary.sample.reservoir:
        if ev.get("probe") != probe:
            continue
        fields = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                          for k, v in dict(ev.get("fields") or {}).items()
                          if not (k in ("pid", "comm") and v == ev.get(k)))
        out.append(f"comm={ev.get('comm')} pid={ev.get('pid')}" + (f" {fields}" if fields else ""))
        if len(out) >= limit:
            break
    return "; ".join(out)


def _times(n: int) -> str:
    """``1 time`` / ``3 times``."""
    return f"{n} time" if n == 1 else f"{n} times"


def check_rules(report: FleetReport, playbook: Playbook) -> list[Finding]:
    """Findings of the playbook's rules (expect: none, max_per_host) on every host that ran."""
    agg = report.aggregate
    out: list[Finding] = []
    for spec in playbook.probes:
        if spec.expect != "none" and spec.max_per_host is None:
            continue
        limit = 0 if spec.expect == "none" else spec.max_per_host
        assert limit is not None
        for host, n in agg.hits(spec.name).items():
            if n <= limit:
                continue
            seen = _examples(report, host, spec.name)
            if spec.expect == "none":
                msg = f"{host}: probe {spec.name!r} fired {_times(n)} (expected none)"
                out.append(_finding("expect-none", msg + (f": {seen}" if seen else ""), host, spec.name))
            else:
                msg = f"{host}: probe {spec.name!r} fired {_times(n)} (at most {limit} allowed per host)"
                out.append(_finding("max-per-host", msg + (f": {seen}" if seen else ""), host, spec.name))
        for o in report.hosts:
            if o.status == "ok" and spec.name in o.skipped_probes:
                out.append(_finding("rule-unchecked", f"{o.host}: probe {spec.name!r} could not be placed, so its "
                                    f"rule was not checked: {o.skipped_probes[spec.name]}", o.host, spec.name))
    return out


def _is_reported_value(field_name: str, value: Value, fields: Sequence[str] | None) -> bool:
    """Whether new values of this field are worth reporting (see :class:`Thresholds`)."""
    if fields is not None:
        return field_name in fields
    return field_name == COMM_FIELD or isinstance(value, str)


def _value_hosts(report: FleetReport, probe: str, field_name: str, value: Value) -> list[str]:
    """Hosts whose sampled events show ``value`` in ``field_name`` (a sample: may miss some)."""
    hosts = []
    for host, summary in sorted(report.aggregate.hosts.items()):
        for ev in summary.sample.first + summary.sample.reservoir:
            if ev.get("probe") != probe:
                continue
            seen = ev.get("comm") if field_name == COMM_FIELD else dict(ev.get("fields") or {}).get(field_name)
            if seen == value:
                hosts.append(host)
                break
    return hosts


def diff_reports(base: FleetReport, new: FleetReport, thresholds: Thresholds | None = None) -> list[Finding]:
    """What changed from ``base`` to ``new``: hosts, hits, values and counts (see :data:`KINDS`)."""
    thr = thresholds or Thresholds()
    old_status = {o.host: o for o in base.hosts}
    new_status = {o.host: o for o in new.hosts}
    out = _host_changes(base, old_status, new_status)
    for probe in new.aggregate.probes():
        out += _hit_changes(base, new, probe, thr, old_status, new_status)
        for name in new.aggregate.fields(probe):
            out += _new_values(base, new, probe, name, thr)
    return out


def _host_changes(base: FleetReport, old_status: dict[str, HostOutcome],
                  new_status: dict[str, HostOutcome]) -> list[Finding]:
    """Hosts new, gone, newly failing or recovered since ``base``."""
    out: list[Finding] = []
    for host, o in new_status.items():
        was = old_status.get(host)
        if was is None:
            out.append(_finding("new-host", f"{host}: not in baseline run {base.run.run_id}", host))
        elif was.status == "ok" and o.status != "ok":
            out.append(_finding("newly-failing", f"{host}: newly {o.status} at {o.stage}"
                                + (f": {o.reason}" if o.reason else "") + f" (ok in run {base.run.run_id})", host))
        elif was.status != "ok" and o.status == "ok":
            out.append(_finding("recovered", f"{host}: ok again (was {was.status} in run {base.run.run_id})", host))
    for host in sorted(set(old_status) - set(new_status)):
        out.append(_finding("gone-host", f"{host}: in baseline run {base.run.run_id} but not in this run", host))
    return out


def _hit_changes(base: FleetReport, new: FleetReport, probe: str, thr: Thresholds,
                 old_status: dict[str, HostOutcome], new_status: dict[str, HostOutcome]) -> list[Finding]:
    """One probe's hits per host: a host hitting that never did, a count that moved past the threshold."""
    out: list[Finding] = []
    before, after = base.aggregate.hits(probe), new.aggregate.hits(probe)
    for host, n in after.items():
        old = before.get(host, 0)
        if old == 0 and host in old_status and old_status[host].status == "ok":
            seen = _examples(new, host, probe)
            out.append(_finding("new-host-hitting", f"{host}: probe {probe!r} fired {_times(n)}, "
                                f"never in baseline run {base.run.run_id}" + (f": {seen}" if seen else ""),
                                host, probe))
    for host in sorted(set(before) | set(after)):
        old, n = before.get(host, 0), after.get(host, 0)
        if old == 0 or host not in new_status or new_status[host].status != "ok":
            continue
        if max(old, n) < thr.min_count:
            continue
        ratio = (n + 1) / (old + 1)
        if ratio >= thr.factor or ratio <= 1 / thr.factor:
            out.append(_finding("count-moved", f"{host}: probe {probe!r} hits moved {old} -> {n} "
                                f"(x{ratio:.1f}; threshold x{thr.factor:g})", host, probe))
    return out


def _new_values(base: FleetReport, new: FleetReport, probe: str, name: str, thr: Thresholds) -> list[Finding]:
    """Values of one probe's field that the baseline did not see (the first NEW_VALUES_SHOWN, then a count)."""
    out: list[Finding] = []
    table = new.aggregate.values[(probe, name)]
    old_table = base.aggregate.values.get((probe, name))
    fresh = []
    for value, count, nhosts in table.top(len(table.counts)):
        if not _is_reported_value(name, value, thr.value_fields):
            continue
        if old_table is not None and (value in old_table.counts or count <= old_table.error):
            # Present before, or it may have been among the values the baseline's bounded table dropped.
            continue
        fresh.append((value, count, nhosts))
    for value, count, nhosts in fresh[:NEW_VALUES_SHOWN]:
        hosts = _value_hosts(new, probe, name, value)
        where = f" on {', '.join(hosts)}" if hosts else f" on {nhosts} host(s)"
        out.append(_finding("new-value", f"probe {probe!r}: new {name} {value!r} ({_times(count)}{where}; "
                            f"not in baseline run {base.run.run_id})",
                            hosts[0] if len(hosts) == 1 else None, probe))
    if len(fresh) > NEW_VALUES_SHOWN:
        out.append(_finding("new-value", f"probe {probe!r}: and {len(fresh) - NEW_VALUES_SHOWN} more new "
                            f"{name} values", None, probe))
    return out


def audit(report: FleetReport, playbook: Playbook, baseline: FleetReport | None,
          thresholds: Thresholds | None = None, *, strict: bool = False) -> AuditResult:
    """The audit verdict: rules, every host that was not audited, and the diff against ``baseline``."""
    findings = check_rules(report, playbook)
    changes = diff_reports(baseline, report, thresholds) if baseline is not None else []
    newly = {f.host for f in changes if f.kind == "newly-failing"}
    for o in report.hosts:
        if o.status != "ok" and o.host not in newly:
            findings.append(_finding("host-not-audited", f"{o.host}: {o.status} at {o.stage}"
                                     + (f": {o.reason}" if o.reason else "") + "; nothing was checked there", o.host))
        elif o.status == "ok" and (why := unattributed_reason(o)):
            # Fail closed: lines nobody could attribute may be a rule's probe firing under another name.
            findings.append(_finding("host-not-audited", f"{o.host}: {why}; its counts cannot be trusted, "
                                     "so nothing was checked there", o.host))
    findings += changes
    order = list(KINDS)
    findings.sort(key=lambda f: (f.severity != "fail", order.index(f.kind), f.host or "", f.probe or ""))
    return AuditResult(report.run.run_id, report.run.playbook,
                       baseline.run.run_id if baseline is not None else None, findings, strict)


#: What a finding of each kind says once for all the hosts it holds for.
_GROUP_SUMMARY = {
    "expect-none": "probe {probe!r} fired (expected none)",
    "max-per-host": "probe {probe!r} fired more often than its max_per_host allows",
    "rule-unchecked": "probe {probe!r} could not be placed, so its rule was not checked",
    "host-not-audited": "the host did not finish; nothing was checked there",
    "newly-failing": "newly failing (ok in the baseline)",
    "new-host-hitting": "probe {probe!r} fired, never in the baseline",
    "count-moved": "probe {probe!r}: hits moved by more than the threshold",
    "recovered": "ok again (failed in the baseline)",
    "new-host": "not in the baseline",
    "gone-host": "in the baseline but not in this run",
}


def group_findings(result: AuditResult) -> list[dict[str, Any]]:
    """Findings grouped: one entry per (kind, probe) with the hosts it holds for and each host's detail.

    A rule broken on 300 hosts is one finding with 300 hosts, not 300 findings; findings that name
    no host (a new value across the fleet) stay one entry each.  Order: failing first, as audit sorts.
    """
    failing = {id(f) for f in result.failures}
    groups: dict[tuple[str, str | None, bool] | int, dict[str, Any]] = {}
    for i, f in enumerate(result.findings):
        fails = id(f) in failing
        key: tuple[str, str | None, bool] | int = (f.kind, f.probe, fails) if f.host else i
        g = groups.get(key)
        if g is None:
            summary = _GROUP_SUMMARY.get(f.kind) if f.host else None
            g = groups[key] = {"kind": f.kind, "severity": f.severity, "fails": fails, "probe": f.probe,
                               "summary": summary.format(probe=f.probe) if summary else f.message,
                               "hosts": [], "details": {}}
        if f.host:
            g["hosts"].append(f.host)
            g["details"][f.host] = f.message
    return list(groups.values())


def rules_json(playbook: Playbook) -> list[dict[str, Any]]:
    """The playbook's audit rules: one entry per probe that has one."""
    out: list[dict[str, Any]] = []
    for p in playbook.probes:
        if p.expect == "none":
            out.append({"probe": p.name, "rule": "expect", "value": "none"})
        if p.max_per_host is not None:
            out.append({"probe": p.name, "rule": "max_per_host", "value": p.max_per_host})
    return out


def audit_json(result: AuditResult, playbook: Playbook | None) -> dict[str, Any]:
    """The verdict for scripts and hooks: verdict, baseline, rules and grouped findings.

    ``rules`` is None when the playbook is not at hand (``show`` of a stored run).
    """
    return {"verdict": "pass" if result.passed else "fail", "passed": result.passed, "run_id": result.run_id,
            "playbook": result.playbook, "baseline": result.baseline, "strict": result.strict,
            "failed_hosts": result.failed_hosts(),
            "rules": rules_json(playbook) if playbook is not None else None,
            "findings": group_findings(result)}


def _logfmt(value: str) -> str:
    """A logfmt value: bare when it is one plain word, else double-quoted with \\ and " escaped."""
    if value and all(c.isalnum() or c in "._-:,/@+" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def result_line(report: FleetReport, result: AuditResult) -> str:
    """The audit in one logfmt line (``key=value ...``), the last line an audit prints: what a journal,
    syslog or cron mail shows, and what ``journalctl -u fleetprobe-audit -g verdict=fail`` finds."""
    ok = sum(1 for o in report.hosts if o.status == "ok")
    fields = {"verdict": "pass" if result.passed else "fail", "playbook": result.playbook, "run": result.run_id,
              "baseline": result.baseline or "none", "hosts": str(len(report.hosts)), "hosts_ok": str(ok),
              "failures": str(len(result.failures)), "notes": str(len(result.findings) - len(result.failures)),
              "failed_hosts": ",".join(result.failed_hosts()) or "none"}
    return "fleetprobe-audit " + " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())
