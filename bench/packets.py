"""SSH packets per host, by message type, for one fan-out client on simulated hosts (bench/fanout.py's).

    .venv/bin/python bench/packets.py [--hosts 50] [--kinds fp-run,asyncssh-runner,asyncssh-gcm]

Runs each client in this process against the simulated hosts with asyncssh's own packet logging on
(``asyncssh.set_debug_level(3)``: one DEBUG record per packet sent or received, "Sent MSG_X (n), N
bytes") and counts the records; nothing of asyncssh is changed. Prints packets per host by direction
and type, and channel data bytes. The logging itself costs CPU: read counts here, never timings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fanout  # noqa: E402

_RECORD = re.compile(r"(?:^|\] )(Sent|Received) (MSG_[A-Z_]+|packet type \d+)[^,]*, (\d+) bytes?")


class _Count(logging.Handler):
    """Counts asyncssh's packet records (its log lines at debug level 3)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[tuple[str, str]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        m = _RECORD.search(record.getMessage())
        if m:
            self.counts[(m[1], m[2])] += 1
            if m[2] == "MSG_CHANNEL_DATA":
                self.counts[(m[1], "channel data bytes")] += int(m[3])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--kinds", default="fp-run,asyncssh-runner,asyncssh-gcm")
    ap.add_argument("--first-port", type=int, default=28500)
    args = ap.parse_args(argv)
    fanout.FIRST_PORT = args.first_port
    work = Path(tempfile.mkdtemp(prefix="fp-packets-"))
    fleet = fanout.SimFleet(work, args.hosts)
    kinds = args.kinds.split(",")
    table: dict[str, Counter[tuple[str, str]]] = {}
    try:
        fleet.start(1, lines=20)
        os.environ["HOME"] = str(work / "home")
        spec = {"ports": fleet.ports, "forks": 50, "key": str(work / "client_key"),
                "known_hosts": str(work / "known_hosts"), "spec_path": str(work / "spec.json")}
        logger = logging.getLogger("asyncssh")
        for kind in kinds:
            if kind == "asyncssh-runner":
                spec["exchange"] = fanout._runner_exchange(spec)
            handler = _Count()
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
            asyncssh.set_debug_level(3)
            try:
                res = asyncio.run(fanout._client_async(kind, spec))
            finally:
                logger.removeHandler(handler)
                asyncssh.set_debug_level(1)
            if res["ok"] != args.hosts:
                print(f"{kind}: only {res['ok']} of {args.hosts} hosts ok: {res.get('errors')}")
            table[kind] = handler.counts
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    names = sorted({k for c in table.values() for k in c}, key=lambda k: (k[0], k[1] == "channel data bytes", k[1]))
    print("| direction | message | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for d in ("Sent", "Received"):
        for key in [k for k in names if k[0] == d]:
            print(f"| {d} | {key[1]} | " + " | ".join(f"{table[k][key] / args.hosts:g}" for k in kinds) + " |")
        totals = [sum(n for (dd, m), n in table[k].items() if dd == d and m != "channel data bytes") / args.hosts
                  for k in kinds]
        print(f"| {d} | all packets | " + " | ".join(f"**{t:g}**" for t in totals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
