"""Pure and near-pure pieces of issue 8 against fakes: deploy hooks (timeout, output in
history, the color's environment), build pruning, the takeover plan and its undo, uninstall
and logs. tests/system/test_real_hosts.py proves the same against a real systemd."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from switcher import checks, config, state
from switcher.deploy import Deployer
from switcher.errors import AbortedError
from switcher.model import Color
from switcher.routerctl import FakeRouter
from switcher.systemd import FakeSystemd
from tests.ports import port_block

LISTEN, BLUE, GREEN = port_block(__name__, 3)


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def health_servers() -> Iterator[None]:
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", p), Healthy) for p in (BLUE, GREEN)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def no_host_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket and port checks read the real host; the health servers hold the ports."""
    monkeypatch.setattr(checks, "CHECKS", [c for c in checks.CHECKS
                                           if c not in (checks.socket_held,
                                                        checks.idle_port_free)])


def write_config(tmp_path: Path, extra: str = "") -> config.Config:
    builds = tmp_path / "builds"
    for name in ("b1", "b2"):
        (builds / name).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "c.toml"
    path.write_text(f"""
app = "lc"
state_dir = "{tmp_path / 'state'}"
[env.prod]
listen = {LISTEN}
ports = {{ blue = {BLUE}, green = {GREEN} }}
builds = "{builds}"
exec = "/usr/bin/python3 server.py"
environment = {{ FROM_CONFIG = "yes" }}
drain = 0.1
watch = 0.1
standby = 30
{extra}
[env.prod.health]
path = "/h"
timeout = 1
interval = 0.05
""")
    return config.load(str(path))


def deployer(tmp_path: Path, extra: str = "") -> tuple[Deployer, FakeSystemd, list[str]]:
    cfg = write_config(tmp_path, extra)
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True)
    sd, said = FakeSystemd(), []
    return (Deployer(cfg, env, sd, FakeRouter(), say=said.append, run_dir=tmp_path / "run"),
            sd, said)


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
