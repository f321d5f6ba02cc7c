"""Runner: the controller's side of the on-host runner (runner.sh).

Turns a :class:`~fleetprobe.plan.HostPlan` into the runner's stdin
directives, and the runner's ``@@fp`` control lines into a
:class:`RunnerReport` (what was placed, what the kernel refused and why,
loss counter deltas, and whether the host was left clean).  Pure: the
orchestrator owns the SSH stream.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar
from importlib.resources import files

from ..facts import bounded_int, facts_script
from ..outcome import LossCounters
from ..plan import HostPlan


@functools.cache
def runner_script() -> str:
    """The on-host runner (POSIX sh, busybox-compatible); read once per process, not once per host.

    facts.sh goes in front of it as the subshell function ``fp_facts``, so that a run gathers
    facts on the runner's own channel (arguments ``facts`` + :func:`~fleetprobe.facts.facts_args`)
    instead of opening a second one: a channel costs the controller about as much as the facts.
    """
    return ("fp_facts() (\n" + facts_script().rstrip("\n") + "\n)\n"
            + files("fleetprobe.runner").joinpath("runner.sh").read_text())


@dataclass(frozen=True)
class ModuleLoad:
    """A kernel module the runner loads: its kernel name, where the .ko was put on the host, its parameters.

    ``source`` is the module folder's name (fp_kprobe) when ``name`` is the per-run name it loads under.
    """

    name: str
    remote_path: str
    params: tuple[tuple[str, str], ...] = ()
    source: str = ""


def plan_directives(plan: HostPlan, *, tracefs: str, duration: float, deadline: int, grace: int,
                    buffer_kb: int | None = None, modules: tuple[ModuleLoad, ...] = (),
                    secret: str = "") -> str:
    """The runner's stdin up to ``go``: the secret, definitions, then modules, filters, enables.

    Order matters: a dynamic event appears under the instance once defined, so
    its filter and enable must come after its definition. ``secret`` (hex) frames every
    control line the runner prints from then on (:func:`fleetprobe.traceline.control_prefix`).
    """
    lines = [f"secret {secret}"] if secret else []
    lines += [f"tracefs {tracefs}", f"group {plan.group}", f"instance {plan.instance}",
             f"duration {max(1, int(duration + 0.999))}", f"deadline {deadline}", f"grace {grace}"]
    if buffer_kb:
        lines.append(f"buffer_kb {buffer_kb}")
    for p in plan.probes:
        if p.definition and p.events_file:
            lines.append(f"def {p.events_file} {p.definition}")
    for m in modules:
        params = " ".join(f"{k}={v}" for k, v in m.params)
        lines.append(f"module {m.name} {m.remote_path} {params}".rstrip())
    for p in plan.probes:
        if p.filter and p.event:
            lines.append(f"filter {p.event} {p.filter}")
    for p in plan.probes:
        if p.framing.startswith("guarded") and p.event:
            # The runner adds !(F ~ "*[\t-\v]*") for each field and COMM to the event's filter.
            lines.append(" ".join(["guard", p.event, *p.guard]))
    lines += aggregate_directives(plan)
    for p in plan.probes:
        if p.event and p.kind != "module" and p.stream:
            lines.append(f"enable {p.event}")
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"a runner directive may not contain a newline: {line!r}")
    return "\n".join(lines) + "\ngo\n"


def aggregate_directives(plan: HostPlan) -> list[str]:
    """Synthetic events, then hist triggers in dependency order, then the hist files to read at the end.

    A filter on an aggregating probe goes onto its triggers (``hist:... if FILTER``):
    the event's own filter file only filters what reaches the ring buffer.
    """
    if not plan.aggregates:
        return []
    filters = {p.event: p.filter for p in plan.probes if p.filter}
    lines = ["notrace_self"]
    for ap in plan.aggregates:
        lines += [f"synth {s}" for s in ap.synthetic]
    reads: list[str] = []
    for ap in plan.aggregates:
        for t in ap.triggers:
            f = filters.get(t.event)
            lines.append(f"trigger {t.event} {t.line}" + (f" if {f}" if f else ""))
            if t.table and t.event not in reads:
                reads.append(t.event)
    return lines + [f"histread {e}" for e in reads]


def teardown_directives(plan: HostPlan, tracefs: str, modules: tuple[str, ...] = (),
                        processes: tuple[str, ...] = ()) -> str:
    """The runner's stdin to remove one run's group and instance now (its own runner died).

    ``processes``: the dead runner's own processes as it named them (``PID:START``, its "own"
    line); those still alive with that start time are stopped (its watchdog sleeps until the deadline).
    """
    words = [w for w in processes if _OWN_WORD.fullmatch(w)]
    own = f"own {' '.join(words)}\n" if words else ""
    return (f"tracefs {tracefs}\ngroup {plan.group}\ninstance {plan.instance}\n{own}"
            f"teardown {' '.join(modules)}\n")


_OWN_WORD = re.compile(r"\d+:\d+")


def sweep_directives(tracefs: str, grace: int) -> str:
    """The runner's stdin for a sweep of stale fleetprobe leftovers only."""
    return f"tracefs {tracefs}\ngrace {grace}\nsweep\n"


# Bounded: a counter past 2**64 is a host lying (and 5000 digits is a ValueError in int()).
_STATS_FIELD = re.compile(r"(\w+)=(\d{1,20})(?!\d)")
_HIST_UNESCAPE = re.compile(r"%(25|5B)")


def _unescape(m: re.Match[str]) -> str:
    """``%25`` -> ``%``, ``%5B`` -> ``[`` (runner.sh hist_read escapes them), in one pass."""
    return "%" if m.group(1) == "25" else "["
_DEF_NAME = re.compile(r"^[pr]\d*:([^/\s]+)/(\S+)")


@dataclass
class RunnerReport:
    """What the runner said about one host, line by line."""

    hello: bool = False
    started: bool = False
    enabled: int = 0
    #: hist triggers placed (in-kernel aggregation runs a probe without enabling its event).
    triggers: int = 0
    stop_reason: str = ""
    #: (seconds asked, seconds probed) when placing the probes ate the teardown slack and the
    #: window was cut to end by the deadline.
    shortened: tuple[int, int] | None = None
    #: The on-host timer was gone before the teardown: it removed the probes under the run.
    watchdog_fired: bool = False
    clean: bool | None = None
    unclean: list[str] = field(default_factory=list)
    bye: bool = False
    placed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    pongs: list[tuple[float, str]] = field(default_factory=list)
    kernel: dict[str, dict[str, int]] = field(default_factory=dict)
    stats: dict[str, dict[str, dict[str, int]]] = field(default_factory=lambda: {"start": {}, "end": {}})
    kev: dict[str, list[str]] = field(default_factory=lambda: {"start": [], "end": []})
    kprof: dict[str, list[str]] = field(default_factory=lambda: {"start": [], "end": []})
    #: Hist files read at the end ({event: text}), triggers and synthetic events the kernel refused.
    hist: dict[str, list[str]] = field(default_factory=dict)
    trigger_refused: dict[tuple[str, str], str] = field(default_factory=dict)
    synth_refused: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _hist_event: str | None = None
    #: The runner's own long-lived processes (its shell, watchdog, stdin watcher, timer, reader ...):
    #: their pids are filtered out of every event in the kernel (``common_pid != N``).
    own_pids: list[int] = field(default_factory=list)
    #: The same as ``PID:START`` words, for a teardown that must stop them (see teardown_directives).
    own_processes: list[str] = field(default_factory=list)
    #: Events whose filter the kernel refused with that clause, and its words: the controller drops
    #: the own pids' events of those itself.
    own_unfiltered: dict[str, str] = field(default_factory=dict)
    #: Events whose newline guard (plan.PlannedProbe.guard) the kernel refused: {event: why}.
    unguarded: dict[str, str] = field(default_factory=dict)
    #: Events the guards kept out of the ring buffer (a string or comm held a newline), counted in
    #: the guard instance; None until the runner says. ``guard_uncounted``: why some were not counted.
    guarded_out: int | None = None
    guard_uncounted: list[str] = field(default_factory=list)
    #: The same by guarded event (``guardcount EVENT N``: each event has a guard instance of its own).
    guarded_by_event: dict[str, int] = field(default_factory=dict)

    #: Control lines kept (in every list and table together): a runner says a few hundred; past
    #: this, lines are counted in ``dropped`` and the report says so (issue 11 #5).
    MAX_LINES = 20000
    #: The longest control line kept whole.
    MAX_LINE_CHARS = 4096
    kept: int = 0
    dropped: int = 0

    #: Words that set one flag or value: always taken, past MAX_LINES too.
    _ALWAYS_TAKEN: ClassVar[frozenset[str]] = frozenset(
        ("hello", "started", "stopping", "clean", "bye", "kernel", "hist"))

    def handle(self, text: str) -> None:
        """Take one control line (without its ``@@fp `` prefix); a word no handler knows is ignored."""
        word, _, rest = text.partition(" ")
        if word not in self._ALWAYS_TAKEN:
            # Collected lines are bounded; the words that set one flag or value are always taken.
            if self.kept >= self.MAX_LINES:
                self.dropped += 1
                return
            self.kept += 1
        if len(rest) > self.MAX_LINE_CHARS:
            rest = rest[:self.MAX_LINE_CHARS] + "...(cut)"
        handler = _HANDLERS.get(word)
        if handler is not None:
            handler(self, word, rest)

    # --- one handler per control word (the table _HANDLERS, below the class, declares them) -----

    def _hello(self, word: str, rest: str) -> None:
        self.hello = True

    def _started(self, word: str, rest: str) -> None:
        self.started = True
        m = re.search(r"enabled=(\d+)", rest)
        self.enabled = int(m.group(1)) if m else 0
        m = re.search(r"triggers=(\d+)", rest)
        self.triggers = int(m.group(1)) if m else 0

    def _stopping(self, word: str, rest: str) -> None:
        self.stop_reason = rest.strip()

    def _shortened(self, word: str, rest: str) -> None:
        # "ASKED ROOM": whole seconds the playbook asked for, and what was left before the deadline.
        nums = [int(w) for w in rest.split()[:2] if w.isdigit()]
        if len(nums) == 2:
            self.shortened = (nums[0], nums[1])

    def _watchdog_fired(self, word: str, rest: str) -> None:
        self.watchdog_fired = True

    def _clean(self, word: str, rest: str) -> None:
        self.clean = True

    def _unclean(self, word: str, rest: str) -> None:
        self.clean = False
        self.unclean.append(rest.strip())

    def _bye(self, word: str, rest: str) -> None:
        self.bye = True

    def _placed(self, word: str, rest: str) -> None:
        self.placed.append(rest.strip())

    def _refusal(self, word: str, rest: str) -> None:
        what, _, why = rest.partition(" :: ")
        # The first refusal is the cause (a refused definition then also fails its filter and enable).
        self.refused.setdefault(_event_key(what.strip()),
                                f"{word[:-4]} refused: {' '.join(why.split())}".strip())

    def _own(self, word: str, rest: str) -> None:
        # "PID:START" words (START: the process's start time, so a teardown never kills a reused pid).
        words = [w for w in rest.split() if w.partition(":")[0].isdigit()]
        self.own_pids = [int(w.partition(":")[0]) for w in words]
        self.own_processes = words

    def _guardcount(self, word: str, rest: str) -> None:
        # "guardcount EVENT N": that event's kept out; "guardcount N": the host's total;
        # "guardcount none :: why": not counted.
        if rest.startswith("none"):
            self.guard_uncounted.append(" ".join(rest.partition(" :: ")[2].split()) or "refused")
            return
        event, _, number = rest.strip().rpartition(" ")
        count = bounded_int(number, 0, 1 << 62)
        if count is None:
            return
        if event:
            self.guarded_by_event[event] = count
        else:
            self.guarded_out = count

    def _unguarded(self, word: str, rest: str) -> None:
        what, _, why = rest.partition(" :: ")
        self.unguarded[what.strip()] = " ".join(why.split()) or "refused"

    def _ownfilter(self, word: str, rest: str) -> None:
        what, _, why = rest.partition(" :: ")
        self.own_unfiltered[what.strip()] = " ".join(why.split()) or "refused"

    def _loaded(self, word: str, rest: str) -> None:
        self.loaded.append(rest.strip())

    def _error(self, word: str, rest: str) -> None:
        self.errors.append(rest.strip())

    def _kernel(self, word: str, rest: str) -> None:
        phase, _, values = rest.partition(" ")
        self.kernel[phase] = {k: int(v) for k, v in _STATS_FIELD.findall(values)}

    def _pong(self, word: str, rest: str) -> None:
        self.pongs.append((time.time(), rest.strip()))

    def _swept(self, word: str, rest: str) -> None:
        self.swept.append(rest.strip())

    def _stats(self, word: str, rest: str) -> None:
        phase, _, tail = rest.partition(" ")
        cpu, _, values = tail.partition(" ")
        if phase in self.stats:
            self.stats[phase][cpu] = {k: int(v) for k, v in _STATS_FIELD.findall(values)}

    def _hl(self, word: str, rest: str) -> None:
        if self._hist_event is not None:
            # The runner escaped '%' and '[' so that no key can look like a trace line.
            self.hist[self._hist_event].append(_HIST_UNESCAPE.sub(_unescape, rest))

    def _hist(self, word: str, rest: str) -> None:
        ev = rest.strip()
        self._hist_event = None if ev == "end" else ev
        if self._hist_event is not None:
            self.hist.setdefault(self._hist_event, [])

    def _trigfail(self, word: str, rest: str) -> None:
        what, _, why = rest.partition(" :: ")
        ev, _, line = what.partition(" ")
        self.trigger_refused[(ev, line.strip())] = "trigger refused: " + " ".join(why.split())

    def _synthfail(self, word: str, rest: str) -> None:
        what, _, why = rest.partition(" :: ")
        self.synth_refused[what.strip()] = "synthetic event refused: " + " ".join(why.split())

    def _note(self, word: str, rest: str) -> None:
        self.notes.append(f"{word} {rest}")

    def _kernel_lines(self, word: str, rest: str) -> None:
        phase, _, line = rest.partition(" ")
        target = self.kev if word == "kev" else self.kprof
        if phase in target:
            target[phase].append(line)

    def loss(self, group: str) -> LossCounters:
        """Loss deltas over the run: ring-buffer overrun/dropped of our instance, kprobe misses of our events."""
        start, end = self.stats["start"], self.stats["end"]
        overrun = dropped = 0
        for cpu, values in end.items():
            before = start.get(cpu, {})
            overrun += max(0, values.get("overrun", 0) - before.get("overrun", 0))
            dropped += max(0, values.get("dropped", 0) - before.get("dropped", 0))
        misses: dict[str, int] = {}
        before_m = _profile(self.kev["start"], self.kprof["start"], group)
        after_m = _profile(self.kev["end"], self.kprof["end"], group)
        for name, (_hits, miss) in after_m.items():
            misses[name] = max(0, miss - before_m.get(name, (0, 0))[1])
        return LossCounters(overrun=overrun, dropped=dropped, probe_misses=misses)

    def kernel_deltas(self) -> tuple[int, int] | None:
        """(oopses, warnings) between the start and end snapshots; None without both."""
        start, end = self.kernel.get("start"), self.kernel.get("end")
        if not start or not end or "oops" not in start or "oops" not in end:
            return None
        return end["oops"] - start["oops"], end.get("warn", 0) - start.get("warn", 0)

    def hits(self, group: str) -> dict[str, int]:
        """kprobe_profile hit counts of our events at the end (the kernel's own count, loss or not)."""
        return {k: v[0] for k, v in _profile(self.kev["end"], self.kprof["end"], group).items()}



#: The control words runner.sh says, each with its handler: the one place they are declared.
_HANDLERS: dict[str, Callable[[RunnerReport, str, str], None]] = {
    "hello": RunnerReport._hello,
    "started": RunnerReport._started,
    "stopping": RunnerReport._stopping,
    "shortened": RunnerReport._shortened,
    "watchdog-fired": RunnerReport._watchdog_fired,
    "clean": RunnerReport._clean,
    "unclean": RunnerReport._unclean,
    "bye": RunnerReport._bye,
    "placed": RunnerReport._placed,
    "deffail": RunnerReport._refusal,
    "modfail": RunnerReport._refusal,
    "filterfail": RunnerReport._refusal,
    "enablefail": RunnerReport._refusal,
    "own": RunnerReport._own,
    "guardcount": RunnerReport._guardcount,
    "unguarded": RunnerReport._unguarded,
    "ownfilter": RunnerReport._ownfilter,
    "loaded": RunnerReport._loaded,
    "error": RunnerReport._error,
    "kernel": RunnerReport._kernel,
    "pong": RunnerReport._pong,
    "swept": RunnerReport._swept,
    "stats": RunnerReport._stats,
    "hl": RunnerReport._hl,
    "hist": RunnerReport._hist,
    "trigfail": RunnerReport._trigfail,
    "synthfail": RunnerReport._synthfail,
    "notrace": RunnerReport._note,
    "histfail": RunnerReport._note,
    "kev": RunnerReport._kernel_lines,
    "kprof": RunnerReport._kernel_lines,
}

def clock_sample(sent: float, received: float, host_realtime: str) -> tuple[float, float] | None:
    """(offset, error) from one ping sent at ``sent`` and answered at ``received`` (controller realtime).

    ``host_realtime`` is the pong's text.  ``RX TX``: the host's realtime when the
    ping came and when its answer left (NTP's four timestamps: the offset is the mean of
    RX - sent and TX - received, the error half the round trip less the time the host
    held the answer).  ``RT [UNCERTAINTY]``: one stamp of an answer sent at once (host time
    minus the round trip's midpoint, +/- half of it).  busybox ``date`` without %N gives
    whole seconds: the error grows by a second (and a held answer counts whole).
    """
    words = host_realtime.split()
    if not words:
        return None
    rx = _stamp(words[0])
    if rx is None:
        return None
    tx = _stamp(words[1]) if len(words) == 2 else None
    if tx is not None and tx[0] >= rx[0]:
        if not rx[1] and not tx[1]:
            held = tx[0] - rx[0]
            return ((rx[0] - sent) + (tx[0] - received)) / 2, max(received - sent - held, 0.0) / 2
        return rx[0] - (sent + received) / 2, (received - sent) / 2 + 1.0
    # "SECS 1": the host could only tell whole seconds (it says how uncertain it is).
    extra = float(words[1]) if len(words) > 1 and words[1].replace(".", "", 1).isdigit() else 0.0
    return rx[0] - (sent + received) / 2, (received - sent) / 2 + max(extra, 1.0 if rx[1] else 0.0)


def _stamp(text: str) -> tuple[float, bool] | None:
    """A host realtime stamp -> (seconds, whole seconds only?); ``150.%N`` (busybox date) is whole."""
    whole = "." not in text or not text.split(".", 1)[1].isdigit()
    try:
        return float(text.split(".", 1)[0] if whole else text), whole
    except ValueError:
        return None


def _event_key(definition: str) -> str:
    """The event name in a definition or event path: ``p:grp/open do_sys_open`` and ``grp/open`` -> ``open``.

    filterfail/enablefail name the event as GROUP/NAME; the orchestrator looks refusals up by NAME.
    """
    m = _DEF_NAME.match(definition)
    return m.group(2) if m else definition.rsplit("/", 1)[-1]


def _profile(kev: list[str], kprof: list[str], group: str) -> dict[str, tuple[int, int]]:
    """Zip kprobe_events with kprobe_profile (same order; the profile omits the group) for our group."""
    out: dict[str, tuple[int, int]] = {}
    for definition, prof in zip(kev, kprof):
        m = _DEF_NAME.match(definition)
        parts = prof.split()
        if not m or m.group(1) != group or len(parts) < 3:
            continue
        try:
            out[m.group(2)] = (int(parts[-2]), int(parts[-1]))
        except ValueError:
            continue
    return out
