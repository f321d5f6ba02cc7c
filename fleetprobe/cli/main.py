"""``fleetprobe``'s entry point: ``main(argv, console) -> int``; exit statuses are :class:`Exit`.

Errors print one clear line and a hint, on stderr; ``--traceback`` (anywhere on the line) shows the
Python traceback.  Output goes where :mod:`fleetprobe.cli.output` says: a command's data to stdout
for ``-``, people's text to stderr then.
This module builds the parser and nothing else: rich, the consoles and the command's module load
in :mod:`fleetprobe.cli.execute` once a command runs, so ``fleetprobe --help`` renders without
them (issue 5).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetprobe.cli.options import Exit, build_parser

if TYPE_CHECKING:  # rich is not loaded for --help (see the module docstring)
    from rich.console import Console


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
    run: int = importlib.import_module("fleetprobe.cli.execute").execute(
        args, console, err_console, command_line=argv is None)
    return run


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
