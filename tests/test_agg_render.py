"""aggregate: tables in every report format (terminal, HTML, Markdown): the same sentences, every key escaped.

The tables are made the way a run makes them (fleetprobe.hist.host_tables): kernel hosts
from real hist files of the lab's 6.1 guest (tests/data/hist: a full table with Dropped,
paths chosen to look like hist syntax), a host whose kernel refused the trigger with a
hostile message, and a streaming host whose comm values are hostile (HTML, Markdown,
rich markup, an OSC 52 clipboard write, a newline, a bidi override, the kernel's ``<...>``).
"""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path

from fleetprobe.aggreport import count_rows, summaries
from fleetprobe.hist import (AggPlan, AggResults, AggTable, HostTable, KeySpec, StreamTables, TablePlan, Trigger,
                             host_tables)
from fleetprobe.merge import FleetAggregate
from fleetprobe.outcome import HostOutcome
from fleetprobe.render.html import render_html
from fleetprobe.render.markdown import escape, render_markdown
from fleetprobe.render.safe import SafeConsole, visible
from test_html import chromium, console_messages, needs_chromium
from fleetprobe.render.terminal import render_summary
from fleetprobe.results import FleetReport, RunInfo

DATA = Path(__file__).parent / "data" / "hist"
HOSTILE = ["<script>alert(1)</script>", "a|b|c", "`tick`", "**bold**_x_", "[x](javascript:alert(1))",
           "\x1b]52;c;aGk=\x07osc", "evil\nnext", "\u202etxt.exe", "[/]", "# head", "back\\|slash", "<...>"]
REFUSAL = "trigger refused: Invalid argument\x1b[2J<img src=x onerror=alert(2)>"
LINE = "hist:keys=path:vals=hitcount:sort=hitcount.descending:size=2048"
KERNEL = AggPlan("st", (TablePlan(AggTable("st", "count", "path"), "kernel"),), (),
                 (Trigger("fpexp/st", LINE, "st:count:path", (KeySpec("path", "string"),)),))
STREAM = (AggPlan("ex", (TablePlan(AggTable("ex", "count", "comm"), "stream", "no hist triggers on this kernel"),)),
          AggPlan("sig", (TablePlan(AggTable("sig", "histogram", "sig", ("comm",)), "stream", "no hist triggers"),)),
          AggPlan("ret", (TablePlan(AggTable("ret", "latency", "ns", ("comm",)), "stream", "no hist triggers",
                                    source_probe="ent"),)))


def _hist(name: str) -> list[str]:
    return (DATA / f"x86_64-6.1-{name}.hist").read_text().split("\n")


def _report() -> FleetReport:
    results = AggResults()
    for host, hist, refused in (("k1", "c-hostile-paths", {}), ("k2", "b-fpexp-st", {}),
                                ("f1", None, {("fpexp/st", LINE): REFUSAL})):
        texts = {"fpexp/st": _hist(hist)} if hist else {}
        for tid, part, table in host_tables((KERNEL,), texts, refused, {}, None, 0):
            results.add_host(host, tid, part, table)
    st = StreamTables(STREAM)
    for i, comm in enumerate(HOSTILE):
        for _ in range(i + 1):
            st.add_row("ex", 1.0, 100 + i, comm, "filename=/bin/true pid=1 old_pid=1")
            st.add_row("sig", 1.0, 100 + i, comm, "sig=18 errno=0 code=0 pid=2 grp=1 res=0")
            st.add_row("ent", 2.0, 100 + i, comm, "")
            st.add_row("ret", 2.0 + 1e-6 * (i + 1), 100 + i, comm, "")
    for tid, part, table in host_tables(STREAM, {}, {}, {}, st, 3):
        results.add_host("s1", tid, part, table)
    # A table pruned to 4 keys: its counts may be low by the Misra-Gries bound, said in its heading.
    pruned = AggTable("pr", "count", "x", cap=4)
    for v in range(10):
        pruned.add((f"v{v}",), 10 - v)
    results.add_host("s1", pruned.table_id, HostTable("stream", "no hist triggers", hits=55, entries=5), pruned)
    agg = FleetAggregate()
    agg.aggregates = results
    hosts = [HostOutcome(h, stage="done", hits={"st": 5}) for h in ("k1", "k2", "f1", "s1")]
    return FleetReport(RunInfo("aggr01", "aggs", started=1000.0, ended=1010.0), agg, hosts)


def test_the_tables_hold_what_the_renderers_must_show() -> None:
    """The fixture itself: a full kernel table, a refused trigger, hostile streamed keys, a pruned table."""
    s = {x.tid: x for x in summaries(_report().aggregate.aggregates)}
    # 128 keys of the full table, 4 of the hostile one (a key with a newline breaks its line: said, not counted).
    assert s["st:count:path"].heading == ("st: count by path: 132 counted on 2 host(s), 74 the kernel could not "
                                          "count (table full)")
    assert s["st:count:path"].modes == ("FAILED on f1: " + REFUSAL + f" (fpexp/st: {LINE})", "in kernel on k2",
                                        "in kernel on k1: 2 line(s) of the kernel's table could not be read")
    assert s["ex:count:comm"].heading == ("ex: count by comm: 78 counted on 1 host(s), 3 not counted (the event "
                                          "cap stopped the stream)")
    assert s["ex:count:comm"].modes == ("streamed on s1: no hist triggers on this kernel; the event cap stopped "
                                        "the stream (3 events not counted)",)
    assert s["ex:count:comm"].notes[0].startswith("comm <...>: 12 hit(s) whose task name the kernel had forgotten")
    assert "approximate: counts may be low by up to" in s["pr:count:x"].heading
    assert s["ret:latency:ns"].heading.startswith("ret: latency (ns, entry -> ret) per comm: 78 counted")
    assert s["sig:histogram:sig"].notes == s["ex:count:comm"].notes
    assert {v for v, _, _ in count_rows(s["ex:count:comm"].table)[0]} == set(HOSTILE)


class _Cells(HTMLParser):
    """The text of every cell of the page's aggregate count tables, and of every element's text, as a browser reads them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._in: str | None = None
        self._counts = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("class", "agg-counts") in attrs:
            self.tables.append([])
            self._counts = True
        elif tag == "tr" and self._counts:
            self.tables[-1].append([])
        elif tag == "td" and self._counts:
            self._in = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._in is not None:
            self.tables[-1][-1].append(self._in)
            self._in = None
        elif tag == "table":
            self._counts = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in is not None:
            self._in += data


def test_html_shows_every_table_with_its_modes_and_notes_and_escapes_every_key() -> None:
    report = _report()
    page = render_html(report)
    assert page.count("<script") == 2 and "<img" not in page and "\x1b" not in page and "\u202e" not in page
    cells = _Cells()
    cells.feed(page)
    text = "".join(cells.text)
    for s in summaries(report.aggregate.aggregates):
        # The same sentences as the terminal, read back from the page exactly (non-printables as escapes).
        for sentence in (s.heading, *s.modes, *s.notes):
            assert visible(sentence) in text, sentence
    # Each count table's cells read back as exactly the values (nothing lost or added by escaping).
    counts = [s.table for s in summaries(report.aggregate.aggregates) if s.table.kind == "count"]
    assert len(cells.tables) == len(counts)
    for table, t in zip(cells.tables, counts):
        assert [row for row in table if row] == [[visible(v), str(c), str(h)] for v, c, h in count_rows(t)[0]]
    # Histograms and latencies are drawn per comm, the comm escaped in the chart's title.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "comm=\\x1b]52;c;aGk=\\x07osc: 6" in text
    # ret (the third table) times 1..12 us per comm: its first chart starts at the 1 us bucket.
    assert "id='agg-2-0'" in page and "513..1024ns" in page and "id='agg-0-0'" not in page


def _cells(line: str) -> int:
    """The cells of a Markdown table row: pipes not escaped (preceded by an even number of backslashes)."""
    return sum(1 for m in re.finditer(r"(\\*)\|", line) if len(m.group(1)) % 2 == 0) - 1


def test_markdown_shows_every_table_and_a_key_cannot_break_its_table() -> None:
    report = _report()
    md = render_markdown(report)
    assert "### Aggregates" in md and "\x1b" not in md and "\u202e" not in md and "<script>" not in md
    for s in summaries(report.aggregate.aggregates):
        assert f"#### {escape(s.heading)}" in md
        for sentence in (*s.modes, *s.notes):
            assert f"- {escape(sentence)}" in md, sentence
    section = md[md.index("### Aggregates"):]
    blocks = section.split("\n#### ")[1:]
    assert len(blocks) == len(summaries(report.aggregate.aggregates))
    for block, s in zip(blocks, summaries(report.aggregate.aggregates)):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        # count: value | count | hosts; histogram and latency per comm: comm | bucket | count | bar.
        want = 3 if s.table.kind == "count" else 4
        assert rows and all(_cells(ln) == want for ln in rows), (s.tid, rows)
        assert len(rows) >= (2 + len(count_rows(s.table)[0]) if s.table.kind == "count" else 2 + len(HOSTILE))
    assert "| evil next | 7 | 1 |" in section
    assert "| a\\|b\\|c | 2 | 1 |" in section and "| back\\\\\\|slash | 11 | 1 |" in section
    assert "| \\<...\\> | 12 | 1 |" in section


def test_terminal_shows_the_same_sentences_and_nothing_that_drives_a_terminal() -> None:
    report = _report()
    console = SafeConsole(record=True, width=250, file=io.StringIO(), color_system=None)
    render_summary(report, console)
    out = console.export_text()
    assert "\x1b" not in out and "\u202e" not in out
    for s in summaries(report.aggregate.aggregates):
        for sentence in (s.heading, *s.modes, *s.notes):
            assert visible(sentence) in out, sentence
    assert "\\x1b]52;c;aGk=\\x07osc" in out and "evil\\x0anext" in out


@needs_chromium
def test_chromium_reads_the_aggregate_tables_back_as_the_keys(tmp_path: Path) -> None:
    """A real browser: no console errors (no key ran as script), and each count cell's text is the key."""
    report = _report()
    path = tmp_path / "report.html"
    path.write_text(render_html(report))
    r = chromium(["--dump-dom"], path.as_uri(), tmp_path)
    assert r.returncode == 0 and console_messages(r.stderr) == [], r.stderr[-2000:]
    cells = _Cells()
    cells.feed(r.stdout)
    ex = report.aggregate.aggregates.tables["ex:count:comm"]
    assert [row for row in cells.tables[0] if row] == [[visible(v), str(c), str(h)] for v, c, h in count_rows(ex)[0]]
