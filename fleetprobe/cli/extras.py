"""What ``run`` and ``audit`` do around a run: :class:`RunExtras` picks the shard's hosts and the
transport, keeps each host's facts, sets up the event sinks (``--events``, ``--print``), stores
the run and writes the HTML and Markdown reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from fleetprobe.audit import AuditResult
from fleetprobe.cli.eventformat import FormatPrinter
from fleetprobe.cli.history import open_store, write_reports
from fleetprobe.cli.output import STDOUT
from fleetprobe.errors import InputError
from fleetprobe.eventout import EventOutputs, PrinterFactory
from fleetprobe.facts import Facts
from fleetprobe.inventory import Host, Inventory
from fleetprobe.plan import new_run_id
from fleetprobe.playbook import Playbook
from fleetprobe.render.eventlines import EventPrinter
from fleetprobe.results import FleetReport
from fleetprobe.settings import RunSettings
from fleetprobe.shard import Shard, select_hosts
from fleetprobe.store import DEFAULT_EVENTS_DAYS, Store



class RunExtras:
    """Around one run: the shard's hosts, the transport, facts per host, the store and the report files.

    Use: ``x = RunExtras(args, playbook)``; ``x.hosts(inv)``; ``x.settings(s)``;
    ``x.begin()`` before the run; ``x.finish(report)`` after it, before anything is rendered
    (and ``x.close()`` in ``finally``).
    """

    def __init__(self, args: argparse.Namespace, playbook: Playbook, *, store: bool | None = None) -> None:
        """Open the store now (before any host is touched) unless ``--no-store``."""
        self.args = args
        self.playbook = playbook
        keep = not getattr(args, "no_store", False) if store is None else store
        self.store: Store | None = open_store(args) if keep else None
        self.facts: dict[str, dict[str, Any]] = {}
        #: The run's host names (known once hosts() picked the shard's).
        self._hosts: list[str] = []
        self.run_id = getattr(args, "run_id", None) or new_run_id()
        self._tmp_events: Path | None = None
        user_events = getattr(args, "events", None)
        #: ``--events -``: JSON lines on stdout (the store still gets the events through its temporary file).
        self.stdout_json = user_events == STDOUT
        #: Set once the reader of stdout went away (``--print | head``): the run was ended for it.
        self.reader_gone = False
        #: Ends the run (the run's interrupted event's set(), once the run started).
        self.stop: Callable[[], None] | None = None
        if self.stdout_json:
            user_events = None
        #: ``--print``'s printer class and its arguments (made where the events are written: this
        #: process or each worker); the host column's width is set once the shard is known.
        self._printer: dict[str, Any] | None = None
        if getattr(args, "print", False):
            formats = {p.name: p.print_format for p in playbook.probes if p.print_format is not None}
            names = [p.name for p in playbook.probes]
            # The playbook's print: formats where it has them (the plain printer's fast path otherwise).
            self._printer = {"probes": names, "formats": formats} if formats else {"probes": names}
        if user_events:
            self.events_path: str | None = str(user_events)
        elif self.store is not None:
            _remove_stale_event_files(self.store.path.parent)
            # Raw events are streamed to a file next to the store, then compressed into it.
            fd, name = tempfile.mkstemp(prefix=f".events-{self.run_id}-", suffix=".jsonl",
                                        dir=self.store.path.parent)
            os.close(fd)
            self._tmp_events = Path(name)
            self.events_path = name
        else:
            self.events_path = None

    def _stdout_closed(self) -> None:
        """The reader of stdout is gone (``| head``): end the run on every host as a Ctrl-C would.
        Events no one reads are not worth probing for, and no host failed for it."""
        if not self.reader_gone:
            self.reader_gone = True
            print("stdout was closed by its reader: probing stopped on every host", file=sys.stderr, flush=True)
            if self.stop is not None:
                self.stop()

    def outputs(self) -> EventOutputs:
        """Where the run's raw events go (run_playbook_workers writes them, on one loop or in each worker,
        and puts the user's destination's counts in the report)."""
        printer: PrinterFactory | None = None
        if self._printer is not None:
            kwargs = {**self._printer, "hosts": self._hosts}
            printer = partial(FormatPrinter, **kwargs) if "formats" in kwargs else partial(EventPrinter, **kwargs)
        return EventOutputs(path=self.events_path, stdout_json=self.stdout_json, printer=printer,
                            on_stdout_closed=self._stdout_closed)

    def hosts(self, inventory: Inventory) -> tuple[Host, ...]:
        """This shard's hosts (all of them without ``--shard``); an empty shard is an input error."""
        shard: Shard | None = getattr(self.args, "shard", None)
        hosts = select_hosts(inventory.hosts, shard)
        self._hosts = [h.name for h in hosts]
        if not hosts:
            raise InputError(f"shard {shard} of this inventory has no hosts" if shard else "the inventory has no hosts",
                             where=str(getattr(self.args, "inventory", "")),
                             hint="use fewer shards than hosts" if shard else "check the inventory and --limit")
        return hosts

    def settings(self, settings: RunSettings) -> RunSettings:
        """The run's settings with this run id, the chosen transport, and facts collection."""
        connect = settings.connect
        if getattr(self.args, "transport", "asyncssh") == "fabric":
            # Local: fabric/paramiko are an optional extra; a missing one is main()'s pip hint, only for --transport fabric.
            from fleetprobe.connectors import fabric

            connect = fabric.connect
        return replace(settings, run_id=self.run_id, connect=connect, on_facts=self._on_facts)

    def _on_facts(self, host: str, facts: Facts) -> None:
        """Keep a host's facts for the store."""
        self.facts[host] = facts.to_json()

    def begin(self) -> None:
        """Record the run as started (a killed run then shows as ``killed`` in the history)."""
        if self.store is not None:
            self.store.begin_run(self.run_id, self.playbook.name, inventory_path=str(self.args.inventory))

    def finish(self, report: FleetReport, audit_result: AuditResult | None = None) -> list[str]:
        """Store the run, apply event retention, write the HTML/Markdown reports; print nothing.

        Returns the lines saying what was written, to print after the summary."""
        written: list[str] = []
        if self.store is not None:
            text = getattr(self.args, "playbook_text", None) or _read_text(self.playbook.source)
            self.store.save_run(report, playbook_text=text,
                                inventory_text=_inventory_text(str(self.args.inventory)), facts=self.facts,
                                events_path=self.events_path if self.events_path and
                                Path(self.events_path).exists() else None)
            keep = getattr(self.args, "keep_events_days", DEFAULT_EVENTS_DAYS)
            self.store.prune(events_days=keep)
            written.append(f"run {report.run.run_id} stored in {self.store.path}")
        return written + write_reports(self.args, report, audit_result, self.playbook)

    def close(self) -> None:
        """Remove the temporary events file and close the store."""
        if self._tmp_events is not None:
            self._tmp_events.unlink(missing_ok=True)
        if self.store is not None:
            self.store.close()


#: A temporary events file older than this belongs to a run that was killed (no run lasts this long).
STALE_EVENTS_SECONDS = 2 * 86400


def _remove_stale_event_files(folder: Path) -> None:
    """Delete temporary raw-event files that killed runs left next to the store."""
    cutoff = time.time() - STALE_EVENTS_SECONDS
    for path in folder.glob(".events-*.jsonl"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass  # another audit removed it first


def _read_text(path: str) -> str | None:
    """A file's text, or None when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _inventory_text(spec: str) -> str:
    """The inventory as it was: the file's text, or the ad-hoc host list itself."""
    text = _read_text(spec) if os.path.isfile(spec) else None
    return text if text is not None else spec

