"""The command line in-process: exit statuses, input errors before any host, plan and cleanup over real SSH."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from fleetprobe.render.safe import SafeConsole

from simhosts import SimFleet

from fleetprobe import elf
from fleetprobe.cli.main import main
from fleetprobe.cli.options import Exit, parse_duration
from fleetprobe.cli.run import exit_status
from fleetprobe.outcome import HostOutcome

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
TRACEFS = Path("/sys/kernel/tracing")


def cli(args: list[str], width: int = 200) -> tuple[int, str]:
    """Run fleetprobe in-process; exit status and what it printed."""
    console = SafeConsole(record=True, width=width)
    rc = main(args, console=console)
    return rc, console.export_text()


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0),
                                          ("2.5", 2.5), (" 3s ", 3.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations with units, as operators type them."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["500ms", "10s", "5m", "1h", "2.5", " 3s ", "0", "-1s", "10 minutes", "1d", "s"])
def test_one_duration_grammar_for_options_and_playbooks(text: str) -> None:
    """--duration and a playbook's quoted ``duration:`` accept and refuse the same texts, with the same value."""
    import argparse

    from fleetprobe.errors import PlaybookError
    from fleetprobe.playbook import parse_playbook

    try:
        option: float | None = parse_duration(text)
    except argparse.ArgumentTypeError:
        option = None
    try:
        in_playbook: float | None = parse_playbook(f"name: d\nduration: '{text}'\nprobes: [{{name: e, tracepoint: a/b}}]\n",
                                                   "d.yml").duration
    except PlaybookError:
        in_playbook = None
    assert option == in_playbook


@pytest.mark.parametrize("text", ["", "0", "-1s", "10 minutes", "1d", "s"])
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is refused with an example of what works."""
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="e.g. 500ms"):
        parse_duration(text)


def outcomes(*statuses: str) -> list[HostOutcome]:
    """Outcomes with the given statuses."""
    return [HostOutcome(host=f"h{i}", status=s) for i, s in enumerate(statuses)]


@pytest.mark.parametrize("statuses,interrupted,expected", [
    (("ok", "ok"), False, Exit.OK),
    (("ok", "skipped"), False, Exit.OK),
    (("ok", "failed"), False, Exit.SOME_FAILED),
    (("ok", "unreachable"), False, Exit.SOME_FAILED),
    (("failed", "unreachable"), False, Exit.NONE_OK),
    (("skipped",), False, Exit.NONE_OK),
    ((), False, Exit.NONE_OK),
    (("ok",), True, Exit.INTERRUPTED),
])
def test_exit_status(statuses: tuple[str, ...], interrupted: bool, expected: Exit) -> None:
    """0 all ok, 2 some failed, 3 none ok, 130 interrupted."""
    assert exit_status(outcomes(*statuses), interrupted) == expected


def test_usage_errors_exit_1_not_2() -> None:
    """A usage error is bad input (1); argparse's own 2 would read as 'some hosts failed'."""
    assert cli([])[0] == Exit.BAD_INPUT
    assert cli(["run"])[0] == Exit.BAD_INPUT
    assert cli(["run", "x.yml", "-i", "h1", "--duration", "soon"])[0] == Exit.BAD_INPUT
    assert cli(["frobnicate"])[0] == Exit.BAD_INPUT


def test_version_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints and exits 0."""
    assert cli(["--version"])[0] == Exit.OK
    assert "fleetprobe" in capsys.readouterr().out


def test_bad_inventory_names_file() -> None:
    """An inventory error is exit 1 and names the file."""
    rc, text = cli(["facts", "-i", str(DATA / "inventory" / "bad-port.yml")])
    assert rc == Exit.BAD_INPUT
    assert f"{DATA / 'inventory' / 'bad-port.yml'}" in text and "bad port 'seventy'" in text


def test_limit_matching_nothing_is_bad_input() -> None:
    """--limit that selects no host: exit 1 before connecting anywhere."""
    rc, text = cli(["facts", "-i", "db1,db2", "--limit", "web*"])
    assert rc == Exit.BAD_INPUT and "matches no host" in text


def test_module_playbook_needs_consent(tmp_path: Path) -> None:
    """A playbook that loads modules without allow_modules: exit 1 with the way to consent."""
    text = (DATA / "playbooks" / "good" / "module.yml").read_text().replace("allow_modules: true\n", "")
    pb = ROOT / "tests" / "data" / "playbooks" / "good" / f".consent-{secrets.token_hex(3)}.yml"
    pb.write_text(text)                     # next to the original: its module dir is relative to the repo
    try:
        rc, out = cli(["run", str(pb), "-i", "nohost.invalid", "--no-live"])
    finally:
        pb.unlink()
    assert rc == Exit.BAD_INPUT, out
    assert "loads kernel modules" in out and "--allow-modules" in out


# --- plan and cleanup over real SSH to a sim host -------------------------------------------



def sim_inventory(sim: SimFleet, tmp_path: Path) -> Path:
    """An inventory of one normal sim host."""
    sim.add("h1")
    return sim.inventory(tmp_path / "inventory.yml", sim.known_hosts_for(tmp_path / "known_hosts"))


def ssh(inv: Path) -> list[str]:
    """No user config, no agent, short timeouts."""
    return ["-i", str(inv), "--ssh-config", "none", "--no-agent", "--connect-timeout", "3",
            "--setup-timeout", "10"]


def fp_names() -> set[str]:
    """fp_ instances and dynamic-event lines on this kernel right now."""
    names = {p.name for p in (TRACEFS / "instances").iterdir() if p.name.startswith("fp_")}
    names |= {line for line in (TRACEFS / "uprobe_events").read_text().splitlines() if ":fp_" in line}
    return names


def append_event(line: str) -> None:
    """Append one line to uprobe_events (never truncate; Python's "a" mode seeks, which tracefs refuses)."""
    fd = os.open(TRACEFS / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def test_plan_prints_lines_and_changes_nothing(sim: SimFleet, tmp_path: Path) -> None:
    """fleetprobe plan: the exact lines a run would write, skips with reasons; nothing is written on the host."""
    inv = sim_inventory(sim, tmp_path)
    rc, text = cli(["plan", str(ROOT / "playbooks" / "execsnoop.yml"), *ssh(inv)])
    assert rc == Exit.OK, text
    assert "enable sched/sched_process_exec" in text
    # kprobes do not work on this kernel: the fork probe is skipped with the reason.
    assert "skip fork" in text and "kprobe" in text, text
    assert sim.hosts[0].ran("runner") == [] and len(sim.hosts[0].ran("facts")) == 1


def test_cleanup_removes_stale_leftovers_only(sim: SimFleet, tmp_path: Path) -> None:
    """fleetprobe cleanup sweeps a dead run's instance and orphaned events, and leaves a live run alone."""
    inv = sim_inventory(sim, tmp_path)
    rid = "c" + secrets.token_hex(3)
    stale = TRACEFS / "instances" / f"fp_{rid}_abcd_1000000000"
    live = TRACEFS / "instances" / f"fp_{rid}_abce_{4000000000}"
    offset = elf.symbol_file_offset(Path("/bin/bash").read_bytes(), "readline")
    orphan = f"p:fp_{rid}_abcf/stale /bin/bash:{offset:#x}"
    try:
        stale.mkdir()
        live.mkdir()
        append_event(orphan)
        # Wide: another session's live run on this kernel adds its names to the same cells, and a
        # wrapped cell would split the names looked for below.
        rc, text = cli(["cleanup", *ssh(inv)], width=4000)
        # Not asserting the exit status: a live run (ours, or another session's on this kernel) is
        # listed under "still there", and cleanup counts that as a failure.
        assert rc in (Exit.OK, Exit.NONE_OK), text
        assert not stale.exists()
        assert f"fp_{rid}_abcf" not in (TRACEFS / "uprobe_events").read_text()
        assert live.exists()                              # deadline in the future: a live run, untouched
        assert f"instance fp_{rid}_abce_4000000000" in text   # and reported as still there
        assert f"fp_{rid}_abcd_1000000000" in text and f"fp_{rid}_abcf" in text
    finally:
        for d in (stale, live):
            if d.exists():
                d.rmdir()
        if f"fp_{rid}_abcf" in (TRACEFS / "uprobe_events").read_text():
            append_event(f"-:fp_{rid}_abcf/stale")
    assert not any(rid in n for n in fp_names())


def _modules_imported(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (a real subprocess: sys.modules is global)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_help_imports_no_ssh_no_rich_no_builder() -> None:
    """`fleetprobe --help` builds the parsers only: SSH, rendering and the module builder load when used."""
    mods = _modules_imported("from fleetprobe.cli.main import main\nassert main(['--help']) == 0")
    heavy = {"asyncssh", "rich", "fleetprobe.orchestrate", "fleetprobe.connectors.asyncssh", "fleetprobe.kmod.compile",
             "fleetprobe.render.html", "fleetprobe.render.terminal", "fleetprobe.cli.run", "fleetprobe.cli.history"}
    assert not heavy & mods, heavy & mods
    assert "fleetprobe.cli.options" in mods  # the check sees what --help does import


def test_orchestrator_imports_no_builder_and_no_rendering() -> None:
    """A tracefs run needs neither the module builder nor rich: they load for module playbooks / output."""
    mods = _modules_imported("import fleetprobe.orchestrate")
    assert "asyncssh" in mods
    assert not {"fleetprobe.kmod.compile", "fleetprobe.kmod.debian", "fleetprobe.kmod.ko", "fleetprobe.elf",
                "fleetprobe.render.terminal", "rich"} & mods


def test_package_names_load_on_first_use() -> None:
    """`import fleetprobe` is cheap; every name in __all__ still resolves (to its module's object)."""
    assert "asyncssh" not in _modules_imported("import fleetprobe")
    import fleetprobe
    from fleetprobe import orchestrate
    from fleetprobe.connectors import asyncssh as ssh_connector

    assert fleetprobe.run_playbook is orchestrate.run_playbook and fleetprobe.SSHOptions is ssh_connector.SSHOptions
    for name in fleetprobe.__all__:
        assert getattr(fleetprobe, name) is not None
    with pytest.raises(AttributeError):
        fleetprobe.no_such_name  # noqa: B018


def test_where_choices_match_the_builder() -> None:
    from fleetprobe.cli import options
    from fleetprobe.kmod import plan

    assert options.WHERE_CHOICES == plan.WHERE_CHOICES
