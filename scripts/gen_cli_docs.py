#!/usr/bin/env python3
"""Generate the man page and the bash/zsh completions from fleetprobe's own argument parser.

    .venv/bin/python scripts/gen_cli_docs.py          # rewrites contrib/man and contrib/completion

The files are checked in (pip installs them: pyproject's data-files) and tests/test_cli_docs.py
fails when they no longer match the parser, so a new option cannot ship without them.
Needs argparse-manpage and shtab (the test extra).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAN = ROOT / "contrib" / "man" / "fleetprobe.1"
BASH = ROOT / "contrib" / "completion" / "fleetprobe"
ZSH = ROOT / "contrib" / "completion" / "_fleetprobe"


def generated() -> dict[Path, str]:
    """Each generated file and its text, from the parser as it is now, whoever runs it: wrapped at 80
    columns (argparse reads COLUMNS), defaults under ~ (the store's path is in a help text)."""
    fixed = {"COLUMNS": "80", "XDG_DATA_HOME": "~/.local/share"}
    old = {k: os.environ.get(k) for k in fixed}
    for k, v in fixed.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        return _generated()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _generated() -> dict[Path, str]:
    import shtab
    from argparse_manpage.manpage import Manpage

    from fleetprobe import __version__
    from fleetprobe.cli.options import build_parser

    page = Manpage(build_parser())
    # Fixed, not today's date: the checked-in page must equal a regenerated one.
    page.date = f"fleetprobe {__version__}"
    page.source = f"fleetprobe {__version__}"
    page.manual = "fleetprobe manual"
    # argparse-manpage leaves a help text line that starts with ' as it is, and roff reads such a line
    # as a request ('all' ... "macro not defined", the line lost): \& in front makes it text.
    man = "\n".join("\\&" + line if line.startswith("'") else line for line in str(page).split("\n"))
    return {MAN: man,
            BASH: shtab.complete(build_parser(), shell="bash"),
            ZSH: shtab.complete(build_parser(), shell="zsh")}


def main() -> int:
    for path, text in generated().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
