"""Module probes in `fleetprobe run`, without VMs: the orchestration pieces from captured data and real
builds, and a run against real sshd hosts whose kernel (this machine's) cannot load modules.

tests/data/runner/module-fork-ppc64le-busybox.out is the runner's stdout, byte for byte, from the
qemu lab's ppc64le guest (Debian 6.1.0-50-powerpc64le, busybox ash) loading fp_kprobe for 4 s:
control lines, clock markers and the kernel log records the runner forwarded through the run's
trace_marker (``tracing_mark_write: fpk <record>``).  Captured with::

    { printf '%s\\n#fleetprobe-script-end\\n' "$(cat fleetprobe/runner/runner.sh)"; cat plan; sleep 9; } |
        ssh lab-ppc64le-1 's=; while IFS= read -r l; do ...; done; eval "$s"'

with the plan ``module fp_kprobe /tmp/fp_capt01_beef_fp_kprobe.ko run=capt01 probe=fork
symbol=kernel_clone`` (group fp_capt01_beef, duration 4).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fleetprobe.render.safe import SafeConsole

from fleetprobe.kmod import debian
from fleetprobe.kmod.cache import ModuleCache, default_cache_dir
from fleetprobe.kmod.compile import prepare_debian_tree
from fleetprobe.kmod.plan import debian_package_version
from fleetprobe.kmod.source import load_module_source
from fleetprobe.errors import HostError
from fleetprobe.facts import Facts
from fleetprobe.kmsg import KmsgCollector, MarkerSplitter
from fleetprobe.merge import FleetAggregate
from fleetprobe.kmod.builds import ModuleBuilds
from fleetprobe.parse import TraceStream
from fleetprobe.plan import HostPlan, PlannedProbe
from fleetprobe.runner.runner import ModuleLoad, RunnerReport, plan_directives, teardown_directives

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
CAPTURE = DATA / "runner" / "module-fork-ppc64le-busybox.out"
FP_KPROBE = REPO / "modules" / "fp_kprobe"


def stored_facts(name: str, host: str) -> Facts:
    """Facts stored from a real host (tests/data/facts), renamed."""
    data = json.loads((DATA / "facts" / name).read_text())
    return replace(Facts.from_json(data.get("facts", data)), host=host)


def served_kernel_facts(host: str) -> Facts:
    """A Debian bookworm amd64 host running the kernel Debian's archive serves TODAY.

    The stored facts (tests/data/facts/x86_64-debian-6.1.json) pin the kernel of the day they were
    captured (6.1.0-56-amd64, 6.1.192-2); the archive keeps only the newest build of a line, so a
    test that fetches headers for the stored release fails once Debian moves on. The release and
    version are taken from what linux-image-amd64 depends on now, the way the lab picks its kernel.
    """
    try:
        image, release = debian.kernel_for_metapackage("linux-image-amd64", "amd64", default_cache_dir() / "debian")
    except debian.DebianError as exc:
        pytest.skip(f"cannot ask the Debian archive which amd64 kernel it serves: {exc}")
    base = stored_facts("x86_64-debian-6.1.json", host)
    return replace(base, kernel_release=release,
                   kernel_version=f"#1 SMP PREEMPT_DYNAMIC Debian {image.version} (2026-01-01)")


def split_in_chunks(data: bytes, size: int) -> tuple[bytes, bytes]:
    """Feed a MarkerSplitter ``size`` bytes at a time; return all trace bytes and all records."""
    sp = MarkerSplitter()
    trace, records = b"", b""
    for i in range(0, len(data), size):
        t, r = sp.feed(data[i:i + size])
        trace, records = trace + t, records + r
    t, r = sp.flush()
    return trace + t, records + r


# --- the kernel log through trace_marker --------------------------------------------------------

def test_a_record_needs_the_runs_secret() -> None:
    """With the run's secret, only the runner's own ``fpk:<secret>`` marker lines are records: a user's
    path that holds "tracing_mark_write: fpk ..." (exec'd, or inside a sealed string) stays trace text."""
    sp = MarkerSplitter("ab12")
    forged = (b"   sh-9 [000] ..... 5.0: sched_process_exec: filename=/tmp/x tracing_mark_write: fpk "
              b"6,1,1,-;fleetprobe run=r probe=p ev=hit pid=1 pid=9 old_pid=9\n")
    real = b"   sh-7 [000] ..... 5.1: tracing_mark_write: fpk:ab12 6,2,2,-;fleetprobe run=r probe=p ev=hit\n"
    trace, records = sp.feed(forged + real)
    assert trace == forged and records == b"6,2,2,-;fleetprobe run=r probe=p ev=hit\n" and sp.records == 1


def test_records_come_out_of_the_stream_whole_at_any_chunking() -> None:
    data = CAPTURE.read_bytes()
    lines = data.splitlines(keepends=True)
    want_trace = b"".join(x for x in lines if b"tracing_mark_write: fpk " not in x)
    want_records = [x.split(b": fpk ", 1)[1] for x in lines if b"tracing_mark_write: fpk " in x]
    assert len(want_records) == 91
    for size in (1, 3, 64, 333, 4096, len(data)):
        trace, records = split_in_chunks(data, size)
        assert trace == want_trace, size
        assert records.splitlines(keepends=True) == want_records, size


def test_captured_run_gives_events_status_and_no_gaps() -> None:
    trace, records = split_in_chunks(CAPTURE.read_bytes(), 500)
    report = RunnerReport()
    stream = TraceStream("lab-ppc64le-1", {}, on_control=report.handle)
    stream.feed(trace)
    stream.close()
    # What is left for the trace parser is clean: control lines and clock markers, no garbage.
    assert stream.stats.unparsed == 0 and stream.stats.markers >= 2
    assert report.loaded == ["fp_kprobe"] and report.clean and report.bye and not report.refused
    kmsg = KmsgCollector("lab-ppc64le-1", "capt01")
    events = kmsg.feed(records) + kmsg.flush()
    assert kmsg.stream.lost == 0 and kmsg.stream.malformed == 0
    st = kmsg.status["fork"]
    assert st.planted_at == "kernel_clone+0xc/0x690"  # ppc64le: past the ELFv2 global entry
    assert (st.hits, st.printed, st.missed, st.suppressed) == (43, 86, 0, 0)
    assert len(events) == 86 and {e.fields["ev"] for e in events} == {"pre", "post"}
    pre = [e for e in events if e.fields["ev"] == "pre"]
    assert {e.fields["nip"] for e in pre} == {0xc000000000135bac}
    assert all(e.fields["msr"] == 0x8000000000009033 for e in events)
    # The runner's clock record came first: every event has a host wall-clock time.
    assert kmsg.clock_offset is not None
    assert all(1795658791 <= e.time <= 1795658796 for e in events)
    first = events[0]
    assert (first.pid, first.cpu, first.comm, first.site) == (781, 0, "sh", "kernel_clone+0x0")
    assert first.args == "(kernel_clone+0x0) ev=pre tgid=781 nip=0xc000000000135bac msr=0x8000000000009033"


def test_lines_a_module_printed_that_never_came_through_are_counted_and_said() -> None:
    """The module's own totals at rmmod are the kernel's count: fewer lines collected is loss, said.

    Seen on a slow mips64el guest: the kernel-log reader was still replaying old records when the
    run ended, and the report said 0-23 hits with no loss for a module that printed 46-60 lines.
    """
    from fleetprobe.hostrun import _module_results
    from fleetprobe.outcome import HostOutcome, LossCounters
    _trace, records = split_in_chunks(CAPTURE.read_bytes(), 500)
    module = ModuleLoad("fp_kprobe", "/tmp/fp_x/fp_kprobe.ko", (("probe", "fork"),), "fp_kprobe")
    report = RunnerReport(loaded=["fp_kprobe"], started=True)
    for got, gaps, short in ((86, 0, 0), (70, 0, 16), (70, 6, 16)):
        kmsg = KmsgCollector("lab-ppc64le-1", "capt01")
        kmsg.feed(records)
        kmsg.flush()
        kmsg.stream.lost = gaps
        out, loss = HostOutcome(host="lab-ppc64le-1"), LossCounters()
        out.hits = {"fork": got}
        assert _module_results(None, (module,), report, kmsg, out, loss) == []  # type: ignore[arg-type]
        assert loss.kmsg_gaps == max(gaps, short), (got, gaps, loss)
        said = [a for a in out.alerts if "printed 86 line(s)" in a]
        assert said == ([f"module fp_kprobe (probe fork) printed 86 line(s) and {got} came through the kernel "
                         f"log: {short} not collected"] if short else []), out.alerts
    # Lines of fleetprobe's own processes came through too (left out of the events, counted): no loss.
    kmsg = KmsgCollector("lab-ppc64le-1", "capt01")
    kmsg.feed(records)
    kmsg.flush()
    out, loss = HostOutcome(host="lab-ppc64le-1"), LossCounters()
    out.hits = {"fork": 48}
    _module_results(None, (module,), report, kmsg, out, loss, {"fork": 38})  # type: ignore[arg-type]
    assert loss.kmsg_gaps == 0 and not [a for a in out.alerts if "not collected" in a], out.alerts
    # No totals at all (the reader never reached the unload): a lower bound, said.
    kmsg = KmsgCollector("lab-ppc64le-1", "capt01")
    out, loss = HostOutcome(host="lab-ppc64le-1"), LossCounters()
    out.hits = {"fork": 3}
    _module_results(None, (module,), report, kmsg, out, loss)  # type: ignore[arg-type]
    assert any("never came through the kernel log" in a and "3 hit(s) are a lower bound" in a for a in out.alerts)


def test_a_record_lost_in_the_ring_buffer_is_a_kmsg_gap() -> None:
    lines = CAPTURE.read_bytes().splitlines(keepends=True)
    fpk = [i for i, x in enumerate(lines) if b": fpk " in x]
    del lines[fpk[10]], lines[fpk[20] - 1]
    _, records = split_in_chunks(b"".join(lines), 4096)
    kmsg = KmsgCollector("h", "capt01")
    kmsg.feed(records)
    kmsg.flush()
    assert kmsg.stream.lost == 2 and len(kmsg.stream.gaps) == 2


def test_module_events_fold_into_the_aggregate_like_tracefs_events() -> None:
    _, records = split_in_chunks(CAPTURE.read_bytes(), 4096)
    kmsg = KmsgCollector("lab-ppc64le-1", "capt01")
    agg = FleetAggregate()
    for ev in kmsg.feed(records) + kmsg.flush():
        agg.add_line(ev.host, ev.probe, ev.trace_ts, ev.time, ev.cpu, ev.pid, ev.comm, ev.args)
    from fleetprobe.outcome import HostOutcome
    agg.add_host(HostOutcome(host="lab-ppc64le-1"))
    assert {"ev", "nip", "msr", "tgid"} <= set(agg.fields("fork"))
    nip = dict((v, n) for v, n, _ in agg.top("fork", "nip"))
    assert nip == {0xc000000000135bac: 43, 0xc000000000135bb0: 43}
    assert dict((v, n) for v, n, _ in agg.top("fork", "ev")) == {"pre": 43, "post": 43}


# --- runner directives -------------------------------------------------------------------------

def test_runner_directives_load_the_module_with_run_and_probe() -> None:
    probe = PlannedProbe(name="fork", kind="module", event="", trace_name="fork", symbol="kernel_clone",
                         module=str(FP_KPROBE), params=(("symbol", "kernel_clone"),))
    plan = HostPlan(host="h", run_id="abc123", group="fp_abc123_1a2b", instance="fp_abc123_1a2b_1900000000",
                    probes=(probe,))
    load = ModuleLoad("fp_kprobe", "/tmp/fp_abc123_1a2b_fp_kprobe.ko",
                      (("run", "abc123"), ("probe", "fork"), ("symbol", "kernel_clone")))
    text = plan_directives(plan, tracefs="/sys/kernel/tracing", duration=5, deadline=1900000000, grace=60,
                           modules=(load,))
    assert "module fp_kprobe /tmp/fp_abc123_1a2b_fp_kprobe.ko run=abc123 probe=fork symbol=kernel_clone\n" in text
    assert "enable" not in text  # a module probe has no tracefs event to enable
    assert teardown_directives(plan, "/sys/kernel/tracing", ("fp_kprobe",)).endswith("teardown fp_kprobe\n")


# --- builds: one per (arch, release, source) per run --------------------------------------------

@pytest.fixture
def module_cache(tmp_path: Path) -> ModuleCache:
    """An empty module cache sharing the usual cache's Debian downloads and unpacked kernel trees."""
    usual = default_cache_dir()
    for part in ("debian", "kernel-trees"):
        (usual / part).mkdir(parents=True, exist_ok=True)
        (tmp_path / part).symlink_to(usual / part)
    return ModuleCache(tmp_path / "modules")


@pytest.mark.skipif(not shutil.which("x86_64-linux-gnu-gcc-12") or not shutil.which("make"),
                    reason="needs gcc-12 and make (apt-get install gcc-12 make)")
def test_hosts_of_one_kernel_share_one_controller_build(module_cache: ModuleCache) -> None:
    """Four hosts of the archive's current amd64 kernel ask at once: one real cross-build, four identical modules."""
    source = load_module_source(FP_KPROBE)
    hosts = [served_kernel_facts(f"x86-{i}") for i in range(4)]
    release = hosts[0].kernel_release

    async def go(builds: ModuleBuilds) -> list[object]:
        ready = asyncio.Event()
        ready.set()
        return list(await asyncio.gather(*(builds.module_for(f, source, ready) for f in hosts)))

    builds = ModuleBuilds("controller", module_cache)
    modules = asyncio.run(go(builds))
    assert len(builds.results) == 1, "one build for the group, not one per host"
    assert len({id(m) for m in modules}) == 1
    entries = list((module_cache.root / "amd64" / release).iterdir())
    assert len(entries) == 1
    meta = json.loads((entries[0] / "build.json").read_text())
    assert meta["where"] == "controller" and meta["vermagic"].startswith(f"{release} SMP")
    assert "built on the controller" in builds.describe(modules[0])  # type: ignore[arg-type]
    assert builds.describe(modules[0]).endswith("build 1 of this run")  # type: ignore[arg-type]
    # The next run finds it in the cache: no build at all.
    again = ModuleBuilds("controller", module_cache)
    (cached, *_) = asyncio.run(go(again))
    assert "from the controller's module cache" in again.describe(cached)  # type: ignore[arg-type]


@pytest.mark.skipif(not shutil.which("x86_64-linux-gnu-gcc-12") or not shutil.which("make"),
                    reason="needs gcc-12 and make (apt-get install gcc-12 make)")
def test_a_cached_header_tree_still_builds_once_the_archive_dropped_its_version(tmp_path: Path) -> None:
    """A host not yet upgraded keeps a kernel whose headers Debian no longer serves: the cached tree serves it.

    The archive's current tree is unpacked once (shared cache), then copied into a fresh cache under
    a source version the archive never served, with no apt lists at all. A controller build for a
    host of that version must come from the tree alone; asking the archive would fail.
    """
    facts = served_kernel_facts("x86-old")
    release = facts.kernel_release
    usual = default_cache_dir()
    served = prepare_debian_tree(release, "amd64", debian_package_version(facts.kernel_version),
                                 trees=usual / "kernel-trees", debian_cache=usual / "debian")
    gone = "6.1.0~fleetprobe.gone-1"
    tree_root = served.path.parents[2]  # <trees>/amd64/<release>_<version>/usr/src/linux-headers-<release>
    shutil.copytree(tree_root, tmp_path / "kernel-trees" / "amd64" / f"{release}_{gone}", symlinks=True)
    (tmp_path / "debian").mkdir()
    old = replace(facts, kernel_version=f"#1 SMP PREEMPT_DYNAMIC Debian {gone} (2025-01-01)")
    builds = ModuleBuilds("controller", ModuleCache(tmp_path / "modules"))

    async def go() -> object:
        ready = asyncio.Event()
        ready.set()
        return await builds.module_for(old, load_module_source(FP_KPROBE), ready)

    module = asyncio.run(go())
    assert module.modinfo.vermagic.startswith(f"{release} SMP")  # type: ignore[attr-defined]
    assert not any((tmp_path / "debian").iterdir()), "the archive was never asked"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("make") or not shutil.which("gcc-12"),
                    reason="needs root (simulated hosts), make and gcc-12")
def test_auto_builds_on_the_host_when_the_controller_cannot_get_its_headers(tmp_path: Path) -> None:
    """Headers gone from the archive: with --build-at auto the host that has them builds, for itself only.

    Two hosts of one kernel whose Debian version the archive no longer serves. b1 is a real SSH
    host (simulated: every command runs here for real) with the kernel's build tree, make and gcc;
    b2 has none. The controller's build fails to fetch the headers; b1 then builds over SSH with
    real make and gets a module checked against its release. b2 is not given b1's build (a host's
    build is loaded by that host alone) unless the user trusts b1; then b1's build serves b2 too,
    and the untrusted build never entered the module cache.
    """
    from simhosts import SimFleet

    from fleetprobe.connectors.asyncssh import connect
    from fleetprobe.inventory import Host
    from fleetprobe.session import SSHOptions

    served = served_kernel_facts("b1")
    release = served.kernel_release
    usual = default_cache_dir()
    tree = prepare_debian_tree(release, "amd64", debian_package_version(served.kernel_version),
                               trees=usual / "kernel-trees", debian_cache=usual / "debian")
    host_tree = tmp_path / "lib-modules" / release / "build"
    shutil.copytree(tree.path.parents[2], tmp_path / "lib-modules" / "tree", symlinks=True)
    host_tree.parent.mkdir(parents=True, exist_ok=True)
    host_tree.symlink_to(tmp_path / "lib-modules" / "tree" / "usr" / "src" / f"linux-headers-{release}")
    gone = "6.1.0~fleetprobe.gone-1"
    old = replace(served, kernel_version=f"#1 SMP PREEMPT_DYNAMIC Debian {gone} (2025-01-01)")
    b1 = replace(old, host="b1", build_dir=str(host_tree), make=True, cc="gcc")
    b2 = replace(old, host="b2")
    for part in ("kernel-trees", "debian"):
        (tmp_path / part).mkdir()  # an empty controller cache: the archive is all it has
    source = load_module_source(FP_KPROBE)
    sim = SimFleet(tmp_path / "sim")
    try:
        h = sim.add("b1")
        known = sim.known_hosts_for(tmp_path / "known_hosts")
        host = Host("b1", "127.0.0.1", port=h.port, user="root", key_file=str(sim.client_key_path),
                    known_hosts=str(known))

        async def go(trusted: tuple[str, ...]) -> tuple[ModuleBuilds, list[object]]:
            session = await connect(host, SSHOptions(ssh_config=(), use_agent=False))
            try:
                builds = ModuleBuilds("auto", ModuleCache(tmp_path / "modules"), trusted=trusted)
                ready = asyncio.Event()
                mine = await builds.module_for(b1, source, ready, session)
                ready.set()
                try:
                    theirs: object = await builds.module_for(b2, source, ready)
                except HostError as exc:
                    theirs = exc
                return builds, [mine, theirs]
            finally:
                await session.close()

        builds, (mine, theirs) = asyncio.run(go(()))
        assert mine.where == "host" and mine.key.built_by == "b1"  # type: ignore[attr-defined]
        assert mine.modinfo.vermagic.startswith(f"{release} SMP")  # type: ignore[attr-defined]
        assert "cannot get the kernel headers" in str(builds.results[0].error)
        assert isinstance(theirs, HostError) and "cannot get the kernel headers" in str(theirs)
        assert not (tmp_path / "modules").exists() or not any((tmp_path / "modules").rglob("*.ko")), \
            "a host's own build never enters the shared cache"
        assert any("make -C" in c.command for c in h.ran("other"))
        # Trusted: b1's build serves b2 as well, and is cached with who built it.
        builds, (mine, theirs) = asyncio.run(go(("b1",)))
        assert not isinstance(theirs, HostError), theirs
        assert theirs.data() == mine.data()  # type: ignore[attr-defined]
        (meta_file,) = (tmp_path / "modules").rglob("build.json")
        meta = json.loads(meta_file.read_text())
        assert (meta["where"], meta["build_host"]) == ("host", "b1")
    finally:
        assert sim.stop() == []


def test_a_host_nobody_can_build_for_waits_for_the_fleet_then_fails_with_the_reason(tmp_path: Path) -> None:
    """Not a Debian kernel, no build tree: it waits until every host is set up (one might build), then fails."""
    facts = replace(stored_facts("x86_64-6.18-controller.json", "odd-1"), modules_disabled=False)
    source = load_module_source(FP_KPROBE)
    builds = ModuleBuilds("auto", ModuleCache(tmp_path / "modules"), have_program=lambda _p: True)

    async def go() -> str:
        everyone = asyncio.Event()
        task = asyncio.ensure_future(builds.module_for(facts, source, everyone))
        await asyncio.sleep(0.2)
        assert not task.done(), "must wait while other hosts are still being set up"
        everyone.set()
        with pytest.raises(HostError) as err:
            await task
        return str(err.value)

    text = asyncio.run(go())
    assert "odd-1" in text and "build" in text
    assert "no /lib/modules/6.18.44-fc-v657/build" in text and "is not a Debian kernel" in text
    assert builds.results == [] and not (tmp_path / "modules").exists()


def test_a_failed_build_fails_every_host_of_its_group_once(tmp_path: Path) -> None:
    """A real make failure (a broken module source) is built once and reported to each host with make's words."""
    bad = tmp_path / "fp_broken"
    bad.mkdir()
    (bad / "Kbuild").write_text("obj-m := fp_broken.o\n")
    (bad / "fp_broken.c").write_text("#include <linux/module.h>\nthis is not C;\n")
    usual = default_cache_dir()
    if not shutil.which("x86_64-linux-gnu-gcc-12") or not shutil.which("make"):
        pytest.skip("needs gcc-12 and make (apt-get install gcc-12 make)")
    for part in ("debian", "kernel-trees"):
        (usual / part).mkdir(parents=True, exist_ok=True)
        (tmp_path / part).symlink_to(usual / part)
    source = load_module_source(bad)
    hosts = [served_kernel_facts(f"x86-{i}") for i in range(3)]
    builds = ModuleBuilds("controller", ModuleCache(tmp_path / "modules"))

    async def go() -> list[BaseException | object]:
        ready = asyncio.Event()
        ready.set()
        return list(await asyncio.gather(*(builds.module_for(f, source, ready) for f in hosts),
                                         return_exceptions=True))

    results = asyncio.run(go())
    assert len(builds.results) == 1
    for f, r in zip(hosts, results):
        assert isinstance(r, HostError) and r.host == f.host and r.stage == "build", r
        assert "make exit status" in r.message and "fp_broken.c" in (r.evidence or ""), r.evidence


# --- real sshd hosts on this machine's kernel (no module loading) --------------------------------

needs_sshd = pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()),
                                reason="needs root and OpenSSH sshd (apt-get install openssh-server)")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Two sshd hosts in network namespaces of this machine (its kernel has no module support)."""
    from hostcheck import ensure_tracefs
    from sshhosts import new_fleet

    if os.geteuid() != 0 or not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        pytest.skip("needs root and OpenSSH sshd")
    if not ensure_tracefs():
        pytest.skip("needs tracefs")
    fl = new_fleet(tmp_path_factory.mktemp("module-fleet"))
    try:
        for i in (1, 2):
            fl.add_netns_host(f"mod{i}", 40 + i)
        yield fl
    finally:
        fl.stop()


def _left_by(run_id: str) -> list[str]:
    """What run ``run_id`` left on this kernel (tracefs names, copied modules in /tmp).

    Only this run's names: other tests may be probing this shared kernel at the same time.
    """
    from hostcheck import fleetprobe_leftovers

    return [x for x in fleetprobe_leftovers() if f"fp_{run_id}_" in x] + \
        [str(p) for p in Path("/tmp").glob(f"fp_{run_id}_*.ko")]


def _run_id() -> str:
    """A fresh run id (lowercase letters and digits, as fleetprobe makes them)."""
    return "m" + uuid.uuid4().hex[:7]


def _cli(args: list[str]) -> tuple[int, str]:
    from fleetprobe.cli.main import main

    console = SafeConsole(record=True, width=250)
    rc = main(args, console)
    return rc, console.export_text()


@needs_sshd
def test_module_playbook_without_consent_touches_no_host(fleet: object, tmp_path: Path) -> None:
    pb = tmp_path / "fork-module.yml"
    (tmp_path / "modules").symlink_to(REPO / "modules")  # modules/fp_kprobe next to the playbook
    pb.write_text((REPO / "playbooks/fork-module.yml").read_text().replace("allow_modules: true\n", ""))
    inv = fleet.inventory()  # type: ignore[attr-defined]
    def log_sizes() -> dict[str, int]:
        return {h.name: (h.workdir / "sshd.log").stat().st_size for h in fleet.hosts}  # type: ignore[attr-defined]

    # The fixture's banner probes make sshd log "kex_exchange_identification: Connection closed"
    # a moment later: take the baseline once the logs have been still for a second.
    logs_before = log_sizes()
    for _ in range(20):
        time.sleep(1)
        now = log_sizes()
        if now == logs_before:
            break
        logs_before = now
    run_id = _run_id()
    rc, out = _cli(["run", str(pb), "-i", str(inv), "--no-live", "--no-store", "--duration", "2s",
                    "--run-id", run_id])
    assert rc == 1, out
    assert "loads kernel modules" in out and "--allow-modules" in out
    assert _left_by(run_id) == []
    # No host was even contacted: sshd logged nothing new (LogLevel ERROR logs every failed or
    # refused session; a successful login that ran the runner would leave our instance anyway).
    assert log_sizes() == logs_before


@needs_sshd
@pytest.mark.parametrize("build_at", ["auto", "host", "controller"])
def test_hosts_that_cannot_get_a_module_fail_cleanly_with_the_reason(fleet: object, tmp_path: Path,
                                                                     build_at: str) -> None:
    """This kernel is not Debian's and has no build tree: every host fails at 'build', saying why; nothing is left."""
    inv = fleet.inventory()  # type: ignore[attr-defined]
    report = tmp_path / "report.json"
    env_cache = os.environ.get("FLEETPROBE_CACHE")
    os.environ["FLEETPROBE_CACHE"] = str(tmp_path / "cache")
    run_id = _run_id()
    try:
        rc, out = _cli(["run", str(REPO / "playbooks/fork-module.yml"), "-i", str(inv), "--allow-modules",
                        "--build-at", build_at, "--no-live", "--no-store", "--duration", "2s",
                        "--json", str(report), "--run-id", run_id])
    finally:
        if env_cache is None:
            os.environ.pop("FLEETPROBE_CACHE", None)
        else:
            os.environ["FLEETPROBE_CACHE"] = env_cache
    assert rc == 3, out  # none ok
    hosts = {h["host"]: h for h in json.loads(report.read_text())["hosts"]}
    release = os.uname().release
    for name in ("mod1", "mod2"):
        h = hosts[name]
        assert (h["status"], h["stage"]) == ("failed", "build"), h
        assert "fp_kprobe@" in h["reason"] and release in h["reason"], h["reason"]
        if build_at in ("auto", "host"):
            assert f"no /lib/modules/{release}/build" in h["reason"], h["reason"]
        if build_at in ("auto", "controller"):
            assert "is not a Debian kernel" in h["reason"], h["reason"]
        assert h["events"] == 0 and h["cleanup"] == "not-needed"
    assert not (tmp_path / "cache" / "modules").exists(), "nothing was built"
    assert _left_by(run_id) == []


@needs_sshd
def test_plan_shows_the_build_group_and_why_it_cannot_build(fleet: object) -> None:
    inv = fleet.inventory()  # type: ignore[attr-defined]
    before = _left_by("")
    rc, out = _cli(["plan", str(REPO / "playbooks/fork-module.yml"), "-i", str(inv), "--build-at", "controller"])
    release = os.uname().release
    assert "module builds (1," in out, out
    assert f"for {release} (amd64): 2 hosts: cannot build" in out, out
    assert "hosts: mod1, mod2" in out
    assert "is not a Debian kernel" in out
    assert not set(_left_by("")) - set(before), "plan changes nothing"  # (other tests' runs may end meanwhile)
