"""The runner's kernel-log forwarding (modules' lines), run by itself against this machine's /dev/kmsg.

Only the block between the runner's "kernel log forwarding" markers runs, with a plain directory as
its tracefs instance (trace_marker a regular file): no module is loaded and no probe placed. The
records are this test's own (``echo > /dev/kmsg`` as root, named by a run id of its own).

What must hold for every shell and filter the runner may meet (dash, busybox ash; GNU sed, busybox
grep, neither): from the run's start record to its end record every record is forwarded once, in
order, with no sequence number missing; nothing before the start record; the helpers' processes and
the private FIFO directory are gone afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "fleetprobe" / "runner" / "runner.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.access("/dev/kmsg", os.W_OK),
                                reason="needs root and a writable /dev/kmsg")


def _block() -> str:
    text = RUNNER.read_text()
    return text[text.index("# --- kernel log forwarding"):text.index("# --- end of kernel log forwarding ---")]


def _tools(tmp_path: Path, tools: str) -> str:
    """A PATH where sed/grep are the ones asked for (GNU from the system, or busybox applets)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    busybox = shutil.which("busybox")
    for name, kind in (("sed", tools.split("+")[0]), ("grep", tools.split("+")[1])):
        target = busybox if kind == "busybox" else shutil.which(name)
        assert target, (name, kind)
        if kind == "busybox":
            (bin_dir / name).write_text(f'#!/bin/sh\nexec {busybox} {name} "$@"\n')
            (bin_dir / name).chmod(0o755)
        else:
            (bin_dir / name).symlink_to(target)
    return f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"


@pytest.mark.parametrize("shell", ["dash", "busybox-sh"])
@pytest.mark.parametrize("tools,skipper", [("gnu+gnu", "gnused"), ("busybox+busybox", "bbgrep"),
                                           ("busybox+gnu", "")])
def test_records_from_start_to_end_are_forwarded_once_and_nothing_before(
        tmp_path: Path, shell: str, tools: str, skipper: str) -> None:
    if not shutil.which("busybox") or not shutil.which("dash"):
        pytest.skip("needs dash and busybox")
    run = uuid.uuid4().hex[:12]
    group = f"fp_{run}_h"
    inst = f"{group}_1999999999"
    tracefs = tmp_path / "tracefs"
    (tracefs / "instances" / inst).mkdir(parents=True)
    marker = tracefs / "instances" / inst / "trace_marker"
    marker.write_text("")
    krun = f"fleetprobe run={run} "
    script = "\n".join([
        "set -u",
        'say() { echo "$*"; }',
        "rt() { date +%s.%N; }",
        f"T={tracefs}; G={group}; I={inst}; KS=:ab12; KRUN='{krun}'; KREAD=; KCAT=; KDIR=; KSKIP=; KNOSTART=",
        _block(),
        # A record before the start: never forwarded.
        f"echo '{krun}probe=p ev=hit n=0' > /dev/kmsg",
        "kmsg_start",
        'echo "skipper=$KSKIP kdir=$KDIR"',
        f"i=1; while [ $i -le 40 ]; do echo '{krun}probe=p ev=hit n='$i > /dev/kmsg; i=$((i+1)); done",
        "echo 'an ordinary kernel message' > /dev/kmsg",
        "kmsg_stop",
        'echo "done kdir=$KDIR"',
    ])
    sh = ["dash", "-c"] if shell == "dash" else [shutil.which("busybox") or "busybox", "sh", "-c"]
    env = dict(os.environ, PATH=_tools(tmp_path, tools))
    r = subprocess.run([*sh, script], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    m = re.search(r"skipper=(\S*) kdir=(\S+)", r.stdout)
    assert m, r.stdout
    # busybox ash runs its own applets for sed and grep whatever PATH says (as on a busybox host).
    assert m.group(1) == (skipper if shell == "dash" else "bbgrep")
    kdir = m.group(2)
    assert not Path(kdir).exists(), "the private FIFO directory is removed"

    lines = marker.read_text().splitlines()
    assert all(x.startswith("fpk:ab12 ") for x in lines), lines[:3]
    records = [x[len("fpk:ab12 "):] for x in lines]
    seqs = [int(x.split(",")[1]) for x in records]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "every sequence number once, in order"
    texts = [x.split(";", 1)[1] for x in records]
    assert texts[0].startswith(f"{krun}probe=- ev=clock inst={inst} "), texts[0]
    hits = [t for t in texts if t.startswith(f"{krun}probe=p ev=hit")]
    assert hits == [f"{krun}probe=p ev=hit n={i}" for i in range(1, 41)], "nothing before the start record"
    assert texts[-1] == f"{krun}probe=- ev=end inst={inst}"
    assert "" in texts, "another writer's record is reduced to its header"
    # Nothing of ours lingers (the filters name the instance in their arguments).
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert inst not in ps and kdir not in ps, ps
