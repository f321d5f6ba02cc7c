"""Issue 14 item 2, discovery: ``fleetprobe list [PATTERN] -i INV`` and ``plan`` failing a host that places nothing.

Sim hosts run the real listing script over real SSH on this machine's tracefs; a host whose kernel
differs is one that prints other sections (SimHost.fake_list), as a host with another kernel would.
Expected names come from this machine's files and binutils' nm, not from fleetprobe.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simhosts import SimFleet

from fleetprobe.cli.main import main
from fleetprobe.cli.options import Exit
from fleetprobe.discover import glob_regex, parse_query
from fleetprobe.errors import InputError
from fleetprobe.render.safe import SafeConsole

ROOT = Path(__file__).resolve().parent.parent
TRACEFS = Path("/sys/kernel/tracing")


def inventory(sim: SimFleet, tmp_path: Path) -> Path:
    return sim.inventory(tmp_path / "inventory.yml", sim.known_hosts_for(tmp_path / "known_hosts"))


def ssh(inv: Path) -> list[str]:
    return ["-i", str(inv), "--ssh-config", "none", "--no-agent", "--connect-timeout", "3", "--setup-timeout", "20"]


def cli(args: list[str]) -> tuple[int, str]:
    console = SafeConsole(record=True, width=250)
    rc = main(args, console=console)
    return rc, console.export_text()


def fp(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "fleetprobe", *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def this_kernels_tracepoints(glob: str) -> set[str]:
    return {line for line in (TRACEPOINT_FILE.read_text().split()) if fnmatch.fnmatchcase(line, glob)}


TRACEPOINT_FILE = TRACEFS / "available_events"


def test_tracepoints_with_the_hosts_that_have_each(sim: SimFleet, tmp_path: Path) -> None:
    """Two hosts on this kernel and one whose kernel lacks a tracepoint (and has one more): each name with
    its count of hosts and the host it is missing on; the JSON through jq-able stdout."""
    sim.add("h1")
    sim.add("h2")
    old = sim.add("old")
    want = this_kernels_tracepoints("sched:sched_process_*")
    assert "sched:sched_process_exec" in want and "sched:sched_process_fork" in want
    lacks = "sched:sched_process_fork"
    old.fake_list = {"tracepoints": ["ok", *sorted(want - {lacks}), "sched:sched_process_vendor"]}
    inv = inventory(sim, tmp_path)
    done = fp(tmp_path, "list", "tracepoint:sched:sched_process_*", *ssh(inv), "--json", "-")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    names = {n["name"]: n for n in data["names"]}
    assert set(names) == want | {"sched:sched_process_vendor"}
    assert names["sched:sched_process_exec"]["hosts"] == ["h1", "h2", "old"]
    assert names[lacks]["missing"] == ["old"]
    assert names["sched:sched_process_vendor"]["hosts"] == ["old"]
    assert all(n["kind"] == "tracepoint" for n in data["names"])
    rc, text = cli(["list", "t:sched/sched_process_*", *ssh(inv)])
    assert rc == Exit.OK, text
    assert any(line.split()[:3] == ["tracepoint", lacks, "2/3"] and line.endswith("missing on: old")
               for line in text.splitlines()), text
    assert any(line.split() == ["tracepoint", "sched:sched_process_exec", "3/3"] for line in text.splitlines()), text


def test_a_bare_pattern_matches_tracepoints_by_event_name_and_shows_fields(sim: SimFleet, tmp_path: Path) -> None:
    """``list sched_process_exec --fields``: the tracepoint by its event name, its fields from the format file."""
    sim.add("h1")
    inv = inventory(sim, tmp_path)
    rc, text = cli(["list", "sched_process_exec", "--fields", *ssh(inv)])
    assert rc == Exit.OK, text
    fmt = (TRACEFS / "events/sched/sched_process_exec/format").read_text()
    fields = [line.strip()[len("field:"):].split(";")[0] for line in fmt.splitlines()
              if line.strip().startswith("field:") and " common_" not in line]
    assert fields and all(f"    {f}" in text for f in fields), text
    assert "tracepoint  sched:sched_process_exec  1/1" in text, text


def test_a_typo_gets_near_names_from_the_hosts_and_exit_1(sim: SimFleet, tmp_path: Path) -> None:
    sim.add("h1")
    inv = inventory(sim, tmp_path)
    rc, text = cli(["list", "sched_proces_exec", *ssh(inv)])
    assert rc == Exit.BAD_INPUT, text
    assert "nothing matches 'sched_proces_exec'" in text
    suggestion = [line for line in text.splitlines() if line.startswith("did you mean:")]
    assert suggestion and "sched:sched_process_exec" in suggestion[0], text
    done = fp(tmp_path, "list", "tracepoint:sched:sched_switc", *ssh(inv), "--json", "-")
    assert done.returncode == Exit.BAD_INPUT, done.stderr
    assert "sched:sched_switch" in json.loads(done.stdout)["suggestions"]


def test_kernel_functions_only_where_kprobes_work(sim: SimFleet, tmp_path: Path) -> None:
    """This machine cannot kprobe (and may not let its function list be read): it says why and lists none;
    a host with kprobe_events and a readable list has its functions counted, alone."""
    sim.add("here")
    k = sim.add("kprobing")
    k.fake_list = {"tracefs": [str(TRACEFS), "kprobe_events", "uprobe_events"],
                   "functions": ["ok", "vfs_read", "vfs_readv", "vfs_read", "vfs_readlink"]}
    inv = inventory(sim, tmp_path)
    rc, text = cli(["list", "kprobe:vfs_read*", *ssh(inv), "--json", str(tmp_path / "l.json")])
    assert rc == Exit.OK, text
    aff = TRACEFS / "available_filter_functions"
    try:
        aff.open().read(1)
        why = "no kprobe_events" if not (TRACEFS / "kprobe_events").exists() else None
    except OSError as exc:
        why = f"cannot read {aff}: {exc.strerror}"
    assert why is not None, "this test expects a machine without kprobes (LAB.md): kprobes work here"
    assert f"cannot list kernel functions on here: {why}" in text, text
    data = json.loads((tmp_path / "l.json").read_text())
    assert [(n["name"], n["hosts"], n["missing"]) for n in data["names"]] == [
        ("vfs_read", ["kprobing"], []), ("vfs_readlink", ["kprobing"], []), ("vfs_readv", ["kprobing"], [])]
    assert "function    vfs_read      1/1" in text, text


def test_binary_symbols_match_nm(sim: SimFleet, tmp_path: Path) -> None:
    """``-x /bin/bash 'readline*'`` (and ``uprobe:/bin/bash:readline*``): bash's defined function symbols as
    binutils' nm reads them, on both hosts (the binary is fetched once: same bytes)."""
    sim.add("h1")
    sim.add("h2")
    inv = inventory(sim, tmp_path)
    nm = subprocess.run(["nm", "-D", "--defined-only", "/bin/bash"], capture_output=True, text=True, check=True)
    want = {w[2] for w in (line.split() for line in nm.stdout.splitlines())
            if len(w) == 3 and w[1] in "TtWi" and fnmatch.fnmatchcase(w[2], "readline*")}
    assert "readline" in want
    done = fp(tmp_path, "list", "-x", "/bin/bash", "readline*", *ssh(inv), "--json", "-")
    assert done.returncode == 0, done.stderr
    got = {n["name"] for n in json.loads(done.stdout)["names"] if n["missing"] == [] and n["hosts"] == ["h1", "h2"]}
    assert got == want
    rc, text = cli(["list", "uprobe:/bin/bash:readline", *ssh(inv)])
    assert rc == Exit.OK and "symbol      readline  2/2" in text, text
    rc, text = cli(["list", "-x", "/no/such/binary", *ssh(inv)])
    assert rc == Exit.BAD_INPUT and "cannot list symbols on h1, h2: /no/such/binary does not exist" in text, text


def test_hostile_lines_are_dropped_not_shown(sim: SimFleet, tmp_path: Path) -> None:
    """A host that answers with escape sequences and markup where names go: counted and dropped."""
    liar = sim.add("liar")
    liar.fake_list = {"tracepoints": ["ok", "sched:sched_process_exec", "\x1b]0;pwned\x07:x", "[/]:bad",
                                      "evil:a\u202eb"]}
    inv = inventory(sim, tmp_path)
    done = fp(tmp_path, "list", "t:*", *ssh(inv))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout + done.stderr and "pwned" not in done.stdout
    assert "liar: 3 line(s) of its answer were not names (dropped)" in done.stdout
    assert done.stdout.splitlines()[0].split() == ["tracepoint", "sched:sched_process_exec", "1/1"]


@pytest.mark.parametrize("pattern,says", [
    ("vfs_read;reboot", "holds ';'"),
    ("uprobe:bash:readline", "uprobe:/ABSOLUTE/PATH:SYMBOL_GLOB"),
    ("$(id)", "holds '()'"),
])
def test_bad_patterns_are_refused_before_any_connection(pattern: str, says: str) -> None:
    rc, text = cli(["list", pattern, "-i", "127.0.0.1:1,"])
    assert rc == Exit.BAD_INPUT and says in text, text
    assert "connect" not in text


def test_glob_regex_is_anchored_and_escapes() -> None:
    assert glob_regex("vfs_*") == "^vfs_.*$"
    assert glob_regex("a.b?") == r"^a\.b.$"
    with pytest.raises(InputError, match="-x lists|lists kernel names"):
        parse_query("kprobe:vfs_read", "/bin/bash")
    assert parse_query("tracepoint:sched/sched_switch").glob == "sched:sched_switch"


def test_plan_fails_a_host_that_places_nothing(sim: SimFleet, tmp_path: Path) -> None:
    """Every probe skipped (a kprobe where kprobes do not work): plan says so and exits non-zero."""
    sim.add("h1")
    inv = inventory(sim, tmp_path)
    rc, text = cli(["plan", "-e", "kprobe:vfs_read", *ssh(inv)])
    assert rc == Exit.NONE_OK, text
    assert "skip vfs_read" in text and "places nothing" in text, text
    rc, text = cli(["plan", "-e", "kprobe:vfs_read", "-e", "tracepoint:sched:sched_process_exec", *ssh(inv)])
    assert rc == Exit.OK and "places nothing" not in text, text


def test_plan_suggests_near_names_for_a_typo(sim: SimFleet, tmp_path: Path) -> None:
    """A typo'd tracepoint, and a kernel function a kprobing host lacks: the skip reason names the near
    names from that host's own lists (and the playbook's spelling, group/event)."""
    sim.add("h1")
    k = sim.add("kprobing")
    k.fake_facts = {"files_tracefs": ["kprobe_events w", "uprobe_events w", "instances d"], "aff": [], "kallsyms": []}
    k.fake_list = {"tracefs": [str(TRACEFS), "kprobe_events", "uprobe_events"],
                   "functions": ["ok", "vfs_read", "vfs_write", "vfs_readv"]}
    inv = inventory(sim, tmp_path)
    rc, text = cli(["plan", "-e", "tracepoint:sched:sched_proces_exec", *ssh(inv), "--limit", "h1"])
    assert rc == Exit.NONE_OK, text
    assert "does not exist on this kernel" in text and "(did you mean sched/sched_process_exec" in text, text
    rc, text = cli(["plan", "-e", "kprobe:vfs_raed", *ssh(inv), "--limit", "kprobing", "--json", str(tmp_path / "p.json")])
    assert rc == Exit.NONE_OK, text
    plans = json.loads((tmp_path / "p.json").read_text())
    reason = plans[0]["skipped"][0]["reason"]
    assert "vfs_raed is not in available_filter_functions or kallsyms" in reason, reason
    assert "(did you mean vfs_read or " in reason, reason          # the closest first
