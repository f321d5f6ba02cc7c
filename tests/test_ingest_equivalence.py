"""The fast ingest path (whole-chunk findall, batches, column-wise counting) equals a line-by-line reference.

The reference below is the plain reading of the stream's contract: split the
bytes at "\\n", match each line with the one-line regex, and hand every event
to ``FleetAggregate.add_line`` one by one, markers to a clock map, the rest to
their counters.  Hypothesis builds streams with what breaks parsers (comms with
dashes, brackets, colons, spaces and multi-byte UTF-8, tgid columns, missing
flags, kretprobe pairs, clock markers, lost-events lines, control lines, blank
and truncated lines, CR, invalid bytes) and cuts them anywhere, including in
the middle of a line and of a UTF-8 sequence.

Value tables are compared below their caps: past a cap both are Misra-Gries
summaries, but a batch counts a chunk's values before pruning and add_line
one by one, so the approximations may differ by design (both within the
stated error).  The pending-entry cap is compared exactly (both evict the
oldest entry, row by row).
"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprobe.clock import ClockMap
from fleetprobe.merge import FleetAggregate
from fleetprobe.parse import MAX_UNKNOWN_NAMES, MAX_UNPARSED_EXAMPLES, TraceStream
from fleetprobe.traceline import (ASCII_LINES_RE, CONTROL_PREFIX, LINE_RE, LINES_RE, LOSS_RE, MARKER_EVENT, Loss, Marker,
                                  TraceEvent, parse_fields, parse_marker, split_event)

NAMES = {"fp_x_open": "open", "fp_x_open_ret": "open_ret", "sched_process_fork": "fork", "odd:name": "odd"}
PAIRS = {"open_ret": "open"}
# The line regex as first written, without the engine-oriented rewrites (possessive runs, (?:X|)).
PLAIN_LINE_RE = re.compile(
    r" *(.*?)-(\d{1,10}) +(?:\( *(?:\d{1,10}|-+)\) +)?\[(\d{1,6})\] +(?:\S{1,8} +)?(\d{1,12}\.\d{1,9}): ([^: \n].*)")

COMM = st.one_of(
    st.sampled_from(["sshd", "kworker/u8:2", "my worker x", "a-b", "x-1 [000] y", "k[1]", "c:d", "-", "a- 5",
                     "été", "中文", "\x1cq", "t\tb", "١٢٣", ""]),
    st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=15))
ARGS = {
    "fp_x_open": st.builds(lambda n, p: f'(do_sys_openat2+0x0/0x1a0) dfd={n} path="{p}" flags=0x0',
                           st.integers(-100, 3), st.sampled_from(["/etc/passwd", "/tmp/a b", 'x"y', "é"])),
    "fp_x_open_ret": st.builds(lambda r: f"(do_sys_open+0x5c/0x90 <- do_sys_openat2) ret={r}",
                               st.sampled_from(["3", "-2", "0xffffffffffffff9c"])),
    "sched_process_fork": st.builds(lambda c, p: f"comm={c} pid={p} child_comm={c} child_pid={p + 1}",
                                    st.sampled_from(["sh", "my worker x"]), st.integers(1, 9)),
    "odd:name": st.just("a=1"),
    "theirs": st.just("x=1"),
    "tracing_mark_write": st.sampled_from(["fpsync {rt:.6f}", "fpsync {rt:.0f}", "fpsync {rt:.3f} 0.002",
                                           "fpsyncx 1", "hello"]),
}


@st.composite
def trace_line(draw: st.DrawFn, t: float) -> str:
    """One line of a stream at trace time ``t``: mostly events, sometimes anything else."""
    kind = draw(st.sampled_from(["event"] * 8 + ["control", "loss", "blank", "garbage", "cut", "cr"]))
    if kind == "control":
        return CONTROL_PREFIX + draw(st.sampled_from(["hello", "started enabled=2", "stats x", ""]))
    if kind == "loss":
        return f"CPU:{draw(st.integers(0, 7))} [LOST {draw(st.integers(0, 999))} EVENTS]"
    if kind == "blank":
        return draw(st.sampled_from(["", "   ", "\t", "\r", "\x0b"]))
    if kind == "garbage":
        return draw(st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=60))
    name = draw(st.sampled_from(list(ARGS)))
    args = draw(ARGS[name]).format(rt=1764120000 + t)
    pid = draw(st.sampled_from([1, 2, 3, 40000]))
    tgid = draw(st.sampled_from(["", "", f"( {pid}) ", "(-------) "]))
    flags = draw(st.sampled_from(["..... ", "d..1. ", "", "\x1c.. ", "123456789 "]))
    sep = draw(st.sampled_from([": "] * 6 + [":", " ", ""]))
    line = f"{draw(COMM):>16}-{pid:<7} {tgid}[{draw(st.integers(0, 3)):03d}] {flags}{t:.6f}: {name}{sep}{args}"
    if kind == "cut":
        return line[:draw(st.integers(0, len(line)))]
    return line + "\r" if kind == "cr" else line


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A stream's bytes (increasing timestamps, a few invalid bytes) and where the channel cut it."""
    n = draw(st.integers(0, 60))
    steps = draw(st.lists(st.floats(1e-6, 1e-3), min_size=n, max_size=n))
    t, lines = 10.0, []
    for dt in steps:
        t += dt
        lines.append(draw(trace_line(t)))
    data = bytearray("\n".join(lines).encode() + draw(st.sampled_from([b"", b"\n", b"\n\n"])))
    for pos, junk in draw(st.lists(st.tuples(st.integers(0, len(data)), st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82"])),
                                   max_size=3)):
        data[pos:pos] = junk
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return bytes(data), cuts


def fast(data: bytes, cuts: list[int], pending_cap: int) -> dict[str, Any]:
    """The stream and aggregate as the controller runs them, fed the chunks as cut."""
    agg = FleetAggregate(PAIRS, top_k=100, pending_cap=pending_cap)
    out: dict[str, Any] = {"events": [], "control": [], "loss": [], "markers": []}
    stream = TraceStream("h", NAMES, aggregate=agg, clock=ClockMap(offset=1.5, error=0.01),
                         on_event=lambda ev: out["events"].append(_event(ev)), on_control=out["control"].append,
                         on_loss=out["loss"].append, on_marker=out["markers"].append)
    pos = 0
    for cut in cuts + [len(data)]:
        stream.feed(data[pos:cut])
        pos = cut
    stream.close()
    out["stats"] = stream.stats.to_json()
    out["aggregate"] = json.dumps(agg.to_json(), sort_keys=True)
    return out


def reference(data: bytes, pending_cap: int) -> dict[str, Any]:
    """Line by line: the one-line regex, add_line per event, markers into a clock map."""
    agg = FleetAggregate(PAIRS, top_k=100, pending_cap=pending_cap)
    clock = ClockMap(offset=1.5, error=0.01)
    out: dict[str, Any] = {"events": [], "control": [], "loss": [], "markers": []}
    stats: dict[str, Any] = {"bytes": len(data), "lines": 0, "events": 0, "markers": 0, "control": 0,
                             "loss_lines": 0, "lost_events": 0, "unparsed": 0, "unsynced": 0, "unknown": {},
                             "unparsed_examples": [], "unknown_lines": 0, "unknown_examples": [],
                             "own_events": 0, "overlong": 0, "multiline": 0}
    lines = data.decode("utf-8", "replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()    # the end of the last line, not a line
    for line in _continued(lines, stats):
        if not line:
            continue
        m = LINE_RE.match(line)
        if m is None:
            if line.startswith(CONTROL_PREFIX):
                stats["lines"] += 1
                stats["control"] += 1
                out["control"].append(line[len(CONTROL_PREFIX):])
            elif line.strip():
                stats["lines"] += 1
                loss = LOSS_RE.match(line)
                if loss is not None:
                    stats["loss_lines"] += 1
                    stats["lost_events"] += int(loss[2])
                    out["loss"].append(Loss(int(loss[1]), int(loss[2])))
                else:
                    stats["unparsed"] += 1
                    if len(stats["unparsed_examples"]) < MAX_UNPARSED_EXAMPLES:
                        stats["unparsed_examples"].append(line[:200])
            continue
        stats["lines"] += 1
        comm, pid, cpu, ts_s, text = m.groups()
        name, args = split_event(text)
        ts = float(ts_s)
        marker = parse_marker(ts, args) if name == MARKER_EVENT and args.startswith("fpsync") else None
        if name in NAMES:
            stats["events"] += 1
            stats["unsynced"] += not clock.synced
            slope, intercept = clock.linear() if clock.synced else (1.0, 0.0)
            agg.add_line("h", NAMES[name], ts, ts * slope + intercept, int(cpu), int(pid), comm, args)
            site, values = parse_fields(args)
            out["events"].append(_event(TraceEvent("h", NAMES[name], ts * slope + intercept, ts, int(cpu),
                                                   int(pid), comm, values, site, args)))
        elif marker is not None:
            stats["markers"] += 1
            clock.add_marker(marker)
            out["markers"].append(marker)
        else:
            if name in stats["unknown"] or len(stats["unknown"]) < MAX_UNKNOWN_NAMES:
                stats["unknown"][name] = stats["unknown"].get(name, 0) + 1
            stats["unknown_lines"] += 1
            if len(stats["unknown_examples"]) < MAX_UNPARSED_EXAMPLES:
                stats["unknown_examples"].append(f"{comm}-{pid} [{cpu}] {ts_s}: {text}"[:200])
    out["stats"] = stats
    out["aggregate"] = json.dumps(agg.to_json(), sort_keys=True)
    return out


def _continued(lines: list[str], stats: dict[str, Any]) -> list[str]:
    """Lines as the stream must see them: a line that is not a trace header, a control line or a
    loss line goes on with the event line before it (joined by an escaped newline), if any."""
    out: list[str] = []
    event = False
    for line in lines:
        if m := LINE_RE.match(line):
            out.append(line)
            # A marker (the runner's own trace_marker write) holds no user's text: nothing continues it.
            event, joined = not m[5].startswith(MARKER_EVENT), False
        elif line.startswith(CONTROL_PREFIX) or LOSS_RE.match(line):
            out.append(line)
            event = False
        elif event:
            out[-1] += "\\n" + line
            if not joined:
                stats["multiline"] += 1
                joined = True
        else:
            out.append(line)
    return out


def _event(ev: TraceEvent) -> dict[str, object]:
    """What a raw-event writer sees of an event."""
    return {**ev.to_json(), "args": ev.args}


@settings(max_examples=300, deadline=None)
@given(streams(), st.sampled_from([65536, 2]))
def test_fast_path_equals_line_by_line(stream: tuple[bytes, list[int]], pending_cap: int) -> None:
    """Same events, fields, markers, loss, control lines, stats and aggregate JSON, however the bytes are cut."""
    data, cuts = stream
    got, want = fast(data, cuts, pending_cap), reference(data, pending_cap)
    for key in want:
        assert got[key] == want[key], key


def test_reference_sees_what_the_generator_makes() -> None:
    """The property above is about real work: pairs complete, markers sync, every kind of line occurs."""
    t, lines = 10.0, []
    for i in range(40):
        t += 1e-4
        pid = 1 + i % 3
        lines.append(f"{'a-b':>16}-{pid:<7} [000] ..... {t:.6f}: fp_x_open: (do_sys_openat2+0x0/0x1a0) dfd=1")
        lines.append(f"{'中文':>16}-{pid:<7} [001] ..... {t + 5e-5:.6f}: fp_x_open_ret: (x+0x1/0x2 <- y) ret=3")
        if i == 10:
            lines += [f"   w-9 [000] ...1. {t:.6f}: tracing_mark_write: fpsync {1764120000 + t:.6f}",
                      "CPU:1 [LOST 3 EVENTS]", "@@fp hello", "garbage", ""]
    data = "\n".join(lines).encode()
    got, want = fast(data, [len(data) // 3, len(data) // 3 + 1], 65536), reference(data, 65536)
    assert got == want
    agg = json.loads(want["aggregate"])
    assert agg["hosts"]["h"]["latency"]["open_ret"]["buckets"] == {"16": 40}     # 50 us each
    assert want["stats"]["markers"] == 1 and want["stats"]["unsynced"] == 22 and want["stats"]["unparsed"] == 1
    assert [m.realtime for m in want["markers"] if isinstance(m, Marker)] and want["loss"] == [Loss(1, 3)]


ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=50)
LINE_LIKE = st.builds(lambda c, p, cpu, f, ts, rest: f"{c:>16}-{p} [{cpu}] {f}{ts}: {rest}",
                      COMM, st.sampled_from(["1", "١", "12 (  3)", "0"]), st.sampled_from(["000", "٠1"]),
                      st.sampled_from(["..... ", "\x1c.. ", "\u2003. ", "", "x "]),
                      st.sampled_from(["1.5", "١.٥", "2.0"]), ANY_TEXT)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(ANY_TEXT, LINE_LIKE), max_size=8))
def test_line_regexes_agree(lines: list[str]) -> None:
    """The chunk regexes (Unicode and ASCII twin) and the one-line regex parse every line alike, as first written."""
    for line in lines:
        plain, fast_line = PLAIN_LINE_RE.match(line), LINE_RE.match(line)
        assert (plain and plain.groups()) == (fast_line and fast_line.groups())
    text = "\n".join(lines)
    rows = LINES_RE.findall(text)
    assert len(rows) == text.count("\n") + 1
    for line, row in zip(text.split("\n"), rows):
        m = LINE_RE.match(line)
        if m is None:
            assert row == ("", "", "", "", line)
        else:
            assert row == (*m.groups()[:4], line[m.start(5):])
    ascii_text = text.encode("ascii", "replace").decode()
    assert ASCII_LINES_RE.findall(ascii_text) == LINES_RE.findall(ascii_text)
