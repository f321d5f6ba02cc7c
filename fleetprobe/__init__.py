"""fleetprobe: run kernel probes across a fleet over SSH and merge what they see into one report.

The Python API in one call::

    import asyncio
    from fleetprobe import RunSettings, load_inventory, load_playbook, run_playbook

    inv = load_inventory("inventory.yml").limit("db")
    report = asyncio.run(run_playbook(inv.hosts, load_playbook("playbooks/execsnoop.yml"), RunSettings()))
    for host in report.hosts:
        print(host.host, host.status, host.hits)

Events as they come, as an async iterator: ``async with EventStream(hosts, playbook, settings) as s:
async for ev in s: ...``, then ``s.report``.

A playbook from a string (generated, or kept in a config system): ``parse_playbook(text, source)``,
``source`` naming it in errors; from ``-e`` style one-liners: ``adhoc_playbook(["kprobe:vfs_read"])``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from fleetprobe.version import __version__

#: Where each public name lives.  They are imported on first use (PEP 562), so ``import fleetprobe``
#: and ``fleetprobe --help`` do not pay for asyncssh, yaml and the rest (issue 5).
_EXPORTS = {
    "FleetprobeError": "errors", "HostError": "errors", "InputError": "errors", "InventoryError": "errors",
    "PlaybookError": "errors", "TransportError": "errors",
    "Facts": "facts",
    "Host": "inventory", "Inventory": "inventory", "load_inventory": "inventory",
    "FleetAggregate": "merge", "FleetReport": "results", "RunInfo": "results",
    "RunSettings": "settings", "cleanup_fleet": "orchestrate", "facts_fleet": "orchestrate",
    "plan_fleet": "orchestrate", "run_playbook": "orchestrate", "EventStream": "orchestrate",
    "HostOutcome": "outcome", "LossCounters": "outcome",
    "TraceEvent": "parse",
    "HostPlan": "plan", "plan_host": "plan",
    "Playbook": "playbook", "load_playbook": "playbook", "parse_playbook": "playbook",
    "adhoc_playbook": "adhoc",
    "load_json": "results", "write_json": "results",
    "SSHOptions": "session",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fleetprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .errors import FleetprobeError, HostError, InputError, InventoryError, PlaybookError, TransportError
    from .facts import Facts
    from .inventory import Host, Inventory, load_inventory
    from .merge import FleetAggregate
    from .results import FleetReport, RunInfo
    from .orchestrate import EventStream, cleanup_fleet, facts_fleet, plan_fleet, run_playbook
    from .settings import RunSettings
    from .outcome import HostOutcome, LossCounters
    from .traceline import TraceEvent
    from .plan import HostPlan, plan_host
    from .playbook import Playbook, load_playbook, parse_playbook
    from .adhoc import adhoc_playbook
    from .session import SSHOptions
    from .results import load_json, write_json

__all__ = [
    "__version__",
    "EventStream", "Facts", "FleetAggregate", "FleetReport", "FleetprobeError", "Host", "HostError", "HostOutcome",
    "HostPlan", "InputError", "Inventory", "InventoryError", "LossCounters", "Playbook", "PlaybookError",
    "RunInfo", "RunSettings", "SSHOptions", "TraceEvent", "TransportError",
    "cleanup_fleet", "facts_fleet", "load_inventory", "load_json", "load_playbook", "plan_fleet",
    "adhoc_playbook", "parse_playbook", "plan_host", "run_playbook", "write_json",
]
