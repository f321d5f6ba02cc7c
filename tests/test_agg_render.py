"""aggregate: tables in every report format (terminal, HTML, Markdown): the same sentences, every key escaped.

The report (tests/reports.py agg_report) is made the way a run makes its tables
(fleetprobe.histread.host_tables): kernel hosts from real hist files of the lab's 6.1 guest,
a host whose kernel refused the trigger with a hostile message, and a streaming host
whose comm values are hostile.
"""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path

from fleetprobe.render.aggregates import count_rows, summaries
from fleetprobe.render.html import render_html
from fleetprobe.render.markdown import escape, render_markdown
from fleetprobe.render.safe import SafeConsole, visible
from fleetprobe.render.terminal import render_summary
from reports import AGG_HOSTILE as HOSTILE, AGG_LINE as LINE, AGG_REFUSAL as REFUSAL, agg_report as _report
from test_html import chromium, console_messages, needs_chromium


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
