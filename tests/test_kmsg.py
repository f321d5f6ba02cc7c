"""kmsg parsing from real captured /dev/kmsg records (tests/data/kmsg/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetprobe.kmsg import (
    KmsgCollector,
    KmsgFormatError,
    KmsgStream,
    clock_offset_from,
    parse_header,
    parse_module_line,
    parse_records,
    to_event,
    unescape,
)

DATA = Path(__file__).parent / "data" / "kmsg"


def read(name: str) -> bytes:
    """One captured data file."""
    return (DATA / name).read_bytes()


def test_boot_records_parse_with_escapes() -> None:
    records = parse_records(read("controller-6.18-boot.kmsg"))
    assert [r.seq for r in records] == list(range(80, 100))
    assert all(r.facility == 0 for r in records)  # kernel messages
    tabbed = [r for r in records if r.seq == 89][0]
    assert tabbed.level == 6
    assert tabbed.usec == 201827
    assert tabbed.text == "rcu: \tRCU restricting CPUs from NR_CPUS=256 to nr_cpu_ids=2."
    assert tabbed.timestamp == pytest.approx(0.201827)


def test_dictionary_lines_attach_to_their_record() -> None:
    records = parse_records(read("controller-6.18-dict.kmsg"))
    assert [r.seq for r in records] == list(range(185, 192))
    by_seq = {r.seq: r for r in records}
    assert by_seq[187].props == (("SUBSYSTEM", "acpi"), ("DEVICE", "+acpi:PNP0A08:00"))
    assert by_seq[186].props == ()
    assert by_seq[188].text.startswith("acpi PNP0A08:00: PCIe port services disabled")


def test_user_written_records_and_backslash_escape() -> None:
    records = parse_records(read("controller-6.18-userwrites.kmsg"))
    assert [(r.facility, r.level) for r in records] == [(1, 4)] * 3  # default_message_loglevel 4 for writes without <N>
    assert records[2].text == "tab\there back\\slash"
    line = parse_module_line(records[0].text)
    assert line is not None
    # comm is the rest of the line: the space survives and \x5c became a backslash.
    assert line.comm == "my worker\\x"
    assert (line.run, line.probe, line.ev) == ("capt01", "fork", "pre")


def test_event_from_real_record_with_clock_offset() -> None:
    records = parse_records(read("controller-6.18-userwrites.kmsg"))
    clock_line = parse_module_line(records[1].text)
    assert clock_line is not None
    offset = clock_offset_from(records[1], clock_line)
    assert offset == pytest.approx(1795656000.311309806 - 581.113644)
    line = parse_module_line(records[0].text)
    assert line is not None
    ev = to_event(records[0], line, host="h1", clock_offset=offset)
    assert ev.host == "h1" and ev.probe == "fork"
    assert ev.trace_ts == pytest.approx(581.111972)
    assert ev.time == pytest.approx(581.111972 + 1795656000.311309806 - 581.113644)
    assert (ev.cpu, ev.pid, ev.comm) == (1, 4242, "my worker\\x")
    assert ev.site == "kernel_clone+0x0"
    assert ev.fields == {"ev": "pre", "sym": "kernel_clone+0x0", "tgid": 4242,
                         "ip": 0xffffffff8106c3a1, "flags": 0x246}


def test_status_line_is_not_an_event() -> None:
    rec = parse_header("6,5,100,-;fleetprobe run=r probe=p ev=planted sym=kernel_clone+0x0 addr=x")
    line = parse_module_line(rec.text)
    assert line is not None
    with pytest.raises(ValueError, match="status line"):
        to_event(rec, line, host="h", clock_offset=None)


def test_reopen_replay_is_dropped_and_gaps_counted() -> None:
    boot = read("controller-6.18-boot.kmsg")
    dict_recs = read("controller-6.18-dict.kmsg")
    stream = KmsgStream(where="h1")
    first = stream.feed(boot)
    # A reopened reader replays the ring from the oldest record: all of it again, then new ones.
    replay = stream.feed(boot + dict_recs)
    rest = stream.flush()
    got = [r.seq for r in first + replay + rest]
    assert got == list(range(80, 100)) + list(range(185, 192))
    assert stream.duplicates == 20
    assert stream.lost == 185 - 99 - 1
    assert stream.gaps == [(99, 185)]
    # The dictionary of a dropped duplicate must not attach to anything.
    assert {r.seq: r.props for r in replay + rest}[187][0] == ("SUBSYSTEM", "acpi")


def test_chunks_cut_anywhere_give_the_same_records() -> None:
    data = read("controller-6.18-dict.kmsg") + read("controller-6.18-userwrites.kmsg")
    whole = parse_records(data)
    for size in (1, 7, 64, 333):
        stream = KmsgStream()
        out = []
        for i in range(0, len(data), size):
            out += stream.feed(data[i:i + size])
        out += stream.flush()
        assert [(r.seq, r.usec, r.text) for r in out] == [(r.seq, r.usec, r.text) for r in whole], size
        # A chunk that ends right after a header (or dictionary) line releases that record
        # early: the rest of its dictionary is counted, never attached to another record.
        full = {w.seq: w.props for w in whole}
        assert all(r.props == full[r.seq][:len(r.props)] for r in out)
        assert stream.late_props == sum(len(w.props) for w in whole) - sum(len(r.props) for r in out), size
        assert stream.lost == 339 - 191 - 1


def test_whole_reads_are_exact_and_not_held_back() -> None:
    """As the runner forwards them: one chunk per read(2) of /dev/kmsg, i.e. one whole record."""
    records = read("controller-6.18-dict.kmsg").decode().replace("\n ", "\0").split("\n")
    chunks = [(r.replace("\0", "\n ") + "\n").encode() for r in records if r]
    stream = KmsgStream()
    for chunk, expected in zip(chunks, parse_records(read("controller-6.18-dict.kmsg"))):
        # Each record comes out of the feed that completed it: a live stream shows its latest event.
        assert stream.feed(chunk) == [expected]
    assert stream.flush() == [] and stream.late_props == 0


def test_last_seq_from_a_previous_connection() -> None:
    stream = KmsgStream(last_seq=89)
    out = stream.feed(read("controller-6.18-boot.kmsg")) + stream.flush()
    assert [r.seq for r in out] == list(range(90, 100))
    assert stream.duplicates == 10 and stream.lost == 0


def test_malformed_lines_counted_or_raised() -> None:
    junk = b"insmod: ERROR: could not insert module\n"
    stream = KmsgStream(where="db-07")
    out = stream.feed(junk + read("controller-6.18-userwrites.kmsg")) + stream.flush()
    assert len(out) == 3
    assert stream.malformed == 1 and stream.bad_lines == [junk.decode().strip()]
    with pytest.raises(KmsgFormatError, match="db-07: not a /dev/kmsg record .*no ';'"):
        parse_records(junk, where="db-07")
    with pytest.raises(KmsgFormatError, match="decimal"):
        parse_header("6,x,1,-;hello")


def test_caller_field_kept() -> None:
    rec = parse_header("6,12,3456,-,caller=T42;hello")
    assert rec.extra == ("caller=T42",) and rec.text == "hello" and not rec.continuation
    assert parse_header("4,13,3457,c;more").continuation


def test_unescape_non_utf8_and_plain() -> None:
    assert unescape("plain") == "plain"
    assert unescape("caf\\xc3\\xa9") == "café"
    assert unescape("bad\\xff") == "bad\ufffd"


@pytest.mark.parametrize("text", [
    "Linux version 6.1.0",
    "fleetprobe run=r probe=p",           # no ev
    "fleetprobe probe=p ev=pre",          # no run
    "fleetprobeX run=r probe=p ev=pre",
])
def test_not_module_lines(text: str) -> None:
    assert parse_module_line(text) is None


def test_module_line_value_with_space_and_comm_with_equals() -> None:
    line = parse_module_line("fleetprobe run=r1 probe=p ev=planted sym=foo+0x0 addr=foo+0x0/0x10 [mymod] "
                             "maxactive=4")
    assert line is not None
    assert line.values == {"sym": "foo+0x0", "addr": "foo+0x0/0x10 [mymod]", "maxactive": "4"}
    assert line.comm is None
    line = parse_module_line("fleetprobe run=r1 probe=p ev=ret sym=f cpu=0 pid=1 retval=0x0 lat_ns=5 "
                             "comm=a comm=b c")
    assert line is not None and line.comm == "a comm=b c"


def test_collector_picks_its_run_and_tracks_status() -> None:
    lines = [
        "6,100,1000000,-;fleetprobe run=other probe=fork ev=pre sym=kernel_clone+0x0 cpu=0 pid=1 comm=x",
        "12,101,1500000,-;fleetprobe run=r1 probe=- ev=clock realtime=1700000010.5",
        "6,102,2000000,-;fleetprobe run=r1 probe=fork ev=planted sym=kernel_clone+0x0 "
        "addr=kernel_clone+0x0/0x3f0",
        "6,103,2100000,-;fleetprobe run=r1 probe=fork ev=pre sym=kernel_clone+0x0 cpu=1 pid=151 tgid=151 "
        "nip=0xc000000000135bac msr=0x8000000000009033 comm=sh",
        "6,106,3000000,-;fleetprobe run=r1 probe=fork ev=suppressed count=7",
        "6,107,4000000,-;fleetprobe run=r1 probe=fork ev=unregistered sym=kernel_clone+0x0 hits=20 "
        "printed=13 suppressed=7 missed=2",
        "3,108,4000001,-;fleetprobe run=r1 probe=ret ev=failed sym=nosuch err=-2",
    ]
    col = KmsgCollector("ppc1", "r1")
    events = col.feed("\n".join(lines) + "\n") + col.flush()
    assert len(events) == 1
    ev = events[0]
    assert ev.fields["nip"] == 0xc000000000135bac and ev.fields["msr"] == 0x8000000000009033
    assert ev.time == pytest.approx(1700000010.5 - 1.5 + 2.1)
    assert col.other == 1
    assert col.stream.lost == 2 and col.stream.gaps == [(103, 106)]
    fork = col.status["fork"]
    assert fork.planted_at == "kernel_clone+0x0/0x3f0"
    assert (fork.hits, fork.printed, fork.suppressed, fork.missed, fork.unregistered) == (20, 13, 7, 2, True)
    assert col.status["ret"].failed == "sym=nosuch err=-2"


# -- real module output captured from the lab's Debian kernels -------------------------------

LAB_CAPTURES = {
    "x86_64": ("lab-x86_64-6.1.0-56-amd64.kmsg", ("ip", "flags")),
    "ppc64le": ("lab-ppc64le-6.1.0-50-powerpc64le.kmsg", ("nip", "msr")),
    "mips64el": ("lab-mips64el-6.1.0-50-5kc-malta.kmsg", ("cp0_epc", "cp0_status")),
    "mipsel": ("lab-mipsel-6.1.0-50-4kc-malta.kmsg", ("cp0_epc", "cp0_status")),
}


@pytest.mark.parametrize("arch", sorted(LAB_CAPTURES))
def test_lab_capture(arch: str) -> None:
    """fp_kprobe (rate=3, post=1), then fp_kretprobe, 8 forks by the shell, both unloaded, then a bad symbol.

    Forks seen by both: 5 x sh -c, sleep, rmmod; plus insmod fp_kretprobe (fp_kprobe
    only) and the second rmmod (fp_kretprobe only, which sees its own unload's fork).
    """
    name, regs = LAB_CAPTURES[arch]
    col = KmsgCollector(f"lab-{arch}", "cap2")
    events = col.feed(read(name)) + col.flush()
    assert col.other == 0 and col.stream.malformed == 0
    # busybox date printed "<secs>.%N": the offset is still known to the second.
    assert col.clock_offset is not None and 1.7e9 < col.clock_offset < 1.9e9
    fork = [e for e in events if e.probe == "fork"]
    rets = [e for e in events if e.probe == "forkret"]
    assert fork and all(set(regs) <= set(e.fields) and e.fields["ev"] in ("pre", "post") for e in fork)
    assert all(e.time == pytest.approx(e.trace_ts + col.clock_offset) for e in events)
    # The script's shell forked eight times: eight child pids in order (kthreadd may
    # take a pid in between for a kworker: it does in the x86_64 capture).
    pids = [int(e.fields["retval"]) for e in rets if e.comm == "sh"]
    assert len(pids) == 8 and pids == sorted(pids) and pids[-1] - pids[0] < 8 + 3
    assert {e.comm for e in rets} <= {"sh", "kthreadd"}
    assert all(e.pid == 2 for e in rets if e.comm == "kthreadd")
    assert all(isinstance(e.fields["lat_ns"], int) and int(e.fields["lat_ns"]) > 0 for e in rets)
    st = col.status["fork"]
    # The rate limit (3 lines/s) held: what was printed plus what was suppressed is every line.
    assert st.printed == len(fork) and st.hits == len(rets) and st.printed + st.suppressed == 2 * st.hits
    assert st.planted_at.startswith("kernel_clone+") and st.unregistered
    assert col.status["forkret"].hits == len(rets) and col.status["forkret"].missed == 0
    assert col.status["bad"].failed == "sym=no_such_fn+0x0 err=-2"


def test_lab_capture_ppc64_planted_past_the_global_entry() -> None:
    """On ppc64 ELFv2 the kernel moves a +0 kprobe past the TOC setup (global entry): the module reports it."""
    col = KmsgCollector("p", "cap2")
    col.feed(read("lab-ppc64le-6.1.0-50-powerpc64le.kmsg"))
    assert col.status["fork"].planted_at == "kernel_clone+0xc/0x690"
