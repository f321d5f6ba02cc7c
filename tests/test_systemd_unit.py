"""Issue 14 item 5: the shipped systemd unit and docs/audit.md work as written on Debian 12.

The install lines of docs/audit.md run for real (a fresh venv, pip installing this checkout) under a
temporary root instead of ``/``; the units pass ``systemd-analyze verify`` with the unit's one path
moved there; and the service's own ExecStart line, expanded as systemd expands it (``%S``,
``${VAR}`` one word, ``$VAR`` split on blanks), runs an audit of sim hosts over SSH.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from simhosts import SimFleet

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
DOC = ROOT / "docs" / "audit.md"
#: Where the docs install fleetprobe, and where the unit runs it from.
PREFIX = "/opt/fleetprobe"


def install_lines() -> list[str]:
    """The commands of the doc's install block (the one its comment says this test runs)."""
    text = DOC.read_text()
    m = re.search(r"```\n# install \(tests/test_systemd_unit.py[^\n]*\n(.*?)```", text, re.S)
    assert m, "docs/audit.md has no install block for this test"
    return [line for line in m.group(1).splitlines() if line.strip()]


def exec_start(unit: str) -> str:
    m = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert m
    return m.group(1)


def systemd_words(line: str, env: dict[str, str], specifiers: dict[str, str]) -> list[str]:
    """A command line as systemd.service(5) expands it: specifiers, ${VAR} as one word, $VAR split on blanks."""
    for k, v in specifiers.items():
        line = line.replace(k, v)
    words: list[str] = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            words += env.get(whole.group(1), "").split()
            continue
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def test_unit_runs_the_venv_fleetprobe_by_path() -> None:
    """Not ``/usr/bin/env fleetprobe``: Debian 12 has no system-wide pip install to find (PEP 668)."""
    line = exec_start((UNITS / "fleetprobe-audit.service").read_text())
    assert line.startswith(f"{PREFIX}/bin/fleetprobe audit "), line
    lines = install_lines()
    assert f"python3 -m venv {PREFIX}" in lines and f"{PREFIX}/bin/pip install ./fleetprobe" in lines, lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_documented_install_verified_units_and_the_exec_start_line(sim: SimFleet, tmp_path: Path,
                                                                    busy: None) -> None:
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    for line in install_lines():
        if line.startswith("apt-get install"):
            # Packages scripts/setup.sh installs on this machine; check they are there instead.
            for pkg in line.split()[3:]:
                assert subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                                      text=True).stdout.endswith("installed"), pkg
            continue
        cmd = line.replace(PREFIX, f"{root}{PREFIX}").replace("./fleetprobe", str(ROOT))
        cmd = cmd.replace("/usr/local/", f"{root}/usr/local/")
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-2000:])
    fleetprobe = root / PREFIX.lstrip("/") / "bin" / "fleetprobe"
    assert os.access(fleetprobe, os.X_OK) and (root / "usr/local/bin/fleetprobe").resolve() == fleetprobe
    # The man page and the completion pip installed, linked where man and bash-completion look.
    assert "fleetprobe list" in (root / "usr/local/share/man/man1/fleetprobe.1").read_text()
    assert "_shtab_fleetprobe" in (root / "usr/local/share/bash-completion/completions/fleetprobe").read_text()
    assert (root / PREFIX.lstrip("/") / "share/zsh/site-functions/_fleetprobe").is_file()
    # The units, with the one path moved under the temporary root.
    units = tmp_path / "units"
    units.mkdir()
    service = (UNITS / "fleetprobe-audit.service").read_text().replace(f"{PREFIX}/", f"{root}{PREFIX}/")
    (units / "fleetprobe-audit.service").write_text(service)
    shutil.copy(UNITS / "fleetprobe-audit.timer", units / "fleetprobe-audit.timer")
    verify = subprocess.run(["systemd-analyze", "verify", str(units / "fleetprobe-audit.service"),
                             str(units / "fleetprobe-audit.timer")], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and "fleetprobe-audit" not in verify.stderr, verify.stderr
    # The service's ExecStart line, with its audit.env, against two sim hosts.
    sim.add("h1")
    sim.add("h2")
    inv = sim.inventory(tmp_path / "inventory.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    pb = tmp_path / "modload.yml"
    pb.write_text("name: execs\nduration: 2s\nprobes:\n  - name: exec\n    tracepoint: sched/sched_process_exec\n"
                  "    max_per_host: 1000000\n")
    state = tmp_path / "state"
    (state / "fleetprobe").mkdir(parents=True)     # StateDirectory=fleetprobe
    prom = tmp_path / "textfile" / "fleetprobe-execs.prom"
    prom.parent.mkdir()
    env_file = {"FLEETPROBE_PLAYBOOK": str(pb), "FLEETPROBE_INVENTORY": str(inv),
                "FLEETPROBE_ARGS": f"--duration 2s --ssh-config none --no-agent --prometheus {prom}"}
    words = systemd_words(exec_start(service), env_file, {"%S": str(state)})
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ["HOME"], "XDG_DATA_HOME": str(state),
           "LANG": "C.UTF-8"}
    run = subprocess.run(words, capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "audit PASSED" in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("fleetprobe-audit verdict=pass playbook=execs run=")
    assert (state / "fleetprobe" / "last-audit.html").stat().st_size > 0
    assert (state / "fleetprobe" / "last-audit.md").stat().st_size > 0
    assert (state / "fleetprobe" / "history.sqlite3").exists()
    assert 'fleetprobe_audit_passed{playbook="execs"} 1' in prom.read_text()
