"""The history store keeps no secrets and is readable by the operator only (issue 11, finding 8).

The inventory an audit ran against is stored with the run; an Ansible inventory may carry
``ansible_password`` and friends. Through a real run over SSH (a simulated host), the stored
inventory must have every secret value redacted, and the store's folder and files must be
private whatever the umask.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from simhosts import SimFleet

from fleetprobe.cli.main import main
from fleetprobe.cli.options import Exit
from fleetprobe.redact import REDACTED, redact_secrets
from fleetprobe.store import Store

ROOT = Path(__file__).resolve().parents[1]
TRACEFS = Path("/sys/kernel/tracing")
SECRETS = ("hunter2-ssh", "hunter2-become", "tok-123", "pass phrase 9")




def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_stored_run_keeps_no_secret_and_is_private_whatever_the_umask(sim: SimFleet, tmp_path: Path,
                                                                        clean_tracefs: None) -> None:
    sim.add("h1")
    inv = sim.inventory(tmp_path / "inventory.yml", sim.known_hosts_for(tmp_path / "known_hosts"))
    data = yaml.safe_load(inv.read_text())
    data["all"].setdefault("vars", {}).update({
        "ansible_password": SECRETS[0], "ansible_become_password": SECRETS[1],
        "monitoring_api_token": SECRETS[2], "ansible_ssh_private_key_passphrase": SECRETS[3]})
    inv.write_text(yaml.safe_dump(data))
    store = tmp_path / "history" / "h.sqlite3"
    old = os.umask(0o022)
    try:
        rc = main(["run", str(ROOT / "playbooks" / "execsnoop.yml"), "-i", str(inv), "--ssh-config", "none",
                   "--no-agent", "--connect-timeout", "5", "--duration", "1s", "--no-live", "--store", str(store)],
                  console=Console(record=True, width=200))
    finally:
        os.umask(old)
    assert rc in (Exit.OK, Exit.SOME_FAILED), rc
    with Store(store) as st:
        (row,) = st.runs()
        kept = st.inventory_text(row.run_id) or ""
    assert "ansible_password" in kept and REDACTED in kept
    for secret in SECRETS:
        assert secret not in kept, kept
    raw = store.read_bytes() + b"".join(p.read_bytes() for p in store.parent.glob("h.sqlite3-*"))
    assert not any(s.encode() in raw for s in SECRETS), "a secret reached the database file"
    assert _mode(store.parent) == 0o700
    for p in [store, *store.parent.glob("h.sqlite3-*")]:
        assert _mode(p) == 0o600, (p, oct(_mode(p)))


def test_the_default_store_folder_is_made_private_even_if_it_existed(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    (tmp_path / "fleetprobe").mkdir(mode=0o755)
    os.chmod(tmp_path / "fleetprobe", 0o755)  # as an older fleetprobe left it
    with Store() as st:
        path = st.path
    assert _mode(path.parent) == 0o700 and _mode(path) == 0o600
    named = tmp_path / "shared"
    named.mkdir()
    os.chmod(named, 0o755)
    with Store(named / "x.sqlite3") as st:
        pass
    assert _mode(named) == 0o755, "a folder the user named is theirs: left as it is"
    assert _mode(named / "x.sqlite3") == 0o600


@pytest.mark.parametrize("text,kept,gone", [
    ("all:\n  vars:\n    ansible_password: hunter2\n    ansible_user: root\n", ["ansible_user: root"], ["hunter2"]),
    ('web1 ansible_host=10.0.0.1 ansible_ssh_pass="p w" ansible_port=2222\n',
     ["ansible_host=10.0.0.1", "ansible_port=2222"], ["p w"]),
    ('{"_meta": {"hostvars": {"a": {"ansible_become_pass": "x\\"y", "ansible_port": 22}}}}',
     ['"ansible_port": 22'], ['x\\"y']),
    ("db:\n  hosts:\n    d1:\n      creds: !vault |\n          $ANSIBLE_VAULT;1.1;AES256\n          6231\n      ansible_port: 22\n",
     ["ansible_port: 22"], ["ANSIBLE_VAULT", "6231"]),
    ("web1 secret_key=abc,token=def\n", [], ["abc", "def"]),
    ("web1,root@db:2222", ["web1,root@db:2222"], []),
])
def test_redaction_by_name_in_yaml_ini_and_json(text: str, kept: list[str], gone: list[str]) -> None:
    out = redact_secrets(text)
    for k in kept:
        assert k in out, out
    for g in gone:
        assert g not in out, out
