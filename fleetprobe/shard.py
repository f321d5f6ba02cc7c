"""Shards: split a fleet across bastions by a stable hash of host names, and merge their reports.

``--shard i/N`` keeps the hosts whose name hashes to shard i (1-based) of N.
The hash is SHA-256 of the inventory name, so every bastion computes the
same split from the same inventory with no coordination, and adding a host
never moves the others.  ``fleetprobe merge`` folds the shards' JSON reports
into the report one run over the whole fleet would have given (the
aggregate is a mergeable value; see :mod:`fleetprobe.merge`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleetprobe.errors import InputError
from fleetprobe.inventory import Host, Inventory
from fleetprobe.results import FleetReport, load_json

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        """``i/N`` as the option takes it."""
        return f"{self.index}/{self.count}"

    def owns(self, host_name: str) -> bool:
        """True when ``host_name`` belongs to this shard."""
        return shard_of(host_name, self.count) == self.index


def parse_shard(text: str) -> Shard:
    """``i/N`` (1 <= i <= N) -> Shard; anything else is an InputError saying what to write."""
    m = _SPEC.fullmatch(text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise InputError(f"--shard {text!r} is not i/N with 1 <= i <= N",
                         hint="e.g. --shard 1/3, --shard 2/3 and --shard 3/3 on three bastions")
    return Shard(int(m.group(1)), int(m.group(2)))


def shard_of(host_name: str, count: int) -> int:
    """The 1-based shard of a host name among ``count`` shards (stable across machines and Python runs)."""
    digest = hashlib.sha256(host_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def select_hosts(hosts: Iterable[Host], shard: Shard | None) -> tuple[Host, ...]:
    """The hosts of one shard, in inventory order (all of them for None)."""
    return tuple(h for h in hosts if shard is None or shard.owns(h.name))


def shard_inventory(inventory: Inventory, shard: Shard | None) -> Inventory:
    """The inventory limited to one shard (groups keep only that shard's hosts)."""
    if shard is None:
        return inventory
    hosts = select_hosts(inventory.hosts, shard)
    names = {h.name for h in hosts}
    groups = {g: tuple(h for h in members if h in names) for g, members in inventory.groups.items()}
    return Inventory(hosts, groups, inventory.source)


def merge_reports(reports: Sequence[FleetReport]) -> FleetReport:
    """One report of all shards (refuses overlapping hosts and different playbooks)."""
    if not reports:
        raise InputError("nothing to merge", hint="give the JSON reports of every shard")
    out = reports[0]
    for r in reports[1:]:
        out = out.merge(r)
    return out


def merge_files(paths: Sequence[str | os.PathLike[str]]) -> FleetReport:
    """Read shard reports written by ``--json`` and merge them; errors name the file."""
    reports = []
    for p in paths:
        try:
            reports.append(load_json(p))
        except OSError as exc:
            raise InputError(f"cannot read report: {exc.strerror}", where=str(p)) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not a fleetprobe JSON report ({type(exc).__name__}: {exc})", where=str(p),
                             hint="merge files written by 'fleetprobe run --json'") from None
    try:
        return merge_reports(reports)
    except InputError as exc:
        raise InputError(exc.message, where=", ".join(str(p) for p in paths), hint=exc.hint) from None
