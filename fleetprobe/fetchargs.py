"""Fetch args: the ``argN`` / ``retval`` / ``+OFF(FETCH)`` / tracefs-syntax grammar of a probe's args, and their types.

:func:`parse_arg` reads ``name=FETCH[:TYPE]`` as a playbook writes it into an :class:`ArgSpec`;
:mod:`fleetprobe.plan` lowers it per host (``argN`` to that arch's registers).  Errors are
ValueErrors saying what is wrong and what is allowed; the playbook reader adds file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fleetprobe.errors import did_you_mean

# MAX_ARRAY_LEN in kernel/trace/trace_probe.h.
_MAX_ARRAY_LEN = 64


_INT_TYPE = re.compile(r"[usx](8|16|32|64)")


_BITFIELD_TYPE = re.compile(r"b(\d+)@(\d+)/(8|16|32|64)")


_ARRAY_TYPE = re.compile(r"(?P<base>[a-z0-9@/]+)\[(?P<n>\d+)\]")


_STRING_TYPES = ("string", "ustring", "symstr")


_ALL_TYPES_TEXT = ("u8..u64, s8..s64, x8..x64, string, ustring, symbol, symstr, "
                   "b<width>@<offset>/<container>, TYPE[N]")


@dataclass(frozen=True)
class ArgRef:
    """The Nth function argument (1-based), lowered per host to $argN or a register."""

    n: int


@dataclass(frozen=True)
class RetvalRef:
    """The function's return value (return probes only)."""


@dataclass(frozen=True)
class RawFetch:
    """A fetch arg in tracefs syntax (%di, $comm, $stack0, @sym) passed through unchanged."""

    text: str


@dataclass(frozen=True)
class Deref:
    """``+OFF(inner)`` (kernel memory) or ``+uOFF(inner)`` (user memory)."""

    offset: int
    user: bool
    inner: Fetch


Fetch = ArgRef | RetvalRef | RawFetch | Deref


@dataclass(frozen=True)
class ArgSpec:
    """One named argument a probe records: ``name=fetch[:type]`` as written in the playbook."""

    name: str
    fetch: Fetch
    type: str | None
    text: str
    line: int

    def uses_argn(self) -> bool:
        """True when the fetch refers to a portable ``argN`` anywhere inside it."""
        return _fetch_has(self.fetch, ArgRef)

    def uses_retval(self) -> bool:
        """True when the fetch refers to ``retval`` anywhere inside it."""
        return _fetch_has(self.fetch, RetvalRef)


def _fetch_has(fetch: Fetch, kind: type) -> bool:
    """Whether ``fetch`` or anything it dereferences is of ``kind``."""
    if isinstance(fetch, kind):
        return True
    if isinstance(fetch, Deref):
        return _fetch_has(fetch.inner, kind)
    return False


def parse_arg(name: str, text: str, line: int = 0) -> ArgSpec:
    """Parse ``FETCH[:TYPE]``; ValueError says what is wrong and what is allowed."""
    if not text:
        raise ValueError("empty fetch arg")
    fetch_text, type_text = _split_type(text)
    fetch = parse_fetch(fetch_text)
    if type_text is not None:
        check_type(type_text)
        base = type_text.split("[", 1)[0]
        needs_memory = base in ("string", "ustring") or "[" in type_text
        if needs_memory and isinstance(fetch, (ArgRef, RetvalRef)):
            raise ValueError(f"{text!r}: type {type_text} reads memory, so the fetch must be a dereference "
                             f"(write +0({fetch_text}):{type_text} for the string {fetch_text} points to)")
    return ArgSpec(name=name, fetch=fetch, type=type_text, text=text, line=line)


def _split_type(text: str) -> tuple[str, str | None]:
    """Split ``FETCH:TYPE`` at the last ':' outside parentheses."""
    depth = 0
    cut = -1
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == ":" and depth == 0:
            cut = i
    if depth != 0:
        raise ValueError(f"{text!r}: unbalanced parentheses")
    if cut < 0:
        return text, None
    return text[:cut], text[cut + 1:]


_DEREF = re.compile(r"(?P<sign>[+-])(?P<user>u?)(?P<off>0x[0-9a-fA-F]+|\d+)\((?P<inner>.*)\)")


_RAW = re.compile(r"%[A-Za-z][A-Za-z0-9]*|\$(?:stack\d*|comm|arg\d+|retval)|@[A-Za-z0-9_.+\-]+|\\.+")


_FETCH_HELP = ("allowed: argN (N >= 1), retval, +OFF(FETCH), +uOFF(FETCH) (user memory), or tracefs "
               "syntax passed through unchanged (%reg, $comm, $stackN, @symbol)")


def parse_fetch(text: str) -> Fetch:
    """Parse a fetch expression (without its type)."""
    text = text.strip()
    m = _DEREF.fullmatch(text)
    if m:
        off = int(m.group("off"), 0) * (-1 if m.group("sign") == "-" else 1)
        return Deref(offset=off, user=bool(m.group("user")), inner=parse_fetch(m.group("inner")))
    am = re.fullmatch(r"arg(\d+)", text)
    if am:
        n = int(am.group(1))
        if n < 1:
            raise ValueError(f"{text!r}: arguments count from 1 (arg1 is the first)")
        return ArgRef(n)
    if text == "retval":
        return RetvalRef()
    if _RAW.fullmatch(text):
        return RawFetch(text)
    raise ValueError(f"{text!r} is not a fetch arg; {_FETCH_HELP}")


def check_type(type_text: str) -> None:
    """ValueError unless ``type_text`` is a tracefs fetch type."""
    m = _ARRAY_TYPE.fullmatch(type_text)
    base = m.group("base") if m else type_text
    if m:
        n = int(m.group("n"))
        if not 1 <= n <= _MAX_ARRAY_LEN:
            raise ValueError(f"array length {n} in {type_text!r} must be 1..{_MAX_ARRAY_LEN}")
    if _INT_TYPE.fullmatch(base) or base in ("string", "ustring", "symbol", "symstr"):
        return
    b = _BITFIELD_TYPE.fullmatch(base)
    if b:
        width, offset, container = (int(x) for x in b.groups())
        if width < 1 or width + offset > container:
            raise ValueError(f"bitfield {type_text!r}: width + offset must fit the {container}-bit container")
        return
    raise ValueError(f"unknown type {type_text!r}{did_you_mean(base, ['u8', 'u16', 'u32', 'u64', 's32', 'x32', 'x64', 'string', 'ustring', 'symbol', 'symstr'])}; "
                     f"allowed: {_ALL_TYPES_TEXT}")
