"""The architectures the lab can boot: Debian names, kernel packages and qemu settings.

Every value here was measured on the project's 2-core TCG machines
(/work/shared/LAB.md): memory sizes fit five VMs in 24 GiB, and the machine
types are the ones whose boot took ~8-11 s.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetprobe.errors import InputError


@dataclass(frozen=True)
class LabArch:
    """How to build and boot a lab VM for one architecture."""

    name: str            # the lab's name, also the inventory group suffix: lab_<name>
    debian_arch: str     # dpkg architecture of every package in the image
    uname_m: str         # what `uname -m` prints in the guest
    kernel_meta: str     # Debian metapackage whose Depends names the current kernel image
    kernel_file: str     # file under /boot in the image package; {release} is filled in
    qemu_binary: str
    qemu_package: str    # Debian package providing qemu_binary
    machine_args: tuple[str, ...]
    memory_mib: int
    console: str
    # Extra kernel arguments; "quiet" because printing to an emulated UART
    # costs seconds of TCG time per boot.
    append: str = "quiet panic=-1"
    nic_modules: tuple[str, ...] = ("virtio_net", "virtio_pci")
    # x86: the bzImage is unpacked to its ELF vmlinux so qboot can PVH-boot it.
    extract_vmlinux: bool = False


# MIPS kprobes oops these kernels unless RCU callbacks are offloaded (README,
# "Known kernel problem (MIPS)"): MIPS takes the kprobe break with interrupts
# enabled, so a timer tick between the probe hit and its single-step break
# can run RCU callbacks in softirq; delayed_put_task_struct -> kprobe_flush_task
# then clears the CPU's current kprobe and the single-step break oopses.
# rcu_nocbs moves those callbacks to rcuo kthreads, which cannot run inside
# that window.  Measured: 0 oopses in 3000+3000 hits with it, 1 per ~200-300
# hits without.  CPU 0 is every CPU here: lab VMs boot with -smp 1 (vm.py).
MIPS_RCU_NOCBS = "rcu_nocbs=0"


ARCHES: dict[str, LabArch] = {
    a.name: a for a in (
        LabArch(
            name="x86_64", debian_arch="amd64", uname_m="x86_64",
            kernel_meta="linux-image-amd64", kernel_file="boot/vmlinuz-{release}",
            qemu_binary="qemu-system-x86_64", qemu_package="qemu-system-x86",
            # KVM here is a PVM flavour that aborts or hangs (LAB.md): TCG only.
            # qboot + PVH skips SeaBIOS and the bzImage decompressor (~3 s).
            machine_args=("-machine", "pc", "-accel", "tcg", "-cpu", "qemu64",
                          "-bios", "/usr/share/qemu/qboot.rom"),
            memory_mib=256, console="ttyS0",
            # no_timer_check: avoids a rare "IO-APIC + timer doesn't work!" panic
            # when TCG is starved of CPU (seen here under load).
            append="quiet panic=-1 net.ifnames=0 no_timer_check",
            extract_vmlinux=True,
        ),
        LabArch(
            name="ppc64le", debian_arch="ppc64el", uname_m="ppc64le",
            kernel_meta="linux-image-powerpc64le", kernel_file="boot/vmlinux-{release}",
            qemu_binary="qemu-system-ppc64", qemu_package="qemu-system-ppc",
            # x-vof=on (qemu 7.0+) replaces SLOF: boots ~3x faster (LAB.md).
            machine_args=("-M", "pseries,x-vof=on", "-cpu", "POWER9"),
            memory_mib=1024, console="hvc0",
        ),
        LabArch(
            name="mips64el", debian_arch="mips64el", uname_m="mips64",
            kernel_meta="linux-image-5kc-malta", kernel_file="boot/vmlinuz-{release}",
            qemu_binary="qemu-system-mips64el", qemu_package="qemu-system-mips",
            machine_args=("-M", "malta", "-cpu", "MIPS64R2-generic"),
            memory_mib=1024, console="ttyS0",
            append="quiet panic=-1 " + MIPS_RCU_NOCBS,
        ),
        LabArch(
            name="mipsel", debian_arch="mipsel", uname_m="mips",
            kernel_meta="linux-image-4kc-malta", kernel_file="boot/vmlinuz-{release}",
            qemu_binary="qemu-system-mipsel", qemu_package="qemu-system-mips",
            machine_args=("-M", "malta", "-cpu", "24Kf"),
            memory_mib=256, console="ttyS0",
            append="quiet panic=-1 " + MIPS_RCU_NOCBS,
        ),
        LabArch(
            name="arm64", debian_arch="arm64", uname_m="aarch64",
            kernel_meta="linux-image-arm64", kernel_file="boot/vmlinuz-{release}",
            qemu_binary="qemu-system-aarch64", qemu_package="qemu-system-arm",
            # virt + -kernel: qemu builds the device tree and enters the (gzip'd)
            # Image directly, no UEFI firmware.  cortex-a57 rather than `max`:
            # TCG emulating pointer authentication (max) makes every function
            # prologue costly.
            machine_args=("-M", "virt", "-accel", "tcg", "-cpu", "cortex-a57"),
            memory_mib=512, console="ttyAMA0",
        ),
    )
}

# `fleetprobe lab up` with no arguments: three hosts sharing one kernel (the
# usual fleet case) plus one of each foreign arch (a second kernel release),
# all on the default kernel line (fleetprobe.lab.lines.DEFAULT_LINE).
DEFAULT_FLEET: dict[str, int] = {"x86_64": 3, "ppc64le": 1, "mips64el": 1, "arm64": 1}


def lab_arch(name: str) -> LabArch:
    """Look up an arch by its lab name, accepting Debian's name (amd64, ppc64el) and aarch64 too."""
    if name in ARCHES:
        return ARCHES[name]
    for arch in ARCHES.values():
        if arch.debian_arch == name or (arch.uname_m == name and name not in ("mips", "mips64")):
            return arch
    raise InputError(f"unknown lab architecture {name!r}",
                     hint="choose from " + ", ".join(ARCHES))
