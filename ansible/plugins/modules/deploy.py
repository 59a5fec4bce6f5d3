"""alive_switch.fleet.deploy: one health-gated blue/green deploy (or rollback) on a host."""

from __future__ import annotations

DOCUMENTATION = r"""
module: deploy
short_description: Deploy a build (or roll back) with alive-switch on the host
description:
  - Runs C(alive-switch deploy ENV [BUILD] --json) (or C(rollback ENV --json)) on the host and
    reports its outcome. The host's C(alive-switch) does the work (health gate, switch, watch,
    drain, standby). Exit codes 2-6 of the CLI fail the task with its message.
  - Check mode runs C(--dry-run), which prints the plan and changes nothing.
version_added: "0.1.0"
options:
  env:
    description: The environment, as in C([env.NAME]) of the config.
    type: str
    required: true
  build:
    description:
      - A directory name inside the environment's C(builds), or an absolute path to one.
      - Default the newest deployable build.
    type: str
  rollback:
    description: Make the previous live color and build live again (C(alive-switch rollback)).
    type: bool
    default: false
  force:
    description: Deploy even if the build is already live (to the other color).
    type: bool
    default: false
  config:
    description: The config file (default the CLI's, C(/etc/alive-switch/alive-switch.toml)).
    type: path
  executable:
    description:
      - The C(alive-switch) command. Default C(alive-switch) on C(PATH), then in
        C(/opt/alive-switch/bin) (the host role's virtualenv).
    type: path
notes:
  - C(changed) is false when the build was already live.
  - Fails with C(retryable=true) when another command holds the environment's lock (exit 4)
    and with C(switched_back=true) when the new color failed its watch (exit 5).
author: alive-switch maintainers
"""

EXAMPLES = r"""
- name: Deploy build 2026-02-03.2 to production
  alive_switch.fleet.deploy:
    env: production
    build: "2026-02-03.2"

- name: Roll production back to its previous build
  alive_switch.fleet.deploy:
    env: production
    rollback: true
"""

RETURN = r"""
build:
  description: The build the outcome is about (the one now live when it succeeded).
  type: str
  returned: when the CLI reported an outcome
color:
  description: The color the build went to.
  type: str
  returned: when the CLI reported an outcome
phases:
  description: Seconds each phase took (health, switching, watch, ...).
  type: dict
  returned: always
outcome:
  description: The CLI's outcome event, as is.
  type: dict
  returned: always
messages:
  description: The CLI's messages (standby, warnings, what reconcile did).
  type: list
  returned: always
rc:
  description: The CLI's exit code.
  type: int
  returned: always
switched_back:
  description: The new color failed its watch and traffic went back (exit 5).
  type: bool
  returned: always
retryable:
  description: Another command held the lock (exit 4); running again later may succeed.
  type: bool
  returned: always
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.alive_switch.fleet.plugins.module_utils.alive_switch_cli import (
    DEFAULT_VENV_BIN,
    DEPLOY_ARGUMENT_SPEC,
    DEPLOY_MUTUALLY_EXCLUSIVE,
    deploy_argv,
    deploy_result,
    live_of,
    problems,
    status_argv,
)


def live_now(module: AnsibleModule, executable: str) -> dict[str, object]:
    """The live color and build before the deploy (unknown if status fails)."""
    rc, out, _ = module.run_command(status_argv(executable, module.params))
    try:
        return live_of(json.loads(out) if rc == 0 else None)
    except ValueError:
        return live_of(None)


def main() -> None:
    module = AnsibleModule(argument_spec=DEPLOY_ARGUMENT_SPEC,
                           mutually_exclusive=DEPLOY_MUTUALLY_EXCLUSIVE,
                           supports_check_mode=True)
    wrong = problems(module.params)
    if wrong:
        module.fail_json(msg="; ".join(wrong))
    executable = module.params["executable"] or module.get_bin_path(
        "alive-switch", required=True, opt_dirs=[DEFAULT_VENV_BIN])
    before = live_now(module, executable)
    argv = deploy_argv(executable, module.params, check_mode=module.check_mode)
    rc, out, err = module.run_command(argv, environ_update={"LANG": "C.UTF-8"})
    result = deploy_result(rc, out, err, before, module.params)
    if not module._diff:
        result.pop("diff", None)
    if result.get("failed"):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
