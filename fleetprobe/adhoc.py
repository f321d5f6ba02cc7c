"""Ad-hoc probes: ``fleetprobe run -e 'PROBE [as NAME] [ARG...] [if FILTER]'``, a playbook in one line each.

The grammar, for a reader of bpftrace and perf probe::

    kprobe:do_sys_openat2 dfd=arg1 path=+0(arg2):string if dfd == -100
    kretprobe:do_sys_openat2 ret=retval
    uprobe:/bin/bash:readline            uretprobe:/bin/bash:readline line=+0(retval):string
    tracepoint:sched:sched_process_exec  (or tracepoint:sched/sched_process_exec)
    k: kr: u: ur: t:                     (bpftrace's short forms)

``as NAME`` names the probe (default: the symbol or event, ``_ret`` for a return probe).  An ARG is
``NAME=FETCHARG`` in the playbooks' portable form (``argN``, ``retval``, ``+0(arg2):string``,
``arg3:u32``) or a bare ``argN``/``retval``, named after itself.  ``if`` starts the filter in the
kernel's filter syntax (``comm != "sshd" && dfd == -100``).  A return probe on the same function as
an entry probe before it pairs with it (latency, entry fields).  `` | count(F, ...)``,
`` | hist(F) [by F, ...]`` or `` | latency [by comm]`` (then ``top N``) at the end aggregates at the
source, as a playbook's ``aggregate:`` does.

Each expression becomes one entry of a playbook's ``probes:`` and the whole is validated by
:func:`fleetprobe.playbook.parse_playbook`, exactly as a YAML file is: the same Playbook, the same
checks, before any connection.  A problem names the expression it is in.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from fleetprobe.errors import PlaybookError
from fleetprobe.playbook import Playbook, parse_playbook

#: Probe-type prefixes (bpftrace's long and short forms) -> playbook kind.
KINDS = {"kprobe": "kprobe", "k": "kprobe", "kretprobe": "kretprobe", "kr": "kretprobe",
         "uprobe": "uprobe", "u": "uprobe", "uretprobe": "uretprobe", "ur": "uretprobe",
         "tracepoint": "tracepoint", "t": "tracepoint"}
#: The playbook name of an ad-hoc run (history lists it so).
ADHOC_NAME = "adhoc"
_IF = re.compile(r"\s+if\s+|\s+if$")
_BARE_ARG = re.compile(r"arg[1-9][0-9]*|retval")
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,31}")
_NAME_MAX = 32

GRAMMAR_HINT = ("write PROBE [as NAME] [NAME=FETCHARG ...] [if FILTER], e.g. "
                "'kprobe:do_sys_openat2 path=+0(arg2):string if comm != \"sshd\"', "
                "'uretprobe:/bin/bash:readline line=+0(retval):string', 'tracepoint:sched:sched_process_exec'")


def _error(expr: str, message: str, hint: str | None = GRAMMAR_HINT) -> PlaybookError:
    """A problem in one -e expression."""
    return PlaybookError(message, file=f"-e {expr!r}", hint=hint)


def _default_name(kind: str, target: str) -> str:
    """A probe name from its symbol or event: lower case, [a-z0-9_], ``_ret`` for a return probe."""
    base = target.rsplit(":", 1)[-1].rsplit("/", 1)[-1].split("+", 1)[0]
    name = re.sub(r"[^a-z0-9_]", "_", base.lower()).strip("_") or "probe"
    if name[0].isdigit():
        name = "p_" + name
    suffix = "_ret" if kind in ("kretprobe", "uretprobe") else ""
    return name[:_NAME_MAX - len(suffix)] + suffix


def parse_expression(expr: str) -> dict[str, Any]:
    """One expression -> one ``probes:`` entry as the YAML would have it (not yet validated)."""
    text = " ".join(expr.split())
    if not text:
        raise _error(expr, "empty probe expression")
    text, bar, agg_text = text.partition(" | ")
    aggregate = _aggregate(expr, agg_text.strip()) if bar else None
    parts = _IF.split(text, maxsplit=1)
    head, filt = parts[0], (parts[1].strip() if len(parts) > 1 else None)
    if len(parts) > 1 and not filt:
        raise _error(expr, "'if' is not followed by a filter", hint="e.g. if comm != \"sshd\"")
    words = head.split(" ")
    probe, words = words[0], words[1:]
    kind, target = _target(expr, probe)
    name = None
    if len(words) >= 2 and words[0] == "as":
        name, words = words[1], words[2:]
        if not _NAME.fullmatch(name):
            raise _error(expr, f"probe name {name!r} must match [a-z_][a-z0-9_]* and be at most {_NAME_MAX} "
                         "characters (it becomes the tracefs event name)", hint=None)
    args = _args(expr, words)
    entry: dict[str, Any] = {"name": name or _default_name(kind, target), kind: target}
    if args:
        entry["args"] = args
    if filt:
        entry["filter"] = filt
    if aggregate is not None:
        entry["aggregate"] = aggregate
    return entry


def _target(expr: str, probe: str) -> tuple[str, str]:
    """``kprobe:vfs_read``, ``tracepoint:sched:sched_process_exec`` ... -> (the playbook's kind, its target)."""
    prefix, sep, target = probe.partition(":")
    kind = KINDS.get(prefix)
    if not sep or kind is None:
        raise _error(expr, f"{probe!r} does not start with a probe type; use one of "
                     + ", ".join(f"{k}:" for k in KINDS))
    if not target:
        raise _error(expr, f"{probe!r} names no {kind} target")
    if kind == "tracepoint" and "/" not in target:
        # bpftrace writes tracepoint:GROUP:EVENT; the playbook GROUP/EVENT.
        group, colon, event = target.partition(":")
        if not colon:
            raise _error(expr, f"tracepoint {target!r} must be GROUP:EVENT (e.g. sched:sched_process_exec)")
        target = f"{group}/{event}"
    return kind, target


def _args(expr: str, words: list[str]) -> dict[str, str]:
    """``NAME=FETCHARG`` words (``argN`` and ``retval`` name themselves) -> the ``args:`` mapping."""
    args: dict[str, str] = {}
    for w in words:
        key, eq, value = w.partition("=")
        if not eq:
            if not _BARE_ARG.fullmatch(w):
                raise _error(expr, f"argument {w!r} needs a name: write NAME={w} "
                             "(only argN and retval name themselves)")
            key, value = ("ret" if w == "retval" else w), w
        if not key or not value:
            raise _error(expr, f"argument {w!r} must be NAME=FETCHARG")
        if key in args:
            raise _error(expr, f"argument name {key!r} is used twice", hint=None)
        args[key] = value
    return args


_AGG = re.compile(r"(?P<kind>count|hist|latency)(?:\((?P<fields>[^()]*)\))?(?:\s+by\s+(?P<by>[\w, ]+?))?"
                  r"(?:\s+top\s+(?P<top>\d+))?")


def _aggregate(expr: str, text: str) -> dict[str, Any]:
    """``count(F[,F])``, ``hist(F) [by F,...]`` or ``latency [by comm|pid]``, then ``[top N]``: the
    playbook's ``aggregate:`` mapping (checked by parse_playbook like any other)."""
    m = _AGG.fullmatch(text)
    if m is None:
        raise _error(expr, f"aggregate {text!r} is not count(FIELD,...), hist(FIELD) [by FIELD,...] or "
                     "latency [by comm|pid], optionally followed by 'top N'",
                     hint="e.g. | count(comm, path)   | hist(size) by comm   | latency by comm top 10")
    fields = [f.strip() for f in (m["fields"] or "").split(",") if f.strip()]
    by = [f.strip() for f in (m["by"] or "").split(",") if f.strip()]
    out: dict[str, Any]
    if m["kind"] == "count":
        if not fields:
            raise _error(expr, "count() needs the fields to count by, e.g. count(comm)", hint=None)
        if by:
            raise _error(expr, "count(...) already counts per value of each field; 'by' is for hist and "
                         "latency", hint=None)
        out = {"count": fields}
    elif m["kind"] == "hist":
        if len(fields) != 1:
            raise _error(expr, "hist() takes one numeric field, e.g. hist(size)", hint=None)
        out = {"histogram": fields[0]}
    else:
        if fields:
            raise _error(expr, "latency takes no fields; split it with 'by comm' or 'by pid'", hint=None)
        out = {"latency": True}
    if by:
        out["by"] = by
    if m["top"]:
        out["top"] = int(m["top"])
    return out


def _pair_returns(entries: list[dict[str, Any]]) -> None:
    """A return probe on the function an entry probe before it names pairs with that probe."""
    entry_of: dict[tuple[str, str], str] = {}
    for e in entries:
        for kind, ret in (("kprobe", "kretprobe"), ("uprobe", "uretprobe")):
            if kind in e:
                entry_of.setdefault((ret, str(e[kind])), e["name"])
            elif ret in e and (first := entry_of.get((ret, str(e[ret])))) is not None:
                e["pair_with"] = first


def _unique_names(entries: list[dict[str, Any]], explicit: list[bool]) -> None:
    """Default names made unique (``open``, ``open_2``); a name the user gave is kept as is."""
    taken = {e["name"] for e, given in zip(entries, explicit) if given}
    for e, given in zip(entries, explicit):
        if given:
            continue
        base, n = e["name"], 2
        while e["name"] in taken:
            suffix = f"_{n}"
            e["name"] = base[:_NAME_MAX - len(suffix)] + suffix
            n += 1
        taken.add(e["name"])


def playbook_yaml(expressions: list[str]) -> str:
    """The playbook YAML that the expressions stand for (``plan -e`` and the history store keep it)."""
    entries = [parse_expression(x) for x in expressions]
    explicit = [bool(re.search(r"(^|\s)as\s", " ".join(x.split()).split(" if ", 1)[0])) for x in expressions]
    _unique_names(entries, explicit)
    _pair_returns(entries)
    doc = {"name": ADHOC_NAME, "description": "ad-hoc probes from the command line: "
           + "; ".join(" ".join(x.split()) for x in expressions), "probes": entries}
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10_000)


def adhoc_playbook(expressions: list[str]) -> tuple[Playbook, str]:
    """The validated Playbook of ``-e`` expressions, and its YAML text.

    Each expression is first validated alone, so a problem names the expression it is in (not a
    line of YAML the user never wrote); then all of them together (unique names, pairs).
    """
    if not expressions:
        raise PlaybookError("no probe expression given", file="-e", hint=GRAMMAR_HINT)
    text = playbook_yaml(expressions)
    doc = yaml.safe_load(text)
    by_name = {e["name"]: e for e in doc["probes"]}
    for expr, entry in zip(expressions, doc["probes"]):
        # Alone, with the entry probe it pairs with (a latency needs it) reduced to its target.
        partner = by_name.get(entry.get("pair_with", ""))
        alone = [{k: v for k, v in partner.items() if k in ("name", "kprobe", "uprobe")}] if partner else []
        alone.append(entry)
        try:
            parse_playbook(yaml.safe_dump({"name": ADHOC_NAME, "probes": alone}, sort_keys=False,
                                          allow_unicode=True, width=10_000), f"-e {expr!r}")
        except PlaybookError as e:
            raise PlaybookError(e.message, file=f"-e {expr!r}", key=e.key, hint=e.hint) from None
    try:
        return parse_playbook(text, "-e"), text
    except PlaybookError as e:
        raise PlaybookError(e.message, file="-e (all expressions)", key=e.key, hint=e.hint) from None
