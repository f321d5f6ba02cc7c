"""The on-host runner: runner.sh (the shell that runs on every host), runner.py (pure protocol:
plan -> directives, control lines -> report), channel.py (the controller's I/O with one runner)."""
