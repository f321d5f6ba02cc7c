"""Planning: every shipped playbook against every stored host's facts, and per-arch lowering."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from fleetprobe.facts import Facts, FileFacts, SymbolFacts
from fleetprobe.plan import (
    HostPlan,
    mips_kprobe_oops,
    group_of_instance,
    is_fleetprobe_group,
    is_stale_instance,
    names_for,
    new_run_id,
    plan_host,
    with_later_deadline,
)
from fleetprobe.playbook import Playbook, load_playbook, parse_playbook

ROOT = Path(__file__).resolve().parent.parent
FACTS_DIR = Path(__file__).parent / "data" / "facts"
FACTS_FILES = sorted(FACTS_DIR.glob("*.json"))
SHIPPED = sorted((ROOT / "playbooks").glob("*.yml"))
GOOD = Path(__file__).parent / "data" / "playbooks" / "good"
DEADLINE = 1_900_000_000
BASH_OFFSETS: dict[tuple[str, str], int | str] = {("/bin/bash", "readline"): 0xC6C20,
                                                  ("/usr/bin/bash", "readline"): 0xC6C20}


def facts(name: str) -> Facts:
    """Stored facts by file stem."""
    return Facts.from_json(json.loads((FACTS_DIR / f"{name}.json").read_text()))


def plan(pb: Playbook | str, f: Facts | str, offsets: dict[tuple[str, str], int | str] | None = None) -> HostPlan:
    """Plan a shipped playbook (by stem) or a Playbook for stored facts (by stem)."""
    playbook = load_playbook(ROOT / "playbooks" / f"{pb}.yml") if isinstance(pb, str) else pb
    host = facts(f) if isinstance(f, str) else f
    return plan_host(playbook, host, run_id="k3x9q2", deadline=DEADLINE,
                     uprobe_offsets=BASH_OFFSETS if offsets is None else offsets)


def definition(hp: HostPlan, probe: str) -> str:
    """The definition line planned for one probe (fails the test if it was skipped)."""
    for p in hp.probes:
        if p.name == probe:
            assert p.definition is not None
            return p.definition
    raise AssertionError(f"{probe} not placed: {hp.skipped} {hp.notes}")


def skipped(hp: HostPlan, probe: str) -> str:
    """The reason a probe was skipped (fails the test if it was placed)."""
    for s in hp.skipped:
        if s.name == probe:
            return s.reason
    raise AssertionError(f"{probe} was placed: {hp.probes}")


def test_stored_facts_cover_the_lab_arches() -> None:
    arches = {facts(p.stem).arch for p in FACTS_FILES}
    assert {"x86_64", "ppc64le", "mips64", "mips", "aarch64", "i686"} <= arches


@pytest.mark.parametrize("facts_file", FACTS_FILES, ids=lambda p: p.stem)
def test_stored_facts_round_trip(facts_file: Path) -> None:
    data = json.loads(facts_file.read_text())
    assert Facts.from_json(data).to_json() == data


@pytest.mark.parametrize("facts_file", FACTS_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("playbook", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_playbook_plans_on_every_host(playbook: Path, facts_file: Path) -> None:
    pb = load_playbook(playbook)
    f = Facts.from_json(json.loads(facts_file.read_text()))
    hp = plan_host(pb, f, run_id="k3x9q2", deadline=DEADLINE, uprobe_offsets=BASH_OFFSETS)
    assert hp.host == f.host
    decided = {p.name for p in hp.probes} | {s.name for s in hp.skipped}
    assert decided == {p.name for p in pb.probes}
    assert not {p.name for p in hp.probes} & {s.name for s in hp.skipped}
    for s in hp.skipped:
        assert s.reason.strip(), f"{s.name} skipped without a reason"
        if facts_file.stem in LAB_FACTS:
            # A lab kernel's facts were captured for every shipped playbook: a skip there is the
            # kernel's answer (no such symbol, tracepoint or binary), never "not checked".
            assert "facts lack it" not in s.reason, (facts_file.stem, s.name, s.reason)
    for p in hp.probes:
        if p.kind in ("kprobe", "kretprobe", "uprobe", "uretprobe", "raw"):
            assert p.definition and p.events_file in ("kprobe_events", "uprobe_events")
            # Definition: TYPE:GROUP/EVENT PLACE [ARGS]; group and event are fleetprobe's own.
            assert re.match(rf"[pr]\d*:{hp.group}/{p.name} \S+", p.definition), p.definition
            assert p.event == f"{hp.group}/{p.name}"
            # Portable names never reach the kernel.
            assert not re.search(r"(?<![$\w])(arg\d|retval)", p.definition.split(" ", 2)[-1]
                                 if p.definition.count(" ") >= 2 else ""), p.definition
        elif p.kind == "tracepoint":
            assert p.definition is None and "/" in p.event
        else:
            assert p.kind == "module" and p.module and p.symbol


#: Facts captured from a real lab guest of every (arch, kernel line) Debian serves for it
#: (tests/lab/capture_facts.py): bullseye's 5.10 (only amd64 and arm64 are still served),
#: bookworm's 6.1, trixie's 6.12 (bookworm-backports' for mips64el; none for mipsel).
LAB_PAIRS = {"x86_64": ("5.10", "6.1", "6.12"), "arm64": ("5.10", "6.1", "6.12"), "ppc64le": ("6.1", "6.12"),
             "mips64el": ("6.1", "6.12"), "mipsel": ("6.1",)}
LAB_FACTS = sorted(f"lab-{arch}-{line}" for arch, lines in LAB_PAIRS.items() for line in lines)
#: Where the second argument lands when the README lists no $arg<N>.
SECOND_ARG_REGISTER = {"ppc64le": "%r4", "mips64": "%r5", "mips": "%r5", "x86_64": "%si", "aarch64": "%x1"}


def _shipped_targets() -> list[tuple[str, str, str]]:
    """(playbook, kind, target) for every symbol, tracepoint and uprobe binary a shipped playbook names."""
    out = []
    for path in SHIPPED:
        pb = load_playbook(path)
        out += [(path.stem, "symbol", s) for s in pb.kernel_symbols()]
        out += [(path.stem, "tracepoint", t) for t in pb.tracepoints()]
        out += [(path.stem, "file", b) for b in pb.user_binaries()]
    return out


@pytest.mark.parametrize("name", LAB_FACTS)
def test_lab_facts_checked_every_target_of_every_shipped_playbook(name: str) -> None:
    """Each lab kernel's facts say, for every symbol, tracepoint and binary any shipped playbook names, if it has it."""
    f = facts(name)
    known = {"symbol": f.symbols, "tracepoint": f.tracepoints, "file": f.files}
    unchecked = [(book, kind, target) for book, kind, target in _shipped_targets() if target not in known[kind]]
    assert not unchecked, f"{name}: {len(unchecked)} targets not in the facts, e.g. {unchecked[:5]}"


def test_lab_facts_cover_every_arch_and_kernel_line() -> None:
    """One stored file per (arch, line), each really of that line and arch, from a lab guest."""
    stems = {p.stem for p in FACTS_FILES}
    assert set(LAB_FACTS) <= stems, set(LAB_FACTS) - stems
    uname = {"x86_64": "x86_64", "arm64": "aarch64", "ppc64le": "ppc64le", "mips64el": "mips64", "mipsel": "mips"}
    for name in LAB_FACTS:
        f = facts(name)
        arch, line = name.removeprefix("lab-").rsplit("-", 1)
        assert f.host == f"{name}-1" and f.arch == uname[arch], name
        version = f.kernel_version.split(" Debian ", 1)[1]
        assert version.startswith(line + "."), (name, f.kernel_version)
        assert f.kprobe_events and f.kprobes_enabled and not f.problems, name


@pytest.mark.parametrize("name", LAB_FACTS)
def test_opensnoop_argn_follows_each_lab_kernels_readme(name: str) -> None:
    """$arg2 where the guest's README listed $arg<N>, else the arch's register: per (arch, line).

    The guests' facts were captured when opensnoop probed do_sys_openat2 (checked on each of
    them); opensnoop now reads do_filp_open's kernel copy of the path, so the lowering is checked
    on the same user-pointer fetch of do_sys_openat2 those facts cover.
    """
    f = facts(name)
    pb = parse_playbook("name: argn\nprobes:\n  - name: open\n    kprobe: do_sys_openat2\n"
                        "    args: {path: '+0(arg2):ustring'}\n", "argn.yml")
    hp = plan(pb, f)
    if mips_kprobe_oops(f):
        # mipsel's 4kc-malta kernel cannot offload RCU callbacks: kprobes would oops it (issue 9).
        (skip,) = hp.skipped
        assert "kprobes oops this MIPS kernel" in skip.reason, skip
        return
    want = "$arg2" if "arg_n" in f.features else SECOND_ARG_REGISTER[f.arch]
    assert f"path=+0({want}):ustring" in definition(hp, "open"), (name, definition(hp, "open"))


# --- per-arch lowering -------------------------------------------------------

def test_opensnoop_x86_64_61_uses_argn() -> None:
    hp = plan("opensnoop", "x86_64-debian-6.1")
    # The name from the kernel's own copy (struct filename's first member), never the user's pointer.
    assert definition(hp, "open") == (f"p:{hp.group}/open do_filp_open dfd=$arg1:s32 path=+0(+0($arg2)):string")
    assert definition(hp, "open_ret") == f"r:{hp.group}/open_ret do_sys_openat2 ret=$retval:s32"
    assert hp.notes == ("open_ret: pairs do_filp_open (entry) with do_sys_openat2 (return): different functions",)


def test_opensnoop_ppc64le_uses_r3_r4() -> None:
    hp = plan("opensnoop", "ppc64le-6.1")
    assert definition(hp, "open").endswith("do_filp_open dfd=%r3:s32 path=+0(+0(%r4)):string")


def test_opensnoop_mips64_uses_r4_r5() -> None:
    hp = plan("opensnoop", "mips64el-6.1")
    assert definition(hp, "open").endswith("do_filp_open dfd=%r4:s32 path=+0(+0(%r5)):string")


def test_opensnoop_old_x86_picks_do_sys_open_for_the_result() -> None:
    hp = plan("opensnoop", "x86_64-4.19")
    assert definition(hp, "open").endswith("do_filp_open dfd=%di:s32 path=+0(+0(%si)):string")
    assert definition(hp, "open_ret").endswith("do_sys_open ret=$retval:s32")


def test_fork_alternatives_follow_the_kernel() -> None:
    assert plan("forklat", "x86_64-4.19").probes[0].symbol == "_do_fork"
    assert plan("forklat", "x86_64-debian-6.1").probes[0].symbol == "kernel_clone"
    assert plan("fork-module", "x86_64-4.19").probes[0].params == (("symbol", "_do_fork"),)


def mipsel_probed() -> Facts:
    """The stored mipsel host as if its RCU callbacks were offloaded: the stored one refuses kprobes
    (its kernel oopses on them, see test_mips_kernel_that_oopses_on_kprobes_gets_none), and these
    tests are about register lowering."""
    return dataclasses.replace(facts("mipsel-6.1"), rcu_offloaded_cpus=frozenset({0}))


def test_creds_setuid_per_arch() -> None:
    assert definition(plan("creds", "x86_64-debian-6.1"), "setuid").endswith("__sys_setuid uid=$arg1:u32")
    assert definition(plan("creds", mipsel_probed()), "cap_admin").endswith("cap_capable cap=%r6:s32")
    assert definition(plan("creds", "x86_64-4.19"), "cap_admin").endswith("cap_capable cap=%dx:s32")


def test_kitchen_sink_x86_64() -> None:
    pb = load_playbook(GOOD / "kitchen-sink.yml")
    hp = plan(pb, "x86_64-debian-6.1")
    g = hp.group
    assert definition(hp, "open") == (
        f"p:{g}/open do_sys_openat2 dfd=$arg1:s32 path=+0($arg2):ustring upath=+u0($arg2):string "
        "flags=$arg3:x32 comm=$comm nested=+8(+0($arg1)):u64 bits=+0($arg1):b3@2/8 arr=+0($arg2):u8[4]")
    # x86_64 syscall wrapper: argN lives in the pt_regs that %di points to.
    assert definition(hp, "setuid") == f"p:{g}/setuid __x64_sys_setuid uid=+112(%di):u32 sixth=+64(%di)"
    # Inside a function $argN is not valid: registers, with a note.
    assert definition(hp, "inside") == f"p:{g}/inside do_sys_open+0x10 dfd=%di:s32"
    assert any(n.startswith("inside: arg1 read from a register") for n in hp.notes)
    # With $argN the kernel reads any argument (registers, then stack): arg9 is fine.
    assert definition(hp, "ninth") == f"p:{g}/ninth do_sys_openat2 a9=$arg9"
    assert definition(hp, "line") == f"r:{g}/line /bin/bash:0xc6c20 line=+0($retval):ustring"
    assert definition(hp, "at_offset") == f"p:{g}/at_offset /bin/bash:0x1000 a1=%di a2=%si:s64"
    assert definition(hp, "custom") == f"p:{g}/custom do_sys_openat2 dfd=%di +0(%si):string"
    exec_ = next(p for p in hp.probes if p.name == "exec")
    assert (exec_.event, exec_.trace_name) == ("sched/sched_process_exec", "sched_process_exec")
    assert next(p for p in hp.probes if p.name == "open").filter == "dfd != 5"
    custom = next(p for p in hp.probes if p.name == "custom")
    assert custom.fields == ("dfd", "arg2")
    reason = skipped(hp, "fail_hard")
    assert "no_such_function_anywhere was not checked" in reason
    assert hp.failed is not None and "fail_hard" in hp.failed


def test_kitchen_sink_symstr_falls_back_to_symbol_before_62() -> None:
    pb = load_playbook(GOOD / "kitchen-sink.yml")
    hp = plan(pb, "x86_64-debian-6.1")
    assert definition(hp, "open_ret").endswith("ret=$retval:s32 sym=$retval:symbol")
    assert any("symstr unsupported" in n for n in hp.notes)
    # 6.18 has symstr, but no kprobe_events: check the lowering with kprobes switched on.
    new = dataclasses.replace(facts("x86_64-6.18-controller"), kprobe_events=True)
    assert definition(plan(pb, new), "open_ret").endswith("ret=$retval:s32 sym=$retval:symstr")


def test_symstr_follows_the_real_debian_readmes() -> None:
    """Facts captured from the lab's guests: bullseye's 5.10 has no symstr, bookworm's 6.1 and trixie's 6.12 do."""
    pb = load_playbook(GOOD / "kitchen-sink.yml")
    old = plan(pb, "lab-x86_64-5.10")
    assert definition(old, "open_ret").endswith("sym=$retval:symbol")
    assert any("symstr unsupported on 5.10.0-46-amd64 (not in its tracefs README)" in n for n in old.notes)
    for name in ("lab-x86_64-6.1", "lab-x86_64-6.12", "lab-arm64-6.1", "lab-arm64-6.12"):
        assert definition(plan(pb, name), "open_ret").endswith("sym=$retval:symstr"), name


def test_kitchen_sink_4_19_drops_user_deref() -> None:
    hp = plan(load_playbook(GOOD / "kitchen-sink.yml"), "x86_64-4.19")
    assert "upath=+0(%si):string" in definition(hp, "open")
    assert any("+u (user memory) unsupported" in n for n in hp.notes)


def test_kitchen_sink_i686() -> None:
    hp = plan(load_playbook(GOOD / "kitchen-sink.yml"), "i686-6.1")
    # Kernel entry has $argN on x86-32; user space is cdecl: arguments on the stack.
    assert definition(hp, "at_offset").endswith("/bin/bash:0x1000 a1=$stack1 a2=$stack2:s64")
    assert definition(hp, "inside").endswith("do_sys_open+0x10 dfd=%ax:s32")


def test_kitchen_sink_mips_o32_and_n64() -> None:
    pb = load_playbook(GOOD / "kitchen-sink.yml")
    o32 = plan(pb, mipsel_probed())
    n64 = plan(pb, "mips64el-6.1")
    # o32 has 4 argument registers: arg9 cannot be placed; n64 has 8: neither can arg9.
    assert "arg9 is not passed in a register on mips (only 4: %r4 %r5 %r6 %r7)" in skipped(o32, "ninth")
    assert "only 8" in skipped(n64, "ninth")
    assert "flags=%r6:x32" in definition(o32, "open")


def test_kitchen_sink_aarch64_syscall_wrapper() -> None:
    hp = plan(load_playbook(GOOD / "kitchen-sink.yml"), "aarch64-6.1")
    assert definition(hp, "setuid").endswith("__arm64_sys_setuid uid=+0(%x0):u32 sixth=+40(%x0)")


def test_kitchen_sink_ppc64le_uprobe_registers() -> None:
    f = dataclasses.replace(facts("ppc64le-6.1"),
                            files={"/bin/bash": FileFacts("/bin/bash", True, 10, "x"),
                                   "/usr/bin/bash": FileFacts("/usr/bin/bash", False)})
    hp = plan(load_playbook(GOOD / "kitchen-sink.yml"), f)
    assert definition(hp, "at_offset").endswith("/bin/bash:0x1000 a1=%r3 a2=%r4:s64")


def test_controller_facts_skip_kprobes_but_keep_tracepoints_and_uprobes() -> None:
    hp = plan("execsnoop", "x86_64-6.18-controller")
    assert [p.name for p in hp.probes] == ["exec"]
    assert "no kprobe_events" in skipped(hp, "fork")
    assert definition(plan("bashreadline", "x86_64-6.18-controller"), "line").endswith("ustring")
    assert "module/module_load does not exist" in skipped(plan("modload", "x86_64-6.18-controller"), "load")


# --- symbol choice -------------------------------------------------------------

def _symbols(**entries: SymbolFacts) -> dict[str, SymbolFacts]:
    return dict(entries)


def test_none_probeable_lists_each_alternatives_reason() -> None:
    f = dataclasses.replace(facts("x86_64-debian-6.1"), symbols=_symbols(
        kernel_clone=SymbolFacts("kernel_clone", True, True, blacklisted=True),
        _do_fork=SymbolFacts("_do_fork", False, False, False),
        do_fork=SymbolFacts("do_fork", False, False, False)))
    reason = skipped(plan("forklat", f), "fork")
    assert reason.startswith("none of kernel_clone, _do_fork, do_fork is probeable")
    assert "kernel_clone is in the kprobe blacklist" in reason
    assert "_do_fork is not in available_filter_functions or kallsyms" in reason


def test_gcc_clone_is_used_when_it_is_the_only_hit() -> None:
    f = dataclasses.replace(facts("x86_64-debian-6.1"), symbols=_symbols(
        oom_kill_process=SymbolFacts("oom_kill_process", False, False, False, clones=("oom_kill_process.isra.0",))))
    hp = plan("oomkill", f)
    oom = next(p for p in hp.probes if p.name == "oom")
    assert oom.symbol == "oom_kill_process.isra.0"
    assert oom.definition == f"p:{hp.group}/oom oom_kill_process.isra.0 message=+0($arg2):string"
    assert oom.trace_name == "oom"
    assert any("GCC clone oom_kill_process.isra.0" in n and "argument layout" in n for n in hp.notes)


def test_on_missing_fail_fails_the_host_plan() -> None:
    pb = parse_playbook("name: t\nprobes:\n  - name: fork\n    kprobe: [kernel_clone, _do_fork]\n"
                        "    on_missing: fail\n", "t.yml")
    f = dataclasses.replace(facts("x86_64-debian-6.1"), symbols={})
    hp = plan(pb, f)
    assert hp.failed is not None and "fork" in hp.failed and "on_missing: fail" in hp.failed
    assert "kernel_clone was not checked on this host" in hp.failed


@pytest.mark.parametrize("change,reason", [
    ({"lockdown": "confidentiality"}, "lockdown is 'confidentiality'"),
    ({"tracefs": None}, "no tracefs found"),
    ({"instances": False}, "no instances/"),
    ({"kprobe_events": False}, "no kprobe_events"),
    ({"kprobes_enabled": False}, "kprobes are globally disabled"),
])
def test_host_conditions_skip_kprobes_with_reason(change: dict[str, object], reason: str) -> None:
    f = dataclasses.replace(facts("x86_64-debian-6.1"), **change)  # type: ignore[arg-type]
    assert reason in skipped(plan("opensnoop", f), "open")


def test_uprobe_unresolved_offset_reason_is_kept() -> None:
    hp = plan("bashreadline", "x86_64-debian-6.1",
              offsets={("/bin/bash", "readline"): "symbol 'readline' is not in .symtab or .dynsym",
                       ("/usr/bin/bash", "readline"): "the binary has no .symtab or .dynsym"})
    reason = skipped(hp, "line")
    assert "/bin/bash:readline: symbol 'readline' is not in .symtab" in reason
    assert "/usr/bin/bash:readline: the binary has no" in reason


def test_uprobe_falls_back_to_second_path() -> None:
    f = dataclasses.replace(facts("x86_64-debian-6.1"), files={
        "/bin/bash": FileFacts("/bin/bash", False), "/usr/bin/bash": FileFacts("/usr/bin/bash", True, 1, "m")})
    hp = plan("bashreadline", f)
    assert definition(hp, "line").endswith("/usr/bin/bash:0xc6c20 line=+0($retval):ustring")
    assert hp.probes[0].path == "/usr/bin/bash" and hp.probes[0].offset == 0xC6C20


@pytest.mark.parametrize("change,reason", [
    ({"modules_disabled": True}, "modules_disabled = 1"),
    ({"lockdown": "integrity"}, "only signed modules load"),
])
def test_module_probe_host_conditions(change: dict[str, object], reason: str) -> None:
    f = dataclasses.replace(facts("ppc64le-6.1"), **change)  # type: ignore[arg-type]
    assert reason in skipped(plan("fork-module", f), "fork")


def test_module_probe_plan() -> None:
    hp = plan(load_playbook(GOOD / "module.yml"), "mips64el-6.1")
    (p,) = hp.probes
    assert (p.kind, p.event, p.trace_name, p.symbol) == ("module", "", "fork", "kernel_clone")
    assert p.params == (("symbol", "kernel_clone"), ("post", "1"), ("offset", "0"))
    assert p.module == str(ROOT / "modules" / "fp_kprobe")


def test_pair_note_when_entry_is_skipped() -> None:
    pb = parse_playbook("name: t\nprobes:\n  - name: a\n    kprobe: nothere\n  - name: b\n    kretprobe: kernel_clone\n"
                        "    pair_with: a\n", "t.yml")
    hp = plan(pb, "x86_64-debian-6.1")
    assert any("no latency pairing" in n for n in hp.notes)


def test_plan_is_pure_and_deterministic() -> None:
    pb = load_playbook(GOOD / "kitchen-sink.yml")
    assert plan(pb, "ppc64le-6.1") == plan(pb, "ppc64le-6.1")


# --- names and staleness ------------------------------------------------------

def test_names_for() -> None:
    group, instance = names_for("k3x9q2", "db-07", 1_900_000_000)
    assert re.fullmatch(r"fp_k3x9q2_[0-9a-f]{4}", group)
    assert instance == f"{group}_1900000000"
    assert names_for("k3x9q2", "db-07", 1)[0] == group
    assert names_for("k3x9q2", "db-08", 1)[0] != group
    # Kernel limit on group and event names is MAX_EVENT_NAME_LEN (64).
    assert len(names_for("a" * 16, "h", 10**11)[0]) + 1 + 32 < 64


def test_deadline_moves_later_only_and_keeps_everything_else() -> None:
    hp = plan("execsnoop", FACTS_FILES[0].stem)
    later = with_later_deadline(hp, DEADLINE + 300.7)
    assert later.instance == f"{hp.group}_{DEADLINE + 300}" and is_stale_instance(later.instance, DEADLINE + 361, 60)
    assert not is_stale_instance(later.instance, DEADLINE + 359, 60)  # the old deadline would be stale here
    assert (later.group, later.probes, later.skipped, later.run_id) == (hp.group, hp.probes, hp.skipped, hp.run_id)
    assert group_of_instance(later.instance) == hp.group
    assert with_later_deadline(hp, DEADLINE - 5) is hp and with_later_deadline(hp, DEADLINE) is hp
    # The run reads its deadline and duration from the plan's fields, never back out of the name.
    assert (hp.deadline, later.deadline, later.duration) == (DEADLINE, DEADLINE + 300, hp.duration)


def test_plan_carries_duration_and_deadline() -> None:
    """The playbook's duration unless the run overrides it; the deadline it was planned with."""
    pb = load_playbook(ROOT / "playbooks" / "execsnoop.yml")
    host = facts(FACTS_FILES[0].stem)
    assert plan_host(pb, host, run_id="abc123", deadline=DEADLINE, uprobe_offsets={}).duration == pb.duration
    hp = plan_host(pb, host, run_id="abc123", deadline=DEADLINE, uprobe_offsets={}, duration=2.5)
    assert (hp.duration, hp.deadline) == (2.5, DEADLINE)


@pytest.mark.parametrize("bad", ["", "ABC", "a_b", "a" * 17, "a-b"])
def test_names_for_rejects_bad_run_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        names_for(bad, "h", 1)


def test_new_run_id_is_usable() -> None:
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50
    for r in ids:
        names_for(r, "h", 1)


def test_stale_instances() -> None:
    group, instance = names_for("k3x9q2", "db-07", 1000)
    assert group_of_instance(instance) == group
    assert is_fleetprobe_group(group)
    assert not is_fleetprobe_group(instance) and not is_fleetprobe_group("kprobes") and not is_fleetprobe_group("fp_x")
    assert not is_stale_instance(instance, now=1000, grace=60)
    assert not is_stale_instance(instance, now=1060, grace=60)
    assert is_stale_instance(instance, now=1061, grace=60)
    for foreign in ("fp_k3x9q2_zzzz_1000", "myinstance", "fp_x_1000", "fleetprobe_abc_1000", f"{instance}x"):
        assert group_of_instance(foreign) is None
        assert not is_stale_instance(foreign, now=10**12, grace=0)


# --- hosts where a kprobe is known to oops the kernel (README: Known kernel problem (MIPS)) ---

def _mips_hazard(name: str, *, ncpus: int = 1, offloaded: frozenset[int] = frozenset()) -> Facts:
    """Stored MIPS facts as a kernel with kprobe_flush_task reports them."""
    return dataclasses.replace(facts(name), kprobe_flush_task=True, ncpus=ncpus, rcu_offloaded_cpus=offloaded)


@pytest.mark.parametrize("name", ["mips64el-6.1", "mipsel-6.1"])
def test_mips_kernel_that_oopses_on_kprobes_gets_none(name: str) -> None:
    """kprobe events and kprobe modules are refused, with the reason and the way out; tracepoints stay."""
    f = _mips_hazard(name)
    hp = plan("opensnoop", f)
    for probe in ("open", "open_ret"):
        reason = skipped(hp, probe)
        assert "kprobes oops this MIPS kernel" in reason and f.kernel_release in reason, reason
        assert "rcu_nocbs=0" in reason and "CPU 0" in reason, reason
    assert "kprobes oops this MIPS kernel" in skipped(plan("fork-module", f), "fork")
    exec_plan = plan("execsnoop", f)
    assert [p.name for p in exec_plan.probes] == ["exec"], "the exec tracepoint is still placed"
    assert "kprobes oops this MIPS kernel" in skipped(exec_plan, "fork")


def test_mips_kernel_with_rcu_callbacks_offloaded_on_every_cpu_is_probed() -> None:
    f = _mips_hazard("mips64el-6.1", ncpus=2, offloaded=frozenset({0, 1}))
    assert definition(plan("opensnoop", f), "open").startswith("p:")
    assert [p.name for p in plan("fork-module", f).probes] == ["fork"]


def test_mips_kernel_with_one_cpu_not_offloaded_is_refused_naming_it() -> None:
    f = _mips_hazard("mips64el-6.1", ncpus=4, offloaded=frozenset({0, 1, 3}))
    reason = skipped(plan("opensnoop", f), "open")
    assert "CPU 2 " in reason and "rcu_nocbs=0-3" in reason, reason


def test_kprobe_flush_task_alone_does_not_refuse_other_arches() -> None:
    f = dataclasses.replace(facts("x86_64-debian-6.1"), kprobe_flush_task=True)
    assert definition(plan("opensnoop", f), "open").startswith("p:")


def test_kprobe_hazard_facts_round_trip() -> None:
    f = _mips_hazard("mipsel-6.1", ncpus=2, offloaded=frozenset({1}))
    assert Facts.from_json(json.loads(json.dumps(f.to_json()))) == f


# --- framing against a user's text (issue 11 #2) -------------------------------

SEAL = (0x89ABCDEF, 0x01234567)
READMES = Path(__file__).parent / "data" / "readme"


def _with_readme(name: str, readme: str) -> Facts:
    """Stored lab facts with the features of that guest's captured tracefs README (facts stored
    before fleetprobe looked for ``\\imm-value`` lack it)."""
    from dataclasses import replace

    from fleetprobe.facts import readme_features
    return replace(facts(name), features=readme_features((READMES / readme).read_text().splitlines()))


@pytest.mark.parametrize("name,readme", [("lab-x86_64-5.10", "x86_64-5.10.0-46-amd64.txt"),
                                         ("lab-x86_64-6.12", "x86_64-6.12.118+deb13-amd64.txt"),
                                         ("lab-mips64el-6.12", "mips64el-6.12.95+deb12-5kc-malta.txt")])
def test_kprobe_definitions_end_with_the_seal_where_the_readme_has_immediates(name: str, readme: str) -> None:
    """On each guest's README (all list \\imm-value: 5.7+), every kprobe line ends with the seal's two
    immediates, the last fetch args, so the kernel prints the seal after every string."""
    f = _with_readme(name, readme)
    assert "imm" in f.features
    # The probes these guests' facts were captured for (see test_opensnoop_argn_follows_each_lab_kernels_readme).
    pb = parse_playbook("name: sealed\nprobes:\n  - name: open\n    kprobe: do_sys_openat2\n"
                        "    args: {path: '+0(arg2):ustring'}\n  - name: open_ret\n    kretprobe: do_sys_openat2\n"
                        "    args: {ret: 'retval:s32'}\n", "sealed.yml")
    hp = plan_host(pb, f, run_id="k3x9q2", deadline=DEADLINE, uprobe_offsets={}, seal=SEAL)
    if mips_kprobe_oops(f):
        assert all("kprobes oops this MIPS kernel" in s.reason for s in hp.skipped)
        return
    assert hp.trailer == " fpt=0x89abcdef fpu=0x1234567"
    for p in hp.probes:
        assert p.framing == "sealed" and p.guard == (), p
        assert p.definition is not None and p.definition.endswith(r" fpt=\0x89abcdef:x32 fpu=\0x1234567:x32"), p
    arg2 = "$arg2" if "arg_n" in f.features else SECOND_ARG_REGISTER[f.arch]
    # Each string ends with the seal's first word (issue 11: no string text can pass for the fields after it).
    assert definition(hp, "open") == (f"p:{hp.group}/open do_sys_openat2 path=+0({arg2}):ustring"
                                      r" fps0=\0x89abcdef:x32 fpt=\0x89abcdef:x32 fpu=\0x1234567:x32")
    assert hp.string_ends == (" fps0=0x89abcdef",)
    assert definition(hp, "open_ret") == (f"r:{hp.group}/open_ret do_sys_openat2 ret=$retval:s32"
                                          r" fpt=\0x89abcdef:x32 fpu=\0x1234567:x32")
    assert not hp.unframed()


def test_without_immediates_a_kprobe_is_guarded_on_its_string_args() -> None:
    """Stored facts of a kernel whose README had no \\imm-value: no seal in the line; a filter keeps
    every event whose path (a string fetch) or comm holds a newline out (the runner's guard)."""
    f = facts("x86_64-debian-6.1")
    assert "imm" not in f.features
    hp = plan_host(load_playbook(ROOT / "playbooks" / "opensnoop.yml"), f, run_id="k3x9q2", deadline=DEADLINE,
                   uprobe_offsets={}, seal=SEAL)
    assert hp.trailer and not any("fpt=" in (p.definition or "") for p in hp.probes)
    assert definition(hp, "open") == f"p:{hp.group}/open do_filp_open dfd=$arg1:s32 path=+0(+0($arg2)):string"
    framing = {p.name: (p.framing, p.guard) for p in hp.probes}
    why = "guarded (no immediate fetch args in its tracefs README)"
    assert framing == {"open": (why, ("path",)), "open_ret": (why, ())}, framing
    from fleetprobe.runner.runner import plan_directives
    lines = plan_directives(hp, tracefs="/sys/kernel/tracing", duration=1, deadline=DEADLINE, grace=60).splitlines()
    assert f"guard {hp.group}/open path" in lines and f"guard {hp.group}/open_ret" in lines


def test_tracepoints_are_guarded_on_their_string_fields_or_said_to_be_unframed() -> None:
    """A tracepoint's lines cannot carry the seal (no eprobes where the README lies about them, as
    this machine's does): its string fields and the comm are guarded; without the host's format
    file nothing is known of its strings, and the plan says the probe is unframed."""
    from dataclasses import replace

    from fleetprobe.facts import TracepointFormat
    # As this machine's 6.18 format files give them (events/sched/*/format).
    formats = {"sched/sched_process_exec": TracepointFormat(
                   "sched_process_exec", 300, ("filename", "pid", "old_pid"),
                   '"filename=%s pid=%d old_pid=%d", __get_str(filename), REC->pid, REC->old_pid',
                   ("__data_loc char[] filename", "pid_t pid", "pid_t old_pid")),
               "sched/sched_process_fork": TracepointFormat(
                   "sched_process_fork", 301, ("parent_comm", "parent_pid", "child_comm", "child_pid"), "",
                   ("char parent_comm[16]", "pid_t parent_pid", "char child_comm[16]", "pid_t child_pid"))}
    f = replace(facts("x86_64-6.18-controller"), tracepoint_formats=formats,
                tracepoints={"sched/sched_process_exec": True, "sched/sched_process_fork": True})
    pb = parse_playbook("name: tp\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                        "  - name: fork\n    tracepoint: sched/sched_process_fork\n", "tp.yml")
    hp = plan_host(pb, f, run_id="k3x9q2", deadline=DEADLINE, uprobe_offsets={}, seal=SEAL)
    guards = {p.name: (p.framing, p.guard) for p in hp.probes}
    assert guards["exec"] == ("guarded", ("filename",)), guards
    assert guards["fork"] == ("guarded", ("parent_comm", "child_comm")), guards
    bare = replace(f, tracepoint_formats={})
    hp = plan_host(pb, bare, run_id="k3x9q2", deadline=DEADLINE, uprobe_offsets={}, seal=SEAL)
    assert set(hp.unframed()) == {"exec", "fork"}, hp.unframed()
    assert any("exec: unframed: the host did not say which of its fields are strings" in n for n in hp.notes)


def test_one_unframed_probe_makes_the_host_forgeable_and_the_report_says_how_many() -> None:
    """A guard the kernel refused (the runner's "unguarded") or a probe planned unframed: the host's
    framing names it, the host is forgeable, and the caveat counts its events as unverified."""
    from dataclasses import replace

    from fleetprobe.caveats import host_caveats
    from fleetprobe.facts import TracepointFormat
    from fleetprobe.outcome import HostOutcome
    from fleetprobe.plan import host_framing
    fmt = TracepointFormat("sched_process_exec", 300, ("filename", "pid", "old_pid"), "",
                           ("__data_loc char[] filename", "pid_t pid", "pid_t old_pid"))
    f = replace(facts("x86_64-6.18-controller"), tracepoint_formats={"sched/sched_process_exec": fmt},
                tracepoints={"sched/sched_process_exec": True, "sched/sched_process_fork": True})
    pb = parse_playbook("name: tp\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                        "  - name: fork\n    tracepoint: sched/sched_process_fork\n", "tp.yml")
    hp = plan_host(pb, f, run_id="k3x9q2", deadline=DEADLINE, uprobe_offsets={}, seal=SEAL)
    framing, why = host_framing(hp, {})
    assert framing["exec"] == "guarded" and framing["fork"].startswith("unframed: the host did not say")
    assert why.startswith("a user's text in fork (the host did not say") and "any probe" in why, why
    framing, why = host_framing(hp, {"sched/sched_process_exec": "Expecting numeric field"})
    assert framing["exec"] == "unframed: the kernel refused its newline guard (Expecting numeric field)"
    assert "exec (the kernel refused its newline guard" in why, why
    assert host_framing(replace(hp, probes=hp.probes[:1]), {}) == ({"exec": "guarded"}, "")
    out = HostOutcome(host="h", forgeable=why, unverified_events=7, guarded_out=3)
    said = host_caveats(out)
    assert any(s.startswith("7 event(s) unverified: a user's text in") for s in said), said
    assert any(s.startswith("3 event(s) kept out by the newline guard") for s in said), said
