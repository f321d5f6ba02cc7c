"""Caveats: what a report must say next to its numbers so that none of them is a silent zero.

Every renderer (terminal, HTML, Markdown) shows the same sentences, made here
from the host outcomes alone (issue 9): lines of a run's own instance that no
probe could claim, events of fleetprobe's own processes that were left out,
and probes that were skipped (a skipped probe is "skipped", never "0 hits").
"""

from __future__ import annotations

from collections.abc import Iterable

from fleetprobe.outcome import HostOutcome

#: What a hits cell says for a probe that was not placed on that host.
SKIPPED = "skipped"


def unattributed_reason(o: HostOutcome) -> str:
    """Why a host's event counts are incomplete ('' when every line of its stream was attributed)."""
    parts = []
    if o.unattributed_lines:
        names = ", ".join(f"{k!r} x{v}" for k, v in sorted(o.unattributed.items(), key=lambda kv: -kv[1])[:3])
        parts.append(f"{o.unattributed_lines} event line(s) of the run's instance matched no probe"
                     + (f" ({names})" if names else ""))
    if o.unparsed_lines:
        parts.append(f"{o.unparsed_lines} line(s) of its stream could not be parsed")
    return "; ".join(parts)


def host_caveats(o: HostOutcome) -> list[str]:
    """Sentences about one host's numbers: what was not attributed, what of fleetprobe's own was left out."""
    out = []
    why = unattributed_reason(o)
    if why:
        example = (o.unattributed_examples or [""])[0]
        out.append(why + (f", e.g. {example.strip()!r}" if example else ""))
    if o.forgeable:
        out.append(f"{o.unverified_events} event(s) unverified: {o.forgeable}")
    if o.guarded_out or o.guard_uncounted:
        by_probe = ", ".join(f"{probe} {n}" for probe, n in sorted(o.guarded_out_by_probe.items()) if n)
        out.append(f"{o.guarded_out} event(s) kept out by the newline guard"
                   + (f" ({by_probe})" if by_probe else "")
                   + ": a string or the process name held a newline (a user forging trace lines, or an odd name)"
                   + (f"; not all counted ({'; '.join(o.guard_uncounted)})" if o.guard_uncounted else ""))
    if o.own_events:
        out.append(f"{o.own_events} event(s) from fleetprobe's own processes left out")
    if o.own_unfiltered:
        out.append("the kernel would not filter fleetprobe's own processes out of "
                   + ", ".join(sorted(o.own_unfiltered)) + ": the controller dropped them instead")
    return out


def fleet_caveats(hosts: Iterable[HostOutcome]) -> list[tuple[str, str]]:
    """(host, sentence) for every host with a caveat, in report order."""
    return [(o.host, text) for o in hosts for text in host_caveats(o)]


def own_filter_summary(hosts: Iterable[HostOutcome]) -> str:
    """One line on how fleetprobe kept itself out of the events ('' when no host said)."""
    hosts = list(hosts)
    filtered = [o for o in hosts if o.own_pids]
    if not filtered:
        return ""
    dropped = sum(o.own_events for o in hosts)
    text = (f"fleetprobe's own processes were filtered out in the kernel on {len(filtered)} host(s)"
            + (f"; {dropped} event(s) from them left out on the controller" if dropped else ""))
    return text


def hit_text(o: HostOutcome | None, probe: str, hits: int) -> str:
    """A hits cell: the count, or ``skipped`` where the probe was not placed and nothing was counted."""
    if not hits and o is not None and probe in o.skipped_probes:
        return SKIPPED
    return str(hits)


def skipped_on(hosts: Iterable[HostOutcome], probe: str) -> list[tuple[str, str]]:
    """(host, reason) for each host where ``probe`` was skipped."""
    return [(o.host, o.skipped_probes[probe]) for o in hosts if probe in o.skipped_probes]
