"""Bring a lab fleet up, report on it, take it down.

All state lives in the lab directory, so `lab down` works from a fresh
process, also after the one that ran `lab up` crashed:

    <lab_dir>/debian/          private apt state + downloaded .debs (debian.py)
    <lab_dir>/images/<arch>/   kernels + shared initramfs, keyed by package versions
    <lab_dir>/id_ed25519       root login key for every VM
    <lab_dir>/known_hosts      [127.0.0.1]:PORT entries, written before boot
    <lab_dir>/vms/<name>/      host key, initramfs, serial.log, qemu.pid
    <lab_dir>/inventory.yml    Ansible-layout inventory of the running VMs
    <lab_dir>/lab.json         per-VM arch, kernel package/version, port, pid
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from fleetprobe.kmod import debian
from fleetprobe.errors import InputError, LoginFailed, LoginRefused
from fleetprobe.lab import image as lab_image
from fleetprobe.lab import keys, vm
from fleetprobe.lab.arches import ARCHES, DEFAULT_FLEET, LabArch, lab_arch
from fleetprobe.lab.inventory import (LabVM, read_lab_json, vm_name, write_inventory,
                                      write_known_hosts, write_lab_json)
from fleetprobe.lab.lines import DEFAULT_LINE, LINES, kernel_line

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class LabFleet:
    """A running lab: where its files are, and one record per VM."""

    lab_dir: Path
    vms: list[LabVM]
    started: list[str] = field(default_factory=list)   # names this `up` call booted
    reused: list[str] = field(default_factory=list)    # names that were already running

    @property
    def inventory(self) -> Path:
        """The inventory file to pass to `fleetprobe run -i`."""
        return self.lab_dir / "inventory.yml"

    @property
    def lab_json(self) -> Path:
        """Per-VM records (arch, kernel package and version) as JSON."""
        return self.lab_dir / "lab.json"

    @property
    def key(self) -> Path:
        """The root login key."""
        return self.lab_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """The lab's known_hosts file."""
        return self.lab_dir / "known_hosts"


@dataclass(frozen=True)
class VMStatus:
    """One VM as `lab status` sees it."""

    vm: LabVM
    running: bool


def default_lab_dir() -> Path:
    """``$FLEETPROBE_LAB_DIR``, else ``$XDG_CACHE_HOME/fleetprobe/lab``, else ``~/.cache/fleetprobe/lab``."""
    env = os.environ.get("FLEETPROBE_LAB_DIR")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(cache) / "fleetprobe" / "lab").resolve()


#: What `lab up` boots: how many VMs per (lab arch, kernel line request).
FleetSpec = dict[tuple[str, str], int]

#: A kernel request meaning "every line in fleetprobe.lab.lines.LINES the archive serves for the arch".
ALL_LINES = "all"


def fleet_spec(arches: list[str] | None, count_per_arch: dict[str, int] | None,
               kernels: dict[str, tuple[str, ...]] | None = None) -> FleetSpec:
    """How many VMs of which (arch, kernel line): the default fleet, or 1 (or the given count) per named arch.

    ``kernels`` maps a lab arch name to its lines (``("5.10", "6.12")``); the
    key ``"*"`` applies to arches not named.  No entry: the default line.
    Each (arch, line) gets the arch's count.
    """
    if not arches and not count_per_arch:
        base = dict(DEFAULT_FLEET)
        if kernels:
            # --kernel alone: one VM per requested line of every arch it names, or
            # of the default fleet's arches for plain lines.
            named = [a for a in kernels if a != "*"]
            base = {lab_arch(a).name: 1 for a in named} or {a: 1 for a in DEFAULT_FLEET}
    else:
        counts = dict(count_per_arch or {})
        base = {}
        for name in list(arches or counts):
            arch = lab_arch(name)
            n = counts.get(name, counts.get(arch.name, 1))
            if n < 0:
                raise InputError(f"count for {arch.name} must be >= 0, got {n}")
            base[arch.name] = n
    kernels = {(k if k == "*" else lab_arch(k).name): v for k, v in (kernels or {}).items()}
    spec: FleetSpec = {}
    for arch_name, n in base.items():
        for line in kernels.get(arch_name) or kernels.get("*") or (DEFAULT_LINE,):
            if line != ALL_LINES:
                kernel_line(line)  # a typo fails here, before anything is downloaded
            spec[(arch_name, line)] = n
    return spec


@contextmanager
def _lab_lock(lab_dir: Path) -> Iterator[None]:
    """One `lab up`/`lab down` at a time per lab directory."""
    lab_dir.mkdir(parents=True, exist_ok=True)
    with open(lab_dir / "lab.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _vm_paths(lab_dir: Path, name: str) -> vm.VMPaths:
    """The file locations of VM ``name``."""
    return vm.VMPaths(lab_dir / "vms" / name)


def _running(lab_dir: Path) -> list[LabVM]:
    """Recorded VMs whose qemu is still running (pid verified), with their current pid."""
    alive = []
    for rec in read_lab_json(lab_dir / "lab.json"):
        pid = vm.running_pid(_vm_paths(lab_dir, rec.name))
        if pid is not None:
            alive.append(replace(rec, pid=pid))
    return alive


def _write_lab_files(lab_dir: Path, vms: list[LabVM]) -> None:
    """Rewrite known_hosts, inventory.yml and lab.json for ``vms``."""
    write_known_hosts(lab_dir / "known_hosts", vms)
    write_inventory(lab_dir / "inventory.yml", vms, lab_dir / "id_ed25519", lab_dir / "known_hosts")
    write_lab_json(lab_dir / "lab.json", vms)


async def _wait_one(rec: LabVM, paths: vm.VMPaths, key: Path, known_hosts: Path,
                    started_at: float, deadline: float) -> LabVM:
    """Wait for one VM's SSH banner and a real login; returns its record with release and boot time."""
    def alive() -> bool:
        return vm.running_pid(paths) is not None

    try:
        await vm.wait_banner(rec.port, deadline, alive)
    except (TimeoutError, ConnectionError) as exc:
        raise vm.VMError(f"no SSH banner from 127.0.0.1:{rec.port} ({exc})", where=rec.name,
                         hint=f"console {paths.serial_log}:\n{vm.serial_tail(paths)}") from exc
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            release, machine = await vm.login(rec.port, key, known_hosts,
                                              max(5.0, min(60.0, deadline - time.monotonic())))
        except LoginRefused as exc:
            # Wrong host key or refused login key: retrying cannot help.
            raise vm.VMError(str(exc), where=rec.name,
                             hint=f"the lab files may be stale; run `fleetprobe lab down` "
                                  f"and `lab up` again. console {paths.serial_log}") from exc
        except LoginFailed as exc:
            # dropbear just after start has dropped a first key exchange
            # (seen on mips64el/mipsel: "Failed assertion (rsa.c:164)" in the
            # console); a fresh connection then succeeds.  Retry until the deadline.
            last = exc
            if not alive():
                break
            await asyncio.sleep(1.0)
            continue
        if machine != rec.uname_m:
            raise vm.VMError(f"guest says uname -m {machine!r}, expected {rec.uname_m!r}",
                             where=rec.name)
        return replace(rec, kernel_release=release, boot_seconds=round(time.monotonic() - started_at, 1))
    raise vm.VMError(f"SSH login to 127.0.0.1:{rec.port} did not succeed: {last!r}", where=rec.name,
                     hint=f"console {paths.serial_log}:\n{vm.serial_tail(paths)}")


async def _wait_all(recs: list[LabVM], lab_dir: Path, started_at: dict[str, float],
                    deadline: float) -> list[LabVM | BaseException]:
    """Wait for every VM concurrently; a failure is returned as a value, not raised."""
    return await asyncio.gather(
        *[_wait_one(r, _vm_paths(lab_dir, r.name), lab_dir / "id_ed25519", lab_dir / "known_hosts",
                    started_at[r.name], deadline) for r in recs],
        return_exceptions=True)


def check_prerequisites(arches: list[LabArch]) -> None:
    """Fail once, up front, naming the Debian package for any missing tool."""
    debian.require_tools()
    for arch in arches:
        vm.require_qemu(arch)


def _plan_all(spec: FleetSpec, cache: Path) -> dict[tuple[str, str], list[lab_image.ImagePlan]]:
    """Resolve every requested (arch, line) to exact packages, in parallel; one list of plans per request.

    A line the archive does not serve for an arch is an error, except under
    ``all``, which takes the lines that exist (and fails only if none does).
    """
    jobs: list[tuple[tuple[str, str], str]] = []
    for (arch_name, req) in spec:
        for line in (LINES if req == ALL_LINES else (req,)):
            jobs.append(((arch_name, req), line))

    def one(job: tuple[tuple[str, str], str]) -> lab_image.ImagePlan | lab_image.ImageError:
        (arch_name, req), line = job
        try:
            return lab_image.plan_image(ARCHES[arch_name], cache, kernel_line(line))
        except lab_image.ImageError as exc:
            if req == ALL_LINES:
                return exc
            raise

    with ThreadPoolExecutor(max_workers=max(1, min(6, len(jobs)))) as pool:
        results = list(pool.map(one, jobs))
    plans: dict[tuple[str, str], list[lab_image.ImagePlan]] = {request: [] for request in spec}
    for (request, _line), res in zip(jobs, results):
        if isinstance(res, lab_image.ImagePlan):
            plans[request].append(res)
    for request, found in plans.items():
        if not found:
            errors = [str(r) for (req, _l), r in zip(jobs, results) if req == request]
            raise lab_image.ImageError(f"Debian serves none of the lines {', '.join(LINES)} for {request[0]}: "
                                       + "; ".join(errors), where=request[0])
    return plans


def _build(cache_dir: Path, cache: Path, plan: lab_image.ImagePlan) -> lab_image.LabImage:
    """Build ``plan``'s image; if the mirror lists its kernel but does not serve it, take the line's next source."""
    failures: list[str] = []
    wanted = plan.line
    while True:
        try:
            image = lab_image.build_image(cache_dir, plan)
        except lab_image.KernelDownloadError as exc:
            if not plan.request:
                raise
            failures.append(exc.message)
            try:
                plan = lab_image.plan_image(plan.arch, cache, kernel_line(plan.request), after=plan.kernel_suites)
            except lab_image.ImageError as none_left:
                raise lab_image.ImageError("; ".join(failures) + "; " + none_left.message,
                                           where=plan.arch.name, hint=exc.hint) from None
            continue
        if image.line != wanted:
            raise lab_image.ImageError(f"{image.kernel_package} {image.kernel_version} is line {image.line}, "
                                       f"wanted {wanted}: " + "; ".join(failures), where=plan.arch.name)
        return image


def up(arches: list[str] | None = None, count_per_arch: dict[str, int] | None = None,
       lab_dir: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
       cache_dir: Path | None = None, kernels: dict[str, tuple[str, ...]] | None = None) -> LabFleet:
    """Boot the lab fleet (default: 3 x x86_64, 1 ppc64le, 1 mips64el, 1 arm64, on 6.1) and write its inventory.

    ``kernels``: kernel lines per arch (see fleet_spec); each (arch, line)
    gets the arch's count, and its VMs are named ``lab-<arch>-<line>-<n>``.
    VMs of the requested names that are already running are reused.  If any
    VM fails to boot, every VM this call started is stopped again and the
    error names the VM and shows its console.  ``cache_dir`` (default: the
    lab dir) holds the downloaded packages and built images, so several labs
    can share them.
    """
    lab_dir = (lab_dir or default_lab_dir()).resolve()
    cache_dir = (cache_dir or lab_dir).resolve()
    spec = fleet_spec(arches, count_per_arch, kernels)
    check_prerequisites([ARCHES[a] for a, _line in spec])
    with _lab_lock(lab_dir):
        running = {r.name: r for r in _running(lab_dir)}
        cache = cache_dir / "debian"
        # Which exact kernel each line means today: resolved from the archive's lists.
        plans: dict[tuple[str, str], lab_image.ImagePlan] = {}
        counts: dict[tuple[str, str], int] = {}
        for (arch_name, _req), found in _plan_all(spec, cache).items():
            for plan in found:
                key = (arch_name, plan.line)
                plans.setdefault(key, plan)
                counts[key] = max(counts.get(key, 0), spec[(arch_name, _req)])
        wanted = [(ARCHES[a], line, vm_name(a, line, i))
                  for (a, line), n in sorted(counts.items()) for i in range(1, n + 1)]
        to_start = [(arch, line, name) for arch, line, name in wanted if name not in running]
        fleet = LabFleet(lab_dir=lab_dir, vms=[], reused=[n for _a, _l, n in wanted if n in running])

        # Images: one per (arch, line), built in parallel (downloads and xz are the cost).
        need = sorted({(arch.name, line) for arch, line, _n in to_start})
        with ThreadPoolExecutor(max_workers=max(1, len(need))) as pool:
            images = dict(zip(need, pool.map(lambda k: _build(cache_dir, cache, plans[k]), need)))

        client_public = keys.load_or_create_client_key(lab_dir / "id_ed25519")
        new: list[LabVM] = []
        started_at: dict[str, float] = {}
        try:
            for arch, line, name in to_start:
                img = images[(arch.name, line)]
                paths = _vm_paths(lab_dir, name)
                paths.root.mkdir(parents=True, exist_ok=True)
                host_key, host_public = keys.load_or_create_host_key(paths.host_key)
                overlay = lab_image.vm_overlay(name, host_key, client_public)
                started_at[name] = time.monotonic()
                pid, port = vm.start(arch, img.kernel, [img.initramfs.read_bytes(), overlay], paths, name)
                new.append(LabVM(
                    name=name, arch=arch.name, debian_arch=arch.debian_arch, uname_m=arch.uname_m,
                    kernel_release=img.kernel_release, kernel_package=img.kernel_package,
                    kernel_version=img.kernel_version, port=port, pid=pid,
                    serial_log=str(paths.serial_log), host_key_public=host_public,
                    image_key=img.key, line=img.line))
                fleet.started.append(name)
            # known_hosts (and lab.json, so a crashed controller's VMs can be
            # found by `lab down`) are written before any login is attempted.
            _write_lab_files(lab_dir, list(running.values()) + new)
            deadline = time.monotonic() + timeout_s
            results = asyncio.run(_wait_all(new, lab_dir, started_at, deadline))
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0] if len(errors) == 1 else vm.VMError(
                    f"{len(errors)} lab VMs failed to boot:\n" + "\n".join(str(e) for e in errors))
        except BaseException:
            for name in fleet.started:
                vm.stop(_vm_paths(lab_dir, name))
            _write_lab_files(lab_dir, list(running.values()))
            raise
        booted = [r for r in results if isinstance(r, LabVM)]
        fleet.vms = sorted(list(running.values()) + booted, key=lambda v: v.name)
        _write_lab_files(lab_dir, fleet.vms)
        return fleet


def down(lab_dir: Path | None = None, names: list[str] | None = None) -> list[str]:
    """Stop the lab's VMs (all, or only ``names``); returns the names actually stopped.

    VMs are found by their pid files under vms/, not only lab.json, so VMs
    of an `up` that crashed before writing its records are stopped too; each
    pid is checked to be our qemu before it is signalled.
    """
    lab_dir = (lab_dir or default_lab_dir()).resolve()
    if not lab_dir.exists():
        return []
    with _lab_lock(lab_dir):
        vms_dir = lab_dir / "vms"
        candidates = sorted(p.name for p in vms_dir.iterdir() if p.is_dir()) if vms_dir.exists() else []
        if names is not None:
            candidates = [n for n in candidates if n in names]
        stopped = [n for n in candidates if vm.stop(_vm_paths(lab_dir, n))]
        remaining = _running(lab_dir)
        _write_lab_files(lab_dir, remaining)
        return stopped


def status(lab_dir: Path | None = None) -> list[VMStatus]:
    """Every VM recorded in lab.json and whether its qemu is running."""
    lab_dir = (lab_dir or default_lab_dir()).resolve()
    out = []
    for rec in read_lab_json(lab_dir / "lab.json"):
        pid = vm.running_pid(_vm_paths(lab_dir, rec.name))
        out.append(VMStatus(vm=replace(rec, pid=pid or rec.pid), running=pid is not None))
    return out
