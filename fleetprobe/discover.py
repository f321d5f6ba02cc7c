"""Discovery: ``fleetprobe list [PATTERN] -i INV``: what the fleet can probe, name by name.

Like ``bpftrace -l``, ``perf probe -F`` and ``trace-cmd list``, but across hosts: each kernel
function (``available_filter_functions``, on hosts that have kprobe_events), tracepoint
(``available_events``, with its fields on request) and, with ``-x BINARY``, each function symbol of
a binary, with the hosts that have it and those that do not.  A pattern that names nothing gets
near names from the hosts' own lists (a typo'd ``sched_proces_exec``).

Patterns are shell globs (``*``, ``?``) with bpftrace's prefixes: ``kprobe:vfs_*`` (also
``k:``, ``kretprobe:``, ``kr:``), ``tracepoint:sched:*`` (``t:``; ``sched/*`` works too),
``uprobe:/bin/bash:read*`` (``u:``, ``ur:``, ``uretprobe:``, or ``-x /bin/bash 'read*'``).
Without a prefix a pattern matches kernel functions and tracepoints (a tracepoint by its event
name or by ``group:event``).

The on-host part (``discover.sh``) greps on the host, so only matching names travel.  What a host
sends is its word: every name is checked against a strict character set (others are counted and
dropped, never shown raw), the output is bounded, and a binary's symbols are read from bytes the
controller fetched itself (shared between hosts only under the md5 the controller computed, as
:mod:`fleetprobe.uprobes` does).
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib.resources import files
from typing import TypeVar

from fleetprobe import elf
from fleetprobe.errors import HostError, InputError
from fleetprobe.facts import Facts
from fleetprobe.inventory import Host
from fleetprobe.session import Session, Stream, script_command, script_input, shell_command
from fleetprobe.orchestrate import fan_out
from fleetprobe.plan import HostPlan
from fleetprobe.playbook import Playbook
from fleetprobe.runner.channel import HostFacts
from fleetprobe.settings import RunSettings


T = TypeVar("T")

#: Kinds of names, as shown (and as the JSON's "kind").
FUNCTION, TRACEPOINT, SYMBOL = "function", "tracepoint", "symbol"
#: Prefixes -> the kind they list (bpftrace's long and short forms).
PREFIXES = {"kprobe": FUNCTION, "k": FUNCTION, "kretprobe": FUNCTION, "kr": FUNCTION,
            "tracepoint": TRACEPOINT, "t": TRACEPOINT,
            "uprobe": SYMBOL, "u": SYMBOL, "uretprobe": SYMBOL, "ur": SYMBOL}
#: Characters a pattern may hold (globs over kernel and ELF names; nothing the shell or grep reads specially
#: beyond what glob_regex escapes).
_PATTERN = re.compile(r"[A-Za-z0-9_.:/*?@$-]*")
#: What a name the host sends must look like: a C identifier with the suffixes kernels and
#: toolchains add (``foo.isra.0``, ``foo.cold``, ``memcpy@GLIBC_2.14``).
_NAME = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$@]{0,255}")
_TRACEPOINT = re.compile(r"[A-Za-z0-9_]{1,64}:[A-Za-z0-9_]{1,128}")
#: A host's listing is at most this large (all of a big kernel's functions are ~3 MB).
MAX_LIST_BYTES = 32 << 20
#: Names per kind and host kept (more is a host's attack, or a pattern matching everything twice over).
MAX_NAMES = 400_000
#: Tracepoints whose fields a listing shows (``--fields``).
MAX_FIELD_TRACEPOINTS = 200
#: The largest binary read for its symbols (as uprobes.MAX_BINARY_BYTES).
MAX_BINARY_BYTES = 256 << 20


@dataclass(frozen=True)
class Query:
    """What to list: which kinds, the glob for each, and the binary for symbols."""

    pattern: str
    kinds: tuple[str, ...]
    glob: str
    binary: str | None = None
    fields: bool = False

    @property
    def exact(self) -> bool:
        """A name, not a glob: nothing found then means a typo, worth suggestions."""
        return "*" not in self.glob and "?" not in self.glob


def parse_query(pattern: str | None, binary: str | None = None, *, fields: bool = False) -> Query:
    """``PATTERN`` and ``-x BINARY`` as the user typed them -> a Query; a bad one is an InputError."""
    text = (pattern or "*").strip() or "*"
    prefix, sep, rest = text.partition(":")
    kind = PREFIXES.get(prefix) if sep else None
    glob = rest if kind is not None else text
    if kind == SYMBOL:
        # uprobe:/bin/bash:read*  (the binary is everything before the last colon)
        path, colon, sym = glob.rpartition(":")
        if not colon or not path.startswith("/"):
            raise InputError(f"{text!r}: a uprobe pattern is uprobe:/ABSOLUTE/PATH:SYMBOL_GLOB", where="command line",
                             hint="e.g. 'uprobe:/bin/bash:read*', or -x /bin/bash 'read*'")
        if binary is not None and binary != path:
            raise InputError(f"{text!r} names {path}, -x names {binary}", where="command line",
                             hint="give the binary once")
        binary, glob = path, sym or "*"
    if binary is not None:
        if not binary.startswith("/") or "\n" in binary:
            raise InputError(f"-x {binary!r}: the binary must be an absolute path", where="command line",
                             hint="e.g. -x /bin/bash (the same path on every host)")
        if kind not in (None, SYMBOL):
            raise InputError(f"{text!r} lists kernel names, -x a binary's symbols", where="command line",
                             hint="drop -x, or give a symbol pattern: -x /bin/bash 'read*'")
        kinds: tuple[str, ...] = (SYMBOL,)
    elif kind is not None:
        kinds = (kind,)
    else:
        kinds = (FUNCTION, TRACEPOINT)
    if kind == TRACEPOINT:
        glob = glob.replace("/", ":", 1)
    glob = glob or "*"
    if not _PATTERN.fullmatch(glob):
        bad = sorted({c for c in glob if not _PATTERN.fullmatch(c)})
        raise InputError(f"pattern {text!r} holds {''.join(bad)!r}: names are letters, digits and _ . : @ $ -, "
                         "with * and ? as wildcards", where="command line")
    return Query(text, kinds, glob, binary, fields)


def glob_regex(glob: str) -> str:
    """A glob as an anchored POSIX extended regular expression (grep -E) over one whole name."""
    out = []
    for c in glob:
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c) if not c.isalnum() and c != "_" else c)
    return "^" + "".join(out) + "$"


def _tracepoint_regex(glob: str) -> str:
    """A tracepoint glob: ``group:event`` whole, or a glob with no colon matching the event name."""
    if ":" in glob:
        return glob_regex(glob)
    return "^[A-Za-z0-9_]+:" + glob_regex(glob)[1:]


@dataclass
class HostListing:
    """One host's answer: names per kind (None: this kind cannot be listed here, ``why`` says why)."""

    host: str
    names: dict[str, set[str] | None] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    #: tracepoint -> its fields as the format file declares them (``--fields``).
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Lines dropped because they were not names (a hostile or broken host), and names past MAX_NAMES.
    junk: int = 0
    error: HostError | None = None


def discover_script() -> str:
    """The on-host listing script (POSIX sh, busybox-compatible)."""
    return files("fleetprobe").joinpath("discover.sh").read_text()


async def _read_listing(stream: Stream, host: str, timeout: float) -> str:
    """The script's whole output, bounded in size and time."""
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await stream.read(65536):
                buf += chunk
                if len(buf) > MAX_LIST_BYTES:
                    stream.close()
                    raise HostError(host, "list", f"the listing passed {MAX_LIST_BYTES >> 20} MiB",
                                    hint="a narrower pattern; or the host prints far more than names")
            status = await stream.wait(timeout)
    except TimeoutError:
        stream.close()
        raise HostError(host, "list", f"the listing did not finish in {timeout:.0f}s",
                        hint="raise --setup-timeout for slow hosts, or give a narrower pattern") from None
    text = buf.decode("utf-8", "replace")
    if status != 0 or not text.endswith("@@end\n"):
        raise HostError(host, "list", f"listing script failed (exit {status})",
                        evidence=stream.stderr().decode("utf-8", "replace")[-600:] or text[-300:],
                        hint="is the login shell POSIX sh compatible, and (with become) is sudo -n allowed?")
    return text


def _sections(text: str) -> dict[str, list[str]]:
    """``@@name`` sections -> their lines."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.split("\n"):
        if line.startswith("@@") and " " not in line:
            current = out.setdefault(line[2:], [])
        elif current is not None and line:
            current.append(line)
    return out


def parse_listing(host: str, text: str, query: Query) -> tuple[HostListing, tuple[int, str] | None]:
    """One host's output -> its listing, and the (size, md5) it claims for the binary (None: none)."""
    sec = _sections(text)
    listing = HostListing(host)
    caps = set(sec.get("tracefs", [])[1:])
    for kind, name, valid in ((FUNCTION, "functions", _NAME), (TRACEPOINT, "tracepoints", _TRACEPOINT)):
        if kind not in query.kinds:
            continue
        lines = sec.get(name, [])
        if not lines or lines[0] != "ok":
            listing.names[kind] = None
            listing.why[kind] = lines[0][1:] if lines and lines[0].startswith("!") else f"no {name} in the answer"
            continue
        names: set[str] = set()
        for line in lines[1:]:
            if valid.fullmatch(line) and len(names) < MAX_NAMES:
                names.add(line)
            else:
                listing.junk += 1
        if kind == FUNCTION and "kprobe_events" not in caps:
            # Listed, but not probeable here: the kernel has no kprobe_events.
            listing.names[kind] = None
            listing.why[kind] = "no kprobe_events (a kernel without CONFIG_KPROBE_EVENTS)"
            continue
        listing.names[kind] = names
    for line in sec.get("fields", [])[1:]:
        tp, _, decl = line.partition(" ")
        if _TRACEPOINT.fullmatch(tp) and len(listing.fields) <= MAX_FIELD_TRACEPOINTS and len(decl) < 200:
            listing.fields[tp] = (*listing.fields.get(tp, ()), decl.strip())
    claim: tuple[int, str] | None = None
    if SYMBOL in query.kinds:
        lines = sec.get("binary", [])
        words = lines[0].split() if lines else []
        if len(words) == 3 and words[0] == "ok" and words[1].isdigit():
            claim = (int(words[1]), words[2][:64])
        else:
            listing.names[SYMBOL] = None
            listing.why[SYMBOL] = (lines[0][1:] if lines and lines[0].startswith("!")
                                   else "no answer about the binary")
    return listing, claim


class _Symbols:
    """A binary's function symbols, fetched once per distinct binary (by the md5 computed here)."""

    def __init__(self, fetch_timeout: float) -> None:
        self.fetch_timeout = fetch_timeout
        self._by_md5: dict[str, set[str] | str] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, session: Session, path: str, size: int, claimed: str) -> set[str] | str:
        """The symbols (or why not) of ``path`` on this host."""
        if size > MAX_BINARY_BYTES:
            return f"{path} is larger than {MAX_BINARY_BYTES >> 20} MiB"
        lock = self._locks.setdefault(claimed, asyncio.Lock())
        async with lock:
            known = self._by_md5.get(claimed)
            if known is not None:
                # The host's claim names bytes fetched and hashed here: if it lied, only its own row is wrong.
                return known
            cmd = shell_command(session.host, 'exec head -c "$2" -- "$1"', path, str(MAX_BINARY_BYTES + 1))
            try:
                async with asyncio.timeout(self.fetch_timeout):
                    res = await session.run(cmd)
            except TimeoutError:
                return f"reading {path} took more than {self.fetch_timeout:.0f}s"
            if not res.ok:
                return f"cannot read {path}: {res.stderr_text()}"
            if len(res.stdout) > MAX_BINARY_BYTES:
                return f"{path} is larger than {MAX_BINARY_BYTES >> 20} MiB"
            result = _function_symbols(res.stdout, path)
            md5 = hashlib.md5(res.stdout, usedforsecurity=False).hexdigest()
            self._by_md5[md5] = result
            return result


def _function_symbols(data: bytes, path: str) -> set[str] | str:
    """The defined function symbols of an ELF file (what a uprobe can name), or why not."""
    try:
        syms = elf.symbols(data)
    except (ValueError, IndexError, OverflowError, MemoryError, RecursionError) as exc:
        return f"{path} is not an ELF file fleetprobe can read: {exc}"
    return {s.name for s in syms if s.type in (2, 10) and s.shndx != 0 and _NAME.fullmatch(s.name)}


def _words(query: Query, suggest: bool = False) -> list[str]:
    """The script's arguments for ``query`` (with ``suggest``: the loose regexes of _near_regex)."""
    what = "".join(c for kind, c in ((FUNCTION, "f"), (TRACEPOINT, "t")) if kind in query.kinds)
    if query.fields and TRACEPOINT in query.kinds and not suggest:
        what += "d"
    if query.binary is not None:
        what += "x"
    if suggest:
        fre = tre = _near_regex(query.glob.rsplit(":", 1)[-1])
    else:
        fre, tre = glob_regex(query.glob), _tracepoint_regex(query.glob)
    return [what or "-", fre, tre, query.binary or ""]


def _near_regex(word: str) -> str:
    """Names sharing a 4-character piece with ``word``: a superset of its near names, grepped on the host
    so that only candidates travel (difflib then picks among them here)."""
    pieces = sorted({word[i:i + 4] for i in range(max(1, len(word) - 3))})
    return "|".join(re.escape(p) for p in pieces[:40]) or "."


async def list_host(session: Session, query: Query, timeout: float, symbols: _Symbols,
                    *, suggest: bool = False) -> HostListing:
    """List ``query``'s names on one connected host."""
    host = session.host
    stream = await session.stream(script_command(host, "fleetprobe-list", *_words(query, suggest)))
    stream.write(script_input(discover_script()))
    stream.write_eof()
    text = await _read_listing(stream, host.name, timeout)
    listing, claim = parse_listing(host.name, text, query)
    if claim is not None and query.binary is not None:
        got = await symbols.get(session, query.binary, *claim)
        if isinstance(got, str):
            listing.names[SYMBOL], listing.why[SYMBOL] = None, got
        else:
            pattern = re.compile(_near_regex(query.glob) if suggest else glob_regex(query.glob))
            listing.names[SYMBOL] = {s for s in got if pattern.search(s)}
    return listing


async def list_fleet(hosts: Iterable[Host], settings: RunSettings, query: Query, *,
                     suggest: bool = False) -> list[HostListing]:
    """Every host's listing (bounded fan-out); a host that fails is a listing with its error."""
    symbols = _Symbols(settings.setup_timeout)

    async def work(host: Host, session: Session) -> HostListing:
        return await list_host(session, query, settings.setup_timeout, symbols, suggest=suggest)

    return await fan_out(hosts, settings, "list", work, lambda host, exc: HostListing(host.name, error=exc))


@dataclass
class Row:
    """One name across the fleet."""

    kind: str
    name: str
    hosts: list[str]
    missing: list[str]
    fields: tuple[str, ...] = ()
    #: Hosts whose fields for this tracepoint differ from ``fields`` (the most common declaration).
    fields_differ: list[str] = field(default_factory=list)


def merge_listings(listings: list[HostListing], query: Query) -> list[Row]:
    """Names across the fleet, sorted by kind then name; ``missing``: hosts that could list the kind and
    lack the name (a host that cannot list a kind at all is reported once, not in every row)."""
    rows: list[Row] = []
    for kind in query.kinds:
        able = [x for x in listings if x.error is None and x.names.get(kind) is not None]
        seen: dict[str, list[str]] = {}
        for x in able:
            for name in x.names[kind] or ():
                seen.setdefault(name, []).append(x.host)
        order = [x.host for x in able]
        for name in sorted(seen):
            have = set(seen[name])
            row = Row(kind, name, [h for h in order if h in have], [h for h in order if h not in have])
            if kind == TRACEPOINT and query.fields:
                decls = [(x.host, x.fields.get(name, ())) for x in able if x.host in have]
                counts: dict[tuple[str, ...], int] = {}
                for _, d in decls:
                    counts[d] = counts.get(d, 0) + 1
                row.fields = max(counts, key=lambda d: counts[d]) if counts else ()
                row.fields_differ = [h for h, d in decls if d != row.fields]
            rows.append(row)
    return rows


def suggestions(query: Query, candidates: list[HostListing], n: int = 5) -> list[str]:
    """Near names for a query that matched nothing, from the names the hosts sent for _near_regex."""
    names: set[str] = set()
    for x in candidates:
        for kind in query.kinds:
            names |= x.names.get(kind) or set()
    word = query.glob
    if ":" in word and TRACEPOINT in query.kinds:
        pool = names
    else:
        # A bare event name matches tracepoints by their event part: compare like with like.
        pool = {n.rsplit(":", 1)[-1] for n in names} | names
    close = difflib.get_close_matches(word, sorted(pool), n=n * 3, cutoff=0.7)
    full: list[str] = []
    for c in close:
        # Show a tracepoint as group:event, whichever part matched.
        match = c if c in names else next((x for x in sorted(names) if x.endswith(":" + c)), c)
        if match not in full:
            full.append(match)
    return full[:n]


# --- near names for plan's skipped probes ------------------------------------------------------------

def _typo_queries(playbook: Playbook, facts: Facts, skipped: Iterable[str]) -> dict[str, Query]:
    """Skipped probe -> the query for its near names, when it was skipped because its name is absent
    (a tracepoint the kernel lacks; a function in neither available_filter_functions nor kallsyms)."""
    out: dict[str, Query] = {}
    for name in skipped:
        spec = playbook.probe(name)
        if spec.kind == "tracepoint" and spec.targets:
            tp = str(spec.targets[0])
            if facts.tracepoints.get(tp) is False:
                out[name] = Query(tp, (TRACEPOINT,), tp.replace("/", ":", 1))
        elif spec.kind in ("kprobe", "kretprobe") and facts.kprobe_events:
            targets = spec.kernel_targets()
            sfs = [facts.symbols.get(t.symbol) for t in targets]
            if targets and all(sf is not None and not sf.in_filter_functions and not sf.in_kallsyms
                               and not sf.clones for sf in sfs):
                out[name] = Query(targets[0].symbol, (FUNCTION,), targets[0].symbol)
    return out


async def suggest_for_plans(results: list[tuple[HostFacts, HostPlan | None]], playbook: Playbook,
                            settings: RunSettings) -> list[tuple[HostFacts, HostPlan | None]]:
    """The plans with "did you mean" near names (from that host's own lists) added to the reason of every
    probe skipped for a name the host does not have. Only such hosts are asked, once per name."""
    asks: dict[str, dict[str, Query]] = {}
    for hf, plan in results:
        if plan is not None and hf.facts is not None and plan.skipped:
            queries = _typo_queries(playbook, hf.facts, (s.name for s in plan.skipped))
            if queries:
                asks[hf.host.name] = queries
    if not asks:
        return results
    symbols = _Symbols(settings.setup_timeout)

    async def work(host: Host, session: Session) -> dict[str, list[str]]:
        near: dict[str, list[str]] = {}
        for probe, query in asks[host.name].items():
            listing = await list_host(session, query, settings.setup_timeout, symbols, suggest=True)
            names = suggestions(query, [listing], n=3)
            near[probe] = [n.replace(":", "/", 1) if query.kinds == (TRACEPOINT,) else n for n in names]
        return near

    def failed(host: Host, exc: HostError) -> dict[str, list[str]]:
        # No suggestions is no loss: the plan stands as it was.
        return {}

    hosts = [hf.host for hf, _ in results if hf.host.name in asks]
    found = dict(zip([h.name for h in hosts], await fan_out_hosts(hosts, settings, work, failed)))
    out: list[tuple[HostFacts, HostPlan | None]] = []
    for hf, plan in results:
        near = found.get(hf.host.name)
        if plan is not None and near:
            plan = replace(plan, skipped=tuple(
                replace(s, reason=s.reason + f" (did you mean {' or '.join(near[s.name])}?)")
                if near.get(s.name) else s for s in plan.skipped))
        out.append((hf, plan))
    return out


async def fan_out_hosts(hosts: list[Host], settings: RunSettings,
                        work: Callable[[Host, Session], Awaitable[T]],
                        failed: Callable[[Host, HostError], T]) -> list[T]:
    """orchestrate.fan_out for the listing stage."""
    return await fan_out(hosts, settings, "list", work, failed)
