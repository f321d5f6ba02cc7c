"""merge: the aggregate is mergeable (associative, equal to one pass), bounded, and pairs latency."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetprobe.errors import InputError
from fleetprobe.merge import FleetAggregate
from fleetprobe.results import FleetReport, RunInfo
from fleetprobe.sketches import BUCKETS, Latency, TopValues, bucket_of, bucket_range_ns
from fleetprobe.outcome import HostOutcome, LossCounters
from fleetprobe.parse import TraceStream
from fleetprobe.traceline import TraceEvent

PAIRS = {"openat_ret": "openat"}
HOSTS = [f"h{i}" for i in range(5)]


def _line_events(draw_host: str, specs: list[tuple[int, int, int, int]]) -> list[TraceEvent]:
    """Events for one host from (kind, pid, path, dt_us) specs, in trace-time order."""
    out = []
    t = 100.0
    for kind, pid, path, dt in specs:
        t += dt / 1e6
        if kind == 0:
            out.append(TraceEvent(draw_host, "openat", t, t, pid % 2, pid, f"c{pid % 3}",
                                  args=f'(do_sys_openat2+0x0/0x1a0) dfd=-100 path="/p{path}" flags=0x0'))
        elif kind == 1:
            out.append(TraceEvent(draw_host, "openat_ret", t, t, pid % 2, pid, f"c{pid % 3}",
                                  args=f"(do_sys_open+0x5c/0x90 <- do_sys_openat2) ret={path - 2}"))
        else:
            out.append(TraceEvent(draw_host, "exec", t, t, 0, pid, "sh",
                                  args=f"filename=/bin/x{path} pid={pid} old_pid={pid}"))
    return out


SPEC = st.tuples(st.integers(0, 2), st.integers(1, 6), st.integers(0, 6), st.integers(1, 5000))
FLEET = st.dictionaries(st.sampled_from(HOSTS), st.lists(SPEC, max_size=40), min_size=1)


def _outcome(host: str, events: list[TraceEvent]) -> HostOutcome:
    """An ok outcome (or, for h4, a failed one) for a host."""
    if host == "h4":
        return HostOutcome(host, status="failed", stage="probe", reason="EBUSY on kprobe_events")
    return HostOutcome(host, stage="done", placed_probes={"openat": "do_sys_openat2"},
                       loss=LossCounters(lost_lines=len(events) % 3, probe_misses={"openat": 1}))


def _aggregate(fleet: dict[str, list[TraceEvent]], hosts: list[str], top_k: int = 20) -> FleetAggregate:
    """One aggregate of the given hosts' events (interleaved by time, as concurrent streams are)."""
    agg = FleetAggregate(PAIRS, top_k)
    merged = sorted((ev for h in hosts for ev in fleet.get(h, [])), key=lambda e: e.trace_ts)
    for ev in merged:
        agg.add_event(ev)
    for h in hosts:
        agg.add_host(_outcome(h, fleet.get(h, [])))
    return agg


@settings(max_examples=60, deadline=None)
@given(FLEET, st.lists(st.integers(0, 2), min_size=len(HOSTS), max_size=len(HOSTS)))
def test_merge_is_associative_and_equals_one_pass(specs: dict[str, list[tuple[int, int, int, int]]],
                                                  shard_of: list[int]) -> None:
    """Shards partitioning the hosts: merge(a, merge(b, c)) == merge(merge(a, b), c) == all at once."""
    fleet = {h: _line_events(h, s) for h, s in specs.items()}
    hosts = sorted(fleet)
    shards = [[h for h in hosts if shard_of[HOSTS.index(h)] == i] for i in range(3)]
    a, b, c = (_aggregate(fleet, s) for s in shards)
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    whole = _aggregate(fleet, hosts)
    assert left == right == whole
    # And it survives JSON.
    assert FleetAggregate.from_json(json.loads(json.dumps(whole.to_json()))) == whole


@settings(max_examples=40, deadline=None)
@given(FLEET)
def test_counts_are_exact(specs: dict[str, list[tuple[int, int, int, int]]]) -> None:
    """Hits, per-value counts and host counts equal a naive recount."""
    fleet = {h: _line_events(h, s) for h, s in specs.items()}
    agg = _aggregate(fleet, sorted(fleet))
    for probe in ("openat", "openat_ret", "exec"):
        want = {h: sum(e.probe == probe for e in evs) for h, evs in fleet.items()}
        assert agg.hits(probe) == {h: n for h, n in sorted(want.items()) if n}
    paths: dict[str, int] = {}
    path_hosts: dict[str, set[str]] = {}
    for h, evs in fleet.items():
        for e in evs:
            if e.probe == "openat":
                p = e.args.split('path="')[1].split('"')[0]
                paths[p] = paths.get(p, 0) + 1
                path_hosts.setdefault(p, set()).add(h)
    got = {v: (n, nh) for v, n, nh in agg.top("openat", "path", 100)}
    assert got == {p: (n, len(path_hosts[p])) for p, n in paths.items()}


def test_latency_pairs_per_pid() -> None:
    """Entry/return per (host, pid); interleaved pids; a return without entry is unmatched."""
    agg = FleetAggregate(PAIRS)
    evs = [("openat", 1, 10.000000), ("openat", 2, 10.000001), ("openat_ret", 2, 10.000005),
           ("openat_ret", 1, 10.001000), ("openat_ret", 3, 10.002000), ("openat", 4, 10.003)]
    for probe, pid, ts in evs:
        agg.add_event(TraceEvent("h", probe, ts, ts, 0, pid, "x", args="ret=0"))
    agg.add_host(HostOutcome("h"))
    lat = agg.latency("openat_ret")
    assert lat.count == 2 and lat.unmatched == 1 and lat.pending_at_end == 1
    assert lat.buckets[bucket_of(4e-6)] == 1 and lat.buckets[bucket_of(1e-3)] == 1
    lo, hi = bucket_range_ns(bucket_of(1e-3))
    assert lo <= 1_000_000 < hi
    assert lat.quantile(0.5) == bucket_range_ns(bucket_of(4e-6))[1]


def test_pending_table_is_bounded_and_counts_evictions() -> None:
    """More open entries than the cap: the oldest are evicted and counted, memory stays bounded."""
    agg = FleetAggregate(PAIRS, pending_cap=100)
    for pid in range(1000):
        agg.add_line("h", "openat", 1.0 + pid * 1e-6, 0.0, 0, pid, "x", "")
    for pid in range(900, 1000):
        agg.add_line("h", "openat_ret", 2.0, 0.0, 0, pid, "x", "")
    agg.add_host(HostOutcome("h"))
    lat = agg.latency("openat_ret")
    assert lat.evicted == 900 and lat.count == 100 and lat.unmatched == 0


def test_bucket_edges() -> None:
    """0 ns, 1 ns, powers of two and the top bucket."""
    assert bucket_of(0) == 0 and bucket_of(1e-9) == 1 and bucket_of(2e-9) == 2 and bucket_of(3e-9) == 2
    assert bucket_of(-1.0) == 0 and bucket_of(1e12) == BUCKETS - 1
    assert Latency().quantile(0.5) is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=3000), st.integers(4, 40))
def test_top_values_bounds_hold_after_pruning(stream: list[int], cap: int) -> None:
    """Misra-Gries: estimate <= true <= estimate + error, and the table never exceeds its cap."""
    t = TopValues(cap)
    true: dict[int, int] = {}
    for v in stream:
        t.add(v, 1)
        true[v] = true.get(v, 0) + 1
        assert len(t.counts) <= cap
    for v, n in true.items():
        est = t.counts.get(v, 0)
        assert est <= n <= est + t.error
    assert t.total == len(stream)
    assert t.exact == (t.error == 0)


def test_heavy_hitter_survives_many_distinct_values() -> None:
    """One value that is 30% of 100k events among 50k distinct ones stays on top, flagged approximate."""
    rng = random.Random(3)
    agg = FleetAggregate({}, top_k=5)
    hot = 0
    for i in range(100_000):
        path = "/etc/hot" if rng.random() < 0.3 else f"/tmp/f{i}"
        hot += path == "/etc/hot"
        agg.add_line("h", "openat", i * 1e-6, 0.0, 0, 1, "c", f'path="{path}"')
    agg.add_host(HostOutcome("h"))
    top = agg.top("openat", "path", 1)
    table = agg.values[("openat", "path")]
    assert top[0][0] == "/etc/hot" and not table.exact
    assert top[0][1] <= hot <= top[0][1] + table.error
    assert len(table.counts) <= agg.fleet_cap


def test_memory_does_not_grow_with_events() -> None:
    """Unique argument text per event (the worst case): peak memory over 80k events stays flat."""
    agg = FleetAggregate(PAIRS)
    s = TraceStream("h", {"e": "openat", "r": "openat_ret"}, aggregate=agg)

    def feed(start: int, n: int) -> None:
        """n unique lines."""
        lines = [f"  c{i % 7}-{i % 5000} [000] ..... {1 + i * 1e-6:.6f}: e: ptr=0x{i:x} path=\"/x/{i}\"\n"
                 for i in range(start, start + n)]
        s.feed("".join(lines).encode())

    tracemalloc.start()
    feed(0, 10_000)
    # The caches fill and flush in a sawtooth: compare peaks over equal windows, not snapshots.
    tracemalloc.reset_peak()
    feed(10_000, 10_000)
    early = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    for start in range(20_000, 80_000, 10_000):
        feed(start, 10_000)
    late = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert late < early * 1.2, (early, late)
    s.close()
    assert s.stats.events == 80_000


def test_quiet_hosts_say_why() -> None:
    """Failed, unreachable, all-skipped and silent hosts are listed with their reasons."""
    agg = FleetAggregate(PAIRS)
    agg.add_line("busy", "openat", 1.0, 1.0, 0, 1, "x", "")
    agg.add_host(HostOutcome("busy", placed_probes={"openat": "do_sys_openat2"}))
    agg.add_host(HostOutcome("dead", status="unreachable", stage="connect", reason="connection refused"))
    agg.add_host(HostOutcome("old", placed_probes={}, skipped_probes={"openat": "no probeable symbol"}))
    agg.add_host(HostOutcome("idle", placed_probes={"openat": "do_sys_openat2"}))
    assert agg.quiet_hosts() == {"dead": "unreachable at connect: connection refused",
                                 "idle": "saw nothing",
                                 "old": "every probe skipped: openat: no probeable symbol"}


def test_merge_refuses_the_same_host_twice() -> None:
    """Shards must partition hosts, else host counts would double."""
    a, b = FleetAggregate(PAIRS), FleetAggregate(PAIRS)
    a.add_host(HostOutcome("h"))
    b.add_host(HostOutcome("h"))
    with pytest.raises(InputError, match="appear in both"):
        a.merge(b)


def _report(fleet: dict[str, list[TraceEvent]], hosts: list[str], run_id: str, t0: float) -> FleetReport:
    """A report of one shard."""
    run = RunInfo(run_id, "open.yaml", "playbooks/open.yaml", "ab" * 32, t0, t0 + 10.0, "inv.yaml",
                  ["fleetprobe", "run"], "0.1.0")
    return FleetReport(run, _aggregate(fleet, hosts))


def test_report_of_two_shards_equals_report_of_one_run() -> None:
    """FleetReport.merge over disjoint hosts == the report of one run over both (aggregate and hosts)."""
    rng = random.Random(7)
    fleet = {h: _line_events(h, [(rng.randrange(3), rng.randrange(1, 6), rng.randrange(7),
                                  rng.randrange(1, 5000)) for _ in range(200)]) for h in HOSTS}
    one = _report(fleet, HOSTS, "r1", 1000.0)
    merged = _report(fleet, HOSTS[:2], "r1", 1000.0).merge(_report(fleet, HOSTS[2:], "r2", 1005.0))
    assert merged.aggregate == one.aggregate
    assert [o.to_json() for o in merged.hosts] == [o.to_json() for o in one.hosts]
    assert merged.run.shards == ["r1", "r2"] and merged.run.started == 1000.0 and merged.run.ended == 1015.0
    again = FleetReport.from_json(json.loads(json.dumps(merged.to_json())))
    assert again.to_json() == merged.to_json()


def test_report_refuses_different_playbooks_and_newer_schema() -> None:
    """Different playbook hashes do not merge; a newer report format is refused with a hint."""
    a = FleetReport(RunInfo("a", "p", playbook_sha256="1" * 64), FleetAggregate())
    b = FleetReport(RunInfo("b", "p", playbook_sha256="2" * 64), FleetAggregate())
    with pytest.raises(InputError, match="different playbooks"):
        a.merge(b)
    data = a.to_json()
    data["schema"] = 99
    with pytest.raises(InputError, match="newer"):
        FleetReport.from_json(data)


def test_event_sample_is_first_n_plus_a_spread_reservoir() -> None:
    """10k events from one host: the first 20 in order, 20 more drawn from the rest, nothing else kept."""
    agg = FleetAggregate()
    s = TraceStream("h", {"e": "e"}, aggregate=agg)
    s.feed("".join(f"  c-{i % 90 + 1} [000] ..... {1 + i * 1e-5:.6f}: e: i={i}\n" for i in range(10_000)).encode())
    s.close()
    agg.finish()
    sample = agg.hosts["h"].sample
    assert sample.seen == 10_000
    assert [e["fields"]["i"] for e in sample.first] == list(range(20))
    picked = sorted(e["fields"]["i"] for e in sample.reservoir)
    assert len(picked) == 20 and len(set(picked)) == 20 and picked[0] >= 20
    # Algorithm L over 9980 candidates: the picks spread over the stream, not bunched at the start.
    assert picked[-1] > 5_000 and sum(picked) / 20 > 2_500


def test_absorb_host_equals_merged_with_a_one_host_table() -> None:
    """The fold's in-place absorb gives what merged() of a per-host copy gave, prunes included."""
    rng = random.Random(5)
    for _ in range(200):
        fleet_cap = rng.choice([4, 8, 40])
        a = TopValues(fleet_cap)
        b = TopValues(fleet_cap)
        for _host in range(rng.randint(1, 12)):
            part = TopValues(rng.choice([2, 6, 16]))
            for _ in range(rng.randint(0, 40)):
                part.add(rng.choice(["x", "y", 1, 2, 3, "z", 7, 8, 9, "w"]) if rng.random() < .7
                         else rng.randint(0, 100), rng.randint(1, 3))
            one_host = TopValues(part.cap, dict(part.counts), {v: 1 for v in part.counts}, part.error, part.total)
            a = a.merged(one_host)
            a.cap = fleet_cap
            if len(a.counts) > a.cap:
                a.prune(a.cap // 2)
            b.absorb_host(part, fleet_cap)
            assert (b.counts, b.hosts, b.error, b.total, b.cap) == (a.counts, a.hosts, a.error, a.total, a.cap)
