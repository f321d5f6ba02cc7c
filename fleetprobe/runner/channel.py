"""Channel: the controller's I/O with one host's runner: start it, read its facts, heartbeat, dead-runner teardown.

The facts script alone (``fleetprobe facts``) also runs through here (:func:`gather_facts`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fleetprobe.errors import HostError
from fleetprobe.facts import Facts, facts_args, facts_script, parse_facts
from fleetprobe.inventory import Host
from fleetprobe.plan import HostPlan
from fleetprobe.playbook import Playbook
from fleetprobe.runner.runner import (RunnerReport, runner_script,
                                      teardown_directives)
from fleetprobe.session import Session, Stream, script_command, script_input, shell_command


@dataclass
class HostFacts:
    """Facts of one host with the measured clock offset (host realtime minus controller realtime)."""

    host: Host
    facts: Facts | None = None
    error: HostError | None = None
    clock_offset: float | None = None
    clock_error: float | None = None


def _facts_words(playbook: Playbook | None, mount: bool) -> tuple[list[str], list[str]]:
    """The kernel symbols a playbook names, and the facts script's arguments for it."""
    symbols = playbook.kernel_symbols() if playbook else []
    tps = playbook.tracepoints() if playbook else []
    binaries = playbook.user_binaries() if playbook else []
    return symbols, facts_args(symbols, tps, binaries, mount=mount)


async def gather_facts(session: Session, playbook: Playbook | None, *, mount: bool,
                       timeout: float) -> tuple[Facts, float, float]:
    """Run the facts script once; return facts and the clock offset with its uncertainty.

    The script prints the host's realtime first: the time its line arrives,
    against the time we asked, bounds the offset the way NTP does.
    """
    symbols, words = _facts_words(playbook, mount)
    stream = await session.stream(script_command(session.host, "fleetprobe-facts", *words))
    # The script says when it runs and waits for a ping before it reads its clock: the clock is
    # then read in the middle of a short, symmetric round trip, not at the end of the long one
    # that delivered the script (which made the offset always equal its error).
    stream.write(script_input(_PING_FIRST + facts_script()))
    facts, offset, error, _ = await _read_facts(stream, session.host.name, symbols, timeout, keep_open=False,
                                                ping=True)
    return facts, offset, error


#: Put in front of the facts script by gather_facts: say it runs, then wait for one line (the ping).
_PING_FIRST = "printf '@@ready\\n'\nIFS= read -r _fp_ping\n"
_READY = b"@@ready\n"
#: Seconds to wait for the ready line before the ping goes anyway.
READY_WAIT = 2.0


@dataclass
class RunnerChannel:
    """A host's runner, started for its facts and kept waiting for the plan (one channel per run).

    ``rest``: what the runner printed after its facts, before it was sent anything (normally nothing).
    """

    stream: Stream
    rest: bytes = b""


async def start_runner(session: Session, playbook: Playbook, *, mount: bool,
                       timeout: float) -> tuple[RunnerChannel, Facts, float, float]:
    """Start the runner and read the host's facts from it; it then waits for its plan on the same channel.

    One channel instead of a facts channel and a runner channel: each channel costs the
    controller a dozen SSH packets to encrypt or decrypt (issue 5).  The offset and error are
    the facts' NTP-style estimate; the ping sent with the plan usually replaces them.
    """
    symbols, words = _facts_words(playbook, mount)
    stream = await session.stream(script_command(session.host, "fleetprobe-runner", "facts", *words))
    stream.write(script_input(runner_script()))
    try:
        facts, offset, error, rest = await _read_facts(stream, session.host.name, symbols, timeout,
                                                       keep_open=True)
    except BaseException:
        stream.close()
        raise
    return RunnerChannel(stream, rest), facts, offset, error


#: The line that ends the facts output.
_FACTS_END = b"\n@@end\n"
#: Facts are a few KiB (a few hundred KiB with many symbols): more is a host's attack.
MAX_FACTS_BYTES = 32 << 20


async def _read_facts(stream: Stream, host: str, symbols: list[str], timeout: float, *,
                      keep_open: bool, ping: bool = False) -> tuple[Facts, float, float, bytes]:
    """Read facts output from a script just sent on ``stream``: facts, clock offset, its error, bytes after them.

    The facts script exits after ``@@end``; the runner (``keep_open``) stays, waiting for its plan.
    With ``ping`` the script first prints ``@@ready`` and waits for a line: it is sent (and stdin
    closed) then, and the round trip is measured from that moment.
    """
    # Measured from when the script is sent: the channel's set-up round trip is not part of the error.
    t0 = time.time()
    buf = bytearray()
    t_line: float | None = None
    end = -1
    status = 0
    newlines = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                if ping:
                    try:
                        chunk = await asyncio.wait_for(stream.read(65536), READY_WAIT)
                    except TimeoutError:
                        # Nothing yet (something on the way holds output back until the end): the
                        # ping goes now, and the estimate is the one without it (from the script's send).
                        stream.write(b"\n")
                        stream.write_eof()
                        ping = False
                        continue
                else:
                    chunk = await stream.read(65536)
                if not chunk:
                    break
                # Each byte is looked at a bounded number of times: only the new chunk (and the end
                # marker's length before it) is searched, never the whole buffer again (issue 11 #5).
                seen = max(0, len(buf) - len(_FACTS_END) + 1)
                buf += chunk
                if ping:
                    if len(buf) < len(_READY) and _READY.startswith(bytes(buf)):
                        continue                  # the ready line is not whole yet
                    # The ping goes whatever came (a host that printed something else first must not
                    # hang on its read): only our own ready line starts the round trip.
                    # T1 before the write: the ping may be read (and the clock with it) before write returns.
                    sent = time.time()
                    stream.write(b"\n")
                    stream.write_eof()
                    ping = False
                    if buf.startswith(_READY):
                        t0 = sent
                        del buf[:len(_READY)]
                        seen = 0
                        chunk = bytes(buf)
                if len(buf) > MAX_FACTS_BYTES:
                    stream.close()
                    raise HostError(host, "facts", f"facts output passed {MAX_FACTS_BYTES >> 20} MiB without its "
                                    "end marker", evidence=bytes(buf[:200]).decode("utf-8", "replace"),
                                    hint="the host's facts script (or its shell) printed far more than facts")
                if t_line is None:
                    newlines += chunk.count(b"\n")
                    if newlines >= 2:
                        t_line = time.time()
                if keep_open and (end := buf.find(_FACTS_END, seen)) >= 0:
                    break
            if end < 0:
                status = await stream.wait(timeout)
    except TimeoutError:
        stream.close()
        raise HostError(host, "facts", f"facts script did not finish in {timeout:.0f}s") from None
    return _facts_and_clock(stream, host, buf, end, status, symbols, t0, t_line)


def _facts_and_clock(stream: Stream, host: str, buf: bytearray, end: int, status: int, symbols: list[str],
                     t0: float, t_line: float | None) -> tuple[Facts, float, float, bytes]:
    """The facts read (``end``: where their end marker is in ``buf``, -1 when the script exited), the clock
    offset and its error from when the script (or ping) went (``t0``) and its second line came (``t_line``)."""
    rest = b""
    if end >= 0:
        rest = bytes(buf[end + len(_FACTS_END):])
        del buf[end + len(_FACTS_END):]
    text = buf.decode("utf-8", "replace")
    if status != 0 or "@@end" not in text:
        raise HostError(host, "facts", f"facts script failed (exit {status})",
                        evidence=stream.stderr().decode("utf-8", "replace")[-600:] or text[-300:],
                        hint="is the login shell POSIX sh compatible, and (with become) is sudo -n allowed?")
    facts = parse_facts(host, text, symbols)
    t_line = t_line or time.time()
    # The clock was read at some controller time in [t0, t_line] (T1, T4): the offset lies in
    # [realtime - T4, realtime - T1].  The estimate is NTP's midpoint moved by the host's hold
    # time (the clock was read about one date's cost after the ping arrived: a second date measured
    # it), and its error reaches the far end of that interval, so the truth is always inside.
    cost = min(max(facts.date_cost, 0.0), max(t_line - t0, 0.0))
    offset = facts.realtime - (t0 + t_line + cost) / 2 if facts.realtime else 0.0
    error = (t_line - t0 + cost) / 2 + (1.0 if facts.realtime == int(facts.realtime) else 0.0)
    return facts, offset, error, rest


#: Seconds without the runner's 5-second clock marker before it is presumed dead.
HEARTBEAT_TIMEOUT = 20
#: How often the controller wakes the runner for its heartbeat marker ("tick" on its stdin).
TICK_SECONDS = 5


def runner_silent(idle: float, last_marker_ts: float | None, last_trace_ts: float) -> bool:
    """Has the runner stopped writing its 5-second clock markers for HEARTBEAT_TIMEOUT?

    Judged in the host's trace time, not by when the controller happens to read:
    a controller behind a busy stream reads old data, markers included, late.
    Dead when events read go HEARTBEAT_TIMEOUT (trace time) past the last marker
    (the killed runner's reader still streams), or when nothing at all arrived
    for that long (``idle``, controller seconds: a live runner always writes
    markers, so silence cannot be backlog).
    """
    if idle > HEARTBEAT_TIMEOUT:
        return True
    return last_marker_ts is not None and last_trace_ts - last_marker_ts > HEARTBEAT_TIMEOUT


async def _runner_once(session: Session, directives: str, timeout: float) -> RunnerReport:
    """Run the runner for one directive (a sweep, a dead run's teardown) and read what it said."""
    r = await session.run(script_command(session.host, "fleetprobe-runner"),
                          input=script_input(runner_script()) + directives.encode(), timeout=timeout)
    rep = RunnerReport()
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("@@fp "):
            rep.handle(line[5:])
    return rep


async def _teardown_for_dead_runner(session: Session, plan: HostPlan, facts: Facts,
                                   modules: tuple[str, ...] = (), processes: tuple[str, ...] = ()) -> str:
    """Remove a run's modules, group, instance and left processes over the same connection when its runner died."""
    try:
        rep = await _runner_once(session, teardown_directives(plan, facts.tracefs or "/sys/kernel/tracing",
                                                              modules, processes), timeout=60)
    except HostError as exc:
        return f"timer (controller teardown failed: {exc.message})"
    return "controller" if rep.clean else "timer (controller teardown incomplete)"


async def _oopses_since(session: Session, start: dict[str, int]) -> tuple[int, int] | None:
    """After a runner died: the kernel's oops/warn counts since its start snapshot (None if unknown)."""
    try:
        r = await session.run(shell_command(session.host, "cat /sys/kernel/oops_count /sys/kernel/warn_count"),
                              timeout=15)
        oops, warn = (int(x) for x in r.stdout.split()[:2])
    except (HostError, ValueError):
        return None
    return oops - start.get("oops", oops), warn - start.get("warn", warn)
