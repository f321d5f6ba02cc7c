"""Every option of the ``fleetprobe`` command line, each defined once, and the exit statuses.

:func:`build_parser` builds the parser of every subcommand; it imports no SSH library, no rich
and no stage that talks to hosts, so ``fleetprobe --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import enum
from typing import Any

from fleetprobe.audit import Thresholds
from fleetprobe.errors import InputError
from fleetprobe.cli.lab import add_lab_parser
from fleetprobe.playbook import parse_duration as playbook_duration
from fleetprobe.shard import Shard, parse_shard
from fleetprobe.store import DEFAULT_EVENTS_DAYS, default_path
from fleetprobe.version import __version__


#: kmod.plan.WHERE_CHOICES (tests/test_cli.py checks they agree), without importing the builder for --help.
WHERE_CHOICES = ("auto", "host", "controller")


class Exit(enum.IntEnum):
    """Exit statuses, for schedulers and scripts."""

    OK = 0            # every host ok
    BAD_INPUT = 1     # bad playbook, inventory or option: nothing was touched
    SOME_FAILED = 2   # some hosts failed or were unreachable
    NONE_OK = 3       # no host was probed successfully
    AUDIT_FAILED = 4  # `fleetprobe audit`: a rule broke or the run differs from its baseline
    INTERRUPTED = 130


def parse_duration(text: str) -> float:
    """``500ms``, ``10s``, ``5m``, ``1h`` or plain seconds -> seconds."""
    seconds = playbook_duration(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration of at most 7 days (e.g. 500ms, 10s, 5m, 1h)")
    return seconds


def _positive_int(text: str) -> int:
    """An int > 0 for argparse."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return v


#: The longest --grace / --teardown-slack (a day): a run's on-host timer and sweeps use them.
MAX_GRACE = 86400


def _grace_seconds(text: str) -> int:
    """Whole seconds in [0, MAX_GRACE] for argparse: a negative grace made a sweep remove another
    operator's live probes, a huge one leaves a dead run's probes on a host for ever."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= MAX_GRACE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds from 0 to {MAX_GRACE}")
    return v


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that talks to hosts (defined once)."""
    g = p.add_argument_group("hosts and SSH")
    g.add_argument("-i", "--inventory", default=None,
                   help="Ansible inventory (YAML, INI, directory, script, --list JSON), or hosts as host1,host2:2222, "
                        "(default: ANSIBLE_INVENTORY, ansible.cfg's inventory, /etc/ansible/hosts)")
    g.add_argument("--inventory-reader", choices=("builtin", "ansible"), default="builtin",
                   help="builtin: fleetprobe reads the static formats (refuses Jinja and vault); ansible: the "
                        "installed ansible-core reads the inventory (Jinja, vault, plugins)")
    g.add_argument("-l", "--limit", help="Ansible host pattern, exactly as ansible --limit: group, host, glob, ~regex, "
                                         "a:b, a:&b, a:!b, g[0], g[1:3], @file")
    g.add_argument("-f", "--forks", type=_positive_int, default=200,
                   help="hosts connecting/gathering facts at once (default 200); probing is not limited")
    g.add_argument("--connect-timeout", type=parse_duration, default=15.0, help="per connection (default 15s)")
    g.add_argument("--setup-timeout", type=parse_duration, default=60.0,
                   help="per host for connect + facts + plan (default 60s)")
    g.add_argument("--known-hosts", action="append", default=[], metavar="FILE",
                   help="known_hosts file to trust instead of UserKnownHostsFile (repeatable; default: what your "
                        "OpenSSH config says)")
    g.add_argument("--ssh-config", action="append", default=None, metavar="FILE",
                   help="OpenSSH config file to read instead of ~/.ssh/config and /etc/ssh/ssh_config, like ssh -F "
                        "(repeatable; 'none' for none)")
    g.add_argument("--identity", action="append", default=[], metavar="KEY", help="private key to offer")
    g.add_argument("--accept-new-host-keys", action="store_true",
                   help="trust and record the key of a host not yet in known_hosts (a changed key still fails)")
    g.add_argument("--no-agent", action="store_true", help="do not use ssh-agent")
    g.add_argument("--mount-tracefs", action="store_true",
                   help="mount tracefs on hosts where it is not mounted")


def _add_playbook_argument(p: argparse.ArgumentParser) -> None:
    """The playbook: a file, a shipped name, ``-`` (stdin), or ``-e`` expressions instead."""
    p.add_argument("playbook", nargs="?",
                   help="playbook file, shipped playbook name, or '-' to read it from stdin")
    p.add_argument("-e", "--probe", dest="expressions", action="append", metavar="'PROBE [ARG...] [if FILTER]'",
                   help="an ad-hoc probe instead of a playbook (repeatable), e.g. "
                        "-e 'kprobe:do_sys_openat2 path=+0(arg2):string if comm != \"sshd\"'; see README")


def _add_cluster_option(p: argparse.ArgumentParser) -> None:
    """``--cluster`` (``run`` and ``audit``)."""
    p.add_argument("--cluster", metavar="SCHEDULER",
                   help="run the hosts on the Dask workers of their zone (fleetprobe_zone, or a group named as "
                        "a zone; fleetprobe worker --zone Z on each bastion), e.g. tcp://sched:8786; raw events "
                        "come back to this process as the run goes on; needs fleetprobe[cluster]")


def _add_build_option(p: argparse.ArgumentParser) -> None:
    """``--build-at`` for the commands that plan or run module probes."""
    p.add_argument("--build-at", choices=WHERE_CHOICES, default="auto",
                   help="where kernel modules are built, once per (arch, kernel release, source): auto (the "
                        "controller for a Debian kernel with a cross compiler, else each host with headers, make "
                        "and cc, for itself), host, or controller (default: auto)")
    p.add_argument("--trust-build-host", action="append", default=[], metavar="HOST",
                   help="let other hosts of HOST's kernel load the module HOST builds, and keep it in the "
                        "module cache (repeatable; default: a host's build is loaded by that host only)")


def _shard_arg(text: str) -> Shard:
    """argparse type for ``--shard i/N``."""
    try:
        return parse_shard(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_store_option(p: argparse.ArgumentParser, *, allow_none: bool) -> None:
    """``--store PATH`` (and ``--no-store`` where storing is optional)."""
    p.add_argument("--store", metavar="PATH",
                   help=f"history database (default {default_path()}, under $XDG_DATA_HOME)")
    if allow_none:
        p.add_argument("--no-store", action="store_true", help="do not record this run in the history")


def add_run_options(p: argparse.ArgumentParser, *, reports: bool = True) -> None:
    """Options ``run`` and ``audit`` share: HTML/Markdown reports (``reports``), transport, event retention."""
    if reports:
        p.add_argument("--html", metavar="FILE",
                       help="write a self-contained HTML report (charts, fleet timeline; '-' for stdout)")
        p.add_argument("--markdown", metavar="FILE", help="write a Markdown summary (for tickets; '-' for stdout)")
    p.add_argument("--transport", choices=("asyncssh", "fabric"), default="asyncssh",
                   help="SSH library (default asyncssh; fabric needs the 'fabric' extra)")
    p.add_argument("--keep-events-days", type=float, default=DEFAULT_EVENTS_DAYS, metavar="DAYS",
                   help=f"drop stored raw events older than this (default {DEFAULT_EVENTS_DAYS:g}; "
                        "reports are kept)")


#: ``--format``: how a command prints its table (cli.output.print_table).
TABLE_FORMATS = ("table", "tsv", "json")


def add_format_option(p: argparse.ArgumentParser) -> None:
    """``--format``: the table for people, or tab-separated / JSON rows for scripts (uncut either way)."""
    p.add_argument("--format", choices=TABLE_FORMATS, default="table",
                   help="how to print the table: table (default; full width when piped), tsv (a header "
                        "line, then one row a line, tab-separated; a host's tabs, newlines and control "
                        "characters shown as \\xNN escapes) or json (an array of objects)")


def add_shard_option(p: argparse.ArgumentParser) -> None:
    """``--shard i/N``: this bastion's share of the inventory."""
    p.add_argument("--shard", type=_shard_arg, metavar="i/N",
                   help="probe only shard i of N (stable split by host name; merge the JSON reports)")


def _add_report_outputs(p: argparse.ArgumentParser) -> None:
    """--json/--html/--markdown for commands that render a report."""
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report ('-' for stdout)")
    p.add_argument("--markdown", metavar="FILE", help="write a Markdown summary ('-' for stdout)")


def _add_threshold_options(p: argparse.ArgumentParser) -> None:
    """How large a change must be to count."""
    p.add_argument("--factor", type=float, default=Thresholds.factor,
                   help=f"hits on a host moved when they changed by this factor (default {Thresholds.factor:g})")
    p.add_argument("--min-count", type=int, default=Thresholds.min_count,
                   help=f"ignore count changes below this many hits (default {Thresholds.min_count})")
    p.add_argument("--value-field", action="append", metavar="FIELD",
                   help="report new values of this field (repeatable; default comm and string fields)")


def _thresholds(args: argparse.Namespace) -> Thresholds:
    """Thresholds from options."""
    if args.factor <= 1.0:
        raise InputError(f"--factor {args.factor:g} must be greater than 1", hint="e.g. --factor 2")
    return Thresholds(args.factor, args.min_count, tuple(args.value_field) if args.value_field else None)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fleetprobe",
        description="Run kernel probes across a fleet over SSH and merge what they see into one report.")
    parser.add_argument("--version", action="version", version=f"fleetprobe {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("facts", help="what each host can probe (arch, kernel, tracefs, kprobes, lockdown ...)")
    _add_connection_options(p)
    p.add_argument("--json", metavar="FILE", help="write the facts as JSON ('-' for stdout)")
    add_format_option(p)
    add_shard_option(p)

    p = sub.add_parser("list", help="what the fleet can probe, by name: kernel functions, tracepoints, "
                                    "a binary's symbols; with the hosts that have each",
                       description="List probeable names across the fleet (like bpftrace -l, perf probe -F). "
                                   "PATTERN is a glob with an optional prefix: 'kprobe:vfs_*', "
                                   "'tracepoint:sched:*', 'uprobe:/bin/bash:read*'; none: functions and "
                                   "tracepoints. A name no host has gets near names. Exit 1 when nothing matches.")
    p.add_argument("pattern", nargs="?", metavar="PATTERN", help="glob of names (default: every name)")
    p.add_argument("-x", "--binary", metavar="BINARY", help="list this binary's function symbols (uprobes)")
    p.add_argument("--fields", action="store_true", help="show each tracepoint's fields")
    p.add_argument("--playbooks", action="store_true",
                   help="list the shipped playbooks instead, each with the question it answers (no hosts needed)")
    _add_connection_options(p)
    p.add_argument("--json", metavar="FILE", help="write the listing as JSON ('-' for stdout)")
    add_shard_option(p)

    p = sub.add_parser("plan", help="per host: the exact tracefs lines a run would write; changes nothing")
    _add_playbook_argument(p)
    _add_connection_options(p)
    p.add_argument("--json", metavar="FILE", help="write the plans as JSON ('-' for stdout)")
    _add_build_option(p)
    add_shard_option(p)

    p = sub.add_parser("run", help="probe the fleet and print one merged report")
    _add_playbook_argument(p)
    _add_connection_options(p)
    p.add_argument("-d", "--duration", type=parse_duration, help="how long to probe (default: the playbook's)")
    p.add_argument("--event-cap", type=_positive_int, help="events per host (default: the playbook's)")
    p.add_argument("--json", metavar="FILE", help="write the merged report as JSON ('-' for stdout)")
    p.add_argument("--events", metavar="FILE", help="write every event as a JSON line ('-' for stdout)")
    p.add_argument("--print", action="store_true",
                   help="print every event as it arrives, one line each: host probe comm pid fields")
    p.add_argument("--grace", type=_grace_seconds, default=60,
                   help="seconds past a run's deadline before its on-host timer or a sweep removes it")
    p.add_argument("--teardown-slack", type=_grace_seconds, default=30,
                   help="seconds after the planned end before a host's on-host timer may remove the run "
                        "(the timer fires at end + slack + grace); a host slower than this to place its "
                        "probes has its window cut to end by then, and the report says so")
    p.add_argument("--buffer-kb", type=_positive_int, help="per-CPU ring buffer of the run's instance")
    p.add_argument("--allow-modules", action="store_true", help="allow playbooks to load kernel modules")
    _add_build_option(p)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.add_argument("--no-live", action="store_true", help="no live progress view")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="worker processes, each probing a slice of the hosts on its own core; one merged "
                        "report (default: the cores this process may use; 1: one event loop, in this process)")
    _add_cluster_option(p)
    add_run_options(p)
    add_store_option(p, allow_none=True)
    add_shard_option(p)

    p = sub.add_parser("cleanup", help="find and remove anything fleetprobe left on hosts")
    _add_connection_options(p)
    p.add_argument("--grace", type=_grace_seconds, default=60, help="keep runs whose deadline passed less than this ago")
    p.add_argument("--force", action="store_true", help="also remove runs that are still live")
    add_format_option(p)

    add_lab_parser(sub)
    _add_history_parsers(sub)
    _add_worker_parser(sub)
    return parser


#: A zone's name becomes the Dask resource fleetprobe-zone-ZONE: what a resource name may hold.
_ZONE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _zone(text: str) -> str:
    if not text or not _ZONE_CHARS.issuperset(text) or text[0] in ".-":
        raise argparse.ArgumentTypeError(f"{text!r}: a zone is letters, digits, '.', '_' and '-' (not first), "
                                         "as in the hosts' fleetprobe_zone or a group name")
    return text


def _add_worker_parser(sub: Any) -> None:
    """``fleetprobe worker``: the zone's Dask workers on a bastion (the cluster extra)."""
    p = sub.add_parser("worker", help="on a zone's bastion: Dask workers that run the --cluster slices of "
                                      "that zone's hosts (needs fleetprobe[cluster])",
                       description="Start Dask workers serving one zone for `fleetprobe run --cluster`: each "
                                   "worker process takes one slice of the zone's hosts per run (one event "
                                   "loop, one thread). Runs until stopped (Ctrl-C, SIGTERM). Same as "
                                   "fleetprobe-worker.")
    p.add_argument("--scheduler", required=True, metavar="ADDRESS",
                   help="the Dask scheduler's address, e.g. tcp://sched:8786")
    p.add_argument("--zone", required=True, type=_zone,
                   help="the zone whose hosts this bastion reaches (a host's fleetprobe_zone or group)")
    p.add_argument("--nworkers", type=_positive_int, default=None, metavar="N",
                   help="worker processes (default: the cores this process may use, as run's --workers)")


def _add_history_parsers(sub: Any) -> None:
    """Add history, show, diff, audit and merge to the CLI's subparsers."""
    p = sub.add_parser("history", help="list stored runs (newest first)")
    add_store_option(p, allow_none=False)
    p.add_argument("--playbook", help="only runs of this playbook (its name)")
    p.add_argument("-n", "--last", type=_positive_int, default=30, help="how many runs, newest first (default 30)")
    p.add_argument("--json", metavar="FILE", help="write the list as JSON ('-' for stdout)")
    add_format_option(p)
    p.add_argument("--prune", action="store_true", help="apply retention now (see --keep-*-days)")
    p.add_argument("--keep-events-days", type=float, default=DEFAULT_EVENTS_DAYS, metavar="DAYS",
                   help=f"with --prune: drop raw events older than this (default {DEFAULT_EVENTS_DAYS:g})")
    p.add_argument("--keep-runs-days", type=float, metavar="DAYS", help="with --prune: drop whole runs older than this")

    p = sub.add_parser("show", help="re-render a stored run (RUN: id, unique prefix, last or last~N)")
    p.add_argument("run")
    add_store_option(p, allow_none=False)
    _add_report_outputs(p)
    p.add_argument("--events", metavar="FILE", help="write the run's stored raw events as JSON lines")

    p = sub.add_parser("diff", help="what changed between two stored runs (exit 4 when anything did)")
    p.add_argument("run_a")
    p.add_argument("run_b")
    add_store_option(p, allow_none=False)
    _add_threshold_options(p)
    p.add_argument("--json", metavar="FILE", help="write the changes as JSON ('-' for stdout)")

    p = sub.add_parser("audit", help="run, store and judge a playbook against its rules and a baseline run")
    _add_playbook_argument(p)
    _add_connection_options(p)
    add_shard_option(p)
    p.add_argument("-d", "--duration", type=parse_duration, help="how long to probe (default: the playbook's)")
    p.add_argument("--event-cap", type=_positive_int, help="events per host (default: the playbook's)")
    p.add_argument("--grace", type=_grace_seconds, default=60, help="seconds past the deadline before on-host cleanup")
    p.add_argument("--buffer-kb", type=_positive_int, help="per-CPU ring buffer of the run's instance")
    p.add_argument("--allow-modules", action="store_true", help="allow playbooks to load kernel modules")
    add_store_option(p, allow_none=False)
    p.add_argument("--baseline", metavar="RUN", help="compare with this stored run (default: the playbook's "
                   "'baseline:', else the previous run of the same playbook)")
    p.add_argument("--strict", action="store_true", help="any change from the baseline fails the audit")
    _add_threshold_options(p)
    _add_report_outputs(p)
    add_run_options(p, reports=False)
    p.add_argument("--events", metavar="FILE", help="also write every event as a JSON line ('-' for stdout)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="worker processes probing slices of the hosts; one merged report, judged once "
                        "(default: the cores this process may use; 1: one event loop, in this process)")
    _add_cluster_option(p)
    p.add_argument("--on-fail", metavar="CMD",
                   help="when the audit fails, run CMD (with sh -c) with the audit JSON on its stdin")
    p.add_argument("--prometheus", metavar="FILE",
                   help="write a node_exporter textfile (e.g. /var/lib/prometheus/node-exporter/"
                        "fleetprobe-NAME.prom): verdict, per host up/lost/failures, per probe hits")

    p = sub.add_parser("merge", help="combine shard JSON reports into the report of the whole fleet")
    p.add_argument("reports", nargs="+", metavar="REPORT.json")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="merged JSON report ('-' for stdout)")
    p.add_argument("--html", metavar="FILE", help="also write the merged HTML report")
    p.add_argument("--markdown", metavar="FILE", help="also write the merged Markdown summary")
