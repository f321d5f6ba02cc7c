"""Rendering a FleetReport: terminal.py (rich summary), live.py (rich live view while a run goes),
html.py and markdown.py (report files). Only render/ and cli/ import rich."""
