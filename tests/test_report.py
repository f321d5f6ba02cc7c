"""report and live view: rendered text, JSON against the schema, raw event lines."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fleetprobe.render.safe import SafeConsole

from fleetprobe.merge import FleetAggregate
from fleetprobe.results import FleetReport, RunInfo
from fleetprobe.outcome import HostOutcome, LossCounters
from fleetprobe.parse import TraceStream
from fleetprobe.traceline import TraceEvent
from fleetprobe.events import EventWriter
from fleetprobe.render.terminal import format_ns, render_summary
from fleetprobe.results import load_json, write_json
from fleetprobe.render.live import LiveView

DATA = Path(__file__).parent / "data" / "trace"
SCHEMA = Path(__file__).parent.parent / "fleetprobe" / "data" / "report.schema.json"
NAMES = {"sched_process_exec": "exec", "sched_process_fork": "fork", "rl": "readline", "rlr": "readline_ret"}
PAIRS = {"readline_ret": "readline"}


def _real_report(extra_hosts: int = 0) -> FleetReport:
    """A report built from the real captured 6.18 lines on two hosts, plus failed/quiet/skipped hosts."""
    agg = FleetAggregate(PAIRS)
    for host, name in (("web-1", "x86_64-6.18-this-machine.txt"), ("web-2", "x86_64-6.18-irqinfo-off-tgid.txt")):
        s = TraceStream(host, NAMES, aggregate=agg)
        s.feed((DATA / name).read_bytes())
        s.close()
        agg.add_host(HostOutcome(host, stage="done", arch="x86_64", kernel_release="6.18.44",
                                 placed_probes={p: p for p in NAMES.values()},
                                 loss=LossCounters(overrun=5, lost_lines=2, probe_misses={"readline": 1}),
                                 clock_offset=0.0123, clock_error=0.0004, cleanup="clean"))
    hosts = [HostOutcome("db-9", status="failed", stage="probe", arch="ppc64le", kernel_release="6.1.0-50",
                         reason="write to kprobe_events failed: Invalid probed address or symbol",
                         cleanup="clean"),
             HostOutcome("old-1", stage="done", arch="mips", kernel_release="4.19.0",
                         skipped_probes={"readline": "/bin/bash not found", "readline_ret": "/bin/bash not found"},
                         placed_probes={"exec": "sched/sched_process_exec"}),
             HostOutcome("gone", status="unreachable", stage="connect", reason="connection refused")]
    hosts += [HostOutcome(f"n{i:04d}", stage="done") for i in range(extra_hosts)]
    run = RunInfo("k3x9q2", "exec-and-readline", "playbooks/x.yaml", "0" * 64, 1000.0, 1012.5,
                  "inventory.yaml", ["fleetprobe", "run", "x.yaml"], "0.1.0")
    return FleetReport(run, agg, hosts)


def _text(report: FleetReport, width: int = 140) -> str:
    """render_summary into a recording console, as plain text."""
    console = SafeConsole(record=True, width=width, file=io.StringIO(), color_system=None)
    render_summary(report, console)
    return console.export_text()


def test_summary_small_fleet() -> None:
    """Status, matrix, top values, latency bars, quiet hosts, loss and clocks all appear."""
    text = _text(_real_report())
    assert "fleetprobe run k3x9q2: exec-and-readline on 5 host(s), 12.5s" in text
    assert "1 failed" in text and "3 ok" in text and "1 unreachable" in text
    assert "db-9" in text and "Invalid probed address or symbol" in text and "probe" in text
    # Matrix: a column per host, a row per probe with per-host numbers from the real lines.
    matrix = [ln for ln in text.splitlines() if ln.strip().startswith("│ fork") or " fork " in ln]
    assert matrix, text
    assert "web-1" in text and "web-2" in text
    assert "exec: top values" in text
    assert any(ln.split("│")[1:4] == [" filename ", " /bin/true     ", "     8 "] for ln in text.splitlines()), text
    assert any("my worker x" in ln and "│     4 │     2 │" in ln for ln in text.splitlines()), text
    # Fields with more values than the terminal shows say how many more.
    assert "old_pid: 12 more values" in text
    assert "latency readline -> readline_ret: 6 calls" in text
    assert "|#" in text
    assert "gone: unreachable at connect: connection refused" in text
    assert "probe readline skipped on old-1: /bin/bash not found" in text
    assert "events lost" in text and "overrun" in text
    assert "web-1: +12.3 ms +/- 0.4 ms" in text


def test_summary_big_fleet_is_summarised() -> None:
    """2000 hosts: no 2000-column matrix; totals, top hosts and 'N more'."""
    text = _text(_real_report(extra_hosts=2000))
    assert "hits per probe" in text and "hits per probe and host" not in text
    assert "2/2003" in text
    assert "more" in text
    assert len(text.splitlines()) < 200
    assert "n1999" not in text or "more" in text


def _validate(instance: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$") -> list[str]:
    """A small JSON Schema (2020-12) validator for the keywords report.schema.json uses."""
    errors: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        errors += _validate(instance, root["$defs"][ref.split("/")[-1]], root, path)
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        py: dict[str, type] = {"object": dict, "array": list, "string": str, "null": type(None),
                               "boolean": bool}

        def ok(name: str) -> bool:
            """Whether instance has JSON type ``name``."""
            if name == "integer":
                return isinstance(instance, int) and not isinstance(instance, bool)
            if name == "number":
                return isinstance(instance, int | float) and not isinstance(instance, bool)
            return isinstance(instance, py[name])
        if not any(ok(n) for n in names):
            return errors + [f"{path}: {instance!r} is not {types}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "minimum" in schema and isinstance(instance, int | float) and instance < schema["minimum"]:
        errors.append(f"{path}: {instance} < {schema['minimum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing {key}")
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errors += _validate(value, props[key], root, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _validate(value, schema["additionalProperties"], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: {key} is not in the schema")
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            errors.append(f"{path}: {len(instance)} items < {schema['minItems']}")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            errors.append(f"{path}: {len(instance)} items > {schema['maxItems']}")
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(instance):
            if i < len(prefix):
                errors += _validate(item, prefix[i], root, f"{path}[{i}]")
            elif "items" in schema:
                errors += _validate(item, schema["items"], root, f"{path}[{i}]")
    return errors


def test_validator_catches_errors() -> None:
    """The test's validator is not a rubber stamp."""
    schema = json.loads(SCHEMA.read_text())
    data = _real_report().to_json()
    data["hosts"][0]["status"] = "weird"
    del data["hosts"][1]["arch"]
    data["aggregate"]["values"][0]["error"] = -1
    errors = _validate(data, schema, schema)
    assert any("weird" in e for e in errors)
    assert any("missing arch" in e for e in errors)
    assert any("< 0" in e for e in errors)


def test_written_report_validates_and_round_trips(tmp_path: Path) -> None:
    """write_json output (from real lines) validates against the schema and loads back equal."""
    report = _real_report()
    path = tmp_path / "report.json"
    write_json(report, path)
    data = json.loads(path.read_text())
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert _validate(data, schema, schema) == []
    assert {h["host"]: h["status"] for h in data["hosts"]}["db-9"] == "failed"
    web1 = next(h for h in data["hosts"] if h["host"] == "web-1")
    assert web1["arch"] == "x86_64" and web1["kernel_release"] == "6.18.44" and web1["loss"]["overrun"] == 5
    assert data["aggregate"]["hosts"]["web-1"]["hits"]["fork"] > 0
    assert load_json(path).to_json() == report.to_json()
    assert list(tmp_path.iterdir()) == [path]


def test_report_with_aggregates_validates_and_round_trips(tmp_path: Path) -> None:
    """aggregate: tables (kernel, stream, failed; hostile keys, <...>, a pruned table) as written: valid, and equal
    when loaded back; the validator catches a wrong unknown_comm, a field the schema lacks, a row of 4."""
    from reports import agg_report

    report = agg_report()
    path = tmp_path / "report.json"
    write_json(report, path)
    data = json.loads(path.read_text())
    schema = json.loads(SCHEMA.read_text())
    assert _validate(data, schema, schema) == []
    aggs = data["aggregate"]["aggregates"]
    tables = {f"{t['probe']}:{t['kind']}:{t['field']}": t for t in aggs["tables"]}
    assert tables["ex:count:comm"]["unknown_comm"] == 12 and tables["st:count:path"]["unknown_comm"] == 0
    assert {h: p["st:count:path"]["mode"] for h, p in aggs["hosts"].items() if "st:count:path" in p} == {
        "k1": "kernel", "k2": "kernel", "f1": "failed"}
    assert load_json(path).aggregate.aggregates == report.aggregate.aggregates
    bad = json.loads(path.read_text())
    first = bad["aggregate"]["aggregates"]["tables"][0]
    del first["unknown_comm"]
    first["rows"][0].append(1)
    bad["aggregate"]["aggregates"]["hosts"]["s1"]["ex:count:comm"]["extra"] = 1
    errors = _validate(bad, schema, schema)
    assert any("missing unknown_comm" in e for e in errors)
    assert any("4 items > 3" in e for e in errors)
    assert any("extra is not in the schema" in e for e in errors)


def test_event_writer_writes_one_json_line_per_event(tmp_path: Path) -> None:
    """Real lines through the stream to disk; each line is one event's JSON."""
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        s = TraceStream("web-1", NAMES, on_event=w.write)
        s.feed((DATA / "x86_64-6.18-this-machine.txt").read_bytes())
        s.close()
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert len(rows) == w.count == s.stats.events > 0
    assert {r["probe"] for r in rows} == set(NAMES.values())
    rl = next(r for r in rows if r["probe"] == "readline")
    assert rl["fields"] == {"prompt": 'fp "q" $ '} and rl["host"] == "web-1"
    with pytest.raises(ValueError, match="closed"):
        w.write(TraceEvent("h", "p", 0.0, 0.0, 0, 1, "c"))


@pytest.mark.parametrize("ns,text", [(0, "0ns"), (512, "512ns"), (1024, "1.0us"), (4096, "4.1us"),
                                     (16384, "16us"), (2_097_152, "2.1ms"), (2**31, "2.1s")])
def test_format_ns(ns: int, text: str) -> None:
    """Short human durations for histogram edges."""
    assert format_ns(ns) == text


def _live_text(view: LiveView) -> str:
    """Render a live view once into plain text."""
    console = SafeConsole(record=True, width=120, file=io.StringIO(), color_system=None)
    console.print(view.render())
    return console.export_text()


def test_live_view_small_fleet_rows() -> None:
    """5 hosts: a row each with state, events and detail."""
    hosts = [f"web-{i}" for i in range(5)]
    view = LiveView(Console(file=io.StringIO()), hosts)
    view.set_state("web-0", "probing")
    view.add_events("web-0", 1234)
    view.set_state("web-1", "failed", "write to kprobe_events failed: EBUSY")
    view.set_state("web-2", "unreachable", "connection refused")
    view.set_state("web-3", "facts")
    text = _live_text(view)
    assert "probing 1234" in text and "1,234" in text
    assert "EBUSY" in text and "connection refused" in text
    assert "waiting 1" in text and "failed 1" in text
    with pytest.raises(ValueError, match="unknown live state"):
        view.set_state("web-4", "dancing")


def test_live_view_2000_hosts_is_a_summary() -> None:
    """2000 hosts: counts per state, recent changes and failures, not 2000 rows."""
    hosts = [f"n{i:04d}" for i in range(2000)]
    view = LiveView(Console(file=io.StringIO()), hosts)
    for i, h in enumerate(hosts):
        view.set_state(h, "done" if i % 10 else "probing")
        view.add_events(h, i)
    for h in hosts[:30]:
        view.set_state(h, "failed", f"{h} timed out at facts")
    text = _live_text(view)
    assert len(text.splitlines()) < 20
    # Hosts 0..29 failed: 3 of them had been probing (i % 10 == 0), 27 done.
    assert "failed 30" in text and "probing 197" in text and "done 1773" in text
    assert "n0029: failed (n0029 timed out at facts)" in text
    assert "busiest: n1999 1,999" in text
    assert view.counts() == {"probing": 197, "done": 1773, "failed": 30}
    assert "1,999,000 events" in text and "/s)" not in text


def test_live_view_disabled_when_not_a_terminal() -> None:
    """Piped output: nothing drawn, states still recorded."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with LiveView(console, ["a"]) as view:
        view.set_state("a", "done")
    assert out.getvalue() == "" and view.counts() == {"done": 1}


def test_live_view_draws_on_a_terminal() -> None:
    """A terminal console gets the view drawn (and left on screen at exit)."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    with LiveView(console, ["a", "b"], refresh_per_second=20) as view:
        view.set_state("a", "probing")
        view.add_events("a", 7)
    assert "probing 7" in out.getvalue()


def test_live_view_shows_streamed_tables_growing_and_says_kernel_ones_come_at_the_end() -> None:
    """aggregate: tables in the live view, folded over hosts, for 3 hosts and for 2000."""
    from fleetprobe.aggtables import AggProgress

    view = LiveView(Console(file=io.StringIO()), ["s1", "s2", "k1"])
    view.set_aggregates("s1", (AggProgress("ex:count:comm", "stream", 40, 3),))
    view.set_aggregates("s2", (AggProgress("ex:count:comm", "stream", 2, 7),))
    view.set_aggregates("k1", (AggProgress("ex:count:comm", "kernel"),))
    text = _live_text(view)
    assert ("aggregate ex:count:comm: 42 so far from 2 streaming host(s), up to 7 keys each; "
            "in kernel on 1 host(s): read at the end") in text
    # The hosts' parts are in: the kernel's count shows, and nothing says "so far" any more.
    view.set_aggregates("s1", (AggProgress("ex:count:comm", "stream", 41, 3, final=True),))
    view.set_aggregates("s2", (AggProgress("ex:count:comm", "stream", 2, 7, final=True),))
    view.set_aggregates("k1", (AggProgress("ex:count:comm", "kernel", 1000, 12, final=True),
                               AggProgress("st:count:path", "failed", final=True)))
    text = _live_text(view)
    assert ("aggregate ex:count:comm: 43 from 2 streaming host(s), up to 7 keys each; "
            "1,000 in kernel on 1 host(s)") in text
    assert "aggregate st:count:path: FAILED on 1 host(s)" in text and "so far" not in text
    big = LiveView(Console(file=io.StringIO()), [f"n{i:04d}" for i in range(2000)])
    for i in range(2000):
        big.set_aggregates(f"n{i:04d}", tuple(AggProgress(f"t{j}:count:comm", "stream", i, 1) for j in range(9)))
    text = _live_text(big)
    assert len(text.splitlines()) < 20
    assert "aggregate t0:count:comm: 1,999,000 so far from 2000 streaming host(s), up to 1 keys each" in text
    assert "... and 3 more aggregate tables" in text
