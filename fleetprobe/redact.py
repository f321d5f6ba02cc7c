"""Secrets out of what fleetprobe keeps: inventory text is redacted before it reaches the history store.

An Ansible inventory may hold ``ansible_password``, ``ansible_become_password``,
``ansible_ssh_pass``, key passphrases and vault blobs, in YAML (``key: value``), INI
(``key=value`` on a host line) or JSON (``"key": "value"``). The store keeps the
inventory so a later reader sees what a run ran against; it must never keep those values.
Redaction is by variable name, in every one of those syntaxes, and keeps the line (so a
reader still sees that a password was set, and where).
"""

from __future__ import annotations

import re

#: What a stored secret is replaced with.
REDACTED = "<redacted>"

#: Variable names whose values are secrets: Ansible's own (ansible_password, ansible_ssh_pass,
#: ansible_become_pass/password, ansible_sudo_pass, ansible_ssh_private_key_passphrase) and any
#: name that says password, passwd, passphrase, secret, token or api key.
_SECRET_NAME = r"[\w.-]*(?:pass(?:word|wd|phrase)?|pw|secret|token|api[_-]?key|credential)[\w.-]*"

# key: value / key=value / "key": "value" — the value is a quoted string or the rest of the token.
_ASSIGN = re.compile(
    r"""(?ix)
    (?P<key>["']?\b""" + _SECRET_NAME + r"""\b["']?)
    (?P<sep>\s*[:=]\s*)
    (?P<value>"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|[^\s,}\]\n]+)
    """)
# A YAML value that continues on the following, more indented lines: a secret-named key with a
# block value (``|``, ``>``), or ANY key whose value is an Ansible ``!vault`` blob.
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)(?:-\s+)?(?:[\"']?" + _SECRET_NAME + r"[\"']?\s*:\s*(?:!\S+\s*)?"
                    r"|[^:\n]+:\s*!vault\s*)[|>][-+]?\s*$", re.IGNORECASE)
# ``key: !vault "..."`` on one line.
_INLINE_VAULT = re.compile(r"(?P<key>[^\s:]+\s*:\s*)!vault\s+\S.*$")


def redact_secrets(text: str) -> str:
    """``text`` with the value of every secret-named variable replaced by ``<redacted>``."""
    out: list[str] = []
    block_indent: int | None = None
    for line in text.splitlines(keepends=True):
        if block_indent is not None:
            stripped = line.strip()
            indent = len(line) - len(line.lstrip(" \t"))
            if not stripped or indent > block_indent:
                continue  # a line of the secret's block value: dropped
            block_indent = None
        m = _BLOCK.match(line)
        if m:
            block_indent = len(m.group("indent"))
            key = line.split(":", 1)[0]
            out.append(f"{key}: {REDACTED}\n")
            continue
        line = _INLINE_VAULT.sub(lambda v: f"{v.group('key')}{REDACTED}", line)
        out.append(_ASSIGN.sub(_replace, line))
    return "".join(out)


def _replace(m: re.Match[str]) -> str:
    """One assignment with its value redacted (quotes kept, so JSON and YAML stay valid)."""
    value = m.group("value")
    quoted = value[:1] in "\"'" and len(value) >= 2
    new = f"{value[0]}{REDACTED}{value[0]}" if quoted else REDACTED
    return f"{m.group('key')}{m.group('sep')}{new}"
