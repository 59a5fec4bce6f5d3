"""alive_switch.fleet.info: an environment's status on a host, as facts."""

from __future__ import annotations

DOCUMENTATION = r"""
module: info
short_description: alive-switch status of a host as facts
description:
  - Runs C(alive-switch status [ENV] --json) on the host; its object becomes the fact
    C(alive_switch) (schema 1 - C(live), C(live_build), C(colors), C(last), ...).
version_added: "0.1.0"
options:
  env:
    description: The environment (default every environment of the config).
    type: str
  config:
    description: The config file (default the CLI's).
    type: path
  executable:
    description: The C(alive-switch) command (default on C(PATH), then C(/opt/alive-switch/bin)).
    type: path
author: alive-switch maintainers
"""

EXAMPLES = r"""
- name: What production runs
  alive_switch.fleet.info:
    env: production
- ansible.builtin.debug:
    msg: "{{ alive_switch.live_build }} on {{ alive_switch.live }}"
"""

RETURN = r"""
ansible_facts:
  description: C(alive_switch), the status object.
  type: dict
  returned: always
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.alive_switch.fleet.plugins.module_utils.alive_switch_cli import (
    DEFAULT_VENV_BIN,
    INFO_ARGUMENT_SPEC,
    MEANING,
    problems,
    status_argv,
)


def main() -> None:
    module = AnsibleModule(argument_spec=INFO_ARGUMENT_SPEC, supports_check_mode=True)
    wrong = problems(module.params)
    if wrong:
        module.fail_json(msg="; ".join(wrong))
    executable = module.params["executable"] or module.get_bin_path(
        "alive-switch", required=True, opt_dirs=[DEFAULT_VENV_BIN])
    rc, out, err = module.run_command(status_argv(executable, module.params))
    try:
        status = json.loads(out)
    except ValueError:
        status = None
    if rc != 0 or not isinstance(status, dict):
        meaning = MEANING.get(rc, "no JSON on stdout")
        module.fail_json(msg=f"alive-switch status exited {rc} ({meaning}): {err.strip()}", rc=rc)
    module.exit_json(changed=False, ansible_facts={"alive_switch": status})


if __name__ == "__main__":
    main()
