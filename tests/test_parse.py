"""parse: real trace_pipe lines from several kernels and arches, and the chunked TraceStream."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprobe.clock import ClockMap
from fleetprobe.merge import FleetAggregate
from fleetprobe.parse import TraceStream
from fleetprobe.traceline import Control, Loss, Marker, TraceEvent, parse_line, parse_marker, parse_value, split_args

DATA = Path(__file__).parent / "data" / "trace"
SAMPLES = sorted(DATA.glob("*.txt"))
THIS = DATA / "x86_64-6.18-this-machine.txt"
TGID = DATA / "x86_64-6.18-irqinfo-off-tgid.txt"


def _find(path: Path, needle: str) -> str:
    """The first line of a sample file containing ``needle``."""
    for line in path.read_text().splitlines():
        if needle in line:
            return line
    raise AssertionError(f"{path.name}: no line contains {needle!r}")


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_every_real_line_parses(path: Path) -> None:
    """No line of any captured sample is garbage to the parser."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        got = parse_line(line, host="h")
        assert got is not None, f"{path.name}: unparsed: {line!r}"
        if isinstance(got, TraceEvent):
            assert got.comm and got.pid > 0 and got.trace_ts > 0
            assert got.probe and ":" not in got.probe


def test_tracepoint_fork_with_spaced_comm_this_machine() -> None:
    """A comm with spaces, right-aligned, in the comm column and inside comm=... (6.18, real)."""
    ev = parse_line(_find(THIS, "comm=my worker x"), host="db-1",
                    names={"sched_process_fork": "fork"})
    assert isinstance(ev, TraceEvent)
    assert (ev.host, ev.probe, ev.comm, ev.cpu) == ("db-1", "fork", "my worker x", 1)
    assert ev.fields["comm"] == "my worker x" and ev.fields["child_comm"] == "my worker x"
    assert ev.fields["pid"] == ev.pid and ev.fields["child_pid"] == ev.pid + 1


def test_exec_tracepoint_this_machine() -> None:
    """sched_process_exec: filename is a string, pid/old_pid ints."""
    ev = parse_line(_find(THIS, "filename=/bin/ls"), names={"sched_process_exec": "exec"})
    assert isinstance(ev, TraceEvent)
    assert ev.probe == "exec" and ev.comm == "ls"
    assert ev.fields == {"filename": "/bin/ls", "pid": ev.pid, "old_pid": ev.pid}


def test_uprobe_with_unescaped_quotes_this_machine() -> None:
    """The kernel does not escape quotes in strings: prompt="fp "q" $ " is one value (6.18, real)."""
    ev = parse_line(_find(THIS, " rl: "))
    assert isinstance(ev, TraceEvent)
    assert ev.site.startswith("0x") and " <- " not in ev.site
    assert ev.fields == {"prompt": 'fp "q" $ '}
    # The 6.18 flags column here is "DBZff" (5 chars, letters).
    assert ev.cpu == 1


def test_uretprobe_this_machine() -> None:
    """Return form (0xcaller <- 0xfunc) with an x64 ret converted to int."""
    ev = parse_line(_find(THIS, "rlr: "))
    assert isinstance(ev, TraceEvent)
    caller, arrow, func = ev.site.partition(" <- ")
    assert arrow and caller.startswith("0x") and func.startswith("0x")
    assert isinstance(ev.fields["ret"], int)


def test_tgid_column_and_no_irq_info_this_machine() -> None:
    """record-tgid adds "(  8585)" or "(-------)"; irq-info off removes the flags column (real)."""
    lines = [ln for ln in TGID.read_text().splitlines() if "(-------)" in ln or "(   " in ln]
    assert any("(-------)" in ln for ln in lines)
    for line in lines:
        got = parse_line(line)
        assert isinstance(got, TraceEvent | Marker), line
    ev = parse_line(_find(TGID, "comm=a b pid="))
    assert isinstance(ev, TraceEvent) and ev.comm == "a b" and ev.fields["comm"] == "a b"


def test_markers_this_machine() -> None:
    """fpsync with nanoseconds, and busybox-style whole seconds (1 s bound, centred)."""
    fine = parse_line(_find(THIS, "fpsync"))
    assert isinstance(fine, Marker)
    assert fine.uncertainty == pytest.approx(1e-3) and fine.realtime > 1.7e9
    whole = [parse_line(ln) for ln in TGID.read_text().splitlines() if "fpsync" in ln]
    coarse = [m for m in whole if isinstance(m, Marker) and m.uncertainty == 1.0]
    assert coarse and coarse[0].realtime % 1 == 0.5
    # An ordinary trace_marker write is an event, not a marker.
    hello = parse_line(_find(THIS, "hello with spaces"))
    assert isinstance(hello, TraceEvent) and hello.probe == "tracing_mark_write"


def test_lab_lines_ppc64le_and_mips() -> None:
    """Real 6.1 lines from the ppc64el / mips guests (LAB.md)."""
    lines = (DATA / "lab-6.1-ppc64le-mips.txt").read_text().splitlines()
    ppc = parse_line(lines[0])
    assert isinstance(ppc, TraceEvent)
    assert ppc.site == "do_sys_openat2+0xc/0x230"
    assert ppc.fields == {"dfd": -100, "path": "/etc/hostname", "flags": 0x10000}
    ret = parse_line(lines[1])
    assert isinstance(ret, TraceEvent) and ret.site == "sys_openat+0x88/0xe0 <- do_sys_openat2"
    assert ret.fields == {"ret": 3}
    mips = parse_line(lines[2])
    # A bare register printed as x64 stays the printed unsigned value.
    assert isinstance(mips, TraceEvent) and mips.fields["dfd"] == 0xffffffffffffff9c
    mipsel = parse_line(lines[3])
    assert isinstance(mipsel, TraceEvent) and mipsel.comm == "dropbear" and mipsel.pid == 123


def test_other_kernel_formats() -> None:
    """4-flag format, (tgid), comms with spaces and dashes, (fault), %lx pointers, uprobes, LOST lines."""
    got = [parse_line(ln) for ln in (DATA / "formats-other-kernels.txt").read_text().splitlines()]
    old, tgid, fault, kmem, noflags, loss, unknown, up, urp = got
    assert isinstance(old, TraceEvent) and old.fields["filename"] == "/etc/ld.so.cache"
    assert isinstance(tgid, TraceEvent) and tgid.pid == 1977 and tgid.fields == {"ret": -2}
    assert isinstance(fault, TraceEvent) and fault.comm == "kworker/u8:2 x" and fault.pid == 12
    assert fault.fields["path"] == "(fault)" and fault.site == "do_sys_openat2+0x4/0x1a0"
    assert isinstance(kmem, TraceEvent) and kmem.comm == "kworker/0:1-events" and kmem.pid == 30
    assert kmem.fields["ptr"] == 0xffff888004a1b2c0 and kmem.fields["gfp_flags"] == "GFP_KERNEL"
    assert isinstance(noflags, TraceEvent) and noflags.trace_ts == 99.123456 and noflags.cpu == 2
    assert loss == Loss(1, 123)
    assert isinstance(unknown, TraceEvent) and unknown.comm == "<...>"
    assert isinstance(up, TraceEvent) and up.site == "0x446420" and up.fields["arg1"] == 1
    assert isinstance(urp, TraceEvent) and urp.site == "0x446421 <- 0x446420" and urp.fields == {"arg1": -1}


@pytest.mark.parametrize("text,want", [
    ("0x10", 16), ("-100", -100), ("42", 42), ("0xffffffffffffff9c", 0xffffffffffffff9c),
    ('"a b"', "a b"), ('""', ""), ("(fault)", "(fault)"), ("ffff888004a1b2c0", 0xffff888004a1b2c0),
    ("00000000abcd1234", 0xabcd1234), ("0000000012345678", 0x12345678), ("bash", "bash"),
    ("deadbeefcafe", "deadbeefcafe"), ("ffffffff8a1b", 0xffffffff8a1b), ("GFP_KERNEL", "GFP_KERNEL"), ("0xzz", "0xzz"), ("-", "-"),
])
def test_parse_value(text: str, want: int | str) -> None:
    """Numbers become ints (decimal, 0x hex, %lx pointers with a digit); strings are unquoted."""
    assert parse_value(text) == want


def test_split_args_quoted_and_spaced() -> None:
    """Quoted values with spaces and '=' inside; unquoted values continued by bare tokens."""
    site, raw = split_args('(do_sys_openat2+0x0/0x1a0) dfd=-100 path="/tmp/a b=c" flags=0x0')
    assert site == "do_sys_openat2+0x0/0x1a0"
    assert raw == {"dfd": "-100", "path": '"/tmp/a b=c"', "flags": "0x0"}
    assert split_args("filename=/tmp/x y pid=3 old_pid=3")[1] == {"filename": "/tmp/x y", "pid": "3",
                                                                  "old_pid": "3"}
    assert split_args("(0x446420)") == ("0x446420", {})


@pytest.mark.parametrize("line", [
    "", "   ", "garbage", "# tracer: nop", "sh-70 [000] ..... notatime: x: y",
    "\x00\xff-1 [0] 1.0", "sh-x [000] ..... 1.0: e: a=1", "CPU:x [LOST y EVENTS]",
])
def test_garbage_is_none_never_raises(line: str) -> None:
    """Tolerant: nothing the kernel or a broken link sends raises."""
    assert parse_line(line) is None


@given(st.text(max_size=200))
def test_parse_line_never_raises(text: str) -> None:
    """Any text at all: a result or None, never an exception."""
    parse_line(text)


def test_control_lines() -> None:
    """@@fp lines are the runner's, passed through without the prefix."""
    assert parse_line("@@fp ready") == Control("ready")
    seen: list[str] = []
    s = TraceStream("h", {}, on_control=seen.append)
    s.feed(b"@@fp ready\n@@fp stats cpu0 overrun 3\n")
    assert seen == ["ready", "stats cpu0 overrun 3"] and s.stats.control == 2


def test_marker_forms() -> None:
    """fpsync variants: fraction, whole, stated bound, busybox literal %N, and non-markers."""
    assert parse_marker(1.0, "fpsync 1764120000.25") == Marker(1.0, 1764120000.25, 1e-3)
    assert parse_marker(1.0, "fpsync 1764120000") == Marker(1.0, 1764120000.5, 1.0)
    assert parse_marker(1.0, "fpsync 1764120000.%N") == Marker(1.0, 1764120000.5, 1.0)
    assert parse_marker(1.0, "fpsync 1764120000.5 0.02") == Marker(1.0, 1764120000.5, 0.02)
    assert parse_marker(1.0, "fpsync x") is None
    assert parse_marker(1.0, "fpsync 1 -3") is None
    assert parse_marker(1.0, "hello") is None


NAMES = {"sched_process_exec": "exec", "sched_process_fork": "fork", "rl": "readline", "rlr": "readline_ret"}


def _events_of(data: bytes, chunks: list[int]) -> tuple[list[TraceEvent], TraceStream]:
    """Feed ``data`` split at ``chunks`` offsets; return the events and the stream."""
    out: list[TraceEvent] = []
    s = TraceStream("h", NAMES, on_event=out.append)
    pos = 0
    for cut in sorted(chunks):
        s.feed(data[pos:cut])
        pos = cut
    s.feed(data[pos:])
    s.close()
    return out, s


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=THIS.stat().st_size), max_size=30))
def test_stream_chunking_does_not_matter(cuts: list[int]) -> None:
    """Any split of the byte stream into chunks gives the same events as parsing line by line."""
    data = THIS.read_bytes()
    events, stream = _events_of(data, cuts)
    want = [parse_line(ln, "h", NAMES) for ln in data.decode().splitlines()]
    want_events = [e for e in want if isinstance(e, TraceEvent) and e.probe in NAMES.values()]
    assert [(e.probe, e.trace_ts, e.pid, e.comm, e.fields, e.site) for e in events] == \
        [(e.probe, e.trace_ts, e.pid, e.comm, e.fields, e.site) for e in want_events]
    assert stream.stats.markers == sum(isinstance(e, Marker) for e in want)
    assert stream.stats.unknown == {"tracing_mark_write": 1}
    assert stream.stats.unparsed == 0
    # How far the stream has got in trace time: the newest event or marker, however it was cut.
    assert stream.last_trace_ts == max(e.trace_ts for e in want if isinstance(e, (TraceEvent, Marker)))


def test_stream_tolerates_bad_bytes_blank_lines_and_no_final_newline() -> None:
    """Non-UTF-8 bytes, b'', blank lines, CRLF-free tail without newline."""
    got: list[TraceEvent] = []
    s = TraceStream("h", {"e": "probe"}, on_event=got.append)
    s.feed(b"")
    s.feed(b"\n\n   \n")
    s.feed(b"not a line at all\n")     # after no event: garbage (after one, it would continue it)
    s.feed(b"   w\xff\xfeird-12 [001] ..... 5.000001: e: path=\"\xc3\" n=1\n")
    s.feed(b"   last-13 [000] ..... 5.000002: e: n=2")
    # The last whole event waits for what follows: a next line that is no header would continue it.
    assert len(got) == 0
    s.close()
    assert [e.fields["n"] for e in got] == [1, 2]
    assert "\ufffd" in got[0].comm
    assert s.stats.events == 2 and s.stats.unparsed == 1
    assert s.stats.unparsed_examples == ["not a line at all"]


def test_stream_loss_lines_and_unknown_events() -> None:
    """LOST lines are summed; other users' events are counted by name, not parsed."""
    losses: list[Loss] = []
    s = TraceStream("h", {"mine": "mine"}, on_loss=losses.append)
    s.feed(b"CPU:1 [LOST 123 EVENTS]\nCPU:0 [LOST 7 EVENTS]\n"
           b"  x-1 [000] ..... 1.0: theirs: a=1\n  x-1 [000] ..... 1.1: theirs: a=2\n")
    s.close()
    assert losses == [Loss(1, 123), Loss(0, 7)]
    assert s.stats.lost_events == 130 and s.stats.loss_lines == 2
    assert s.stats.unknown == {"theirs": 2} and s.stats.events == 0


def test_stream_times_follow_the_clock_markers() -> None:
    """Events before the first marker are unsynced; after it, on the controller's axis."""
    got: list[TraceEvent] = []
    clock = ClockMap(offset=2.0, error=0.01)
    s = TraceStream("h", {"e": "p"}, on_event=got.append, clock=clock)
    s.feed(b"  a-1 [000] ..... 10.000000: e: n=1\n"
           b"  a-1 [000] ...1. 10.500000: tracing_mark_write: fpsync 1764120000.500000\n"
           b"  a-1 [000] ..... 11.000000: e: n=2\n")
    s.close()
    assert s.stats.unsynced == 1 and s.stats.markers == 1
    assert got[0].time == 10.0
    # 11.0 is 0.5 s after the marker; host realtime 1764120001.0, minus the 2 s offset.
    assert got[1].time == pytest.approx(1764120001.0 - 2.0, abs=1e-6)


def test_stream_fast_path_counts_like_the_event_path() -> None:
    """aggregate= (no event objects) and on_event= + add_event give the same aggregate."""
    data = THIS.read_bytes() + TGID.read_bytes()
    fast = FleetAggregate({"readline_ret": "readline"})
    TraceStream("h", NAMES, aggregate=fast).feed(data)
    slow = FleetAggregate({"readline_ret": "readline"})
    TraceStream("h", NAMES, on_event=slow.add_event).feed(data)
    assert fast == slow
    fast.finish()
    assert fast.hosts["h"].hits["fork"] > 10
    assert fast.latency("readline_ret").count == 6
    assert ("my worker x", 4, 1) in fast.top("fork", "comm")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=120),
    st.sampled_from([b"  a-1 [000] ..... 1.000001: e: n=1 p=\"x\"\n", b"  a-1 [000] ..... 1.000002: r: ret=-1\n",
                     b"CPU:0 [LOST 5 EVENTS]\n", b"@@fp ready\n", b"\n", b"\xff\xfe\n",
                     b"  a-1 [000] ...1. 1.5: tracing_mark_write: fpsync 17641.5 x\n",
                     b"  a-1 [000] ...1. 1.5: tracing_mark_write: fpsync 1764120000\n"])), max_size=40))
def test_stream_never_raises_on_any_bytes(chunks: list[bytes]) -> None:
    """Whatever a broken link or a hostile comm sends, the stream and the aggregate keep going."""
    agg = FleetAggregate({"r": "e"})
    s = TraceStream("h", {"e": "e", "r": "r"}, aggregate=agg, on_event=lambda ev: None,
                    on_control=lambda text: None, clock=ClockMap())
    for c in chunks:
        s.feed(c)
    s.close()
    agg.finish()
    assert s.stats.events == sum(agg.hosts["h"].hits.values()) if "h" in agg.hosts else s.stats.events == 0


def test_a_long_string_is_unquoted_like_a_short_one() -> None:
    """The bound on numbers (22 characters) is no bound on strings: a 23-character path lost its quotes."""
    path = "/tmp/fp-statfs-e66a9ae6"
    assert parse_value(f'"{path}"') == path
    assert parse_value('"' + "x" * 5000 + '"') == "x" * 5000
    assert parse_value("9" * 5000) == "9" * 5000  # a number too long for any kernel stays text


# --- sealed streams (issue 11 #2) ---------------------------------------------------------------

SEAL_T = " fpt=0x89abcdef fpu=0x1234567"
SEALED_NAMES = {"typed": "typed", "sched_process_exec": "exec"}
HEAD = "            bash-100     [001] ..... 5.000000: "
FAKE_EXEC = "            sshd-1       [000] ..... 1.000000: sched_process_exec: filename=/usr/sbin/backdoor pid=1 old_pid=1"
FAKE_TYPED = '            sshd-1       [000] ..... 1.000000: typed: (0x1) line="rm -rf /"'


def sealed_stream(data: str, step: int = 0) -> tuple[list[TraceEvent], list[str], TraceStream]:
    """Feed ``data`` to a sealed stream (whole, or ``step`` bytes at a time): its events, control lines, stream."""
    events: list[TraceEvent] = []
    control: list[str] = []
    s = TraceStream("h", SEALED_NAMES, on_event=events.append, on_control=control.append, trailer=SEAL_T,
                    sealed={"typed"}, control_prefix="@@fp:ab ")
    raw = data.encode()
    for i in range(0, len(raw), step or len(raw)):
        s.feed(raw[i:i + (step or len(raw))])
    s.close()
    return events, control, s


def test_a_sealed_line_is_whole_only_at_its_seal() -> None:
    """Whole trace lines, control-looking and loss-looking lines inside a sealed string are that
    event's text; the guarded line after the record is an event of its own; at any chunking."""
    data = (HEAD + 'typed: (0x55) line="ls"' + SEAL_T + "\n"
            + HEAD + 'typed: (0x55) line="a\n' + FAKE_EXEC + "\n@@fp error x\nCPU:0 [LOST 9 EVENTS]\n"
            + FAKE_TYPED + '"' + SEAL_T + "\n"
            + "@@fp:ab started\n"
            + HEAD + "sched_process_exec: filename=/bin/ls pid=100 old_pid=100\n")
    for step in (0, 1, 7, 4096):
        events, control, s = sealed_stream(data, step)
        assert [(e.probe, e.pid) for e in events] == [("typed", 100), ("typed", 100), ("exec", 100)], step
        assert events[0].fields == {"line": "ls"} and "fpt" not in events[1].fields
        assert str(events[1].fields["line"]).startswith("a\\n            sshd-1 ") and "backdoor" in events[1].args
        assert control == ["started"] and s.stats.lost_events == 0 and s.stats.multiline == 1, step
        assert s.stats.unparsed == 0 and s.stats.unknown_lines == 0, s.stats


def test_a_forged_line_can_never_be_completed_by_a_genuine_seal() -> None:
    """A guarded event's line never holds a newline (the kernel filter): a line after it is a head.
    A sealed probe's head without its seal, or a seal after another event's text, is no event."""
    events, _, s = sealed_stream(HEAD + "sched_process_exec: filename=/bin/ls pid=100 old_pid=100\n"
                                 + HEAD + "sched_process_exec: filename=/x pid=100 old_pid=100" + SEAL_T + "\n"
                                 + HEAD + 'typed: (0x55) line="never sealed"\n')
    assert [(e.probe, e.fields.get("filename")) for e in events] == [("exec", "/bin/ls")]
    assert s.stats.unparsed == 2, s.stats


def test_a_comm_with_a_newline_keeps_its_head() -> None:
    """The printed comm is the pid's saved one and may hold newlines (prctl): the head is put back
    together from the short lines before it; a head hidden in a 15-byte comm names no probe."""
    data = (" x\n@@fp error fo-17965   [000] ..... 6.000000: sched_process_exec: filename=/bin/true pid=17965 "
            "old_pid=17965\n"
            "  x\nABCDEFGHIJKLM-77 [000] ..... 6.000000: typed: (0x55) line=\"q\"" + SEAL_T + "\n"
            "  \n\n\n-1 [0] 1.0: a-5 [000] ..... 7.000000: sched_process_exec: filename=/x pid=5 old_pid=5\n")
    for step in (0, 3):
        events, control, s = sealed_stream(data, step)
        assert [(e.probe, e.pid, e.comm) for e in events] == [("exec", 17965, "x\\n@@fp error fo"),
                                                              ("typed", 77, "x\\nABCDEFGHIJKLM")], step
        assert control == [] and s.stats.unknown_lines == 1 and s.stats.unparsed == 0, s.stats


def test_a_sealed_stream_of_whole_lines_parses_as_an_unsealed_one() -> None:
    """The fast path: the same events, fields and counts as without a seal; a NUL the host sent is no seal."""
    lines = [HEAD + f'typed: (0x55) line="cmd {i}"' for i in range(50)]
    lines += [HEAD + f"sched_process_exec: filename=/bin/x{i} pid={i} old_pid={i}" for i in range(50)]
    plain_events: list[TraceEvent] = []
    plain = TraceStream("h", SEALED_NAMES, on_event=plain_events.append)
    plain.feed(("\n".join(lines) + "\n").encode())
    plain.close()
    sealed = "\n".join(line + SEAL_T if "typed" in line else line for line in lines) + "\n"
    events, _, s = sealed_stream(sealed)
    assert [e.to_json() for e in events] == [e.to_json() for e in plain_events]
    assert s.stats.events == plain.stats.events == 100 and s.stats.multiline == 0
    events, _, s = sealed_stream(HEAD + 'typed: (0x55) line="a\x00"\n')
    assert events == [] and s.stats.unparsed == 1
