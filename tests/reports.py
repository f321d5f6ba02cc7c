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
from fleetprobe.aggstream import StreamTables
from fleetprobe.aggtables import AggResults, AggTable, HostTable
from fleetprobe.histplan import AggPlan, KeySpec, TablePlan, Trigger
from fleetprobe.histread import host_tables
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


HIST = Path(__file__).parent / "data" / "hist"
AGG_HOSTILE = ["<script>alert(1)</script>", "a|b|c", "`tick`", "**bold**_x_", "[x](javascript:alert(1))",
               "\x1b]52;c;aGk=\x07osc", "evil\nnext", "\u202etxt.exe", "[/]", "# head", "back\\|slash", "<...>"]
AGG_REFUSAL = "trigger refused: Invalid argument\x1b[2J<img src=x onerror=alert(2)>"
AGG_LINE = "hist:keys=path:vals=hitcount:sort=hitcount.descending:size=2048"
_KERNEL = AggPlan("st", (TablePlan(AggTable("st", "count", "path"), "kernel"),), (),
                  (Trigger("fpexp/st", AGG_LINE, "st:count:path", (KeySpec("path", "string"),)),))
_STREAM = (AggPlan("ex", (TablePlan(AggTable("ex", "count", "comm"), "stream", "no hist triggers on this kernel"),)),
           AggPlan("sig", (TablePlan(AggTable("sig", "histogram", "sig", ("comm",)), "stream", "no hist triggers"),)),
           AggPlan("ret", (TablePlan(AggTable("ret", "latency", "ns", ("comm",)), "stream", "no hist triggers",
                                     source_probe="ent"),)))


def _hist_lines(name: str) -> list[str]:
    return (HIST / f"x86_64-6.1-{name}.hist").read_text().split("\n")


def agg_report() -> FleetReport:
    """aggregate: tables made the way a run makes them (fleetprobe.histread.host_tables), every mode and note in them.

    Kernel hosts from real hist files of the lab's 6.1 guest (tests/data/hist: paths chosen
    to look like hist syntax, a full table with Dropped), a host whose kernel refused the
    trigger with a hostile message, and a streaming host whose comm values are hostile
    (HTML, Markdown, rich markup, an OSC 52 clipboard write, a newline, a bidi override, the
    kernel's ``<...>``) and whose stream the event cap cut; a table pruned to its error bound.
    """
    results = AggResults()
    for host, hist, refused in (("k1", "c-hostile-paths", {}), ("k2", "b-fpexp-st", {}),
                                ("f1", None, {("fpexp/st", AGG_LINE): AGG_REFUSAL})):
        texts = {"fpexp/st": _hist_lines(hist)} if hist else {}
        for tid, part, table in host_tables((_KERNEL,), texts, refused, {}, None, 0):
            results.add_host(host, tid, part, table)
    st = StreamTables(_STREAM)
    for i, comm in enumerate(AGG_HOSTILE):
        for _ in range(i + 1):
            st.add_row("ex", 1.0, 100 + i, comm, "filename=/bin/true pid=1 old_pid=1")
            st.add_row("sig", 1.0, 100 + i, comm, "sig=18 errno=0 code=0 pid=2 grp=1 res=0")
            st.add_row("ent", 2.0, 100 + i, comm, "")
            st.add_row("ret", 2.0 + 1e-6 * (i + 1), 100 + i, comm, "")
    for tid, part, table in host_tables(_STREAM, {}, {}, {}, st, 3):
        results.add_host("s1", tid, part, table)
    # A table pruned to 4 keys: its counts may be low by the Misra-Gries bound, said in its heading.
    pruned = AggTable("pr", "count", "x", cap=4)
    for v in range(10):
        pruned.add((f"v{v}",), 10 - v)
    results.add_host("s1", pruned.table_id, HostTable("stream", "no hist triggers", hits=55, entries=5), pruned)
    agg = FleetAggregate()
    agg.aggregates = results
    hosts = [HostOutcome(h, stage="done", hits={"st": 5} if h.startswith("k") else {}) for h in ("k1", "k2", "f1", "s1")]
    return FleetReport(RunInfo("aggr01", "aggs", started=1000.0, ended=1010.0), agg, hosts)
