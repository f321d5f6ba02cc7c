"""Simulated hosts for the benchmarks: one asyncssh server process, many logical hosts (one per port).

    .venv/bin/python bench/simhost.py --first-port 21000 --count 500 --dir WORKDIR [--lines M] [--flood]

Each port is one logical host: a real SSH server (key exchange, public key
authentication against WORKDIR/client_key.pub, host key WORKDIR/host_key)
whose "shell" is a script that recognises what it was asked to run by the
script's name (``$0`` of fleetprobe's bootstrap, which then reads the script on
stdin up to ``#fleetprobe-script-end``), so that the benchmark measures the
controller, not sshd (OpenSSH's sshd spends ~33 ms CPU per connection: PERF-NOTES.md):

* fleetprobe's facts script (``fleetprobe-facts``) -> a canned real facts
  output captured on this machine (bench/data/facts-x86_64-6.18.txt) with a
  fresh realtime line;
* fleetprobe's runner (``fleetprobe-runner``) -> the runner protocol: with
  ``facts`` arguments first the same facts output, then reads the plan up to
  ``go`` (a ``ping`` stamped on arrival; EOF before ``go``: exits quietly),
  answers the ping and says hello/placed/started, writes one fpsync marker,
  streams M trace_pipe lines of the enabled events (``--flood``: as fast as the
  channel takes them, until M lines), then ends with stopping/stats/clean/bye on
  ``stop``, stdin EOF or the plan's duration.  It writes its control lines in the
  groups runner.sh writes them (each write is a packet the controller decrypts):
  pong, hello, kernel counts, what was placed, start stats and started in one;
  the marker (through the trace reader); the trace lines; stopping with the end
  stats; clean with bye;
* anything else (the peers' ``uname -m; cat /proc/version``) -> canned output.

Control on stdin, one word a line, answered with one JSON line on stdout:
``stats`` (connections accepted per port, sessions per kind, since the last
``reset``), ``reset``; EOF or ``quit`` stops the server.  ``ready`` is
printed once every port listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import asyncssh

#: The ``$0`` fleetprobe gives its scripts (transport.script_command).
FACTS_NAME = "fleetprobe-facts"
RUNNER_NAME = "fleetprobe-runner"
#: fleetprobe may send a script on stdin after a small bootstrap command, ended by this line.
SCRIPT_END = "#fleetprobe-script-end"
BARE_OUTPUT = (b"x86_64\nLinux version 6.18.44-fc-v657 (root@bench) (gcc (Debian 12.2.0-14) 12.2.0) "
               b"#1 SMP PREEMPT_DYNAMIC\n")
COMMS = ["sshd", "bash", "systemd-journal", "nginx", "postgres", "python3", "cron", "kworker/u8:2",
         "containerd", "node", "Web Content", "my worker 1"]
PROGRAMS = ["/usr/bin/logrotate", "/usr/bin/curl", "/bin/sh", "/usr/lib/postgresql/15/bin/postgres",
            "/usr/sbin/nginx", "/usr/bin/python3.11"]


class Counters:
    """Connections per port and sessions per kind, since the last reset."""

    def __init__(self) -> None:
        self.connections: dict[int, int] = {}
        self.sessions: dict[str, int] = {}
        self.lines_sent = 0

    def reset(self) -> None:
        """Zero every counter."""
        self.connections.clear()
        self.sessions.clear()
        self.lines_sent = 0

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps({"connections": {str(k): v for k, v in self.connections.items()},
                           "sessions": self.sessions, "lines_sent": self.lines_sent})


def trace_lines(events: list[str], n: int, seed: int, t0: float, paired: bool = False) -> tuple[bytes, float]:
    """``n`` trace_pipe lines of the given event names in the kernel's layout (8% comms with spaces).

    ``paired``: each line of an odd index has the pid of the line before it (an entry and its return).
    """
    rng = random.Random(seed)
    out = []
    t = t0
    pid = 0
    for i in range(n):
        t += rng.random() * 2e-5
        comm = rng.choice(COMMS)
        pid = pid if paired and i % 2 else rng.randrange(100, 40000)
        ev = events[i % len(events)]
        if ev == "sched_process_exec":
            body = f"filename={rng.choice(PROGRAMS)} pid={pid} old_pid={pid}"
        elif ev == "sched_process_fork":
            body = f"comm={comm} pid={pid} child_comm={comm} child_pid={pid + 1}"
        else:
            body = (f"(do_sys_openat2+0x0/0x1a0) dfd=0xffffff9c path=\"{rng.choice(PROGRAMS)}\" "
                    f"flags=0x{rng.choice((0, 0x80000, 0x241)):x}")
        out.append(f"{comm:>16}-{pid:<7} [{rng.randrange(8):03d}] ..... {t:12.6f}: {ev}: {body}\n")
    return "".join(out).encode(), t


class SimHost:
    """The scripted personality of every logical host of this process."""

    def __init__(self, facts: str, lines: int, flood: bool, counters: Counters, vary: bool = False) -> None:
        self.facts_head, _, rest = facts.partition("@@realtime\n")
        self.facts_tail = rest.split("\n", 1)[1]
        self.lines = lines
        self.flood = flood
        self.vary = vary
        self.counters = counters
        self._chunks: dict[tuple[str, ...], bytes] = {}

    def facts_output(self) -> bytes:
        """The captured facts with this moment's realtime."""
        return f"{self.facts_head}@@realtime\n{time.time():.9f}\n{self.facts_tail}".encode()

    def chunk_for(self, events: tuple[str, ...]) -> bytes:
        """~64 KiB of trace lines for these events, generated once and reused."""
        if events not in self._chunks:
            self._chunks[events] = trace_lines(list(events), 600, 1, 100.0)[0]
        return self._chunks[events]

    async def handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """Serve one session according to what it asked to run."""
        cmd = process.command or ""
        try:
            if SCRIPT_END in cmd:
                # The script comes first on stdin, ended by SCRIPT_END (transport.script_command).
                while True:
                    line = await process.stdin.readline()
                    if not line or line.rstrip(b"\n") == SCRIPT_END.encode():
                        break
            if FACTS_NAME in cmd:
                self._count("facts")
                process.stdout.write(self.facts_output())
                process.exit(0)
            elif RUNNER_NAME in cmd:
                self._count("runner")
                await self.runner(process, with_facts=f"{RUNNER_NAME} facts" in cmd)
            else:
                self._count("other")
                process.stdout.write(BARE_OUTPUT)
                process.exit(0)
        except (asyncssh.Error, OSError, BrokenPipeError, ConnectionError):
            process.close()

    def _count(self, kind: str) -> None:
        self.counters.sessions[kind] = self.counters.sessions.get(kind, 0) + 1

    async def runner(self, process: asyncssh.SSHServerProcess[bytes], with_facts: bool) -> None:
        """The runner protocol (fleetprobe/runner/runner.sh), without touching any kernel."""
        out = process.stdout
        if with_facts:
            out.write(self.facts_output())
        events: list[str] = []
        placed: list[str] = []
        duration = 10.0
        sweep_only = False
        ping_rx = ""
        # Control lines carry the plan's secret once it came (runner.sh's CP), "@@fp " before it.
        cp = "@@fp "
        while True:
            raw = await process.stdin.readline()
            if not raw:
                process.exit(0)
                return
            words = raw.decode().split()
            if not words:
                continue
            if words[0] == "go":
                break
            if words[0] == "secret" and len(words) > 1:
                cp = f"@@fp:{words[1]} "
            elif words[0] == "ping":
                ping_rx = f"{time.time():.9f}"
            elif words[0] == "duration":
                duration = float(words[1])
            elif words[0] == "enable":
                events.append(words[1].rsplit("/", 1)[-1])
            elif words[0] == "def":
                placed.append(" ".join(words[2:]))
            elif words[0] == "sweep":
                sweep_only = True
                break
        if sweep_only:
            out.write(f"{cp}sweep done\n".encode())
            process.exit(0)
            return
        pong = f"{cp}pong {ping_rx} {time.time():.9f}\n" if ping_rx else ""
        out.write(f"{pong}{cp}hello pid={os.getpid()}\n{cp}kernel start oops=0 warn=0 taint=0\n".encode()
                  + "".join(f"{cp}placed {d}\n" for d in placed).encode()
                  + f"{cp}stats start cpu0 overrun=0 commit_overrun=0 dropped=0 entries=0 read=0 \n".encode()
                  + f"{cp}started enabled={len(events)} modules= duration={int(duration)}\n".encode())
        out.write(f"      fleetprobe-1       [000] .....    99.000000: tracing_mark_write: fpsync "
                  f"{time.time():.9f}\n".encode())
        stop = asyncio.Event()

        async def watch_stdin() -> None:
            while True:
                line = await process.stdin.readline()
                if not line or line.strip() == b"stop":
                    stop.set()
                    return

        watcher = asyncio.ensure_future(watch_stdin())
        reason = "duration"
        sent = 0
        try:
            if events and self.lines:
                if self.flood:
                    chunk = self.chunk_for(tuple(events))
                    per_chunk = chunk.count(b"\n")
                    while sent < self.lines and not stop.is_set():
                        out.write(chunk)
                        sent += per_chunk
                        await out.drain()
                elif self.vary:
                    # Every host its own stream (seeded by its port), of its own length.
                    port = int(process.get_extra_info("connection").get_extra_info("sockname")[1])
                    n = self.lines + port % 17
                    data, _ = trace_lines(events, n, port, 100.0, paired=True)
                    out.write(data)
                    sent = n
                else:
                    data, _ = trace_lines(events, self.lines, sent, 100.0)
                    out.write(data)
                    sent = self.lines
                    await out.drain()
            if not stop.is_set() and not (self.flood and sent >= self.lines):
                try:
                    await asyncio.wait_for(stop.wait(), duration)
                    reason = "stop-or-eof"
                except TimeoutError:
                    reason = "duration"
            elif stop.is_set():
                reason = "stop-or-eof"
        finally:
            watcher.cancel()
            self.counters.lines_sent += sent
        out.write(f"{cp}stopping {reason}\n{cp}kernel end oops=0 warn=0 taint=0\n".encode()
                  + f"{cp}stats end cpu0 overrun=0 commit_overrun=0 dropped=0 entries=0 read=0 \n".encode())
        out.write(f"{cp}clean\n{cp}bye\n".encode())
        await out.drain()
        process.exit(0)


class _Server(asyncssh.SSHServer):
    """Counts the connections of one logical host (port)."""

    def __init__(self, port: int, counters: Counters) -> None:
        self.port = port
        self.counters = counters

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """One more connection on this port."""
        self.counters.connections[self.port] = self.counters.connections.get(self.port, 0) + 1


async def serve(args: argparse.Namespace) -> None:
    """Listen on every port, answer control words on stdin until EOF."""
    work = Path(args.dir)
    counters = Counters()
    sim = SimHost(Path(args.facts).read_text(), args.lines, args.flood, counters, args.vary)
    # Loaded once and shared: per-connection file reads would be the server's cost, not the client's.
    host_key = asyncssh.read_private_key(str(work / "host_key"))
    authorized = asyncssh.import_authorized_keys((work / "client_key.pub").read_text())
    servers = []
    for port in range(args.first_port, args.first_port + args.count):
        servers.append(await asyncssh.listen(
            "127.0.0.1", port, server_host_keys=[host_key], authorized_client_keys=authorized,
            server_factory=lambda p=port: _Server(p, counters), process_factory=sim.handle,
            encoding=None, backlog=1024, allow_scp=False, sftp_factory=None, keepalive_interval=0,
            # Every client here is on loopback; a tight login timeout frees slots of clients that died.
            login_timeout=120))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if line in ("", "quit"):
            break
        if line == "reset":
            counters.reset()
            print("{}", flush=True)
        elif line == "stats":
            print(counters.to_json(), flush=True)
        else:
            print(json.dumps({"error": f"unknown control word {line!r}"}), flush=True)
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    """Run one simulated-host server process."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--dir", required=True, help="holds host_key and client_key.pub")
    ap.add_argument("--facts", default=str(Path(__file__).parent / "data" / "facts-x86_64-6.18.txt"))
    ap.add_argument("--lines", type=int, default=100, help="trace lines each runner session streams")
    ap.add_argument("--flood", action="store_true", help="stream the lines as fast as the channel takes them")
    ap.add_argument("--vary", action="store_true",
                    help="each port its own stream: seeded by the port, --lines + port %% 17 lines, every odd "
                         "line the pid of the one before (tests/test_workers.py compares runs over them)")
    args = ap.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
