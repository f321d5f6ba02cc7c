"""Benchmark: parse + merge throughput of one host stream on one core, and peak RSS.

    .venv/bin/python bench/ingest.py [--lines N] [--parse-only | --no-pairs] [--events FILE] [--print FILE] [--sealed]

Generates a realistic trace_pipe stream (kprobe entry lines with a quoted path,
kretprobe lines, sched tracepoints; 8% of comms contain spaces), feeds it to
:class:`fleetprobe.parse.TraceStream` in 64 KiB chunks exactly as the
controller reads the SSH channel, and aggregates into a
:class:`fleetprobe.merge.FleetAggregate`.  Prints lines/s, MB/s and the peak
RSS after each million lines (must stay flat: the aggregate is bounded).
With ``--events FILE`` every event also goes to a raw-event writer on FILE
the way ``fleetprobe run --events FILE`` hands it events (whole batches of
rows when the writer takes them, else one TraceEvent per event).  With ``--print FILE`` every
event also goes to ``fleetprobe run --print``'s line printer (render.eventlines), writing to FILE
(``/dev/null`` measures the formatting alone).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time

from fleetprobe.clock import ClockMap
from fleetprobe.merge import FleetAggregate
from fleetprobe.parse import TraceStream
from fleetprobe.events import EventWriter

COMMS = ["sshd", "bash", "systemd-journal", "nginx", "postgres", "python3", "cron", "kworker/u8:2",
         "containerd", "node"]
SPACED = ["kworker/u8:2 x", "Web Content", "my worker 1", "JIT thread"]
PATHS = ["/etc/hostname", "/etc/passwd", "/proc/self/stat", "/usr/lib/x86_64-linux-gnu/libc.so.6",
         "/var/log/syslog", "/sys/fs/cgroup/cpu.max", "/dev/null", "/tmp/x y z"]
NAMES = {"fp_ab12cd_0001_openat": "openat", "fp_ab12cd_0001_openat_ret": "openat_ret",
         "sched_process_exec": "exec", "sched_process_fork": "fork"}
PAIRS = {"openat_ret": "openat"}


#: With --sealed: the kprobe lines end with a run's seal (issue 11 #2), as the kernel prints it.
SEAL = " fpt=0x89abcdef fpu=0x1234567"


def generate_chunk(rng: random.Random, n: int, t0: float, seal: str = "") -> tuple[bytes, float]:
    """``n`` realistic trace_pipe lines as bytes, starting at trace time ``t0``; kprobe lines end with ``seal``."""
    out = []
    t = t0
    for _ in range(n):
        t += rng.random() * 2e-5
        r = rng.random()
        comm = rng.choice(SPACED) if r < 0.08 else rng.choice(COMMS)
        pid = rng.randrange(100, 40000)
        cpu = rng.randrange(0, 8)
        k = rng.random()
        if k < 0.45:
            body = (f"fp_ab12cd_0001_openat: (do_sys_openat2+0x0/0x1a0) dfd=0xffffff9c "
                    f'path="{rng.choice(PATHS)}" flags=0x{rng.choice((0, 0x80000, 0x241)):x}{seal}')
        elif k < 0.90:
            body = (f"fp_ab12cd_0001_openat_ret: (do_sys_open+0x5c/0x90 <- do_sys_openat2) "
                    f"ret={rng.choice((3, 4, 5, -2, -13))}{seal}")
        elif k < 0.95:
            body = f"sched_process_exec: filename=/usr/bin/{rng.choice(COMMS)} pid={pid} old_pid={pid}"
        else:
            body = (f"sched_process_fork: comm={comm} pid={pid} child_comm={comm} "
                    f"child_pid={pid + 1}")
        out.append(f"{comm:>16}-{pid:<7} [{cpu:03d}] ..... {t:12.6f}: {body}\n")
    return "".join(out).encode(), t


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print lines/s, MB/s and peak RSS per million lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=3_000_000)
    ap.add_argument("--parse-only", action="store_true", help="split lines and batch events, no aggregate")
    ap.add_argument("--no-pairs", action="store_true", help="aggregate without entry/return latency pairing")
    ap.add_argument("--events", metavar="FILE", help="also write raw events to FILE (JSON lines)")
    ap.add_argument("--print", metavar="FILE", dest="print_to",
                    help="also print event lines as --print does, to FILE")
    ap.add_argument("--sealed", action="store_true",
                    help="kprobe lines end with a seal and the stream is sealed (tracepoint lines guarded)")
    args = ap.parse_args(argv)
    rng = random.Random(1)
    # Pre-generate a pool of distinct chunks so generation is not measured.
    pool = []
    t = 100.0
    for _ in range(16):
        data, t = generate_chunk(rng, 20_000, t, SEAL if args.sealed else "")
        pool.append(data)
    pool_lines = sum(d.count(b"\n") for d in pool)
    pool_bytes = sum(len(d) for d in pool)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS with the {pool_bytes / 1e6:.0f} MB input pool generated: {base:.1f} MiB", flush=True)

    clock = ClockMap()
    agg = FleetAggregate({} if args.no_pairs else PAIRS)
    writer = EventWriter(args.events) if args.events else None
    printer = None
    if args.print_to:
        from fleetprobe.render.eventlines import EventPrinter, Tee

        printer = EventPrinter(open(args.print_to, "w", encoding="utf-8", buffering=1 << 20),
                               hosts=["bench-host"], probes=list(NAMES.values()))
        writer = Tee(writer, printer) if writer is not None else printer  # type: ignore[assignment]
    hooks: dict[str, object] = {}
    if writer is not None:
        # As hostrun.probe_host wires the writer (this script also measures older checkouts, where
        # the writer only takes TraceEvents).
        if hasattr(writer, "write_batch"):
            hooks["on_batch"] = lambda batch: writer.write_batch("bench-host", batch, NAMES)
        else:
            hooks["on_event"] = writer.write
    if args.sealed:
        hooks.update(trailer=SEAL, sealed=["fp_ab12cd_0001_openat", "fp_ab12cd_0001_openat_ret"])
    stream = TraceStream("bench-host", NAMES, aggregate=None if args.parse_only else agg, clock=clock,
                         **hooks)  # type: ignore[arg-type]
    stream.feed(b"     fleetprobe-1 [000] ...1.    99.000000: tracing_mark_write: fpsync 1764120000.123456789\n")
    done = 0
    nbytes = 0
    next_report = 1_000_000
    busy = 0.0
    while done < args.lines:
        for data in pool:
            start = time.process_time()
            for i in range(0, len(data), 65536):
                stream.feed(data[i:i + 65536])
            busy += time.process_time() - start
            done += pool_lines // len(pool)
            nbytes += len(data)
            if done >= next_report:
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"{done / 1e6:5.1f} M lines: {done / busy:,.0f} lines/s, "
                      f"{nbytes / busy / 1e6:.1f} MB/s, peak RSS {rss:.1f} MiB", flush=True)
                next_report += 1_000_000
            if done >= args.lines:
                break
    stream.close()
    if writer is not None:
        start = time.process_time()
        for w in getattr(writer, "sinks", (writer,)):
            w.close()
        busy += time.process_time() - start
    agg.finish()
    print(f"total {done:,} lines ({pool_bytes / pool_lines:.0f} B/line) in {busy:.2f} s CPU: "
          f"{done / busy:,.0f} lines/s, {nbytes / busy / 1e6:.1f} MB/s; "
          f"unparsed {stream.stats.unparsed}, unknown {sum(stream.stats.unknown.values())}")
    if args.events:
        print(f"raw events written to {args.events}")
    if printer is not None:
        print(f"event lines: {printer.count:,} printed to {args.print_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
