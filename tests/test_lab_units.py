"""Fast tests of the lab's pure parts: inventory, known_hosts, cache keys, arch table, cpio, ELF, keys."""

from __future__ import annotations

import base64
import lzma
import struct
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from fleetprobe.kmod import debian
from fleetprobe.errors import InputError
from fleetprobe.lab import fleet, image, keys
from fleetprobe.lab.arches import ARCHES, DEFAULT_FLEET, lab_arch
from fleetprobe.inventory import load_inventory
from fleetprobe.cli.lab import parse_counts, parse_kernels
from fleetprobe.lab.inventory import (LabVM, inventory_data, known_hosts_text, read_lab_json, vm_name,
                                      write_inventory, write_lab_json)
from fleetprobe.lab.lines import LINES, kernel_line, line_of_version


def _vm(name: str, arch: str, port: int) -> LabVM:
    """A VM record as `lab up` would write it."""
    a = ARCHES[arch]
    return LabVM(name=name, arch=arch, debian_arch=a.debian_arch, uname_m=a.uname_m,
                 kernel_release="6.1.0-50-powerpc64le", kernel_package="linux-image-6.1.0-50-powerpc64le",
                 kernel_version="6.1.176-1", port=port, pid=1234, serial_log=f"/lab/vms/{name}/serial.log",
                 host_key_public=keys.public_openssh(keys.generate_ed25519()), boot_seconds=8.5)


def test_inventory_has_ansible_layout(tmp_path: Path) -> None:
    """all.vars carries user, key and known_hosts; a child group per arch (with 127.0.0.1:port) and per line."""
    vms = [_vm("lab-x86_64-2", "x86_64", 40002), _vm("lab-x86_64-1", "x86_64", 40001),
           replace(_vm("lab-x86_64-5.10-1", "x86_64", 40004), line="5.10"),
           _vm("lab-ppc64le-1", "ppc64le", 40003)]
    path = tmp_path / "inventory.yml"
    write_inventory(path, vms, tmp_path / "id_ed25519", tmp_path / "known_hosts")
    data = yaml.safe_load(path.read_text())
    assert data["all"]["vars"] == {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str((tmp_path / "id_ed25519").resolve()),
        "fleetprobe_known_hosts": str((tmp_path / "known_hosts").resolve()),
    }
    children = data["all"]["children"]
    assert sorted(children) == ["lab_linux_5_10", "lab_linux_6_1", "lab_ppc64le", "lab_x86_64"]
    assert children["lab_x86_64"]["hosts"] == {
        "lab-x86_64-1": {"ansible_host": "127.0.0.1", "ansible_port": 40001},
        "lab-x86_64-2": {"ansible_host": "127.0.0.1", "ansible_port": 40002},
        "lab-x86_64-5.10-1": {"ansible_host": "127.0.0.1", "ansible_port": 40004},
    }
    assert children["lab_linux_5_10"]["hosts"] == {"lab-x86_64-5.10-1": None}
    assert sorted(children["lab_linux_6_1"]["hosts"]) == ["lab-ppc64le-1", "lab-x86_64-1", "lab-x86_64-2"]
    # fleetprobe's own inventory reader: one host per name, in both groups, address from the arch group.
    inv = load_inventory(str(path))
    assert [h.name for h in inv.hosts].count("lab-x86_64-5.10-1") == 1
    assert inv.groups["lab_linux_5_10"] == ("lab-x86_64-5.10-1",)
    assert [h.port for h in inv.limit("lab_linux_5_10").hosts] == [40004]
    assert inventory_data([], tmp_path / "k", tmp_path / "kh")["all"]["children"] == {}


def test_known_hosts_uses_bracketed_port_form() -> None:
    """Each line is `[127.0.0.1]:PORT ssh-ed25519 <base64>` so OpenSSH and asyncssh match it."""
    vm = _vm("lab-mips64el-1", "mips64el", 40123)
    (line,) = known_hosts_text([vm]).splitlines()
    host, alg, blob = line.split()
    assert host == "[127.0.0.1]:40123" and alg == "ssh-ed25519"
    assert base64.b64decode(blob)[4:15] == b"ssh-ed25519"
    assert keys.known_hosts_line("h", 22, vm.host_key_public).startswith("h ssh-ed25519 ")


def test_lab_json_round_trip(tmp_path: Path) -> None:
    """lab.json keeps every field the module builder reads (arch, kernel package + version)."""
    vms = [_vm("lab-ppc64le-1", "ppc64le", 40003)]
    write_lab_json(tmp_path / "lab.json", vms)
    assert read_lab_json(tmp_path / "lab.json") == vms
    assert read_lab_json(tmp_path / "missing.json") == []
    (tmp_path / "bad.json").write_text("{\n  nope")
    with pytest.raises(InputError, match="bad.json:2"):
        read_lab_json(tmp_path / "bad.json")


def test_arch_table() -> None:
    """Default fleet names known arches; uname -m and Debian names match the kernels' reality."""
    assert DEFAULT_FLEET == {"x86_64": 3, "ppc64le": 1, "mips64el": 1, "arm64": 1}
    assert {a: ARCHES[a].uname_m for a in ARCHES} == {
        "x86_64": "x86_64", "ppc64le": "ppc64le", "mips64el": "mips64", "mipsel": "mips", "arm64": "aarch64"}
    for arch in ARCHES.values():
        assert arch.debian_arch in debian.DEBIAN_ARCHES
        assert arch.qemu_binary.startswith("qemu-system-")
        assert arch.memory_mib * DEFAULT_FLEET.get(arch.name, 1) <= 3 * 1024
    assert lab_arch("ppc64el").name == "ppc64le"
    assert lab_arch("aarch64").name == "arm64" and lab_arch("amd64").name == "x86_64"
    with pytest.raises(InputError, match="unknown lab architecture 'arm'"):
        lab_arch("arm")


def test_fleet_spec_and_cli_counts() -> None:
    """--arch/--count turn into per-(arch, line) counts; bad counts are input errors."""
    assert fleet.fleet_spec(None, None) == {(a, "6.1"): n for a, n in DEFAULT_FLEET.items()}
    assert fleet.fleet_spec(["amd64", "mipsel"], None) == {("x86_64", "6.1"): 1, ("mipsel", "6.1"): 1}
    assert parse_counts("x86_64,ppc64le", "2") == (["x86_64", "ppc64le"], {"x86_64": 2, "ppc64le": 2})
    assert parse_counts(None, "x86_64=3,mips64el=1") == (["x86_64", "mips64el"], {"x86_64": 3, "mips64el": 1})
    assert parse_counts(None, "1") == (list(DEFAULT_FLEET), {a: 1 for a in DEFAULT_FLEET})
    with pytest.raises(InputError, match="--count"):
        parse_counts(None, "x86_64=many")


def test_kernel_lines_on_the_command_line() -> None:
    """--kernel: lines for every arch or per arch; each (arch, line) gets the arch's count."""
    assert parse_kernels(None) is None
    assert parse_kernels("5.10,6.1,6.12") == {"*": ("5.10", "6.1", "6.12")}
    assert parse_kernels("x86_64:5.10,aarch64:6.12,x86_64:6.12") == {"x86_64": ("5.10", "6.12"), "arm64": ("6.12",)}
    assert parse_kernels("all,trixie-backports") == {"*": ("all", "trixie-backports")}
    with pytest.raises(InputError, match="unknown kernel line '6.x'"):
        parse_kernels("6.x")
    with pytest.raises(InputError, match="unknown lab architecture 'sparc'"):
        parse_kernels("sparc:6.1")
    with pytest.raises(InputError, match="no kernel line"):
        parse_kernels(" , ")
    spec = fleet.fleet_spec(["x86_64", "arm64"], {"x86_64": 2}, {"*": ("5.10", "6.12")})
    assert spec == {("x86_64", "5.10"): 2, ("x86_64", "6.12"): 2, ("arm64", "5.10"): 1, ("arm64", "6.12"): 1}
    # --kernel alone: one VM per line of the arches it names, else of the default fleet's arches.
    assert fleet.fleet_spec(None, None, {"arm64": ("6.12",)}) == {("arm64", "6.12"): 1}
    assert set(fleet.fleet_spec(None, None, {"*": ("5.10",)})) == {(a, "5.10") for a in DEFAULT_FLEET}
    assert fleet.fleet_spec(["mipsel"], None, {"x86_64": ("5.10",)}) == {("mipsel", "6.1"): 1}


def test_kernel_line_table() -> None:
    """Lines name their suites (the release's own first); a suite stands for its own line; groups have no dots."""
    assert LINES["6.12"].sources[0] == ("trixie", "trixie-security")
    assert ("bookworm-backports",) in LINES["6.12"].sources
    assert LINES["5.10"].sources == (("bullseye", "bullseye-security"),)
    assert kernel_line("trixie-backports").sources == (("trixie-backports",),)
    assert kernel_line("bookworm").sources == (("bookworm", "bookworm-security"),)
    assert LINES["6.12"].group == "lab_linux_6_12"
    assert line_of_version("6.12.95-1~bpo12+1") == "6.12" and line_of_version("5.10.262-1") == "5.10"
    assert vm_name("x86_64", "6.12", 2) == "lab-x86_64-6.12-2"
    # A listed but unserved security upload falls back to the release's own suite, then the next set.
    assert image.source_sets(LINES["6.12"]) == (("trixie", "trixie-security"), ("trixie",), ("bookworm-backports",))
    assert image.source_sets(LINES["5.10"]) == (("bullseye", "bullseye-security"), ("bullseye",))


def test_suite_sources_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An AptState with suites gets its own deb822 file (security suites from the security mirror) and dir."""
    monkeypatch.delenv("FLEETPROBE_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("FLEETPROBE_DEBIAN_SECURITY_MIRROR", raising=False)
    text = debian.sources_text(("trixie", "trixie-security"))
    assert "URIs: http://deb.debian.org/debian\nSuites: trixie\n" in text
    assert "URIs: http://deb.debian.org/debian-security\nSuites: trixie-security\n" in text
    state = debian.AptState("arm64", tmp_path, ("trixie", "trixie-security"))
    assert state.root == tmp_path / "apt/arm64/suites/trixie+trixie-security"
    assert (state.root / "sources.list.d/fleetprobe.sources").read_text() == text
    opts = state.options()
    assert f"Dir::Etc::SourceParts={state.root / 'sources.list.d'}" in opts
    assert debian.AptState("arm64", tmp_path).root == tmp_path / "apt/arm64"   # machine sources: unchanged
    with pytest.raises(debian.DebianError, match="bad Debian suite"):
        debian.sources_text(("trixie main",))


def _plan(kernel_version: str, busybox_version: str) -> image.ImagePlan:
    """An image plan with the given package versions."""
    return image.ImagePlan(
        arch=ARCHES["ppc64le"],
        kernel=debian.PackageRef("linux-image-6.1.0-50-powerpc64le", kernel_version, "ppc64el"),
        kernel_release="6.1.0-50-powerpc64le",
        userland=(debian.PackageRef("busybox-static", busybox_version, "ppc64el"),))


def test_image_cache_key_follows_package_versions() -> None:
    """Same versions give the same key; any version change gives a new image."""
    a = _plan("6.1.176-1", "1:1.35.0-4")
    assert a.key == _plan("6.1.176-1", "1:1.35.0-4").key
    assert a.key != _plan("6.1.176-2", "1:1.35.0-4").key
    assert a.key != _plan("6.1.176-1", "1:1.35.0-5").key


def test_cpio_archive_is_read_by_cpio(tmp_path: Path) -> None:
    """The newc writer's output unpacks with GNU cpio, owners root, modes and links kept."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (src / "etc/secret").write_bytes(b"k" * 5)
    (src / "etc/secret").chmod(0o600)
    (src / "bin").symlink_to("usr/bin")
    w = image.CpioWriter()
    w.tree(src)
    w.chardev("dev/console", 5, 1)
    archive = tmp_path / "a.cpio.gz"
    archive.write_bytes(w.finish())
    listing = subprocess.run(f"zcat {archive} | cpio -tv --quiet", shell=True, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    by_name = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing}
    assert by_name["etc/secret"].startswith("-rw-------") and " root " in by_name["etc/secret"]
    assert by_name["bin"].startswith("lrwxrwxrwx") and by_name["bin"].endswith("-> usr/bin")
    assert by_name["dev/console"].startswith("crw-------")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(f"zcat {archive} | cpio -id --quiet --no-absolute-filenames", shell=True,
                   cwd=out, check=True)
    assert (out / "etc/passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"


def test_elf_section_reads_a_real_binary() -> None:
    """The ELF reader finds .interp of this machine's /bin/sh (the same code reads .modinfo)."""
    interp = image.elf_section(Path("/bin/sh").read_bytes(), ".interp")
    assert interp is not None and interp.rstrip(b"\0").endswith(b"ld-linux-x86-64.so.2")
    assert image.elf_section(b"not an elf", ".modinfo") is None


def test_module_info_from_modinfo_section() -> None:
    """depends= is taken from .modinfo, as depmod does (Debian ships no modules.dep)."""
    modinfo = b"license=GPL\0depends=net_failover,virtio\0name=virtio_net\0"
    shstr = b"\0.modinfo\0.shstrtab\0"
    body = modinfo + shstr
    shoff = 64 + len(body)
    header = (b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
              + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2))
    sections = (b"\0" * 64
                + struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, 64, len(modinfo), 0, 0, 1, 0)
                + struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, 64 + len(modinfo), len(shstr), 0, 0, 1, 0))
    info = image.module_info(header + body + sections)
    assert info["depends"] == "net_failover,virtio" and info["name"] == "virtio_net"


def test_extract_vmlinux_finds_the_xz_elf() -> None:
    """The ELF is found after a decoy XZ magic, as in a bzImage's setup code."""
    elf = b"\x7fELF" + bytes(range(256)) * 40
    blob = b"MZ" + b"\0" * 500 + b"\xfd7zXZ\x00garbage" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\0" * 99
    assert image.extract_vmlinux(blob) == elf
    with pytest.raises(image.ImageError, match="no zstd, XZ or gzip"):
        image.extract_vmlinux(b"MZ" + b"\0" * 100)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs zstd(1) (scripts/setup.sh installs it)")
def test_extract_vmlinux_reads_a_zstd_payload_from_the_boot_header(tmp_path: Path) -> None:
    """trixie's amd64 kernels are zstd: the payload is found by the header, its 4-byte size trailer cut."""
    elf = b"\x7fELF" + bytes(range(256)) * 40
    (tmp_path / "v").write_bytes(elf)
    subprocess.run(["zstd", "-q", "-19", str(tmp_path / "v"), "-o", str(tmp_path / "v.zst")], check=True)
    payload = (tmp_path / "v.zst").read_bytes() + struct.pack("<I", len(elf))
    setup_sects = 3
    bz = bytearray(b"\0" * ((setup_sects + 1) * 512))
    bz[0x1F1] = setup_sects
    bz[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", bz, 0x248, 100, len(payload))   # payload_offset, payload_length
    blob = bytes(bz) + b"\0" * 100 + payload + b"\0" * 64
    assert image.bzimage_payload(blob) == payload
    assert image.extract_vmlinux(blob) == elf
    assert image.bzimage_payload(b"MZ" + b"\0" * 0x300) is None


def test_compressed_modules_are_found_and_stored_plain(tmp_path: Path) -> None:
    """trixie ships virtio_net.ko.xz: it is found by its stem and read back as the plain ELF."""
    elf = b"plain module bytes"  # not ELF: module_info then finds no depends
    (tmp_path / "kernel/drivers/net").mkdir(parents=True)
    (tmp_path / "kernel/drivers/net/virtio_net.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    assert image.module_stem("virtio_net.ko.xz") == "virtio_net" and image.module_stem("x.ko") == "x"
    assert image.module_stem("modules.order") is None
    assert image.module_load_order(["virtio-net"], tmp_path) == ["kernel/drivers/net/virtio_net.ko.xz"]
    assert image.read_module(tmp_path / "kernel/drivers/net/virtio_net.ko.xz") == elf


def test_dropbear_key_layout_holds_seed_and_public() -> None:
    """string "ssh-ed25519", then string(seed || public) — 83 bytes, as dropbearkey writes."""
    key = keys.generate_ed25519()
    blob = keys.dropbear_private(key)
    assert len(blob) == 4 + 11 + 4 + 64
    assert blob[:15] == b"\0\0\0\x0bssh-ed25519" and blob[15:19] == b"\0\0\0\x40"
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert blob[19:] == seed + pub


def test_host_and_client_keys_persist(tmp_path: Path) -> None:
    """Keys are created 0600 once and reused, so known_hosts stays valid across `lab up`s."""
    pub1 = keys.load_or_create_client_key(tmp_path / "id_ed25519")
    assert (tmp_path / "id_ed25519").stat().st_mode & 0o777 == 0o600
    assert keys.load_or_create_client_key(tmp_path / "id_ed25519") == pub1
    d1, p1 = keys.load_or_create_host_key(tmp_path / "vm/host")
    assert keys.load_or_create_host_key(tmp_path / "vm/host") == (d1, p1)
    assert keys.fingerprint_sha256(p1).startswith("SHA256:")


def test_debian_control_parsing() -> None:
    """apt-cache show stanzas, Depends names and apt's own .deb file names."""
    text = ("Package: linux-image-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\n"
            "Description: x\n more\n\nPackage: libc6\nVersion: 2.36-9\n")
    stanzas = debian.parse_control_stanzas(text)
    assert [s["Package"] for s in stanzas] == ["linux-image-amd64", "libc6"]
    assert stanzas[0]["Description"] == "x\nmore"
    assert debian.depends_names("libc6 (>= 2.34), a | b, zlib1g:any") == ["libc6", "a", "zlib1g"]
    assert debian.deb_filename("busybox-static", "1:1.35.0-4", "ppc64el") == "busybox-static_1%3a1.35.0-4_ppc64el.deb"
    with pytest.raises(debian.DebianError, match="unknown Debian architecture 'x86_64'"):
        debian.check_arch("x86_64")
    with pytest.raises(debian.DebianError, match="kernel release"):
        debian.kernel_image_package("powerpc64le")
    assert debian.kernel_image_package("6.1.0-50-powerpc64le") == "linux-image-6.1.0-50-powerpc64le"


def test_missing_tool_names_the_debian_package() -> None:
    """One error lists every missing program and the apt-get install line."""
    with pytest.raises(debian.DebianError) as err:
        debian.require_tools({"fp-no-such-tool": "fp-pkg", "apt-get": "apt"})
    assert "fp-no-such-tool" in str(err.value) and "apt-get install fp-pkg" in str(err.value)


def test_missing_qemu_names_the_debian_package() -> None:
    """A missing qemu binary is one error naming the package that provides it."""
    import dataclasses
    from fleetprobe.lab import vm
    fake = dataclasses.replace(ARCHES["mipsel"], qemu_binary="qemu-system-fpnotthere")
    with pytest.raises(vm.VMError, match="apt-get install qemu-system-mips"):
        vm.require_qemu(fake)
