"""Build FleetReports the way a run does: trace_pipe text through TraceStream into a FleetAggregate.

The lines are this machine's real 6.18 trace_pipe lines (tests/data/trace),
replayed per host with that host's pids, times and clock offset, so every
report here went through the same parser, clock and aggregate as a run.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from fleetprobe.clock import ClockMap
from fleetprobe.merge import FleetAggregate
from fleetprobe.results import FleetReport, RunInfo
from fleetprobe.outcome import HostOutcome
from fleetprobe.parse import TraceStream

REAL = Path(__file__).parent / "data" / "trace" / "x86_64-6.18-this-machine.txt"
NAMES = {"sched_process_exec": "exec", "sched_process_fork": "fork", "rl": "rl", "rlr": "rlr"}
#: The uretprobe on bash readline pairs with its entry probe (latency).
PAIRS = {"rlr": "rl"}
PLAYBOOK_SHA = "ab" * 32
TRACEFS = Path("/sys/kernel/tracing")


def real_lines() -> list[str]:
    """The captured real lines (exec, fork, bash readline entry/return, markers)."""
    return [ln for ln in REAL.read_text().splitlines()
            if "sched_process_" in ln or "fpsync" in ln or " rl: " in ln or " rlr: " in ln]


def host_text(lines: list[str], shift: float, realtime: float) -> str:
    """Real lines with their trace timestamps shifted, preceded by a clock marker at ``realtime``."""
    out = [f"      runner-1     [000] .....   {100.0 + shift:.6f}: tracing_mark_write: fpsync {realtime:.9f}"]
    for ln in lines:
        if "fpsync" in ln:
            continue
        head, sep, rest = ln.partition("]")
        flags, ts, tail = rest.split(None, 2)
        out.append(f"{head}{sep} {flags} {float(ts.rstrip(':')) - 400 + shift:.6f}: {tail}")
    return "\n".join(out) + "\n"


def extra_exec(comm: str, filename: str, ts: float, pid: int = 4242) -> str:
    """One sched_process_exec line in the 6.18 format (as the kernel prints it)."""
    return (f"{comm:>16}-{pid:<7} [001] .....  {ts:11.6f}: sched_process_exec: filename={filename} "
            f"pid={pid} old_pid={pid}\n")


def outcome(host: str, status: str = "ok", offset: float = 0.001, error: float = 0.0005) -> HostOutcome:
    """A host's outcome as orchestrate records it."""
    if status != "ok":
        return HostOutcome(host, status=status, stage="connect" if status == "unreachable" else "probe",
                           reason="connection refused by 127.0.0.1:1" if status == "unreachable" else "EBUSY")
    return HostOutcome(host, stage="done", arch="x86_64", kernel_release="6.18.44", clock_offset=offset,
                       clock_error=error, placed_probes={"exec": "sched/sched_process_exec",
                                                         "fork": "sched/sched_process_fork"}, cleanup="clean")


def build_report(texts: dict[str, str], *, run_id: str = "r1", started: float = 1795655000.0,
                 statuses: dict[str, str] | None = None, offsets: dict[str, float] | None = None,
                 playbook: str = "execaudit") -> FleetReport:
    """A report of hosts whose trace_pipe output is ``texts`` (host -> text); other statuses have no text."""
    agg = FleetAggregate(PAIRS)
    statuses = statuses or {}
    for host in sorted(set(texts) | set(statuses)):
        o = outcome(host, statuses.get(host, "ok"), (offsets or {}).get(host, 0.001))
        if o.status == "ok":
            stream = TraceStream(host, NAMES, aggregate=agg,
                                 clock=ClockMap(offset=o.clock_offset or 0.0, error=o.clock_error or 0.0))
            stream.feed(texts.get(host, "").encode())
            stream.close()
            o.events = stream.stats.events
        agg.add_host(o)
    run = RunInfo(run_id, playbook, f"playbooks/{playbook}.yml", PLAYBOOK_SHA, started, started + 10.0,
                  "inventory.yml", ["fleetprobe", "audit"], "0.1.0")
    return FleetReport(run, agg)


def tracefs_ready() -> bool:
    """This machine's tracefs is mounted (and we are root enough to read it)."""
    return os.access(TRACEFS / "README", os.R_OK)


def leftovers_of(run_ids: list[str]) -> list[str]:
    """This machine's tracefs instances and dynamic events that belong to the given runs.

    Scoped to our run ids: other test runs share this kernel.
    """
    mine = tuple(f"fp_{r}_" for r in run_ids)
    found = [f"instance {p.name}" for p in (TRACEFS / "instances").iterdir() if p.name.startswith(mine)]
    for name in ("kprobe_events", "uprobe_events"):
        path = TRACEFS / name
        if path.exists():
            found += [f"{name}: {ln}" for ln in path.read_text().splitlines() if any(f":{m}" in ln for m in mine)]
    return found


def expand_exec_start(unit: Path, env: dict[str, str], state_dir: Path) -> list[str]:
    """A systemd unit's ExecStart as argv, expanded as systemd does: ${X} one word, $X split on spaces, %S."""
    line = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    words: list[str] = []
    for word in shlex.split(line[len("ExecStart="):].replace("%S", str(state_dir))):
        m = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", word)
        if m and m.group(1):
            words.append(env[m.group(1)])
        elif m:
            words.extend(env.get(m.group(2), "").split())
        else:
            words.append(word)
    return words
