"""Helpers for fabfiles: run a playbook through Fabric connections a fabfile already has.

::

    from fabric import task
    from fleetprobe.fabfile import harden, run_playbook_on

The connections are wrapped by the paramiko connector (connectors/fabric.py); :func:`harden`
makes a user's Connection verify host keys like ``fleetprobe run`` does.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fleetprobe.connectors.fabric import (connection_name, fab_invocation_hosts, harden, open_sessions, sessions_of,
                                         sibling_connection)
from fleetprobe.inventory import Host
from fleetprobe.orchestrate import run_playbook
from fleetprobe.settings import RunSettings
from fleetprobe.playbook import Playbook, load_playbook
from fleetprobe.results import FleetReport
from fleetprobe.session import Session, SSHOptions

if TYPE_CHECKING:  # annotations only: the connector (connectors/fabric.py) is what uses fabric
    import fabric

__all__ = ["harden", "run_playbook_on", "run_playbook_once", "sessions_of"]


def run_playbook_on(target: fabric.Connection | Iterable[fabric.Connection], playbook: str | Path | Playbook, *,
                    settings: RunSettings | None = None, events_path: str | None = None) -> FleetReport:
    """Run a playbook through a fabfile's Connection or Group and return the merged report.

    The connections are opened if needed and left open (they are the
    caller's).  Call from a Fabric task; blocks until the run ends::

        from fabric import task
        from fleetprobe.fabfile import harden, run_playbook_on

        @task
        def modload(c):
            report = run_playbook_on(harden(c), "playbooks/modload.yml")
            print(report.aggregate.hits("load"))
    """
    pb = playbook if isinstance(playbook, Playbook) else load_playbook(playbook)
    sessions = sessions_of(target)
    open_sessions(sessions)

    async def borrowed(host: Host, options: SSHOptions) -> Session:
        return sessions[host.name]

    base = settings or RunSettings()
    hosts = [s.host for s in sessions.values()]
    return asyncio.run(run_playbook(hosts, pb, replace(base, connect=borrowed), events_path=events_path,
                                    inventory="fabric: " + ", ".join(shlex.quote(h.name) for h in hosts)))


#: Runs already made in this process by run_playbook_once: (playbook, the invocation's hosts) -> report.
_ONCE: dict[tuple[str, tuple[str, ...]], FleetReport] = {}


def invocation_hosts() -> list[str]:
    """The hosts of this ``fab -H a,b,c`` invocation, as typed (empty when not run by ``fab -H``)."""
    return fab_invocation_hosts()


def run_playbook_once(c: fabric.Connection, playbook: str | Path | Playbook, *,
                      prepare: Callable[[fabric.Connection], fabric.Connection] | None = None,
                      settings: RunSettings | None = None, events_path: str | None = None) -> FleetReport | None:
    """One merged run over every host of ``fab -H a,b,c TASK``, from a task Fabric calls once per host.

    Fabric calls a task once per ``-H`` host, one after the other: ``run_playbook_on(c, ...)`` there
    makes three runs and three reports (35 s for 3 x 10 s).  This makes the first call run the
    playbook on all the invocation's hosts at once (connections to the others opened from ``c``'s
    config, as ``fab`` opens them, each passed through ``prepare``, default :func:`harden`) and
    return the merged report; the calls for the other hosts return None.  Hosts are named as the
    user named them (``-H db1`` with an ssh_config alias is ``db1``).  Not under ``fab -H`` (or
    for a host the list does not have), it runs on ``c`` alone::

        from fabric import task
        from fleetprobe.fabfile import run_playbook_once

        @task
        def modload(c):
            report = run_playbook_once(c, "playbooks/modload.yml")
            if report is not None:
                print(report.aggregate.hits("load"))
    """
    pb = playbook if isinstance(playbook, Playbook) else load_playbook(playbook)
    ready = prepare or harden
    names = invocation_hosts()
    me = connection_name(c)
    if me not in names:
        return run_playbook_on(ready(c), pb, settings=settings, events_path=events_path)
    key = (pb.sha256 or pb.name, tuple(names))
    if key in _ONCE:
        return None
    others = [ready(sibling_connection(h, c)) for h in names if h != me]
    conns = [ready(c) if i == names.index(me) else others.pop(0) for i in range(len(names))]
    try:
        report = run_playbook_on(conns, pb, settings=settings, events_path=events_path)
    finally:
        for conn in conns:
            if conn is not c:
                conn.close()
    _ONCE[key] = report
    return report
