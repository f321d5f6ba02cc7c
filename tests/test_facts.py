"""parse_facts on real facts-script output captured on this machine (dash and busybox), and trimmed variants."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fleetprobe.facts import facts_args, facts_script, parse_facts, readme_features, split_sections

DATA = Path(__file__).parent / "data" / "facts_raw"
SYMBOLS = ["do_sys_openat2", "kernel_clone"]


def load(name: str) -> str:
    """One captured output."""
    return (DATA / name).read_text()


@pytest.mark.parametrize("name", ["x86_64-6.18-dash.txt", "x86_64-6.18-busybox.txt"])
def test_real_capture(name: str) -> None:
    """Everything the planner needs, read from this machine's real output under both shells."""
    f = parse_facts("ctl", load(name), SYMBOLS)
    assert f.problems == ()
    assert (f.arch, f.kernel_release, f.endian, f.elf_class) == ("x86_64", "6.18.44-fc-v657", "little", 64)
    assert f.kernel_version.startswith("#1 SMP PREEMPT_DYNAMIC")
    assert f.ncpus == 2 and f.uid == 0
    assert f.boot_id == "e8e586f1-e6b4-404f-996e-b9758a9dfbbf"
    assert f.tracefs == "/sys/kernel/tracing" and not f.tracefs_mounted_by_us
    # This kernel has uprobes and instances but no kprobes: the README and file list say so.
    assert f.uprobe_events and f.instances and not f.kprobe_events
    assert {"arg_n", "ustring", "symstr", "return_suffix", "user_deref", "eprobe"} <= f.features
    assert f.lockdown == "none" and not f.modules_disabled and f.kprobes_enabled
    # In kallsyms but not in available_filter_functions (this kernel has no function tracer entries).
    for s in SYMBOLS:
        sf = f.symbols[s]
        assert sf.in_kallsyms and not sf.in_filter_functions and not sf.blacklisted and sf.probeable
    assert f.tracepoints == {"sched/sched_process_exec": True}
    bash = f.files["/bin/bash"]
    assert bash.exists and bash.size == 1265648 and bash.md5 == "7210080490f9fd139c1b44fa0f730988"
    assert f.make and f.cc == "cc" and f.build_dir is None and not f.can_build_modules
    assert "instance fp_cmn7mb_146d_1795656656" in f.leftovers and "group fp_cmn7mb_ff38" in f.leftovers


def test_dash_has_nanoseconds_busybox_here_has_whole_seconds() -> None:
    """dash's date prints %N; this machine's busybox prints it literally: whole seconds are kept."""
    assert parse_facts("a", load("x86_64-6.18-dash.txt")).realtime == pytest.approx(1795656567.43545766)
    raw = split_sections(load("x86_64-6.18-busybox.txt"))["realtime"]
    assert raw == ["1795656567.%N"]
    assert parse_facts("a", load("x86_64-6.18-busybox.txt")).realtime == 1795656567.0


def test_busybox_date_n() -> None:
    """busybox date without %N support printing "SECONDS.N"."""
    f = parse_facts("a", load("variant-busybox-date-N.txt"), SYMBOLS)
    assert f.realtime == 1795656567.0 and f.problems == ()


def test_no_tracefs() -> None:
    """No tracefs: no features, no event files, the tracepoint absent, nothing left over."""
    f = parse_facts("a", load("variant-no-tracefs.txt"), SYMBOLS)
    assert f.tracefs is None
    assert f.features == frozenset()
    assert not (f.kprobe_events or f.uprobe_events or f.instances)
    assert f.tracepoints == {"sched/sched_process_exec": False}
    assert f.leftovers == ()
    assert f.arch == "x86_64"                      # the rest is still read


def test_lockdown_integrity_and_modules_disabled() -> None:
    """The bracketed word is the lockdown mode; modules_disabled=1 blocks loading."""
    f = parse_facts("a", load("variant-lockdown-integrity.txt"), SYMBOLS)
    assert f.lockdown == "integrity"
    assert f.modules_disabled


def test_big_endian_elf() -> None:
    """uname -m says mips64 for both endians: the ELF header decides."""
    f = parse_facts("a", load("variant-mips64-big-endian.txt"), SYMBOLS)
    assert (f.arch, f.endian, f.elf_class, f.kernel_arch) == ("mips64", "big", 64, "mips")


def test_cut_short() -> None:
    """Output that stops half-way is flagged, and what arrived is still used."""
    f = parse_facts("a", load("variant-cut-short.txt"), SYMBOLS)
    assert "facts output was cut short" in f.problems
    assert f.arch == "x86_64" and f.tracefs == "/sys/kernel/tracing"
    assert f.symbols["kernel_clone"].why_not.startswith("kernel_clone is not in")


def test_unreadable_elf_header_is_a_problem_not_a_crash() -> None:
    """A host without od: the ELF section is empty; endianness is guessed and the guess is reported."""
    text = load("x86_64-6.18-dash.txt").replace(" 7f 45 4c 46 02 01\n", "")
    f = parse_facts("a", text)
    assert f.endian == "little" and any("ELF header" in p for p in f.problems)


def test_json_roundtrip_of_real_facts() -> None:
    """Stored facts (tests/data/facts) come from to_json; from_json gives the same value back."""
    from fleetprobe.facts import Facts

    f = parse_facts("ctl", load("x86_64-6.18-dash.txt"), SYMBOLS)
    assert Facts.from_json(f.to_json()) == f


def test_readme_features_need_the_exact_text() -> None:
    """Features come from the README's text (as perf does), never from a version number."""
    assert readme_features(["  $stack, $retval, $comm, $arg<N>,"]) == frozenset({"arg_n", "comm"})
    assert readme_features(["kernel 6.18"]) == frozenset()


READMES = Path(__file__).parent / "data" / "readme"


def test_readme_features_of_real_debian_kernels() -> None:
    """The tracefs READMEs of the lab's bullseye 5.10 and trixie 6.12 guests (captured from the guests)."""
    old = readme_features((READMES / "x86_64-5.10.0-46-amd64.txt").read_text().splitlines())
    new = readme_features((READMES / "x86_64-6.12.118+deb13-amd64.txt").read_text().splitlines())
    # imm: \imm-value fetch args (5.7+), which seal kprobe and uprobe lines (issue 11 #2).
    assert old == {"arg_n", "comm", "imm", "return_suffix", "user_deref", "ustring"}
    assert new == {"arg_n", "btf_args", "comm", "eprobe", "fprobe", "hist", "imm", "return_suffix", "symstr",
                   "user_deref", "ustring",
                   # hist trigger modifiers and synthetic events (issue 13), as this README lists them
                   "common_timestamp", "hist_buckets", "hist_execname", "hist_log2", "hist_onmatch",
                   "hist_trace_action", "hist_usecs", "synthetic_events"}
    # mips64el 6.12 (bookworm-backports): "$arg<N>" only in the return-probe line; the kernel refuses $arg1.
    mips = readme_features((READMES / "mips64el-6.12.95+deb12-5kc-malta.txt").read_text().splitlines())
    assert "arg_n" not in mips and {"symstr", "eprobe", "return_suffix"} <= mips


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_script_runs_here_and_parses(shell: str) -> None:
    """The shipped script, run now under each shell with facts_args, parses without problems."""
    argv = {"dash": ["/bin/dash"], "busybox": [shutil.which("busybox") or "/bin/busybox", "sh"]}[shell]
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} not installed")
    args = facts_args(SYMBOLS, ["sched/sched_process_exec", "no/such_tp"], ["/bin/sh", "/no/such/file"],
                      mount=False)
    out = subprocess.run([*argv, "-c", facts_script(), "fleetprobe", *args], capture_output=True, check=True,
                         timeout=30).stdout.decode()
    f = parse_facts("here", out, SYMBOLS)
    assert f.problems == ()
    assert f.arch == os.uname().machine and f.kernel_release == os.uname().release
    assert f.tracepoints["no/such_tp"] is False
    assert f.files["/bin/sh"].exists and not f.files["/no/such/file"].exists
    assert f.uid == os.geteuid()


def test_mips_kprobe_section() -> None:
    """kprobe_flush_task and the CPUs with rcuo kthreads; malformed lines are ignored, never trusted."""
    base = load("x86_64-6.18-dash.txt")
    f = parse_facts("a", base, SYMBOLS)
    assert f.kprobe_flush_task is False and f.rcu_offloaded_cpus == frozenset()
    assert "@@build\n" in base
    text = base.replace("@@build\n", "@@mips_kprobe\nkprobe_flush_task\nnocb 0\nnocb 3\nnocb x\nnocb 1 2\n"
                                      "nocb 99999999\n@@build\n", 1)
    f = parse_facts("a", text, SYMBOLS)
    assert f.kprobe_flush_task is True and f.rcu_offloaded_cpus == frozenset({0, 3})


def test_mips_kprobe_section_ignores_a_user_process_named_like_an_rcu_kthread(tmp_path: Path) -> None:
    """The script, told it runs on mips64, lists no rcuo CPU for a user process that renamed itself rcuos/0."""
    shim = tmp_path / "uname"
    shim.write_text('#!/bin/sh\n[ "$1" = -m ] && { echo mips64; exit 0; }\nexec /bin/uname "$@"\n')
    shim.chmod(0o755)
    fake = subprocess.Popen(["python3", "-c", "open('/proc/self/comm', 'w').write('rcuos/0'); "
                                              "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        for _ in range(100):
            if Path(f"/proc/{fake.pid}/comm").read_text().strip() == "rcuos/0":
                break
            time.sleep(0.05)
        assert Path(f"/proc/{fake.pid}/comm").read_text().strip() == "rcuos/0"
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
        out = subprocess.run(["/bin/sh", "-c", facts_script(), "fleetprobe", *facts_args([], [], [], mount=False)],
                             capture_output=True, check=True, timeout=60, env=env).stdout.decode()
    finally:
        fake.communicate(b"", timeout=10)
    section = split_sections(out)["mips_kprobe"]
    assert parse_facts("a", out).arch == "mips64"
    assert "nocb 0" not in section or _is_kthread_rcuo_cpu0(), section
    assert fake.returncode == 0


def _is_kthread_rcuo_cpu0() -> bool:
    """Whether this machine itself runs a real rcuo[ps]/0 kthread (then 'nocb 0' is legitimately listed)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("rcuos/0", "rcuop/0"):
                stat = (comm.parent / "stat").read_text()
                if stat.rsplit(") ", 1)[1].split()[1] == "2":
                    return True
        except OSError:
            continue
    return False
