"""The ``fleetprobe`` command line: options.py (every option once, Exit), main.py (``main(argv, console) -> int``),
run.py (commands that talk to hosts), history.py (commands on stored runs and report files).
Only cli/ and render/ write to the terminal."""
