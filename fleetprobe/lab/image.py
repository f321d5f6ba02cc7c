"""Lab VM images from Debian packages only: a kernel plus a small initramfs.

An image is keyed by the exact versions of every package in it (and by the
image format below), so a second `lab up` reuses it and a new Debian kernel
makes a new one.  Per-VM secrets (host key, authorized_keys) go into a tiny
second cpio archive appended to the shared one: the kernel unpacks
concatenated archives in order (Documentation/driver-api/early-userspace/
buffer-format.rst), so the shared image is built once per arch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fleetprobe.kmod import debian
from fleetprobe.errors import FleetprobeError
from fleetprobe.lab.arches import LabArch
from fleetprobe.lab.lines import DEFAULT_LINE, LINES, KernelLine, line_of_version

# Bump when the layout or init script changes, so old cached images are not reused.
IMAGE_FORMAT = 1

# Userland packages; dropbear's libraries are listed explicitly (its Depends
# plus libtomcrypt1's libgmp10: without it dropbear does not start, LAB.md).
USERLAND_PACKAGES = (
    "busybox-static", "dropbear-bin", "openssh-sftp-server",
    "libc6", "libcrypt1", "libtomcrypt1", "libtommath1", "zlib1g", "libgmp10",
)

INITTAB = """\
::sysinit:/etc/init.d/rcS
::respawn:/usr/sbin/dropbear -F -E -s -p 22 -r /etc/dropbear/dropbear_ed25519_host_key
::shutdown:/bin/busybox umount -a -r
"""

# busybox ash; PID 1 is busybox init (it reaps orphans and respawns dropbear).
RCS = """\
#!/bin/sh
# --install needs /proc/self/exe to find busybox.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug
# tracefs has its own mount point since 4.1; fleetprobe uses this path.
mount -t tracefs tracefs /sys/kernel/tracing
while read -r mod; do
    insmod "/lib/modules/$(uname -r)/$mod" || echo "lab: insmod $mod failed" > /dev/kmsg
done < /etc/lab-modules
hostname -F /etc/hostname
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
echo "lab: up $(uname -r) $(uname -m)" > /dev/kmsg
"""


class ImageError(FleetprobeError):
    """Building a lab image failed; names the arch and the package or file."""


@dataclass(frozen=True)
class LabImage:
    """A built, cached image for one arch: boot it with ``kernel`` and ``initramfs``."""

    arch: str
    kernel: Path
    initramfs: Path
    kernel_release: str
    kernel_package: str
    kernel_version: str
    packages: dict[str, str]   # name -> exact version of everything inside
    key: str
    line: str = DEFAULT_LINE   # kernel line (major.minor of the kernel's version)

    def to_json(self) -> dict[str, object]:
        """JSON-ready form stored next to the image."""
        d = asdict(self)
        d["kernel"] = str(self.kernel)
        d["initramfs"] = str(self.initramfs)
        return d


# ---------------------------------------------------------------- cpio (newc)

class CpioWriter:
    """Write a cpio ``newc`` archive, the format the kernel's initramfs unpacker reads.

    Written here rather than by cpio(1) so every entry is owned by root with a
    fixed mtime whatever user builds it (dropbear refuses authorized_keys not
    owned by the user), and the image is reproducible.
    """

    def __init__(self) -> None:
        """Start an empty archive."""
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        """Append one header + name + data, each padded to 4 bytes."""
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(header + encoded)
        self.buf.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        """Add a directory."""
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def tree(self, root: Path) -> None:
        """Add everything under ``root`` (dirs first, sorted), keeping modes and symlinks."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                self.directory(rel, stat.S_IMODE(os.lstat(dirpath).st_mode))
            # os.walk lists a symlink to a directory under dirnames (and does
            # not descend into it): it is archived as the symlink it is.
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for fname in sorted(filenames + links):
                path = os.path.join(dirpath, fname)
                name = os.path.normpath(os.path.join(rel, fname))
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(name, os.readlink(path))
                elif stat.S_ISREG(st.st_mode):
                    self.file(name, Path(path).read_bytes(), stat.S_IMODE(st.st_mode))

    def finish(self) -> bytes:
        """Close the archive with the TRAILER!!! entry and return it gzip-compressed."""
        self._entry("TRAILER!!!", 0)
        # mtime=0: identical inputs give byte-identical images.
        return gzip.compress(self.buf.getvalue(), compresslevel=6, mtime=0)


# ------------------------------------------------------- kernel and modules

def elf_section(data: bytes, wanted: str) -> bytes | None:
    """Return the bytes of section ``wanted`` of an ELF file (32/64-bit, either endian)."""
    if data[:4] != b"\x7fELF":
        return None
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
        shfmt = end + "IIQQQQ"
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)
        shfmt = end + "IIIIII"
    sections = [struct.unpack_from(shfmt, data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off, strtab_size = sections[shstrndx][4], sections[shstrndx][5]
    strtab = data[strtab_off:strtab_off + strtab_size]
    for name_off, _type, _flags, _addr, off, size in sections:
        name = strtab[name_off:strtab.index(b"\0", name_off)].decode()
        if name == wanted:
            return data[off:off + size]
    return None


def module_info(ko: bytes) -> dict[str, str]:
    """The ``.modinfo`` key=value pairs of a kernel module (what modinfo(8) prints)."""
    section = elf_section(ko, ".modinfo") or b""
    info: dict[str, str] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            info.setdefault(key.decode(), value.decode(errors="replace"))
    return info


def module_stem(filename: str) -> str | None:
    """``virtio_net`` for ``virtio_net.ko`` or ``virtio_net.ko.xz``; None for anything else."""
    for suffix in (".ko", ".ko.xz"):
        if filename.endswith(suffix):
            return filename[:-len(suffix)]
    return None


def read_module(path: Path) -> bytes:
    """A module's ELF bytes: Debian's kernels from 6.x in trixie ship modules as ``.ko.xz``.

    The image stores them uncompressed: busybox insmod hands the file to
    init_module(2), which takes a plain ELF whatever the kernel's MODULE_COMPRESS.
    """
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        try:
            return lzma.decompress(data, format=lzma.FORMAT_XZ)
        except lzma.LZMAError as exc:
            raise ImageError(f"cannot decompress kernel module {path}: {exc}",
                             hint="the cached kernel package may be truncated; delete it and run lab up again") from None
    return data


def module_load_order(wanted: list[str], modules_root: Path) -> list[str]:
    """Paths (relative to ``modules_root``) to insmod, dependencies first.

    Debian's linux-image packages ship no modules.dep (depmod runs at install
    time), so dependencies come from each module's ``depends=`` modinfo, which
    is what depmod reads too.  Paths may end in ``.ko.xz`` (see read_module).  Modules built into the kernel (modules.builtin)
    are skipped.  Names compare with '-' and '_' equal, as the kernel does.
    """
    def norm(name: str) -> str:
        return name.replace("-", "_")

    index: dict[str, str] = {}
    for path in modules_root.rglob("*.ko*"):
        stem = module_stem(path.name)
        if stem is not None:
            index[norm(stem)] = str(path.relative_to(modules_root))
    builtin_file = modules_root / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {norm(Path(line.strip()).stem) for line in builtin_file.read_text().splitlines() if line.strip()}

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        """Depth-first: every dependency is placed before the module needing it."""
        name = norm(name)
        if name in seen or name in builtin:
            return
        if name not in index:
            raise ImageError(f"kernel module {name} not found under {modules_root}",
                             hint="needed by " + " <- ".join(reversed(chain)) if chain else
                             "the kernel package may build it in or not ship it; check its config")
        seen.add(name)
        info = module_info(read_module(modules_root / index[name]))
        for dep in filter(None, info.get("depends", "").split(",")):
            visit(dep, chain + (name,))
        order.append(index[name])

    for mod in wanted:
        visit(mod, ())
    return order


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def bzimage_payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage, located by the boot protocol's header (2.08+).

    ``payload_offset``/``payload_length`` (at 0x248) are relative to the
    protected-mode code, which starts after ``setup_sects`` (0x1f1; 0 means
    4) + 1 sectors.  None if the header does not describe a payload.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if not length or start + length > len(bzimage):
        return None
    return bzimage[start:start + length]


def _unzstd(payload: bytes) -> bytes:
    """Decompress a zstd kernel payload with zstd(1) (Python 3.11's stdlib has no zstd).

    The kernel's build appends the uncompressed size as 4 bytes after the
    frame (scripts/Makefile.lib size_append); zstd would reject them as a
    second, broken frame, so they are cut off.
    """
    zstd = shutil.which("zstd")
    if zstd is None:
        raise ImageError("this kernel is zstd-compressed and zstd is not installed",
                         hint="apt-get install zstd (Debian's 6.12 amd64 kernels use CONFIG_KERNEL_ZSTD)")
    proc = subprocess.run([zstd, "-dcq"], input=payload[:-4], capture_output=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"zstd could not decompress the kernel: {proc.stderr.decode(errors='replace').strip()}",
                         hint="the cached kernel package may be truncated; delete it and run lab up again")
    return proc.stdout


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF vmlinux inside an x86 bzImage (what scripts/extract-vmlinux does).

    PVH boot (qboot, LAB.md) needs the ELF with its PVH note, not the bzImage.
    Debian's amd64 kernels are XZ-compressed up to 6.1 (CONFIG_KERNEL_XZ=y in
    5.10 and 6.1) and zstd-compressed in trixie's 6.12 (CONFIG_KERNEL_ZSTD=y);
    gzip is tried too for other builds.
    """
    payload = bzimage_payload(bzimage)
    if payload is not None and payload.startswith(ZSTD_MAGIC):
        data = _unzstd(payload)
        if data[:4] == b"\x7fELF":
            return data
    candidates: list[bytes] = []
    pos = bzimage.find(b"\xfd7zXZ\x00")
    while pos >= 0:
        try:
            candidates.append(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[pos:]))
        except lzma.LZMAError:
            pass
        pos = bzimage.find(b"\xfd7zXZ\x00", pos + 1)
    pos = bzimage.find(b"\x1f\x8b\x08\x00")
    while pos >= 0 and not candidates:
        try:
            candidates.append(gzip.GzipFile(fileobj=io.BytesIO(bzimage[pos:])).read())
        except (OSError, EOFError):
            pass
        pos = bzimage.find(b"\x1f\x8b\x08\x00", pos + 1)
    for data in candidates:
        if data[:4] == b"\x7fELF":
            return data
    raise ImageError("no zstd, XZ or gzip compressed ELF vmlinux found in the bzImage",
                     hint="the kernel may use lz4/lzo; boot it without PVH (bzImage + SeaBIOS)")


# ------------------------------------------------------------------- images

@dataclass(frozen=True)
class ImagePlan:
    """Which exact packages an image for one arch is made of (resolved, not yet downloaded)."""

    arch: LabArch
    kernel: debian.PackageRef
    kernel_release: str
    userland: tuple[debian.PackageRef, ...]
    line: str = DEFAULT_LINE                 # the kernel line, e.g. 6.12 (from the kernel's version)
    kernel_suites: tuple[str, ...] = ()      # where the kernel came from; () = the machine's sources
    request: str = ""                        # the --kernel value this plan answers (a line or a suite)

    @property
    def key(self) -> str:
        """Cache key: the image format plus every package's exact version."""
        parts = [f"format={IMAGE_FORMAT}", f"arch={self.arch.name}", self.arch.append,
                 ",".join(self.arch.nic_modules), INITTAB, RCS,
                 f"{self.kernel.name}={self.kernel.version}"]
        parts += [f"{r.name}={r.version}" for r in self.userland]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class KernelDownloadError(ImageError):
    """The archive's index names a kernel package whose .deb it does not serve (a mirror gap)."""


def source_sets(line: KernelLine) -> tuple[tuple[str, ...], ...]:
    """The line's suite sets in order, each followed by its first suite alone.

    ``bullseye+bullseye-security`` picks the security upload; when a mirror
    lists that upload but does not serve its .deb (seen here: arm64's
    5.10.262-1 in bullseye-security answers 404), the release's own suite is
    the next best kernel of the same line.
    """
    out: list[tuple[str, ...]] = []
    for suites in line.sources:
        for candidate in (suites, suites[:1]):
            if candidate not in out:
                out.append(candidate)
    return tuple(out)


def resolve_kernel(arch: LabArch, line: KernelLine, cache: Path,
                   after: tuple[str, ...] | None = None) -> tuple[debian.PackageRef, str, tuple[str, ...]]:
    """The kernel image package (exact version), its release and its suites for ``line`` on ``arch``.

    Each of the line's source sets is asked in turn (only those after
    ``after``, when a download from that one failed); the first that has the
    arch's kernel metapackage on this line wins.  Errors say what every
    source set answered.
    """
    tried: list[str] = []
    sets = source_sets(line)
    if after is not None:
        sets = sets[sets.index(after) + 1:] if after in sets else ()
    for suites in sets:
        try:
            image, release = debian.kernel_for_metapackage(arch.kernel_meta, arch.debian_arch, cache, suites)
        except debian.DebianError as exc:
            tried.append(f"{'+'.join(suites)}: {exc.message}")
            continue
        if line.name in LINES and line_of_version(image.version) != line.name:
            tried.append(f"{'+'.join(suites)}: {image.name} {image.version} is not on line {line.name}")
            continue
        return image, release, suites
    raise ImageError(f"Debian serves no {line.name} kernel for {arch.name} ({arch.debian_arch})"
                     + (f" after {'+'.join(after)}" if after else "") + ": " + "; ".join(tried), where=arch.name,
                     hint="choose another line with --kernel; the README's lab table lists what each arch has")


def plan_image(arch: LabArch, cache: Path, line: KernelLine | None = None,
               after: tuple[str, ...] | None = None) -> ImagePlan:
    """Resolve the exact kernel and userland versions for ``arch`` (apt lists only, no .debs).

    ``line`` None: the arch's kernel from the machine's own apt sources (bookworm's 6.1 here).
    ``after``: skip the line's source sets up to and including this one (see resolve_kernel).
    The userland (busybox, dropbear) always comes from the machine's sources:
    it is the same small system whatever kernel runs under it.
    """
    if line is None:
        image, release = debian.kernel_for_metapackage(arch.kernel_meta, arch.debian_arch, cache)
        suites: tuple[str, ...] = ()
    else:
        image, release, suites = resolve_kernel(arch, line, cache, after)
    userland = debian.resolve(list(USERLAND_PACKAGES), arch.debian_arch, cache)
    return ImagePlan(arch=arch, kernel=image, kernel_release=release, userland=tuple(userland),
                     line=line_of_version(image.version), kernel_suites=suites,
                     request=line.name if line else "")


def image_dir(lab_dir: Path, plan: ImagePlan) -> Path:
    """Where the image for ``plan`` is cached."""
    return lab_dir / "images" / plan.arch.name / plan.key


def load_cached(lab_dir: Path, plan: ImagePlan) -> LabImage | None:
    """The cached image for ``plan``, if a complete one exists (image.json is written last)."""
    meta = image_dir(lab_dir, plan) / "image.json"
    if not meta.exists():
        return None
    d = json.loads(meta.read_text())
    return LabImage(arch=d["arch"], kernel=Path(d["kernel"]), initramfs=Path(d["initramfs"]),
                    kernel_release=d["kernel_release"], kernel_package=d["kernel_package"],
                    kernel_version=d["kernel_version"], packages=d["packages"], key=d["key"],
                    line=d.get("line", line_of_version(d["kernel_version"])))


# Parts of the library packages that a login shell + dropbear never use.
_PRUNE = ("usr/share", "usr/bin", "usr/sbin", "sbin", "usr/libexec", "etc")


def _copy_userland(staging: Path, root: Path) -> None:
    """Copy the pieces of the unpacked userland packages the image needs into ``root``."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(staging / "bin/busybox", root / "bin/busybox")
    shutil.copy2(staging / "usr/sbin/dropbear", root / "usr/sbin/dropbear")
    (root / "usr/lib/openssh").mkdir(parents=True, exist_ok=True)
    shutil.copy2(staging / "usr/lib/openssh/sftp-server", root / "usr/lib/openssh/sftp-server")
    # dropbear runs the sftp subsystem from /usr/lib/sftp-server (its SFTPSERVER_PATH).
    os.symlink("openssh/sftp-server", root / "usr/lib/sftp-server")
    for top in ("lib", "lib32", "lib64", "usr/lib"):
        src = staging / top
        if not src.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(src):
            rel = Path(dirpath).relative_to(staging)
            if any(str(rel).startswith(p) for p in _PRUNE) or "gconv" in rel.parts or "openssh" in rel.parts:
                continue
            for fname in files:
                s = Path(dirpath) / fname
                if not (".so" in fname or fname.startswith("ld")):
                    continue
                d = root / rel / fname
                d.parent.mkdir(parents=True, exist_ok=True)
                if s.is_symlink():
                    if not d.is_symlink():
                        os.symlink(os.readlink(s), d)
                else:
                    shutil.copy2(s, d)


def _base_files(root: Path, arch: LabArch) -> None:
    """The image's /etc, init and mount points."""
    for d in ("proc", "sys", "dev", "tmp", "run", "root/.ssh", "etc/init.d", "etc/dropbear",
              "var/log", "usr/bin", "sbin", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "root", 0o700)
    os.chmod(root / "root/.ssh", 0o700)
    os.chmod(root / "tmp", 0o1777)
    os.symlink("busybox", root / "bin/sh")
    os.symlink("bin/busybox", root / "init")   # busybox picks the applet from argv[0]: init
    (root / "etc/inittab").write_text(INITTAB)
    (root / "etc/init.d/rcS").write_text(RCS)
    os.chmod(root / "etc/init.d/rcS", 0o755)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\ntty:x:5:\n")
    (root / "etc/shells").write_text("/bin/sh\n")
    (root / "etc/hostname").write_text("lab\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc/profile").write_text("export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n")


def _install_modules(kstage: Path, root: Path, plan: ImagePlan) -> None:
    """The NIC modules (and what they need) from the unpacked kernel package into the image's /lib/modules."""
    arch = plan.arch
    # trixie's packages are merged-/usr: modules under usr/lib/modules.
    modsrc = next((d for d in (kstage / "lib/modules" / plan.kernel_release,
                               kstage / "usr/lib/modules" / plan.kernel_release) if d.is_dir()),
                  kstage / "lib/modules" / plan.kernel_release)
    moddst = root / "lib/modules" / plan.kernel_release
    # Debian's 6.x kernels after bookworm's 6.1 ship modules xz-compressed
    # (*.ko.xz); busybox insmod loads only plain .ko, so unpack them here.
    for packed in modsrc.rglob("*.ko.xz"):
        packed.with_suffix("").write_bytes(lzma.decompress(packed.read_bytes()))
    order = module_load_order(list(arch.nic_modules), modsrc)
    stored: list[str] = []
    for rel in order:
        plain = rel.removesuffix(".xz")
        (moddst / plain).parent.mkdir(parents=True, exist_ok=True)
        (moddst / plain).write_bytes(read_module(modsrc / rel))
        stored.append(plain)
    # /lib/modules/$(uname -r) exists (module tests insmod from /tmp, but
    # tools look here); modules.builtin lets modprobe know what is built in.
    moddst.mkdir(parents=True, exist_ok=True)
    for name in ("modules.builtin", "modules.order"):
        if (modsrc / name).exists():
            shutil.copyfile(modsrc / name, moddst / name)
    (root / "etc/lab-modules").write_text("".join(f"{rel}\n" for rel in stored))


def build_image(lab_dir: Path, plan: ImagePlan) -> LabImage:
    """Download, unpack and assemble the image for ``plan`` under ``lab_dir``, or return the cached one."""
    cached = load_cached(lab_dir, plan)
    if cached is not None:
        return cached
    arch = plan.arch
    cache = lab_dir / "debian"
    out = image_dir(lab_dir, plan)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        work = Path(tmp)
        kstage, ustage, root = work / "kernel", work / "userland", work / "root"
        kstate = debian.AptState(arch.debian_arch, cache, plan.kernel_suites)
        try:
            with kstate.locked():
                debs = kstate.download([plan.kernel])
        except debian.DebianError as exc:
            raise KernelDownloadError(f"{plan.kernel.spec} is listed in {'+'.join(plan.kernel_suites) or 'the apt lists'} "
                                      f"but could not be downloaded: {exc.message}", where=arch.name,
                                      hint=exc.hint) from None
        state = debian.AptState(arch.debian_arch, cache)
        with state.locked():
            debs += state.download(list(plan.userland))
        debian.extract(debs[0], kstage)
        for deb in debs[1:]:
            debian.extract(deb, ustage)

        kfile = kstage / arch.kernel_file.format(release=plan.kernel_release)
        if not kfile.exists():
            raise ImageError(f"{plan.kernel.name} {plan.kernel.version} has no {arch.kernel_file.format(release=plan.kernel_release)}",
                             where=arch.name, hint="the package layout changed; update fleetprobe/lab/arches.py")
        # Built in the temp dir and renamed into place: another lab sharing
        # this cache may be booting from the previous copy right now.
        kernel_tmp = work / "kernel.img"
        if arch.extract_vmlinux:
            kernel_tmp.write_bytes(extract_vmlinux(kfile.read_bytes()))
        else:
            shutil.copyfile(kfile, kernel_tmp)

        _copy_userland(ustage, root)
        _base_files(root, arch)
        _install_modules(kstage, root, plan)

        cpio = CpioWriter()
        cpio.tree(root)
        # /dev/console must exist before devtmpfs is mounted, or init starts
        # with no stdout ("Warning: unable to open an initial console").
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        (work / "initramfs.img").write_bytes(cpio.finish())
        kernel, initramfs = out / "kernel", out / "initramfs.cpio.gz"
        os.replace(kernel_tmp, kernel)
        os.replace(work / "initramfs.img", initramfs)

    image = LabImage(
        arch=arch.name, kernel=kernel, initramfs=initramfs, kernel_release=plan.kernel_release,
        kernel_package=plan.kernel.name, kernel_version=plan.kernel.version,
        packages={r.name: r.version for r in (plan.kernel, *plan.userland)}, key=plan.key, line=plan.line)
    tmp_meta = out / "image.json.tmp"
    tmp_meta.write_text(json.dumps(image.to_json(), indent=2) + "\n")
    os.replace(tmp_meta, out / "image.json")
    return image


def vm_overlay(hostname: str, host_key_dropbear: bytes, authorized_key: str) -> bytes:
    """The per-VM cpio archive appended to the shared image: host key, login key, hostname."""
    cpio = CpioWriter()
    cpio.file("etc/dropbear/dropbear_ed25519_host_key", host_key_dropbear, 0o600)
    cpio.file("root/.ssh/authorized_keys", (authorized_key + "\n").encode(), 0o600)
    cpio.file("etc/hostname", (hostname + "\n").encode())
    return cpio.finish()
