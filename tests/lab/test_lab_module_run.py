"""One `fleetprobe run` of the seed's fork kprobe module across the lab: x86_64 (x3), ppc64le, mips64el.

What issue 4 asks of the run: exactly one build per (arch, kernel release,
module source) however many hosts share it, the module loaded on every host,
the seed's register lines (x86 ip/flags, powerpc nip/msr, mips
cp0_epc/cp0_status) from every host in one report, and no module left
loaded anywhere afterwards.

The builds go into a fresh module cache (so they really happen in this run);
the Debian headers and unpacked kernel trees are reused from the usual cache.

MIPS: on the lab's mips64el guest (Debian 6.1 under qemu TCG) a kprobe
intermittently oopses the kernel ("Break instruction in kernel code" at the
single-step slot), killing the task that hit it.  A MIPS host must either
deliver the register lines or have fleetprobe report the oops; x86_64 and
ppc64le must succeed strictly.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fleetprobe.render.safe import SafeConsole

from fleetprobe.kmod.cache import default_cache_dir
from fleetprobe.cli.main import main
from labssh import is_mips, ssh

if TYPE_CHECKING:
    from conftest import LabForTests

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--no-live", "--connect-timeout", "60s", "--setup-timeout", "300s", "--grace", "5",
          "--teardown-slack", "30"]

#: The registers the seed printed, per `uname -m` (fp_kprobe README).
REGISTERS = {"x86_64": ("ip", "flags"), "ppc64le": ("nip", "msr"), "mips64": ("cp0_epc", "cp0_status"),
             "mips": ("cp0_epc", "cp0_status"), "aarch64": ("pc", "pstate")}


@pytest.fixture
def fresh_module_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$FLEETPROBE_CACHE with no built modules, sharing the downloaded headers and unpacked trees."""
    usual = default_cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for part in ("debian", "kernel-trees"):
        (usual / part).mkdir(parents=True, exist_ok=True)
        (cache / part).symlink_to(usual / part)
    monkeypatch.setenv("FLEETPROBE_CACHE", str(cache))
    yield cache


def test_fork_module_across_the_lab(lab_fleet: LabForTests, tmp_path: Path, fresh_module_cache: Path) -> None:
    lab = lab_fleet
    report_path, events_path = tmp_path / "report.json", tmp_path / "events.jsonl"
    console = SafeConsole(record=True, width=220)
    rc = main(["run", str(REPO / "playbooks/fork-module.yml"), "-i", str(lab.inventory), "--allow-modules",
               "--duration", "15s", "--json", str(report_path), "--events", str(events_path), *COMMON], console)
    out = console.export_text()
    report = json.loads(report_path.read_text())
    hosts = {h["host"]: h for h in report["hosts"]}
    assert set(hosts) == {vm.name for vm in lab.vms}, out

    # Exactly one build per (arch, kernel release): the cache holds one entry per kernel, and hosts
    # of one kernel name the same build of this run.
    kernels = {(vm.debian_arch, vm.kernel_release) for vm in lab.vms}
    entries = sorted(p.parent for p in (fresh_module_cache / "modules").glob("*/*/fp_kprobe-*/fp_kprobe.ko"))
    assert {(p.parts[-3], p.parts[-2]) for p in entries} == kernels, entries
    assert len(entries) == len(kernels), "one build per (arch, kernel release), not one per host"
    for entry in entries:
        meta = json.loads((entry / "build.json").read_text())
        assert meta["where"] == "controller" and meta["vermagic"].startswith(entry.parts[-2] + " ")
    build_of: dict[tuple[str, str], set[str]] = {}
    x86 = [vm for vm in lab.vms if vm.uname_m == "x86_64"]
    assert len(x86) == 3 and len({vm.kernel_release for vm in x86}) == 1, "the lab's three x86 hosts share a kernel"

    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    by_host: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_host.setdefault(e["host"], []).append(e)
    delivered = 0
    for vm in lab.vms:
        h = hosts[vm.name]
        assert h["arch"] == vm.uname_m and h["kernel_release"] == vm.kernel_release, h
        if is_mips(vm) and h["status"] != "ok":
            # Never silently: the run must say the kernel oopsed.
            named = h["kernel_oopses"] > 0 or any("oops" in a for a in h["alerts"]) or "oops" in h["evidence"]
            assert named, (vm.name, h["status"], h["reason"], h["evidence"], h["alerts"])
            continue
        assert h["status"] == "ok", (vm.name, h["reason"], h["evidence"], out)
        placed = h["placed_probes"]["fork"]
        m = re.search(r"fp_kprobe@[0-9a-f]{8} built on the controller in [0-9.]+s, build (\d+) of this run "
                      r"as fp_[a-z0-9]+_[0-9a-f]{4}_fork; planted at (\S+)", placed)
        assert m, placed
        build_of.setdefault((vm.debian_arch, vm.kernel_release), set()).add(m.group(1))
        assert re.match(r"(kernel_clone|_do_fork|do_fork)\+0x", m.group(2)), placed
        assert h["hits"].get("fork", 0) > 0, (vm.name, h["hits"])
        assert h["cleanup"] == "clean", (vm.name, h["cleanup"])
        assert h["loss"]["kmsg_gaps"] == 0, (vm.name, h["loss"])
        if not is_mips(vm):
            assert h["kernel_oopses"] == 0, (vm.name, h["alerts"])
        # The seed's register lines, parsed into events with this arch's register fields.
        mine = [e for e in by_host.get(vm.name, []) if e["probe"] == "fork"]
        assert mine, vm.name
        regs = REGISTERS[vm.uname_m]
        pre = [e for e in mine if e["fields"].get("ev") == "pre"]
        assert pre, (vm.name, mine[:3])
        for e in pre:
            assert all(isinstance(e["fields"].get(r), int) for r in regs), (vm.name, e)
            assert e["site"].split("+")[0] in ("kernel_clone", "_do_fork", "do_fork")
            assert e["pid"] > 0 and e["cpu"] >= 0 and e["comm"]
            # Wall-clock times inside the run, on the controller's axis like tracefs events.
            assert report["run"]["started"] - 2 <= e["time"] <= report["run"]["ended"] + 2, e
        assert {e["fields"]["ev"] for e in mine} <= {"pre", "post"}
        delivered += 1
    assert delivered >= len(lab.vms) - sum(1 for vm in lab.vms if is_mips(vm))
    for kernel, numbers in build_of.items():
        assert len(numbers) == 1, f"hosts of {kernel} used different builds: {numbers}"
    assert len({n for ns in build_of.values() for n in ns}) == len(build_of)

    # One merged report: the register fields are aggregate values across the hosts that delivered.
    fields = {v["field"] for v in report["aggregate"]["values"] if v["probe"] == "fork"}
    for vm in lab.vms:
        if hosts[vm.name]["status"] == "ok":
            assert set(REGISTERS[vm.uname_m]) <= fields, fields

    # Nothing left behind: no module, no tracefs instance, no copied .ko.
    for vm in lab.vms:
        r = ssh(lab, vm, "grep '^fp_' /proc/modules; ls /sys/kernel/tracing/instances | grep fp_; "
                         "ls /tmp | grep '^fp_.*\\.ko$'; true")
        assert r.returncode == 0 and r.stdout.strip() == "", (vm.name, r.stdout, r.stderr)
    assert rc in (0, 2), out
    if rc == 2:
        assert all(is_mips(vm) for vm in lab.vms if hosts[vm.name]["status"] != "ok")


def test_insmod_failure_is_that_hosts_failure_with_the_kernels_words(lab_fleet: LabForTests, tmp_path: Path) -> None:
    """fp_kprobe at kernel_clone+1 (inside an instruction): each host fails with insmod's and the module's error."""
    lab = lab_fleet
    (tmp_path / "modules").symlink_to(REPO / "modules")
    pb = tmp_path / "badoffset.yml"
    pb.write_text("name: badoffset\ndescription: an offset no kprobe can take\nduration: 5s\nallow_modules: true\n"
                  "probes:\n  - name: fork\n    module: modules/fp_kprobe\n"
                  "    params:\n      symbol: [kernel_clone, _do_fork, do_fork]\n      offset: \"1\"\n")
    targets = [vm for vm in lab.vms if vm.uname_m in ("x86_64", "ppc64le")][:2]
    report_path = tmp_path / "report.json"
    console = SafeConsole(record=True, width=220)
    rc = main(["run", str(pb), "-i", str(lab.inventory), "--limit", ",".join(vm.name for vm in targets),
               "--json", str(report_path), *COMMON], console)
    out = console.export_text()
    assert rc == 3, out
    hosts = {h["host"]: h for h in json.loads(report_path.read_text())["hosts"]}
    for vm in targets:
        h = hosts[vm.name]
        assert (h["status"], h["stage"]) == ("failed", "probe"), h
        # insmod's message, and the module's own line: ppc64le EINVAL, x86 EILSEQ (mid-instruction).
        want = "err=-84" if vm.uname_m == "x86_64" else "err=-22"
        assert "the kernel refused a module: fp_kprobe for probe fork" in h["reason"], h["reason"]
        assert "can't insert" in h["reason"] and f"sym=kernel_clone+0x1 {want}" in h["reason"], h["reason"]
        assert h["cleanup"] == "clean" and "fork" not in h["placed_probes"]
        r = ssh(lab, vm, "grep '^fp_' /proc/modules; ls /tmp | grep '^fp_.*\\.ko$'; true")
        assert r.stdout.strip() == "", (vm.name, r.stdout)


def test_cleanup_removes_the_module_of_a_dead_run(lab_fleet: LabForTests, fresh_module_cache: Path,
                                                  tmp_path: Path) -> None:
    """A module whose run has no instance left (its controller and runner are gone) is removed by cleanup."""
    lab = lab_fleet
    vm = next(vm for vm in lab.vms if vm.uname_m == "x86_64")
    # Build it through fleetprobe (a plan-less run would need a playbook): reuse the lab run's cache entry,
    # or build it now with a short run.
    rc = main(["run", str(REPO / "playbooks/fork-module.yml"), "-i", str(lab.inventory), "--limit", vm.name,
               "--duration", "2s", *COMMON], SafeConsole(record=True, width=200))
    assert rc == 0
    (ko,) = (fresh_module_cache / "modules").glob(f"amd64/{vm.kernel_release}/fp_kprobe-*/fp_kprobe.ko")
    subprocess.run(["ssh", "-F", "/dev/null", "-i", str(lab.key), "-o", "IdentitiesOnly=yes",
                    "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "BatchMode=yes", "-p", str(vm.port),
                    "root@127.0.0.1", "cat > /tmp/dead.ko && insmod /tmp/dead.ko run=dead0 probe=fork post=0 rate=1; "
                    "rm -f /tmp/dead.ko"], input=ko.read_bytes(), capture_output=True, timeout=60, check=True)
    assert ssh(lab, vm, "cat /sys/module/fp_kprobe/parameters/run").stdout.strip() == "dead0"
    console = SafeConsole(record=True, width=200)
    main(["cleanup", "-i", str(lab.inventory), "--limit", vm.name, "--connect-timeout", "60s"], console)
    assert "module fp_kprobe" in console.export_text(), console.export_text()
    assert ssh(lab, vm, "grep '^fp_' /proc/modules; true").stdout.strip() == ""


def test_one_module_source_for_two_probes_loads_twice(lab_fleet: LabForTests, tmp_path: Path) -> None:
    """fp_kprobe for two probes in one run: two kernel modules, each under its run/host/probe name.

    x86_64 and ppc64le (the MIPS guests' kprobe fault is covered by the tests above); quiet
    function, so each host's numbers are known: every `stat -f` passes user_statfs, seen by both.
    """
    lab = lab_fleet
    vms = [vm for vm in lab.vms if not is_mips(vm)]
    report_path = tmp_path / "report.json"
    calls = 5
    # The calls start once both modules are loaded (never a fixed sleep: a loaded CI machine took
    # longer than 12 s to get there, and calls made before the load are rightly not counted).
    loaded = ("t=0; until [ $(grep -c '^fp_[a-z0-9_]*_[uv]statfs ' /proc/modules) -ge 2 ] || [ $t -gt 1200 ]; "
              "do sleep 0.2; t=$((t+1)); done; ")
    threads = [threading.Thread(target=ssh, args=(lab, vm, f"{loaded}for i in $(seq {calls}); do stat -f / "
                                                  ">/dev/null; sleep 0.3; done", 300), daemon=True) for vm in vms]
    for t in threads:
        t.start()
    console = SafeConsole(record=True, width=220)
    rc = main(["run", str(REPO / "tests/data/playbooks/lab/statfs-two-modules.yml"), "-i", str(lab.inventory),
               "--limit", ":".join(sorted({f"lab_{vm.arch}" for vm in vms})), "--duration", "20s",
               "--json", str(report_path), *COMMON], console)
    for t in threads:
        t.join(150)
    out = console.export_text()
    assert rc == 0, out
    hosts = {h["host"]: h for h in json.loads(report_path.read_text())["hosts"]}
    assert set(hosts) == {vm.name for vm in vms}
    for vm in vms:
        h = hosts[vm.name]
        assert h["status"] == "ok" and h["cleanup"] == "clean", (vm.name, h["reason"], h["evidence"])
        names = {p: re.search(r" as (fp_\w+);", h["placed_probes"][p]) for p in ("ustatfs", "vstatfs")}
        assert all(names.values()), h["placed_probes"]
        u, v = names["ustatfs"][1], names["vstatfs"][1]  # type: ignore[index]
        assert u != v and u.endswith("_ustatfs") and v.endswith("_vstatfs") and u[:-8] == v[:-8]
        assert "planted at user_statfs+0x" in h["placed_probes"]["ustatfs"]
        assert "planted at user_statfs+0x" in h["placed_probes"]["vstatfs"]
        assert h["hits"].get("ustatfs", 0) >= calls and h["hits"].get("vstatfs", 0) >= calls, h["hits"]
        r = ssh(lab, vm, "grep '^fp_' /proc/modules; ls /tmp | grep '^fp_.*\\.ko$'; true")
        assert r.returncode == 0 and r.stdout.strip() == "", (vm.name, r.stdout)
