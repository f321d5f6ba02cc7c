"""Issue 11: hostile hosts and hostile users, through real SSH (in-process asyncssh hosts that lie,
running the real facts script and runner against this machine's tracefs).

Each test names the finding it reproduces.  The CLI runs as a subprocess with stdout a pipe, as
the operator's own ``fleetprobe`` would: rich writes no styles to a pipe, so any ESC byte in what
it printed came from a host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.simhosts import SimFleet, strict_sim

pytestmark = [pytest.mark.tracefs]

ROOT = Path(__file__).resolve().parent.parent
TRACEFS = Path("/sys/kernel/tracing")

#: A terminal title change (OSC 0), a clear screen (CSI 2J), an OSC 52 clipboard write, a C1 CSI,
#: a right-to-left override; and rich markup that raises MarkupError if read as markup.
CONTROLS = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZWNobyBwd25lZA==\x07\x9b31m\u202e"
MARKUP = "[/]"

PLAYBOOK = """\
name: hostile
description: Program executions, seen by every simulated host (they share this kernel).
duration: 2s
probes:
  - name: exec
    tracepoint: sched/sched_process_exec
"""


@pytest.fixture
def run_id() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture
def sim(tmp_path: Path, run_id: str) -> Iterator[SimFleet]:
    """A sim fleet; afterwards every command it ran ended by itself and tracefs holds nothing of the run."""
    with strict_sim(tmp_path / "sim", run_id) as fleet:
        yield fleet


def fleetprobe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """``python -m fleetprobe ARGS`` with stdout and stderr pipes (bytes, as a terminal would get them)."""
    env = {**os.environ, "COLUMNS": "250", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fleetprobe", *args], capture_output=True, timeout=timeout,
                          env=env, cwd=ROOT)


def ssh_args(inventory: Path) -> list[str]:
    return ["-i", str(inventory), "--ssh-config", "none", "--no-agent", "--connect-timeout", "3",
            "--setup-timeout", "10"]


def assert_terminal_safe(out: bytes) -> str:
    """Nothing a host said drives the terminal: no ESC, no C1, no bidi override; returns the text."""
    text = out.decode("utf-8")
    assert "\x1b" not in text and "\x9b" not in text and "\u202e" not in text, text[-3000:]
    return text


def test_facts_and_plan_show_a_lying_kernel_release_as_text(sim: SimFleet, tmp_path: Path) -> None:
    """Findings 3 and 9: a kernel release of ``[/]`` + terminal controls is shown, escaped, by facts
    and plan (it crashed both with MarkupError), and kept raw in the JSON."""
    liar = sim.add("liar")
    sim.add("honest")
    release = MARKUP + CONTROLS
    arch = os.uname().machine
    liar.fake_facts = {"uname": [arch, release, "#1 SMP [bold]x[/bold]"]}
    inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    out = tmp_path / "facts.json"
    r = fleetprobe("facts", *ssh_args(inv), "--json", str(out))
    text = assert_terminal_safe(r.stdout + r.stderr)
    assert r.returncode == 0, text
    assert "[/]\\x1b]0;pwned\\x07\\x1b[2J" in text and "\\x9b31m\\u202e" in text, text
    facts = {item["host"]: item["facts"] for item in json.loads(out.read_text())}
    assert facts["liar"]["kernel_release"] == release           # raw in the machine output
    assert facts["honest"]["kernel_release"] == os.uname().release
    pb = tmp_path / "pb.yml"
    pb.write_text(PLAYBOOK)
    r = fleetprobe("plan", str(pb), *ssh_args(inv))
    text = assert_terminal_safe(r.stdout + r.stderr)
    assert r.returncode == 0, text
    assert f"{arch} [/]\\x1b]0;pwned" in text and "honest" in text, text


def test_run_shows_hostile_process_and_path_names_and_writes_every_output(sim: SimFleet, tmp_path: Path,
                                                                           run_id: str) -> None:
    """Findings 3 and 9: an unprivileged user execs a file named ``a[/]`` + terminal controls.
    The run's summary used to raise MarkupError before JSON, HTML, Markdown and the store were
    written (the whole run lost); now every output is written, the terminal gets escapes only,
    and the JSON keeps the raw name."""
    sim.add("h1")
    inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    # pytest's tmp_path is in root's 0700 folder: the user's file lives where that user can reach it.
    evil_dir = Path(tempfile.mkdtemp(prefix="fp-hostile-names-"))
    # "a[/]...": directory "a[", file "]..." (the kernel prints the whole path it was given).
    evil = evil_dir / ("a" + MARKUP + CONTROLS)
    evil.parent.mkdir()
    evil.symlink_to("/bin/true")
    pb = tmp_path / "pb.yml"
    pb.write_text(PLAYBOOK)
    # As nobody (uid 65534), not root: any user on a host chooses these names.
    os.chmod(evil_dir, 0o755)
    os.chmod(evil.parent, 0o755)
    loop = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
                             'while :; do "$0"; sleep 0.01; done', str(evil)], start_new_session=True)
    try:
        paths = {k: tmp_path / f"report.{k}" for k in ("json", "html", "md")}
        r = fleetprobe("run", str(pb), *ssh_args(inv), "--no-live", "--run-id", run_id,
                       "--json", str(paths["json"]), "--html", str(paths["html"]), "--markdown",
                       str(paths["md"]), "--store", str(tmp_path / "store.db"), "--events",
                       str(tmp_path / "events.jsonl"))
    finally:
        os.killpg(loop.pid, 9)
        loop.wait()
        shutil.rmtree(evil_dir)
    text = assert_terminal_safe(r.stdout + r.stderr)
    assert r.returncode == 0, text
    assert all(p.stat().st_size > 0 for p in paths.values())
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(e["fields"].get("filename") == str(evil) for e in events)   # raw value kept in JSON
    report = json.loads(paths["json"].read_text())
    assert report["hosts"][0]["status"] == "ok"
    assert "[/]\\x1b]0;pwned\\x07" in text, text           # shown, escaped, in the summary
    assert (tmp_path / "store.db").exists()


@pytest.mark.parametrize("lie", [
    {"realtime": ["nan"]}, {"realtime": ["inf"]}, {"realtime": ["1" + "0" * 400]},
    {"uid": ["9" * 5000], "ncpus": ["9" * 5000], "kernel_counts": ["9" * 5000, "1"]},
], ids=["nan-clock", "inf-clock", "400-digit-clock", "5000-digit-ints"])
def test_one_hosts_absurd_facts_are_its_own_bad_facts(sim: SimFleet, tmp_path: Path, lie: dict[str, list[str]]) -> None:
    """Finding 10: 5000-digit integers and a nan/inf clock in one host's facts are parsed defensively
    (the value is not used; the clock offset is not measured) and fail neither facts nor plan for
    that host or any other (on main: an internal error, or the whole command)."""
    liar = sim.add("liar")
    sim.add("honest")
    liar.fake_facts = dict(lie)
    inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    out = tmp_path / "facts.json"
    r = fleetprobe("facts", *ssh_args(inv), "--json", str(out))
    text = assert_terminal_safe(r.stdout + r.stderr)
    assert r.returncode == 0, text
    items = {item["host"]: item for item in json.loads(out.read_text())}
    assert items["honest"]["error"] is None and items["liar"]["error"] is None, items
    f = items["liar"]["facts"]
    if "realtime" in lie:
        assert f["realtime"] == 0.0 and any("is not a time" in p for p in f["problems"]), f["problems"]
        assert items["liar"]["clock_offset"] == 0.0
    else:
        assert (f["uid"], f["ncpus"], f["oops_count"]) == (-1, 1, None)
    pb = tmp_path / "pb.yml"
    pb.write_text(PLAYBOOK)
    r = fleetprobe("plan", str(pb), *ssh_args(inv), "--json", str(tmp_path / "plan.json"))
    assert r.returncode == 0, r.stdout.decode()
    plans = {item["host"]: item for item in json.loads((tmp_path / "plan.json").read_text())}
    assert plans["liar"]["error"] is None and plans["honest"]["error"] is None


def _bomb(levels: int = 8) -> str:
    """A YAML inventory of 1 kB whose aliases expand to 10^levels nodes."""
    text = "x0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels + 1):
        text += f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return text


@pytest.mark.parametrize("case", [
    "playbook-duration-inf", "playbook-duration-huge", "filter-cr", "filter-esc", "raw-nul",
    "duration-1e400s", "duration-huge", "grace-negative", "teardown-slack-negative", "grace-huge",
    "limit-bad-regex", "range-unbounded", "alias-bomb",
])
def test_bad_input_is_refused_before_connecting(sim: SimFleet, tmp_path: Path, case: str) -> None:
    """Finding 12: each is exit 1 with a message naming what is wrong, and no host is connected to
    (on main: .inf, the filter's \\r, the negative grace and slack connected and ran)."""
    from fleetprobe.cli.main import main
    from fleetprobe.render.safe import SafeConsole

    host = sim.add("h1")
    inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    pb = tmp_path / "pb.yml"
    probe = "  - name: exec\n    tracepoint: sched/sched_process_exec\n"
    pb.write_text("name: bad\nduration: 1s\nprobes:\n" + probe)
    cmd = ["plan", str(pb)]
    extra: list[str] = []
    expect = ""
    if case.startswith("playbook-duration"):
        pb.write_text("name: bad\nduration: " + (".inf" if case.endswith("inf") else "99999999999999999999h")
                      + "\nprobes:\n" + probe)
        expect = "duration"
    elif case.startswith("filter") or case == "raw-nul":
        bad = {"filter-cr": "pid > 1\\r", "filter-esc": "pid > 1\\e[2J", "raw-nul": "pid > 1\\0"}[case]
        pb.write_text("name: bad\nduration: 1s\nprobes:\n" + probe + f'    filter: "{bad}"\n')
        expect = "control character"
    elif case.startswith(("duration", "grace", "teardown")):
        cmd = ["run", str(pb)]
        opt, value = {"duration-1e400s": ("--duration", "1e400s"), "duration-huge": ("--duration", "9999999h"),
                      "grace-negative": ("--grace", "-5"), "grace-huge": ("--grace", "99999999999"),
                      "teardown-slack-negative": ("--teardown-slack", "-5")}[case]
        extra = [opt, value, "--no-store", "--no-live"]
        expect = ""   # argparse's own message (exit 1 is checked)
    elif case == "limit-bad-regex":
        extra = ["--limit", "~("]
        expect = "--limit"
    elif case == "range-unbounded":
        inv.write_text(inv.read_text().replace(
            "    sim:\n      hosts:\n", "    sim:\n      hosts:\n        web[1:99999999999]: {}\n"))
        expect = "expands to more than"
    elif case == "alias-bomb":
        inv.write_text(_bomb() + inv.read_text())
        expect = "aliases expand"
    console = SafeConsole(record=True, width=250)
    rc = main([*cmd, *ssh_args(inv), *extra], console)
    text = console.export_text()
    assert rc == 1, text
    assert expect in text, text
    assert host.connections == 0, "refused input must not connect to any host"


RUNNER = ROOT / "fleetprobe" / "runner" / "runner.sh"


def _module_checks(*commands: str) -> subprocess.CompletedProcess[str]:
    """The runner's own module-file checks (the block between its markers), then ``commands``, in sh."""
    text = RUNNER.read_text()
    start = text.index("# --- module file checks")
    end = text.index("# --- end of module file checks ---")
    return subprocess.run(["sh", "-c", text[start:end] + "\n" + "\n".join(commands)], capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A directory made as put_private makes one (mktemp -d under /tmp, fp_ name), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the runner runs as root)")
    d = Path(subprocess.run(["mktemp", "-d", "/tmp/fp_ttest_0000_mod.mod.XXXXXXXXXX"], capture_output=True,
                            text=True, check=True).stdout.strip())
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("trap", ["none", "symlink", "other-owner", "group-writable", "hard-link", "dir-0755",
                                  "dir-symlink", "not-ours"])
def test_module_file_checks_refuse_what_a_user_planted(private_dir: Path, tmp_path: Path, trap: str) -> None:
    """Finding 6: before insmod the runner checks the file is what the controller wrote (regular, one
    link, ours, writable by no one else, in our 0700 directory).  Only the checks run here: insmod is
    never reached and no module is ever loaded on this machine."""
    ko = private_dir / "fp_ttest_0000_mod.ko"
    ko.write_bytes(b"\x7fELF not a module")
    ko.chmod(0o600)
    target = ko
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    if trap == "symlink":
        ko.unlink()
        ko.symlink_to(victim)
    elif trap == "other-owner":
        os.chown(ko, 65534, 65534)
    elif trap == "group-writable":
        ko.chmod(0o660)
    elif trap == "hard-link":
        os.link(ko, private_dir / "other")
    elif trap == "dir-0755":
        private_dir.chmod(0o755)
    elif trap == "dir-symlink":
        link = Path(str(private_dir) + "-link")
        link.symlink_to(private_dir)
        target = link / ko.name
    elif trap == "not-ours":
        target = victim
    try:
        r = _module_checks(f'module_file_ok "{target}"; echo "rc=$?"')
    finally:
        if trap == "dir-symlink":
            Path(str(private_dir) + "-link").unlink()
    assert r.stdout.strip().endswith("rc=0" if trap == "none" else "rc=1"), (r.stdout, r.stderr)
    assert victim.read_text() == "root's file"


def test_module_dirs_removed_are_only_ours(private_dir: Path) -> None:
    """Finding 6: teardown removes the run's private module directories, not a look-alike a user made."""
    theirs = Path(str(private_dir).replace(".mod.", ".mod.user"))
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    try:
        r = _module_checks('remove_module_dirs fp_ttest_0000')
        assert r.returncode == 0, r.stderr
        assert not private_dir.exists() and theirs.exists()
    finally:
        shutil.rmtree(theirs, ignore_errors=True)


def test_put_private_writes_a_fresh_0700_directory_and_follows_no_planted_link(sim: SimFleet, tmp_path: Path) -> None:
    """Finding 6, the controller's half, through real SSH: the module goes to a new mktemp -d directory;
    a symlink planted at the old predictable path /tmp/NAME.ko is never written through."""
    import asyncio

    from fleetprobe.connectors.asyncssh import connect
    from fleetprobe.inventory import load_inventory
    from fleetprobe.session import SSHOptions, put_private

    sim.add("h1")
    inv = load_inventory(str(sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "kh"))))
    name = "fp_ttest_0001_mod"
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    planted = Path(f"/tmp/{name}.ko")
    planted.unlink(missing_ok=True)
    planted.symlink_to(victim)

    async def go() -> str:
        session = await connect(inv.hosts[0], SSHOptions(ssh_config=(), use_agent=False, connect_timeout=5))
        try:
            return await put_private(session, b"\x7fELF module bytes", name)
        finally:
            await session.close()

    try:
        path = Path(asyncio.run(go()))
        try:
            assert path.parent.name.startswith(f"{name}.mod.") and path.read_bytes() == b"\x7fELF module bytes"
            st = path.parent.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
            assert path.stat().st_mode & 0o077 == 0
            assert _module_checks(f'module_file_ok "{path}"; echo "rc=$?"').stdout.strip().endswith("rc=0")
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
    finally:
        planted.unlink()
    assert victim.read_text() == "root's file"


UPROBE_PLAYBOOK = """\
name: hostile-uprobe
description: bash's shell_execve, on hosts whose binaries may be forged.
duration: 2s
probes:
  - name: execve
    uprobe: /bin/bash:shell_execve
"""


def _forged(data: bytes, how: str) -> bytes | None:
    """bash's bytes as a hostile host sends them."""
    import struct

    from fleetprobe import elf

    if how == "truncated":
        return data[:5000]
    if how == "endless":
        return None
    h = elf._header(data)
    secs = elf._sections(data, h)
    out = bytearray(data)
    fmt = h.endian + ("IIQQQQIIQQ" if h.is64 else "IIIIIIIIII")
    shsize = struct.calcsize(fmt)
    for i, sec in enumerate(secs):
        if sec.type not in (2, 11):
            continue
        if how == "entsize-1":
            # sh_entsize = 1: a table of millions of "symbols" that used to cost gigabytes
            off = h.shoff + i * h.shentsize + (shsize - 8 if h.is64 else shsize - 4)
            struct.pack_into(h.endian + ("Q" if h.is64 else "I"), out, off, 1)
            continue
        strtab = secs[sec.link]
        for j in range(1, sec.size // sec.entsize):
            off = sec.offset + j * sec.entsize
            st_name = struct.unpack_from(h.endian + "I", data, off)[0]
            if elf._cstr(data, strtab.offset + st_name) == "shell_execve":
                value_at = off + (8 if h.is64 else 4)
                fmt_v = h.endian + ("Q" if h.is64 else "I")
                struct.pack_into(fmt_v, out, value_at, struct.unpack_from(fmt_v, data, value_at)[0] + 0x11)
    return bytes(out)


@pytest.mark.parametrize("how", ["lying-md5", "truncated", "endless", "entsize-1"])
def test_a_hosts_forged_binary_is_its_own_problem(sim: SimFleet, tmp_path: Path, how: str) -> None:
    """Finding 4: a host that sends forged bytes for /bin/bash (its facts claim the real md5; the
    bytes put shell_execve elsewhere, are truncated, never end, or have a 1-byte symbol entsize) gets
    an error for its own uprobe; the honest host, planning after it, gets the offset of the real
    bytes; plan ends within its deadline.  (On main the liar's parse was shared by claimed md5.)"""
    from fleetprobe import elf

    real = Path("/bin/bash").read_bytes()
    try:
        offset = elf.symbol_file_offset(real, "shell_execve")
    except ValueError:
        pytest.skip("this machine's bash has no shell_execve symbol")
    liar = sim.add("liar")
    sim.add("honest", "slow", 2.0)   # plans after the liar's fetch began
    liar.fake_files = {"/bin/bash": _forged(real, "entsize-1" if how == "entsize-1" else
                                            "symbol" if how == "lying-md5" else how)}
    inv = sim.inventory(tmp_path / "inv.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    pb = tmp_path / "pb.yml"
    pb.write_text(UPROBE_PLAYBOOK)
    out = tmp_path / "plan.json"
    r = fleetprobe("plan", str(pb), *ssh_args(inv), "--setup-timeout", "8", "--json", str(out), timeout=90)
    assert r.returncode in (0, 2), (r.stdout + r.stderr).decode()
    plans = {item["host"]: item for item in json.loads(out.read_text())}
    honest = plans["honest"]
    assert honest["error"] is None, honest
    assert [p["definition"] for p in honest["probes"]] and all(
        f"/bin/bash:{offset:#x}" in p["definition"] for p in honest["probes"]), honest
    liar_text = json.dumps(plans["liar"])
    assert f"/bin/bash:{offset + 0x11:#x}" not in (json.dumps(honest))
    assert not [p for p in plans["liar"]["probes"] if f"/bin/bash:{offset:#x}" not in p["definition"]], liar_text
    if how == "entsize-1":
        # Refused by its table check (on main the 1-byte scan ran over every byte of the table).
        assert "entry size 1 is smaller than" in liar_text, liar_text
    elif how == "lying-md5":
        assert "the bytes fetched have md5" in liar_text, liar_text


@pytest.mark.parametrize("console_kind", ["safe", "plain-rich"])
def test_live_view_shows_host_details_as_text(console_kind: str) -> None:
    """Findings 3 and 9 in the live view: a host's failure detail holding markup and terminal
    controls is shown escaped on a terminal, through fleetprobe's console and through a plain
    rich Console an API user might pass (the renderer itself makes host text visible)."""
    import io

    from rich.console import Console

    from fleetprobe.render.live import LiveView
    from fleetprobe.render.safe import SafeConsole

    out = io.StringIO()
    kind = SafeConsole if console_kind == "safe" else Console
    console = kind(file=out, force_terminal=True, width=200, color_system=None)
    view = LiveView(console, ["h1", "h2"])
    view.set_state("h1", "failed", "runner said " + MARKUP + CONTROLS)
    view.set_state("h2", "probing")
    console.print(view.render())
    text = out.getvalue()
    assert "\x1b]" not in text and "\x9b" not in text and "\u202e" not in text
    assert "[/]\\x1b]0;pwned\\x07" in text, text
