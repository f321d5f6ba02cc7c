"""aggregate: on this machine's kernel (no hist triggers): the same tables, computed from the stream.

Two hosts (OpenSSH sshd in two network namespaces) share this machine's kernel,
so each sees every event: a uniquely named process doing N statfs(2) calls must
count N on each host, fleet-wide 2N on 2 hosts, with the same report shape a
kernel-aggregating host gives (the lab tests check that side). The same run's JSON is
validated against the report schema, its HTML and Markdown reports show every table as
the terminal does, and its live view (drawn on a recording terminal) shows the streamed
tables growing while the run goes on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetprobe.render.aggregates import summaries
from fleetprobe.cli.main import main
from fleetprobe.facts import readme_features
from fleetprobe.render.html import _v
from fleetprobe.render.markdown import escape
from fleetprobe.render.safe import SafeConsole, visible
from fleetprobe.results import load_json
from hostcheck import TRACEFS, ensure_tracefs, own_run_id, wait_enabled_sh
from sshhosts import Fleet, new_fleet
from test_report import SCHEMA, _validate

pytestmark = [pytest.mark.sshd, pytest.mark.netns]

if os.geteuid() != 0 or not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
    pytest.skip("needs root and OpenSSH sshd (apt-get install openssh-server)", allow_module_level=True)

PLAYBOOK = """\
name: aggfallback
description: execs counted, signals histogrammed, a bash function timed (in the kernel where it can)
duration: 6s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
    filter: 'filename ~ "*/fptrue*"'
    aggregate: {count: [comm, filename]}
  - name: sig
    tracepoint: signal/signal_generate
    filter: 'comm ~ "fpsleep*"'
    aggregate: {histogram: sig, by: [comm]}
  - name: gsv
    uprobe: BASH:get_string_value
  - name: gsv_ret
    uretprobe: BASH:get_string_value
    pair_with: gsv
    aggregate: {latency: true, by: [comm]}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not ensure_tracefs():
        pytest.skip("needs tracefs")
    if not (TRACEFS / "events/syscalls/sys_enter_statfs").is_dir():
        pytest.skip("this kernel has no syscall tracepoints")
    fl = new_fleet(tmp_path_factory.mktemp("agg-fleet"))
    try:
        for i in (1, 2):
            fl.add_netns_host(f"agg{i}", i)
        yield fl
    finally:
        fl.stop()


def test_fallback_tables_are_exact_and_shaped_like_kernel_ones(fleet: Fleet, tmp_path: Path, clean_tracefs: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The live view is checked as a terminal shows it: rich draws no frames while running on a
    # TERM=dumb console (a CI shell's), so the test does not inherit the caller's TERM.
    monkeypatch.setenv("TERM", "xterm")
    features = readme_features((TRACEFS / "README").read_text().splitlines())
    if "hist" in features:
        pytest.skip("this kernel has hist triggers: the fallback is not what would run")
    tag = uuid.uuid4().hex[:6]
    # comm is the executable's name: unique to this test, so other processes on the machine cannot count.
    true, sleeper, bash = tmp_path / f"fptrue{tag}", tmp_path / f"fpsleep{tag}", tmp_path / f"fpbash{tag}"
    shutil.copy("/bin/true", true)
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleeper)
    shutil.copy("/bin/bash", bash)
    execs, signals = 6, 5
    # SIGCONT (18) to a running process: generated (and ignored) each time; 2^4 < 18 <= 2^5.
    run_id = own_run_id("agg")
    # Other tests share this kernel (and its exec and signal tracepoints): the filters keep the
    # runs' buffers to this test's events, so nothing is lost to an overrun. The workload starts
    # once all four probes are enabled on both hosts (setup time varies with the machine's load).
    wait = wait_enabled_sh(run_id, 2, ["sched/sched_process_exec", "signal/signal_generate", "fp_*/gsv", "fp_*/gsv_ret"])
    # The phases are seconds apart so the live view (fed once a second per host) sees the tables grow:
    # the signals come 3 s after both hosts' probes are on, a frame with no signal counted comes before.
    workload = (wait + f"{sleeper} 20 & s=$!; i=0; while [ $i -lt {execs} ]; do {true}; i=$((i+1)); done; sleep 3; "
                f"i=0; while [ $i -lt {signals} ]; do kill -CONT $s; i=$((i+1)); done; sleep 2; "
                f"{bash} -c 'for i in 1 2 3; do x=$HOME$i; done'; kill $s")
    pb = tmp_path / "agg.yml"
    pb.write_text(PLAYBOOK.replace("BASH", str(bash)))
    report_path = tmp_path / "report.json"
    html_path, md_path = tmp_path / "report.html", tmp_path / "report.md"
    bg = subprocess.Popen(["bash", "-c", workload])
    try:
        # A terminal (recorded): the run draws its live view, every frame kept in the record.
        console = SafeConsole(record=True, width=250, force_terminal=True, color_system=None)
        rc = main(["run", str(pb), "-i", str(fleet.inventory()), "--duration", "10s", "--json", str(report_path),
                   "--html", str(html_path), "--markdown", str(md_path), "--run-id", run_id], console)
    finally:
        bg.wait(30)
    out = console.export_text()
    assert rc == 0, out
    report = json.loads(report_path.read_text())
    aggs = report["aggregate"]["aggregates"]
    tables = {t["probe"] + ":" + t["kind"] + ":" + t["field"]: t for t in aggs["tables"]}
    assert set(tables) == {"exec:count:comm", "exec:count:filename", "sig:histogram:sig", "gsv_ret:latency:ns"}
    for h in ("agg1", "agg2"):
        parts = aggs["hosts"][h]
        assert {p["mode"] for p in parts.values()} == {"stream"}, parts
        assert all("no hist triggers" in p["reason"] for p in parts.values()), parts
    for h in report["hosts"]:
        assert h["loss"]["overrun"] == h["loss"]["lost_lines"] == 0, h["loss"]
    # A streamed tracepoint line names its task from the kernel's pid->comm cache when it is read,
    # not at the event: a short-lived task can be "<...>", its name before exec ("sh"), or an
    # earlier task's of the same pid (seen on CI, 1-3 of 12). The exec tracepoint has no comm
    # field to carry instead: every exec is counted, and the report says what the names are.
    rows = {tuple(k): (n, hosts) for k, n, hosts in tables["exec:count:comm"]["rows"]}
    assert sum(n for n, _h in rows.values()) == 2 * execs and rows[(true.name,)][0] > execs, rows
    unknown = rows.get(("<...>",), (0, 0))[0]
    assert tables["exec:count:comm"]["unknown_comm"] == unknown
    assert (f"comm <...>: {unknown} hit(s) whose task name the kernel had forgotten" in out) == (unknown > 0), out
    comm_reasons = {p["reason"] for parts in aggs["hosts"].values() for t, p in parts.items() if t == "exec:count:comm"}
    assert comm_reasons and all("comm is the kernel's name for the pid when each line is read" in r
                                for r in comm_reasons), comm_reasons
    rows = {tuple(k): (n, hosts) for k, n, hosts in tables["exec:count:filename"]["rows"]}
    assert rows[(str(true),)] == (2 * execs, 2)
    hist = {tuple(k): (n, hosts) for k, n, hosts in tables["sig:histogram:sig"]["rows"]}
    assert hist[(sleeper.name, 5)] == (2 * signals, 2), hist
    # Every return of the bash copy's get_string_value was timed against its entry, on both hosts,
    # and named by the comm the uretprobe fetched at the event (comm=$comm), not the read-time cache.
    hosts = {h["host"]: h for h in report["hosts"]}
    lat = sum(n for k, n, _ in tables["gsv_ret:latency:ns"]["rows"] if k[0] == bash.name)
    assert lat == sum(hosts[h]["hits"]["gsv_ret"] for h in hosts) > 0
    assert lat == sum(hosts[h]["hits"]["gsv"] for h in hosts)
    # The report says which way each host computed them.
    assert "streamed on agg1, agg2: no hist triggers" in out
    # The JSON as written validates against the report schema (aggregates and unknown_comm included).
    schema = json.loads(SCHEMA.read_text())
    assert _validate(report, schema, schema) == []
    # HTML and Markdown say of every table what the terminal says: heading, each host's mode, notes.
    loaded = load_json(report_path)
    page, md = html_path.read_text(), md_path.read_text()
    said = summaries(loaded.aggregate.aggregates)
    flat_out = " ".join(out.split())
    assert len(said) == 4
    for t in said:
        for sentence in (t.heading, *t.modes, *t.notes):
            assert " ".join(visible(sentence).split()) in flat_out, sentence   # the terminal wraps long lines
            assert _v(sentence) in page, sentence
            assert escape(sentence) in md, sentence
    assert f"<td>{_v(str(true))}</td><td class='n'>{2 * execs}</td><td class='n'>2</td>" in page
    assert f"| {escape(str(true))} | {2 * execs} | 2 |" in md
    # The live view, while the run went on: the streamed tables growing (one frame per refresh),
    # then their final counts once the hosts' parts were in.
    frames = re.findall(r"aggregate sig:histogram:sig: (\d+)( so far)? from (\d) streaming host\(s\)", out)
    assert frames, out[-3000:]
    growing = [int(n) for n, so_far, hosts in frames if so_far and hosts == "2"]
    final = sum(n for _, n, _ in tables["sig:histogram:sig"]["rows"])
    assert growing and growing[0] < 2 * signals and sorted(growing) == growing, frames
    assert any(0 < n for n in growing), frames   # counted while the run went on, not only at its end
    assert (str(final), "", "2") in frames and not any(int(n) > final for n, _, _ in frames), frames
