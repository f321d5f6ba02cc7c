"""Run one parsed command line: pick the consoles, call the command, turn its errors into exit statuses.

Loaded by :func:`fleetprobe.cli.main.main` only once a command runs (``fleetprobe --help`` builds
the parsers and nothing else, issue 5): rich, the consoles and the command's own module load here.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
import traceback
from collections.abc import Callable

from rich.console import Console
from rich.text import Text

from fleetprobe.cli.options import Exit
from fleetprobe.cli.output import check_stdout_options, console_for, human_console
from fleetprobe.errors import FleetprobeError, InputError
from fleetprobe.render.safe import visible_lines

#: Subcommand -> (module, function) that runs it: a command's module (and with it SSH and the
#: stages it needs) is imported only when that command runs.
COMMANDS = {
    "facts": ("fleetprobe.cli.run", "cmd_facts"), "plan": ("fleetprobe.cli.run", "cmd_plan"),
    "run": ("fleetprobe.cli.run", "cmd_run"), "cleanup": ("fleetprobe.cli.run", "cmd_cleanup"),
    "audit": ("fleetprobe.cli.run", "cmd_audit"), "list": ("fleetprobe.cli.listing", "cmd_list"),
    "history": ("fleetprobe.cli.history", "cmd_history"), "show": ("fleetprobe.cli.history", "cmd_show"),
    "diff": ("fleetprobe.cli.history", "cmd_diff"), "merge": ("fleetprobe.cli.history", "cmd_merge"),
    "lab": ("fleetprobe.cli.labrun", "run_lab"), "worker": ("fleetprobe.cli.worker", "cmd_worker"),
}

#: Optional extras: the module a missing import names -> the extra that installs it.
EXTRAS = {"fabric": "fabric", "paramiko": "fabric", "invoke": "fabric"}


def _command(name: str) -> Callable[[argparse.Namespace, Console], int]:
    """The function that runs subcommand ``name``, its module imported now."""
    module, function = COMMANDS[name]
    handler: Callable[[argparse.Namespace, Console], int] = getattr(importlib.import_module(module), function)
    return handler


def execute(args: argparse.Namespace, console: Console | None, err_console: Console | None, *,
            command_line: bool) -> int:
    """Run ``args.command``; returns the exit status (see main.main for the consoles).

    ``command_line``: this is the process's own command line, not the API or a test calling main()."""
    # Every console is a SafeConsole (no markup, no emoji codes, no terminal controls): everything
    # printed may hold a host's text.
    if console is None:
        console = human_console(args)
        err_console = err_console or console_for(sys.stderr)
    err = err_console or console
    if command_line:
        # Everything imported so far lives as long as the process, so the collector's full passes
        # need not walk it again while a run keeps thousands of connections alive (gen-2 GC time of
        # fp-run at 500 hosts: 54 -> 31 ms).
        gc.freeze()
    try:
        check_stdout_options(args)
        return int(_command(args.command)(args, console))
    except KeyboardInterrupt:
        err.print(Text("interrupted", style="yellow"))
        return int(Exit.INTERRUPTED)
    except FleetprobeError as exc:
        if args.traceback:
            err.print(Text(visible_lines(traceback.format_exc())))
        err.print(Text.assemble(("error", "red"), ": ", visible_lines(str(exc))))
        return int(Exit.BAD_INPUT if isinstance(exc, InputError) else Exit.NONE_OK)
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".", 1)[0])
        if extra is None or args.traceback:
            if args.traceback:
                raise
            return _unexpected(exc, err)
        # Not a bug: an optional part was not installed. Bad input (1), with the line that fixes it.
        err.print(Text.assemble(("error", "red"), ": ", visible_lines(
            f"this needs the Python package {exc.name!r}, which is not installed\n"
            f"hint: pip install 'fleetprobe[{extra}]' (in the environment fleetprobe runs from)")))
        return int(Exit.BAD_INPUT)
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, not a traceback
        if args.traceback:
            raise
        return _unexpected(exc, err)


def _unexpected(exc: BaseException, err: Console) -> int:
    """A bug: one line, and how to get the traceback."""
    err.print(Text.assemble(("error", "red"), f": {type(exc).__name__}: ", visible_lines(str(exc)),
                            "\nhint: rerun with --traceback and report it"))
    return int(Exit.NONE_OK)
