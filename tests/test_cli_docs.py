"""Issue 14 item 6: the man page and the bash/zsh completions come from the parser and stay in step with it.

The checked-in files (contrib/man, contrib/completion; pip installs them) must equal what
scripts/gen_cli_docs.py makes from today's parser; the man page must format without a roff warning;
bash's completion is exercised in a real bash the way bash-completion calls it.
"""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "scripts" / "gen_cli_docs.py"


def test_checked_in_files_match_the_parser() -> None:
    pytest.importorskip("shtab")
    pytest.importorskip("argparse_manpage")
    generated = runpy.run_path(str(GEN))["generated"]()
    for path, text in generated.items():
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python scripts/gen_cli_docs.py"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_page_formats_cleanly_and_documents_every_command() -> None:
    page = ROOT / "contrib" / "man" / "fleetprobe.1"
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = re.sub(".\x08", "", done.stdout)          # grotty's overstrike bold and underline
    for command in ("facts", "list", "plan", "run", "audit", "history", "show", "diff", "merge", "cleanup", "worker"):
        assert f"fleetprobe {command}" in text, command
    assert "--prometheus" in text.replace("\u2010", "-")


def complete(*words: str) -> list[str]:
    """What bash's completion offers for the last of ``words``, called as bash-completion calls it."""
    script = (f"source {ROOT / 'contrib/completion/fleetprobe'}\n"
              f"COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE='{' '.join(words)}'; COMP_POINT=${{#COMP_LINE}}\n"
              "_shtab_fleetprobe\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
                          check=True)
    return done.stdout.split()


def test_bash_completes_commands_and_their_options() -> None:
    assert complete("fleetprobe", "li") == ["list"]
    assert "--fields" in complete("fleetprobe", "list", "--fi")
    assert complete("fleetprobe", "audit", "--prom") == ["--prometheus"]
    assert "--print" in complete("fleetprobe", "run", "--pr")
