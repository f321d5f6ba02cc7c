"""Playbook loading and validation, from the shipped playbooks and the data files in tests/data/playbooks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fleetprobe.errors import PlaybookError
from fleetprobe.fetchargs import ArgRef, Deref, RawFetch, RetvalRef, parse_arg
from fleetprobe.playbook import KernelTarget, UserTarget, load_playbook, parse_playbook

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "playbooks").glob("*.yml"))
BAD = sorted((Path(__file__).parent / "data" / "playbooks" / "bad").glob("*.yml"))
GOOD = Path(__file__).parent / "data" / "playbooks" / "good"
_EXPECT = re.compile(r'# expect: line=(\d+) key=(\S*) message="(.*)"')


def test_there_are_enough_shipped_playbooks() -> None:
    # Issue 17: a library an SRE reaches for, at least 30 questions.
    assert len(SHIPPED) >= 30


def _readme_table(heading: str) -> dict[str, list[str]]:
    """The rows of the first table after ``heading`` in playbooks/README.md: first cell -> the others."""
    text = (ROOT / "playbooks" / "README.md").read_text()
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if in_table and not set(cells[0]) <= set("-"):
                assert cells[0] not in rows, f"README: {cells[0]} listed twice"
                rows[cells[0]] = cells[1:]
            in_table = True
        elif in_table:
            break
    return rows


def test_readme_lists_every_shipped_playbook() -> None:
    rows = _readme_table("# Playbooks")
    assert set(rows) == {p.stem for p in SHIPPED}
    for path in SHIPPED:
        pb = load_playbook(path)
        ruled = [p.name for p in pb.probes if p.expect == "none" or p.max_per_host is not None]
        # The rule column says there is a rule exactly when the playbook has one.
        assert bool(rows[path.stem][2]) == bool(ruled), (path.stem, ruled, rows[path.stem])


def test_readme_maps_every_bpftrace_tool() -> None:
    """Every tool of bpftrace's tools/ folder: the playbook answering it, or why none can."""
    tools = [t for t in (Path(__file__).parent / "data" / "bpftrace-tools.txt").read_text().splitlines()
             if t and not t.startswith("#")]
    assert len(tools) >= 35
    rows = _readme_table("## bpftrace's tools")
    assert set(rows) == set(tools)
    shipped = {p.stem for p in SHIPPED}
    for tool, (answer, note) in rows.items():
        name = answer.split(" ", 1)[0]
        assert name in shipped | {"none"}, (tool, answer)
        assert note, f"{tool}: no note"
        if name == "none" or "nearest" in answer:
            # No equivalent: the line says why ("no: ...") and, where one helps, the nearest playbook.
            assert note.startswith("no: "), (tool, note)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_playbook_loads_and_describes_itself(path: Path) -> None:
    pb = load_playbook(path)
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    # bcc-style self-description: what it answers, kernels, overhead, example output.
    assert len(header) >= 8, f"{path.name}: header comment too short"
    joined = "\n".join(header).lower()
    for word in ("kernels", "overhead", "example"):
        assert word in joined, f"{path.name}: header says nothing about {word}"
    assert pb.name == path.stem
    assert pb.description
    assert pb.sha256 and len(pb.sha256) == 64


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_playbook_error_names_file_line_and_key(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    m = _EXPECT.fullmatch(first)
    assert m, f"{path.name}: first line must be a '# expect:' comment"
    line, key, message = int(m.group(1)), m.group(2), m.group(3)
    with pytest.raises(PlaybookError) as info:
        load_playbook(path)
    err = info.value
    assert err.file == str(path)
    assert err.line == line, str(err)
    assert (err.key or "") == key, str(err)
    assert message in err.message, str(err)
    assert f"{path}:{line}" in str(err)


def test_bad_data_covers_many_errors() -> None:
    assert len(BAD) >= 30


def test_opensnoop_parsed_fields() -> None:
    pb = load_playbook(ROOT / "playbooks" / "opensnoop.yml")
    assert pb.duration == 10.0
    assert pb.event_cap == 100_000
    assert pb.allow_modules is False
    open_, ret = pb.probes
    assert open_.kind == "kprobe" and ret.kind == "kretprobe"
    assert open_.targets == (KernelTarget("do_filp_open"),)
    assert ret.targets == (KernelTarget("do_sys_openat2"), KernelTarget("do_sys_open"))
    path = next(a for a in open_.args if a.name == "path")
    assert path.fetch == Deref(0, False, Deref(0, False, ArgRef(2))) and path.type == "string"
    assert ret.pair_with == "open" and ret.is_return and not open_.is_return
    assert ret.args[0].fetch == RetvalRef()
    text = (ROOT / "playbooks" / "opensnoop.yml").read_text()
    assert open_.line == text.splitlines().index("  - name: open") + 1


def test_inventory_methods_on_kitchen_sink() -> None:
    pb = load_playbook(GOOD / "kitchen-sink.yml")
    assert pb.duration == 0.5
    assert pb.event_cap == 5000
    assert pb.kernel_symbols() == ["do_sys_openat2", "do_sys_open", "__x64_sys_setuid", "__arm64_sys_setuid",
                                   "__sys_setuid", "no_such_function_anywhere"]
    assert pb.tracepoints() == ["sched/sched_process_exec"]
    assert pb.user_binaries() == ["/bin/bash", "/usr/bin/bash"]
    assert pb.uprobe_targets() == [("/bin/bash", "readline"), ("/usr/bin/bash", "readline")]
    assert pb.modules() == []
    assert not pb.needs_module_consent()
    inside = pb.probe("inside")
    assert inside.targets == (KernelTarget("do_sys_open", 0x10),)
    at = pb.probe("at_offset")
    assert at.targets == (UserTarget("/bin/bash", None, 0x1000),)
    custom = pb.probe("custom")
    assert custom.kind == "raw" and custom.raw_fields == ("dfd", "arg2")
    assert custom.targets == (KernelTarget("do_sys_openat2"),)
    assert pb.probe("fail_hard").on_missing == "fail"


def test_module_playbook_resolves_module_dir_from_repository_root() -> None:
    pb = load_playbook(ROOT / "playbooks" / "fork-module.yml")
    assert pb.needs_module_consent()
    (mod,) = pb.modules()
    assert mod.module == "modules/fp_kprobe"
    assert mod.module_path == str(ROOT / "modules" / "fp_kprobe")
    pb.check_module_dirs()
    assert pb.kernel_symbols() == ["kernel_clone", "_do_fork", "do_fork"]


def test_missing_module_dir_is_reported_with_line(tmp_path: Path) -> None:
    f = tmp_path / "m.yml"
    f.write_text("name: m\nallow_modules: true\nprobes:\n  - name: x\n    module: modules/nowhere\n")
    pb = load_playbook(f)
    with pytest.raises(PlaybookError) as info:
        pb.check_module_dirs()
    assert info.value.line == 4 and "modules/nowhere" in info.value.message


def test_module_dir_next_to_playbook_wins(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    f = tmp_path / "m.yml"
    f.write_text("name: m\nprobes:\n  - name: x\n    module: mine\n    params: {symbol: kernel_clone, n: 3}\n")
    mod = load_playbook(f).modules()[0]
    assert mod.module_path == str(tmp_path / "mine")
    assert [(p.name, p.value, p.alternatives) for p in mod.params] == [
        ("symbol", None, ("kernel_clone",)), ("n", "3", ())]


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0),
                                          ("7", 7.0), ("2.5", 2.5), ("1.5s", 1.5)])
def test_duration_forms(text: str, seconds: float) -> None:
    pb = parse_playbook(f"name: d\nduration: {text}\nprobes: [{{name: e, tracepoint: a/b}}]\n", "d.yml")
    assert pb.duration == seconds


def test_defaults() -> None:
    pb = parse_playbook("name: d\nprobes: [{name: e, tracepoint: a/b}]\n", "d.yml")
    assert (pb.duration, pb.event_cap, pb.allow_modules, pb.description) == (10.0, 100_000, False, "")
    assert pb.probes[0].on_missing == "skip" and pb.probes[0].expect == "any"


def test_empty_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(PlaybookError, match="playbook is empty"):
        parse_playbook("", "e.yml")
    with pytest.raises(PlaybookError, match="cannot read playbook") as info:
        load_playbook(tmp_path / "absent.yml")
    assert info.value.file == str(tmp_path / "absent.yml")


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(PlaybookError, match="must be a mapping") as info:
        parse_playbook("- a\n- b\n", "l.yml")
    assert info.value.line == 1


def test_sha256_changes_with_text() -> None:
    a = parse_playbook("name: d\nprobes: [{name: e, tracepoint: a/b}]\n", "d.yml")
    b = parse_playbook("name: d\nprobes: [{name: e, tracepoint: a/c}]\n", "d.yml")
    assert a.sha256 != b.sha256


@pytest.mark.parametrize("text,fetch,type_", [
    ("arg1", ArgRef(1), None),
    ("retval:s32", RetvalRef(), "s32"),
    ("+0(arg2):ustring", Deref(0, False, ArgRef(2)), "ustring"),
    ("+u16(arg3):string", Deref(16, True, ArgRef(3)), "string"),
    ("-8(+0x10(arg1)):x64", Deref(-8, False, Deref(16, False, ArgRef(1))), "x64"),
    ("%di", RawFetch("%di"), None),
    ("$comm", RawFetch("$comm"), None),
    ("$stack0:u64", RawFetch("$stack0"), "u64"),
    ("@jiffies", RawFetch("@jiffies"), None),
    ("+8(%si):string", Deref(8, False, RawFetch("%si")), "string"),
    ("+0(arg1):u8[16]", Deref(0, False, ArgRef(1)), "u8[16]"),
    ("+0(arg1):b4@4/8", Deref(0, False, ArgRef(1)), "b4@4/8"),
    ("arg1:symbol", ArgRef(1), "symbol"),
])
def test_parse_arg(text: str, fetch: object, type_: str | None) -> None:
    spec = parse_arg("x", text)
    assert spec.fetch == fetch
    assert spec.type == type_


@pytest.mark.parametrize("text,message", [
    ("arg1:string", "reads memory"),
    ("arg2:u8[4]", "reads memory"),
    ("+0(arg1", "unbalanced parentheses"),
    ("+0(arg1):u8[65]", "must be 1..64"),
    ("argv", "is not a fetch arg"),
    ("+0(arg1):strng", "did you mean 'string'"),
])
def test_parse_arg_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_arg("x", text)


def test_audit_doc_lists_every_shipped_rule() -> None:
    """docs/audit.md's table of the shipped rules is the rules the shipped playbooks carry."""
    text = (ROOT / "docs" / "audit.md").read_text()
    section = text[text.index("## The shipped playbooks' rules"):]
    section = section[:section.index("\n## ", 3)]
    documented: set[tuple[str, str, str]] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("playbook", "") or set(cells[0]) <= set("-"):
            continue
        for probe in re.findall(r"`(\w+)`(?: \(|,|$)", cells[1]):
            documented.add((cells[0], probe, cells[2].split("`")[1] if "`" in cells[2] else cells[2]))
    shipped = set()
    for path in SHIPPED:
        for p in load_playbook(path).probes:
            if p.expect == "none":
                shipped.add((path.stem, p.name, "expect: none"))
            elif p.max_per_host is not None:
                shipped.add((path.stem, p.name, f"max_per_host: {p.max_per_host}"))
    assert len(shipped) >= 7 and documented == shipped, (documented ^ shipped)
