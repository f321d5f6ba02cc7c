"""The ssh command line Ansible would run: ansible_ssh_args/common/extra words as ssh's getopt reads them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..inventory import Host
from .configfile import option_words
from .model import SSHConfigError


# --- the command line Ansible would run --------------------------------------------------------

#: ssh flags that change nothing fleetprobe does (no argument).
_FLAGS_IGNORED = set("qvCTtnxaAkKXYMNg")
#: ssh flags with an argument that change nothing fleetprobe does.
_ARGS_IGNORED = set("EeSP")


@dataclass
class CommandLine:
    options: list[tuple[str, list[str]]] = field(default_factory=list)   # (-o key, args) in order
    config_file: str | None = None


def parse_ssh_args(host: Host, words: tuple[str, ...],
                   setting: str = "ansible_ssh_common_args/ansible_ssh_extra_args") -> CommandLine:
    """``ansible_ssh_common_args`` + ``ansible_ssh_extra_args`` words as ssh's getopt reads them."""
    cl = CommandLine()
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith("-") or w == "-":
            raise SSHConfigError(host.name, f"{setting}: {w!r} is not an ssh option",
                                 hint="only options (-o, -F, -J, -p, -l, -i ...) belong there")
        j = 1
        while j < len(w):
            flag = w[j]
            if flag in _FLAGS_IGNORED:
                j += 1
                continue
            if flag in "oFJpli" or flag in _ARGS_IGNORED or flag in "cmLRDWwbBIOQEs":
                arg = w[j + 1:]
                if not arg:
                    i += 1
                    if i >= len(words):
                        raise SSHConfigError(host.name, f"{setting}: -{flag} needs an argument")
                    arg = words[i]
                _option(cl, host, setting, flag, arg)
                break
            raise SSHConfigError(host.name, f"{setting}: ssh -{flag} is not supported by fleetprobe")
        i += 1
    return cl


#: Flags whose argument is kept as a command-line option, and the option key it becomes.
_KEPT = {"p": "-p", "l": "-l", "i": "-i", "c": "ciphers", "m": "macs"}


def _option(cl: CommandLine, host: Host, setting: str, flag: str, arg: str) -> None:
    """Apply one ssh flag that takes an argument (``-o``, ``-F``, ``-J`` ...) to ``cl``."""
    if flag == "o":
        kw = option_words(arg, setting, host.name)
        cl.options.append((kw[0].lower(), kw[1:]))
    elif flag == "F":
        cl.config_file = arg
    elif flag == "J":
        if any(k in ("proxyjump", "proxycommand", "-J") for k, _ in cl.options):
            raise SSHConfigError(host.name, f"{setting}: -J given with another ProxyJump/ProxyCommand",
                                 hint="ssh refuses that too: give one proxy")
        cl.options.append(("-J", [arg]))
    elif flag in _KEPT:
        cl.options.append((_KEPT[flag], [arg]))
    elif flag not in _ARGS_IGNORED:
        raise SSHConfigError(host.name, f"{setting}: ssh -{flag} is not supported by fleetprobe",
                             hint="fleetprobe opens one plain SSH session per host")
