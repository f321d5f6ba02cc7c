"""What ``fleetprobe plan`` shows of a host plan's aggregates: the lines a run writes, and each table's mode."""

from __future__ import annotations

from typing import Any

from fleetprobe.plan import HostPlan

def plan_lines(plan: HostPlan) -> list[str]:
    """The exact synthetic-event and trigger lines a run writes on this host, and each table's mode."""
    out: list[str] = []
    for ap in plan.aggregates:
        for s in ap.synthetic:
            out.append(f"synthetic_events >> {s}")
        for t in ap.triggers:
            out.append(f"instances/{plan.instance}/events/{t.event}/trigger >> {t.line}")
        for tp in ap.tables:
            by = f" per {', '.join(tp.table.by)}" if tp.table.by else ""
            what = f"{tp.table.probe}: {tp.table.kind} {tp.table.field}{by}"
            if tp.mode == "kernel":
                out.append(f"aggregate {what}: in kernel")
            else:
                out.append(f"aggregate {what}: streamed, computed on the controller ({tp.reason})")
    return out


def plan_json(plan: HostPlan) -> list[dict[str, Any]]:
    """The aggregates of a plan as JSON (``fleetprobe plan --json``)."""
    return [{"probe": ap.probe, "synthetic": list(ap.synthetic),
             "triggers": [{"event": t.event, "line": t.line, "table": t.table} for t in ap.triggers],
             "tables": [{"table": tp.table.table_id, "by": list(tp.table.by), "mode": tp.mode, "reason": tp.reason}
                        for tp in ap.tables]} for ap in plan.aggregates]
