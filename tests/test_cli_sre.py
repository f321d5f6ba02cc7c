"""Issue 14, the command line an SRE expects: pipes, --print, -e one-liners, audit JSON and hooks, polish.

Everything runs the real CLI (a subprocess where stdout/stderr apart matter, else ``main`` in-process)
against sim hosts: real SSH servers running the real runner on this machine's tracefs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simhosts import SimFleet

from fleetprobe import RunSettings, parse_playbook
from fleetprobe.adhoc import adhoc_playbook, playbook_yaml
from fleetprobe.cli.main import main
from fleetprobe.cli.options import Exit
from fleetprobe.errors import PlaybookError
from fleetprobe.render.eventlines import EventPrinter, visible_word
from fleetprobe.parse import EventBatch
from fleetprobe.render.safe import SafeConsole

ROOT = Path(__file__).resolve().parent.parent
TRACEFS = Path("/sys/kernel/tracing")


# --- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def run_id() -> Iterator[str]:
    """A run id of this test's own; no tracefs instance of it may be left afterwards (the sim
    fixture is conftest's: one sim fleet, stopped with nothing left running)."""
    rid = "s" + secrets.token_hex(4)
    yield rid
    assert not [p.name for p in (TRACEFS / "instances").iterdir() if p.name.startswith(f"fp_{rid}")]


def inventory(sim: SimFleet, tmp_path: Path, *names: str) -> Path:
    """An inventory of normal sim hosts called ``names``."""
    for n in names:
        sim.add(n)
    return sim.inventory(tmp_path / "inventory.yml", sim.known_hosts_for(tmp_path / "known_hosts"))


def ssh(inv: Path) -> list[str]:
    """No user config, no agent, short timeouts."""
    return ["-i", str(inv), "--ssh-config", "none", "--no-agent", "--connect-timeout", "3",
            "--setup-timeout", "10"]


def env(tmp_path: Path) -> dict[str, str]:
    """The subprocess's environment: its own data dir (history store), no terminal width."""
    e = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    e["XDG_DATA_HOME"] = str(tmp_path / "data")
    e["PYTHONPATH"] = str(ROOT)
    return e


def fp(tmp_path: Path, *argv: str, stdin: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``fleetprobe ARGV`` in a subprocess, stdout and stderr apart (pipes, not a terminal)."""
    return subprocess.run([sys.executable, "-m", "fleetprobe", *argv], capture_output=True, text=True,
                          env=env(tmp_path), timeout=timeout, input=stdin, check=False)


def cli(args: list[str]) -> tuple[int, str]:
    """In-process; the exit status and every line printed for people."""
    console = SafeConsole(record=True, width=200)
    rc = main(args, console=console)
    return rc, console.export_text()


EXEC = "tracepoint:sched:sched_process_exec"


# --- 4. pipes ----------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("jq") is None, reason="jq not installed (scripts/setup.sh installs it)")
def test_run_json_to_stdout_pipes_into_jq(sim: SimFleet, tmp_path: Path, run_id: str, busy: None) -> None:
    """``run --json - | jq``: stdout is the report and nothing else; the summary and notes go to stderr."""
    inv = inventory(sim, tmp_path, "h1")
    cmd = [sys.executable, "-m", "fleetprobe", "run", "-e", EXEC, *ssh(inv), "-d", "2s", "--run-id", run_id,
           "--json", "-"]
    pipeline = subprocess.run(["sh", "-c", '"$@" | jq -e ".hosts[0].status, .hosts[0].events"', "sh", *cmd],
                              capture_output=True, text=True, env=env(tmp_path), timeout=90, check=False)
    assert pipeline.returncode == 0, pipeline.stderr
    status, events = pipeline.stdout.split()
    assert status == '"ok"' and int(events) > 0
    assert "fleetprobe run" in pipeline.stderr and "stored in" in pipeline.stderr
    assert "report written to stdout" in pipeline.stderr


def test_events_html_markdown_and_show_take_dash(sim: SimFleet, tmp_path: Path, run_id: str, busy: None) -> None:
    """``--events -`` streams JSON lines to stdout and the store still keeps them; ``--markdown -``,
    ``--html -`` and ``show --events -`` write to stdout too; two options on stdout are refused."""
    inv = inventory(sim, tmp_path, "h1")
    store = tmp_path / "runs.db"
    done = fp(tmp_path, "run", "-e", EXEC, *ssh(inv), "-d", "2s", "--run-id", run_id, "--store", str(store),
              "--events", "-")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(json.loads(x)["host"] == "h1" for x in lines)
    assert {json.loads(x)["probe"] for x in lines} == {"sched_process_exec"}
    shown = fp(tmp_path, "show", "last", "--store", str(store), "--events", "-")
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) == len(lines), "the store kept what --events - printed"
    md = fp(tmp_path, "show", "last", "--store", str(store), "--markdown", "-")
    assert md.returncode == 0 and md.stdout.startswith("#") and "written to stdout" in md.stderr
    html = fp(tmp_path, "show", "last", "--store", str(store), "--html", "-")
    assert html.returncode == 0 and html.stdout.lstrip().lower().startswith("<!doctype html")
    both = fp(tmp_path, "show", "last", "--store", str(store), "--html", "-", "--json", "-")
    assert both.returncode == Exit.BAD_INPUT and both.stdout == ""
    assert "--json and --html would all write to stdout" in both.stderr


def test_errors_go_to_stderr_not_stdout(tmp_path: Path) -> None:
    """An error is on stderr, stdout stays empty (a pipe's reader sees no half JSON, no error text)."""
    done = fp(tmp_path, "run", str(tmp_path / "nope.yml"), "-i", "127.0.0.1,", "--json", "-")
    assert done.returncode == Exit.BAD_INPUT
    assert done.stdout == ""
    assert "cannot read playbook" in done.stderr and "nope.yml" in done.stderr


def test_tables_are_not_cut_when_stdout_is_a_pipe(sim: SimFleet, tmp_path: Path) -> None:
    """Piped, the facts table keeps every cell whole (rich would cut to 80 columns: ``lab-…``)."""
    name = "a-host-name-long-enough-that-eighty-columns-would-cut-it-" + "x" * 20
    inv = inventory(sim, tmp_path, name)
    done = fp(tmp_path, "facts", *ssh(inv))
    assert done.returncode == 0, done.stderr
    assert name in done.stdout
    assert os.uname().release in done.stdout
    assert "…" not in done.stdout


# --- 3. events as they come ----------------------------------------------------------------------

def test_print_streams_host_prefixed_lines_as_they_arrive(sim: SimFleet, tmp_path: Path, run_id: str) -> None:
    """``--print``: one line per event, ``host probe comm pid fields``, during the run (not after it);
    a program name with an escape sequence and a blank is shown escaped; "probes live" on stderr."""
    inv = inventory(sim, tmp_path, "h1")
    evil = tmp_path / "bad\x1b[31mname two"
    os.symlink("/bin/true", evil)
    proc = subprocess.Popen([sys.executable, "-m", "fleetprobe", "run", "-e", EXEC, *ssh(inv), "-d", "6s",
                             "--run-id", run_id, "--no-store", "--print"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path))
    assert proc.stdout is not None and proc.stderr is not None
    t0 = time.monotonic()
    try:
        live = proc.stderr.readline()
        assert live.startswith("1 probe live on 1 host"), live
        subprocess.run([str(evil)], check=True)
        first = proc.stdout.readline()
        first_at = time.monotonic() - t0
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    took = time.monotonic() - t0
    assert proc.returncode == 0, err
    assert first_at < took - 2, f"first line after {first_at:.1f}s of a {took:.1f}s run: not streamed"
    lines = [first, *out.splitlines()]
    for line in lines:
        host, probe, comm, pid, rest = line.split(None, 4)
        assert (host, probe) == ("h1", "sched_process_exec") and pid.isdigit(), line
        assert rest.startswith("filename="), line
    shown = [x for x in lines if "bad" in x and "name" in x]
    assert shown, "the exec of the odd name was printed"
    assert "\x1b" not in "".join(lines)
    assert "bad\\x1b[31mname two" in shown[0]          # a path: escaped, its blank kept inside the quotes
    assert "fleetprobe run" in err                      # the summary went to stderr


def test_playbook_print_format_streams_its_lines(sim: SimFleet, tmp_path: Path, run_id: str) -> None:
    """A playbook's ``print:`` format streams events without ``--print``: ``host probe`` then the
    format filled with the event's fields; a hostile program name stays escaped on one line; the
    summary goes to stderr.  With ``--json -`` stdout is the report's and nothing is printed."""
    inv = inventory(sim, tmp_path, "h1")
    # (A tab or newline in a path is kept out by the run's newline guard: see the unit test below.)
    evil = tmp_path / "bad\x1b[31mname two"
    os.symlink("/bin/true", evil)
    playbook = tmp_path / "exec.yml"
    playbook.write_text("name: execprint\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                        "    print: \"{comm} ran {filename} {{pid {pid}}} {nosuch}\"\n")
    proc = subprocess.Popen([sys.executable, "-m", "fleetprobe", "run", str(playbook), *ssh(inv), "-d", "4s",
                             "--run-id", run_id, "--no-store"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path))
    assert proc.stdout is not None and proc.stderr is not None
    try:
        live = proc.stderr.readline()
        assert live.startswith("1 probe live on 1 host"), live
        subprocess.run([str(evil)], check=True)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines, err
    for line in lines:
        host, probe, comm, ran, rest = line.split(None, 4)
        assert (host, probe, ran) == ("h1", "exec", "ran"), line
        assert " {pid " in rest and rest.endswith("} {nosuch?}"), line
    shown = [x for x in lines if "bad" in x and "two" in x]
    assert shown and "bad\\x1b[31mname two" in shown[0], shown
    assert "\x1b" not in out and "\t" not in out
    assert "fleetprobe run" in err
    quiet = fp(tmp_path, "run", str(playbook), *ssh(inv), "-d", "1s", "--run-id", run_id, "--no-store",
               "--json", "-")
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["hosts"][0]["status"] == "ok"


def test_format_printer_escapes_hostile_fields() -> None:
    """Unit check of a print: format on hostile strings: a comm with a blank, a bell and a tab is one
    word; a value's tab and escape are shown as escapes; a probe without a format prints --print's line."""
    from fleetprobe.cli.eventformat import FormatPrinter
    from fleetprobe.printformat import parse_print_format

    buf = io.StringIO()
    fmt = parse_print_format("{comm} opened {filename}", None)
    printer = FormatPrinter(buf, {"open": fmt}, hosts=["w"], probes=["open", "exec"])
    rows = [("a b\x07\tc", "7", "1", "1.0", 'open: filename="/tmp/x\ty\x1b[2J"'),
            ("sh", "8", "1", "1.1", 'exec: filename="/bin/sh"')]
    printer.write_batch("w", EventBatch(rows, ["open", "exec"], {"open": 1, "exec": 1}),
                        {"open": "open", "exec": "exec"})
    first, second = buf.getvalue().splitlines()
    assert first.split(None, 2) == ["w", "open", 'a\\x20b\\x07\\x09c opened "/tmp/x\\x09y\\x1b[2J"']
    assert second.split(None, 4) == ["w", "exec", "sh", "8", 'filename="/bin/sh"']


def test_printer_escapes_comm_and_args_and_keeps_columns() -> None:
    """Unit check of the line format on hostile strings (the comm is one word whatever it holds)."""
    import io

    buf = io.StringIO()
    printer = EventPrinter(buf, hosts=["db-07", "w"], probes=["exec"])
    rows = [("sh", "4121", "0", "1.000000", 'exec: filename="/usr/bin/logrotate" pid=4121'),
            ("a b\x07", "7", "1", "1.000001", 'exec: filename="/tmp/\u200bx"')]
    printer.write_batch("w", EventBatch(rows, ["exec", "exec"], {"exec": 2}), {"exec": "exec"})
    first, second = buf.getvalue().splitlines()
    assert first.split(None, 4) == ["w", "exec", "sh", "4121", 'filename="/usr/bin/logrotate" pid=4121']
    assert second.split(None, 4) == ["w", "exec", "a\\x20b\\x07", "7", 'filename="/tmp/\\u200bx"']
    pid_at = first.index("4121")
    assert second[pid_at:pid_at + 2] == "7 ", "the pid column lines up"
    assert visible_word("") == "-"


def test_printer_shows_a_sealed_probes_fields_without_its_seal() -> None:
    """Sealed kprobes and uprobes (issue 11 #2) reach the printer with the seal cut to a sentinel: the
    line shows the kernel's fields only (the lab showed ``path="/etc/hostname"\\x00``)."""
    import io

    from fleetprobe.traceline import SEALED

    buf = io.StringIO()
    printer = EventPrinter(buf, hosts=["db-07"], probes=["open"])
    rows = [("cat", "3830", "0", "1.000000", f'open: (do_sys_openat2+0x0/0x1c8) path="/etc/hostname"{SEALED}')]
    printer.write_batch("db-07", EventBatch(rows, ["open"], {"open": 1}), {"open": "open"})
    (line,) = buf.getvalue().splitlines()
    assert line.split(None, 4)[4] == '(do_sys_openat2+0x0/0x1c8) path="/etc/hostname"', line


# --- 1. ad-hoc probes ----------------------------------------------------------------------------

def test_expressions_build_the_playbook_the_yaml_builds(tmp_path: Path) -> None:
    """-e builds the same probes as the equivalent YAML playbook (only file and line differ)."""
    pb, text = adhoc_playbook([
        'kprobe:do_sys_openat2 dfd=arg1 path=+0(arg2):string if comm != "sshd"',
        "kretprobe:do_sys_openat2 retval",
        "t:sched:sched_process_exec",
        "uretprobe:/bin/bash:readline as typed line=+0(retval):string",
    ])
    yaml_text = """\
name: adhoc
probes:
  - name: do_sys_openat2
    kprobe: do_sys_openat2
    args: {dfd: arg1, path: "+0(arg2):string"}
    filter: comm != "sshd"
  - name: do_sys_openat2_ret
    kretprobe: do_sys_openat2
    args: {ret: retval}
    pair_with: do_sys_openat2
  - name: sched_process_exec
    tracepoint: sched/sched_process_exec
  - name: typed
    uretprobe: /bin/bash:readline
    args: {line: "+0(retval):string"}
"""
    want = parse_playbook(yaml_text, str(tmp_path / "same.yml"))

    def norm(p: object) -> object:
        return dataclasses.replace(p, file="", line=0, args=tuple(dataclasses.replace(a, line=0) for a in p.args))  # type: ignore[arg-type,type-var]

    assert [norm(p) for p in pb.probes] == [norm(p) for p in want.probes]
    assert parse_playbook(text, "-e").probes == pb.probes  # the kept YAML text is that playbook


@pytest.mark.parametrize("expr,says", [
    ("kprobe:", "names no kprobe target"),
    ("fentry:vfs_read", "does not start with a probe type"),
    ("kretprobe:vfs_read arg1", "argN is only defined at function entry"),
    ("kprobe:vfs_read retval", "retval exists only in return probes"),
    ("tracepoint:sched", "GROUP:EVENT"),
    ("t:sched:sched_switch arg1", "not allowed on a tracepoint"),
    ("kprobe:vfs_read if", "'if' is not followed by a filter"),
    ("kprobe:vfs_read buf=+0(arg2):strng", "strng"),
    ("uprobe:bash:readline", "must be absolute"),
])
def test_bad_expression_is_refused_before_any_connection(expr: str, says: str) -> None:
    """A bad -e is exit 1 naming the expression; no host is contacted (the inventory's port is closed)."""
    rc, text = cli(["run", "-e", expr, "-i", "127.0.0.1:1,", "--no-store", "--connect-timeout", "1"])
    assert rc == Exit.BAD_INPUT, text
    assert says in text and f"-e {expr!r}" in text, text
    assert "connect" not in text.lower() or "refused" not in text.lower()


def test_expression_names_and_pairs() -> None:
    """Default names are unique; a return probe pairs with the entry probe on the same function."""
    text = playbook_yaml(["k:vfs_read", "k:vfs_read+4", "kr:vfs_read", "ur:/bin/bash:readline"])
    pb = parse_playbook(text, "x")
    assert [p.name for p in pb.probes] == ["vfs_read", "vfs_read_2", "vfs_read_ret", "readline_ret"]
    assert pb.probe("vfs_read_ret").pair_with == "vfs_read"
    assert pb.probe("readline_ret").pair_with is None
    with pytest.raises(PlaybookError, match="used twice"):
        adhoc_playbook(["k:vfs_read as a", "k:vfs_write as a"])


def test_plan_shows_expressions_and_playbook_from_stdin(sim: SimFleet, tmp_path: Path) -> None:
    """``plan -e`` shows the lines the one-liner would write; ``plan -`` reads the playbook from stdin."""
    inv = inventory(sim, tmp_path, "h1")
    rc, text = cli(["plan", "-e", "uprobe:/bin/bash:readline", "-e", EXEC, *ssh(inv)])
    assert rc == Exit.OK, text
    assert "enable sched/sched_process_exec" in text
    assert "/bin/bash:0x" in text and "uprobe_events >>" in text, text
    done = fp(tmp_path, "plan", "-", *ssh(inv), "--json", "-",
              stdin="name: piped\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n")
    assert done.returncode == 0, done.stderr
    plans = json.loads(done.stdout)
    assert [p["event"] for p in plans[0]["probes"]] == ["sched/sched_process_exec"]


# --- 5. audits that notify -------------------------------------------------------------------------

def test_audit_json_verdict_grouped_findings_and_on_fail(sim: SimFleet, tmp_path: Path, run_id: str,
                                                         busy: None) -> None:
    """A rule broken on two hosts: one finding holding for both; --on-fail gets the same JSON on stdin."""
    inv = inventory(sim, tmp_path, "h1", "h2")
    pb = tmp_path / "noexec.yml"
    pb.write_text("name: noexec\nduration: 2s\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                  "    expect: none\n")
    hook_out = tmp_path / "hook.json"
    store = tmp_path / "runs.db"
    rc, text = cli(["audit", str(pb), *ssh(inv), "--store", str(store), "--json", str(tmp_path / "r.json"),
                    "--on-fail", f"cat > {hook_out}"])
    assert rc == Exit.AUDIT_FAILED, text
    # The terminal too says it once, for both hosts, with each host's own line under it.
    assert text.count("expect-none:") == 1 and "fired (expected none) on 2 hosts: h1, h2" in text, text
    assert "h1: probe 'exec' fired" in text and "h2: probe 'exec' fired" in text
    verdict = json.loads((tmp_path / "r.json").read_text())["audit"]
    assert verdict["verdict"] == "fail" and verdict["failed_hosts"] == ["h1", "h2"]
    assert verdict["rules"] == [{"probe": "exec", "rule": "expect", "value": "none"}]
    broken = [f for f in verdict["findings"] if f["kind"] == "expect-none"]
    assert len(broken) == 1 and broken[0]["hosts"] == ["h1", "h2"] and broken[0]["fails"]
    assert set(broken[0]["details"]) == {"h1", "h2"}
    assert json.loads(hook_out.read_text()) == verdict
    # history -n counts runs; --limit is the host pattern everywhere and not a count here.
    rc, text = cli(["history", "--store", str(store), "-n", "1"])
    assert rc == Exit.OK and "noexec" in text
    rc, _ = cli(["history", "--store", str(store), "--limit", "1"])
    assert rc == Exit.BAD_INPUT


def test_audit_result_line_has_journald_priority_under_the_unit(sim: SimFleet, tmp_path: Path,
                                                                  busy: None) -> None:
    """Under systemd (JOURNAL_STREAM names the very stream stdout is), a failed audit's logfmt line
    starts with ``<3>`` (err: ``journalctl -p err`` finds it), a passed one's with ``<6>``; when
    stdout is not that stream (the unit's command redirected it) the line has no prefix."""
    inv = inventory(sim, tmp_path, "h1")
    store = tmp_path / "runs.db"
    rules = {"fail": "    expect: none\n", "pass": ""}
    for verdict, rule in rules.items():
        pb = tmp_path / f"{verdict}.yml"
        pb.write_text(f"name: j{verdict}\nduration: 2s\nprobes:\n  - name: exec\n"
                      f"    tracepoint: sched/sched_process_exec\n{rule}")
        out = tmp_path / f"{verdict}.out"
        with out.open("w") as f:
            st = os.fstat(f.fileno())
            e = env(tmp_path) | {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            done = subprocess.run([sys.executable, "-m", "fleetprobe", "audit", str(pb), *ssh(inv), "--store",
                                   str(store)], stdout=f, stderr=subprocess.PIPE, text=True, env=e, timeout=90,
                                  check=False)
        assert done.returncode == (Exit.AUDIT_FAILED if verdict == "fail" else Exit.OK), done.stderr
        last = out.read_text().splitlines()[-1]
        prefix = "<3>" if verdict == "fail" else "<6>"
        assert last.startswith(f"{prefix}fleetprobe-audit verdict={verdict} "), last
        assert sum(x.startswith("<") for x in out.read_text().splitlines()) == 1, "only the result line"
    other = os.stat(store)
    e = env(tmp_path) | {"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"}
    done = subprocess.run([sys.executable, "-m", "fleetprobe", "audit", str(tmp_path / "fail.yml"), *ssh(inv),
                           "--store", str(store)], capture_output=True, text=True, env=e, timeout=90, check=False)
    assert done.returncode == Exit.AUDIT_FAILED, done.stderr
    assert done.stdout.splitlines()[-1].startswith("fleetprobe-audit verdict=fail "), done.stdout


# --- 6, 7. polish and the Python API ----------------------------------------------------------------

def test_traceback_anywhere_on_the_line(tmp_path: Path) -> None:
    """``--traceback`` after the subcommand works as before it."""
    done = fp(tmp_path, "plan", str(tmp_path / "nope.yml"), "-i", "127.0.0.1,", "--traceback")
    assert done.returncode == Exit.BAD_INPUT
    assert "Traceback (most recent call last)" in done.stderr and "PlaybookError" in done.stderr


def test_missing_extra_says_pip_install(tmp_path: Path) -> None:
    """--transport fabric without the fabric package: exit 1 and the pip line (not 'report it', exit 3)."""
    code = ("import sys; sys.modules['fabric'] = None; sys.modules['paramiko'] = None\n"
            "from fleetprobe.cli.main import entry\n"
            f"sys.argv = ['fleetprobe', 'run', '-e', {EXEC!r}, '-i', '127.0.0.1:1,', '--no-store', "
            "'--transport', 'fabric']\nentry()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(tmp_path),
                          timeout=60, check=False)
    assert done.returncode == Exit.BAD_INPUT, done.stderr
    assert "pip install 'fleetprobe[fabric]'" in done.stderr
    assert "report it" not in done.stderr


@pytest.mark.parametrize("kw,says", [({"duration": "2s"}, "duration must be seconds"),
                                     ({"forks": 0}, "forks must be a whole number >= 1"),
                                     ({"event_cap": 2.5}, "event_cap"), ({"mount_tracefs": "yes"}, "True or False"),
                                     ({"build_at": "there"}, "build_at")])
def test_run_settings_validate_at_construction(kw: dict[str, object], says: str) -> None:
    """A wrong field is a TypeError when RunSettings is made, naming the field and the value."""
    with pytest.raises(TypeError, match=says):
        RunSettings(**kw)  # type: ignore[arg-type]
    assert RunSettings(duration=2).duration == 2


def test_parse_playbook_is_public() -> None:
    """``fleetprobe.parse_playbook`` reads a playbook from a string."""
    import fleetprobe

    assert "parse_playbook" in fleetprobe.__all__
    pb = fleetprobe.parse_playbook("name: x\nprobes:\n  - name: e\n    tracepoint: sched/sched_process_exec\n", "s")
    assert pb.name == "x" and pb.tracepoints() == ["sched/sched_process_exec"]


def test_expression_aggregate_counts_at_the_source(sim: SimFleet, tmp_path: Path, run_id: str, busy: None) -> None:
    """``-e 'tracepoint:... | count(comm)'`` is the playbook's aggregate: the report has the comm table
    (here from the stream: this kernel has no hist triggers), with the busy loop's execs in it."""
    inv = inventory(sim, tmp_path, "h1")
    rc, text = cli(["run", "-e", f"{EXEC} | count(comm) top 50", *ssh(inv), "-d", "2s", "--run-id", run_id,
                    "--no-store", "--no-live", "--json", str(tmp_path / "r.json")])
    assert rc == Exit.OK, text
    data = json.loads((tmp_path / "r.json").read_text())
    tables = [t for t in data["aggregate"]["aggregates"]["tables"] if t["probe"] == "sched_process_exec"]
    assert [(t["kind"], t["field"]) for t in tables] == [("count", "comm")]
    counts = {key[0]: n for key, n, _ in tables[0]["rows"]}
    assert counts.get("true", 0) > 0, counts
    with pytest.raises(PlaybookError, match="count\\(\\) needs the fields"):
        adhoc_playbook(["k:vfs_read | count()"])
    with pytest.raises(PlaybookError, match="'x' is not a field of this probe"):
        adhoc_playbook(["k:vfs_read | hist(x)"])


@pytest.mark.parametrize("output", [["--print"], ["--events", "-"]])
def test_a_reader_that_goes_away_ends_the_run_cleanly(sim: SimFleet, tmp_path: Path, run_id: str, busy: None,
                                                      output: list[str]) -> None:
    """``--print | head -2`` (or ``--events - | head -2``): the run ends on every host as a Ctrl-C would,
    long before its 30 s, hosts are not failed for it, nothing is left, and fleetprobe exits 0."""
    inv = inventory(sim, tmp_path, "h1", "h2")
    line = " ".join([sys.executable, "-m", "fleetprobe", "run", "-e", EXEC, *ssh(inv), "-d", "30s",
                     "--run-id", run_id, "--no-store", "--json", str(tmp_path / "r.json"), *output])
    t0 = time.monotonic()
    done = subprocess.run(["bash", "-c", f"{line} | head -n 2; exit ${{PIPESTATUS[0]}}"], capture_output=True,
                          text=True, env=env(tmp_path), timeout=120, check=False)
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    assert "stdout was closed by its reader: probing stopped on every host" in done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert took < 25, f"the run went on for {took:.0f}s after its reader left"
    hosts = json.loads((tmp_path / "r.json").read_text())["hosts"]
    assert [(h["status"], h["cleanup"]) for h in hosts] == [("interrupted", "clean")] * 2, hosts


def test_event_stream_yields_events_as_they_come_and_stops_cleanly(sim: SimFleet, tmp_path: Path, run_id: str) -> None:
    """The Python API's async iterator: events of the test's own execs while the run goes on; leaving the
    loop early ends a 30 s run on every host within seconds, cleanly, with the merged report."""
    import asyncio

    from fleetprobe import EventStream, adhoc_playbook, load_inventory
    from fleetprobe.session import SSHOptions

    inv = load_inventory(str(inventory(sim, tmp_path, "h1", "h2")))
    pb, _ = adhoc_playbook([EXEC])
    marker = tmp_path / "stream-marker"
    os.symlink("/bin/true", marker)
    settings = RunSettings(ssh=SSHOptions(ssh_config=(), use_agent=False, connect_timeout=3), duration=30.0,
                           setup_timeout=10, run_id=run_id)

    async def go() -> tuple[list[str], float, EventStream]:
        seen: list[str] = []
        t0 = time.monotonic()
        async with EventStream(inv.hosts, pb, settings) as stream:
            async def workload() -> None:
                while True:
                    proc = await asyncio.create_subprocess_exec(str(marker))
                    await proc.wait()
                    await asyncio.sleep(0.2)

            work = asyncio.ensure_future(workload())
            try:
                async for ev in stream:
                    if ev.fields.get("filename") == str(marker):
                        seen.append(ev.host)
                    if {"h1", "h2"} <= set(seen):
                        break
            finally:
                work.cancel()
        return seen, time.monotonic() - t0, stream

    seen, took, stream = asyncio.run(go())
    assert {"h1", "h2"} <= set(seen)
    assert took < 25, f"{took:.0f}s: leaving the loop did not end the 30 s run"
    assert stream.report is not None and stream.dropped == 0
    assert [(o.host, o.status, o.cleanup) for o in stream.report.hosts] == [
        ("h1", "interrupted", "clean"), ("h2", "interrupted", "clean")]
    assert stream.report.aggregate.hits("sched_process_exec")["h1"] >= 1


def test_tables_as_tsv_and_json_for_scripts(sim: SimFleet, tmp_path: Path) -> None:
    """``facts --format tsv|json`` piped: a header line then one row a line, tab-separated, or a JSON
    array of objects; the cells are the table's, uncut; ``history --format tsv`` with no runs is the
    header alone (no people's note on stdout)."""
    name = "a-host-name-long-enough-that-eighty-columns-would-cut-it-" + "x" * 20
    inv = inventory(sim, tmp_path, name)
    tsv = fp(tmp_path, "facts", *ssh(inv), "--format", "tsv")
    assert tsv.returncode == 0, tsv.stderr
    head, *rows = tsv.stdout.splitlines()
    assert head.split("\t") == ["host", "arch", "kernel", "tracefs", "kprobes", "uprobes", "lockdown",
                                "modules", "clock", "leftovers"]
    assert len(rows) == 1 and rows[0].split("\t")[0] == name
    assert rows[0].split("\t")[2] == os.uname().release
    js = fp(tmp_path, "facts", *ssh(inv), "--format", "json")
    assert js.returncode == 0, js.stderr
    (row,) = json.loads(js.stdout)
    assert row["host"] == name and row["kernel"] == os.uname().release and row["uprobes"] == "yes"
    hist = fp(tmp_path, "history", "--store", str(tmp_path / "empty.db"), "--format", "tsv")
    assert hist.returncode == 0, hist.stderr
    assert hist.stdout.split("\n") == ["\t".join(["run", "playbook", "started", "took", "state", "hosts ok",
                                                  "events", "audit", "raw events"]), ""]


def test_tsv_and_json_escape_a_hostile_comm() -> None:
    """A cell holding a host's text (a comm with a tab, a newline and an escape sequence) stays one
    cell on one line in tsv, and json carries no raw control character either."""
    from rich.table import Table

    from fleetprobe.cli.output import print_table

    evil = "ev\til\nname\x1b[31m\x07"
    for fmt in ("tsv", "json"):
        t = Table()
        t.add_column("comm")
        t.add_column("pid")
        t.add_row(evil, "42")
        stream = io.StringIO()
        print_table(t, SafeConsole(file=stream, width=20), fmt)
        out = stream.getvalue()
        assert not any(c in out for c in "\x1b\x07"), repr(out)
        if fmt == "tsv":
            assert out.split("\n") == ["comm\tpid", "ev\\x09il\\x0aname\\x1b[31m\\x07\t42", ""], repr(out)
        else:
            assert json.loads(out) == [{"comm": "ev\\x09il\\x0aname\\x1b[31m\\x07", "pid": "42"}]
