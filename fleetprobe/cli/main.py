"""``fleetprobe``'s entry point: ``main(argv, console) -> int``; exit statuses are :class:`Exit`.

Errors print one clear line and a hint, on stderr; ``--traceback`` (anywhere on the line) shows the
Python traceback.  Output goes where :mod:`fleetprobe.cli.output` says: a command's data to stdout
for ``-``, people's text to stderr then.
A command's module (and with it SSH, rich and the stages it needs) is imported only when that
command runs: ``fleetprobe --help`` builds the parsers and nothing else (issue 5).
"""

from __future__ import annotations

import gc
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fleetprobe.cli.options import Exit, build_parser
from fleetprobe.errors import FleetprobeError, InputError

if TYPE_CHECKING:
    import argparse

    from rich.console import Console

#: Subcommand -> (module, function) that runs it.
COMMANDS = {
    "facts": ("fleetprobe.cli.run", "cmd_facts"), "plan": ("fleetprobe.cli.run", "cmd_plan"),
    "run": ("fleetprobe.cli.run", "cmd_run"), "cleanup": ("fleetprobe.cli.run", "cmd_cleanup"),
    "audit": ("fleetprobe.cli.run", "cmd_audit"), "list": ("fleetprobe.cli.listing", "cmd_list"),
    "history": ("fleetprobe.cli.history", "cmd_history"), "show": ("fleetprobe.cli.history", "cmd_show"),
    "diff": ("fleetprobe.cli.history", "cmd_diff"), "merge": ("fleetprobe.cli.history", "cmd_merge"),
    "lab": ("fleetprobe.lab.cli", "run_lab"),
}


def _command(name: str) -> Callable[[argparse.Namespace, Console], int]:
    """The function that runs subcommand ``name``, its module imported now."""
    module, function = COMMANDS[name]
    handler: Callable[[argparse.Namespace, Console], int] = getattr(importlib.import_module(module), function)
    return handler


#: Optional extras: the module a missing import names -> the extra that installs it.
EXTRAS = {"fabric": "fabric", "paramiko": "fabric", "invoke": "fabric"}


def _pull_traceback(argv: list[str]) -> tuple[list[str], bool]:
    """``--traceback`` anywhere before ``--`` (a global flag is no use if its place matters at 3 a.m.)."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--traceback"]
    return head + argv[end:], len(head) != end


def main(argv: Sequence[str] | None = None, console: Console | None = None,
         err_console: Console | None = None) -> int:
    """Run the CLI; returns the exit status.

    ``console`` gets people's text and ``err_console`` errors (default: ``console`` when one is given,
    as tests and the API do; else stdout/stderr as :func:`fleetprobe.cli.output.human_console` picks).
    """
    parser = build_parser()
    words, want_traceback = _pull_traceback(list(argv) if argv is not None else sys.argv[1:])
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:
        # argparse exits 2 on a usage error, which would read as "some hosts failed": it is bad input.
        # --help and --version exit 0.
        return int(Exit.OK) if exc.code in (0, None) else int(Exit.BAD_INPUT)
    args.traceback = args.traceback or want_traceback
    if not args.command:
        parser.print_help(sys.stderr)
        return int(Exit.BAD_INPUT)
    # rich (and below, the command's module) load only once a command runs: --help renders nothing.
    from rich.text import Text

    from fleetprobe.cli.output import check_stdout_options, console_for, human_console
    from fleetprobe.render.safe import visible_lines

    # Every console is a SafeConsole (no markup, no emoji codes, no terminal controls): everything
    # printed may hold a host's text.
    if console is None:
        console = human_console(args)
        err_console = err_console or console_for(sys.stderr)
    err = err_console or console
    if argv is None:
        # The command line, not the API (tests call main() in-process): everything imported so
        # far lives as long as the process, so the collector's full passes need not walk it
        # again while a run keeps thousands of connections alive (gen-2 GC time of fp-run at
        # 500 hosts: 54 -> 31 ms).
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
    from rich.text import Text

    from fleetprobe.render.safe import visible_lines

    err.print(Text.assemble(("error", "red"), f": {type(exc).__name__}: ", visible_lines(str(exc)),
                            "\nhint: rerun with --traceback and report it"))
    return int(Exit.NONE_OK)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
