"""Inventory: Ansible's YAML layout, ad-hoc -i lists, --limit patterns, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetprobe.errors import InventoryError
from fleetprobe.inventory import Inventory, expand_host_pattern, load_inventory, parse_adhoc, select_hosts

DATA = Path(__file__).parent / "data" / "inventory"


@pytest.fixture(scope="module")
def fleet() -> Inventory:
    """The realistic inventory fixture."""
    return load_inventory(str(DATA / "fleet.yml"))


def by_name(inv: Inventory) -> dict[str, object]:
    """Hosts by name."""
    return {h.name: h for h in inv.hosts}


def test_hosts_in_inventory_order_with_ranges(fleet: Inventory) -> None:
    """Ranges expand with zero padding kept; letter ranges too; order is ansible-core's
    (``ansible all --list-hosts``: all's own hosts, then its child groups level by level)."""
    assert [h.name for h in fleet.hosts] == [
        "bastion.example.net", "stage1", "db02.example.net", "db01.example.net", "db03.example.net",
        "db07.example.net", "web-a.example.net", "web-b.example.net", "web-c.example.net"]


def test_group_membership_nested(fleet: Inventory) -> None:
    """A parent group holds its children's hosts; a host may be in several groups."""
    assert fleet.groups["db"] == ("db01.example.net", "db02.example.net", "db03.example.net", "db07.example.net")
    assert set(fleet.groups["prod"]) == set(fleet.groups["db"]) | set(fleet.groups["web"])
    assert set(fleet.groups["staging"]) == {"stage1", "db02.example.net"}
    assert len(fleet.groups["all"]) == 9


def test_variable_precedence_host_child_parent_all(fleet: Inventory) -> None:
    """host > child group > parent group > all, as Ansible merges them."""
    h = {x.name: x for x in fleet.hosts}
    db07, db01, web, bastion = h["db07.example.net"], h["db01.example.net"], h["web-a.example.net"], \
        h["bastion.example.net"]
    assert (db07.vars["region"], db07.vars["tier"], db07.vars["dc"]) == ("host", "prod", "all")
    assert (db01.vars["region"], db01.vars["tier"]) == ("db", "prod")
    assert (web.vars["region"], web.vars["tier"]) == ("prod", "prod")
    assert (bastion.vars["region"], bastion.vars["tier"]) == ("all", "all")
    # db02 is in db (depth 2) and staging (depth 1): the deeper group's value wins, a host var beats both.
    db02 = h["db02.example.net"]
    assert (db02.vars["region"], db02.vars["dc"]) == ("db", "staging")


def test_connection_variables(fleet: Inventory) -> None:
    """Port, user, key, become and the ssh args (resolved as ssh resolves them: tests/test_sshconfig.py)."""
    h = {x.name: x for x in fleet.hosts}
    db07 = h["db07.example.net"]
    assert (db07.address, db07.port, db07.user) == ("db07.example.net", 2207, "deploy")
    assert db07.key_file == str(Path("~/keys/db07").expanduser())
    assert db07.ssh_args == ("-J", "jump@bastion.example.net:2222", "-o", "UserKnownHostsFile=~/fleet/known_hosts",
                             "-o", "StrictHostKeyChecking=yes")
    assert db07.jump is None and db07.known_hosts is None  # fleetprobe_jump / fleetprobe_known_hosts only
    assert db07.become and db07.become_user == "root"
    assert db07.target == "deploy@db07.example.net:2207"
    web = h["web-b.example.net"]
    assert web.ssh_args == ("-o", "UserKnownHostsFile=/etc/fleet/web_known_hosts") and web.become
    stage = h["stage1"]
    assert (stage.address, stage.user, stage.port, stage.become) == ("10.0.0.5", "root", 22, False)
    assert not h["bastion.example.net"].become


def test_groups_without_all_key() -> None:
    """Top-level groups without ``all:`` are children of all."""
    inv = load_inventory(str(DATA / "no-all.yml"))
    assert [h.name for h in inv.hosts] == ["web1", "web2", "db1"]
    assert inv.groups["web"] == ("web1", "web2")


@pytest.mark.parametrize("pattern,expected", [
    ("db", {"db01.example.net", "db02.example.net", "db03.example.net", "db07.example.net"}),
    ("web:staging", {"web-a.example.net", "web-b.example.net", "web-c.example.net", "stage1",
                     "db02.example.net"}),
    ("web,stage1", {"web-a.example.net", "web-b.example.net", "web-c.example.net", "stage1"}),
    ("db:&staging", {"db02.example.net"}),
    ("prod:!db", {"web-a.example.net", "web-b.example.net", "web-c.example.net"}),
    ("!prod", {"bastion.example.net", "stage1"}),
    ("db0[12]*", {"db01.example.net", "db02.example.net"}),
    ("web-?.example.net:!web-b*", {"web-a.example.net", "web-c.example.net"}),
    ("~^db0[37]", {"db03.example.net", "db07.example.net"}),
    ("stag*", {"stage1", "db02.example.net"}),          # a glob over group names too
    ("stage1", {"stage1"}),
])
def test_limit_patterns(fleet: Inventory, pattern: str, expected: set[str]) -> None:
    """Ansible's host patterns: union, intersection, exclusion, globs, regex."""
    assert select_hosts(fleet, pattern) == expected
    assert {h.name for h in fleet.limit(pattern).hosts} == expected


def test_limit_keeps_order_and_all(fleet: Inventory) -> None:
    """--limit keeps inventory order; 'all' and None select everything."""
    assert [h.name for h in fleet.limit("db01.example.net:stage1").hosts] == ["stage1", "db01.example.net"]
    assert fleet.limit("all") is fleet and fleet.limit(None) is fleet


def test_limit_matching_nothing_names_groups(fleet: Inventory) -> None:
    """A pattern that matches nothing is an error that lists what exists."""
    with pytest.raises(InventoryError) as ei:
        fleet.limit("dbx*")
    text = str(ei.value)
    assert str(DATA / "fleet.yml") in text and "matches no host" in text and "staging" in text


@pytest.mark.parametrize("spec,expected", [
    ("db1,", [("db1", "db1", None, None)]),
    ("db1,root@db2:2222", [("db1", "db1", None, None), ("db2:2222", "db2", 2222, "root")]),
    ("[::1]:2200,admin@[fe80::1]", [("::1:2200", "::1", 2200, None), ("fe80::1", "fe80::1", None, "admin")]),
    ("web1,", [("web1", "web1", None, None)]),
    ("a@b@c,", [("c", "c", None, "a@b")]),
])
def test_adhoc_forms(spec: str, expected: list[tuple[str, str, int | None, str | None]]) -> None:
    """-i host1,user@host2:2222,[v6]:port and a trailing comma for one host."""
    inv = load_inventory(spec)
    assert [(h.name, h.address, h.port, h.user) for h in inv.hosts] == expected
    assert inv.groups == {"all": tuple(h.name for h in inv.hosts), "ungrouped": tuple(h.name for h in inv.hosts)}


@pytest.mark.parametrize("spec,message", [
    ("db1:70000", "bad port '70000'"),
    ("db1:ssh", "bad port 'ssh'"),
    (",", "no hosts given"),
    ("db1,db1", "listed twice"),
    ("root@", "empty host name"),
])
def test_adhoc_errors(spec: str, message: str) -> None:
    """Bad -i lists say what is wrong."""
    with pytest.raises(InventoryError, match=message) as ei:
        parse_adhoc(spec)
    assert str(ei.value).startswith("-i: ")


@pytest.mark.parametrize("name,message", [
    ("bad-yaml.yml", "not valid YAML"),
    ("unknown-key.yml", "group 'web' has unknown key(s) ['host']"),
    ("self-loop.yml", "group 'a' contains itself"),
    ("bad-port.yml", "bad port 'seventy'"),
    ("empty.yml", "inventory is empty"),
])
def test_inventory_file_errors_name_the_file(name: str, message: str) -> None:
    """Every inventory error starts with the file (and line where YAML says)."""
    path = DATA / name
    with pytest.raises(InventoryError) as ei:
        load_inventory(str(path))
    text = str(ei.value)
    assert text.startswith(str(path)), text
    assert message in text, text


def test_yaml_error_has_line() -> None:
    """A YAML syntax error points at its line."""
    with pytest.raises(InventoryError) as ei:
        load_inventory(str(DATA / "bad-yaml.yml"))
    assert ei.value.where == f"{DATA / 'bad-yaml.yml'}:5"


@pytest.mark.parametrize("spec", ["inventories/prod.yml", "invntory", "db1"])
def test_missing_file(spec: str) -> None:
    """Without a comma -i is a path, as for Ansible: a typo is an error, never a host name."""
    with pytest.raises(InventoryError, match="inventory source not found") as ei:
        load_inventory(spec)
    assert f"-i {spec}," in str(ei.value)


@pytest.mark.parametrize("pattern,names", [
    ("web[01:03]", ["web01", "web02", "web03"]),
    ("web[8:10]", ["web8", "web9", "web10"]),
    ("r[a:b]n[1:2]", ["ran1", "ran2", "rbn1", "rbn2"]),
    ("plain", ["plain"]),
])
def test_expand_host_pattern(pattern: str, names: list[str]) -> None:
    """Numeric (padding kept), alphabetic and nested ranges."""
    assert expand_host_pattern(pattern) == names
