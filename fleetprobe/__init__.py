"""fleetprobe: run kernel probes across a fleet over SSH and merge what they see into one report.

The Python API in one call::

    import asyncio
    from fleetprobe import RunSettings, load_inventory, load_playbook, run_playbook

    inv = load_inventory("inventory.yml").limit("db")
    report = asyncio.run(run_playbook(inv.hosts, load_playbook("playbooks/execsnoop.yml"), RunSettings()))
    for host in report.hosts:
        print(host.host, host.status, host.hits)
"""

__version__ = "0.1.0"

from .errors import FleetprobeError, HostError, InputError, InventoryError, PlaybookError, TransportError
from .facts import Facts
from .inventory import Host, Inventory, load_inventory
from .merge import FleetAggregate, FleetReport, RunInfo
from .orchestrate import RunSettings, cleanup_fleet, facts_fleet, plan_fleet, run_playbook
from .outcome import HostOutcome, LossCounters
from .parse import TraceEvent
from .plan import HostPlan, plan_host
from .playbook import Playbook, load_playbook
from .report import load_json, write_json
from .transport import SSHOptions

__all__ = [
    "__version__",
    "Facts", "FleetAggregate", "FleetReport", "FleetprobeError", "Host", "HostError", "HostOutcome",
    "HostPlan", "InputError", "Inventory", "InventoryError", "LossCounters", "Playbook", "PlaybookError",
    "RunInfo", "RunSettings", "SSHOptions", "TraceEvent", "TransportError",
    "cleanup_fleet", "facts_fleet", "load_inventory", "load_json", "load_playbook", "plan_fleet",
    "plan_host", "run_playbook", "write_json",
]
