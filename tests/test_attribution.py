"""Lines are attributed by what the host says an event prints (issue 9): pure tests from real lines.

The syscall lines are as this machine's 6.18 kernel printed them (kernel/trace/trace_syscalls.c:
``0x``-prefixed values) and as Debian 6.1 prints them (bare ``%lx``); the format sections are
this machine's facts output for the same events.
"""

from __future__ import annotations

from fleetprobe.caveats import hit_text, host_caveats, unattributed_reason
from fleetprobe.facts import Facts, TracepointFormat, parse_facts, printed_key
from fleetprobe.outcome import HostOutcome
from fleetprobe.parse import TraceStream
from fleetprobe.traceline import parse_line, split_event
from fleetprobe.plan import plan_host
from fleetprobe.playbook import parse_playbook

# Real lines from an instance on this machine (6.18), and the 6.1 form (values without 0x).
ENTER_618 = "             cat-17690   [001] .....   402.201784: sys_openat(dfd: 0xffffff9c, filename: 0x55e35d403900, flags: 0x241, mode: 0x1b6)"
EXIT_618 = "             cat-17690   [001] .....   402.201794: sys_openat -> 0x3"
ENTER_61 = "             cat-27976   [001] .....     5.123000: sys_openat(dfd: ffffff9c, filename: 7f1c0000, flags: 80000, mode: 0)"
EXIT_ERR = "             cat-27976   [001] .....     5.124000: sys_openat -> 0xfffffffffffffffe"

FACTS_TPFORMAT = """\
@@tracepoints
syscalls/sys_enter_openat 1
syscalls/sys_exit_openat 1
sched/sched_process_exec 1
@@tpformat
syscalls/sys_enter_openat name sys_enter_openat
syscalls/sys_enter_openat id 782
syscalls/sys_enter_openat field unsigned short common_type
syscalls/sys_enter_openat field int common_pid
syscalls/sys_enter_openat field int __syscall_nr
syscalls/sys_enter_openat field int dfd
syscalls/sys_enter_openat field const char * filename
syscalls/sys_enter_openat field int flags
syscalls/sys_enter_openat field umode_t mode
syscalls/sys_enter_openat fmt "dfd: 0x%08lx, filename: 0x%08lx, flags: 0x%08lx, mode: 0x%08lx", ((unsigned long)(REC->dfd))
syscalls/sys_exit_openat name sys_exit_openat
syscalls/sys_exit_openat id 781
syscalls/sys_exit_openat field int __syscall_nr
syscalls/sys_exit_openat field long ret
syscalls/sys_exit_openat fmt "0x%lx", REC->ret
sched/sched_process_exec name sched_process_exec
sched/sched_process_exec id 365
sched/sched_process_exec field __data_loc char[] filename
sched/sched_process_exec field pid_t pid
sched/sched_process_exec fmt "filename=%s pid=%d old_pid=%d", __get_str(filename), REC->pid, REC->old_pid
@@end
"""


def test_syscall_lines_split_into_their_keys_and_hex_fields() -> None:
    assert split_event(ENTER_618.split(": ", 1)[1]) == (
        "sys_openat(", "dfd=0xffffff9c filename=0x55e35d403900 flags=0x241 mode=0x1b6")
    # 6.1 prints %lx without 0x: "80000" is hex, never decimal.
    ev = parse_line(ENTER_61, "h", {"sys_openat(": "open"})
    assert ev is not None and not isinstance(ev, str)
    assert ev.probe == "open"
    assert ev.fields == {"dfd": 0xffffff9c, "filename": 0x7f1c0000, "flags": 0x80000, "mode": 0}
    ret = parse_line(EXIT_618, "h", {"sys_openat ->": "open_ret"})
    assert ret.probe == "open_ret" and ret.fields == {"ret": 3}
    # The return value is signed, as the format file declares it (long ret): -ENOENT, not 2^64-2.
    assert parse_line(EXIT_ERR, "h", {}).fields == {"ret": -2}


def test_an_exit_line_and_a_kprobe_of_the_same_name_do_not_collide() -> None:
    assert split_event("sys_openat: (do_sys_openat2+0x0/0x1a0) dfd=1")[0] == "sys_openat"
    assert split_event("sys_openat -> 0x3")[0] == "sys_openat ->"
    assert split_event("sys_openat(dfd: 1)")[0] == "sys_openat("


def test_syscall_args_of_an_unknown_shape_are_kept_whole() -> None:
    key, args = split_event("sys_weird(this is not: the shape)")
    assert key == "sys_weird(" and args.startswith("args=")


def test_facts_carry_each_tracepoints_format_and_the_plan_keys_by_it() -> None:
    facts = parse_facts("h", "@@uname\nx86_64\n6.18\n\n@@tracefs\n/sys/kernel/tracing\n0\n@@files_tracefs\n"
                        "instances d\n" + FACTS_TPFORMAT)
    fmt = facts.tracepoint_formats["syscalls/sys_enter_openat"]
    assert fmt == TracepointFormat("sys_enter_openat", 782, ("__syscall_nr", "dfd", "filename", "flags", "mode"),
                                   fmt.print_fmt, fmt.decls) and fmt.is_syscall
    assert fmt.decl_of()["filename"] == "const char * filename"
    assert facts.tracepoint_formats["sched/sched_process_exec"].fields == ("filename", "pid")
    assert Facts.from_json(facts.to_json()) == facts
    pb = parse_playbook("name: t\ndescription: d\nprobes:\n  - name: open\n    tracepoint: syscalls/sys_enter_openat\n"
                        "  - name: ret\n    tracepoint: syscalls/sys_exit_openat\n"
                        "  - name: exec\n    tracepoint: sched/sched_process_exec\n", "t.yml")
    plan = plan_host(pb, facts, run_id="abc123", deadline=1, uprobe_offsets={})
    assert {p.name: p.trace_name for p in plan.probes} == {"open": "sys_openat(", "ret": "sys_openat ->",
                                                           "exec": "sched_process_exec"}


def test_printed_key_without_a_format_falls_back_on_the_subsystem() -> None:
    assert printed_key("syscalls/sys_exit_read", None) == "sys_read ->"
    assert printed_key("sched/sched_switch", None) == "sched_switch"
    # What the host says wins: an event that is not a syscall event prints under its own name.
    assert printed_key("syscalls/sys_enter_x", TracepointFormat("sys_enter_x", 1, ("a",), "")) == "sys_enter_x"


def test_two_probes_that_print_alike_cannot_both_be_placed() -> None:
    facts = parse_facts("h", "@@uname\nx86_64\n6.18\n\n@@tracefs\n/sys/kernel/tracing\n0\n@@files_tracefs\n"
                        "instances d\n" + FACTS_TPFORMAT)
    # The playbook refuses two probes of one name; here the host says another event prints alike.
    facts.tracepoints["sched/exec_alias"] = True
    facts.tracepoint_formats["sched/exec_alias"] = TracepointFormat("sched_process_exec", 999, ("filename",), "")
    pb = parse_playbook("name: t\ndescription: d\nprobes:\n  - name: a\n    tracepoint: sched/sched_process_exec\n"
                        "  - name: b\n    tracepoint: sched/exec_alias\n", "t.yml")
    plan = plan_host(pb, facts, run_id="abc123", deadline=1, uprobe_offsets={})
    assert [p.name for p in plan.probes] == ["a"]
    assert "could not be told apart" in plan.skipped[0].reason


def test_every_line_is_a_probes_or_counted() -> None:
    """Lines of names the plan does not know are counted, whatever their number of names, with examples."""
    s = TraceStream("h", {"sys_openat(": "open"})
    lines = [ENTER_618, EXIT_618] + [
        f"  x-1 [000] ..... 1.{i:06d}: ev{i}: a=1" for i in range(100)]
    s.feed(("\n".join(lines) + "\n").encode())
    s.close()
    assert s.stats.events == 1
    assert s.stats.unknown_lines == 101          # every one, past the 64 names kept by name
    assert s.stats.unknown["sys_openat ->"] == 1 and len(s.stats.unknown) == 64
    assert s.stats.unknown_examples[0].startswith("cat-17690 [001] 402.201794: sys_openat -> 0x3")


def test_own_pids_are_dropped_and_counted_only_when_asked() -> None:
    s = TraceStream("h", {"sys_openat(": "open"})
    s.exclude_pids({17690})
    s.feed((ENTER_618 + "\n" + ENTER_61 + "\n"
            + "   sh-17690 [000] ...1. 1.5: tracing_mark_write: fpbeat\n").encode())
    assert (s.stats.events, s.stats.own_events, s.stats.markers) == (1, 1, 1)
    assert s.last_beat_ts == 1.5


def test_caveats_and_skipped_cells() -> None:
    o = HostOutcome("web1", unattributed_lines=7, unattributed={"sys_foo(": 7},
                    unattributed_examples=["x-1 [000] 1.0: sys_foo(a: 1)"], own_events=3,
                    skipped_probes={"p": "no such symbol"})
    assert "7 event line(s) of the run's instance matched no probe ('sys_foo(' x7)" in unattributed_reason(o)
    text = " | ".join(host_caveats(o))
    assert "sys_foo(a: 1)" in text and "3 event(s) from fleetprobe's own processes left out" in text
    assert hit_text(o, "p", 0) == "skipped" and hit_text(o, "q", 0) == "0" and hit_text(None, "p", 2) == "2"
    assert unattributed_reason(HostOutcome("ok")) == "" and host_caveats(HostOutcome("ok")) == []
