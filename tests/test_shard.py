"""Shards: a stable split of the fleet by host name, and merged shard reports equal one run over the fleet."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetprobe.render.safe import SafeConsole

from fleetprobe.cli.main import main
from fleetprobe.errors import InputError
from fleetprobe.inventory import Host, Inventory
from fleetprobe.results import load_json, write_json
from fleetprobe.shard import Shard, merge_files, parse_shard, shard_inventory, shard_of
from reports import build_report, extra_exec, host_text, real_lines

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12)


def test_parse_shard() -> None:
    assert parse_shard("2/3") == Shard(2, 3)
    assert parse_shard(" 1 / 1 ") == Shard(1, 1)
    for bad in ("0/3", "4/3", "3", "a/b", "1/0", "-1/2"):
        with pytest.raises(InputError, match="is not i/N"):
            parse_shard(bad)


def test_shard_of_is_sha256_of_the_name() -> None:
    """Every bastion must compute the same split: the hash is SHA-256, not Python's per-process hash()."""
    for name in ("web-01", "db-07.example.com", "ä"):
        want = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 5 + 1
        assert shard_of(name, 5) == want


@given(st.lists(NAMES, unique=True, max_size=60), st.integers(1, 9))
def test_shards_partition_the_inventory(names: list[str], n: int) -> None:
    inv = Inventory(tuple(Host(x, x) for x in names), {"all": tuple(names)}, "inv.yml")
    parts = [shard_inventory(inv, Shard(i, n)) for i in range(1, n + 1)]
    seen = [h.name for p in parts for h in p.hosts]
    assert sorted(seen) == sorted(names)
    for p in parts:  # inventory order and groups are kept within a shard
        assert [h.name for h in p.hosts] == [x for x in names if x in {h.name for h in p.hosts}]
        assert set(p.groups["all"]) == {h.name for h in p.hosts}


HOSTS = st.dictionaries(NAMES, st.tuples(st.floats(0, 50), st.sampled_from(["ok", "ok", "ok", "unreachable"]),
                                         st.lists(st.sampled_from(["insmod", "modprobe", "cron"]), max_size=4)),
                        min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(HOSTS, st.integers(1, 5))
def test_merged_shard_reports_equal_one_run(tmp_path: Path, hosts: dict[str, tuple[float, str, list[str]]],
                                            n: int) -> None:
    """fleetprobe merge of every shard's JSON report == the report of one run over the whole fleet."""
    lines = real_lines()
    texts, statuses = {}, {}
    for name, (shift, status, extra) in hosts.items():
        statuses[name] = status
        if status == "ok":
            texts[name] = host_text(lines, shift, 1795655000.0 + shift) + "".join(
                extra_exec(c, f"/usr/sbin/{c}", 120.0 + shift + i) for i, c in enumerate(extra))
    whole = build_report(texts, statuses=statuses, run_id="whole")
    paths = []
    for i in range(1, n + 1):
        mine = {h for h in hosts if shard_of(h, n) == i}
        if not mine:
            continue
        part = build_report({h: t for h, t in texts.items() if h in mine},
                            statuses={h: s for h, s in statuses.items() if h in mine}, run_id=f"s{i}")
        path = tmp_path / f"shard{i}-{n}-{len(hosts)}.json"
        write_json(part, path)
        paths.append(path)
    merged = merge_files(paths)
    assert merged.aggregate == whole.aggregate
    assert [o.to_json() for o in merged.hosts] == [o.to_json() for o in whole.hosts]
    assert sorted(merged.run.shards) == (sorted(f"s{i}" for i in range(1, n + 1) if any(
        shard_of(h, n) == i for h in hosts)) if len(paths) > 1 else [])


def test_merge_command_writes_the_merged_report(tmp_path: Path) -> None:
    lines = real_lines()
    a = build_report({"web-1": host_text(lines, 0, 1795655000.0)}, run_id="sa")
    b = build_report({"web-2": host_text(lines, 2, 1795655002.0) + extra_exec("insmod", "/sbin/insmod", 130.0)},
                     run_id="sb", started=1795655001.0)
    write_json(a, tmp_path / "a.json")
    write_json(b, tmp_path / "b.json")
    out = tmp_path / "merged.json"
    console = SafeConsole(record=True, width=120)
    rc = main(["merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(out),
               "--html", str(tmp_path / "m.html"), "--markdown", str(tmp_path / "m.md")], console)
    assert rc == 0, console.export_text()
    merged = load_json(out)
    assert [o.host for o in merged.hosts] == ["web-1", "web-2"]
    assert merged.aggregate.hits("exec") == {"web-1": a.aggregate.total_hits("exec"),
                                             "web-2": b.aggregate.total_hits("exec")}
    assert merged.run.shards == ["sa", "sb"]
    assert "insmod" in (tmp_path / "m.md").read_text() and "web-2" in (tmp_path / "m.html").read_text()
    # The same shard twice is refused, naming the files.
    console = SafeConsole(record=True, width=200)
    rc = main(["merge", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "-o", str(out)], console)
    assert rc == 1
    text = console.export_text()
    assert "appear in both" in text and "a.json" in text


def test_merge_names_a_file_that_is_not_a_report(tmp_path: Path) -> None:
    bad = tmp_path / "notes.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(InputError) as info:
        merge_files([bad])
    assert str(bad) in str(info.value) and "not a fleetprobe JSON report" in str(info.value)
