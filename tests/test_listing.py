"""``fleetprobe list --playbooks``: every shipped playbook with the question its header says it answers."""

from __future__ import annotations

from pathlib import Path

from fleetprobe.cli.main import main
from fleetprobe.cli.playbooks import question_of, shipped_entries
from fleetprobe.render.safe import SafeConsole

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "playbooks").glob("*.yml"))


def test_every_shipped_playbook_states_its_question() -> None:
    for path in SHIPPED:
        q = question_of(path.read_text())
        assert q is not None and q.endswith("?") and "\n" not in q, (path.name, q)


def test_question_is_taken_from_the_answers_paragraph_only() -> None:
    text = ('# x: "not this?"\n#\n# Answers: "who opens\n# what?" and more.\n#\n# Kernels: "nor this?"\n'
            'name: x\n# "after the header?"\n')
    assert question_of(text) == "who opens what?"
    assert question_of("# x\n#\n# Kernels: all\nname: x\n") is None


def test_list_playbooks_prints_each_with_its_question_and_rules() -> None:
    console = SafeConsole(record=True, width=400)
    assert main(["list", "--playbooks"], console=console) == 0
    out = console.export_text()
    entries = shipped_entries()
    assert {e.name for e in entries} == {p.stem for p in SHIPPED}
    lines = out.splitlines()
    for e in entries:
        row = next(line for line in lines if line.strip("│ ").startswith(e.name + " "))
        assert e.question in row, (e.name, row)
        for rule in e.rules:
            assert rule in row, (e.name, rule, row)
    assert "sys_module: expect none" in out and "reset_sent: max 1000/host" in out
