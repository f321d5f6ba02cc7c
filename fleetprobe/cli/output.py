"""Where the command line's output goes: data to stdout (``-``) or files, people's text and errors apart.

Pipes (issue 14): every file option takes ``-`` for stdout.  When a command's data goes to stdout,
everything meant for people (tables, summaries, "written to" lines) goes to stderr, so
``fleetprobe run ... --json - | jq .`` reads only JSON.  Errors always go to stderr.  When stdout
is not a terminal, tables are drawn at their full width instead of being cut to 80 columns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import IO, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleetprobe.errors import InputError
from fleetprobe.outfiles import write_atomic
from fleetprobe.render.safe import SafeConsole, visible
from fleetprobe.results import FleetReport


#: The file name that means stdout.
STDOUT = "-"
#: Options that name a file a command writes (argparse dest -> the option as the user typed it).
FILE_OPTIONS = {"json": "--json", "events": "--events", "html": "--html", "markdown": "--markdown",
                "output": "--output", "prometheus": "--prometheus"}
#: Width of a console that is not a terminal: wide enough that no table cell is cut (rich draws a
#: table only as wide as its content; this is a ceiling, not padding).
PIPE_WIDTH = 10_000


def stdout_options(args: argparse.Namespace) -> list[str]:
    """The file options of this command line that say ``-`` (stdout)."""
    return [opt for dest, opt in FILE_OPTIONS.items() if getattr(args, dest, None) == STDOUT]


def check_stdout_options(args: argparse.Namespace) -> None:
    """At most one option may write to stdout (two would interleave into something no reader parses)."""
    taken = stdout_options(args)
    if getattr(args, "print", False):
        taken.append("--print")
    if len(taken) > 1:
        raise InputError(f"{' and '.join(taken)} would all write to stdout", where="command line",
                         hint="send all but one to a file")


def console_for(stream: IO[str], *, is_terminal: bool | None = None) -> Console:
    """A :class:`SafeConsole` on ``stream`` (host text never markup or terminal controls): full width
    (no cut cells) when it is not a terminal."""
    tty = stream.isatty() if is_terminal is None else is_terminal
    if tty:
        return SafeConsole(file=stream)
    # COLUMNS still wins when the user set it (rich reads it), as for any other tool.
    width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else PIPE_WIDTH
    return SafeConsole(file=stream, width=width, soft_wrap=False)


def to_journal(stream: IO[str]) -> bool:
    """True when ``stream`` is connected to systemd's journal (the service's stdout/stderr).

    systemd sets ``JOURNAL_STREAM=DEV:INODE`` of that stream (systemd.exec(5)); comparing it with the
    stream's own fstat tells a journal apart from a pipe or file the unit's command redirected to."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's StringIO), or closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


#: sd-daemon(3) priority prefixes journald reads at a line's start (SyslogLevelPrefix=, on by default).
JOURNAL_ERR = "<3>"
JOURNAL_INFO = "<6>"


def human_console(args: argparse.Namespace) -> Console:
    """The console for people's text: stdout, or stderr when the command's data goes to stdout."""
    if stdout_options(args) or getattr(args, "print", False):
        return console_for(sys.stderr)
    return console_for(sys.stdout)


def write_out(path: str, write: Callable[[IO[str]], None]) -> None:
    """Call ``write`` with stdout for ``-``, else with a private temporary file that then replaces ``path``
    (outfiles.write_atomic: a reader never sees half of it, a planted symlink is not followed)."""
    write_atomic(path, write)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (``-``: stdout)."""
    def put(f: IO[str]) -> None:
        f.write(text)

    write_out(path, put)


def where(path: str) -> str:
    """How a "written to" line names the destination."""
    return "stdout" if path == STDOUT else path


def write_report_json(report: FleetReport, path: str, audit: dict[str, Any] | None = None) -> None:
    """The report as JSON (as results.write_json writes it) to ``path``, or stdout for ``-``.

    With ``audit`` (audit.audit_json), the report carries the verdict under ``"audit"``.
    """
    def dump(f: IO[str]) -> None:
        data = report.to_json()
        if audit is not None:
            data["audit"] = audit
        json.dump(data, f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")

    write_out(path, dump)


def _cell_text(cell: object) -> str:
    """A table cell's plain text.  Every cell was made with render.safe.visible(): no tab, newline
    or control character of a host's text is left in it (they are ``\\x09``-style escapes).  The
    check below keeps that true for a cell someone adds later without visible()."""
    text = cell.plain if isinstance(cell, Text) else str(cell)
    return visible(text)


def print_table(table: Table, console: Console, fmt: str = "table") -> None:
    """Print ``table`` in ``fmt`` (options.TABLE_FORMATS) on ``console``'s stream: ``table`` is rich's
    (full width when piped), ``tsv`` a header line then one line per row, tab-separated, ``json`` one
    JSON array of objects keyed by the column names.

    tsv and json carry exactly the table's cells (a script gets what a person sees, uncut); styles
    are dropped.  A cell can hold no tab or line break (see _cell_text), so a tsv line is one row."""
    if fmt == "table":
        console.print(table)
        return
    names = [_cell_text(c.header) for c in table.columns]
    rows = [[_cell_text(cell) for cell in column.cells] for column in table.columns]
    records = [list(r) for r in zip(*rows)] if rows else []
    if fmt == "tsv":
        text = "\n".join("\t".join(r) for r in [names, *records]) + "\n"
    else:
        text = json.dumps([dict(zip(names, r)) for r in records], indent=1) + "\n"
    # To the console's stream itself: rich would expand the tabs and wrap at its width.
    console.file.write(text)
    console.file.flush()
