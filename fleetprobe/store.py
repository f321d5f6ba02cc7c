"""Store: every run's history in one SQLite file, safe for several audits writing at once.

What a run keeps: its playbook text (deduplicated by sha256), the inventory
it ran against (secret variables redacted: :mod:`fleetprobe.redact`), each host's outcome and facts, the merged report (the same
JSON ``--json`` writes, zlib-compressed) and the raw events (JSON lines,
zlib-compressed in chunks so neither writing nor reading holds them all in
memory).  Raw events are the bulky part and have their own retention.

Concurrency and crashes are SQLite's job, done properly: WAL journal (readers
never block the writer), ``busy_timeout`` (a second writer waits instead of
failing), and every write is one ``BEGIN IMMEDIATE`` transaction, so an audit
killed at any instant leaves either its whole run or none of it.  A run is
first recorded as ``running`` with the writer's pid; if that process dies
before completing, :meth:`Store.runs` shows the run as ``killed``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fleetprobe.errors import InputError
from fleetprobe.redact import redact_secrets
from fleetprobe.results import FleetReport

SCHEMA_VERSION = 1
#: Seconds a writer waits for another writer's transaction before giving up.
BUSY_TIMEOUT = 60.0
#: Uncompressed bytes of raw events per stored chunk.
EVENT_CHUNK = 1 << 20
#: Raw events are dropped after this many days by default (runs and reports are kept).
DEFAULT_EVENTS_DAYS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS playbooks (
    sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    playbook TEXT NOT NULL,
    playbook_sha256 TEXT REFERENCES playbooks(sha256),
    state TEXT NOT NULL CHECK (state IN ('running', 'complete')),
    pid INTEGER,
    started REAL NOT NULL,
    ended REAL,
    inventory_path TEXT NOT NULL DEFAULT '',
    inventory_text TEXT,
    hosts INTEGER NOT NULL DEFAULT 0,
    hosts_ok INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    report BLOB,
    audit TEXT CHECK (audit IN ('pass', 'fail')),
    audit_json TEXT);
CREATE INDEX IF NOT EXISTS runs_by_playbook ON runs (playbook, started);
CREATE TABLE IF NOT EXISTS host_runs (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    host TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL,
    arch TEXT NOT NULL,
    kernel_release TEXT NOT NULL,
    events INTEGER NOT NULL,
    facts TEXT,
    PRIMARY KEY (run_id, host));
CREATE TABLE IF NOT EXISTS event_chunks (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, seq));
"""


def default_path() -> Path:
    """``$XDG_DATA_HOME/fleetprobe/history.sqlite3`` (``~/.local/share`` when XDG_DATA_HOME is unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(base) / "fleetprobe" / "history.sqlite3"


@dataclass(frozen=True)
class RunRow:
    """One stored run as ``fleetprobe history`` lists it.

    ``state`` is ``complete``, ``running`` (its writer is alive) or ``killed``
    (its writer died before completing: nothing but this row was stored).
    """

    run_id: str
    playbook: str
    playbook_sha256: str
    state: str
    started: float
    ended: float | None
    inventory: str
    hosts: int
    hosts_ok: int
    events: int
    audit: str | None
    has_events: bool


def _pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _private_store_files(path: Path, *, default: bool) -> None:
    """Create the store's folder (0700) and database file (0600) whatever the umask.

    The history holds what hosts printed (typed lines, paths) and the inventory: readable by
    the operator only. The default folder is fleetprobe's own and is made 0700 even if an
    older fleetprobe created it 0755; a folder the user named is created 0700 when missing
    and otherwise left as it is (it may be shared on purpose).
    """
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)
    elif default:
        os.chmod(folder, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class Store:
    """A history database; use as a context manager (or call :meth:`close`)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        """Open (creating it and its folder when missing) the store at ``path`` (default: :func:`default_path`)."""
        self.path = Path(path) if path is not None else default_path()
        self._db = sqlite3.connect(":memory:")  # replaced below; lets close() work on every path
        try:
            _private_store_files(self.path, default=path is None)
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a
            # writer takes the write lock up front (and waits busy_timeout for
            # it) instead of failing with SQLITE_BUSY half-way through.
            self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            # FULL: a committed audit survives a power cut too (audits are few and small).
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            with self._write():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is None:
                    self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise InputError(f"history schema {row[0]} is newer than this fleetprobe's ({SCHEMA_VERSION})",
                                     where=str(self.path), hint="upgrade fleetprobe, or use another --store")
        except (sqlite3.DatabaseError, OSError) as exc:
            self._db.close()
            raise InputError(f"cannot open the history store: {exc}", where=str(self.path),
                             hint="check the path and its permissions, or pass --store PATH / --no-store") from None
        for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode; make sure of it
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.chmod(side, 0o600)
        if mode.lower() != "wal":
            self._db.close()
            # WAL needs shared memory: not available on some network filesystems.
            raise InputError(f"cannot use WAL journaling (got {mode!r}); the store must be on a local filesystem",
                             where=str(self.path), hint="put the store on local disk with --store PATH")

    # -- plumbing ----------------------------------------------------------------------------

    def _write(self) -> _Transaction:
        """A write transaction: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error."""
        return _Transaction(self._db)

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()

    def __enter__(self) -> Store:
        """Context manager entry."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close on exit."""
        self.close()

    # -- writing -----------------------------------------------------------------------------

    def begin_run(self, run_id: str, playbook: str, *, started: float | None = None,
                  inventory_path: str = "") -> None:
        """Record that a run started (state ``running``, this process's pid); complete it with :meth:`save_run`."""
        with self._write():
            self._insert_started(run_id, playbook, started if started is not None else time.time(),
                                 inventory_path)

    def _insert_started(self, run_id: str, playbook: str, started: float, inventory_path: str) -> None:
        """The ``running`` row; a run id already stored is refused."""
        try:
            self._db.execute("INSERT INTO runs (run_id, playbook, state, pid, started, inventory_path) "
                             "VALUES (?, ?, 'running', ?, ?, ?)",
                             (run_id, playbook, os.getpid(), started, inventory_path))
        except sqlite3.IntegrityError:
            raise InputError(f"run {run_id} is already in the history", where=str(self.path),
                             hint="each run needs a fresh run id") from None

    def save_run(self, report: FleetReport, *, playbook_text: str | None = None,
                 inventory_text: str | None = None, facts: Mapping[str, Mapping[str, Any]] | None = None,
                 events_path: str | os.PathLike[str] | None = None) -> None:
        """Store a finished run in one transaction: playbook, inventory, hosts, report and raw events.

        Completes a run begun with :meth:`begin_run` or stores a new one.
        ``facts`` maps host name to its facts as JSON (``Facts.to_json()``).
        """
        run = report.run
        if inventory_text is not None:
            inventory_text = redact_secrets(inventory_text)
        report_blob = zlib.compress(json.dumps(report.to_json(), separators=(",", ":"),
                                               allow_nan=False).encode(), 6)
        events = sum(o.events for o in report.hosts)
        ok = sum(1 for o in report.hosts if o.status == "ok")
        with self._write():
            row = self._db.execute("SELECT state FROM runs WHERE run_id = ?", (run.run_id,)).fetchone()
            if row is None:
                self._insert_started(run.run_id, run.playbook, run.started, run.inventory)
            elif row[0] == "complete":
                raise InputError(f"run {run.run_id} is already complete in the history", where=str(self.path))
            sha = run.playbook_sha256 or None
            if sha is not None and playbook_text is not None:
                self._db.execute("INSERT OR IGNORE INTO playbooks VALUES (?, ?, ?, ?)",
                                 (sha, run.playbook, run.playbook_path, playbook_text))
            elif sha is not None and self._db.execute("SELECT 1 FROM playbooks WHERE sha256 = ?",
                                                       (sha,)).fetchone() is None:
                sha = None
            self._db.execute(
                "UPDATE runs SET playbook = ?, playbook_sha256 = ?, state = 'complete', pid = NULL, "
                "started = ?, ended = ?, inventory_path = ?, inventory_text = ?, hosts = ?, hosts_ok = ?, "
                "events = ?, report = ? WHERE run_id = ?",
                (run.playbook, sha, run.started, run.ended, run.inventory, inventory_text, len(report.hosts),
                 ok, events, report_blob, run.run_id))
            for o in report.hosts:
                host_facts = (facts or {}).get(o.host)
                self._db.execute("INSERT OR REPLACE INTO host_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (run.run_id, o.host, o.status, o.stage, o.reason, o.arch, o.kernel_release,
                                  o.events, json.dumps(host_facts) if host_facts is not None else None))
            if events_path is not None:
                self._store_events(run.run_id, Path(events_path))

    def _store_events(self, run_id: str, path: Path) -> None:
        """Copy a JSON-lines events file into compressed chunks (bounded memory: one chunk at a time)."""
        seq = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(EVENT_CHUNK)
                if not chunk:
                    break
                # Cut at the last newline so every chunk holds whole lines.
                if not chunk.endswith(b"\n"):
                    rest = f.readline()
                    chunk += rest
                self._db.execute("INSERT INTO event_chunks VALUES (?, ?, ?, ?)",
                                 (run_id, seq, chunk.count(b"\n"), zlib.compress(chunk, 6)))
                seq += 1

    def set_audit(self, run_id: str, passed: bool, result: Mapping[str, Any]) -> None:
        """Record a run's audit verdict and findings."""
        with self._write():
            cur = self._db.execute("UPDATE runs SET audit = ?, audit_json = ? WHERE run_id = ?",
                                   ("pass" if passed else "fail", json.dumps(result, allow_nan=False), run_id))
            if cur.rowcount != 1:
                raise InputError(f"run {run_id} is not in the history", where=str(self.path))

    def prune(self, *, events_days: float | None = DEFAULT_EVENTS_DAYS, runs_days: float | None = None,
              now: float | None = None) -> tuple[int, int]:
        """Drop raw events older than ``events_days`` and whole runs older than ``runs_days``.

        Returns (runs whose events were dropped, runs dropped).  Killed runs
        count as old once their start is past ``runs_days``.
        """
        now = time.time() if now is None else now
        dropped_events = dropped_runs = 0
        with self._write():
            if events_days is not None:
                cur = self._db.execute(
                    "DELETE FROM event_chunks WHERE run_id IN (SELECT run_id FROM runs WHERE started < ?)",
                    (now - events_days * 86400,))
                dropped_events = cur.rowcount
            if runs_days is not None:
                cutoff = now - runs_days * 86400
                old = [r[0] for r in self._db.execute(
                    "SELECT run_id FROM runs WHERE started < ? AND state = 'complete'", (cutoff,))]
                # A run still 'running' is old only once its writer is gone (killed).
                old += [r[0] for r in self._db.execute(
                    "SELECT run_id, pid FROM runs WHERE started < ? AND state = 'running'", (cutoff,))
                    if not _pid_alive(r[1])]
                for run_id in old:
                    self._db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
                dropped_runs = len(old)
                self._db.execute("DELETE FROM playbooks WHERE sha256 NOT IN "
                                 "(SELECT playbook_sha256 FROM runs WHERE playbook_sha256 IS NOT NULL)")
        return dropped_events, dropped_runs

    # -- reading -----------------------------------------------------------------------------

    def runs(self, *, playbook: str | None = None, limit: int | None = None) -> list[RunRow]:
        """Stored runs, newest first (optionally of one playbook)."""
        sql = ("SELECT run_id, playbook, COALESCE(playbook_sha256, ''), state, pid, started, ended, inventory_path, "
               "hosts, hosts_ok, events, audit, EXISTS (SELECT 1 FROM event_chunks e WHERE e.run_id = runs.run_id) "
               "FROM runs")
        params: list[Any] = []
        if playbook is not None:
            sql += " WHERE playbook = ?"
            params.append(playbook)
        sql += " ORDER BY started DESC, run_id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        out = []
        for (run_id, pb, sha, state, pid, started, ended, inv, hosts, ok, events, audit,
             has_events) in self._db.execute(sql, params):
            if state == "running" and not _pid_alive(pid):
                state = "killed"
            out.append(RunRow(run_id, pb, sha, state, started, ended, inv, hosts, ok, events, audit,
                              bool(has_events)))
        return out

    def resolve(self, ref: str) -> str:
        """A complete run's id from a reference: its id, a unique prefix, ``last`` or ``last~N``."""
        ref = ref.strip()
        if ref == "last" or ref.startswith("last~"):
            try:
                back = int(ref[5:]) if ref != "last" else 0
            except ValueError:
                back = -1
            if back < 0:
                raise InputError(f"{ref!r} is not a run reference", hint="use a run id, 'last' or 'last~N'")
            rows = self._db.execute("SELECT run_id FROM runs WHERE state = 'complete' "
                                    "ORDER BY started DESC, run_id DESC LIMIT 1 OFFSET ?", (back,)).fetchall()
            if not rows:
                raise InputError(f"no run {ref} in the history", where=str(self.path))
            return str(rows[0][0])
        rows = self._db.execute("SELECT run_id, state FROM runs WHERE run_id LIKE ? ESCAPE '\\'",
                                (ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",)
                                ).fetchall()
        if not rows:
            raise InputError(f"no run {ref!r} in the history", where=str(self.path),
                             hint="'fleetprobe history' lists the stored runs")
        if len(rows) > 1:
            raise InputError(f"run {ref!r} is ambiguous: {', '.join(sorted(r[0] for r in rows)[:5])}",
                             hint="give more characters of the run id")
        if rows[0][1] != "complete":
            raise InputError(f"run {rows[0][0]} never completed (it was killed or is still running)",
                             where=str(self.path))
        return str(rows[0][0])

    def load_report(self, run_id: str) -> FleetReport:
        """The stored report of a complete run."""
        row = self._db.execute("SELECT report FROM runs WHERE run_id = ? AND state = 'complete'",
                               (run_id,)).fetchone()
        if row is None or row[0] is None:
            raise InputError(f"no complete run {run_id!r} in the history", where=str(self.path))
        return FleetReport.from_json(json.loads(zlib.decompress(row[0])))

    def playbook_text(self, run_id: str) -> str | None:
        """The playbook text a run ran (None if it was not stored)."""
        row = self._db.execute("SELECT p.text FROM runs r JOIN playbooks p ON p.sha256 = r.playbook_sha256 "
                               "WHERE r.run_id = ?", (run_id,)).fetchone()
        return None if row is None else str(row[0])

    def inventory_text(self, run_id: str) -> str | None:
        """The inventory a run ran against, as it was then (None if not stored)."""
        row = self._db.execute("SELECT inventory_text FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def host_facts(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Facts stored per host for a run (hosts without facts left out)."""
        return {h: json.loads(f) for h, f in self._db.execute(
            "SELECT host, facts FROM host_runs WHERE run_id = ? AND facts IS NOT NULL ORDER BY host", (run_id,))}

    def host_statuses(self, run_id: str) -> dict[str, str]:
        """Status per host of a run."""
        return dict(self._db.execute("SELECT host, status FROM host_runs WHERE run_id = ? ORDER BY host",
                                     (run_id,)).fetchall())

    def audit_result(self, run_id: str) -> dict[str, Any] | None:
        """The stored audit findings of a run (None if it was not audited)."""
        row = self._db.execute("SELECT audit_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None or row[0] is None else dict(json.loads(row[0]))

    def events(self, run_id: str) -> Iterator[dict[str, Any]]:
        """The run's raw events, one dict per event, decompressed a chunk at a time."""
        seq = -1
        while True:
            row = self._db.execute("SELECT seq, data FROM event_chunks WHERE run_id = ? AND seq > ? "
                                   "ORDER BY seq LIMIT 1", (run_id, seq)).fetchone()
            if row is None:
                return
            seq = int(row[0])
            for line in zlib.decompress(row[1]).splitlines():
                if line:
                    yield dict(json.loads(line))

    def previous_run(self, playbook: str, *, before: str) -> str | None:
        """The newest complete run of ``playbook`` that started before run ``before`` (the audit baseline)."""
        row = self._db.execute("SELECT started FROM runs WHERE run_id = ?", (before,)).fetchone()
        started = float(row[0]) if row is not None else time.time()
        prev = self._db.execute(
            "SELECT run_id FROM runs WHERE playbook = ? AND state = 'complete' AND run_id != ? "
            "AND started <= ? ORDER BY started DESC, run_id DESC LIMIT 1", (playbook, before, started)).fetchone()
        return None if prev is None else str(prev[0])

    def integrity(self) -> str:
        """SQLite's own integrity check (``ok`` when the file is sound)."""
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])


class _Transaction:
    """``with``-block around BEGIN IMMEDIATE / COMMIT / ROLLBACK."""

    def __init__(self, db: sqlite3.Connection) -> None:
        """Wrap ``db`` (opened with isolation_level=None)."""
        self._db = db

    def __enter__(self) -> None:
        """Take the write lock now (waiting up to busy_timeout for another writer)."""
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Commit, or roll back when the block raised."""
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
