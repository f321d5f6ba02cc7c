"""What a host said, made safe for the operator's terminal.

Everything a host sends is chosen by someone we do not trust: a compromised host
lies in its facts, and any unprivileged user on an honest host picks the process
names, file names and typed lines the kernel prints.  Two things must never
happen when such text is shown:

* rich reads it as markup (``[/]`` raises MarkupError, ``[link=...]`` makes a
  link, ``:smile:`` an emoji): the console fleetprobe prints with has markup,
  emoji and highlighting off, so only :class:`rich.text.Text` styles colour
  anything, and a string is always shown as the characters it holds;
* it drives the terminal (ESC/CSI/OSC sequences retitle it, clear it, write the
  clipboard with OSC 52, make OSC 8 links; C1 controls U+0080-U+009F do the same on
  some terminals; bidi overrides reorder what is read): every character that is
  not printable is shown as an escape (``\\x1b``, ``\\u202e``).

:func:`visible` does the second for one value (newlines too: one host value is
one line on screen).  :class:`SafeConsole` does both for everything it prints,
as a last line of defence under the renderers, which call :func:`visible`
themselves so tables are laid out for the text really shown.  JSON, the store,
HTML and Markdown keep the raw values (each escapes for its own format).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

# Everything outside printable ASCII is looked at; str.isprintable() decides (not Cc: C0, DEL, C1;
# not Cf: bidi overrides, zero-width; not Zl/Zp, surrogates, private use, unassigned). Space is printable.
_NONPRINTABLE = re.compile("[^\x20-\x7e]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group(0)
    if c.isprintable():
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def visible(text: object) -> str:
    """``text`` as a string whose every non-printable character is shown as an escape (newlines too)."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return _NONPRINTABLE.sub(_escape_char, s)


def visible_lines(text: str) -> str:
    """Like :func:`visible` but keeping newlines: for a rendered segment (whose line breaks rich made)
    and for fleetprobe's own multi-line messages (an error and its hint)."""
    if text.isprintable() or "\n" == text:
        return text
    return "\n".join(visible(part) for part in text.split("\n"))


class SafeConsole(Console):
    """A rich Console for host-derived output: no markup, no emoji codes, no highlighting, and no
    character that would drive the terminal ever written (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("markup", False)
        kwargs.setdefault("emoji", False)
        kwargs.setdefault("highlight", False)
        super().__init__(**kwargs)

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        """Every text segment with its non-printables made visible; rich's own control segments pass."""
        for seg in super().render(renderable, options):
            if seg.control or seg.text.isprintable():
                yield seg
            else:
                yield Segment(visible_lines(seg.text), seg.style, seg.control)


def plain(text: object, style: str = "", **kwargs: Any) -> Text:
    """Host-derived text as a Text that shows exactly its characters (non-printables as escapes),
    whatever console prints it: a Text is never parsed as markup."""
    return Text(visible(text), style=style, **kwargs)


def add_row(table: Table, *cells: RenderableType | None, **kwargs: Any) -> None:
    """``table.add_row`` with every string cell shown through :func:`plain`."""
    table.add_row(*(plain(c) if isinstance(c, str) else c for c in cells), **kwargs)
