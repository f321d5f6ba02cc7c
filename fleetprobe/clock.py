"""Clock: put one host's trace timestamps on the controller's wall-clock axis, with an error bound.

No trace clock is wall-clock (``local`` is per-CPU sched_clock, ``mono`` is
CLOCK_MONOTONIC).  The runner writes ``fpsync <CLOCK_REALTIME>`` into the
run's trace_marker before events are enabled and again at the end; each
marker's own trace timestamp pairs the two clocks.  One marker gives the
offset; two or more, far enough apart, also give the drift (the slope).  The
host's realtime is then moved onto the controller's by the lead's NTP-style
estimate (``offset`` = host realtime minus controller realtime, ``error`` =
half the round trip).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetprobe.traceline import Marker

# Accept a fitted drift only when the fit itself is this good: a 1 ms marker
# bound over a 20 s run gives 100 ppm, the same order as real crystal drift,
# so shorter runs (or whole-second busybox markers) keep slope 1.
MAX_SLOPE_ERROR = 1e-4
# NTP never slews CLOCK_REALTIME faster than 500 ppm; a fitted slope further
# from 1 than this means a clock step (settimeofday, NTP step) between markers.
MAX_DRIFT = 1e-3


@dataclass
class ClockMap:
    """Trace timestamp -> controller wall-clock seconds, for one host.

    ``offset``/``error``: the host's realtime minus the controller's, and its
    uncertainty, as measured by the lead (None/0 if unknown: the host's own
    realtime is then used as is).
    """

    offset: float = 0.0
    error: float = 0.0
    markers: list[Marker] = field(default_factory=list)
    slope: float = 1.0
    intercept: float = 0.0
    fit_error: float = 0.0
    stepped: bool = False

    @property
    def synced(self) -> bool:
        """True once at least one marker was seen."""
        return bool(self.markers)

    def add_marker(self, marker: Marker) -> None:
        """Learn from one marker and refit."""
        self.markers.append(marker)
        self._fit()

    def _fit(self) -> None:
        """Fit realtime = slope * trace_ts + intercept from the markers."""
        ms = self.markers
        # Offset with slope 1: the uncertainty-weighted best single marker is
        # the one with the smallest bound (averaging bounds does not shrink them).
        best = min(ms, key=lambda m: m.uncertainty)
        slope, intercept, fit_error = 1.0, best.realtime - best.trace_ts, best.uncertainty
        self.stepped = False
        if len(ms) >= 2:
            n = len(ms)
            mx = sum(m.trace_ts for m in ms) / n
            my = sum(m.realtime for m in ms) / n
            sxx = sum((m.trace_ts - mx) ** 2 for m in ms)
            if sxx > 0:
                fitted = sum((m.trace_ts - mx) * (m.realtime - my) for m in ms) / sxx
                span = max(m.trace_ts for m in ms) - min(m.trace_ts for m in ms)
                worst = max(m.uncertainty for m in ms)
                slope_error = 2 * worst / span
                if abs(fitted - 1.0) > MAX_DRIFT + slope_error:
                    self.stepped = True
                elif slope_error <= MAX_SLOPE_ERROR:
                    slope, intercept = fitted, my - fitted * mx
                    # Residuals of the fit plus the markers' own bound.
                    resid = max(abs(m.realtime - (slope * m.trace_ts + intercept)) for m in ms)
                    fit_error = worst + resid
        self.slope, self.intercept, self.fit_error = slope, intercept, fit_error

    def host_time(self, trace_ts: float) -> float:
        """The host's CLOCK_REALTIME at trace timestamp ``trace_ts``."""
        return self.slope * trace_ts + self.intercept

    def to_controller(self, trace_ts: float) -> float:
        """Controller wall-clock seconds at host trace timestamp ``trace_ts``."""
        return self.slope * trace_ts + self.intercept - self.offset

    def linear(self) -> tuple[float, float]:
        """(slope, intercept) of :meth:`to_controller`, for the stream's hot loop."""
        return self.slope, self.intercept - self.offset

    @property
    def uncertainty(self) -> float:
        """Bound on the error of :meth:`to_controller`: marker fit bound plus the offset measurement's."""
        return self.fit_error + self.error

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary for reports."""
        return {"offset": self.offset, "error": self.error, "slope": self.slope,
                "intercept": self.intercept, "fit_error": self.fit_error,
                "uncertainty": self.uncertainty, "markers": len(self.markers), "stepped": self.stepped}
