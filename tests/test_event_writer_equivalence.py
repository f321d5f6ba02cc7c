"""The raw-event file written from batches of rows equals, byte for byte, the file written one TraceEvent at a time.

The reference is the writer as it was before batches: the stream builds a
TraceEvent with parsed fields for every event (``on_event``) and each becomes
``json.dumps(ev.to_json(), separators=(",", ":"), ensure_ascii=False)`` and a
newline.  The writer under test gets the stream's rows (``on_batch``) and
builds the same lines from the strings the kernel printed, through its caches
(event texts, tokens, comms, cpus) and its shortcuts (timestamps without
repr, pids as printed).  Hypothesis makes what breaks those shortcuts: every
argument form split_args knows (sites, quotes, names twice, values with
spaces, empty tokens, leading zeros, hex, Unicode digits), timestamps below 1,
past 15 digits and past the float range, comms JSON must escape, clock
markers that change the time map mid-stream, and chunks cut anywhere.  Small
caches make the bounded dicts clear while a stream is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprobe import events
from fleetprobe.clock import ClockMap
from fleetprobe.ingest import _HostCap
from fleetprobe.parse import EventBatch, TraceStream
from fleetprobe.traceline import AMBIGUOUS, TraceEvent
from fleetprobe.events import EventWriter

NAMES = {"fp_x_open": "open", "fp_x_open_ret": "open_ret", "sched_process_exec": "exec", "tp": "tp"}

TOKEN = st.one_of(
    st.builds(lambda n, v: f"{n}={v}", st.sampled_from(["pid", "old_pid", "filename", "a", "é", "x.y", "q\\"]),
              st.sampled_from(["1", "0", "007", "00000000abcd1234", "0xff", "0XFFffffffffffff9c", "-13", "-0",
                               "12345678", "ffff888004a1b2c0", "deadbeef", "abcdefgh", "(fault)", "/bin/sh",
                               "١٢", "1.5", "", "a=b", "\\n", "tab\there", "0x", "-x"])),
    st.sampled_from(["", "word", "=x", "(x)", "=", "a"]),
)
QUOTED = st.builds(lambda v: f'path="{v}"', st.sampled_from(["/etc/passwd", "/tmp/a b", 'x"y', "é", "", 'a" b=c']))
ARGS = st.one_of(
    st.lists(TOKEN, max_size=5).map(" ".join),
    st.builds(lambda site, toks: f"({site}) {' '.join(toks)}",
              st.sampled_from(["do_sys_openat2+0x0/0x1a0", "x+0x5c/0x90 <- y", ""]), st.lists(TOKEN, max_size=4)),
    st.builds(lambda toks, q: " ".join([*toks, q]), st.lists(TOKEN, max_size=3), QUOTED),
    st.sampled_from(["(do_sys_open+0x5c/0x90 <- do_sys_openat2)", "(unclosed site", "(a) ", "  a=1  b=2 ",
                     "comm=my worker x pid=3", "a=1 a=2", "a=1 a=1"]),
)
COMM = st.one_of(st.sampled_from(["sshd", "my worker x", 'q"uote', "back\\slash", "é", "\x1cq", "t\tb", "",
                                  "kworker/u8:2"]),
                 st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=8))
TS = st.one_of(st.floats(1.0, 99999.0).map(lambda t: f"{t:.6f}"),
               st.sampled_from(["0.000012", "0.5", "1.000000", "100.000000", "007.250000", "123456789.123456",
                                "1234567890.123456", "12345678901234567.5", "9" * 400 + ".5", "١.٥", "3.1"]))
PID = st.sampled_from(["1", "0", "40000", "0012", "١٢"])
CPU = st.sampled_from(["000", "001", "12", "٠1"])


@st.composite
def stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A stream of events (and a few clock markers and foreign lines) and where the channel cut it."""
    lines = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["event"] * 10 + ["marker", "other"]))
        if kind == "marker":
            lines.append(f"   w-9 [000] ...1. {draw(st.floats(1.0, 99.0)):.6f}: tracing_mark_write: "
                         f"fpsync {1764120000 + draw(st.floats(0, 100)):.6f}")
        elif kind == "other":
            lines.append(draw(st.sampled_from(["@@fp hello", "CPU:1 [LOST 3 EVENTS]", "garbage", "",
                                               "   a-1 [000] ..... 1.0: theirs: x=1"])))
        else:
            name = draw(st.sampled_from(list(NAMES)))
            lines.append(f"{draw(COMM):>16}-{draw(PID)} [{draw(CPU)}] ..... {draw(TS)}: {name}: {draw(ARGS)}")
    data = "\n".join(lines).encode() + b"\n"
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return data, cuts


def _feed(s: TraceStream, data: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in cuts + [len(data)]:
        s.feed(data[pos:cut])
        pos = cut
    s.close()


def reference_file(path: Path, data: bytes, cuts: list[int]) -> None:
    """The writer before batches: one TraceEvent per event, json.dumps per line."""
    with open(path, "w", encoding="utf-8") as f:
        def write(ev: TraceEvent) -> None:
            f.write(json.dumps(ev.to_json(), separators=(",", ":"), ensure_ascii=False))
            f.write("\n")
        _feed(TraceStream("web-1", NAMES, clock=ClockMap(offset=1.5, error=0.01), on_event=write), data, cuts)


def batch_file(path: Path, data: bytes, cuts: list[int]) -> int:
    """The writer as ``fleetprobe run --events`` uses it: batches of rows."""
    with EventWriter(path) as w:
        _feed(TraceStream("web-1", NAMES, clock=ClockMap(offset=1.5, error=0.01),
                          on_batch=lambda b: w.write_batch("web-1", b, NAMES)), data, cuts)
    return w.count


@settings(max_examples=400, deadline=None)
@given(stream())
def test_batch_writer_equals_event_writer(tmp_path_factory: pytest.TempPathFactory,
                                          case: tuple[bytes, list[int]]) -> None:
    """Same bytes, whatever the stream and however it was cut, with caches that fill and clear."""
    data, cuts = case
    d = tmp_path_factory.mktemp("ev")
    reference_file(d / "want.jsonl", data, cuts)
    size = events.EVENT_TAIL_CACHE
    events.EVENT_TAIL_CACHE = 3
    try:
        n = batch_file(d / "got.jsonl", data, cuts)
    finally:
        events.EVENT_TAIL_CACHE = size
    want = (d / "want.jsonl").read_bytes()
    assert (d / "got.jsonl").read_bytes() == want
    assert n == want.count(b"\n")


def test_the_stream_exercises_every_shortcut(tmp_path: Path) -> None:
    """The property above is about real work: cached tokens, the timestamp shortcut and its fallbacks all occur."""
    lines = [f"{'a':>16}-7 [001] ..... {10 + i / 8:.6f}: sched_process_exec: filename=/bin/sh pid={i} old_pid={i}"
             for i in range(20)]
    lines += ["   w-9 [000] ...1. 11.000000: tracing_mark_write: fpsync 1764120000.500000",
              f"{'b':>16}-0012 [٠1] ..... 0.000012: fp_x_open: (do_sys_openat2+0x0/0x1a0) path=\"/tmp/a b\" a=1",
              f"{'c':>16}-3 [000] ..... {'9' * 12}.5: tp: a=1 a=2",
              f"{'d':>16}-3 [000] ..... 12.100000: tp: comm=my worker x pid=3"]
    data = "\n".join(lines).encode() + b"\n"
    reference_file(tmp_path / "want.jsonl", data, [])
    assert batch_file(tmp_path / "got.jsonl", data, [len(data) // 2]) == 23
    want = (tmp_path / "want.jsonl").read_bytes()
    assert (tmp_path / "got.jsonl").read_bytes() == want
    rows = [json.loads(x) for x in want.splitlines()]
    assert rows[0]["time"] == rows[0]["trace_ts"] == 10.0 and rows[0]["fields"] == {
        "filename": "/bin/sh", "pid": 0, "old_pid": 0}
    assert rows[20]["time"] != rows[20]["trace_ts"] and rows[20]["pid"] == 12 and rows[20]["cpu"] == 1
    # 12 digits: past the shortcut's 9, the longest a header may have (issue 11 #7: 400 digits are no header).
    # A name printed twice in one unsealed event is ambiguous (one came from a user's string).
    assert rows[21]["trace_ts"] == 999999999999.5 and rows[21]["fields"] == {"a": AMBIGUOUS}
    assert rows[22]["fields"] == {"comm": "my worker x", "pid": 3}


def test_writer_share_of_the_cap_is_the_same_by_batch() -> None:
    """take_for_writer(n) lets through exactly what n calls of keep_for_writer would, and counts alike."""
    for cap in (0, 1, 5, 7):
        one, many = _HostCap(None, cap), _HostCap(None, cap)  # type: ignore[arg-type]
        for n in (3, 0, 2, 4, 1):
            assert many.take_for_writer(n) == sum(one.keep_for_writer() for _ in range(n))
        assert one.written == many.written == min(cap, 10)


def test_closed_writer_refuses_batches(tmp_path: Path) -> None:
    """Writing after close is an error, not a silent loss."""
    w = EventWriter(tmp_path / "e.jsonl")
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write_batch("h", EventBatch([("c", "1", "0", "1.0", "tp: a=1")], ["tp"], {"tp": 1}), NAMES)
