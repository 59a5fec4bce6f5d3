"""install's reports and refusals (switcher/ops/install.py). tests/system/test_real_hosts.py proves
the same against a real systemd."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest

from switcher import host
from switcher.errors import UsageError
from switcher.model import Color
from switcher.ops import checks, install
from tests.fakes import FakeSystemd
from tests.ports import port_block
from tests.unit.opskit import LISTEN, ShowFake, write_config

# ---------------------------------------------------------------- install reports

def test_install_says_what_changed_and_when_it_takes_effect(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    unit_dir, sd = tmp_path / "units", ShowFake({"lc-prod.socket": {"Listen":
                                                                    f"[::]:{LISTEN} (Stream)"}})
    said: list[str] = []
    install.install(cfg, cfg.env["prod"], sd, unit_dir, rebind=False, dry_run=False,
                    say=said.append)
    assert f"wrote {unit_dir}/lc-prod@.service (new)" in said
    sd.start("lc-prod@blue.service")
    cfg = write_config(tmp_path, extra='user = "nobody"')
    said.clear()
    install.install(cfg, cfg.env["prod"], sd, unit_dir, rebind=False, dry_run=False,
                    say=said.append)
    assert said[0] == f"changed: lc-prod@.service (wrote {unit_dir}/lc-prod@.service)"
    assert "takes effect on the next start of a color" in said[1]
    assert "lc-prod@blue.service" in said[1]


def test_install_refuses_while_another_process_holds_the_port(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    with socket.create_server(("127.0.0.1", LISTEN)):
        holders = host.port_holders(LISTEN)
        assert [h.pid for h in holders] == [os.getpid()]
        with pytest.raises(UsageError, match="EADDRINUSE") as caught:
            install.install(cfg, cfg.env["prod"], FakeSystemd(), tmp_path / "units",
                            rebind=False, dry_run=False, say=print)
        assert "--takeover" in caught.value.hint
    assert not (tmp_path / "units").exists(), "nothing was written"




def test_every_router_setting_of_the_config_reaches_the_router(tmp_path: Path) -> None:
    """Each [env.*.router] key that the router reads goes into router.json: a key that
    stopped here would be accepted by the config and silently ignored."""
    cfg = write_config(tmp_path, also='''
[env.prod.router]
mode = "http"
backlog = 77
max_connections = 7
restart_drain = 2.5
header_timeout = 3
idle_timeout = 4
max_header_bytes = 9000
trusted_proxies = ["10.0.0.1"]
body_timeout = 5
response_timeout = 6
tunnels = ["websocket", "connect"]
metrics = "127.0.0.1:9100"
pool_size = 9
pool_idle = 1.5
''')
    env = cfg.env["prod"]
    settings = install.router_settings(cfg, env)
    given = {"backlog": 77, "max_connections": 7, "restart_drain": 2.5, "header_timeout": 3,
             "idle_timeout": 4, "max_header_bytes": 9000, "trusted_proxies": ("10.0.0.1",),
             "body_timeout": 5, "response_timeout": 6, "tunnels": ("websocket", "connect"),
             "metrics": "127.0.0.1:9100", "pool_size": 9, "pool_idle": 1.5}
    assert {key: getattr(settings, key) for key in given} == given
    declared = {f.name for f in dataclasses.fields(type(env.router))}
    assert declared - {"mode", "processes"} <= {f.name for f in dataclasses.fields(settings)}


# ---------------------------------------------------------------- the metrics listener

(METRICS,) = port_block(__name__, 1)
METRICS_CONFIG = f'[env.prod.router]\nmetrics = "127.0.0.1:{METRICS}"\n'


def test_install_refuses_a_metrics_address_another_process_holds(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, also=METRICS_CONFIG)
    with socket.create_server(("127.0.0.1", METRICS)):
        with pytest.raises(UsageError, match=f"router.metrics '127.0.0.1:{METRICS}' cannot "
                           f"be listened on: held by PID {os.getpid()}") as caught:
            install.install(cfg, cfg.env["prod"], FakeSystemd(), tmp_path / "units",
                            rebind=False, dry_run=True, say=print)
        assert "pick another address" in caught.value.hint
        subject = checks.Subject(cfg.app, cfg.env["prod"], FakeSystemd(), Color.blue, None,
                                 tmp_path)
        check = checks.metrics_free(subject)
        assert check.level is checks.Level.warning, "it never blocks a deploy"
        assert f"held by PID {os.getpid()}" in check.detail
    assert not (tmp_path / "units").exists(), "nothing was written"


def test_install_accepts_the_metrics_address_its_own_router_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path, also=METRICS_CONFIG)
    own = host.Holder(os.getpid(), "lc-prod.service", "alive-switch-router")
    monkeypatch.setattr(host, "port_holders", lambda port: [own] if port == METRICS else [])
    with socket.create_server(("127.0.0.1", METRICS)):
        install.install(cfg, cfg.env["prod"], FakeSystemd(), tmp_path / "units",
                        rebind=False, dry_run=False, say=print)
    assert (tmp_path / "units" / "lc-prod.service").exists()


def test_a_holder_on_another_address_is_no_conflict(tmp_path: Path) -> None:
    """Only an overlapping address is in the way: the check binds, it does not count ports."""
    cfg = write_config(tmp_path, also=METRICS_CONFIG)
    with socket.create_server(("127.0.0.2", METRICS)):
        assert host.port_holders(METRICS), "the port number is taken on 127.0.0.2"
        install.install(cfg, cfg.env["prod"], FakeSystemd(), tmp_path / "units",
                        rebind=False, dry_run=True, say=print)
    subject = checks.Subject(cfg.app, cfg.env["prod"], FakeSystemd(), Color.blue, None,
                             tmp_path)
    assert checks.metrics_free(subject).level is checks.Level.ok
