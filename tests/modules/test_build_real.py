"""Real builds of modules/fp_kprobe and fp_kretprobe for the lab's Debian kernels.

Cross-built on this controller against Debian's linux-headers (fetched into a
private cache by fleetprobe.kmod.debian; the first run downloads ~15 MB per arch),
plus one host build over real SSH to a loopback sshd.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fleetprobe.arches import cross_compiler_package, target_for
from fleetprobe.kmod.cache import ModuleCache, default_cache_dir
from fleetprobe.kmod.compile import build_groups, prepare_debian_tree, read_host_vermagic
from fleetprobe.kmod.deploy import results_by_host
from fleetprobe.kmod.ko import read_modinfo, with_module_name
from fleetprobe.kmod.plan import BuildGroup, plan_builds
from fleetprobe.kmod.source import load_module_source
from fleetprobe.errors import HostError
from fleetprobe.facts import Facts
from fleetprobe.inventory import Host
from fleetprobe.connectors.asyncssh import connect
from fleetprobe.session import SSHOptions

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fixtures' types (tests/modules/conftest.py); pytest provides the values
    from conftest import LabKernel, LoopbackSshd  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parent.parent.parent
SHARED_CACHE = Path(os.environ.get("FLEETPROBE_TEST_CACHE") or default_cache_dir())
MODULES = [load_module_source(ROOT / "modules" / "fp_kprobe"), load_module_source(ROOT / "modules" / "fp_kretprobe")]


def lab_facts(k: LabKernel, host: str) -> Facts:
    """Facts as a lab VM of kernel ``k`` reports them (no build tree, Debian uname -v)."""
    return Facts(host=host, arch=k.uname_m, kernel_release=k.release,
                 kernel_version=f"#1 SMP Debian {k.package_version} (2025-01-01)",
                 endian="little", elf_class=32 if k.uname_m == "mips" else 64)


def build(groups: list[BuildGroup], cache: ModuleCache) -> list:
    """Run build_groups with the shared Debian cache (tests/modules/conftest.py: shared_cache)."""
    root = SHARED_CACHE
    return asyncio.run(build_groups(groups, cache=cache, trees=root / "kernel-trees", debian_cache=root / "debian"))


def need_compiler(debian_arch: str, triplet: str) -> None:
    """Skip, naming the package, when the cross compiler is not installed."""
    if shutil.which(f"{triplet}-gcc-12") is None and shutil.which("gcc-12") is None:
        pytest.skip(f"apt-get install {cross_compiler_package(debian_arch)}")


def check_renamed(ko: bytes, source_name: str) -> None:
    """with_module_name on a real .ko: only the struct module name and .modinfo's name= change."""
    new = "fp_t0a1b2_c3d4_fork"
    out = with_module_name(ko, new)
    assert len(out) == len(ko)
    changed = [i for i, (a, b) in enumerate(zip(ko, out)) if a != b]
    name_at = out.find(new.encode() + b"\0")
    assert name_at >= 0 and ko[name_at:name_at + len(source_name) + 1] == source_name.encode() + b"\0"
    modinfo_at = ko.find(b"name=" + source_name.encode() + b"\0")
    allowed = set(range(name_at, name_at + 56)) | set(range(modinfo_at, modinfo_at + len(source_name) + 6))
    assert changed and set(changed) <= allowed
    assert read_modinfo(out).get("name") is None and read_modinfo(out).vermagic == read_modinfo(ko).vermagic
    assert with_module_name(out, "fp_other") != out  # renaming again works on the renamed field
    with pytest.raises(ValueError, match="must be fp_"):
        with_module_name(ko, "evil;rmmod")
    with pytest.raises(ValueError, match="must be fp_"):
        with_module_name(ko, "fp_" + "x" * 53)


@pytest.mark.parametrize("lab_arch", ["x86_64", "ppc64le", "mips64el", "mipsel", "arm64"])
def test_cross_build_for_lab_kernel(lab_arch: str, lab_kernels: dict[str, LabKernel], tmp_path: Path) -> None:
    k = lab_kernels[lab_arch]
    fleet = [lab_facts(k, f"{lab_arch}-{i}") for i in range(3)]
    target = target_for(fleet[0])
    assert target is not None
    need_compiler(k.debian_arch, target.triplet)
    cache = ModuleCache(tmp_path / "modules")
    groups = plan_builds(fleet, MODULES)
    # Three hosts of one kernel, two modules: two builds, each serving all three hosts.
    assert [(g.key.module, g.hosts, g.where) for g in groups] == [
        (m.name, tuple(f.host for f in fleet), "controller") for m in MODULES]
    results = build(groups, cache)
    for r in results:
        assert r.error is None, str(r.error) + "\n" + (r.error.evidence if r.error else "")
        m = r.module
        assert m is not None and not m.cached
        assert (m.elf.machine, m.elf.elf_class, m.elf.endian) == (target.elf_machine, target.elf_class, "little")
        assert m.modinfo.vermagic.split()[0] == k.release
        assert m.modinfo.get("name") == r.group.key.module
        assert "run:charp" in m.modinfo.fields["parmtype"]
        check_renamed(m.data(), r.group.key.module)
    entries = sorted(p.name for p in (cache.root / k.debian_arch / k.release).iterdir())
    assert entries == sorted(f"{m.name}-{m.source_hash}" for m in MODULES)
    per_host = results_by_host(results)
    assert set(per_host) == {f.host for f in fleet}
    assert {per_host[f.host]["fp_kprobe"].path for f in fleet} == {results[0].module.path}  # type: ignore[union-attr]

    # Second run: straight from the cache, same files, no rebuild.
    mtimes = {r.module.path: r.module.path.stat().st_mtime_ns for r in results}  # type: ignore[union-attr]
    again = build(plan_builds(fleet, MODULES), cache)
    assert all(r.module is not None and r.module.cached and r.module.where == "cache" for r in again)
    assert {r.module.path: r.module.path.stat().st_mtime_ns for r in again} == mtimes  # type: ignore[union-attr]


def test_broken_source_reports_compiler_message(lab_kernels: dict[str, LabKernel], tmp_path: Path) -> None:
    k = lab_kernels["ppc64le"]
    need_compiler(k.debian_arch, "powerpc64le-linux-gnu")
    src = tmp_path / "fp_kprobe"
    shutil.copytree(ROOT / "modules" / "fp_kprobe", src)
    c = (src / "fp_kprobe.c").read_text()
    (src / "fp_kprobe.c").write_text(c.replace("atomic_long_inc(&hits);", "atomic_long_inc(&hits_typo);", 1))
    broken = load_module_source(src)
    fleet = [lab_facts(k, "p1"), lab_facts(k, "p2")]
    cache = ModuleCache(tmp_path / "modules")
    (r,) = build(plan_builds(fleet, [broken]), cache)
    assert r.module is None and r.error is not None
    assert "make exit status 2" in r.error.message
    assert "fp_kprobe.c:" in r.error.evidence and "error: 'hits_typo' undeclared" in r.error.evidence
    for host in ("p1", "p2"):
        err = results_by_host([r])[host]["fp_kprobe"]
        assert isinstance(err, HostError) and err.stage == "build" and "hits_typo" in str(err)
    assert not (cache.root / k.debian_arch).exists() or not any((cache.root / k.debian_arch).rglob("*.ko"))


def test_missing_headers_for_unknown_release(tmp_path: Path, lab_kernels: dict[str, LabKernel]) -> None:
    k = replace(lab_kernels["x86_64"], release="6.1.0-999-amd64")
    (r,) = build(plan_builds([lab_facts(k, "ghost")], MODULES[:1]), ModuleCache(tmp_path / "m"))
    assert r.error is not None and "cannot get the kernel headers for 6.1.0-999-amd64" in r.error.message
    assert "linux-headers-6.1.0-999-amd64" in r.error.evidence


def test_host_build_over_ssh(lab_kernels: dict[str, LabKernel], loopback_sshd: LoopbackSshd,
                             tmp_path: Path) -> None:
    """A 'host' with the amd64 kernel's build tree builds the module itself; the .ko comes back over SFTP."""
    k = lab_kernels["x86_64"]
    need_compiler("amd64", "x86_64-linux-gnu")
    tree = prepare_debian_tree(k.release, "amd64", k.package_version, trees=SHARED_CACHE / "kernel-trees",
                               debian_cache=SHARED_CACHE / "debian")
    facts = replace(lab_facts(k, "loop"), build_dir=str(tree.path), make=True, cc="gcc")
    # auto prefers the controller's build; building on a host for the others needs that host trusted.
    groups = plan_builds([facts, lab_facts(k, "other")], MODULES[1:], where="host", trusted={"loop"})
    assert [(g.where, g.build_host, g.hosts) for g in groups] == [("host", "loop", ("loop", "other"))]
    host = Host(name="loop", address="127.0.0.1", port=loopback_sshd.port, user="root",
                key_file=str(loopback_sshd.client_key), known_hosts=str(loopback_sshd.known_hosts))
    options = SSHOptions(known_hosts=(str(loopback_sshd.known_hosts),), ssh_config=(),
                         identities=(str(loopback_sshd.client_key),))

    async def go() -> tuple[list, str | None, bytes]:
        """Connect, build, read the (absent) host vermagic, list leftovers, close."""
        session = await connect(host, options)
        try:
            results = await build_groups(groups, cache=ModuleCache(tmp_path / "m"), sessions={"loop": session})
            vermagic = await read_host_vermagic(session, k.release)
            left = await session.run("ls -d /tmp/fleetprobe-build.* 2>/dev/null; true")
            return results, vermagic, left.stdout
        finally:
            await session.close()

    (r,), vermagic, _ = asyncio.run(go())
    assert r.error is None, f"{r.error}\n{r.error.evidence if r.error else ''}"
    assert r.module is not None and r.module.where == "host"
    assert r.module.modinfo.release == k.release and r.module.elf.machine == 62
    log = (r.module.path.parent / "build.log").read_text()
    assert "make -C" in log
    # This machine has no /lib/modules/<lab release>: nothing to compare with.
    assert vermagic is None
    # The host's temporary build folder (the log's M=, this build's own: other runs on the machine
    # may have theirs) is gone.
    work = re.search(r" M=(/tmp/fleetprobe-build\.\w+) ", log)
    assert work, log[:300]
    assert not Path(work.group(1)).exists()


def test_kernel_tree_builds_wherever_the_cache_is(lab_kernels: dict[str, LabKernel], tmp_path: Path) -> None:
    """A prepared headers tree is relocatable, and a tree an older fleetprobe pinned to a vanished path heals.

    Older trees said ``include <absolute cache path>/usr/src/linux-headers-<abi>-common/Makefile``;
    reached once through a temporary symlink, every later build failed with make's "No such file".
    """
    k = lab_kernels["x86_64"]
    need_compiler(k.debian_arch, "x86_64-linux-gnu")
    trees, debs = SHARED_CACHE / "kernel-trees", SHARED_CACHE / "debian"
    tree = prepare_debian_tree(k.release, k.debian_arch, k.package_version, trees=trees, debian_cache=debs)
    text = (tree.path / "Makefile").read_text()
    assert "include $(dir $(lastword $(MAKEFILE_LIST)))../linux-headers-" in text
    assert not re.search(r"^include /", text, re.M)

    moved = tmp_path / "elsewhere" / "kernel-trees"
    shutil.copytree(tree.path.parents[2], moved / k.debian_arch / tree.path.parents[2].name, symlinks=True)
    copy = moved / k.debian_arch / tree.path.parents[2].name / "usr/src" / tree.path.name / "Makefile"
    copy.write_text(re.sub(r"^include \S+/(linux-headers-\S+/Makefile)$", r"include /gone/usr/src/\1",
                           text, flags=re.M))
    results = asyncio.run(build_groups(plan_builds([lab_facts(k, "h")], MODULES[:1]),
                                       cache=ModuleCache(tmp_path / "modules"), trees=moved, debian_cache=debs))
    assert results[0].module is not None, results[0].error and results[0].error.evidence
    assert "/gone/" not in copy.read_text()
