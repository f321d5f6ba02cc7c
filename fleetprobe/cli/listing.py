"""``fleetprobe list [PATTERN] -i INV``: what the fleet can probe, by name (see fleetprobe.discover).

Exit status: 0 every host answered and something matched, 1 nothing matched on any host (a typo:
the near names are printed), 2 some hosts failed, 3 none answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from rich.console import Console
from rich.text import Text

from fleetprobe.cli.options import Exit
from fleetprobe.cli.output import write_text
from fleetprobe.cli.run import _inventory, _raise_fd_limit, _settings
from fleetprobe.discover import (FUNCTION, SYMBOL, TRACEPOINT, HostListing, Query, Row, list_fleet,
                                 merge_listings, parse_query, suggestions)
from fleetprobe.render.safe import visible, visible_lines
from fleetprobe.cli.playbooks import cmd_list as list_playbooks

#: Hosts named in a row's "missing on" before "and N more" (the JSON has them all).
MISSING_SHOWN = 8
_TITLE = {FUNCTION: "kernel functions", TRACEPOINT: "tracepoints", SYMBOL: "symbols"}


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    """List the names matching PATTERN on every host, with who has each (``--playbooks``: the shipped ones)."""
    if getattr(args, "playbooks", False):
        return list_playbooks(args, console)
    query = parse_query(args.pattern, args.binary, fields=args.fields)
    inv = _inventory(args)
    settings = _settings(args)
    _raise_fd_limit()
    listings = asyncio.run(list_fleet(inv.hosts, settings, query))
    rows = merge_listings(listings, query)
    near: list[str] = []
    answered = [x for x in listings if x.error is None]
    if not rows and answered and query.exact:
        # A name no host has: ask the hosts that answered for their near names (only candidates travel).
        again = asyncio.run(list_fleet([h for h in inv.hosts if h.name in {x.host for x in answered}],
                                       settings, query, suggest=True))
        near = suggestions(query, again)
    if args.json:
        write_text(args.json, json.dumps(_json(query, listings, rows, near), indent=1) + "\n")
    if args.json != "-":
        render_listing(query, listings, rows, near, console)
    failed = len(listings) - len(answered)
    if failed == len(listings):
        return int(Exit.NONE_OK)
    if not rows:
        return int(Exit.BAD_INPUT)
    return int(Exit.SOME_FAILED if failed else Exit.OK)


def _line(row: Row, width: int, total: int) -> str:
    """One name: kind, name, how many of the hosts that can list its kind have it, which do not."""
    line = f"{row.kind:<10}  {row.name:<{width}}  {len(row.hosts)}/{total}"
    if row.missing:
        shown = ", ".join(row.missing[:MISSING_SHOWN])
        more = len(row.missing) - MISSING_SHOWN
        line += f"  missing on: {shown}" + (f" and {more} more" if more > 0 else "")
    return visible(line)


def render_listing(query: Query, listings: list[HostListing], rows: list[Row], near: list[str],
                   console: Console) -> None:
    """Every matching name, one line each (awk-friendly), then what some hosts could not list and why."""
    able = {kind: [x for x in listings if x.error is None and x.names.get(kind) is not None] for kind in query.kinds}
    width = max((len(r.name) for r in rows), default=0)
    lines: list[str] = []
    for row in rows:
        lines.append(_line(row, width, len(able[row.kind])))
        if row.fields:
            lines += [visible(f"    {decl}") for decl in row.fields]
            if row.fields_differ:
                lines.append(visible(f"    (other fields on: {', '.join(row.fields_differ)})"))
    if lines:
        # One Text for every line: 80 000 names print in a second, not a minute.
        console.print(Text(visible_lines("\n".join(lines))))
    counts = ", ".join(f"{sum(r.kind == k for r in rows)} {_TITLE[k]}" for k in query.kinds)
    where = f" in {query.binary}" if query.binary else ""
    console.print(Text(visible(f"{counts}{where} match {query.glob!r} on {len(listings)} host(s)"), style="bold"))
    for kind in query.kinds:
        # One line per reason, with the hosts it holds for (300 hosts without kprobes are one line).
        by_reason: dict[str, list[str]] = {}
        for x in listings:
            if x.error is None and x.names.get(kind) is None:
                by_reason.setdefault(x.why.get(kind, ""), []).append(x.host)
        for why, hosts in by_reason.items():
            shown = ", ".join(hosts[:MISSING_SHOWN]) + (f" and {len(hosts) - MISSING_SHOWN} more"
                                                       if len(hosts) > MISSING_SHOWN else "")
            console.print(Text.assemble(("  cannot list ", "yellow"), visible(f"{_TITLE[kind]} on {shown}: {why}")))
    for x in listings:
        if x.junk:
            console.print(Text(visible(f"  {x.host}: {x.junk} line(s) of its answer were not names "
                                       "(dropped)"), style="yellow"))
        if x.error is not None:
            console.print(Text.assemble((visible(x.host), "red"), ": ", visible_lines(str(x.error))))
    if not rows:
        console.print(Text(visible(f"nothing matches {query.pattern!r}"), style="red"))
        if near:
            console.print(Text(visible(f"did you mean: {', '.join(near)}")))


def _json(query: Query, listings: list[HostListing], rows: list[Row], near: list[str]) -> dict[str, Any]:
    """The listing as JSON (``--json``)."""
    return {
        "pattern": query.pattern, "kinds": list(query.kinds), "binary": query.binary,
        "hosts": [{"host": x.host, "error": str(x.error) if x.error else None,
                   "cannot_list": {k: x.why[k] for k in query.kinds if x.error is None and x.names.get(k) is None},
                   "dropped_lines": x.junk} for x in listings],
        "names": [{"kind": r.kind, "name": r.name, "hosts": r.hosts, "missing": r.missing,
                   **({"fields": list(r.fields), "fields_differ": r.fields_differ} if r.kind == TRACEPOINT
                      and query.fields else {})} for r in rows],
        "suggestions": near,
    }
