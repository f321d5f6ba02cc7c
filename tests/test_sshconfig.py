"""OpenSSH settings resolved as ``ssh -G`` resolves them, and known_hosts written as ssh writes it.

Every expectation comes from the OpenSSH client installed here (``ssh -G`` with ``-F`` at the test's
own config files, ``ssh-keygen -F``), never from this machine's ~/.ssh or /etc/ssh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetprobe import sshconfig
from fleetprobe.inventory import Host, load_inventory
from fleetprobe.sshconfig import ConfigSources, SSHConfigError, resolve

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client")


def ssh_g(args: list[str], name: str) -> dict[str, list[str]]:
    """``ssh -G [args] name``: every setting, as OpenSSH resolved it.

    ssh expands ``~`` and ``%d`` to the password database's home, fleetprobe to $HOME (which the tests
    point at a temporary directory so that nothing reads a real ~/.ssh): the one is mapped to the other.
    """
    import pwd

    pw_home = pwd.getpwuid(os.getuid()).pw_dir
    assert SSH
    res = subprocess.run([SSH, "-G", *args, name], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    out: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        key, _, value = line.partition(" ")
        value = value.replace(pw_home + "/", str(Path("~").expanduser()) + "/")
        # and /etc/ssh to the directory the tests give fleetprobe instead (FLEETPROBE_SSH_ETC)
        value = value.replace("/etc/ssh/", sshconfig.system_dir() + "/")
        out.setdefault(key.lower(), []).append(value)
    return out


def agrees(r: sshconfig.Resolved, g: dict[str, list[str]]) -> None:
    """fleetprobe's resolution equals ssh -G's on everything that decides where and how it connects."""
    home = str(Path("~").expanduser())

    def path(p: str) -> str:
        return os.path.expanduser(p)

    assert r.hostname == g["hostname"][0]
    assert r.port == int(g["port"][0])
    assert r.user == g["user"][0]
    assert list(r.identity_files) == [path(p) for p in g.get("identityfile", [])]
    assert " ".join(r.user_known_hosts) == g["userknownhostsfile"][0].replace("~", home) or \
        (r.user_known_hosts == () and g["userknownhostsfile"] == ["none"])
    assert " ".join(r.global_known_hosts) == g["globalknownhostsfile"][0] or \
        (r.global_known_hosts == () and g["globalknownhostsfile"] == ["none"])
    strict = {"true": "yes", "false": "no", "ask": "yes"}.get(g["stricthostkeychecking"][0],
                                                             g["stricthostkeychecking"][0])
    assert r.strict == strict
    assert r.hash_known_hosts == (g["hashknownhosts"][0] == "yes")
    assert r.host_key_alias == (g["hostkeyalias"][0] if "hostkeyalias" in g else None)
    cmd = g["proxycommand"][0] if "proxycommand" in g else None
    if cmd is not None:  # ssh -G shows it before expanding %h %p %r %n
        cmd = (cmd.replace("%%", "\0").replace("%h", g["hostname"][0]).replace("%p", g["port"][0])
               .replace("%r", g["user"][0]).replace("%n", g["host"][0] if "host" in g else "").replace("\0", "%"))
    assert r.proxy_command == cmd
    if "proxyjump" in g:
        assert r.jump is not None and r.proxy_command is None
    else:
        assert r.jump is None


CONFIG = """\
Host alias1
    HostName 127.0.0.%h-not-used
Host web* !web9
    HostName %h.example.com
    Port 2222
    IdentityFile ~/keys/web
    UserKnownHostsFile ~/kh/%k %d/kh2
Host web1
    Port 2201
    User webuser
Host db?
    HostName 10.1.0.1
    HashKnownHosts yes
    StrictHostKeyChecking accept-new
    ProxyJump jumper@bastion:2022
Host bastion
    HostName 127.0.0.1
    IdentityFile ~/keys/bastion
Host viacmd
    ProxyCommand ssh -W %h:%p -q root@bastion
    HostKeyAlias viacmd-alias
Match host 10.1.0.*
    User matched
Match originalhost web9 user root
    User nine
Host *
    User default
    StrictHostKeyChecking no
    ForwardAgent yes
    GlobalKnownHostsFile /none/global
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(CONFIG)
    return path


def host(name: str, **kw: object) -> Host:
    return Host(name=name, address=str(kw.pop("address", name)), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name,fields,args", [
    ("web1", {}, []),
    ("web2", {}, []),
    ("web9", {"user": "root"}, ["-o", "User=root"]),
    ("db1", {}, []),
    ("db2", {"port": 2300, "user": "alice"}, ["-o", "Port=2300", "-o", "User=alice"]),
    ("viacmd", {}, []),
    ("bastion", {"key_file": "/k/inventory_key"}, ["-o", "IdentityFile=/k/inventory_key"]),
    ("other", {}, []),
])
def test_resolution_matches_ssh_G(cfg: Path, name: str, fields: dict[str, object], args: list[str]) -> None:
    """Host/Match blocks, first value wins, tokens, inventory values as Ansible passes them: as ssh -G."""
    r = resolve(host(name, **fields), ConfigSources(files=(str(cfg),)))
    agrees(r, ssh_g(["-F", str(cfg), *args], name))


@pytest.mark.parametrize("ssh_args,port,user", [
    ("-o Port=2400", None, None),
    ("-p 2500 -l carol", None, None),
    ("-o Port=2400", 2600, None),           # ansible_port comes first: it wins, as Ansible's -o Port does
    ("-o User=dave -o User=erin", None, "frank"),
    ("-o StrictHostKeyChecking=yes -o UserKnownHostsFile=/kh/a", None, None),
    ("-o UserKnownHostsFile=none", None, None),
    ("-J hop1,root@hop2:2201", None, None),
    ("-o ProxyCommand='nc %h %p'", None, None),
    ("""-o 'ProxyCommand sh -c "exec nc %h %p" 2>/dev/null'""", None, None),
    ("-o 'ProxyJump none'", None, None),
    ("-i /k/extra -o IdentityFile=/k/more", None, None),
    ("-o HostKeyAlias=aliased -C -q", None, None),
])
def test_ansible_ssh_args_match_ssh_G(cfg: Path, ssh_args: str, port: int | None, user: str | None) -> None:
    """ansible_ssh_common_args after Ansible's own -o Port/-o User, as ssh reads its command line."""
    import shlex

    h = host("web2", port=port, user=user, ssh_args=tuple(shlex.split(ssh_args)))
    r = resolve(h, ConfigSources(files=(str(cfg),)))
    before = (["-o", f"Port={port}"] if port else []) + (["-o", f"User={user}"] if user else [])
    agrees(r, ssh_g(["-F", str(cfg), *before, *shlex.split(ssh_args)], "web2"))


def test_dash_F_in_ssh_args_replaces_the_config(cfg: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_config"
    other.write_text("Host web2\n  HostName 192.0.2.7\n  Port 2022\n")
    r = resolve(host("web2", ssh_args=("-F", str(other))), ConfigSources(files=(str(cfg),)))
    agrees(r, ssh_g(["-F", str(other)], "web2"))
    assert (r.hostname, r.port) == ("192.0.2.7", 2022)


def test_proxyjump_hops_resolve_like_ssh(cfg: Path) -> None:
    """Each hop of -J is resolved with its own config (the hop's HostName, key), as ssh's ProxyJump does."""
    r = resolve(host("db1"), ConfigSources(files=(str(cfg),)))
    assert r.jump is not None
    hop = r.jump
    agrees(hop, ssh_g(["-F", str(cfg), "-l", "jumper", "-p", "2022"], "bastion"))
    assert (hop.hostname, hop.port, hop.user) == ("127.0.0.1", 2022, "jumper")
    chain = resolve(host("x", ssh_args=("-J", "a,b:2200")), ConfigSources(files=()))
    assert chain.jump is not None and chain.jump.hostname == "b" and chain.jump.port == 2200
    assert chain.jump.jump is not None and chain.jump.jump.hostname == "a" and chain.jump.jump.jump is None


def test_user_and_system_config_with_includes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """~/.ssh/config first, then the system's ssh_config and its Include ssh_config.d/*.conf (relative to it)."""
    etc = tmp_path / "etc-ssh"
    (etc / "ssh_config.d").mkdir(parents=True)
    (etc / "ssh_config").write_text("Include ssh_config.d/*.conf\nHost *\n  Port 2022\n  User sysuser\n")
    (etc / "ssh_config.d" / "10-fleet.conf").write_text("Host sys*\n  HostName 198.51.100.1\n  User fromd\n")
    home = Path("~").expanduser()
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / "config").write_text("Host sysweb\n  Port 2201\n")
    monkeypatch.setenv("FLEETPROBE_SSH_ETC", str(etc))
    r = resolve(host("sysweb"), ConfigSources())
    combined = tmp_path / "combined"
    combined.write_text(f"Include {home / '.ssh' / 'config'}\nInclude {etc / 'ssh_config'}\n")
    # ssh -F reads one file: the same two, in ssh's order, with ssh_config.d given absolutely
    (tmp_path / "sys_abs").write_text((etc / "ssh_config").read_text().replace(
        "Include ssh_config.d", f"Include {etc}/ssh_config.d"))
    combined.write_text(f"Include {home / '.ssh' / 'config'}\nInclude {tmp_path / 'sys_abs'}\n")
    g = ssh_g(["-F", str(combined), "-o", f"GlobalKnownHostsFile={etc}/ssh_known_hosts {etc}/ssh_known_hosts2"],
              "sysweb")
    agrees(r, g)
    assert (r.hostname, r.port, r.user) == ("198.51.100.1", 2201, "fromd")
    (home / ".ssh" / "config").unlink()


@pytest.mark.parametrize("setting,named", [
    ("LocalForward 8080 localhost:80", "LocalForward"),
    ("RemoteCommand id", "RemoteCommand"),
    ("CanonicalizeHostname yes", "CanonicalizeHostname"),
    ("KnownHostsCommand /bin/true", "KnownHostsCommand"),
    ("NoSuchOption yes", "nosuchoption"),
    ("Match canonical\n  User x", "Match canonical"),
    ("CheckHostIP yes", "CheckHostIP"),
])
def test_settings_fleetprobe_cannot_honour_fail_the_host_naming_them(tmp_path: Path, setting: str,
                                                                    named: str) -> None:
    """Refused, before any connection, with the setting and its file:line in the message."""
    cfg = tmp_path / "c"
    cfg.write_text(f"Host *\n  {setting}\n")
    with pytest.raises(SSHConfigError) as ei:
        resolve(host("h1"), ConfigSources(files=(str(cfg),)))
    assert named in ei.value.message and f"{cfg}:2" in ei.value.message and ei.value.host == "h1"


@pytest.mark.parametrize("words,named", [
    (("-L", "8080:localhost:80"), "-L"), (("-W", "x:1"), "-W"), (("stray",), "stray"),
    (("-o", "ProxyCommand=x", "-J", "y"), "-J"),
])
def test_ssh_args_fleetprobe_cannot_honour_are_refused(words: tuple[str, ...], named: str) -> None:
    with pytest.raises(SSHConfigError) as ei:
        resolve(host("h1", ssh_args=words), ConfigSources(files=()))
    assert named in ei.value.message and "ansible_ssh_common_args" in ei.value.message


def test_ignore_unknown_as_ssh(tmp_path: Path) -> None:
    cfg = tmp_path / "c"
    cfg.write_text("IgnoreUnknown UseKeychain,Foo*\nHost *\n  UseKeychain yes\n  FooBar 1\n  Port 2\n")
    assert resolve(host("h1"), ConfigSources(files=(str(cfg),))).port == 2


def test_bad_quotes_in_ansible_args_name_the_host_and_variable(tmp_path: Path) -> None:
    inv = tmp_path / "hosts"
    inv.write_text("h1 ansible_ssh_common_args=\"-o ProxyCommand='ssh -W %h:%p\"\n")
    with pytest.raises(Exception) as ei:
        load_inventory(str(inv))
    assert "ansible_ssh_common_args" in str(ei.value) and "h1" in str(ei.value)


# --- known_hosts -----------------------------------------------------------------------------------

KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIHjF7vP3oXm9QeN1g4v0kT0lXbmJ2xk0Q0Qj6vI5Y6Jr"


def _resolved(tmp_path: Path, extra: str) -> sshconfig.Resolved:
    cfg = tmp_path / "c"
    cfg.write_text(f"Host web1\n  HostName 127.0.0.11\n  Port 2222\n  UserKnownHostsFile {tmp_path}/kh/%n\n{extra}")
    return resolve(host("web1"), ConfigSources(files=(str(cfg),)))


@pytest.mark.parametrize("hashed", [False, True])
def test_recorded_keys_are_found_by_ssh_keygen(tmp_path: Path, hashed: bool) -> None:
    """A recorded key: [HostName]:port, in the configured UserKnownHostsFile, hashed if HashKnownHosts;
    ssh-keygen -F (OpenSSH's own lookup) finds it, and so does fleetprobe next time."""
    r = _resolved(tmp_path, "  HashKnownHosts yes\n" if hashed else "")
    assert sshconfig.check_host_key(r, "ssh-ed25519", KEY) == "unknown"   # no such file yet: simply unknown
    line = sshconfig.record_host_key(r, "ssh-ed25519", KEY)
    path = tmp_path / "kh" / "web1"
    assert path.read_text() == line and oct(path.stat().st_mode & 0o777) == "0o600"
    assert line.startswith("|1|") if hashed else line == f"[127.0.0.11]:2222 ssh-ed25519 {KEY}\n"
    found = subprocess.run(["ssh-keygen", "-F", "[127.0.0.11]:2222", "-f", str(path)], capture_output=True, text=True)
    assert found.returncode == 0 and KEY in found.stdout
    assert sshconfig.check_host_key(r, "ssh-ed25519", KEY) == "ok"
    assert sshconfig.check_host_key(r, "ssh-ed25519", KEY[:-4] + "AAAA") == "changed"


def test_port_22_entries_are_bare_and_no_fallback_from_port(tmp_path: Path) -> None:
    """ssh looks up ``[host]:port`` only: a bare ``host`` line does not vouch for port 2222 (asyncssh's would)."""
    r = _resolved(tmp_path, "")
    (tmp_path / "kh").mkdir()
    (tmp_path / "kh" / "web1").write_text(f"127.0.0.11 ssh-ed25519 {KEY}\n")
    assert sshconfig.check_host_key(r, "ssh-ed25519", KEY) == "unknown"
    (tmp_path / "kh" / "web1").write_text(f"[127.0.0.*]:2222,!10.* ssh-ed25519 {KEY}\n@revoked * ssh-rsa AAAA\n")
    assert sshconfig.check_host_key(r, "ssh-ed25519", KEY) == "ok"
    assert sshconfig.check_host_key(r, "ssh-rsa", "AAAA") == "revoked"


def test_known_hosts_none_trusts_nothing(tmp_path: Path) -> None:
    r = _resolved(tmp_path, "")
    cfg = tmp_path / "n"
    cfg.write_text("Host *\n  UserKnownHostsFile none\n  GlobalKnownHostsFile none\n  StrictHostKeyChecking accept-new\n")
    r = resolve(host("web1"), ConfigSources(files=(str(cfg),)))
    assert r.user_known_hosts == () and sshconfig.check_host_key(r, "ssh-ed25519", KEY) == "untrusted"
    assert not sshconfig.may_record(r)


def _ansible_cmdline(h: Host) -> list[str]:
    """What Ansible's ssh connection puts before the user's args: -o Port, -o IdentityFile, -o User."""
    out: list[str] = []
    if h.port is not None:
        out += ["-o", f"Port={h.port}"]
    if h.key_file:
        out += ["-o", f"IdentityFile={h.key_file}"]
    if h.user:
        out += ["-o", f"User={h.user}"]
    return out + list(h.ssh_args)


def test_the_projects_own_inventory_resolves_as_ssh_G() -> None:
    """Every host of tests/data/inventory/fleet.yml (-J, UserKnownHostsFile, StrictHostKeyChecking in its
    ssh args): where and how fleetprobe connects is what ssh -G says for the command line Ansible runs."""
    inv = load_inventory(str(Path(__file__).parent / "data" / "inventory" / "fleet.yml"))
    for h in inv.hosts:
        agrees(resolve(h, ConfigSources(files=())), ssh_g(["-F", "none", *_ansible_cmdline(h)], h.address))
