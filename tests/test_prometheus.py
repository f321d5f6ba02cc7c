"""Issue 14 item 5: ``audit --prometheus FILE`` writes a node_exporter textfile, read back here by the
Prometheus project's own parser (prometheus_client), from a real audit of sim hosts over SSH."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from simhosts import SimFleet

from fleetprobe.cli.main import main
from fleetprobe.cli.options import Exit
from fleetprobe.render.prometheus import _series
from fleetprobe.render.safe import SafeConsole

parser = pytest.importorskip("prometheus_client.parser")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a textfile: (name, sorted labels) -> value; the parser raises on a malformed file."""
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def cli(args: list[str]) -> tuple[int, str]:
    console = SafeConsole(record=True, width=200)
    rc = main(args, console=console)
    return rc, console.export_text()


def test_audit_writes_a_textfile_node_exporter_reads(sim: SimFleet, tmp_path: Path, busy: None) -> None:
    sim.add("h1")
    sim.add("h2")
    inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    ssh = ["-i", str(inv), "--ssh-config", "none", "--no-agent", "--connect-timeout", "3", "--setup-timeout", "10"]
    pb = tmp_path / "noexec.yml"
    pb.write_text("name: noexec\nduration: 2s\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                  "    expect: none\n  - name: nothing\n    tracepoint: sched/sched_process_hang\n")
    prom = tmp_path / "textfile" / "fleetprobe-noexec.prom"
    prom.parent.mkdir()
    rc, text = cli(["audit", str(pb), *ssh, "--store", str(tmp_path / "runs.db"), "--json", str(tmp_path / "r.json"),
                    "--prometheus", str(prom)])
    assert rc == Exit.AUDIT_FAILED, text
    assert f"Prometheus textfile written to {prom}" in text
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644        # node_exporter runs as its own user
    assert list(prom.parent.iterdir()) == [prom]              # no temporary file left beside it
    got = samples(prom.read_text())
    report = json.loads((tmp_path / "r.json").read_text())
    # The journal's line: the last one printed, logfmt.
    last = dict(w.split("=", 1) for w in text.strip().splitlines()[-1].split()[1:])
    assert text.strip().splitlines()[-1].startswith("fleetprobe-audit verdict=fail ")
    assert (last["playbook"], last["run"], last["hosts"], last["hosts_ok"], last["failed_hosts"]) == (
        "noexec", report["run"]["run_id"], "2", "2", "h1,h2")
    assert int(last["failures"]) == len(report["audit"]["failed_hosts"]) == 2
    pb_label = (("playbook", "noexec"),)
    assert got[("fleetprobe_audit_passed", pb_label)] == 0
    assert got[("fleetprobe_audit_timestamp_seconds", pb_label)] == pytest.approx(report["run"]["ended"], abs=1e-3)
    for host in report["hosts"]:
        h = (("host", host["host"]), ("playbook", "noexec"))
        assert got[("fleetprobe_host_up", h)] == 1
        assert got[("fleetprobe_host_audit_failures", h)] == 1
        assert got[("fleetprobe_host_lost_events", h)] == 0
        hits = host["hits"]["exec"]
        assert hits > 0
        assert got[("fleetprobe_probe_hits", (("host", host["host"]), ("playbook", "noexec"), ("probe", "exec")))] == hits
        # A placed probe that saw nothing is a 0, not a missing series.
        assert got[("fleetprobe_probe_hits",
                    (("host", host["host"]), ("playbook", "noexec"), ("probe", "nothing")))] == 0


def test_label_values_are_escaped() -> None:
    """A host name with a quote, a backslash and a newline parses back as itself."""
    name = 'we"ird\\host\nname'
    line = _series("fleetprobe_host_up", {"playbook": "p", "host": name}, 1)
    got = samples(f"# TYPE fleetprobe_host_up gauge\n{line}\n")
    assert got == {("fleetprobe_host_up", (("host", name), ("playbook", "p"))): 1}
