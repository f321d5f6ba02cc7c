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
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fleetprobe.connectors.fabric import harden, open_sessions, sessions_of
from fleetprobe.inventory import Host
from fleetprobe.orchestrate import run_playbook
from fleetprobe.settings import RunSettings
from fleetprobe.playbook import Playbook, load_playbook
from fleetprobe.results import FleetReport
from fleetprobe.session import Session, SSHOptions

if TYPE_CHECKING:
    import fabric

__all__ = ["harden", "run_playbook_on", "sessions_of"]


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
