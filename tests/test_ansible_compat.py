"""Inventories read as ansible-core reads them, and --limit selecting what ansible-core selects.

Every expectation here comes from the ansible-core installed beside fleetprobe (the test extras pin a
range; whichever release is installed is the reference), never from a hard-coded list.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetprobe.ansible_inventory import find_ansible_cfg
from fleetprobe.errors import InventoryError
from fleetprobe.inventory import load_inventory, select_ordered

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """An ansible-core command: beside this Python (the test venv), else on PATH; missing is a failure."""
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    assert found, f"{name} not found: install the test extras (pip install -e '.[test]') for ansible-core"
    return found


def _env(tmp: Path) -> dict[str, str]:
    """ansible-core confined to the test: no user config, its own temp and home."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(tmp / "none.cfg"), ANSIBLE_LOCAL_TEMP=str(tmp / ".ansible-tmp"),
               ANSIBLE_HOME=str(tmp / ".ansible"), ANSIBLE_NOCOLOR="1", ANSIBLE_DEPRECATION_WARNINGS="False")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def ansible_list(source: Path, tmp: Path) -> dict[str, Any]:
    """``ansible-inventory -i SOURCE --list``."""
    res = subprocess.run([_tool("ansible-inventory"), "-i", str(source), "--list"], capture_output=True,
                         text=True, env=_env(tmp), cwd=tmp, check=True)
    return dict(json.loads(res.stdout))


# --- the --limit table -----------------------------------------------------------------------------

LIMIT_INVENTORY = """\
lonely.example.com
10.0.0.9 ansible_port=2200

[web]
web1 ansible_host=10.0.0.1
web2
web3.example.com

[db]
db1
db2 ansible_port=5432
db10

[app:children]
web
db

[staging]
web2
db1
stage1

[prod:children]
app

[prod]
prodonly

[east]
web1
db2
"""

PATTERNS = [
    "all", "*", "web", "db", "web:db", "web,db", "web:&db", "app:&web", "app:!db", "!db", "!db:web1",
    "web:!web1:web1", "web[0]", "web[1]", "web[-1]", "web[0:1]", "web[1:]", "app[0:2]", "web*", "w?b1",
    "~web[12]", "~^db", "~.*2$", "~(web|db)1$", "*.example.com", "10.0.0.*", "staging:&app", "prod:!staging",
    "app:!web[0]", "&web", "!web", "web1:db1", "web1,db1,stage1", "ungrouped", "nonexistent",
    "nonexistent:web", "web:&nonexistent", "all:!ungrouped", "a*", "un*", "db[0:0]", "east:staging:&db",
    "east,!db2", "db[5]", "web[0-1]", "@limit.txt", "@limit.txt:db", "prod:!east:&staging", "~[", "st*[1]",
]


_API_SCRIPT = r'''
import json, sys
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
inv = InventoryManager(loader=DataLoader(), sources=[sys.argv[1]])
out = {}
for p in json.loads(sys.argv[2]):
    try:
        inv.subset(p)
        out[p] = sorted(h.name for h in inv.get_hosts("all"))
    except Exception as e:
        out[p] = "error: " + str(e)
    inv.subset(None)
print(json.dumps(out))
'''


def ansible_limits(source: Path, patterns: list[str], tmp: Path) -> dict[str, Any]:
    """What ansible-core's InventoryManager.subset (``--limit``) selects for each pattern, in one process."""
    py = Path(_tool("ansible")).read_text().splitlines()[0][2:].strip()
    res = subprocess.run([py, "-c", _API_SCRIPT, str(source), json.dumps(patterns)], capture_output=True,
                         text=True, env=_env(tmp), cwd=tmp, check=True)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


@pytest.fixture
def limit_dir(tmp_path: Path) -> Path:
    (tmp_path / "hosts").write_text(LIMIT_INVENTORY)
    (tmp_path / "limit.txt").write_text("web1\n!db2\ndb*\n")
    return tmp_path


def test_limit_table_matches_ansible_core(limit_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the patterns selects exactly the hosts ansible-core's --limit selects (or both refuse it)."""
    assert len(PATTERNS) >= 30
    monkeypatch.chdir(limit_dir)
    inv = load_inventory(str(limit_dir / "hosts"))
    theirs = ansible_limits(limit_dir / "hosts", PATTERNS, limit_dir)
    wrong = []
    for p in PATTERNS:
        try:
            ours: Any = sorted(select_ordered(inv, p))
        except InventoryError as exc:
            ours = f"error: {exc}"
        expected = theirs[p]
        if isinstance(expected, str) or isinstance(ours, str):
            if isinstance(expected, str) != isinstance(ours, str):
                wrong.append((p, ours, expected))
        elif ours != expected:
            wrong.append((p, ours, expected))
    assert not wrong, "\n".join(f"{p!r}: fleetprobe {o} ansible-core {e}" for p, o, e in wrong)
    # not vacuous: the table has hits, misses, and the cases the issue saw differ
    assert theirs["!db:web1"] == ["web1"] and theirs["web:!web1:web1"] == ["web2", "web3.example.com"]
    assert theirs["web[0]"] == ["web1"] and theirs["nonexistent"] == []


def test_limit_agrees_with_the_ansible_command(limit_dir: Path) -> None:
    """The API reference above is what ``ansible PATTERN --list-hosts`` prints (checked on a few patterns)."""
    inv = load_inventory(str(limit_dir / "hosts"))
    for p in ("web[0:1]", "!db:web1", "app:&staging"):
        res = subprocess.run([_tool("ansible"), p, "-i", str(limit_dir / "hosts"), "--list-hosts"],
                             capture_output=True, text=True, env=_env(limit_dir), cwd=limit_dir, check=True)
        listed = sorted(line.strip() for line in res.stdout.splitlines()[1:] if line.strip())
        assert sorted(select_ordered(inv, p)) == listed, (p, res.stdout)


# --- inventory formats against ansible-inventory --list --------------------------------------------

def _compare(source: Path, tmp: Path) -> dict[str, Any]:
    """fleetprobe's hosts, groups and merged variables equal ansible-inventory --list's; returns the latter."""
    theirs = ansible_list(source, tmp)
    ours = load_inventory(str(source))
    hostvars = theirs["_meta"]["hostvars"]

    def members(group: str) -> set[str]:
        body = theirs.get(group, {})
        out = set(body.get("hosts", []))
        for c in body.get("children", []):
            out |= members(c)
        return out

    # --list leaves out the hostvars of a host without variables
    assert sorted(h.name for h in ours.hosts) == sorted(members("all")), "hosts differ"
    for h in ours.hosts:
        assert h.vars == hostvars.get(h.name, {}), f"variables of {h.name} differ"

    for g in theirs:
        if g != "_meta":
            assert set(ours.groups.get(g, ())) == members(g), f"group {g} differs"
    return theirs


def test_ini_file_named_hosts_with_group_and_host_vars(tmp_path: Path) -> None:
    """INI (a file named hosts), group_vars/ files and directories, host_vars/, precedence: as ansible-core."""
    (tmp_path / "hosts").write_text(
        "web1 ansible_host=127.0.0.11 n=1 s='quoted str' f=1.5 lst=\"[1, 2]\"\n"
        "[web]\nweb2:2222 ansible_user=admin\nweb[3:4]\n"
        "[web:vars]\nlevel=web\nansible_port=2201\n"
        "[db]\ndb1\n[db:vars]\nlevel=db\n"
        "[app:children]\nweb\ndb\n[app:vars]\nlevel=app\nfrom_app=yes\n")
    gv = tmp_path / "group_vars"
    (gv / "web").mkdir(parents=True)
    (gv / "all.yml").write_text("level: all_file\ncommon: 1\nansible_user: deploy\n")
    (gv / "web" / "10-main.yml").write_text("level: web_dir\nweb_only: true\n")
    (gv / "web" / "20-more").write_text("more: yes\n")
    (gv / "db.yaml").write_text("level: db_file\n")
    (gv / "app").write_text("from_app_file: 1\n")
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "host_vars" / "web3.yml").write_text("ansible_port: 2203\nlevel: host_file\n")
    theirs = _compare(tmp_path / "hosts", tmp_path)
    inv = {h.name: h for h in load_inventory(str(tmp_path / "hosts")).hosts}
    # the values that decide where fleetprobe connects
    assert (inv["web2"].port, inv["web2"].user) == (2222, "admin")
    assert (inv["web3"].port, inv["web4"].port, inv["db1"].port) == (2203, 2201, None)
    assert inv["web1"].address == "127.0.0.11" and inv["web1"].user == "deploy"
    assert theirs["_meta"]["hostvars"]["web3"]["level"] == "host_file"


def test_yaml_inventory_directory_with_script_and_list_json(tmp_path: Path) -> None:
    """-i DIR: YAML, INI, an executable script and saved ansible-inventory --list JSON, group_vars beside them."""
    d = tmp_path / "inv"
    (d / "group_vars").mkdir(parents=True)
    (d / "01-static.yml").write_text(
        "all:\n  children:\n    web:\n      hosts:\n        web1:\n          ansible_port: 2201\n"
        "        web2:\n      vars:\n        tier: web\n")
    (d / "02-more").write_text("[db]\ndb1 ansible_host=127.0.0.21\n[web]\nweb3\n")
    script = d / "03-dynamic.py"
    script.write_text("#!" + sys.executable + "\nimport json, sys\n"
                      "if sys.argv[1] == '--list':\n"
                      "    print(json.dumps({'cache': {'hosts': ['cache1'], 'vars': {'tier': 'cache'}},"
                      " 'web': ['web1'], '_meta': {'hostvars': {'cache1': {'ansible_port': 6379}}}}))\n"
                      "else:\n    print('{}')\n")
    script.chmod(0o755)
    (d / "README.md").write_text("ignored, as ansible-core ignores it\n")
    (d / "group_vars" / "web.yml").write_text("tier: web_file\n")
    _compare(d, tmp_path)
    inv = {h.name: h for h in load_inventory(str(d)).hosts}
    assert inv["cache1"].port == 6379 and inv["db1"].address == "127.0.0.21" and inv["web3"].vars["tier"] == "web_file"


def test_saved_ansible_inventory_list_json(tmp_path: Path) -> None:
    """``ansible-inventory -i X --list > inv.json`` read back gives X's hosts, groups and variables."""
    src = tmp_path / "hosts"
    src.write_text("[web]\nweb1 ansible_port=2201\nweb2\n[web:vars]\ntier=web\n[app:children]\nweb\n[db]\ndb1\n")
    saved = tmp_path / "inv.json"
    saved.write_text(json.dumps(ansible_list(src, tmp_path)))
    a, b = load_inventory(str(src)), load_inventory(str(saved))
    assert [(h.name, h.port, h.vars, set(h.groups)) for h in a.hosts] == \
        [(h.name, h.port, h.vars, set(h.groups)) for h in b.hosts]
    assert {g: set(m) for g, m in a.groups.items()} == {g: set(m) for g, m in b.groups.items()}


def test_script_without_meta_is_asked_per_host(tmp_path: Path) -> None:
    """A script without _meta is asked --host for each host, as ansible-core does."""
    script = tmp_path / "inv.sh"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --list ]; then echo '{\"g\": [\"h1\", \"h2\"]}';"
                      " else echo \"{\\\"ansible_port\\\": 22$(echo $2 | tr -d h)}\"; fi\n")
    script.chmod(0o755)
    _compare(script, tmp_path)
    assert [h.port for h in load_inventory(str(script)).hosts] == [221, 222]


def test_jinja_and_vault_are_refused_naming_file_and_variable(tmp_path: Path) -> None:
    """The built-in reader does not evaluate Jinja or vault: it says where, which variable, and the way out."""
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "hosts").write_text("web1 ansible_host=\"{{ base_ip }}.11\"\n")
    (tmp_path / "group_vars" / "all.yml").write_text("base_ip: 10.0.0\n")
    with pytest.raises(InventoryError) as ei:
        load_inventory(str(tmp_path / "hosts"))
    text = str(ei.value)
    assert f"{tmp_path / 'hosts'}:1" in text and "ansible_host" in text and "Jinja" in text
    assert "--inventory-reader ansible" in text
    (tmp_path / "v.yml").write_text("all:\n  hosts:\n    h1:\n      ansible_password: !vault |\n"
                                    "        $ANSIBLE_VAULT;1.1;AES256\n        3131\n")
    with pytest.raises(InventoryError) as ei:
        load_inventory(str(tmp_path / "v.yml"))
    assert f"{tmp_path / 'v.yml'}:4" in str(ei.value) and "ansible_password" in str(ei.value)
    # a Jinja value fleetprobe does not use is no reason to refuse
    (tmp_path / "ok.yml").write_text("all:\n  hosts:\n    h1:\n      motd: '{{ x }}'\n")
    assert load_inventory(str(tmp_path / "ok.yml")).hosts[0].vars["motd"] == "{{ x }}"


def test_ansible_reader_evaluates_jinja_and_vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--inventory-reader ansible: ansible-core templates and decrypts what the built-in reader refuses."""
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ.get('PATH', '')}")
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    pw = tmp_path / "vault-pass"
    pw.write_text("s3cret\n")
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(pw))
    enc = subprocess.run([_tool("ansible-vault"), "encrypt_string", "hunter2", "--name", "ansible_password"],
                         capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text("base_ip: 10.0.0\n")
    body = "\n".join("      " + line for line in enc.strip().splitlines())
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    web1:\n      ansible_host: '{{ base_ip }}.11'\n"
                                      "      ansible_port: '{{ 2200 + 22 }}'\n" + body + "\n")
    inv = load_inventory(str(tmp_path / "inv.yml"), reader="ansible")
    h = inv.hosts[0]
    assert (h.name, h.address, h.port, h.password) == ("web1", "10.0.0.11", 2222, "hunter2")
    with pytest.raises(InventoryError):
        load_inventory(str(tmp_path / "inv.yml"))


def test_default_inventory_from_ansible_cfg_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No -i: ANSIBLE_INVENTORY, else ansible.cfg's inventory (relative to it); remote_user, private_key_file."""
    proj = tmp_path / "proj"
    (proj / "inv").mkdir(parents=True)
    (proj / "inv" / "hosts").write_text("web1\nweb2 ansible_user=own\n")
    (proj / "ansible.cfg").write_text("[defaults]\ninventory = inv/hosts\nremote_user = deploy\n"
                                      "private_key_file = keys/id_fleet\n")
    os.chmod(proj, 0o755)
    monkeypatch.chdir(proj)
    monkeypatch.delenv("ANSIBLE_CONFIG", raising=False)
    monkeypatch.delenv("ANSIBLE_INVENTORY", raising=False)
    inv = load_inventory(None)
    assert [(h.name, h.user, h.key_file) for h in inv.hosts] == [
        ("web1", "deploy", str(proj / "keys" / "id_fleet")), ("web2", "own", str(proj / "keys" / "id_fleet"))]
    # ansible-core agrees on where the inventory and the user come from
    env = {k: v for k, v in _env(proj).items() if k != "ANSIBLE_CONFIG"}
    res = subprocess.run([_tool("ansible-config"), "dump", "--only-changed", "--format", "json"],
                         capture_output=True, text=True, env=env, cwd=proj, check=True)
    dumped = {d["name"]: d["value"] for d in json.loads(res.stdout) if "name" in d}
    assert dumped["DEFAULT_HOST_LIST"] == [str(proj / "inv" / "hosts")]
    assert dumped["DEFAULT_REMOTE_USER"] == "deploy"
    assert dumped["DEFAULT_PRIVATE_KEY_FILE"] == str(proj / "keys" / "id_fleet")
    other = tmp_path / "other.ini"
    other.write_text("db1\n")
    monkeypatch.setenv("ANSIBLE_INVENTORY", str(other))
    assert [h.name for h in load_inventory(None).hosts] == ["db1"]
    third = tmp_path / "third.yml"
    third.write_text("all:\n  hosts:\n    q1:\n")
    monkeypatch.setenv("ANSIBLE_INVENTORY", f"{other},{third}")  # a list of paths, as for ansible-core
    assert {h.name for h in load_inventory(None).hosts} == {"db1", "q1"}
    # a world-writable directory's ansible.cfg is ignored, as ansible-core ignores it
    monkeypatch.delenv("ANSIBLE_INVENTORY")
    os.chmod(proj, 0o777)
    assert find_ansible_cfg(proj) != proj / "ansible.cfg"
    os.chmod(proj, 0o755)
    assert find_ansible_cfg(proj) == proj / "ansible.cfg"


def test_cli_typo_in_i_and_default_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``-i invntory``: exit 1 naming it (never a host called invntory); no -i: ansible.cfg's inventory."""
    from rich.console import Console

    from fleetprobe.cli.main import main
    from fleetprobe.cli.options import Exit

    monkeypatch.chdir(tmp_path)
    console = Console(record=True, width=200)
    assert main(["facts", "-i", "invntory"], console) == Exit.BAD_INPUT
    assert "invntory: inventory source not found" in console.export_text()
    (tmp_path / "hosts").write_text("[web]\nweb1\n")
    (tmp_path / "ansible.cfg").write_text("[defaults]\ninventory = hosts\n")
    os.chmod(tmp_path, 0o755)
    monkeypatch.delenv("ANSIBLE_CONFIG", raising=False)
    monkeypatch.delenv("ANSIBLE_INVENTORY", raising=False)
    console = Console(record=True, width=200)
    # the default inventory is found and --limit applies to it (nothing is connected: it matches no host)
    assert main(["facts", "--limit", "db"], console) == Exit.BAD_INPUT
    assert f"{tmp_path / 'hosts'}: --limit 'db' matches no host" in console.export_text()


@pytest.mark.parametrize("name,text", [("aws.yml", "plugin: amazon.aws.aws_ec2\nregions: [eu-west-1]\n"),
                                       ("inv.toml", "[web.hosts.web1]\n")])
def test_plugin_configs_need_ansible_core(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(InventoryError) as ei:
        load_inventory(str(tmp_path / name))
    assert str(tmp_path / name) in str(ei.value) and "--inventory-reader ansible" in str(ei.value)


DATA = Path(__file__).parent / "data" / "inventory"


@pytest.mark.parametrize("name", ["fleet.yml", "no-all.yml"])
def test_the_projects_own_inventories_read_as_ansible_core(name: str, tmp_path: Path) -> None:
    """The inventories the project ships and tests with: hosts, groups, variables as ansible-inventory --list."""
    _compare(DATA / name, tmp_path)


def test_the_lab_inventory_reads_as_ansible_core(tmp_path: Path) -> None:
    """What ``lab up`` writes reads as ansible-core reads it."""
    import yaml

    from fleetprobe.lab.inventory import LabVM, inventory_data

    vms = [LabVM(name=f"x86-{i}", arch="x86_64", debian_arch="amd64", uname_m="x86_64", kernel_release="6.1.0-1-amd64",
                 kernel_package="linux-image-6.1.0-1-amd64", kernel_version="6.1.1-1", port=10022 + i, pid=0,
                 serial_log="", host_key_public="ssh-ed25519 AAAA") for i in range(2)]
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory_data(vms, tmp_path / "id", tmp_path / "kh")))
    _compare(path, tmp_path)


def test_ansible_cfg_ssh_connection_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ansible.cfg's [ssh_connection] ssh_args (a -F there is a common bastion setup), ssh_common_args and
    host_key_checking take effect as for Ansible: read as ansible-config reads them, applied as ssh would."""
    from fleetprobe import sshconfig

    proj = tmp_path / "proj"
    proj.mkdir()
    os.chmod(proj, 0o755)
    (proj / "ansible.cfg").write_text("[defaults]\ninventory = hosts\nhost_key_checking = False\n"
                                      "[ssh_connection]\nssh_args = -C -o ControlMaster=auto -F ssh.cfg\n"
                                      "ssh_common_args = -o Port=2299\n")
    (proj / "hosts").write_text("web1\nweb2 ansible_ssh_common_args='-o Port=2300'\n")
    (proj / "ssh.cfg").write_text("Host web*\n  HostName 192.0.2.10\n  ProxyJump bastion\n")
    monkeypatch.chdir(proj)
    for var in ("ANSIBLE_CONFIG", "ANSIBLE_INVENTORY", "ANSIBLE_SSH_ARGS", "ANSIBLE_HOST_KEY_CHECKING"):
        monkeypatch.delenv(var, raising=False)
    env = {k: v for k, v in _env(proj).items() if k != "ANSIBLE_CONFIG"}
    res = subprocess.run([_tool("ansible-config"), "dump", "--only-changed", "-t", "connection", "-f", "json"],
                         capture_output=True, text=True, env=env, cwd=proj, check=True)
    ssh_opts = {o["name"]: o["value"] for d in json.loads(res.stdout) for k, v in d.items() if k == "ssh" for o in v}
    assert ssh_opts == {"host_key_checking": False, "ssh_args": "-C -o ControlMaster=auto -F ssh.cfg",
                        "ssh_common_args": "-o Port=2299"}
    hosts = {h.name: h for h in load_inventory(None).hosts}
    web1 = sshconfig.resolve(hosts["web1"])
    web2 = sshconfig.resolve(hosts["web2"])  # its own ansible_ssh_common_args replaces the cfg's
    assert (web1.hostname, web1.port, web1.strict) == ("192.0.2.10", 2299, "no")
    assert (web2.hostname, web2.port) == ("192.0.2.10", 2300)
    assert web1.jump is not None and web1.jump.hostname == "bastion"   # never straight to 192.0.2.10
