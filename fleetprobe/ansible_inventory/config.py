"""ansible.cfg and the environment: the default inventory, remote_user, private_key_file and ssh settings."""

from __future__ import annotations

import configparser
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InventoryError
from .files import read_text

@dataclass(frozen=True)
class AnsibleConfig:
    """What fleetprobe takes from Ansible's configuration."""

    path: str | None
    inventory: tuple[str, ...]
    remote_user: str | None
    private_key_file: str | None
    #: [ssh_connection] ssh_args, ssh_common_args, ssh_extra_args and host_key_checking (None: not set)
    ssh_args: str | None = None
    ssh_common_args: str | None = None
    ssh_extra_args: str | None = None
    host_key_checking: bool | None = None

    def defaults(self) -> dict[str, Any]:
        """These settings as the host variables that override them (the lowest precedence: any
        inventory variable of the same name wins, as in Ansible)."""
        out: dict[str, Any] = {}
        for key, value in (("ansible_user", self.remote_user), ("ansible_ssh_private_key_file", self.private_key_file),
                           ("ansible_ssh_args", self.ssh_args), ("ansible_ssh_common_args", self.ssh_common_args),
                           ("ansible_ssh_extra_args", self.ssh_extra_args),
                           ("ansible_host_key_checking", self.host_key_checking)):
            if value is not None:
                out[key] = value
        return out


def find_ansible_cfg(cwd: Path | None = None) -> Path | None:
    """The config file ansible-core uses: $ANSIBLE_CONFIG, ./ansible.cfg (not in a world-writable
    directory), ~/.ansible.cfg, /etc/ansible/ansible.cfg."""
    env = os.environ.get("ANSIBLE_CONFIG")
    here = cwd or Path.cwd()
    candidates: list[Path] = []
    if env:
        p = Path(env).expanduser()
        candidates.append(p / "ansible.cfg" if p.is_dir() else p)
    try:
        world_writable = bool(os.stat(here).st_mode & stat.S_IWOTH)
    except OSError:
        world_writable = True
    if not world_writable:
        candidates.append(here / "ansible.cfg")
    candidates += [Path("~/.ansible.cfg").expanduser(), Path("/etc/ansible/ansible.cfg")]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _cfg_path(value: str, base: Path) -> str:
    """A path setting as ansible-core resolves it: ~ expanded, relative to the config file's directory."""
    p = Path(os.path.expandvars(value)).expanduser()
    return str(p if p.is_absolute() else base / p)


def ansible_config(cwd: Path | None = None) -> AnsibleConfig:
    """inventory, remote_user and private_key_file from the environment and ansible.cfg, as ansible-core reads them."""
    cfg_path = find_ansible_cfg(cwd)
    section: dict[str, str] = {}
    ssh: dict[str, str] = {}
    if cfg_path is not None:
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
        try:
            parser.read_string(read_text(cfg_path), source=str(cfg_path))
        except configparser.Error as exc:
            raise InventoryError(f"not a valid ansible.cfg: {exc}", where=str(cfg_path)) from None
        if parser.has_section("defaults"):
            section = dict(parser.items("defaults"))
        if parser.has_section("ssh_connection"):
            ssh = dict(parser.items("ssh_connection"))
    base = cfg_path.parent if cfg_path is not None else Path.cwd()
    inventory: tuple[str, ...]
    env_inv = os.environ.get("ANSIBLE_INVENTORY")
    if env_inv:
        # a list of paths, as ansible-core reads it (DEFAULT_HOST_LIST is a pathlist: commas separate paths)
        inventory = tuple(_cfg_path(s.strip(), Path.cwd()) for s in env_inv.split(",") if s.strip())
    elif section.get("inventory") or section.get("hostfile"):
        raw = section.get("inventory") or section.get("hostfile") or ""
        inventory = tuple(_cfg_path(s.strip(), base) for s in raw.split(",") if s.strip())
    else:
        inventory = ("/etc/ansible/hosts",)
    user = os.environ.get("ANSIBLE_REMOTE_USER") or section.get("remote_user") or None
    key = os.environ.get("ANSIBLE_PRIVATE_KEY_FILE") or section.get("private_key_file") or None
    if key:
        key = _cfg_path(key, Path.cwd() if os.environ.get("ANSIBLE_PRIVATE_KEY_FILE") else base)
    checking = (os.environ.get("ANSIBLE_HOST_KEY_CHECKING") or os.environ.get("ANSIBLE_SSH_HOST_KEY_CHECKING")
                or ssh.get("host_key_checking") or section.get("host_key_checking"))
    return AnsibleConfig(str(cfg_path) if cfg_path else None, inventory, user, key,
                         ssh_args=os.environ.get("ANSIBLE_SSH_ARGS") or ssh.get("ssh_args") or None,
                         ssh_common_args=os.environ.get("ANSIBLE_SSH_COMMON_ARGS") or ssh.get("ssh_common_args") or None,
                         ssh_extra_args=os.environ.get("ANSIBLE_SSH_EXTRA_ARGS") or ssh.get("ssh_extra_args") or None,
                         host_key_checking=None if checking is None else ansible_bool(checking))


def ansible_bool(value: Any) -> bool:
    """ansible-core's boolean(): yes/on/1/true/t/y are true, everything else false."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("y", "yes", "on", "1", "true", "t", "1.0")
