"""The run's seal and the names fleetprobe gives dynamic events: what the kernel prints that no user can (issue 11).

:func:`seal_args` ends every sealed definition with two secret immediates, :func:`string_end_args`
follows each of its strings with the first of them, and :func:`trace_name_of` keeps every event
name too long for a comm to hold a fake head naming it. Pure functions; :mod:`fleetprobe.plan`
puts them in the plan, :mod:`fleetprobe.parse` reads the stream by them.
"""

from __future__ import annotations

import re
import secrets

from fleetprobe.playbook import SEAL_ARG_NAMES
from fleetprobe.traceline import MIN_TRACE_NAME

__all__ = ["MIN_TRACE_NAME", "SEAL_NAMES", "end_strings", "new_seal", "seal_args", "seal_trailer", "split_seal",
           "string_end_args", "string_ends", "trace_name_of"]

#: Fetch-arg names of the seal: never a playbook's (the playbook reader refuses them).
SEAL_NAMES = SEAL_ARG_NAMES


def new_seal() -> tuple[int, int]:
    """A fresh seal: 64 random bits as two 32-bit immediates (a 32-bit kernel's ``\\imm`` is 32 bits)."""
    return secrets.randbits(32), secrets.randbits(32)


def seal_args(seal: tuple[int, int]) -> str:
    """The fetch args that end a sealed definition: ``fpt=\\0x...:x32 fpu=\\0x...:x32``.

    Immediates, not an immediate string: on 6.18 a uprobe reads ``\\"..."`` as user memory and
    prints ``(fault)``. A user on the host cannot read the definitions (tracefs is root's), so
    cannot print the seal; the kernel prints it after every other argument, strings included.
    """
    return " ".join(f"{n}=\\{v:#x}:x32" for n, v in zip(SEAL_NAMES, seal))


def seal_trailer(seal: tuple[int, int]) -> str:
    """How the kernel prints :func:`seal_args` (``" fpt=0x%x fpu=0x%x"``): the end of every sealed line."""
    return "".join(f" {n}={v:#x}" for n, v in zip(SEAL_NAMES, seal))


#: Fetch-arg names of the string ends: ``fps0``, ``fps1``, ... after each string of a sealed definition
#: (the playbook reader refuses these names too).
STRING_END_PREFIX = "fps"
#: The kernel's limit on a probe's fetch args (MAX_TRACE_ARGS, kernel/trace/trace_probe.h).
MAX_TRACE_ARGS = 128


def string_end_args(seal: tuple[int, int], i: int) -> str:
    """The fetch arg after the ``i``-th string of a sealed definition: ``fpsI=\\0x...:x32`` (the seal's first word).

    The kernel prints fetch args in order, strings raw between quotes: where two strings (or a
    string and the fields after it) meet, a user's string could hold ``" pid=1 other="...`` and
    pass for the fields after it. What follows a string's ``name=`` up to this immediate, which only the
    kernel prints, is that string's value (issue 11 #2).
    """
    return f"{STRING_END_PREFIX}{i}=\\{seal[0]:#x}:x32"


def string_ends(seal: tuple[int, int], count: int) -> tuple[str, ...]:
    """How the kernel prints each string's end in a sealed line: ``' fpsI=0x...'`` for I < ``count``.

    No quote in it: a string the kernel could not read prints as ``(fault)``, unquoted.
    """
    return tuple(f" {STRING_END_PREFIX}{i}={seal[0]:#x}" for i in range(count))


#: The seal args at the end of a definition (what seal_args wrote).
_SEAL_TAIL = re.compile(r"( fpt=\\0x[0-9a-f]+:x32 fpu=\\0x[0-9a-f]+:x32)$")


def split_seal(definition: str) -> tuple[str, str]:
    """(definition without its trailing seal args, the seal args with their leading space or '')."""
    m = _SEAL_TAIL.search(definition)
    return (definition[:m.start()], m.group(1)) if m else (definition, "")


#: What a shorter probe name gets appended as its event name: upper case, which no probe name holds
#: (playbook: ``[a-z_][a-z0-9_]*``), so it can never be another probe's.
_SHORT_NAME_TAIL = "_FP"


def trace_name_of(probe: str) -> str:
    """The tracefs event name (printed in every line's head) of a kprobe or uprobe named ``probe``.

    The probe's own name, unless it is shorter than :data:`MIN_TRACE_NAME` (``ab`` prints as
    ``ab_FP``); reports always name the probe.
    """
    return probe if len(probe) >= MIN_TRACE_NAME else probe + _SHORT_NAME_TAIL


_STRING_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*:u?string")


_END_TOKEN = re.compile(STRING_END_PREFIX + r"[0-9]+=\S*")


def end_strings(definition: str, seal: tuple[int, int]) -> tuple[str, int]:
    """``definition`` with a string end (:func:`string_end_args`) after each string fetch arg, and how many.

    Without any (0) when they would take the probe past the kernel's MAX_TRACE_ARGS with the seal:
    then its fields are split as in an unsealed line. Ends already in ``definition`` are placed
    afresh (args added after the first placing, by the aggregation fallback, get theirs).
    """
    words = [w for w in definition.split(" ") if not _END_TOKEN.fullmatch(w)]
    definition = " ".join(words)
    count = sum(1 for w in words[2:] if _STRING_TOKEN.fullmatch(w))
    if not count or len(words) - 2 + count + len(SEAL_NAMES) > MAX_TRACE_ARGS:
        return definition, 0
    out, i = words[:2], 0
    for w in words[2:]:
        out.append(w)
        if _STRING_TOKEN.fullmatch(w):
            out.append(string_end_args(seal, i))
            i += 1
    return " ".join(out), count
