"""fleetprobe's error types: each says where, what, the evidence, and what to do.

Input errors (playbook, inventory, command line) are found before any host is
touched and end the command with exit status 1.  Host errors are values: they
fail one host, are recorded in its outcome, and never stop the other hosts.
"""

from __future__ import annotations

import difflib


class FleetprobeError(Exception):
    """Base class: a message plus an optional location and hint."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class InputError(FleetprobeError):
    """Bad input from the user; nothing was touched."""


class PlaybookError(InputError):
    """A playbook problem, located at file:line and key."""

    def __init__(self, message: str, *, file: str, line: int | None = None,
                 key: str | None = None, hint: str | None = None) -> None:
        where = file if line is None else f"{file}:{line}"
        if key:
            where += f" ({key})"
        super().__init__(message, where=where, hint=hint)
        self.file = file
        self.line = line
        self.key = key


class InventoryError(InputError):
    """An inventory problem, located at its file (and host or group)."""


class HostError(FleetprobeError):
    """One host failed at one stage; the others go on.

    ``stage`` is one of connect, facts, plan, build, probe, teardown.
    ``evidence`` holds what the host or kernel said (stderr, error_log).
    """

    def __init__(self, host: str, stage: str, message: str, *,
                 evidence: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, where=host, hint=hint)
        self.host = host
        self.stage = stage
        self.evidence = evidence

    def __str__(self) -> str:
        text = f"{self.host}: {self.stage}: {self.message}"
        if self.evidence:
            text += f" ({self.evidence.strip()})"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class TransportError(HostError):
    """SSH-level failure (connect, auth, host key, dropped link), translated at the transport boundary."""


class BuildError(FleetprobeError):
    """A group's build failed; ``evidence`` holds the compiler's or tool's own words."""

    def __init__(self, message: str, *, where: str, evidence: str = "", hint: str | None = None) -> None:
        super().__init__(message, where=where, hint=hint)
        self.evidence = evidence


def did_you_mean(word: str, choices: list[str]) -> str:
    """A ' (did you mean X?)' suffix when ``word`` is close to one of ``choices``."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class LoginRefused(FleetprobeError):
    """A host key or login key was refused: retrying the same login cannot help."""


class LoginFailed(FleetprobeError):
    """A login attempt that failed on the way (reset, timeout, key exchange): a retry may succeed."""
