"""SSH keys for the lab: the root login key and each VM's pre-generated host key.

Host keys are made on the controller so the known_hosts entry exists before
the VM boots and strict host key checking stays on for every lab login.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetprobe.errors import InputError


def _ssh_string(data: bytes) -> bytes:
    """An RFC 4251 string: uint32 length, then the bytes."""
    return struct.pack(">I", len(data)) + data


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, created with that mode from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def generate_ed25519() -> Ed25519PrivateKey:
    """A fresh ed25519 key (fast, small, accepted by OpenSSH, asyncssh and dropbear >= 2020.79)."""
    return Ed25519PrivateKey.generate()


def public_openssh(key: Ed25519PrivateKey) -> str:
    """The public half as one OpenSSH line without comment: ``ssh-ed25519 AAAA...``."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def dropbear_private(key: Ed25519PrivateKey) -> bytes:
    """The key in dropbear's own file format, as dropbearkey -t ed25519 writes it.

    dropbear 2022.83 (bookworm) stores string "ssh-ed25519" then one string
    of 64 bytes: the 32-byte seed followed by the 32-byte public key
    (ed25519.c buf_put_ed25519_priv_key).  Writing it here spares the
    controller an amd64 dropbearconvert; the lab test checks it against
    Debian's dropbearkey.
    """
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _ssh_string(b"ssh-ed25519") + _ssh_string(seed + pub)


def _load_or_create(path: Path) -> Ed25519PrivateKey:
    """The ed25519 key kept at ``path`` (OpenSSH format, 0600), generated on first use."""
    if path.exists():
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError("not an ed25519 key", where=str(path),
                             hint="delete it and run `fleetprobe lab up` again")
        return key
    key = generate_ed25519()
    _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    return key


def load_or_create_client_key(path: Path) -> str:
    """The lab's root login key at ``path``, created once; returns its public line."""
    public = public_openssh(_load_or_create(path)) + " fleetprobe-lab"
    Path(str(path) + ".pub").write_text(public + "\n")
    return public


def load_or_create_host_key(path: Path) -> tuple[bytes, str]:
    """A VM's host key kept at ``path``; returns (dropbear file bytes, public line)."""
    key = _load_or_create(path)
    return dropbear_private(key), public_openssh(key)


def known_hosts_line(host: str, port: int, public: str) -> str:
    """One known_hosts line; non-22 ports use OpenSSH's ``[host]:port`` form."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {public}"


def fingerprint_sha256(public: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line (for messages and tests)."""
    blob = base64.b64decode(public.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
