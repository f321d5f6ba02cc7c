"""Every shipped tracefs playbook on one guest of every lab arch, with a workload that makes it fire.

Per playbook, one `fleetprobe run` covers one guest per arch; each guest runs the playbook's
workload (a short busybox shell loop) from the moment the run's instance exists until it is
gone. Every probe must then have fired on every guest (hits streamed, or counted by the kernel's
hist triggers), or have been skipped by the planner with its reason — never placed and silent —
except the probes listed in NOT_PROVOKED, each with why the lab's initramfs guests (busybox,
dropbear, no disk, no swap, no threads, no OpenSSL) cannot make it fire. Module playbooks
(fork-module) are run by test_lab_module_run.py.

Not in the default run (every shipped playbook on every arch, ~1 min each under TCG):

    FLEETPROBE_LAB_FLEET=x86_64,ppc64le,mips64el,mipsel,arm64 scripts/test.sh -m lab_matrix tests/lab/test_lab_library.py
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fleetprobe.playbook import load_playbook
from labssh import is_mips, ssh
from test_lab_probes import COMMON, REPO, _run, leftovers

if TYPE_CHECKING:
    from conftest import LabForTests  # type: ignore[import-not-found]

pytestmark = [pytest.mark.lab, pytest.mark.lab_matrix]

PLAYBOOKS = sorted(p for p in (REPO / "playbooks").glob("*.yml")
                   if not any(pr.kind == "module" for pr in load_playbook(p).probes))

#: A loopback TCP exchange with busybox nc: a listener, a client that connects and sends a line,
#: and a connection to a closed port (refused: an RST, and a drop with reason NO_SOCKET).
_TCP = ("(nc -l -p 9917 >/dev/null 2>&1 &); sleep 0.3; echo hi | nc -w 1 127.0.0.1 9917 >/dev/null 2>&1; "
        "nc -w 1 127.0.0.1 9 </dev/null >/dev/null 2>&1; ")
#: A memory cgroup of 16 MiB and a memory hog in it (an awk string doubling itself: anonymous
#: memory, charged on page faults): the cgroup's OOM killer kills the hog only.
_OOM = ("mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup; "
        "echo +memory > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; mkdir -p /sys/fs/cgroup/fp-oom; "
        "echo 16M > /sys/fs/cgroup/fp-oom/memory.max; "
        "sh -c 'echo $$ > /sys/fs/cgroup/fp-oom/cgroup.procs && exec awk \"BEGIN { s = 1; while (1) s = s s }\"' "
        ">/dev/null 2>&1; ")
#: A user for su and setuidgid (the guests' /etc/passwd has root only; the rootfs is an initramfs).
_USER = "grep -q '^fpnobody:' /etc/passwd || echo 'fpnobody:x:65534:65534::/:/bin/sh' >> /etc/passwd; "

#: One loop iteration per playbook (busybox applets only). The first module named in
#: /etc/lab-modules is loaded at boot, so insmod of it asks for CAP_SYS_MODULE and fails (EEXIST).
WORKLOAD: dict[str, str] = {
    "bashreadline": "true; ",
    "biolatency": "cat /proc/partitions >/dev/null; ",
    "biosize": "cat /proc/partitions >/dev/null; ",
    "capable": ("touch /tmp/fpcap; chown 65534 /tmp/fpcap; rm -f /tmp/fpnod; mknod /tmp/fpnod c 1 3; "
                "insmod /lib/modules/$(uname -r)/$(head -n1 /etc/lab-modules) 2>/dev/null; "),
    "creds": _USER + "su -s /bin/sh -c true fpnobody; hostname $(hostname); ",
    "dcsnoop": "mkdir /tmp/fpd$i; rmdir /tmp/fpd$i; ls /tmp/fp-none-$i 2>/dev/null; ",
    "execsnoop": "/bin/true; sh -c true; ",
    "ext4dist": "cat /etc/hostname >/dev/null; ",
    "forklat": "/bin/true; sh -c true; ",
    "gethostlatency": "true; ",
    "killsnoop": "sleep 30 & s=$!; kill -0 $s; kill -9 $s; ",
    "mdflush": "sync; ",
    "modload": "true; ",
    "naptime": "usleep 2000; sleep 0.05; ",
    "oomkill": _OOM,
    "opencount": "cat /etc/hostname /etc/passwd >/dev/null; ",
    "opensnoop": "cat /etc/hostname /etc/passwd >/dev/null; cat /etc/fp-none 2>/dev/null; ",
    "pidpersec": "/bin/true; sh -c true; ",
    "setuids": _USER + "su -s /bin/sh -c true fpnobody; setuidgid fpnobody true 2>/dev/null; ",
    "ssllatency": "true; ",
    "statsnoop": "stat /etc/hostname >/dev/null; ls -l /etc >/dev/null; stat /fp-none 2>/dev/null; ",
    "swapin": "true; ",
    # busybox sync: no option fsync(2)s each FILE, -d fdatasync(2)s, -f syncfs(2)s (no fsync applet).
    "syncsnoop": "echo x > /tmp/fps; sync; sync -f /tmp/fps; sync /tmp/fps; sync -d /tmp/fps; ",
    "syscount": "cat /etc/hostname >/dev/null; ",
    "tcpaccept": _TCP,
    "tcpconnect": _TCP,
    "tcpdrop": _TCP,
    "tcplife": _TCP,
    "tcpretrans": _TCP,
    "threadsnoop": "true; ",
    "vfscount": ("mkdir /tmp/fpv$i; mv /tmp/fpv$i /tmp/fpw$i; ln -s /tmp/fpw$i /tmp/fpl$i; readlink /tmp/fpl$i "
                 ">/dev/null; echo x > /tmp/fpf$i; ln /tmp/fpf$i /tmp/fph$i; : > /tmp/fpf$i; "
                 "stat /tmp/fpf$i >/dev/null; df /tmp >/dev/null; rm -f /tmp/fpl$i /tmp/fpf$i /tmp/fph$i; "
                 "rmdir /tmp/fpw$i; "),
    "vfsstat": "echo x > /tmp/fpr; cat /tmp/fpr >/dev/null; sync /tmp/fpr; ",
    "writeback": "echo x > /tmp/fpwb; sync; ",
    "xfsdist": "cat /etc/hostname >/dev/null; ",
}

#: Probes a guest places but the lab's initramfs guests cannot make fire, and why.
NOT_PROVOKED: dict[tuple[str, str], str] = {
    ("bashreadline", "line"): "the guests have no bash (busybox ash): skipped where /bin/bash is absent",
    ("biolatency", "issue"): "the guests have no disk (initramfs only)",
    ("biolatency", "complete"): "the guests have no disk (initramfs only)",
    ("biosize", "io"): "the guests have no disk (initramfs only)",
    ("gethostlatency", "lookup"): "nothing dynamically linked in the guests resolves names (busybox is static)",
    ("gethostlatency", "lookup_ret"): "nothing dynamically linked in the guests resolves names (busybox is static)",
    ("killsnoop", "tkill"): "nothing in the guests calls tkill(2) (busybox kill uses kill(2))",
    ("killsnoop", "tgkill"): "nothing in the guests calls tgkill(2) (busybox kill uses kill(2))",
    ("mdflush", "flush"): "the guests have no md arrays (md_mod is not loaded: skipped)",
    ("modload", "load"): "the guests' only modules are the NIC's, loaded at boot and in use",
    ("modload", "unload"): "the guests' only modules are the NIC's, loaded at boot and in use",
    ("capable", "sys_module"): "fires (insmod asks for CAP_SYS_MODULE): checked below as an audit finding",
    ("setuids", "setreuid"): "nothing in the guests calls setreuid(2)",
    ("setuids", "setfsuid"): "nothing in the guests calls setfsuid(2)",
    ("setuids", "setresuid"): "busybox su and setuidgid call setuid(2), not setresuid(2)",
    ("setuids", "setresuid_ret"): "busybox su and setuidgid call setuid(2), not setresuid(2)",
    ("swapin", "swapin"): "the guests have no swap (no disk; swap files cannot live on tmpfs)",
    ("syncsnoop", "msync"): "nothing in the guests calls msync(2)",
    ("syncsnoop", "sync_file_range"): "nothing in the guests calls sync_file_range(2)",
    ("syncsnoop", "sync_file_range2"): "nothing in the guests calls sync_file_range2(2) (and only powerpc has it)",
    ("tcpdrop", "tcp_drop"): "the workload's drops (a SYN to a closed port) are freed before TCP's drop function",
    ("tcpdrop", "reset_sent"): "RSTs to a closed port are sent without a socket, traced only by 6.10+",
    ("tcpretrans", "retransmit"): "loopback loses no segments",
    ("threadsnoop", "thread"): "nothing in the guests starts threads (busybox, dropbear, sftp-server)",
    ("writeback", "start"): "the guests have no block-backed file system (tmpfs does not write back)",
    ("writeback", "written"): "the guests have no block-backed file system (tmpfs does not write back)",
    **{("ssllatency", p.name): "the guests have no OpenSSL: skipped where no libssl path exists"
       for p in load_playbook(REPO / "playbooks" / "ssllatency.yml").probes},
    **{(book, p.name): f"the guests have no {fs} (the module is not loaded: skipped)"
       for book, fs in (("xfsdist", "XFS"), ("ext4dist", "ext4"))
       for p in load_playbook(REPO / "playbooks" / f"{book}.yml").probes},
}

#: Probes of which each host needs one to fire, not each: the same question asked of two syscalls,
#: where the C library calls one of them (statfs64(2) on ppc64le and mipsel, statfs(2) elsewhere;
#: a kernel without statfs64 skips that probe with the reason; statx(2) or fstatat for stat(3)).
EITHER: dict[tuple[str, str], str] = {
    ("vfscount", "statfs"): "statfs64",
    ("vfscount", "statfs64"): "statfs",
    # glibc's stat(3) calls fstatat on most 64-bit arches and statx(2) on mips64 and 32-bit ones.
    ("statsnoop", "stat"): "statx",
    ("statsnoop", "statx"): "stat",
    ("statsnoop", "stat_ret"): "statx_ret",
    ("statsnoop", "statx_ret"): "stat_ret",
}


def _fired(report: dict[str, Any], host: dict[str, Any], probe: str) -> int:
    """Hits of ``probe`` on ``host``: streamed, or counted in its kernel's (or the stream's) tables."""
    n = int(host["hits"].get(probe, 0))
    tables = report.get("aggregate", {}).get("aggregates", {}).get("hosts", {}).get(host["host"], {})
    return max([n, *(int(t["hits"]) for tid, t in tables.items() if tid.split(":", 1)[0] == probe)])


def one_per_arch(lab: LabForTests) -> list[Any]:
    """The first guest of each arch in the fleet."""
    seen: dict[str, Any] = {}
    for vm in lab.vms:
        seen.setdefault(vm.arch, vm)
    return list(seen.values())


def test_every_shipped_playbook_has_a_workload() -> None:
    assert set(WORKLOAD) == {p.stem for p in PLAYBOOKS}
    probes = {(p.stem, pr.name) for p in PLAYBOOKS for pr in load_playbook(p).probes}
    assert set(NOT_PROVOKED) <= probes, set(NOT_PROVOKED) - probes
    assert set(EITHER) <= probes and set(EITHER.values()) <= {p for _, p in probes}, EITHER


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.stem)
def test_shipped_playbook_fires_on_every_arch(lab_fleet: LabForTests, playbook: Path, tmp_path: Path) -> None:
    vms = one_per_arch(lab_fleet)
    pb = load_playbook(playbook)
    run_id = "l" + uuid.uuid4().hex[:5] + playbook.stem.replace("-", "")[:8]
    # From the moment the run's instance exists (its triggers are placed before the window opens)
    # until it is gone; at most 120 s, and not past the stop file the test writes once the run is
    # over (a host that placed nothing has no instance to wait for).
    stop = f"/tmp/fp-stop-{run_id}"
    loop = (f"n=0; until ls /sys/kernel/tracing/instances | grep -q fp_{run_id}_ || [ -e {stop} ] "
            "|| [ $n -ge 600 ]; do sleep 0.2; n=$((n+1)); done; i=0; "
            f"while ls /sys/kernel/tracing/instances | grep -q fp_{run_id}_ && [ $i -lt 400 ]; do "
            f"{WORKLOAD[playbook.stem]}i=$((i+1)); sleep 0.3; done; rm -f {stop}")
    threads = [threading.Thread(target=ssh, args=(lab_fleet, vm, loop, 300), daemon=True) for vm in vms]
    for t in threads:
        t.start()
    report_path = tmp_path / "report.json"
    rc, out = _run(["run", str(playbook), "-i", str(lab_fleet.inventory), "--limit", ",".join(v.name for v in vms),
                    "--duration", "6s", "--run-id", run_id, "--json", str(report_path), *COMMON])
    for vm in vms:
        ssh(lab_fleet, vm, f"touch {stop}")
    for t in threads:
        t.join(150)
    report = json.loads(report_path.read_text())
    if os.environ.get("FLEETPROBE_LAB_EXAMPLES"):
        # The playbooks' "Example:" headers are taken from these (scripts/playbook_examples.py).
        saved = Path(os.environ["FLEETPROBE_LAB_EXAMPLES"])
        saved.mkdir(parents=True, exist_ok=True)
        (saved / f"{playbook.stem}.txt").write_text(out)
        (saved / f"{playbook.stem}.json").write_text(report_path.read_text())
    hosts = {h["host"]: h for h in report["hosts"]}
    assert set(hosts) == {vm.name for vm in vms}, out
    silent: list[str] = []
    for vm in vms:
        h = hosts[vm.name]
        placed, skipped = set(h["placed_probes"]), dict(h["skipped_probes"])
        assert placed | set(skipped) == {p.name for p in pb.probes}, (vm.name, placed, skipped)
        assert all(reason.strip() for reason in skipped.values()), (vm.name, skipped)
        if not placed:
            assert h["status"] != "ok" and h["reason"], h
            continue
        if is_mips(vm) and h["status"] != "ok":
            # A MIPS kernel may oops under a busy kprobe (README): then fleetprobe must say so.
            assert h["kernel_oopses"] > 0 or any("oops" in a for a in h["alerts"]), h
            continue
        assert h["status"] == "ok" and h["cleanup"] == "clean" and h["kernel_oopses"] == 0, \
            (vm.name, h["reason"], h["evidence"])
        for probe in sorted(placed):
            other = EITHER.get((playbook.stem, probe))
            if other in placed and _fired(report, h, other) > 0:
                continue
            if (playbook.stem, probe) not in NOT_PROVOKED and _fired(report, h, probe) == 0:
                silent.append(f"{vm.name} ({vm.arch}): {probe} placed, did not fire")
        if playbook.stem == "capable":
            assert _fired(report, h, "sys_module") > 0, f"{vm.name}: insmod asked for no CAP_SYS_MODULE"
    assert not silent, silent
    for vm in vms:
        assert leftovers(lab_fleet, vm, run_id) == "", vm.name
    if playbook.stem == "oomkill":
        for vm in vms:
            ssh(lab_fleet, vm, "rmdir /sys/fs/cgroup/fp-oom 2>/dev/null; true")
