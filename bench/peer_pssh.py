"""parallel-ssh client for bench/fanout.py (runs in the peers venv: it cannot import fleetprobe).

    /tmp/fp-bench/peers/bin/python bench/peer_pssh.py SPEC.json

Connects to every port in the spec (pool_size = forks), runs the command,
reads its output, and prints one JSON line: ok count and the CPU/wall of the
measured section.  parallel-ssh's default client (libssh2) does not check
host keys; the others in the benchmark do (a small cost: one known_hosts lookup).
"""

from __future__ import annotations

import json
import resource
import sys
import time

from pssh.clients import ParallelSSHClient  # type: ignore[import-not-found]
from pssh.config import HostConfig  # type: ignore[import-not-found]

COMMAND = "uname -m; cat /proc/version"


def main(spec_path: str) -> int:
    """Run the command on every host; print the figures."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    ports = spec["ports"]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    client = ParallelSSHClient(["127.0.0.1"] * len(ports),
                               host_config=[HostConfig(port=p, user="root", private_key=spec["key"])
                                            for p in ports],
                               pool_size=spec["forks"], num_retries=1, timeout=120)
    output = client.run_command(COMMAND, stop_on_errors=False)
    client.join(output)
    ok = 0
    errors = []
    for o in output:
        if o.exception is not None:
            errors.append(repr(o.exception))
            continue
        text = "\n".join(o.stdout or [])
        ok += o.exit_code == 0 and "x86_64" in text
    del client
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"ok": ok, "errors": errors[:3], "n_errors": len(errors),
                      "section_cpu": cpu, "section_wall": wall}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
