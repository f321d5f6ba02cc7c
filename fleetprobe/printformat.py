"""A probe's ``print:`` format (issue 14 item 3): how ``run`` prints each of its events, one line.

    - name: exec
      tracepoint: sched/sched_process_exec
      print: "{comm} ran {filename} (pid {pid})"

prints ``db-07 exec sh ran /usr/bin/logrotate (pid 4121)``: the host and the probe first, as ``--print``
does, then the format with each ``{field}`` replaced by the event's value.  Fields: the probe's
``args`` names (any name for a probe without ``args``, whose fields the kernel's format names),
``comm`` (one word: its blanks escaped, as in ``--print``) and ``pid``; ``{{`` and ``}}`` are braces.  A playbook with a ``print:`` format streams
its events as ``--print`` does (python's str.format grammar, but no conversions or format specs: a
field is a name and nothing else).

Values are a host's text: every non-printable character (and ``\\``) is shown as an escape, so
one event is one line whatever its comm or path holds.  A field the event lacks prints as
``{name?}``, never as an empty or a zero.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass

#: Fields every event has.
SPECIAL_FIELDS = ("comm", "pid")
#: A format longer than this is a mistake (it is one terminal line).
MAX_LENGTH = 512
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class PrintFormat:
    """A parsed format: literal text and field names in order (``parts``: (text, is_field))."""

    text: str
    parts: tuple[tuple[str, bool], ...]

    @property
    def fields(self) -> tuple[str, ...]:
        """The field names it uses, in order."""
        return tuple(p for p, is_field in self.parts if is_field)

    def render(self, comm: str, pid: int | str, values: Mapping[str, str], visible: Callable[[str], str],
               word: Callable[[str], str]) -> str:
        """One event's line (without the host and probe columns, without the newline); every value
        goes through ``visible``, the comm through ``word`` (its blanks escaped too, as --print's
        comm column: one word whatever a task calls itself).  render.eventlines' functions, passed
        in by the printer so that reading a playbook loads no renderer."""
        out = []
        for part, is_field in self.parts:
            if not is_field:
                out.append(part)
            elif part == "comm":
                out.append(word(comm))
            elif part == "pid" and "pid" not in values:
                out.append(str(pid))
            elif part in values:
                out.append(visible(values[part]))
            else:
                out.append(f"{{{part}?}}")
        return "".join(out)


def parse_print_format(text: str, known: tuple[str, ...] | None) -> PrintFormat:
    """Parse ``text``; ``known``: the probe's field names (None: not known before the run).

    Raises ValueError with a message saying what is wrong (the playbook reader adds file:line)."""
    if not text.strip():
        raise ValueError("print format is empty")
    if len(text) > MAX_LENGTH:
        raise ValueError(f"print format is {len(text)} characters long, at most {MAX_LENGTH}")
    if m := _CONTROL.search(text):
        raise ValueError(f"print format holds the control character {m.group(0)!r} (it prints one line)")
    parts: list[tuple[str, bool]] = []
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"print format {text!r}: {exc} (write {{{{ and }}}} for a brace)") from None
    for literal, field, spec, conversion in pieces:
        if literal:
            parts.append((literal, False))
        if field is None:
            continue
        if spec or conversion or not _NAME.fullmatch(field):
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"print format field {shown} must be a plain name such as {{filename}} "
                             "(no index, attribute, conversion or format spec)")
        if known is not None and field not in known and field not in SPECIAL_FIELDS:
            names = ", ".join([*known, *SPECIAL_FIELDS])
            raise ValueError(f"print format names the field {field!r}, which this probe does not have "
                             f"(it has: {names})")
        parts.append((field, True))
    return PrintFormat(text=text, parts=tuple(parts))
