"""A probe's ``aggregate:`` (in-kernel hist tables, or controller-side where the kernel cannot):
:class:`AggregateSpec` and its validation at file:line (:func:`parse_aggregate`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from yaml.nodes import Node, SequenceNode

from fleetprobe.errors import PlaybookError, did_you_mean
from fleetprobe.fetchargs import _STRING_TYPES, ArgSpec
from fleetprobe.yamlnodes import NodeReader, line_of

#: Names every event can be aggregated by: the task name and the pid (the kernel's common_pid).
AGG_SPECIAL_FIELDS = ("comm", "pid")
_AGG_KEYS = ("count", "histogram", "latency", "by", "top", "size")
_AGG_KINDS = ("count", "histogram", "latency")
# TRACING_MAP_BITS_MIN / _MAX in kernel/trace/tracing_map.h: a hist table holds 2^7..2^17 entries.
_AGG_SIZE_MIN, _AGG_SIZE_MAX = 1 << 7, 1 << 17
_AGG_MAX_KEYS = 8
_AGG_MAX_TOP = 10_000
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: playbook.RETURN_KINDS (playbook imports this module).
_RETURN_KINDS = ("kretprobe", "uretprobe")


@dataclass(frozen=True)
class AggregateSpec:
    """What a probe asks to be aggregated (``aggregate:`` in the playbook), per host then fleet-wide.

    ``kind`` is ``count`` (hits per value of each field in ``fields``, one table per
    field), ``histogram`` (log2 buckets of the numeric field ``value``, per value of
    the ``fields`` it is split ``by``) or ``latency`` (log2 buckets of entry->return
    nanoseconds of a return probe and the entry it pairs with, split ``by``).
    ``top`` is how many keys the report shows, ``size`` the kernel table's entries.
    """

    kind: str
    fields: tuple[str, ...] = ()
    value: str | None = None
    top: int = 20
    size: int = 2048
    line: int = 0


class _Fields:
    """Field names of one probe's aggregate, checked against what the probe has."""

    def __init__(self, reader: NodeReader, kind: str, known: tuple[str, ...]) -> None:
        self.r = reader
        # Tracepoint fields are known only from the host's format file: checked when planning.
        self.checkable = kind != "tracepoint"
        self.known = known

    def name(self, n: Node, k: str) -> str:
        """One field name."""
        name = self.r.string(n, k)
        if not _IDENT.fullmatch(name):
            raise self.r.error(n, k, f"field {name!r} must be an identifier")
        if self.checkable and name not in AGG_SPECIAL_FIELDS and name not in self.known:
            choices = [*AGG_SPECIAL_FIELDS, *self.known]
            raise self.r.error(n, k, f"{name!r} is not a field of this probe{did_you_mean(name, choices)}; "
                               f"allowed: {', '.join(choices)}", hint="aggregate by one of the probe's args, comm or pid")
        return name

    def names(self, n: Node, k: str) -> tuple[str, ...]:
        """A field name or a list of them (at most _AGG_MAX_KEYS, none twice)."""
        nodes = n.value if isinstance(n, SequenceNode) else [n]
        if not nodes:
            raise self.r.error(n, k, f"{k} must name at least one field")
        if len(nodes) > _AGG_MAX_KEYS:
            raise self.r.error(n, k, f"at most {_AGG_MAX_KEYS} fields")
        out = tuple(self.name(x, k) for x in nodes)
        if len(set(out)) != len(out):
            raise self.r.error(n, k, f"a field is named twice in {list(out)}")
        return out


def _agg_kind(r: NodeReader, node: Node, key: str, items: dict[str, tuple[Node, Node]], kind: str) -> str:
    """Which one of count, histogram, latency."""
    kinds = [k for k in _AGG_KINDS if k in items]
    if len(kinds) != 1:
        raise r.error(node, key, "aggregate needs exactly one of count, histogram, latency "
                      f"(found: {', '.join(kinds) or 'none'})",
                      hint="e.g. {count: [comm, path]}, {histogram: nr_sector, by: [comm]}, "
                           "{latency: true, by: [comm]}")
    if kind == "module":
        raise r.error(node, key, "a module probe's lines come from the kernel log; it cannot be "
                      "aggregated in the kernel", hint="aggregate a tracefs probe instead")
    return kinds[0]


def _histogram_value(r: NodeReader, f: _Fields, vnode: Node, key: str, args: tuple[ArgSpec, ...]) -> str:
    """The numeric field a histogram buckets."""
    value = f.name(vnode, f"{key}.histogram")
    arg = next((a for a in args if a.name == value), None)
    if value == "comm" or (arg is not None and (arg.type or "").split("[", 1)[0] in _STRING_TYPES):
        raise r.error(vnode, f"{key}.histogram", f"{value!r} is a string; a histogram needs a "
                      "number", hint="count strings with {count: [FIELD]}")
    return value


def _check_latency(r: NodeReader, knode: Node, vnode: Node, key: str, kind: str, pair_with: str | None) -> None:
    """``latency: true`` on a return probe (or a paired raw/tracepoint) with pair_with."""
    if not r.boolean(vnode, f"{key}.latency"):
        raise r.error(vnode, f"{key}.latency", "latency: false asks for nothing; leave it out")
    if kind not in _RETURN_KINDS and not (kind in ("raw", "tracepoint") and pair_with is not None):
        raise r.error(knode, f"{key}.latency", f"latency is measured on a return probe; this is a {kind}",
                      hint="put it on the kretprobe/uretprobe that pairs with the entry")
    if pair_with is None:
        raise r.error(knode, f"{key}.latency", "latency needs pair_with (the entry probe it is "
                      "measured from)")


def _by(r: NodeReader, f: _Fields, by: Node, key: str, agg_kind: str, value: str | None) -> tuple[str, ...]:
    """The ``by`` keys that split a histogram or a latency."""
    fields = f.names(by, f"{key}.by")
    if agg_kind == "latency" and (bad := [x for x in fields if x not in AGG_SPECIAL_FIELDS]):
        raise r.error(by, f"{key}.by", f"a latency can be split by comm or pid only "
                      f"(not {', '.join(bad)}): the kernel carries only those from the return "
                      "to the latency's synthetic event")
    if value is not None and value in fields:
        raise r.error(by, f"{key}.by", f"{value!r} is both the histogram and a key")
    return fields


def _top_size(r: NodeReader, items: dict[str, tuple[Node, Node]], key: str) -> tuple[int, int]:
    """``top`` (keys shown) and ``size`` (the kernel table's entries)."""
    top = 20
    if "top" in items:
        top = r.positive_int(items["top"][1], f"{key}.top")
        if top > _AGG_MAX_TOP:
            raise r.error(items["top"][1], f"{key}.top", f"top must be at most {_AGG_MAX_TOP}")
    size = 2048
    if "size" in items:
        size = r.positive_int(items["size"][1], f"{key}.size")
        if size & (size - 1) or not _AGG_SIZE_MIN <= size <= _AGG_SIZE_MAX:
            raise r.error(items["size"][1], f"{key}.size", f"size {size} must be a power of two from "
                          f"{_AGG_SIZE_MIN} to {_AGG_SIZE_MAX} (the kernel's hist table sizes)")
        if size < top:
            raise r.error(items["size"][1], f"{key}.size", f"size {size} is smaller than top {top}")
    return top, size


def parse_aggregate(r: NodeReader, node: Node, key: str, *, kind: str, known: tuple[str, ...],
                    args: tuple[ArgSpec, ...], pair_with: str | None) -> AggregateSpec:
    """``aggregate: {count: [F...] | histogram: F | latency: true, by: [F...], top: N, size: N}``."""
    items = r.mapping(node, key, _AGG_KEYS)
    agg_kind = _agg_kind(r, node, key, items, kind)
    f = _Fields(r, kind, known)
    knode, vnode = items[agg_kind]
    fields: tuple[str, ...] = ()
    value: str | None = None
    if agg_kind == "count":
        fields = f.names(vnode, f"{key}.count")
        if "by" in items:
            raise r.error(items["by"][0], f"{key}.by", "'by' splits a histogram or a latency; a count "
                          "already counts per value of each field it names")
    else:
        if agg_kind == "histogram":
            value = _histogram_value(r, f, vnode, key, args)
        else:
            _check_latency(r, knode, vnode, key, kind, pair_with)
        if "by" in items:
            fields = _by(r, f, items["by"][1], key, agg_kind, value)
    top, size = _top_size(r, items, key)
    return AggregateSpec(kind=agg_kind, fields=fields, value=value, top=top, size=size, line=line_of(node))


__all__ = ["AGG_SPECIAL_FIELDS", "AggregateSpec", "PlaybookError", "parse_aggregate"]
