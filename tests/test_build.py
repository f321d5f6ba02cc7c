"""build.py without compiling: grouping, placement, cache keys, ELF/.modinfo reading, evidence."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fleetprobe.kmod import debian
from fleetprobe.arches import target_for
from fleetprobe.errors import BuildError, FleetprobeError
from fleetprobe.kmod.cache import ModuleCache
from fleetprobe.kmod.compile import check_module, compiler_messages, BuiltModule, GroupResult
from fleetprobe.kmod.plan import debian_package_version, is_debian_kernel
from fleetprobe.kmod.deploy import host_module_error, results_by_host
from fleetprobe.kmod.ko import ModInfo, read_elf_info, read_modinfo, vermagic_problem, ElfFormatError
from fleetprobe.kmod.plan import BuildKey, plan_builds
from fleetprobe.kmod.source import load_module_source
from fleetprobe.errors import HostError
from fleetprobe.facts import Facts

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"


def stored_facts(name: str, host: str | None = None) -> Facts:
    """Facts stored from a real host (tests/data/facts), optionally renamed."""
    data = json.loads((DATA / "facts" / name).read_text())
    facts = Facts.from_json(data.get("facts", data))
    return replace(facts, host=host) if host else facts


def ko(arch: str) -> bytes:
    """A real fp_kretprobe.ko cross-built for ``arch`` (debug info stripped; see data/build/README.md)."""
    return (DATA / "build" / f"fp_kretprobe-{arch}.ko").read_bytes()


@pytest.fixture
def sources() -> list:
    """The two shipped module sources."""
    return [load_module_source(ROOT / "modules" / "fp_kprobe"), load_module_source(ROOT / "modules" / "fp_kretprobe")]


def never(_: str) -> bool:
    """No program is installed."""
    return False


def always(_: str) -> bool:
    """Every program is installed."""
    return True


# -- sources and keys -----------------------------------------------------------


def test_source_hash_covers_sources_not_docs_or_build_output(tmp_path: Path) -> None:
    mod = tmp_path / "fp_kprobe"
    shutil.copytree(ROOT / "modules" / "fp_kprobe", mod)
    first = load_module_source(mod)
    assert first.name == "fp_kprobe"
    assert [rel for rel, _ in first.files] == ["Kbuild", "fp_kprobe.c"]
    # Build output and documentation do not change the key ...
    (mod / "fp_kprobe.o").write_bytes(b"\x7fELF")
    (mod / ".fp_kprobe.o.cmd").write_text("x")
    (mod / "modules.order").write_text("x")
    (mod / "README.md").write_text("changed docs")
    assert load_module_source(mod).source_hash == first.source_hash
    # ... a one-byte source edit does.
    (mod / "fp_kprobe.c").write_bytes((mod / "fp_kprobe.c").read_bytes() + b"\n")
    assert load_module_source(mod).source_hash != first.source_hash


def test_not_a_module_folder(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no Kbuild or Makefile"):
        load_module_source(tmp_path)


def test_cache_entry_path_names_every_key_part(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path)
    key = BuildKey("ppc64el", "6.1.0-50-powerpc64le", "fp_kprobe", "246d9d41828c03ff")
    assert cache.entry(key) == tmp_path / "ppc64el" / "6.1.0-50-powerpc64le" / "fp_kprobe-246d9d41828c03ff"
    assert cache.lookup(key) is None
    path = cache.store(key, ko("ppc64el"), "log", {"k": 1})
    assert cache.lookup(key) == path and path.read_bytes() == ko("ppc64el")
    # A second store of the same key (a concurrent builder) keeps the first.
    assert cache.store(key, b"other", "log", {}) == path and path.read_bytes() == ko("ppc64el")
    assert [p.name for p in path.parent.parent.iterdir()] == [path.parent.name]  # no temp leftovers


# -- targets ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "debian_arch", "machine"), [
    ("x86_64-debian-6.1.json", "amd64", 62),
    ("ppc64le-6.1.json", "ppc64el", 21),
    ("mips64el-6.1.json", "mips64el", 8),   # uname -m says mips64: the endianness decides
    ("mipsel-6.1.json", "mipsel", 8),
    ("aarch64-6.1.json", "arm64", 183),
    ("i686-6.1.json", "i386", 3),
])
def test_target_from_stored_facts(name: str, debian_arch: str, machine: int) -> None:
    t = target_for(stored_facts(name))
    assert t is not None and (t.debian_arch, t.elf_machine) == (debian_arch, machine)


def test_big_endian_mips64_is_not_mips64el() -> None:
    f = replace(stored_facts("mips64el-6.1.json"), endian="big")
    t = target_for(f)
    assert t is None or t.debian_arch != "mips64el"


def test_debian_kernel_detection() -> None:
    assert is_debian_kernel("6.1.0-50-5kc-malta", "#1 SMP Debian 6.1.176-1 (2025-06-01)")
    assert is_debian_kernel("4.19.0-27-amd64", "")
    assert not is_debian_kernel("5.15.0-91-generic", "#101-Ubuntu SMP Tue Nov 14 13:30:08 UTC 2023")
    assert not is_debian_kernel("6.18.44-fc-v657", "#1 SMP PREEMPT_DYNAMIC @0")
    # trixie's and bookworm-backports' 6.12 name the Debian release in the ABI (uname -v: lab guests).
    assert is_debian_kernel("6.12.118+deb13-amd64", "#1 SMP PREEMPT_DYNAMIC Debian 6.12.118-1 (2026-11-20)")
    assert is_debian_kernel("6.12.95+deb12-5kc-malta", "#1 SMP Debian 6.12.95-1~bpo12+1 (2026-10-01)")
    assert not is_debian_kernel("6.12.118+deb13-amd64", "#1 SMP PREEMPT_DYNAMIC Ubuntu")
    assert debian_package_version("#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2025-11-01)") == "6.1.192-2"
    assert debian_package_version("#1 SMP PREEMPT_DYNAMIC") is None


def test_headers_are_looked_up_in_the_suite_of_the_release() -> None:
    """A 6.12+deb13 kernel's headers are in trixie, +deb12 in bookworm-backports, 5.10.0-N in bullseye."""
    assert debian.release_suites("6.12.118+deb13-arm64")[0] == ("trixie", "trixie-security")
    assert debian.release_suites("6.12.95+deb12-amd64")[0] == ("bookworm-backports",)
    assert debian.release_suites("5.10.0-46-amd64") == (("bullseye", "bullseye-security"),)
    assert debian.release_suites("6.1.0-57-amd64") == (("bookworm", "bookworm-security"),)
    assert debian.release_suites("6.18.44-fc-v657") == ()


# -- planning -----------------------------------------------------------------------


def test_hosts_of_one_kernel_share_one_build(sources: list) -> None:
    fleet = [stored_facts("x86_64-debian-6.1.json", f"x86-{i}") for i in range(5)]
    fleet += [stored_facts("ppc64le-6.1.json"), stored_facts("mips64el-6.1.json")]
    groups = plan_builds(fleet, sources, have_program=always)
    assert len(groups) == 6  # 3 kernels x 2 modules, not 7 hosts x 2
    x86 = [g for g in groups if g.key.debian_arch == "amd64"]
    assert {g.hosts for g in x86} == {tuple(f"x86-{i}" for i in range(5))}
    assert all(g.where == "controller" for g in groups)
    assert {g.package_version for g in x86} == {"6.1.192-2"}
    ppc = [g for g in groups if g.key.debian_arch == "ppc64el"][0]
    assert ppc.compiler == "powerpc64le-linux-gnu-gcc"
    assert "1 host: cross-build on the controller with powerpc64le-linux-gnu-gcc" in ppc.describe()


def test_per_host_module_lists(sources: list) -> None:
    a = stored_facts("x86_64-debian-6.1.json", "a")
    b = stored_facts("x86_64-debian-6.1.json", "b")
    groups = plan_builds({"a": a, "b": b}, {"a": sources[:1], "b": sources}, have_program=always)
    by_mod = {g.key.module: g.hosts for g in groups}
    assert by_mod == {"fp_kprobe": ("a", "b"), "fp_kretprobe": ("b",)}


def test_the_controller_builds_for_everyone_and_a_host_only_for_itself_unless_trusted(sources: list) -> None:
    """A host's build is loaded by other hosts only if the user trusts that host (issue 11, finding 1)."""
    plain = stored_facts("x86_64-debian-6.1.json", "x1")
    builder = replace(stored_facts("x86_64-debian-6.1.json", "x2"),
                      build_dir="/lib/modules/6.1.0-56-amd64/build", make=True, cc="gcc")
    # auto: the controller's build (from Debian's archive) serves every host of the kernel.
    (g,) = plan_builds([plain, builder], sources[:1], have_program=always)
    assert (g.where, g.hosts, g.key.built_by) == ("controller", ("x1", "x2"), "")
    # No controller build possible: x2 builds for itself only; x1 is told why and how to trust x2.
    own, rest = plan_builds([plain, builder], sources[:1], have_program=never)
    assert (own.where, own.build_host, own.hosts, own.key.built_by) == ("host", "x2", ("x2",), "x2")
    assert own.build_dir == "/lib/modules/6.1.0-56-amd64/build"
    assert rest.where == "none" and rest.hosts == ("x1",)
    assert "loaded only by itself" in (rest.error or "") and rest.hint == "--trust-build-host x2 to load its build " \
        "on the other hosts of this kernel"
    # Trusted: one build on x2 for both, under the shareable key.
    (g,) = plan_builds([plain, builder], sources[:1], have_program=never, trusted={"x2"})
    assert (g.where, g.build_host, g.hosts, g.key.built_by) == ("host", "x2", ("x1", "x2"), "")
    (g,) = plan_builds([plain, builder], sources[:1], where="controller", have_program=always)
    assert g.where == "controller"
    (own, rest) = plan_builds([plain, builder], sources[:1], where="host", have_program=always)
    assert own.key.built_by == "x2" and rest.where == "none"


def test_a_release_that_names_a_path_is_never_built_or_cached(sources: list, tmp_path: Path) -> None:
    """A lying host's uname -r becomes part of the cache path: ``../..`` must not leave the cache."""
    liar = replace(stored_facts("x86_64-debian-6.1.json", "liar"), kernel_release="../../../../etc/cron.d/x",
                   build_dir="/tmp/b", make=True, cc="gcc")
    (g,) = plan_builds([liar], sources[:1], have_program=always, trusted={"liar"})
    assert g.where == "none" and "not a plain release name" in (g.error or "")
    cache = ModuleCache(tmp_path / "modules")
    for release in ("../../x", "6.1.0-1/../../x", "..", "6.1.0/evil"):
        with pytest.raises(FleetprobeError):
            cache.entry(BuildKey("amd64", release, "fp_kprobe", "ab" * 8))
    with pytest.raises(FleetprobeError, match="never cached"):
        cache.entry(BuildKey("amd64", "6.1.0-57-amd64", "fp_kprobe", "ab" * 8, built_by="h1"))


def test_the_cache_refuses_a_host_built_entry_unless_its_builder_is_trusted(tmp_path: Path) -> None:
    data = (DATA / "build" / "fp_kretprobe-ppc64el.ko").read_bytes()
    cache = ModuleCache(tmp_path / "modules")
    key = BuildKey("ppc64el", "6.1.0-50-powerpc64le", "fp_kretprobe", "cd" * 8)
    path = cache.store(key, data, "log", {"where": "host", "build_host": "db-7"})
    assert cache.lookup(key) is None, "a host's build is not reused by default"
    assert cache.lookup(key, trusted={"db-9"}) is None
    assert cache.lookup(key, trusted={"db-7"}) == path
    meta = json.loads((path.parent / "build.json").read_text())
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    path.write_bytes(data + b"tampered")
    assert cache.lookup(key, trusted={"db-7"}) is None, "bytes that are not the recorded build are not used"
    ctl = BuildKey("ppc64el", "6.1.0-50-powerpc64le", "fp_kretprobe", "ef" * 8)
    cpath = cache.store(ctl, data, "log", {"where": "controller", "build_host": None})
    assert cache.lookup(ctl) == cpath


def test_cannot_build_says_why_and_what_to_install(sources: list) -> None:
    (g,) = plan_builds([stored_facts("ppc64le-6.1.json")], sources[:1], have_program=never)
    assert g.where == "none"
    assert g.error is not None and "no /lib/modules/6.1.0-50-powerpc64le/build" in g.error
    assert "powerpc64le-linux-gnu-gcc is not installed" in g.error
    assert "apt-get install gcc-12-powerpc64le-linux-gnu" in g.error
    (g,) = plan_builds([stored_facts("ppc64le-6.1.json")], sources[:1], where="host", have_program=always)
    assert g.where == "none" and "no host can build" in (g.error or "")


def test_non_debian_kernel_without_headers(sources: list) -> None:
    f = replace(stored_facts("x86_64-6.18-controller.json"), modules_disabled=False)
    (g,) = plan_builds([f], sources[:1], have_program=always)
    assert g.where == "none" and "is not a Debian kernel" in (g.error or "")


def test_hosts_that_cannot_load_modules_are_not_built_for(sources: list) -> None:
    locked = replace(stored_facts("x86_64-debian-6.1.json", "locked"), lockdown="integrity")
    ok = stored_facts("x86_64-debian-6.1.json", "ok")
    (g,) = plan_builds([locked, ok], sources[:1], have_program=always)
    assert g.hosts == ("ok",) and g.blocked[0][0] == "locked" and "lockdown" in g.blocked[0][1]
    per_host = results_by_host([GroupResult(g, error=BuildError("x", where="w"))])
    assert isinstance(per_host["locked"]["fp_kprobe"], HostError)
    assert "signed" in str(per_host["locked"]["fp_kprobe"])
    (g,) = plan_builds([stored_facts("x86_64-6.18-controller.json")], sources[:1], have_program=always)
    assert g.where == "none" and "modules_disabled" in (g.hint or "")


def test_unknown_machine(sources: list) -> None:
    f = replace(stored_facts("x86_64-debian-6.1.json"), arch="sparc64")
    (g,) = plan_builds([f], sources[:1], have_program=always)
    assert g.where == "none" and "sparc64" in (g.error or "")


def test_bad_where(sources: list) -> None:
    with pytest.raises(Exception, match="auto, host, controller"):
        plan_builds([], sources, where="cloud")


# -- ELF and vermagic -------------------------------------------------------------


@pytest.mark.parametrize(("arch", "machine", "vermagic"), [
    ("amd64", 62, "6.1.0-56-amd64 SMP preempt mod_unload modversions "),
    ("ppc64el", 21, "6.1.0-50-powerpc64le SMP mod_unload modversions mprofile-kernel relocatable "),
    ("mips64el", 8, "6.1.0-50-5kc-malta SMP mod_unload modversions MIPS64_R2 64BIT "),
])
def test_read_real_modules(arch: str, machine: int, vermagic: str) -> None:
    data = ko(arch)
    elf = read_elf_info(data)
    assert (elf.elf_class, elf.endian, elf.machine) == (64, "little", machine)
    info = read_modinfo(data)
    assert info.vermagic == vermagic
    assert info.get("name") == "fp_kretprobe" and info.get("license") == "GPL"
    assert {p.split(":")[0] for p in info.fields["parm"]} == {"run", "probe", "symbol", "maxactive", "rate"}


def test_not_elf_or_not_module() -> None:
    with pytest.raises(ElfFormatError, match="not an ELF"):
        read_elf_info(b"#!/bin/sh\n")
    with pytest.raises(ElfFormatError, match="truncated"):
        read_modinfo(ko("amd64")[:2000])
    # A real ELF that is not a kernel module.
    with pytest.raises(ElfFormatError, match="no .modinfo"):
        read_modinfo(Path("/bin/true").read_bytes())


def test_vermagic_checks() -> None:
    info = read_modinfo(ko("ppc64el"))
    assert vermagic_problem(info, "6.1.0-50-powerpc64le") is None
    assert vermagic_problem(info, "6.1.0-50-powerpc64le",
                            "6.1.0-50-powerpc64le SMP mod_unload modversions mprofile-kernel relocatable ") is None
    problem = vermagic_problem(info, "6.1.0-56-powerpc64le")
    assert problem and "'6.1.0-50-powerpc64le' but the host runs '6.1.0-56-powerpc64le'" in problem
    problem = vermagic_problem(info, "6.1.0-50-powerpc64le", "6.1.0-50-powerpc64le SMP preempt mod_unload")
    assert problem and "differs from the host's own modules" in problem
    assert vermagic_problem(ModInfo({}), "x") == "the module has no vermagic"


def test_check_module_rejects_wrong_arch_and_release(tmp_path: Path) -> None:
    t = target_for(stored_facts("ppc64le-6.1.json"))
    assert t is not None
    key = BuildKey("ppc64el", "6.1.0-50-powerpc64le", "fp_kretprobe", "x")
    check_module(ko("ppc64el"), key, t, where="w")
    with pytest.raises(BuildError, match="MIPS module, expected 64-bit little-endian PowerPC64"):
        check_module(ko("mips64el"), key, t, where="w")
    with pytest.raises(BuildError, match="host runs '6.1.0-51-powerpc64le'"):
        check_module(ko("ppc64el"), replace(key, release="6.1.0-51-powerpc64le"), t, where="w")


def test_host_module_error_names_host_and_evidence(tmp_path: Path) -> None:
    key = BuildKey("amd64", "6.1.0-56-amd64", "fp_kretprobe", "x")
    data = ko("amd64")
    mod = BuiltModule(key, tmp_path / "m.ko", read_modinfo(data), read_elf_info(data), cached=True,
                      where="cache", seconds=0)
    assert host_module_error("db-07", mod, "6.1.0-56-amd64", None) is None
    err = host_module_error("db-07", mod, "6.1.0-57-amd64", None)
    assert err is not None and err.host == "db-07" and err.stage == "build"
    assert "6.1.0-56-amd64 SMP preempt" in str(err)


def test_compiler_messages_keep_the_error_lines() -> None:
    log = "\n".join([
        "$ make -C /x M=/y modules",
        "  CC [M]  /y/fp_kprobe.o",
        "/y/fp_kprobe.c: In function 'handler_pre':",
        "/y/fp_kprobe.c:12:9: error: 'nosuch' undeclared (first use in this function)",
        "   12 |         nosuch++;",
        "      |         ^~~~~~",
        "make[2]: *** [scripts/Makefile.build:250: /y/fp_kprobe.o] Error 1",
    ] + [f"noise {i}" for i in range(50)])
    text = compiler_messages(log)
    assert "error: 'nosuch' undeclared" in text and "12 |         nosuch++;" in text and "Error 1" in text
    assert "noise" not in text
    assert compiler_messages("\n".join(f"l{i}" for i in range(40))).splitlines()[0] == "l15"
