"""History store: round trips, run references, retention, concurrent writers and a writer killed mid-save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetprobe.errors import InputError
from fleetprobe.results import FleetReport
from fleetprobe.store import Store, default_path
from reports import build_report, extra_exec, host_text, real_lines

TESTS = Path(__file__).parent


def _report(run_id: str, started: float, extra: str = "") -> FleetReport:
    """A two-host report built from real trace lines."""
    lines = real_lines()
    return build_report({"web-1": host_text(lines, 0, started + 1), "web-2": host_text(lines, 1, started + 2) + extra},
                        run_id=run_id, started=started, statuses={"db-1": "unreachable"})


def _events_file(path: Path, report: FleetReport, n: int) -> Path:
    """A raw-events file as EventWriter writes it (one JSON object per line)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"host": "web-1", "probe": "exec", "time": 1795655000.0 + i, "trace_ts": 100.0 + i,
                                "cpu": i % 2, "pid": 1000 + i, "comm": "sh", "site": "",
                                "fields": {"filename": f"/usr/bin/x{i % 50}"}}) + "\n")
    return path


def test_default_path_is_under_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_path() == tmp_path / "data" / "fleetprobe" / "history.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_path() == Path(os.environ["HOME"]) / ".local" / "share" / "fleetprobe" / "history.sqlite3"
    with Store() as s:  # creates the folder
        assert s.path.exists() and s.integrity() == "ok"


def test_run_round_trip(tmp_path: Path) -> None:
    report = _report("abc123", 1795655000.0, extra_exec("insmod", "/usr/sbin/insmod", 120.0))
    events = _events_file(tmp_path / "ev.jsonl", report, 3000)
    with Store(tmp_path / "h.sqlite3") as s:
        s.begin_run("abc123", "execaudit", started=1795655000.0, inventory_path="inv.yml")
        assert [r.state for r in s.runs()] == ["running"]  # this process is alive
        s.save_run(report, playbook_text="name: execaudit\n", inventory_text="all: {}\n",
                   facts={"web-1": {"arch": "x86_64", "kernel_release": "6.18.44"}}, events_path=events)
        [row] = s.runs()
        assert (row.run_id, row.state, row.hosts, row.hosts_ok, row.has_events) == ("abc123", "complete", 3, 2, True)
        loaded = s.load_report("abc123")
        assert loaded.to_json() == report.to_json()
        assert s.playbook_text("abc123") == "name: execaudit\n"
        assert s.inventory_text("abc123") == "all: {}\n"
        assert s.host_facts("abc123") == {"web-1": {"arch": "x86_64", "kernel_release": "6.18.44"}}
        assert s.host_statuses("abc123") == {"db-1": "unreachable", "web-1": "ok", "web-2": "ok"}
        stored = list(s.events("abc123"))
        assert stored == [json.loads(line) for line in events.read_text().splitlines()]
        # Compressed: the store is much smaller than the raw events it holds.
        assert s.path.stat().st_size + Path(str(s.path) + "-wal").stat().st_size < events.stat().st_size
        with pytest.raises(InputError, match="already complete"):
            s.save_run(report)


def test_run_references(tmp_path: Path) -> None:
    with Store(tmp_path / "h.sqlite3") as s:
        for i, run_id in enumerate(("aaa111", "aab222", "bcd333")):
            s.save_run(_report(run_id, 1795655000.0 + 100 * i))
        assert s.resolve("bc") == "bcd333"
        assert s.resolve("last") == "bcd333"
        assert s.resolve("last~2") == "aaa111"
        with pytest.raises(InputError, match="ambiguous: aaa111, aab222"):
            s.resolve("aa")
        with pytest.raises(InputError, match="no run 'zz'"):
            s.resolve("zz")
        with pytest.raises(InputError, match="no run last~3"):
            s.resolve("last~3")
        with pytest.raises(InputError, match="not a run reference"):
            s.resolve("last~x")
        # A LIKE wildcard is a character, not a pattern.
        with pytest.raises(InputError, match="no run"):
            s.resolve("_")
        assert s.previous_run("execaudit", before="bcd333") == "aab222"
        assert s.previous_run("execaudit", before="aaa111") is None
        assert s.previous_run("other", before="bcd333") is None


def test_retention_drops_old_events_then_old_runs(tmp_path: Path) -> None:
    with Store(tmp_path / "h.sqlite3") as s:
        now = 1795655000.0 + 40 * 86400
        for run_id, started in (("old001", 1795655000.0), ("new001", now - 3600)):
            rep = _report(run_id, started)
            s.save_run(rep, events_path=_events_file(tmp_path / f"{run_id}.jsonl", rep, 10))
        assert s.prune(events_days=30, now=now) == (1, 0)
        rows = {r.run_id: r for r in s.runs()}
        assert not rows["old001"].has_events and rows["new001"].has_events
        assert s.load_report("old001").run.run_id == "old001"  # the report is kept
        assert list(s.events("old001")) == []
        assert s.prune(events_days=None, runs_days=30, now=now) == (0, 1)
        assert [r.run_id for r in s.runs()] == ["new001"]
        assert s.integrity() == "ok"


def test_unusable_store_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError) as info:
        Store(blocker / "h.sqlite3")
    assert str(blocker) in str(info.value) and "--store" in str(info.value)
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match="cannot open the history store"):
        Store(garbage)


_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from fleetprobe.store import Store
from reports import build_report, host_text, real_lines
tag, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = real_lines()
with Store(path) as s:
    for i in range(n):
        run_id = f"{{tag}}{{i:03d}}"
        s.begin_run(run_id, "execaudit")
        s.save_run(build_report({{"h-" + tag: host_text(lines, i, 1795655000.0 + i)}}, run_id=run_id,
                                started=1795655000.0 + i))
        s.set_audit(run_id, i % 2 == 0, {{"run_id": run_id}})
"""


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Four audits writing at once (separate processes, as on a bastion): every run stored, file sound."""
    path = tmp_path / "h.sqlite3"
    Store(path).close()
    code = _WRITER.format(tests=str(TESTS))
    procs = [subprocess.Popen([sys.executable, "-c", code, tag, "15", str(path)], stderr=subprocess.PIPE)
             for tag in ("w", "x", "y", "z")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    with Store(path) as s:
        rows = s.runs()
        assert len(rows) == 60 and {r.state for r in rows} == {"complete"}
        assert sum(1 for r in rows if r.audit == "pass") == 32
        assert s.integrity() == "ok"


_KILLED = """
import json, sys
sys.path.insert(0, {tests!r})
from fleetprobe.store import Store
from reports import build_report, host_text, real_lines
path, events = sys.argv[1], sys.argv[2]
with Store(path) as s:
    rep = build_report({{"web-1": host_text(real_lines(), 0, 1795655100.0)}}, run_id="kil001", started=1795655100.0)
    s.begin_run("kil001", "execaudit")
    print("saving", flush=True)
    s.save_run(rep, events_path=events)
    print("saved", flush=True)
"""


def test_writer_killed_mid_save_leaves_the_store_consistent(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    with Store(path) as s:
        s.save_run(_report("ok0001", 1795655000.0))
    # Big enough that compressing it into the store takes well over the moment we wait.
    events = tmp_path / "big.jsonl"
    with open(events, "w") as f:
        for i in range(600_000):
            f.write(f'{{"host":"web-1","probe":"exec","time":{1795655100 + i / 1e3},"pid":{i},'
                    f'"comm":"c{i % 977}","fields":{{"filename":"/x/{i * 7919 % 100003}"}}}}\n')
    proc = subprocess.Popen([sys.executable, "-c", _KILLED.format(tests=str(TESTS)), str(path), str(events)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"saving\n"
    time.sleep(0.3)
    assert proc.poll() is None, "the save finished before it could be killed: make the events file bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store(path) as s:
        assert s.integrity() == "ok"
        rows = {r.run_id: r for r in s.runs()}
        assert rows["kil001"].state == "killed" and not rows["kil001"].has_events
        assert rows["ok0001"].state == "complete"
        with pytest.raises(InputError, match="never completed"):
            s.resolve("kil")
        assert s.resolve("last") == "ok0001"
        # The store is writable again at once (the dead writer's lock is gone).
        s.save_run(_report("ok0002", 1795655200.0))
        assert s.resolve("last") == "ok0002"


def test_stale_event_files_of_killed_runs_are_removed(tmp_path: Path) -> None:
    """A killed run leaves its temporary events file next to the store; the next run removes it once stale."""
    from fleetprobe.cli.extras import STALE_EVENTS_SECONDS, _remove_stale_event_files

    old = tmp_path / ".events-abc123-x1.jsonl"
    fresh = tmp_path / ".events-def456-x2.jsonl"
    other = tmp_path / "notes.jsonl"
    for p in (old, fresh, other):
        p.write_text("{}\n")
    past = time.time() - STALE_EVENTS_SECONDS - 60
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    _remove_stale_event_files(tmp_path)
    assert not old.exists() and fresh.exists() and other.exists()
