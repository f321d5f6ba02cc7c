"""The runner's control-line protocol: real captured runner output, directive order, clock samples.

The captures in tests/data/runner were made by running fleetprobe/runner/runner.sh on
this machine (see the README there).  Other tests run the runner again now,
as the controller sends it (the bootstrap reading the compacted script on stdin),
under dash and busybox sh: facts first, then a ping, then EOF before any plan;
and a whole run stopped by closing its stdin, the way a dropped controller does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fleetprobe.facts import Facts, facts_args, parse_facts
from fleetprobe.parse import EventBatch, TraceStream
from fleetprobe.traceline import CONTROL_PREFIX
from fleetprobe.plan import HostPlan, plan_host
from fleetprobe.playbook import parse_playbook
from fleetprobe.runner.runner import ModuleLoad, RunnerReport, clock_sample, plan_directives, runner_script
from fleetprobe.session import BOOTSTRAP, script_input

DATA = Path(__file__).parent / "data"
RUNNER = DATA / "runner"
TRACEFS = Path("/sys/kernel/tracing")
GROUP = "fp_capt01_0a1b"


def shells() -> list[list[str]]:
    """POSIX shells on this machine to run the on-host scripts under (the lab's guests have busybox)."""
    found = [[p] for p in (shutil.which("dash"),) if p]
    if shutil.which("busybox"):
        found.append([shutil.which("busybox") or "busybox", "sh"])
    return found


def bootstrapped(shell: list[str], *args: str) -> list[str]:
    """The argv the controller's command line becomes on a host: the bootstrap, $0, the arguments."""
    return [*shell, "-c", BOOTSTRAP, "fleetprobe-runner", *args]


def report_of(text: str) -> RunnerReport:
    """Feed every control line of a runner's stdout to a RunnerReport."""
    rep = RunnerReport()
    for line in text.splitlines():
        if line.startswith(CONTROL_PREFIX):
            rep.handle(line[len(CONTROL_PREFIX):])
    return rep


@pytest.mark.parametrize("name", ["tracepoint-uprobe-dash.out", "tracepoint-uprobe-busybox.out"])
def test_captured_run(name: str) -> None:
    """What a real run said: placed, refused with the kernel's reason, loss counters, clean."""
    rep = report_of((RUNNER / name).read_text())
    assert rep.hello and rep.started and rep.bye
    assert rep.clean is True and rep.unclean == []
    assert rep.enabled == 3 and rep.stop_reason == "duration"
    assert rep.placed == [f"p:{GROUP}/readline /bin/bash:0xc6c20"]
    # The refused uprobe carries error_log's words; its later enable failure does not replace that cause.
    assert rep.refused["bogus"].startswith("def refused:")
    assert "Failed to find the given file" in rep.refused["bogus"]
    # The bad filter carries the kernel's parse error from the filter file (not a stale error_log line).
    assert rep.refused["readline"] == "filter refused: Too many terms in predicate expression"
    assert set(rep.stats["start"]) == set(rep.stats["end"]) == {"cpu0", "cpu1"}
    loss = rep.loss(GROUP)
    assert (loss.overrun, loss.dropped, loss.probe_misses) == (0, 0, {})
    assert rep.errors == [] and rep.swept == []


def test_captured_stream_through_trace_stream() -> None:
    """The same bytes through the stream parser: control lines routed, both tracepoints seen, no garbage."""
    rep = RunnerReport()
    seen: list[str] = []
    names = {"sched_process_exec": "exec", "sched_process_fork": "fork", "readline": "readline"}

    class Rows:
        """Collect probe names whatever the sink API hands over."""

        def add_line(self, host: str, probe: str, *rest: object) -> None:
            seen.append(probe)

        def add_batch(self, host: str, batch: EventBatch, probes: dict[str, str]) -> None:
            seen.extend(probes[name] for name in batch.names)

    stream = TraceStream("ctl", names, aggregate=Rows(), on_control=rep.handle)
    data = (RUNNER / "tracepoint-uprobe-dash.out").read_bytes()
    for i in range(0, len(data), 97):                   # chunks cut mid-line, as a channel does
        stream.feed(data[i:i + 97])
    stream.close()
    assert stream.stats.unparsed == 0, stream.stats.unparsed_examples
    assert stream.stats.control == 13 and stream.stats.markers == 2
    assert rep.bye and rep.clean
    assert seen.count("exec") == 3 and seen.count("fork") > 3


def test_stats_deltas_and_probe_misses() -> None:
    """Loss is end minus start per CPU; kprobe misses zip kprobe_events with kprobe_profile for our group only."""
    rep = RunnerReport()
    for line in [
        "stats start cpu0 entries=0 overrun=5 commit_overrun=0 dropped=1 read=0",
        "stats start cpu1 entries=0 overrun=0 commit_overrun=0 dropped=0 read=0",
        "kev start p:fp_run1_ab12/open do_sys_openat2 dfd=%di",
        "kev start p:other/theirs vfs_read",
        "kev start r:fp_run1_ab12/open_ret do_sys_openat2 ret=$retval",
        "kprof start   open                                              10               1",
        "kprof start   theirs                                           999              50",
        "kprof start   open_ret                                          10               0",
        "stats end cpu0 entries=3 overrun=12 commit_overrun=0 dropped=4 read=77",
        "stats end cpu1 entries=0 overrun=2 commit_overrun=0 dropped=0 read=9",
        "kev end p:fp_run1_ab12/open do_sys_openat2 dfd=%di",
        "kev end p:other/theirs vfs_read",
        "kev end r:fp_run1_ab12/open_ret do_sys_openat2 ret=$retval",
        "kprof end   open                                            5010               4",
        "kprof end   theirs                                          9999             500",
        "kprof end   open_ret                                        5008               2",
    ]:
        rep.handle(line)
    loss = rep.loss("fp_run1_ab12")
    assert (loss.overrun, loss.dropped) == (7 + 2, 3)
    assert loss.probe_misses == {"open": 3, "open_ret": 2}
    assert rep.hits("fp_run1_ab12") == {"open": 5010, "open_ret": 5008}


def test_counters_that_go_backwards_count_zero() -> None:
    """A CPU whose counters were reset (buffer resized) must not give negative loss."""
    rep = RunnerReport()
    rep.handle("stats start cpu0 overrun=50 dropped=9")
    rep.handle("stats end cpu0 overrun=3 dropped=0")
    assert (rep.loss("g").overrun, rep.loss("g").dropped) == (0, 0)


def test_unclean_error_sweep_module_lines() -> None:
    """Every word of the protocol lands where the orchestrator reads it."""
    rep = report_of("\n".join([
        "@@fp error group must start with fp_",
        "@@fp swept fp_old123_ab12_1700000000",
        "@@fp loaded fp_kprobe",
        "@@fp modfail fp_kretprobe :: insmod: ERROR: could not insert module: Invalid module format",
        "@@fp unclean event fp_a_0000/open busy",
        "@@fp unclean instance fp_a_0000_1 busy",
        "@@fp pong 1795656580.198461634",
    ]))
    assert rep.errors == ["group must start with fp_"]
    assert rep.swept == ["fp_old123_ab12_1700000000"]
    assert rep.loaded == ["fp_kprobe"]
    assert rep.refused["fp_kretprobe"] == "mod refused: insmod: ERROR: could not insert module: Invalid module format"
    assert rep.clean is False and rep.unclean == ["event fp_a_0000/open busy", "instance fp_a_0000_1 busy"]
    assert rep.pongs[0][1] == "1795656580.198461634"


def test_clock_sample() -> None:
    """Offset is host time minus the round trip's midpoint; error is half the round trip (+1 s without %N)."""
    off, err = clock_sample(100.0, 100.2, "150.1") or (0, 0)
    assert off == pytest.approx(50.0) and err == pytest.approx(0.1)
    off, err = clock_sample(100.0, 100.2, "150.%N") or (0, 0)
    assert off == pytest.approx(49.9) and err == pytest.approx(1.1)
    off, err = clock_sample(100.0, 100.0, "150") or (0, 0)
    assert off == pytest.approx(50.0) and err == pytest.approx(1.0)
    assert clock_sample(1.0, 2.0, "") is None
    assert clock_sample(1.0, 2.0, "garbage") is None


def test_clock_sample_of_a_held_answer() -> None:
    """``RX TX``: the 0.1 s the host held its answer is not part of the error (NTP's four timestamps)."""
    off, err = clock_sample(100.0, 100.2, "150.05 150.15") or (0, 0)
    assert off == pytest.approx(50.0) and err == pytest.approx(0.05)
    # Whole seconds (busybox date): the hold cannot be measured, the error is half the round trip + 1 s.
    off, err = clock_sample(100.0, 100.2, "150 150") or (0, 0)
    assert off == pytest.approx(49.9) and err == pytest.approx(1.1)
    # "SECS 1" is one stamp with its uncertainty, not a second stamp.
    off, err = clock_sample(100.0, 100.2, "150 1") or (0, 0)
    assert off == pytest.approx(49.9) and err == pytest.approx(1.1)


def kitchen_plan() -> tuple[HostPlan, Facts]:
    """A plan with kprobes, a kretprobe, a filter and a tracepoint for stored x86_64 6.1 facts."""
    facts = Facts.from_json(json.loads((DATA / "facts" / "x86_64-debian-6.1.json").read_text()))
    pb = parse_playbook("""\
name: order
description: definitions, filters and enables
duration: 2s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
    filter: 'pid > 1'
  - name: open
    kprobe: [do_sys_openat2, do_sys_open]
    args: { dfd: arg1:s32 }
    filter: 'dfd != 5'
  - name: open_ret
    kretprobe: [do_sys_openat2, do_sys_open]
    args: { ret: retval:s32 }
""", "order.yml")
    return plan_host(pb, facts, run_id="ord1", deadline=1800000000, uprobe_offsets={}), facts


def test_plan_directives_order() -> None:
    """Header, then every definition, then modules, then filters, newline guards, enables, then go."""
    plan, _ = kitchen_plan()
    text = plan_directives(plan, tracefs="/sys/kernel/tracing", duration=2.2, deadline=1800000000, grace=60,
                           buffer_kb=1024, modules=(ModuleLoad("fp_kprobe", "/tmp/fp_kprobe.ko",
                                                               (("symbol", "kernel_clone"),)),))
    lines = text.splitlines()
    assert lines[:7] == ["tracefs /sys/kernel/tracing", f"group {plan.group}", f"instance {plan.instance}",
                         "duration 3", "deadline 1800000000", "grace 60", "buffer_kb 1024"]
    assert lines[-1] == "go" and text.endswith("go\n")
    kinds = [line.split(" ", 1)[0] for line in lines[7:-1]]
    assert kinds == ["def", "def", "module", "filter", "filter", "guard", "guard", "guard", "enable", "enable", "enable"]
    # Without a seal nothing is sealed: the tracepoint's string field and every comm are guarded.
    assert "guard sched/sched_process_exec filename" in lines and f"guard {plan.group}/open" in lines
    assert f"def kprobe_events p:{plan.group}/open do_sys_openat2 dfd=$arg1:s32" in lines
    assert f"def kprobe_events r:{plan.group}/open_ret do_sys_openat2 ret=$retval:s32" in lines
    assert f"filter {plan.group}/open dfd != 5" in lines
    assert "module fp_kprobe /tmp/fp_kprobe.ko symbol=kernel_clone" in lines
    assert "filter sched/sched_process_exec pid > 1" in lines
    assert f"enable {plan.group}/open_ret" in lines


def test_plan_directives_refuse_newlines() -> None:
    """A newline inside a value would inject a directive: refused."""
    plan, _ = kitchen_plan()
    bad = dataclasses.replace(plan.probes[0], filter="pid > 1\nenable evil/evil")
    with pytest.raises(ValueError, match="newline"):
        plan_directives(dataclasses.replace(plan, probes=(bad,)), tracefs="/t", duration=1, deadline=1, grace=1)


def test_script_input_drops_comments_and_still_parses() -> None:
    """What goes on the wire is the runner without comments, blank lines or indentation, and every shell parses it."""
    sent = script_input(runner_script()).decode()
    body = sent.rsplit("#fleetprobe-script-end\n", 1)[0]
    assert len(body) < 0.65 * len(runner_script())
    assert not [line for line in body.splitlines() if not line or line[0] in "# \t"]
    assert "fp_facts() (" in body and "EOF_PLAN" in body
    for shell in shells():
        res = subprocess.run([*shell, "-n"], input=body.encode(), capture_output=True, timeout=30)
        assert res.returncode == 0, (shell, res.stderr)


@pytest.mark.parametrize("shell", shells(), ids=lambda s: os.path.basename(s[0]))
def test_runner_prints_facts_and_leaves_quietly_without_a_plan(shell: list[str]) -> None:
    """The run's one channel: facts first (the facts script's own output); EOF before ``go`` exits 0 in silence."""
    words = facts_args(["do_sys_openat2"], ["sched/sched_process_exec"], ["/bin/sh"], mount=False)
    t0 = time.time()
    res = subprocess.run(bootstrapped(shell, "facts", *words), input=script_input(runner_script()) + b"ping\n",
                         capture_output=True, timeout=60)
    t1 = time.time()
    assert res.returncode == 0, res.stderr
    facts_text, end, after = res.stdout.decode().partition("\n@@end\n")
    assert end and after == ""           # a ping is answered with the plan's first lines, and there is no plan
    facts = parse_facts("here", facts_text + end, ["do_sys_openat2"])
    assert facts.problems == () and facts.arch == os.uname().machine
    assert facts.kernel_release == os.uname().release
    assert facts.files["/bin/sh"].exists and t0 - 1 <= facts.realtime <= t1 + 1
    if Path("/sys/kernel/oops_count").exists():
        assert facts.oops_count is not None and facts.warn_count is not None
    # Without "facts" it prints nothing before its plan.
    res = subprocess.run(bootstrapped(shell), input=script_input(runner_script()), capture_output=True, timeout=60)
    assert (res.returncode, res.stdout) == (0, b""), res.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not (TRACEFS / "instances").is_dir() or not shutil.which("busybox"),
                    reason="needs root, tracefs and busybox")
def test_busybox_runner_stops_on_eof_and_cleans() -> None:
    """Under busybox ash: stdin EOF mid-run (the controller vanished) ends the run, clean, well before its duration."""
    group = f"fp_bbeof{os.getpid() % 10000}_0b0b"
    instance = f"{group}_{int(time.time()) + 120}"
    plan = (f"ping\ntracefs {TRACEFS}\ngroup {group}\ninstance {instance}\nduration 60\n"
            f"deadline {int(time.time()) + 60}\ngrace 60\nenable sched/sched_process_exec\ngo\n")
    proc = subprocess.Popen(bootstrapped([shutil.which("busybox") or "busybox", "sh"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(script_input(runner_script()))
        proc.stdin.flush()
        time.sleep(0.5)                                     # the script is read: the ping meets an idle shell
        sent = time.time()
        proc.stdin.write(plan.encode())
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while not (TRACEFS / "instances" / instance).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (TRACEFS / "instances" / instance).exists()
        time.sleep(1)
        t0 = time.monotonic()
        out, err = proc.communicate(b"", timeout=20)     # closes stdin: EOF
        took = time.monotonic() - t0
        done = time.time()                                  # after every line arrived: a valid bound
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    text = out.decode("utf-8", "replace")
    rep = report_of(text)
    assert rep.started and rep.enabled == 1
    assert rep.stop_reason == "stop-or-eof", out[-500:]
    # Everything up to "started" was said in one write, the ping's answer first; then the marker came
    # through the trace reader. Same clock on both ends: the offset is 0 within its error.
    words = [line.split()[1] for line in text.splitlines() if line.startswith("@@fp ")]
    assert words[:3] == ["pong", "hello", "kernel"] and words.index("started") < words.index("stopping")
    assert text.index("@@fp started") < text.index("fpsync")
    sample = clock_sample(sent, done, rep.pongs[0][1])
    assert sample is not None and abs(sample[0]) <= sample[1]
    rx, tx = (float(w) for w in rep.pongs[0][1].split())
    assert sent <= rx <= tx
    assert rep.clean and rep.bye
    assert took < 10
    assert not (TRACEFS / "instances" / instance).exists()


def test_runner_silent_judges_in_trace_time_not_read_time() -> None:
    """A controller behind a busy stream reads markers late: that is not a dead runner."""
    from fleetprobe.runner.channel import HEARTBEAT_TIMEOUT as T, runner_silent
    # Markers every 5 s of trace time, read late: the events read so far are within T of the last one.
    assert not runner_silent(0.1, 1000.0, 1000.0 + T - 1)
    # Events stream on T past the last marker: the runner stopped writing them.
    assert runner_silent(0.1, 1000.0, 1000.0 + T + 0.5)
    # Nothing read at all for T: a live runner always writes markers.
    assert runner_silent(T + 1, 1000.0, 1000.0)
    assert runner_silent(T + 1, None, 0.0)
    # Before the first marker only silence counts.
    assert not runner_silent(1.0, None, 5000.0)


@pytest.mark.parametrize("shell", shells(), ids=lambda s: os.path.basename(s[0]))
def test_a_window_past_the_deadline_is_cut_to_it_and_said(shell: list[str]) -> None:
    """A host slow to place its probes never probes past its deadline (its on-host timer removes the
    probes at the deadline plus grace: a window running past it was silently cut, issue 9 CI).

    Planned: 30 s, deadline in 3 s. The runner probes until the deadline, says so, and ends clean.
    """
    if not (TRACEFS / "README").exists():
        pytest.skip("needs tracefs")
    group = f"fp_short{os.getpid() % 10000}_0c0c"
    deadline = int(time.time()) + 3
    instance = f"{group}_{deadline}"
    plan = (f"tracefs {TRACEFS}\ngroup {group}\ninstance {instance}\nduration 30\n"
            f"deadline {deadline}\ngrace 60\nenable sched/sched_process_exec\ngo\n")
    # stdout to a file, not a pipe nobody drains while the test waits: the machine's execs fill a
    # pipe's 64 KiB and the runner would block writing them.
    sink = tempfile.TemporaryFile()
    proc = subprocess.Popen(bootstrapped(shell), stdin=subprocess.PIPE, stdout=sink,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(script_input(runner_script()) + plan.encode())
        proc.stdin.flush()
        t0 = time.monotonic()
        # stdin stays open (a live controller): only the runner's own window can end the run.
        while proc.poll() is None and time.monotonic() - t0 < 45:
            time.sleep(0.2)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.communicate(timeout=10)
    sink.seek(0)
    out = sink.read()
    sink.close()
    rep = report_of(out.decode("utf-8", "replace"))
    assert rep.started and rep.stop_reason == "duration", out[-800:]
    assert rep.shortened is not None and rep.shortened[0] == 30 and 0 <= rep.shortened[1] <= 3, rep.shortened
    # Uncut, the window alone would last 30 s; a loaded machine may take a while to tear down.
    assert took < 28, f"the run went on for {took:.1f} s past a deadline 3 s away"
    assert rep.clean and rep.bye and not rep.watchdog_fired
    assert not (TRACEFS / "instances" / instance).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tracefs)")
@pytest.mark.parametrize("shell", shells(), ids=lambda s: os.path.basename(s[0]))
def test_a_guard_keeps_newline_names_out_and_counts_them(shell: list[str], tmp_path: Path) -> None:
    """guard EVENT FIELD: execs of a file whose name holds a newline never reach the stream, and the
    guard instance counts them, each guarded event in its own (the exit of a process named 'a\\nb' is
    kept out by the exit's comm guard); a guard the kernel refuses (a number field) is said
    ("unguarded"), the event enabled all the same; every instance is gone at the end (dash and busybox)."""
    if not (TRACEFS / "README").exists():
        pytest.skip("needs tracefs")
    odd = tmp_path / "a\nb"
    plain = tmp_path / "plain-exec"
    for p in (odd, plain):
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(0o755)
    group = f"fp_guard{os.getpid() % 10000}_0d0d"
    deadline = int(time.time()) + 60
    instance = f"{group}_{deadline}"
    plan = (f"tracefs {TRACEFS}\ngroup {group}\ninstance {instance}\nduration 4\n"
            f"deadline {deadline}\ngrace 60\nguard sched/sched_process_exec filename\n"
            "guard sched/sched_process_fork parent_pid\nguard sched/sched_process_exit\n"
            "enable sched/sched_process_exec\nenable sched/sched_process_fork\nenable sched/sched_process_exit\ngo\n")
    proc = subprocess.Popen(bootstrapped(shell), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(script_input(runner_script()) + plan.encode())
        proc.stdin.flush()
        t0 = time.monotonic()
        while not (TRACEFS / "instances" / instance).exists() and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        time.sleep(1)
        for _ in range(5):
            subprocess.run([str(odd)], check=True)
            subprocess.run([str(plain)], check=True)
        out, _err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    text = out.decode("utf-8", "replace")
    rep = report_of(text)
    assert rep.started and rep.enabled == 3 and rep.clean, text[-800:]
    assert "a\nb" not in text and text.count(f"filename={plain} ") == 5, text[-1500:]
    assert rep.guarded_out is not None and rep.guarded_out >= 10 and not rep.guard_uncounted, text[-800:]
    # Per event: the exec's guard kept the 5 execs of 'a\nb' out, the exit's guard their 5 exits.
    by_event = rep.guarded_by_event
    assert set(by_event) == {"sched/sched_process_exec", "sched/sched_process_exit"}, text[-800:]
    assert by_event["sched/sched_process_exec"] >= 5 and by_event["sched/sched_process_exit"] >= 5, by_event
    assert sum(by_event.values()) == rep.guarded_out, by_event
    assert "Expecting numeric field" in rep.unguarded.get("sched/sched_process_fork", ""), rep.unguarded
    assert "sched/sched_process_exec" not in rep.unguarded
    assert not (TRACEFS / "instances" / instance).exists()
    assert not [d for d in (TRACEFS / "instances").iterdir() if d.name.startswith(group)]
