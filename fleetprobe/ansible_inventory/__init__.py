"""Ansible inventory sources, read the way ansible-core reads them.

The built-in reader covers Ansible's static sources: YAML (the ``yaml``
plugin), INI (the ``ini`` plugin, a file named ``hosts`` included),
``ansible-inventory --list`` JSON and the output of executable inventory
scripts (the ``script`` plugin), directories of those (``-i inv/``), and
``group_vars/`` / ``host_vars/`` beside each source (the ``host_group_vars``
plugin: files and directories).  Variables are merged in ansible-core's
order (``VARIABLE_PRECEDENCE``'s default; groups sorted by depth, priority,
name).  What it cannot evaluate, Jinja and ``!vault``, is refused with an
error naming the file and the variable; ``--inventory-reader ansible`` then
asks the installed ansible-core itself (:func:`load_with_ansible`).

The default inventory follows Ansible: ``ANSIBLE_INVENTORY``, else the
``inventory`` of the ansible.cfg Ansible would use, else /etc/ansible/hosts;
``remote_user`` and ``private_key_file`` come from the same places.

One module per job: :mod:`.files` (YAML, text, group_vars/host_vars files), :mod:`.model`
(InventoryData, variable precedence, host patterns), the plugins :mod:`.yamlgroups`, :mod:`.ini` and
:mod:`.scripts`, :mod:`.sources` (which plugin reads a source), :mod:`.config` (ansible.cfg) and
:mod:`.core` (ansible-core's own reading).  The names below are what the rest of fleetprobe uses.
"""

from __future__ import annotations

from .config import AnsibleConfig, ansible_bool, ansible_config, find_ansible_cfg
from .core import AnsibleReading, ansible_python, load_with_ansible
from .files import Unsafe, Vaulted, read_yaml
from .model import InventoryData, expand_host_pattern, split_host_port
from .sources import USED_VARS, add_source, check_evaluable, looks_like_host_list
from .yamlgroups import parse_yaml_groups

__all__ = ["USED_VARS", "AnsibleConfig", "AnsibleReading", "InventoryData", "Unsafe", "Vaulted", "add_source",
           "ansible_bool", "ansible_config", "ansible_python", "check_evaluable", "expand_host_pattern",
           "find_ansible_cfg", "load_with_ansible", "looks_like_host_list", "parse_yaml_groups", "read_yaml",
           "split_host_port"]
