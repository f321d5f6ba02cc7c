"""HTML report: self-contained, escaped, and rendered by a real headless Chromium with no console errors.

Chromium (Debian's `chromium` package) loads the file with networking
disabled; --enable-logging=stderr prints every console message (errors,
uncaught exceptions, Content-Security-Policy violations) as a CONSOLE line,
and --dump-dom prints the DOM after the page's scripts ran.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fleetprobe.audit import audit
from fleetprobe.render.html import render_html, write_html
from fleetprobe.render.markdown import render_markdown
from fleetprobe.results import FleetReport
from fleetprobe.playbook import parse_playbook
from reports import build_report, extra_exec, host_text, real_lines

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
EVIL = "/tmp/<script>alert(1)</script>"


def _report() -> FleetReport:
    """Three hosts from real trace lines, different clock offsets, one unreachable, one odd file name."""
    lines = real_lines()
    texts = {"web-1": host_text(lines, 0.0, 1795655000.0),
             "web-2": host_text(lines, 0.4, 1795655000.4) + extra_exec("insmod", EVIL, 105.0),
             "db-1": host_text(lines, 1.1, 1795655001.1)}
    return build_report(texts, statuses={"db-9": "unreachable"},
                        offsets={"web-1": 0.0012, "web-2": -0.0031, "db-1": 0.0205})


def chromium(args: list[str], url: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once with a fresh profile, no network, console messages on stderr."""
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(dir=tmp, prefix="profile-")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """Console output of the page (any level: the report logs nothing on purpose)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_html_is_self_contained_and_escaped() -> None:
    report = _report()
    page = render_html(report)
    # Nothing is fetched: no external URL in any src/href, and a CSP that forbids fetching.
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page)
    assert "default-src 'none'" in page
    # Host-controlled text is escaped: the file name cannot open a script element.
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script") == 2  # the run metadata (JSON) and the page's own script
    # Each host's clock offset and its uncertainty are on the timeline lanes.
    for host, text in (("web-1", "+1.20 ms ± 0.50 ms"), ("web-2", "-3.10 ms ± 0.50 ms"),
                       ("db-1", "+20.50 ms ± 0.50 ms")):
        assert re.search(rf"data-host='{host}'.*?{re.escape(text)}", page), host


def test_markdown_escapes_and_summarises() -> None:
    report = _report()
    pb = parse_playbook("name: execaudit\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                        "    max_per_host: 5\n", "a.yml")
    md = render_markdown(report, audit(report, pb, None))
    assert "### Audit FAILED (no baseline run)" in md
    assert "**db\\-9**" not in md and "**db-9**" in md  # hosts named in the verdict
    assert "\\<script\\>alert(1)\\</script\\>" in md and "<script>" not in md
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| web-2 |")]
    assert table_rows and table_rows[0].count("|") == 7  # a cell value cannot add columns
    assert "latency rl -> rlr: 9 calls" in md


@needs_chromium
def test_chromium_loads_the_report_without_console_errors(tmp_path: Path) -> None:
    report = _report()
    pb = parse_playbook("name: execaudit\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                        "    max_per_host: 5\n", "a.yml")
    path = tmp_path / "report.html"
    write_html(report, path, audit(report, pb, None))
    r = chromium(["--dump-dom"], path.as_uri(), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert console_messages(r.stderr) == []
    dom = r.stdout
    # The timeline: one lane per host that saw events, with event marks from every one of them.
    timeline = dom[dom.index("id=\"timeline\""):]
    timeline = timeline[:timeline.index("</svg>")]
    lanes = re.findall(r'class="lane" data-host="([^"]+)"', timeline)
    assert sorted(lanes) == ["db-1", "web-1", "web-2"]
    assert len(re.findall(r'class="event"', timeline)) == sum(
        len(s.sample.first) + len(s.sample.reservoir) for s in report.aggregate.hosts.values())
    # The charts: hits, top values, the latency histogram, clock offsets; the status table lists every host.
    for chart in ('id="hits-total"', 'id="top-exec-comm"', 'id="top-exec-filename"', 'id="lat-rlr"',
                  'id="clocks"', 'class="heatmap"', 'id="audit"'):
        assert chart in dom, chart
    assert len(re.findall(r'<rect class="bar"', dom)) >= 10
    status = dom[dom.index('id="hosts"'):dom.index("</table>", dom.index('id="hosts"'))]
    assert all(h in status for h in ("web-1", "web-2", "db-1", "db-9")) and "unreachable" in status
    # The marks of the host with the larger clock uncertainty are wider (they span it).
    shot = tmp_path / "report.png"
    r = chromium(["--window-size=1280,2200", f"--screenshot={shot}"], path.as_uri(), tmp_path)
    assert r.returncode == 0 and console_messages(r.stderr) == []
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    blank_shot = tmp_path / "blank.png"
    chromium(["--window-size=1280,2200", f"--screenshot={blank_shot}"], blank.as_uri(), tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A drawn page compresses far worse than an empty one of the same size.
    assert shot.stat().st_size > 10 * blank_shot.stat().st_size


@needs_chromium
def test_console_check_catches_a_broken_page(tmp_path: Path) -> None:
    """The harness itself: a script error and a blocked network fetch both show up as console messages."""
    page = render_html(_report())
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("<div id='tip'></div>", "<div id='tip'></div><script>nosuchfunction();</script>"
                                   "<img src='https://example.invalid/x.png'>"))
    r = chromium(["--dump-dom"], broken.as_uri(), tmp_path)
    messages = "\n".join(console_messages(r.stderr))
    assert "nosuchfunction is not defined" in messages
    assert "Content Security Policy" in messages


@needs_chromium
def test_timeline_opens_zoomed_to_the_window_in_the_link(tmp_path: Path) -> None:
    """#t=FROM-TO: marks outside the window are hidden, the rest spread over the plot, new ticks."""
    path = tmp_path / "report.html"
    write_html(_report(), path)
    page = path.read_text()
    svg = re.search(r"<svg id='timeline'[^>]*data-x0='(\d+)' data-w='(\d+)' data-span='([0-9.]+)'", page)
    assert svg is not None
    x0, pw, span = int(svg[1]), int(svg[2]), float(svg[3])
    marks = [(float(t), float(e)) for t, e in re.findall(r"class='event' data-probe='[^']*' data-t='([0-9.]+)' "
                                                          r"data-e='([0-9.]+)'", page)]
    ts = sorted(t for t, _ in marks)
    a, b = ts[len(ts) // 4], ts[len(ts) // 2]  # a window holding about a quarter of the marks
    assert 0 < a < b < span
    r = chromium(["--dump-dom"], path.as_uri() + f"#t={a:.6f}-{b:.6f}", tmp_path)
    assert r.returncode == 0 and console_messages(r.stderr) == [], r.stderr[-2000:]
    dom = r.stdout
    drawn = re.findall(r'<rect class="event( outside)?" data-probe="[^"]*" data-t="([0-9.]+)" data-e="([0-9.]+)" '
                       r'x="([0-9.]+)" y="[0-9.]+" width="([0-9.]+)"', dom)
    assert len(drawn) == len(marks)
    inside = [(float(t), float(x), float(w)) for out, t, e, x, w in drawn if not out]
    outside = [(float(t), float(e)) for out, t, e, x, w in drawn if out]
    expected_in = [t for t, e in marks if not (t + e < a or t - e > b)]
    assert len(inside) == len(expected_in) and 0 < len(inside) < len(marks)
    assert all(t + e < a or t - e > b for t, e in outside)
    for _t, x, w in inside:
        assert x0 - 0.01 <= x and x + w <= x0 + pw + 0.01
    # Zoomed in, the same marks spread further apart than on the whole-run axis.
    xs = sorted(x for _, x, _ in inside)
    assert xs[-1] - xs[0] > (max(expected_in) - min(expected_in)) / span * pw * 1.5
    assert f"showing +{a:.6f}s to +{b:.6f}s" in dom
