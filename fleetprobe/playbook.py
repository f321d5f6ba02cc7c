"""Playbooks: load a YAML playbook and validate all of it before any host is touched.

A playbook names probes in a portable form (``arg2``, ``retval``,
``+0(arg2):ustring``, symbol alternatives per kernel version).  This module
only checks and records what the user wrote, with file and line for every
item; :mod:`fleetprobe.plan` lowers it per host from that host's facts.
Every problem is a :class:`~fleetprobe.errors.PlaybookError` naming the file,
the line, the key and what is allowed.
"""

from __future__ import annotations

import errno
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import Node, ScalarNode, SequenceNode

from fleetprobe.errors import PlaybookError, did_you_mean
from fleetprobe.fetchargs import ArgSpec, parse_arg
from fleetprobe.syscall_abi import N32_MARKER
from fleetprobe.printformat import PrintFormat, parse_print_format
from fleetprobe.playbook_agg import AGG_SPECIAL_FIELDS as AGG_SPECIAL_FIELDS, AggregateSpec as AggregateSpec, parse_aggregate
from fleetprobe.yamlnodes import NodeReader, describe as _describe, line_of as _line
from fleetprobe.shipped import shipped_dir, shipped_playbook, shipped_playbooks

#: Probe kinds: the key that names the probe's target decides its kind.
PROBE_KINDS = ("kprobe", "kretprobe", "tracepoint", "uprobe", "uretprobe", "raw", "module")
#: Kinds whose events fire when a function returns (``retval`` is valid, ``argN`` is not).
RETURN_KINDS = ("kretprobe", "uretprobe")
#: Kinds that run as tracefs dynamic events in kprobe_events.
KERNEL_DYNAMIC_KINDS = ("kprobe", "kretprobe", "raw")

_TOP_KEYS = ("name", "description", "duration", "event_cap", "allow_modules", "baseline", "probes")
_PROBE_KEYS = ("name", "description", *PROBE_KINDS, "args", "filter", "on_missing", "expect",
               "max_per_host", "pair_with", "params", "aggregate", "print")

#: What a module parameter's value may be (the runner hands it to insmod as one word).
MODULE_PARAM_VALUE = re.compile(r"[A-Za-z0-9_.+-]+")
_PROBE_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_PROBE_NAME_MAX = 32
_PLAYBOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RUN_REF = re.compile(r"[a-z0-9]{1,32}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
#: The longest duration or timeout fleetprobe takes (a week): more is a typo or an attack
#: (``.inf``, ``1e400s``, ``99999999h``), and it would put a run's deadline past any clock.
MAX_DURATION = 7 * 86400.0
# [MOD:]SYM[+OFF]; SYM may name a GCC clone (foo.isra.0) explicitly.
_KSYM = re.compile(r"(?:(?P<mod>[A-Za-z_][A-Za-z0-9_]*):)?(?P<sym>[A-Za-z_.][A-Za-z0-9_.]*)"
                   r"(?:\+(?P<off>0x[0-9a-fA-F]+|\d+))?")
_USYM = re.compile(r"(?P<sym>[A-Za-z_.$][A-Za-z0-9_.$@]*)(?:\+(?P<off>0x[0-9a-fA-F]+|\d+))?")
_UOFF = re.compile(r"0x[0-9a-fA-F]+|\d+")
# The kernel refuses argument names that shadow the common fields of every event.
_RESERVED_ARG_NAMES = ("common_type", "common_flags", "common_preempt_count", "common_pid")
#: The run's seal ends every sealed definition under these names (plan.seal_args, issue 11 #2).
SEAL_ARG_NAMES = ("fpt", "fpu")
# MAX_TRACE_ARGS in kernel/trace/trace_probe.h (128 since 4.x), less the seal's two.
_MAX_ARGS = 128 - len(SEAL_ARG_NAMES)
# --- targets ---------------------------------------------------------------

@dataclass(frozen=True)
class KernelTarget:
    """One kprobe/kretprobe alternative: ``[MOD:]SYM[+OFF]``."""

    symbol: str
    offset: int = 0
    module: str | None = None


@dataclass(frozen=True)
class UserTarget:
    """One uprobe alternative: ``PATH:SYMBOL[+OFF]`` or ``PATH:0xOFFSET`` (a file offset)."""

    path: str
    symbol: str | None
    offset: int = 0


@dataclass(frozen=True)
class ModuleParam:
    """A kernel module parameter; ``alternatives`` (kernel symbols) are resolved per host."""

    name: str
    value: str | None
    alternatives: tuple[str, ...] = ()

    @property
    def is_symbol(self) -> bool:
        """True when the parameter names a kernel symbol that must be resolved from facts."""
        return bool(self.alternatives)


@dataclass(frozen=True)
class ProbeSpec:
    """One probe as the playbook wrote it (validated, not yet lowered for any host).

    ``targets`` holds the alternatives in order (first probeable wins):
    KernelTarget for kprobe/kretprobe, UserTarget for uprobe/uretprobe, the
    ``group/event`` string for a tracepoint.  ``raw`` probes keep the user's
    kprobe_events line (without group/event) in ``raw_line``; ``module``
    probes keep the module directory in ``module`` and its parameters in
    ``params``.  ``line`` is the 1-based line of the probe in ``file``.
    """

    name: str
    kind: str
    line: int
    file: str
    targets: tuple[KernelTarget | UserTarget | str, ...] = ()
    args: tuple[ArgSpec, ...] = ()
    filter: str | None = None
    on_missing: str = "skip"
    expect: str = "any"
    pair_with: str | None = None
    description: str = ""
    raw_line: str | None = None
    raw_fields: tuple[str, ...] = ()
    module: str | None = None
    module_path: str | None = None
    params: tuple[ModuleParam, ...] = ()
    #: Audit rule: more hits than this on any one host fails ``fleetprobe audit``.
    max_per_host: int | None = None
    #: In-kernel (or, where the kernel cannot, controller-side) aggregation instead of events.
    aggregate: AggregateSpec | None = None
    #: How ``run`` prints each event (printformat.py); a playbook with one streams its events.
    print_format: PrintFormat | None = None

    @property
    def is_return(self) -> bool:
        """True for probes that fire on function return."""
        if self.kind == "raw" and self.raw_line:
            return self.raw_line.split()[0].startswith("r")
        return self.kind in RETURN_KINDS

    def kernel_targets(self) -> tuple[KernelTarget, ...]:
        """The kernel symbol alternatives of a kprobe/kretprobe/raw probe."""
        return tuple(t for t in self.targets if isinstance(t, KernelTarget))

    def user_targets(self) -> tuple[UserTarget, ...]:
        """The user-space alternatives of a uprobe/uretprobe."""
        return tuple(t for t in self.targets if isinstance(t, UserTarget))


@dataclass(frozen=True)
class Playbook:
    """A validated playbook: what to probe, for how long, and with what limits."""

    name: str
    description: str
    duration: float
    event_cap: int
    allow_modules: bool
    probes: tuple[ProbeSpec, ...]
    source: str
    sha256: str
    #: Audit baseline: a stored run id to compare against instead of the previous run.
    baseline: str | None = None

    def probe(self, name: str) -> ProbeSpec:
        """The probe called ``name`` (KeyError if there is none)."""
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(name)

    def kernel_symbols(self) -> list[str]:
        """Every kernel symbol the facts stage must check: kprobe alternatives and module symbol params."""
        out: list[str] = []
        for p in self.probes:
            for t in p.kernel_targets():
                out.append(t.symbol)
            for param in p.params:
                out.extend(param.alternatives)
        if any(t.startswith("syscalls/") for t in self.tracepoints()):
            out.append(N32_MARKER)  # whether a MIPS64 host binds shared syscall events to n32 (syscall_abi)
        return list(dict.fromkeys(out))

    def tracepoints(self) -> list[str]:
        """Every ``group/event`` tracepoint the playbook uses."""
        return list(dict.fromkeys(t for p in self.probes if p.kind == "tracepoint"
                                  for t in p.targets if isinstance(t, str)))

    def user_binaries(self) -> list[str]:
        """Every user-space binary a uprobe names (absolute paths on the hosts)."""
        return list(dict.fromkeys(t.path for p in self.probes for t in p.user_targets()))

    def uprobe_targets(self) -> list[tuple[str, str]]:
        """(path, symbol) pairs that need an ELF file offset from the host's binary."""
        return list(dict.fromkeys((t.path, t.symbol) for p in self.probes
                                  for t in p.user_targets() if t.symbol is not None))

    def modules(self) -> list[ProbeSpec]:
        """The kernel-module probes."""
        return [p for p in self.probes if p.kind == "module"]

    def needs_module_consent(self) -> bool:
        """True when the playbook loads kernel modules (allowed only by allow_modules or --allow-modules)."""
        return bool(self.modules())

    def check_module_dirs(self) -> None:
        """Raise PlaybookError for a module probe whose directory does not exist on the controller."""
        for p in self.modules():
            if p.module_path is None or not Path(p.module_path).is_dir():
                raise PlaybookError(
                    f"module directory {p.module!r} not found (looked next to the playbook and in "
                    "the folders above it)", file=p.file, line=p.line, key=f"probes.{p.name}.module",
                    hint="give the module's source directory relative to the playbook file or the repository root")


# --- loading ---------------------------------------------------------------

def parse_duration(text: str) -> float | None:
    """``500ms``, ``10s``, ``5m``, ``1h`` or plain seconds -> seconds (> 0); None when it is not one.

    The one duration grammar: the playbook's ``duration:`` and the command line's ``--duration``,
    ``--connect-timeout`` and ``--setup-timeout`` both use it.
    """
    m = _DURATION.match(text)
    if not m or len(m.group(1)) > 20 or float(m.group(1)) <= 0:
        return None
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return seconds if seconds <= MAX_DURATION else None


def load_playbook(path: str | Path) -> Playbook:
    """Read and validate a playbook file, or a shipped playbook by name (``opensnoop``)."""
    p = Path(path)
    if not p.exists() and (shipped := shipped_playbook(str(path))) is not None:
        p = path = shipped
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        names = ", ".join(shipped_playbooks())
        raise PlaybookError(f"cannot read playbook: {e.strerror}", file=str(path),
                            hint=f"give a playbook file, or the name of a shipped one: {names}"
                            if names and e.errno == errno.ENOENT else None) from e
    except UnicodeDecodeError as e:
        raise PlaybookError(f"playbook is not UTF-8 text ({e.reason} at byte {e.start})",
                            file=str(path)) from e
    return parse_playbook(text, str(path))


def parse_playbook(text: str, source: str) -> Playbook:
    """Validate playbook YAML ``text``; ``source`` names it in errors and anchors relative module paths."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        message = f"not valid YAML: {e.problem or e}"
        if e.context and e.context_mark is not None and e.context_mark is not mark:
            message += f" ({e.context} at line {e.context_mark.line + 1})"
        raise PlaybookError(message, file=source, line=line) from e
    except yaml.YAMLError as e:
        raise PlaybookError(f"not valid YAML: {e}", file=source) from e
    if root is None:
        raise PlaybookError("playbook is empty", file=source,
                            hint="start with 'name:', 'description:' and a 'probes:' list")
    reader = _Reader(source)
    top = reader.mapping(root, "playbook", _TOP_KEYS)
    name = reader.require(top, "name", root, "playbook")
    name_text = reader.string(name, "name")
    if not _PLAYBOOK_NAME.fullmatch(name_text):
        raise reader.error(name, "name", f"playbook name {name_text!r} must be letters, digits, '_', '.', '-' "
                           "(at most 64, starting with a letter or digit)")
    description = reader.string(top["description"][1], "description") if "description" in top else ""
    duration = reader.duration(top["duration"][1]) if "duration" in top else 10.0
    event_cap = 100_000
    if "event_cap" in top:
        event_cap = reader.positive_int(top["event_cap"][1], "event_cap")
    allow_modules = reader.boolean(top["allow_modules"][1], "allow_modules") if "allow_modules" in top else False
    probes_node = reader.require(top, "probes", root, "playbook")
    if not isinstance(probes_node, SequenceNode) or not probes_node.value:
        raise reader.error(probes_node, "probes", "'probes' must be a non-empty list of probes "
                           "(each a mapping with 'name' and one of " + ", ".join(PROBE_KINDS) + ")")
    baseline = None
    if "baseline" in top:
        baseline = reader.string(top["baseline"][1], "baseline")
        if not _RUN_REF.fullmatch(baseline):
            raise reader.error(top["baseline"][1], "baseline",
                               f"baseline {baseline!r} is not a run id (letters and digits, as "
                               "'fleetprobe history' lists them)")
    probes = tuple(reader.probe(node, i) for i, node in enumerate(probes_node.value))
    _check_cross_references(reader, probes)
    return Playbook(name=name_text, description=description, duration=duration, event_cap=event_cap,
                    allow_modules=allow_modules, probes=probes, source=source,
                    sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), baseline=baseline)


def _check_cross_references(reader: _Reader, probes: tuple[ProbeSpec, ...]) -> None:
    """Names unique, pair_with pointing at an entry probe, no two probes printing the same event name."""
    seen: dict[str, ProbeSpec] = {}
    for p in probes:
        if p.name in seen:
            raise PlaybookError(f"probe name {p.name!r} is used twice (first at line {seen[p.name].line})",
                                file=reader.source, line=p.line, key=f"probes.{p.name}.name",
                                hint="probe names become tracefs event names and must be unique")
        seen[p.name] = p
    # trace_pipe lines carry only the event name, so a tracepoint's event name
    # must not also be a dynamic probe's name (or another tracepoint's).
    printed: dict[str, ProbeSpec] = {}
    for p in probes:
        if p.kind == "module":
            continue
        shown = str(p.targets[0]).split("/", 1)[1] if p.kind == "tracepoint" else p.name
        if shown in printed:
            other = printed[shown]
            raise PlaybookError(
                f"probes {other.name!r} (line {other.line}) and {p.name!r} would both appear as "
                f"{shown!r} in trace output", file=reader.source, line=p.line, key=f"probes.{p.name}",
                hint="rename the dynamic probe, or use each tracepoint once (one filter per event)")
        printed[shown] = p
    for p in probes:
        if p.pair_with is None:
            continue
        target = seen.get(p.pair_with)
        if target is None:
            raise PlaybookError(f"pair_with names {p.pair_with!r}, which is not a probe in this playbook"
                                + did_you_mean(p.pair_with, list(seen)),
                                file=reader.source, line=p.line, key=f"probes.{p.name}.pair_with")
        if p.kind == "tracepoint":
            # An exit tracepoint (syscalls/sys_exit_X) pairs with its enter tracepoint, by pid.
            if target.kind != "tracepoint" or target is p:
                raise PlaybookError(f"a tracepoint pairs with another tracepoint (its enter event); "
                                    f"{target.name!r} is a {target.kind}", file=reader.source, line=p.line,
                                    key=f"probes.{p.name}.pair_with")
            continue
        if target.is_return or target.kind in ("tracepoint", "module"):
            raise PlaybookError(f"pair_with must name an entry probe (kprobe, uprobe or raw 'p' line); "
                                f"{target.name!r} is a {target.kind}", file=reader.source, line=p.line,
                                key=f"probes.{p.name}.pair_with")




class _Reader(NodeReader):
    """Walks the YAML node tree, turning each bad item into a PlaybookError at its line."""

    def duration(self, node: Node) -> float:
        """500ms, 10s, 5m, 1h or a number of seconds, as seconds."""
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        seconds: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            seconds = parse_duration(value)
        if seconds is None or not 0 < seconds <= MAX_DURATION:
            raise self.error(node, "duration", f"duration {_describe(node)} is not a positive duration of "
                             f"at most {MAX_DURATION / 86400:.0f} days; "
                             "write e.g. 500ms, 10s, 5m, 1h or a number of seconds")
        return seconds

    def probe(self, node: Node, index: int) -> ProbeSpec:
        """Validate one entry of ``probes``."""
        where = f"probes[{index}]"
        items = self.mapping(node, where, _PROBE_KEYS)
        name_node = self.require(items, "name", node, f"probe #{index + 1}")
        name = self.string(name_node, f"{where}.name")
        if not _PROBE_NAME.fullmatch(name) or len(name) > _PROBE_NAME_MAX:
            raise self.error(name_node, f"{where}.name",
                             f"probe name {name!r} must match [a-z_][a-z0-9_]* and be at most "
                             f"{_PROBE_NAME_MAX} characters (it becomes the tracefs event name)")
        where = f"probes.{name}"
        kinds = [k for k in PROBE_KINDS if k in items]
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            raise self.error(node, where, f"probe {name!r} needs exactly one of "
                             f"{', '.join(PROBE_KINDS)} (found: {found})")
        kind = kinds[0]
        line = _line(node)

        def value_of(key: str) -> Node | None:
            return items[key][1] if key in items else None

        on_missing, expect, max_per_host, description, filter_text = self.probe_options(items, where)
        for key, allowed_kinds in (("params", ("module",)), ("args", ("kprobe", "kretprobe", "uprobe", "uretprobe")),
                                   ("pair_with", RETURN_KINDS + ("raw", "tracepoint"))):
            if key in items and kind not in allowed_kinds:
                raise self.error(items[key][0], f"{where}.{key}",
                                 f"{key!r} is not allowed on a {kind} probe (only on {', '.join(allowed_kinds)})",
                                 hint=("a raw line carries its own fetch args" if kind == "raw" and key == "args"
                                       else None))
        pair_with = None
        if (n := value_of("pair_with")) is not None:
            pair_with = self.string(n, f"{where}.pair_with")

        is_return = kind in RETURN_KINDS
        args: tuple[ArgSpec, ...] = ()
        if (n := value_of("args")) is not None:
            args = self.args(n, where, is_return)
        spec_kw = self.kind_fields(kind, items, where, pair_with)
        aggregate = None
        if (n := value_of("aggregate")) is not None:
            known = tuple(a.name for a in args) if kind != "raw" else spec_kw.get("raw_fields", ())
            aggregate = parse_aggregate(self, n, f"{where}.aggregate", kind=kind, known=known, args=args,
                                        pair_with=pair_with)
        print_format = self.print_format(value_of("print"), where, kind, args, spec_kw)
        return ProbeSpec(name=name, kind=kind, line=line, file=self.source, args=args, filter=filter_text,
                         on_missing=on_missing, expect=expect, pair_with=pair_with,
                         description=description, max_per_host=max_per_host, aggregate=aggregate,
                         print_format=print_format, **spec_kw)

    def probe_options(self, items: dict[str, tuple[Node, Node]], where: str
                      ) -> tuple[str, str, int | None, str, str | None]:
        """A probe's on_missing, expect, max_per_host, description and filter."""
        def value_of(key: str) -> Node | None:
            return items[key][1] if key in items else None

        on_missing = "skip"
        if (n := value_of("on_missing")) is not None:
            on_missing = self.choice(n, f"{where}.on_missing", ("skip", "fail"))
        expect = "any"
        if (n := value_of("expect")) is not None:
            expect = self.choice(n, f"{where}.expect", ("any", "none"))
        max_per_host = None
        if (n := value_of("max_per_host")) is not None:
            max_per_host = self.count(n, f"{where}.max_per_host")
            if expect == "none":
                raise self.error(n, f"{where}.max_per_host", "max_per_host contradicts expect: none "
                                 "(which already allows no hit at all)", hint="keep one of the two")
        description = self.string(n, f"{where}.description") if (n := value_of("description")) else ""
        filter_text = None
        if (n := value_of("filter")) is not None:
            filter_text = self.string(n, f"{where}.filter").strip()
            if "\n" in filter_text:
                raise self.error(n, f"{where}.filter", "filter must be one line (it is written to the "
                                 "event's filter file)")
            if "\t" in filter_text:
                raise self.error(n, f"{where}.filter", "filter holds the control character '\\t'",
                                 hint="write spaces")
        return on_missing, expect, max_per_host, description, filter_text

    def kind_fields(self, kind: str, items: dict[str, tuple[Node, Node]], where: str,
                    pair_with: str | None) -> dict[str, Any]:
        """What the probe's kind key holds (targets, a raw line, a module and its params)."""
        def value_of(key: str) -> Node | None:
            return items[key][1] if key in items else None

        kind_node = items[kind][1]
        is_return = kind in RETURN_KINDS
        spec_kw: dict[str, Any] = {}
        if kind in ("kprobe", "kretprobe"):
            spec_kw["targets"] = self.kernel_targets(kind_node, f"{where}.{kind}", is_return)
        elif kind in ("uprobe", "uretprobe"):
            spec_kw["targets"] = self.user_targets(kind_node, f"{where}.{kind}")
        elif kind == "tracepoint":
            spec_kw["targets"] = (self.tracepoint(kind_node, f"{where}.tracepoint"),)
        elif kind == "raw":
            raw_line, target, fields = self.raw(kind_node, f"{where}.raw")
            spec_kw.update(raw_line=raw_line, targets=(target,) if target else (), raw_fields=fields)
            if pair_with is not None and not raw_line.startswith("r"):
                raise self.error(items["pair_with"][0], f"{where}.pair_with",
                                 "pair_with is only for return probes (a raw line starting with 'r')")
        else:
            module = self.string(kind_node, f"{where}.module")
            spec_kw.update(module=module, module_path=self.module_dir(kind_node, module, f"{where}.module"))
            if (n := value_of("params")) is not None:
                spec_kw["params"] = self.params(n, f"{where}.params")
        return spec_kw

    def print_format(self, n: Node | None, where: str, kind: str, args: tuple[ArgSpec, ...],
                     spec_kw: dict[str, Any]) -> PrintFormat | None:
        """The probe's ``print:`` format (printformat.py), its fields checked where they are known."""
        if n is None:
            return None
        fields = tuple(a.name for a in args) if kind != "raw" else spec_kw.get("raw_fields", ())
        try:
            # A tracepoint's (or module's) fields are the kernel's: known only on the host.
            return parse_print_format(self.string(n, f"{where}.print"), fields if args or kind == "raw" else None)
        except ValueError as exc:
            raise self.error(n, f"{where}.print", str(exc)) from None

    def kernel_targets(self, node: Node, key: str, is_return: bool) -> tuple[KernelTarget, ...]:
        """kprobe/kretprobe alternatives: ``[MOD:]SYM[+OFF]``."""
        out = []
        for text, line in self.string_list(node, key):
            m = _KSYM.fullmatch(text.strip())
            if not m:
                raise PlaybookError(f"{text!r} is not a kernel symbol; write SYMBOL, SYMBOL+OFFSET or MODULE:SYMBOL",
                                    file=self.source, line=line, key=key)
            offset = int(m.group("off"), 0) if m.group("off") else 0
            if is_return and offset:
                raise PlaybookError(f"{text!r}: a kretprobe fires on function return and takes no +offset",
                                    file=self.source, line=line, key=key,
                                    hint="probe the function by name; use a kprobe for an offset inside it")
            out.append(KernelTarget(symbol=m.group("sym"), offset=offset, module=m.group("mod")))
        return tuple(out)

    def user_targets(self, node: Node, key: str) -> tuple[UserTarget, ...]:
        """uprobe/uretprobe alternatives: ``PATH:SYMBOL[+OFF]`` or ``PATH:0xOFFSET``."""
        out = []
        for text, line in self.string_list(node, key):
            path, sep, where = text.strip().rpartition(":")
            if not sep or not path or not where:
                raise PlaybookError(f"{text!r} is not PATH:SYMBOL or PATH:0xOFFSET", file=self.source,
                                    line=line, key=key, hint="e.g. /bin/bash:readline")
            if not path.startswith("/") or any(c.isspace() for c in path):
                raise PlaybookError(f"uprobe path {path!r} must be absolute and contain no whitespace "
                                    "(uprobe_events splits on spaces)", file=self.source, line=line, key=key)
            if _UOFF.fullmatch(where):
                out.append(UserTarget(path=path, symbol=None, offset=int(where, 0)))
                continue
            m = _USYM.fullmatch(where)
            if not m:
                raise PlaybookError(f"{where!r} is neither a symbol name nor a 0x file offset", file=self.source,
                                    line=line, key=key)
            out.append(UserTarget(path=path, symbol=m.group("sym"),
                                  offset=int(m.group("off"), 0) if m.group("off") else 0))
        return tuple(out)

    def tracepoint(self, node: Node, key: str) -> str:
        """A ``group/event`` tracepoint name."""
        text = self.string(node, key).strip()
        group, sep, event = text.partition("/")
        if not sep or not _IDENT.fullmatch(group) or not _IDENT.fullmatch(event):
            raise self.error(node, key, f"tracepoint {text!r} must be GROUP/EVENT (e.g. sched/sched_process_exec)")
        return text

    def raw(self, node: Node, key: str) -> tuple[str, KernelTarget | None, tuple[str, ...]]:
        """An expert kprobe_events line without group/event: (line, target symbol, field names)."""
        text = " ".join(self.string(node, key).split())
        tokens = text.split(" ")
        head = tokens[0]
        probe_type = head.split(":", 1)[0]
        if not re.fullmatch(r"p|r\d*", probe_type):
            raise self.error(node, key, f"raw line must start with 'p' (entry) or 'r' (return), got {head!r}; "
                             "'-' deletions and other event types are not accepted")
        if ":" in head:
            raise self.error(node, key, f"raw line names its own event ({head!r}); fleetprobe names every "
                             "event itself to keep runs apart", hint=f"write {probe_type!r} instead of {head!r}")
        if len(tokens) < 2:
            raise self.error(node, key, "raw line has no probe place (SYMBOL[+OFF], MODULE:SYMBOL or address)")
        place = tokens[1].removesuffix("%return")
        target = None
        m = _KSYM.fullmatch(place)
        if m:
            target = KernelTarget(symbol=m.group("sym"), offset=int(m.group("off"), 0) if m.group("off") else 0,
                                  module=m.group("mod"))
        elif not re.fullmatch(r"0x[0-9a-fA-F]+", place):
            raise self.error(node, key, f"raw probe place {tokens[1]!r} is not SYMBOL[+OFF], MODULE:SYMBOL or 0xADDR")
        fields = []
        for i, tok in enumerate(tokens[2:], start=1):
            name, eq, _ = tok.partition("=")
            # The kernel names an unnamed argument argN by its position.
            fields.append(name if eq and _IDENT.fullmatch(name) else f"arg{i}")
        return text, target, tuple(fields)

    def module_dir(self, node: Node, module: str, key: str) -> str | None:
        """Resolve a module directory relative to the playbook file, then each folder above it."""
        if Path(module).is_absolute() or ".." in Path(module).parts:
            raise self.error(node, key, f"module path {module!r} must be relative (to the playbook or the "
                             "repository root) and stay inside it")
        base = Path(self.source).resolve().parent
        for folder in (base, *base.parents):
            candidate = folder / module
            if candidate.is_dir():
                return str(candidate)
        # modules/fp_kprobe: the modules shipped with fleetprobe, wherever it is installed.
        parts = Path(module).parts
        shipped = shipped_dir("modules")
        if shipped is not None and len(parts) == 2 and parts[0] == "modules" and (shipped / parts[1]).is_dir():
            return str(shipped / parts[1])
        return None

    def params(self, node: Node, key: str) -> tuple[ModuleParam, ...]:
        """Module parameters: scalars, or lists of alternative kernel symbols."""
        items = self.mapping_any(node, key)
        out = []
        for name, (knode, vnode) in items.items():
            if not _IDENT.fullmatch(name):
                raise self.error(knode, f"{key}.{name}", f"module parameter name {name!r} must be an identifier")
            if isinstance(vnode, SequenceNode):
                alts = tuple(s for s, _ in self.string_list(vnode, f"{key}.{name}"))
                for s in alts:
                    if not _KSYM.fullmatch(s) or "+" in s or ":" in s:
                        raise self.error(vnode, f"{key}.{name}", f"{s!r} is not a kernel symbol name")
                out.append(ModuleParam(name=name, value=None, alternatives=alts))
            elif isinstance(vnode, ScalarNode):
                value = self.scalar(vnode)
                if isinstance(value, bool):
                    text = "1" if value else "0"
                elif value is None or isinstance(value, (dict, list)):
                    raise self.error(vnode, f"{key}.{name}", f"module parameter {name!r} needs a value")
                else:
                    text = str(value)
                if any(c.isspace() for c in text):
                    raise self.error(vnode, f"{key}.{name}", f"module parameter {name!r} must not contain spaces")
                if not MODULE_PARAM_VALUE.fullmatch(text):
                    # The runner passes parameters to insmod as words: refuse here, once, at the
                    # user's line, rather than failing every host at its build stage.
                    raise self.error(vnode, f"{key}.{name}", f"module parameter {name}={text!r} must be letters, "
                                     "digits and _ . + -")
                # A parameter called 'symbol' names a kernel symbol: check it like a kprobe target.
                out.append(ModuleParam(name=name, value=None, alternatives=(text,)) if name == "symbol"
                           else ModuleParam(name=name, value=text))
            else:
                raise self.error(vnode, f"{key}.{name}", f"module parameter {name!r} must be a value or a list "
                                 "of alternative kernel symbols")
        return tuple(out)

    def args(self, node: Node, where: str, is_return: bool) -> tuple[ArgSpec, ...]:
        """The ``args`` mapping: name -> portable fetch arg with optional :type."""
        items = self.mapping_any(node, f"{where}.args")
        if len(items) > _MAX_ARGS:
            raise self.error(node, f"{where}.args", f"at most {_MAX_ARGS} args per probe (the kernel's limit)")
        out = []
        for name, (knode, vnode) in items.items():
            key = f"{where}.args.{name}"
            if not _IDENT.fullmatch(name):
                raise self.error(knode, key, f"arg name {name!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
            if name in _RESERVED_ARG_NAMES:
                raise self.error(knode, key, f"arg name {name!r} is a field every event already has; pick another")
            if name in SEAL_ARG_NAMES or re.fullmatch(r"fps[0-9]+", name):
                raise self.error(knode, key, f"arg name {name!r} is fleetprobe's own (the run's seal ends every "
                                             "line under it); pick another")
            text = self.string(vnode, key).strip()
            try:
                spec = parse_arg(name, text, _line(vnode))
            except ValueError as e:
                raise self.error(vnode, key, str(e)) from None
            if is_return and spec.uses_argn():
                raise self.error(vnode, key, f"{text!r}: argN is only defined at function entry; a return "
                                 "probe sees retval", hint="record the argument in the paired entry probe")
            if not is_return and spec.uses_retval():
                raise self.error(vnode, key, f"{text!r}: retval exists only in return probes "
                                 "(kretprobe, uretprobe)")
            out.append(spec)
        return tuple(out)




# --- fetch-arg grammar -----------------------------------------------------

