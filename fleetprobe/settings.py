"""Settings: how a run behaves (:class:`RunSettings`, filled by the CLI), and who watches it (:class:`Observer`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fleetprobe.connectors.asyncssh import connect
from fleetprobe.facts import Facts
from fleetprobe.inventory import Host
from fleetprobe.session import Session, SSHOptions

if TYPE_CHECKING:  # a type only: aggtables is not needed to build settings (nor by `fleetprobe --help`)
    from fleetprobe.aggtables import AggProgress


#: Seconds after the planned end that the on-host deadline (and the watchdog) allow for teardown.
TEARDOWN_SLACK = 30


def _positive(v: object) -> bool:
    """A number (not a bool) > 0."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _whole(low: int) -> Callable[[object], bool]:
    """A whole number (not a bool) >= ``low``."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


#: RunSettings' numeric and flag fields: (name, is the value right, what it must be), checked in this order.
_FIELD_RULES: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("duration", lambda v: v is None or _positive(v), "seconds as a number > 0, or None for the playbook's"),
    ("setup_timeout", _positive, "seconds as a number > 0"),
    ("teardown_timeout", _positive, "seconds as a number > 0"),
    ("forks", _whole(1), "a whole number >= 1"),
    ("grace", _whole(0), "a whole number >= 0"),
    ("teardown_slack", _whole(0), "a whole number >= 0"),
    ("event_cap", lambda v: v is None or _whole(1)(v), "a whole number >= 1, or None"),
    ("buffer_kb", lambda v: v is None or _whole(1)(v), "a whole number >= 1, or None"),
    ("mount_tracefs", lambda v: isinstance(v, bool), "True or False"),
    ("allow_modules", lambda v: isinstance(v, bool), "True or False"),
)


@dataclass(frozen=True)
class RunSettings:
    """How a run behaves; the CLI fills it from its options.

    ``grace`` is how long past its deadline a dead run's leftovers are kept
    before the watchdog or a sweep removes them.  ``setup_timeout`` bounds
    connect + facts + plan per host; the probe phase gets the duration plus
    ``teardown_timeout``.
    """

    ssh: SSHOptions = field(default_factory=SSHOptions)
    duration: float | None = None
    event_cap: int | None = None
    forks: int = 200
    setup_timeout: float = 60.0
    teardown_timeout: float = 30.0
    grace: int = 60
    mount_tracefs: bool = False
    allow_modules: bool = False
    buffer_kb: int | None = None
    run_id: str | None = None
    teardown_slack: int = TEARDOWN_SLACK

    def deadline(self, clock_offset: float, duration: float) -> int:
        """The host's epoch second by which a run of ``duration`` starting now is over, teardown slack included."""
        return int(time.time() + clock_offset + duration + self.teardown_slack)

    #: Opens a Session to a host; None is asyncssh (connectors.asyncssh.connect). ``--transport fabric`` sets
    #: fleetprobe.connectors.fabric.connect. One hook, so no stage branches on the transport.
    connect: Callable[[Host, SSHOptions], Awaitable[Session]] | None = None
    #: Called with each host's facts as they are gathered (the history store keeps them).
    on_facts: Callable[[str, Facts], None] | None = None
    #: Where kernel modules are built: ``auto`` (a host of the group that can, else the controller for
    #: a Debian kernel with a cross compiler), ``host`` or ``controller`` (see fleetprobe.kmod.plan).
    build_at: str = "auto"
    #: Hosts whose own module builds other hosts of their kernel may load (``--trust-build-host``).
    trusted_build_hosts: tuple[str, ...] = ()
    #: Built-module cache; None is ``$FLEETPROBE_CACHE``/``~/.cache/fleetprobe`` (kmod.cache.ModuleCache).
    module_cache: Path | None = None

    def __post_init__(self) -> None:
        """Refuse a wrong type or value here, once, rather than as a TypeError on every host mid-run."""
        def bad(name: str, want: str) -> TypeError:
            value = getattr(self, name)
            return TypeError(f"RunSettings({name}={value!r}): {name} must be {want}, got {type(value).__name__}"
                             + (" (parse a text like '2s' with fleetprobe.playbook.parse_duration)"
                                if isinstance(value, str) and want.startswith("seconds") else ""))

        for name, ok, want in _FIELD_RULES:
            if not ok(getattr(self, name)):
                raise bad(name, want)
        if not isinstance(self.ssh, SSHOptions):
            raise bad("ssh", "an SSHOptions")
        if self.run_id is not None and not isinstance(self.run_id, str):
            raise bad("run_id", "a str or None")
        if not isinstance(self.trusted_build_hosts, tuple) or not all(
                isinstance(h, str) for h in self.trusted_build_hosts):
            # A str here would be iterated as one-letter host names.
            raise bad("trusted_build_hosts", "a tuple of host names (str)")
        if self.build_at not in ("auto", "host", "controller"):
            raise TypeError(f"RunSettings(build_at={self.build_at!r}): build_at must be 'auto', 'host' or "
                            "'controller'")

    async def open_session(self, host: Host) -> Session:
        """Connect to ``host`` with the configured transport."""
        return await (self.connect or connect)(host, self.ssh)


class Observer(Protocol):
    """Receives progress for the live view (must be cheap: called from the event loop).

    ``set_aggregates`` gets a host's ``aggregate:`` tables once its probes are on, about once a
    second while it streams, and once more, ``final``, when its kernel tables were read.
    An observer may also have ``probes_live(host, n)``: called once per host when its runner says
    its ``n`` probes are in place (the CLI's "N probes live on M hosts" line).
    """

    def set_state(self, host: str, state: str, detail: str = "") -> None: ...
    def add_events(self, host: str, n: int) -> None: ...
    def set_aggregates(self, host: str, progress: tuple[AggProgress, ...]) -> None: ...


class NullObserver:
    """An observer that ignores everything."""

    def set_state(self, host: str, state: str, detail: str = "") -> None:
        """Ignore."""

    def add_events(self, host: str, n: int) -> None:
        """Ignore."""

    def set_aggregates(self, host: str, progress: tuple[AggProgress, ...]) -> None:
        """Ignore."""
