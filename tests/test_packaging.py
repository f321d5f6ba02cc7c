"""A wheel of fleetprobe carries the shipped playbooks and modules, and finds them outside a checkout.

Builds a real wheel from a copy of the tracked files (setuptools from the test venv,
no network), installs it into a private folder, and uses it from a directory that is
not a checkout: shipped playbooks load by name and `module: modules/fp_kprobe`
resolves to the wheel's copy of the module source.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fleetprobe.errors import PlaybookError
from fleetprobe.playbook import load_playbook
from fleetprobe.shipped import shipped_playbook, shipped_playbooks

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_playbooks_load_by_name_and_unknown_names_list_them(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a checkout: names cannot resolve relative to the cwd
    assert set(shipped_playbooks()) == {p.stem for p in (ROOT / "playbooks").glob("*.yml")}
    assert shipped_playbook("opensnoop") == shipped_playbook("opensnoop.yml") == ROOT / "playbooks" / "opensnoop.yml"
    assert shipped_playbook("playbooks/opensnoop.yml") is None  # a path stays a path
    assert load_playbook("opensnoop").name == "opensnoop"
    (tmp_path / "opensnoop").write_text("name: mine\nprobes:\n  - name: t\n    tracepoint: sched/sched_process_exec\n")
    assert load_playbook("opensnoop").name == "mine"  # an existing file wins over a shipped name
    with pytest.raises(PlaybookError) as err:
        load_playbook("no-such-playbook")
    assert "no-such-playbook" in str(err.value) and "opensnoop" in str(err.value.hint)


def test_wheel_ships_playbooks_and_modules_and_uses_them_outside_a_checkout(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    (src / "modules" / "fp_kprobe" / "fp_kprobe.o").write_bytes(b"\x7fELF build product")  # never shipped
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-v", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # setuptools deprecates project.license as a table (unsupported after 2027-02-18): the build says nothing of it
    build_output = r.stdout + r.stderr
    assert "Warning" not in build_output.replace("BuildBackendWarning: Editable", ""), \
        [line for line in build_output.splitlines() if "Warning" in line or "deprecat" in line.lower()]
    wheel = next(dist.glob("fleetprobe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for p in (ROOT / "playbooks").glob("*.yml"):
        assert f"fleetprobe/_shipped/playbooks/{p.name}" in names
    for m in ("fp_kprobe", "fp_kretprobe"):
        assert {f"fleetprobe/_shipped/modules/{m}/{f}" for f in ("Kbuild", f"{m}.c", "README.md")} <= names
    assert not any(n.endswith(".o") for n in names)

    target = tmp_path / "installed"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import fleetprobe, fleetprobe.playbook as p; pb = p.load_playbook('fork-module'); "
            "print(fleetprobe.__file__); print(pb.probes[0].module_path)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    package_file, module_path = r.stdout.split()
    assert package_file.startswith(str(target)), "the installed wheel, not the checkout, was imported"
    assert module_path == str(target / "fleetprobe" / "_shipped" / "modules" / "fp_kprobe")
