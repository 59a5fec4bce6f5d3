"""pre_switch and post_switch hooks (switcher/hooks.py, through a deploy): timeout, output in
history, the color's environment. tests/system/test_real_hosts.py proves the same against a real
systemd."""

from __future__ import annotations

from pathlib import Path

import pytest

from switcher import state
from switcher.errors import AbortedError
from switcher.model import Color
from tests.unit.opskit import BLUE, deployer

# ---------------------------------------------------------------- hooks

@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_pre_switch_failure_aborts_with_its_output_in_history(tmp_path: Path) -> None:
    d, sd, said = deployer(tmp_path, extra='pre_switch = "/bin/sh -c \'echo migrating $COLOR '
                                             '$PORT $ALIVE_SWITCH_BUILD $FROM_CONFIG; exit 7\'"')
    with pytest.raises(AbortedError, match=r"pre_switch hook failed \(exit 7\)") as caught:
        d.deploy("b1", force=False, dry_run=False)
    assert caught.value.exit_code == 3
    assert sd.units["lc-prod@blue.service"].active == "inactive", "the new color is stopped"
    assert d.load_state().active is None
    record = state.read_history(d.env_dir)[-1]
    assert record["outcome"] == "failed"
    (hook,) = record["hooks"]
    assert (hook["name"], hook["outcome"]) == ("pre_switch", "exit 7")
    assert hook["output"] == [f"migrating blue {BLUE} b1 yes"]
    assert f"    pre_switch: migrating blue {BLUE} b1 yes" in said


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_post_switch_failure_is_a_warning_and_traffic_stays(tmp_path: Path) -> None:
    d, _, said = deployer(tmp_path, extra='post_switch = "/bin/false"')
    outcome = d.deploy("b1", force=False, dry_run=False)
    assert outcome.ok
    assert d.load_state().active == Color.blue
    assert any("post_switch hook failed (exit 1)" in w for w in outcome.warnings)
    assert any(line.startswith("warning: post_switch hook failed") for line in said)
    assert state.read_history(d.env_dir)[-1]["hooks"][0]["outcome"] == "exit 1"


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_hook_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    d, sd, _ = deployer(tmp_path, extra=f'pre_switch = "/bin/sh -c \'echo started; '
                                        f'sleep 30 & echo $! > {pidfile}; wait\'"\n'
                                        'hook_timeout = 0.5')
    with pytest.raises(AbortedError, match=r"timed out after 0.5 s"):
        d.deploy("b1", force=False, dry_run=False)
    hook = state.read_history(d.env_dir)[-1]["hooks"][0]
    assert hook["output"] == ["started"]
    assert hook["seconds"] < 5
    child = int(pidfile.read_text())
    assert not Path(f"/proc/{child}").exists() or \
        Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", "the hook's child was killed"
    assert sd.units["lc-prod@blue.service"].active == "inactive"


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_no_hooks_configured_records_none(tmp_path: Path) -> None:
    d, _, _ = deployer(tmp_path)
    outcome = d.deploy("b1", force=False, dry_run=False)
    assert outcome.hooks == []
    assert state.read_history(d.env_dir)[-1]["hooks"] == []


