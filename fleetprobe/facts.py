"""Facts: what one host can do, gathered in one round trip and parsed by a pure function."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from fleetprobe.arches import kernel_arch


@dataclass(frozen=True)
class SymbolFacts:
    """Whether a kernel symbol the playbook names can carry a kprobe on this host.

    ``probeable`` is decided from the host, never from its version:
    in available_filter_functions (or, failing that, kallsyms text) and not in
    the kprobe blacklist.  ``clones`` lists GCC clones seen (``foo.isra.0``,
    ``foo.constprop.0``) which may be probed under their full name.
    """

    name: str
    in_filter_functions: bool
    in_kallsyms: bool
    blacklisted: bool
    clones: tuple[str, ...] = ()

    @property
    def probeable(self) -> bool:
        return (self.in_filter_functions or self.in_kallsyms) and not self.blacklisted

    @property
    def why_not(self) -> str:
        if self.blacklisted:
            return f"{self.name} is in the kprobe blacklist"
        if not (self.in_filter_functions or self.in_kallsyms):
            if self.clones:
                return f"{self.name} exists only as GCC clone(s) {', '.join(self.clones)}"
            return f"{self.name} is not in available_filter_functions or kallsyms (inlined, renamed or absent)"
        return ""


@dataclass(frozen=True)
class TracepointFormat:
    """What the host's ``events/SUBSYS/NAME/format`` file says a tracepoint is.

    ``fields`` are the event's own field names (the ``common_*`` ones left out),
    ``print_fmt`` the format's ``print fmt:`` text.  Trace lines are attributed to
    a probe by :func:`printed_key` of this, not by guessing from the probe's name.
    """

    name: str
    id: int | None = None
    fields: tuple[str, ...] = ()
    print_fmt: str = ""
    #: Each field's C declaration as the format file gives it (``const char * pathname``): hist keys
    #: need the type (a string it holds, a user pointer, a signed number).
    decls: tuple[str, ...] = ()

    def decl_of(self) -> dict[str, str]:
        """{field: declaration} (empty for facts stored before declarations were kept)."""
        return dict(zip(self.fields, self.decls)) if len(self.decls) == len(self.fields) else {}

    @property
    def is_syscall(self) -> bool:
        """A syscall tracepoint (CONFIG_FTRACE_SYSCALLS): its record starts with ``__syscall_nr``."""
        return "__syscall_nr" in self.fields


def printed_key(tracepoint: str, fmt: TracepointFormat | None) -> str:
    """The key :func:`fleetprobe.traceline.split_event` gives the lines this tracepoint prints.

    Most events print ``NAME: args`` (trace_raw_output_prep: the event's name).
    Syscall events print through print_syscall_enter/exit (kernel/trace/trace_syscalls.c)
    under their syscall's metadata name, ``sys`` + the event name's tail
    (sys_enter_openat -> ``sys_openat(dfd: ...)``, sys_exit_openat -> ``sys_openat -> 0x3``).
    Without the host's format (facts of an older fleetprobe), the subsystem and name decide.
    """
    subsystem, _, name = tracepoint.partition("/")
    if fmt is not None:
        name = fmt.name or name
        syscall = fmt.is_syscall
    else:
        syscall = subsystem == "syscalls"
    if syscall:
        for prefix, form in (("sys_enter_", "("), ("sys_exit_", " ->")):
            if name.startswith(prefix):
                return f"sys_{name[len(prefix):]}{form}"
    return name


@dataclass(frozen=True)
class FileFacts:
    """A user-space binary named by a uprobe: exists on the host, and its content hash."""

    path: str
    exists: bool
    size: int = 0
    md5: str = ""


@dataclass(frozen=True)
class Facts:
    """Everything the planner needs to know about one host.

    ``arch`` is ``uname -m`` (x86_64, ppc64le, mips64, mips, aarch64, i686 ...);
    ``endian`` and ``elf_class`` come from the ELF header of the host's
    /bin/sh because ``uname -m`` says ``mips64`` for both mips64 and mips64el.
    ``features`` holds what the tracefs README advertises: ``arg_n``
    (``$arg<N>``), ``ustring``, ``symstr``, ``return_suffix`` (``%return``),
    ``user_deref`` (``+u<off>``), ``btf_args``, ``hist``, ``eprobe`` (listed in the README
    whether or not the kernel has CONFIG_EPROBE_EVENTS: this machine's 6.18 lists ``e[`` and
    refuses every ``e:`` definition), ``imm`` (``\\imm-value`` fetch args).
    ``oops_count``/``warn_count``: the kernel's counts when the facts were taken
    (None before Linux 6.2), the baseline of a run whose runner dies early.
    """

    host: str
    arch: str
    kernel_release: str
    kernel_version: str = ""
    endian: str = "little"
    elf_class: int = 64
    ncpus: int = 1
    boot_id: str = ""
    realtime: float = 0.0
    #: Seconds one ``date`` took on the host (its second reading minus the first): the clock estimate
    #: takes it into account. A property of one measurement, not of the host: not stored, not compared.
    date_cost: float = field(default=0.0, compare=False)
    uid: int = 0
    tracefs: str | None = None
    tracefs_mounted_by_us: bool = False
    features: frozenset[str] = frozenset()
    kprobe_events: bool = False
    uprobe_events: bool = False
    instances: bool = False
    lockdown: str = "none"
    modules_disabled: bool = False
    kprobes_enabled: bool = True
    symbols: dict[str, SymbolFacts] = field(default_factory=dict)
    tracepoints: dict[str, bool] = field(default_factory=dict)
    #: What the host's format file says each asked tracepoint is (absent in older stored facts).
    tracepoint_formats: dict[str, TracepointFormat] = field(default_factory=dict)
    files: dict[str, FileFacts] = field(default_factory=dict)
    build_dir: str | None = None
    make: bool = False
    cc: str | None = None
    leftovers: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    oops_count: int | None = None
    warn_count: int | None = None
    #: MIPS only: the kernel has kprobe_flush_task (an RCU callback that can clear the CPU's
    #: current kprobe mid-probe), and the CPUs whose RCU callbacks run in rcuo kthreads.
    kprobe_flush_task: bool = False
    rcu_offloaded_cpus: frozenset[int] = frozenset()

    @property
    def can_build_modules(self) -> bool:
        return bool(self.build_dir and self.make and self.cc)

    @property
    def kernel_arch(self) -> str:
        """The kernel's ARCH= name for this machine (x86, powerpc, mips, arm64 ...)."""
        return kernel_arch(self.arch)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (used by stored facts in tests and by reports)."""
        return {
            "host": self.host, "arch": self.arch, "kernel_release": self.kernel_release,
            "kernel_version": self.kernel_version, "endian": self.endian, "elf_class": self.elf_class,
            "ncpus": self.ncpus, "boot_id": self.boot_id, "realtime": self.realtime, "uid": self.uid,
            "tracefs": self.tracefs, "tracefs_mounted_by_us": self.tracefs_mounted_by_us,
            "features": sorted(self.features), "kprobe_events": self.kprobe_events,
            "uprobe_events": self.uprobe_events, "instances": self.instances,
            "lockdown": self.lockdown, "modules_disabled": self.modules_disabled,
            "kprobes_enabled": self.kprobes_enabled,
            "symbols": {k: {"in_filter_functions": v.in_filter_functions, "in_kallsyms": v.in_kallsyms,
                            "blacklisted": v.blacklisted, "clones": list(v.clones)}
                        for k, v in self.symbols.items()},
            "tracepoints": dict(self.tracepoints),
            "files": {k: {"exists": v.exists, "size": v.size, "md5": v.md5} for k, v in self.files.items()},
            "build_dir": self.build_dir, "make": self.make, "cc": self.cc,
            "leftovers": list(self.leftovers), "problems": list(self.problems),
            "oops_count": self.oops_count, "warn_count": self.warn_count,
            "kprobe_flush_task": self.kprobe_flush_task,
            "rcu_offloaded_cpus": sorted(self.rcu_offloaded_cpus),
            # Absent when empty: facts stored before formats were gathered read back unchanged.
            **({"tracepoint_formats": {k: {"name": v.name, "id": v.id, "fields": list(v.fields),
                                           "print_fmt": v.print_fmt, **({"decls": list(v.decls)} if v.decls else {})}
                                       for k, v in self.tracepoint_formats.items()}}
               if self.tracepoint_formats else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Facts:
        """Inverse of :meth:`to_json`."""
        d = dict(data)
        d["features"] = frozenset(d.get("features", ()))
        d["symbols"] = {k: SymbolFacts(name=k, in_filter_functions=v["in_filter_functions"],
                                       in_kallsyms=v["in_kallsyms"], blacklisted=v["blacklisted"],
                                       clones=tuple(v.get("clones", ())))
                        for k, v in d.get("symbols", {}).items()}
        d["tracepoint_formats"] = {k: TracepointFormat(name=str(v.get("name", "")), id=v.get("id"),
                                                       fields=tuple(v.get("fields", ())),
                                                       print_fmt=str(v.get("print_fmt", "")),
                                                       decls=tuple(v.get("decls", ())))
                                   for k, v in d.get("tracepoint_formats", {}).items()}
        d["files"] = {k: FileFacts(path=k, exists=v["exists"], size=v.get("size", 0), md5=v.get("md5", ""))
                      for k, v in d.get("files", {}).items()}
        d["leftovers"] = tuple(d.get("leftovers", ()))
        d["problems"] = tuple(d.get("problems", ()))
        d["rcu_offloaded_cpus"] = frozenset(d.get("rcu_offloaded_cpus", ()))
        return cls(**d)


# --- gathering: one script, one round trip, one pure parser --------------------------------

@functools.cache
def facts_script() -> str:
    """The on-host facts script (POSIX sh, busybox-compatible); read once per process, not once per host."""
    return files("fleetprobe").joinpath("facts.sh").read_text()


def facts_args(symbols: list[str], tracepoints: list[str], files: list[str], *, mount: bool) -> list[str]:
    """The facts script's arguments for what a playbook needs to know."""
    return (["1" if mount else "0"] + [f"s:{s}" for s in symbols]
            + [f"t:{t}" for t in tracepoints] + [f"f:{f}" for f in files])


def split_sections(text: str) -> dict[str, list[str]]:
    """Split ``@@name`` framed output into {name: lines}."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@@") and " " not in line:
            current = out.setdefault(line[2:], [])
        elif current is not None:
            current.append(line)
    return out


#: What the tracefs README advertises, and the text that proves it (as perf does: never a version check).
_README_FEATURES = {
    # The fetcharg list's "$comm, $arg<N>," (HAVE_FUNCTION_ARG_ACCESS_API), not any "$arg<N>": 6.12
    # also prints "kernel return probes support: $retval, $arg<N>, $comm" on arches that have no
    # $argN at all (mips64el 6.12 refuses $arg1: "Invalid $-valiable specified").
    "arg_n": "$comm, $arg<N>",
    "ustring": "ustring",
    "symstr": "symstr",
    "return_suffix": "%return",
    "user_deref": "[u]<offset>",
    # CONFIG_PROBE_EVENTS_BTF_ARGS (6.6+) adds this fetcharg line; the README never says "BTF"
    # (trace.c; seen on the lab's trixie 6.12 guests).
    "btf_args": "<argname>[->field",
    "hist": "hist:",
    "eprobe": "e[:[<group>/][<event>]]",
    "fprobe": "f[:[<group>/][<event>]]",
    "comm": "$comm",
    # Immediate fetch args (5.7+): a constant the kernel prints after every other argument of a
    # kprobe or uprobe line (the run's seal, plan.seal_args). Not the immediate string: uprobes
    # read it as user memory and print "(fault)" (seen on 6.18).
    "imm": "\\imm-value",
    # Hist triggers and what they can do (see fleetprobe.histplan): each is its own line in the README.
    "hist_log2": ".log2",
    "hist_buckets": ".buckets=",
    "hist_usecs": ".usecs",
    "hist_execname": ".execname",
    "common_timestamp": "common_timestamp",
    "hist_onmatch": "onmatch(",
    # 5.x spells a synthetic event's action trace(NAME,...); older kernels NAME(...).
    "hist_trace_action": "trace(<synthetic_event>",
    "synthetic_events": "synthetic_events",
}


def readme_features(readme: list[str]) -> frozenset[str]:
    """Features advertised by a tracefs README."""
    return _features_in("\n".join(readme))


@functools.lru_cache(maxsize=64)
def _features_in(text: str) -> frozenset[str]:
    """readme_features of one README text, searched once per run: a fleet's hosts share a few kernels."""
    return frozenset(k for k, needle in _README_FEATURES.items() if needle in text)


def _base_symbol(name: str) -> str:
    """``foo.isra.0`` -> ``foo``."""
    return name.split(".", 1)[0]


#: Facts numbers are the host's word: at most this many digits (Python refuses to parse 4301), and each
#: within its own range, or it is not used.  A lying host's 5000-digit uid is one bad fact, not a crash.
_MAX_DIGITS = 19
#: A realtime past this (the year 2242) or not finite is not a clock: treated as absent.
_MAX_REALTIME = float(1 << 33)


def bounded_int(text: str, lo: int, hi: int) -> int | None:
    """``text`` as a decimal integer in [lo, hi], or None (not a number, too long, out of range)."""
    t = text.strip()
    digits = t[1:] if t.startswith("-") else t
    if not digits.isascii() or not digits.isdigit() or len(digits) > _MAX_DIGITS:
        return None
    value = int(t)
    return value if lo <= value <= hi else None


def _finite_time(text: str) -> float | None:
    """A seconds-since-epoch value, or None for anything else (nan, inf, 1e400, negative, a word)."""
    t = text.strip()
    if not t or len(t) > 40 or not all(c in "0123456789." for c in t):
        return None
    try:
        value = float(t)
    except ValueError:
        return None
    return value if 0.0 <= value < _MAX_REALTIME else None


def _realtime(lines: list[str]) -> float:
    """The host's realtime: ``date +%s.%N``, else busybox adjtimex's tv_sec/tv_usec, else whole seconds.

    0.0 (unknown: the clock offset is then not measured) for anything that is not a plain finite
    time: ``float()`` would take ``nan``, ``inf`` and ``1e400`` from a host that lies.
    """
    first = lines[0].strip() if lines else ""
    value = _finite_time(first)
    if value is not None:
        return value
    adj = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if v}
    sec = bounded_int(adj.get("time.tv_sec", ""), 0, int(_MAX_REALTIME))
    usec = bounded_int(adj.get("time.tv_usec", ""), 0, 999_999)
    if sec is not None and usec is not None:
        return sec + usec / 1e6
    # busybox date without %N prints "1764120000.%N": keep the whole seconds.
    return _finite_time(first.split(".")[0]) or 0.0


def _tracepoint_formats(lines: list[str]) -> dict[str, TracepointFormat]:
    """The ``tpformat`` section (``TP name|id|field|fmt VALUE`` lines) -> {tracepoint: format}."""
    parts: dict[str, dict[str, Any]] = {}
    for line in lines:
        tp, _, rest = line.partition(" ")
        key, _, value = rest.partition(" ")
        if not tp or not key:
            continue
        d = parts.setdefault(tp, {"name": "", "id": None, "fields": [], "print_fmt": "", "decls": []})
        if key == "name":
            d["name"] = value.strip()
        elif key == "id" and (tp_id := bounded_int(value, 0, 1 << 32)) is not None:
            d["id"] = tp_id
        elif key == "fmt":
            d["print_fmt"] = value
        elif key == "field":
            # "unsigned long flags", "__data_loc char[] filename", "char comm[16]": the last word.
            word = value.split()[-1] if value.split() else ""
            word = word.split("[", 1)[0]
            if word and not word.startswith("common_"):
                d["fields"].append(word)
                d["decls"].append(" ".join(value.split()))
    return {tp: TracepointFormat(d["name"], d["id"], tuple(d["fields"]), d["print_fmt"], tuple(d["decls"]))
            for tp, d in parts.items()}


def parse_facts(host: str, text: str, symbols: list[str] | None = None) -> Facts:
    """Parse the facts script's output; ``symbols`` lists the names that were asked about."""
    s = split_sections(text)
    problems: list[str] = []
    if "end" not in s:
        problems.append("facts output was cut short")
    uname = s.get("uname", []) + ["", "", ""]
    realtime = _realtime(s.get("realtime", []))
    lines = s.get("realtime", [])
    again = _finite_time(lines[1]) if realtime and len(lines) > 1 else None
    # How long one date took on the host (0 when unknown, or not a plausible fork and exec).
    date_cost = again - realtime if again is not None and 0.0 <= again - realtime < 1.0 else 0.0
    if s.get("realtime") and not realtime:
        problems.append(f"the host's realtime {s['realtime'][0][:40]!r} is not a time: clock offset not measured")
    ncpus = next((n for line in s.get("ncpus", []) if (n := bounded_int(line, 1, 1 << 20)) is not None), 1)
    endian, elf_class = _elf_header(s.get("elf", []), problems)
    tracefs_lines = s.get("tracefs", []) + ["", "0"]
    tracefs = tracefs_lines[0].strip() or None
    tf_files = dict(line.split(" ", 1) for line in s.get("files_tracefs", []) if " " in line)
    lockdown = _lockdown(s.get("lockdown", []))
    sym_facts = _symbol_facts(s, list(symbols or []))
    tracepoints = {}
    for line in s.get("tracepoints", []):
        parts = line.split()
        if len(parts) == 2:
            tracepoints[parts[0]] = parts[1] == "1"
    formats = _tracepoint_formats(s.get("tpformat", []))
    files = _file_facts(s.get("files", []))
    build = dict(line.split(" ", 1) for line in s.get("build", []) if " " in line)
    counts = [n for line in s.get("kernel_counts", []) if (n := bounded_int(line, 0, 1 << 62)) is not None]
    oops, warn = (counts[0], counts[1]) if len(counts) == 2 else (None, None)

    mips_kprobe = [line.split() for line in s.get("mips_kprobe", [])]
    offloaded = frozenset(int(w[1]) for w in mips_kprobe
                          if len(w) == 2 and w[0] == "nocb" and w[1].isdigit() and len(w[1]) < 6)

    def first_int(key: str, default: int) -> int:
        return next((n for line in s.get(key, []) if (n := bounded_int(line, -(1 << 31), 1 << 32)) is not None),
                    default)

    return Facts(
        host=host, arch=uname[0].strip(), kernel_release=uname[1].strip(), kernel_version=uname[2].strip(),
        endian=endian, elf_class=elf_class, ncpus=ncpus,
        boot_id=(s.get("boot_id") or [""])[0].strip(), realtime=realtime, date_cost=date_cost,
        uid=first_int("uid", -1), tracefs=tracefs, tracefs_mounted_by_us=tracefs_lines[1].strip() == "1",
        features=readme_features(s.get("readme", [])),
        kprobe_events=tf_files.get("kprobe_events") == "w",
        uprobe_events=tf_files.get("uprobe_events") == "w",
        instances=tf_files.get("instances") == "d",
        lockdown=lockdown, modules_disabled=first_int("modules_disabled", 0) == 1,
        kprobes_enabled=first_int("kprobes_enabled", 1) == 1,
        symbols=sym_facts, tracepoints=tracepoints, tracepoint_formats=formats, files=files,
        build_dir=build.get("build_dir"), make=build.get("make") == "yes", cc=build.get("cc"),
        leftovers=tuple(line.strip() for line in s.get("leftovers", []) if line.strip()),
        problems=tuple(problems), oops_count=oops, warn_count=warn,
        kprobe_flush_task=["kprobe_flush_task"] in mips_kprobe,
        rcu_offloaded_cpus=offloaded,
    )


def _elf_header(lines: list[str], problems: list[str]) -> tuple[str, int]:
    """(endianness, ELF class) from the hex bytes of /bin/sh's ELF header; guessed little/64 if unreadable."""
    elf = "".join(lines).split()
    if len(elf) >= 6 and elf[:4] == ["7f", "45", "4c", "46"]:
        return ("big" if elf[5] == "02" else "little"), (32 if elf[4] == "01" else 64)
    problems.append("cannot read /bin/sh's ELF header (endianness guessed little)")
    return "little", 64


def _lockdown(lines: list[str]) -> str:
    """The lockdown mode: "[none] integrity confidentiality": the bracketed word (the last one if several)."""
    lockdown = "none"
    for line in lines:
        for word in line.split():
            if word.startswith("[") and word.endswith("]"):
                lockdown = word[1:-1]
    return lockdown


def _symbol_facts(s: dict[str, list[str]], wanted: list[str]) -> dict[str, SymbolFacts]:
    """What the host's available_filter_functions, kallsyms and kprobe blacklist say of each wanted symbol."""
    aff = {line.split()[0] for line in s.get("aff", []) if line.strip()}
    ksyms = {line.strip() for line in s.get("kallsyms", []) if line.strip()}
    black = {line.split()[-1] for line in s.get("blacklist", []) if line.strip()}
    sym_facts: dict[str, SymbolFacts] = {}
    for name in wanted:
        clones = tuple(sorted({n for n in aff | ksyms if n != name and _base_symbol(n) == name}))
        sym_facts[name] = SymbolFacts(name=name, in_filter_functions=name in aff,
                                      in_kallsyms=name in ksyms, blacklisted=name in black,
                                      clones=clones)
    return sym_facts


def _file_facts(lines: list[str]) -> dict[str, FileFacts]:
    """``EXISTS SIZE MD5 PATH`` lines (MD5 ``-``: not computed) by path."""
    files: dict[str, FileFacts] = {}
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) == 4:
            files[parts[3]] = FileFacts(path=parts[3], exists=parts[0] == "1",
                                        size=bounded_int(parts[1], 0, 1 << 62) or 0,
                                        md5="" if parts[2] == "-" else parts[2])
    return files
