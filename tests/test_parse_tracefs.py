"""parse + clock + merge on this machine's real tracefs: a private instance, real exec events, chunked reads."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fleetprobe.clock import ClockMap
from fleetprobe.merge import FleetAggregate
from fleetprobe.outcome import HostOutcome
from fleetprobe.parse import TraceStream

TRACEFS = Path("/sys/kernel/tracing")


def _drain(fd: int, stream: TraceStream, quiet_for: float = 0.3, limit: float = 10.0) -> None:
    """Read trace_pipe in 64 KiB chunks (as the controller reads the channel) until it stays empty."""
    deadline = time.monotonic() + limit
    last_data = time.monotonic()
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            data = b""
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
            data = b""
        if data:
            stream.feed(data)
            last_data = time.monotonic()
        elif time.monotonic() - last_data > quiet_for:
            return
        else:
            time.sleep(0.02)


@pytest.mark.tracefs
def test_real_exec_events_through_stream_and_aggregate(clean_tracefs: None, tmp_path: Path) -> None:
    """Exec a binary whose name has spaces 3 times; the fleet tables and the clock say so."""
    if not (TRACEFS / "events" / "sched" / "sched_process_exec").is_dir():
        pytest.skip("no sched_process_exec tracepoint")
    inst = TRACEFS / "instances" / f"fp_t{os.getpid()}"
    prog = tmp_path / "fp true x"
    shutil.copy("/bin/true", prog)
    inst.mkdir()
    enable = inst / "events" / "sched" / "sched_process_exec" / "enable"
    fd = -1
    try:
        fd = os.open(inst / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        (inst / "trace_marker").write_text(f"fpsync {time.time():.9f}\n")
        enable.write_text("1\n")
        before = time.time()
        for _ in range(3):
            subprocess.run([str(prog)], check=True)
        after = time.time()
        enable.write_text("0\n")
        (inst / "trace_marker").write_text(f"fpsync {time.time():.9f}\n")
        clock = ClockMap(offset=0.0, error=0.0)
        agg = FleetAggregate()
        times: list[float] = []
        stream = TraceStream("local", {"sched_process_exec": "exec"}, aggregate=agg, clock=clock,
                             on_event=lambda ev: times.append(ev.time) if ev.comm == "fp true x" else None)
        _drain(fd, stream)
        stream.close()
    finally:
        if fd >= 0:
            os.close(fd)
        if enable.exists():
            enable.write_text("0\n")
        inst.rmdir()
    assert stream.stats.markers == 2 and stream.stats.unparsed == 0 and stream.stats.unsynced == 0
    agg.add_host(HostOutcome("local"))
    top = {v: (n, h) for v, n, h in agg.top("exec", "filename", 50)}
    assert top[str(prog)] == (3, 1)
    assert ("fp true x", 3, 1) in agg.top("exec", "comm", 50)
    # Real markers: the events land between the wall-clock readings around them.
    assert len(times) == 3
    assert all(before - 0.01 <= t <= after + 0.01 for t in times), (before, times, after)
    assert clock.uncertainty <= 1e-3
