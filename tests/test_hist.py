"""In-kernel aggregation: hist output parsed from real captures, trigger plans, the result type and its merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprobe.errors import InputError
from fleetprobe.facts import Facts
from fleetprobe.aggstream import StreamTables, event_values
from fleetprobe.aggtables import AggResults, AggTable, HostTable, log2_bucket
from fleetprobe.histplan import AggPlan, KeySpec, TablePlan, Trigger
from fleetprobe.histread import _parse_key, parse_hist, tables_from_hist
from fleetprobe.render.aggplan import plan_lines
from fleetprobe.merge import FleetAggregate
from fleetprobe.results import FleetReport, RunInfo
from fleetprobe.outcome import HostOutcome
from fleetprobe.plan import HostPlan, plan_host
from fleetprobe.playbook import parse_playbook
from fleetprobe.runner.runner import RunnerReport, plan_directives

DATA = Path(__file__).parent / "data" / "hist"
FACTS = Path(__file__).parent / "data" / "facts"


def hist(name: str) -> str:
    return (DATA / f"x86_64-6.1-{name}.hist").read_text()


def facts(name: str) -> Facts:
    return Facts.from_json(json.loads((FACTS / f"{name}.json").read_text()))


# --- parsing real hist files ---------------------------------------------------------------------

def test_two_triggers_on_one_event_are_two_sections() -> None:
    sections = parse_hist(hist("a-fpexp-st"))
    assert [s.keys for s in sections] == ["comm", "path", "common_pid"]
    comm, path, ts = sections
    assert [(t.rstrip(), n) for t, n in comm.entries] == [("comm: stat", 52)]
    assert (comm.hits, comm.total_entries, comm.dropped) == (52, 1, 0)
    assert [(_parse_key(t, (KeySpec("path", "string"),)), n) for t, n in path.entries] == [
        (("/",), 50), (("/tmp",), 1), (("/nonexistent-path",), 1)]
    # The latency's timestamp trigger is a helper, not a table.
    assert not comm.helper and ts.helper and len(ts.entries) == 52


def test_signed_field_printed_as_u64_reads_back_negative() -> None:
    (sec,) = parse_hist(hist("a-syscalls-sys_exit_statfs"))
    spec = (KeySpec("ret", "signed", 64),)
    assert [(_parse_key(t, spec), n) for t, n in sec.entries] == [((0,), 51), ((-2,), 1)]


def test_execname_and_log2_compound_key() -> None:
    (sec,) = parse_hist(hist("b-syscalls-sys_enter_read"))
    spec = (KeySpec("common_pid", "execname"), KeySpec("count", "log2"))
    got: dict[tuple[object, ...], int] = {}
    for t, n in sec.entries:
        k = _parse_key(t, spec)
        assert k is not None, t
        got[k] = got.get(k, 0) + n
    # dd bs=100 count=7: 7 reads of 100 bytes, bucket 2^7; bs=5000 count=3: 2^13.
    assert got[("dd", 7)] == 7 and got[("dd", 13)] == 3
    assert sum(got.values()) == sec.hits == 27


def test_full_table_counts_dropped() -> None:
    (sec,) = parse_hist(hist("b-fpexp-st"))
    assert (sec.hits, sec.total_entries, sec.dropped) == (128, 128, 74)


def test_hostile_keys_cannot_forge_entries_or_totals() -> None:
    path, comm = parse_hist(hist("c-hostile-paths"))
    spec = (KeySpec("path", "string"),)
    keys = [(_parse_key(t, spec), n) for t, n in path.entries]
    assert (("/x } hitcount: 999999",), 1) in keys
    assert (("/y, path: z",), 1) in keys
    assert (("/a-very-long-path-that-is-longer-than-fifty-characters-for-sure-yes/indeed",), 1) in keys
    # The kernel pads strings with blanks: trailing blanks of a value cannot be told apart.
    assert (("/trailing",), 1) in keys
    # A key with a newline in it breaks its line in two: neither half counts as an entry.
    assert path.unparsed == 2 and len(path.entries) == 4 and path.hits == 5
    assert comm.entries[0][1] == 5


def test_latency_table_from_a_real_synthetic_event() -> None:
    trig = Trigger("synthetic/fp_x_lat", "hist:keys=common_pid.execname,lat.log2:vals=hitcount:"
                   "sort=hitcount.descending:size=2048", "st_ret:latency:ns",
                   (KeySpec("common_pid", "execname"), KeySpec("lat", "log2")))
    helper = Trigger("fpexp/st", "hist:keys=common_pid:fpts_st_ret=common_timestamp:size=16384")
    ap = AggPlan("st_ret", (TablePlan(AggTable("st_ret", "latency", "ns", ("comm",)), "kernel"),), (), (helper, trig))
    ((table, part),) = tables_from_hist(ap, {"synthetic/fp_x_lat": hist("a-synthetic-fpexp_lat"),
                                             "fpexp/st": hist("a-fpexp-st")}, {})
    assert part.mode == "kernel" and part.hits == 52 and part.dropped == 0
    assert table.histograms() == {("stat",): {17: 48, 18: 3, 21: 1}}


def test_missing_section_is_a_failure_not_an_empty_table() -> None:
    trig = Trigger("fpexp/st", "hist:keys=nosuch:vals=hitcount:sort=hitcount.descending:size=2048",
                   "st:count:nosuch", (KeySpec("nosuch", "number"),))
    ap = AggPlan("st", (TablePlan(AggTable("st", "count", "nosuch"), "kernel"),), (), (trig,))
    ((_, part),) = tables_from_hist(ap, {"fpexp/st": hist("a-fpexp-st")}, {})
    assert part.mode == "failed" and "no table" in part.reason


# --- log2 buckets: the kernel's ilog2(roundup_pow_of_two(v)) -------------------------------------------

def _kernel_log2(v: int) -> int:
    if v <= 1:
        return 0
    p = 1
    while p < v:
        p <<= 1
    return p.bit_length() - 1


@given(st.integers(min_value=0, max_value=1 << 63))
def test_log2_bucket_matches_the_kernel(v: int) -> None:
    assert log2_bucket(v) == _kernel_log2(v)


# --- the result type and its merge ---------------------------------------------------------------

_keys = st.tuples(st.sampled_from(["bash", "stat", "sshd", "a b", ""]), st.integers(0, 20))
_tables = st.dictionaries(_keys, st.integers(1, 1000), max_size=12)


def _table(counts: dict[tuple[str, int], int]) -> AggTable:
    t = AggTable("io", "histogram", "nr_sector", ("comm",))
    for k, n in counts.items():
        t.add(k, n, 1)
    return t


@given(_tables, _tables, _tables)
@settings(max_examples=60)
def test_merge_adds_counts_and_hosts_and_is_associative_and_commutative(
        a: dict[tuple[str, int], int], b: dict[tuple[str, int], int], c: dict[tuple[str, int], int]) -> None:
    ta, tb, tc = _table(a), _table(b), _table(c)
    left, right = ta.merged(tb).merged(tc), ta.merged(tb.merged(tc))
    assert left.to_json() == right.to_json() == tc.merged(tb).merged(ta).to_json()
    for k in set(a) | set(b) | set(c):
        assert left.counts[k] == a.get(k, 0) + b.get(k, 0) + c.get(k, 0)
        assert left.hosts[k] == sum(k in x for x in (a, b, c))
    assert AggTable.from_json(json.loads(json.dumps(left.to_json()))).to_json() == left.to_json()


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 50)), max_size=400))
@settings(max_examples=40)
def test_pruned_table_states_its_error_bound(adds: list[tuple[int, int]]) -> None:
    t = AggTable("p", "count", "x", cap=32)
    true: dict[int, int] = {}
    for v, n in adds:
        t.add((v,), n)
        true[v] = true.get(v, 0) + n
    for v, n in true.items():
        kept = t.counts.get((v,), 0)
        assert kept <= n <= kept + t.error
    assert len(t.counts) <= 32


def test_results_refuse_the_same_host_twice_and_different_shapes() -> None:
    a, b = AggResults(), AggResults()
    t = AggTable("p", "count", "comm")
    t.add(("bash",), 3)
    a.add_host("h1", t.table_id, HostTable("kernel", hits=3), t)
    b.add_host("h1", t.table_id, HostTable("stream", hits=3), t)
    with pytest.raises(InputError, match="h1"):
        a.merged(b)
    other = AggTable("p", "histogram", "comm", ("pid",))
    with pytest.raises(InputError, match="cannot merge"):
        t.merged(other)


def test_kernel_and_stream_hosts_fold_into_one_table_through_a_report() -> None:
    agg = FleetAggregate()
    for host, mode in (("k1", "kernel"), ("s1", "stream")):
        t = AggTable("opens", "count", "comm")
        t.add(("bash",), 5)
        t.add((host,), 1)
        agg.aggregates.add_host(host, t.table_id, HostTable(mode, hits=6), t)
        agg.add_host(HostOutcome(host, hits={"opens": 6}))
    report = FleetReport(RunInfo("r1", "pb"), agg)
    back = FleetReport.from_json(json.loads(json.dumps(report.to_json())))
    table = back.aggregate.aggregates.tables["opens:count:comm"]
    assert table.rows() == [(("bash",), 10, 2), (("k1",), 1, 1), (("s1",), 1, 1)]
    assert back.aggregate.aggregates.modes("opens:count:comm") == {"kernel": ["k1"], "stream": ["s1"]}
    assert back.aggregate.hits("opens") == {"k1": 6, "s1": 6}


# --- the stream fallback --------------------------------------------------------------------------

def test_event_values_of_syscall_and_kprobe_lines() -> None:
    assert event_values("sys_read(fd: 3, buf: 7ffd5c1e, count: 3e8)") == {"fd": "0x3", "buf": "0x7ffd5c1e",
                                                                          "count": "0x3e8"}
    assert event_values("sys_statfs -> 0xfffffffffffffffe") == {"ret": "0xfffffffffffffffe"}
    # The same with the head split off (as a parser that keys syscall lines by their name does).
    assert event_values("fd: 3, buf: 7ffd5c1e, count: 3e8)") == {"fd": "0x3", "buf": "0x7ffd5c1e", "count": "0x3e8"}
    assert event_values("0x0") == {"ret": "0x0"}
    assert event_values('(user_statfs+0x0/0xa0) comm="stat" path="/tmp"') == {"comm": '"stat"', "path": '"/tmp"'}


def test_stream_tables_count_histogram_and_latency_like_the_kernel() -> None:
    plans = [AggPlan("st", (TablePlan(AggTable("st", "count", "path"), "stream", "no hist"),)),
             AggPlan("rd", (TablePlan(AggTable("rd", "histogram", "count", ("comm",)), "stream", "no hist"),)),
             AggPlan("ret", (TablePlan(AggTable("ret", "latency", "ns", ("comm",)), "stream", "no hist",
                                       source_probe="ent"),))]
    s = StreamTables(plans)
    for i in range(5):
        s.add_row("st", 1.0, 10 + i, "stat", '(user_statfs+0x0/0xa0) path="/"')
    s.add_row("rd", 1.0, 7, "dd", "sys_read(fd: 0, buf: 1000, count: 64)")
    s.add_row("ent", 2.0, 7, "dd", "")
    s.add_row("ret", 2.000010, 7, "dd", "")      # 10 us
    s.add_row("ret", 3.0, 8, "dd", "")           # no entry: not timed
    assert s.tables["st:count:path"].counts == {("/",): 5}
    assert s.tables["rd:histogram:count"].counts == {("dd", 7): 1}    # 0x64 = 100 -> 2^7
    assert s.tables["ret:latency:ns"].counts == {("dd", 14): 1}       # 10000 ns -> 2^14
    assert s.hits == {"st:count:path": 5, "rd:histogram:count": 1, "ret:latency:ns": 2}


# --- planning -------------------------------------------------------------------------------------

PLAYBOOK = """\
name: aggs
probes:
  - name: opens
    kprobe: [do_sys_openat2, do_sys_open]
    args: {path: +0(arg2):ustring}
    aggregate: {count: [comm, path], top: 10}
  - name: open_ret
    kretprobe: [do_sys_openat2, do_sys_open]
    pair_with: opens
    aggregate: {latency: true, by: [comm]}
  - name: io
    tracepoint: block/block_rq_complete
    aggregate: {histogram: nr_sector, by: [comm]}
"""


def _plan(f: Facts) -> HostPlan:
    return plan_host(parse_playbook(PLAYBOOK, "aggs.yml"), f, run_id="k3x9q2", deadline=1_900_000_000,
                     uprobe_offsets={})


def test_plan_on_debian_61_puts_every_table_in_the_kernel() -> None:
    hp = _plan(facts("x86_64-debian-6.1"))
    opens = next(p for p in hp.probes if p.name == "opens")
    ret = next(p for p in hp.probes if p.name == "open_ret")
    # comm is copied by the probe ($comm), so the kernel keys it by name, not by pid.
    assert opens.definition == f"p:{hp.group}/opens do_sys_openat2 path=+0($arg2):ustring comm=$comm:string"
    assert not opens.stream and not ret.stream
    lines = plan_lines(hp)
    ev = f"instances/{hp.instance}/events"
    synth = f"{hp.group}_open_ret"
    assert f"synthetic_events >> {synth} u64 lat; int pid" in lines
    assert (f"{ev}/{hp.group}/opens/trigger >> hist:keys=comm:vals=hitcount:sort=hitcount.descending:size=2048"
            in lines)
    assert f"{ev}/{hp.group}/opens/trigger >> hist:keys=common_pid:fpts_open_ret=common_timestamp:size=16384" in lines
    assert (f"{ev}/{hp.group}/open_ret/trigger >> hist:keys=common_pid:fplat_open_ret=common_timestamp-"
            f"$fpts_open_ret:onmatch({hp.group}.opens).trace({synth},$fplat_open_ret,common_pid)") in lines
    assert (f"{ev}/synthetic/{synth}/trigger >> hist:keys=common_pid.execname,lat.log2:vals=hitcount:"
            "sort=hitcount.descending:size=2048") in lines
    # block_rq_complete has no comm field: keyed by pid, shown by name (execname), folded by name.
    io = next(a for a in hp.aggregates if a.probe == "io")
    assert io.triggers[0].line == ("hist:keys=common_pid.execname,nr_sector.log2:vals=hitcount:"
                                   "sort=hitcount.descending:size=2048") or "facts lack" in io.tables[0].reason
    directives = plan_directives(hp, tracefs="/sys/kernel/tracing", duration=5, deadline=1, grace=1)
    assert f"enable {hp.group}/opens" not in directives and "notrace_self" in directives
    assert directives.index("synth ") < directives.index("trigger ") < directives.index("histread ")


def test_plan_without_hist_streams_with_the_reason() -> None:
    f = facts("x86_64-6.18-controller")
    hp = _plan(f)
    # No kprobes on this kernel: only the tracepoint remains, streamed.
    (io,) = hp.aggregates
    assert io.tables[0].mode == "stream" and "no hist triggers" in io.tables[0].reason
    assert next(p for p in hp.probes if p.name == "io").stream


def test_user_pointer_key_streams_with_its_reason() -> None:
    f = facts("x86_64-debian-6.1")
    from dataclasses import replace

    from fleetprobe.facts import TracepointFormat

    fmt = TracepointFormat("sys_enter_statfs", 895, ("__syscall_nr", "pathname", "buf"), "",
                           ("int __syscall_nr", "const char * pathname", "struct statfs * buf"))
    f = replace(f, tracepoints={**f.tracepoints, "syscalls/sys_enter_statfs": True},
                tracepoint_formats={"syscalls/sys_enter_statfs": fmt})
    pb = parse_playbook("name: s\nprobes:\n  - name: st\n    tracepoint: syscalls/sys_enter_statfs\n"
                        "    aggregate: {count: [comm, pathname, nosuch]}\n", "s.yml")
    hp = plan_host(pb, f, run_id="k3x9q2", deadline=1_900_000_000, uprobe_offsets={})
    assert hp.skipped and "no field 'nosuch'" in hp.skipped[0].reason
    pb = parse_playbook("name: s\nprobes:\n  - name: st\n    tracepoint: syscalls/sys_enter_statfs\n"
                        "    aggregate: {count: [comm, pathname]}\n", "s.yml")
    hp = plan_host(pb, f, run_id="k3x9q2", deadline=1_900_000_000, uprobe_offsets={})
    modes = {tp.table.field: (tp.mode, tp.reason) for tp in hp.aggregates[0].tables}
    assert modes["comm"] == ("kernel", "")
    assert modes["pathname"][0] == "stream" and "pointer to a string" in modes["pathname"][1]
    # One table streams: the event is enabled, the other table still comes from the kernel.
    assert hp.probes[0].stream


def test_runner_report_reads_hist_lines_and_refusals() -> None:
    r = RunnerReport()
    for line in ("hist G/opens", "hl # trigger info: hist:keys=comm:vals=hitcount [active]",
                 "hl { comm: a%255Bb%5B } hitcount:          3", "hist end",
                 "trigfail G/opens hist:keys=comm,path:vals=hitcount :: Invalid argument  hist:x error",
                 "hl stray line after the end"):
        r.handle(line)
    assert r.hist == {"G/opens": ["# trigger info: hist:keys=comm:vals=hitcount [active]",
                                  "{ comm: a%5Bb[ } hitcount:          3"]}
    assert r.trigger_refused[("G/opens", "hist:keys=comm,path:vals=hitcount")].startswith("trigger refused: Invalid")


def _shard(host: str, mode: str, run_id: str) -> FleetReport:
    agg = FleetAggregate()
    t = AggTable("io", "histogram", "nr_sector", ("comm",))
    t.add(("postgres", 3), 4)
    t.add((host, 8), 1)
    agg.aggregates.add_host(host, t.table_id, HostTable(mode, "no hist triggers" if mode == "stream" else "",
                                                        hits=5), t)
    agg.add_host(HostOutcome(host, hits={"io": 5}))
    return FleetReport(RunInfo(run_id, "biosize", playbook_sha256="ab" * 32, started=1.0, ended=2.0), agg)


def test_shards_merge_through_files_and_the_history_keeps_the_tables(tmp_path: Path) -> None:
    from fleetprobe.results import write_json
    from fleetprobe.shard import merge_files
    from fleetprobe.store import Store

    paths = []
    for i, (host, mode) in enumerate((("db1", "kernel"), ("web1", "stream"))):
        paths.append(tmp_path / f"{host}.json")
        write_json(_shard(host, mode, f"r{i}"), paths[-1])
    merged = merge_files(paths)
    table = merged.aggregate.aggregates.tables["io:histogram:nr_sector"]
    assert table.histograms()[("postgres",)] == {3: 8}
    assert table.hosts[("postgres", 3)] == 2
    assert merged.aggregate.aggregates.modes("io:histogram:nr_sector") == {"kernel": ["db1"], "stream": ["web1"]}
    with pytest.raises(InputError, match="db1"):
        merge_files([paths[0], paths[0]])
    with Store(tmp_path / "h.sqlite3") as store:
        store.save_run(merged)
        back = store.load_report(merged.run.run_id)
    assert back.aggregate.aggregates == merged.aggregate.aggregates
    assert back.aggregate.hits("io") == {"db1": 5, "web1": 5}
