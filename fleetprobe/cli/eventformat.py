"""``--print`` with the playbook's ``print:`` formats: a probe with one prints its own line.

The host and probe columns stay first (as :class:`~fleetprobe.render.eventlines.EventPrinter`
prints them), so ``awk '{print $1}'`` still reads the host; probes without a format print
EventPrinter's line.  A formatted batch costs one split_args per row: it is Python per event,
where EventPrinter's common batch is one join (only playbooks that ask for formats pay it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import IO

from fleetprobe.parse import EventBatch
from fleetprobe.traceline import TraceEvent, split_args, split_event
from fleetprobe.printformat import PrintFormat
from fleetprobe.render.eventlines import PID_WIDTH, EventPrinter, visible, visible_word


def _args(text: str, name: str) -> str:
    """The argument part of an event text ``name: args``."""
    rest = text[len(name):]
    return rest[2:] if rest[:2] == ": " else split_event(text)[1]


class FormatPrinter(EventPrinter):
    """An EventPrinter that prints the events of probes with a ``print:`` format in that format."""

    def __init__(self, stream: IO[str] | None, formats: Mapping[str, PrintFormat], *,
                 hosts: Iterable[str] = (), probes: Iterable[str] = (),
                 on_closed: Callable[[], None] | None = None) -> None:
        """``formats``: probe name -> its format (probes not in it print EventPrinter's line)."""
        super().__init__(stream, hosts=hosts, probes=probes, on_closed=on_closed)
        self.formats = dict(formats)

    def write_batch(self, host: str, batch: EventBatch, probes: Mapping[str, str]) -> None:
        """Print every row of ``host``'s batch in order, formatted where its probe has a format."""
        if not batch.rows:
            return
        if not any(probes[name] in self.formats for name in batch.counts):
            super().write_batch(host, batch, probes)
            return
        lines = []
        for (comm, pid, _, _, text), name in zip(batch.rows, batch.names):
            probe = probes[name]
            args = _args(text, name)
            fmt = self.formats.get(probe)
            if fmt is None:
                lines.append(f"{self._head(host, probe)}{self._comms[comm]}{pid:<{PID_WIDTH}} {visible(args)}\n")
            else:
                lines.append(f"{self._head(host, probe)}{fmt.render(comm, pid, split_args(args)[1], visible, visible_word)}\n")
        self._put("".join(lines), len(batch.rows))

    def write(self, ev: TraceEvent) -> None:
        """One event already built (module events)."""
        fmt = self.formats.get(ev.probe)
        if fmt is None:
            super().write(ev)
            return
        line = fmt.render(ev.comm, ev.pid, split_args(ev.args)[1], visible, visible_word)
        self._put(f"{self._head(ev.host, ev.probe)}{line}\n", 1)
