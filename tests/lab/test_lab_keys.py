"""The host key file fleetprobe writes is what Debian's own dropbearkey reads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleetprobe.kmod import debian
from fleetprobe.lab import keys

pytestmark = pytest.mark.lab


def test_dropbearkey_reads_our_host_key(tmp_path: Path) -> None:
    """`dropbearkey -y` (amd64 dropbear-bin from Debian) prints the public key we put in known_hosts."""
    env_dir = os.environ.get("FLEETPROBE_LAB_DIR")
    cache = Path(env_dir) / "debian" if env_dir else tmp_path / "debian"
    root = tmp_path / "root"
    for pkg in debian.fetch(["dropbear-bin", "libtomcrypt1", "libtommath1", "libgmp10"], "amd64", cache):
        debian.extract(pkg, root)
    dropbear_file, public = keys.load_or_create_host_key(tmp_path / "host_key")
    (tmp_path / "host_key.dropbear").write_bytes(dropbear_file)
    out = subprocess.run([str(root / "usr/bin/dropbearkey"), "-y", "-f", str(tmp_path / "host_key.dropbear")],
                         env={"LD_LIBRARY_PATH": str(root / "usr/lib/x86_64-linux-gnu")},
                         capture_output=True, text=True, check=True).stdout
    printed = [line for line in out.splitlines() if line.startswith("ssh-ed25519 ")]
    assert printed and printed[0].split()[:2] == public.split()[:2]
    assert keys.fingerprint_sha256(public) in out
