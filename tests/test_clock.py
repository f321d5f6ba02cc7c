"""clock: trace timestamps onto the controller's wall-clock, from markers and the measured offset."""

from __future__ import annotations

import pytest

from fleetprobe.clock import ClockMap
from fleetprobe.parse import TraceStream
from fleetprobe.traceline import Marker, TraceEvent

EPOCH = 1_764_120_000.0


def test_unsynced_until_first_marker() -> None:
    """No marker: not synced, identity map."""
    c = ClockMap()
    assert not c.synced and c.to_controller(5.0) == 5.0


def test_one_marker_gives_the_offset() -> None:
    """realtime - trace_ts of the one marker; controller time subtracts the host's offset."""
    c = ClockMap(offset=0.25, error=0.002)
    c.add_marker(Marker(100.0, EPOCH, 1e-3))
    assert c.synced and c.slope == 1.0
    assert c.host_time(160.0) == pytest.approx(EPOCH + 60.0)
    assert c.to_controller(160.0) == pytest.approx(EPOCH + 60.0 - 0.25)
    assert c.uncertainty == pytest.approx(1e-3 + 0.002)


def test_two_precise_markers_fit_the_drift() -> None:
    """A trace clock running 50 ppm fast over 600 s, markers good to 1 us: the slope is fitted."""
    c = ClockMap()
    c.add_marker(Marker(100.0, EPOCH, 1e-6))
    c.add_marker(Marker(700.0, EPOCH + 600.0 / 1.00005, 1e-6))
    assert c.slope == pytest.approx(1 / 1.00005, rel=1e-9)
    assert c.host_time(400.0) == pytest.approx(EPOCH + 300.0 / 1.00005, abs=1e-5)
    assert not c.stepped and c.fit_error < 1e-5


def test_coarse_markers_keep_slope_one() -> None:
    """Whole-second markers over 60 s cannot measure drift: slope stays 1, best marker wins."""
    c = ClockMap()
    c.add_marker(Marker(10.0, EPOCH + 0.5, 1.0))
    c.add_marker(Marker(70.0, EPOCH + 61.5, 1.0))
    assert c.slope == 1.0
    assert c.uncertainty == 1.0
    # A later precise marker is preferred for the offset.
    c.add_marker(Marker(71.0, EPOCH + 61.2, 1e-3))
    assert c.intercept == pytest.approx(EPOCH + 61.2 - 71.0)


def test_clock_step_between_markers_is_flagged() -> None:
    """Realtime jumped 5 s between markers (NTP step): not a drift; flagged, slope stays 1."""
    c = ClockMap()
    c.add_marker(Marker(10.0, EPOCH, 1e-3))
    c.add_marker(Marker(110.0, EPOCH + 105.0, 1e-3))
    assert c.stepped and c.slope == 1.0
    assert c.to_json()["stepped"] is True


def test_stream_uses_final_fit_for_later_events() -> None:
    """Markers from a real stream shape: the map updates as markers arrive."""
    got: list[TraceEvent] = []
    c = ClockMap(offset=-1.0, error=0.0005)
    s = TraceStream("h", {"e": "p"}, on_event=got.append, clock=c)
    s.feed(b"  sh-1 [000] ...1. 100.000000: tracing_mark_write: fpsync 1764120000.000000 0.000001\n"
           b"  sh-1 [000] ..... 400.000000: e: n=1\n"
           b"  sh-1 [000] ...1. 700.000000: tracing_mark_write: fpsync 1764120600.030000 0.000001\n"
           b"  sh-1 [000] ..... 700.000000: e: n=2\n")
    s.close()
    assert got[0].time == pytest.approx(EPOCH + 300.0 + 1.0)
    # After the second marker, 50 ppm drift is fitted: 700 maps to exactly the marker's realtime.
    assert c.slope == pytest.approx(600.03 / 600.0)
    assert got[1].time == pytest.approx(EPOCH + 600.03 + 1.0, abs=1e-6)
