"""`alive-switch init`: the config it writes validates, it appends an environment without
touching the rest of a file, and it never overwrites an environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from switcher import config
from switcher.errors import UsageError
from switcher.ops import init

CLI = [sys.executable, "-m", "switcher"]
ROUTER = "/opt/alive-switch/bin/alive-switch-router"


def request(env: str = "production", listen: int | str = 9000, ports: tuple[int, int] = (
        9001, 9002), **settings: str | int | float) -> init.Request:
    return init.Request(env, listen, ports, "/usr/bin/node server.js",
                        f"/srv/alive/builds/{env}", "/api/health", settings)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path / "etc" / "alive-switch.toml"


def test_a_new_file_validates_with_the_given_values_and_the_defaults(path: Path) -> None:
    written = init.write(path, request(), app="shop", router_exec=ROUTER)
    assert written.created and written.app == "shop"
    cfg = config.load(str(path), check_owner=os.geteuid() == 0)
    env = cfg.environment("production")
    assert (cfg.app, cfg.router_exec) == ("shop", ROUTER)
    assert (env.listen, env.ports, env.exec) == (9000, {"blue": 9001, "green": 9002},
                                                 "/usr/bin/node server.js")
    assert (env.builds, env.health.path) == ("/srv/alive/builds/production", "/api/health")
    assert (env.drain, env.watch, env.standby, env.health.timeout) == (10, 10, 600, 60)
    text = path.read_text()
    assert "# standby = 600" in text and "# [env.production.unit]" in text  # commented
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.parent.stat().st_mode & 0o777 == 0o755


def test_settings_and_awkward_strings_survive_the_round_trip(path: Path) -> None:
    req = init.Request("staging", "[::1]:8998", (8996, 8997),
                       '/usr/bin/env "A=b c" /usr/bin/node \'my server.js\'', "/srv/b\\s",
                       "/health?probe=1", {"drain": 1, "watch": 2.5, "standby": 0})
    init.write(path, req, app=None, router_exec=config.Config.router_exec)
    cfg = config.load(str(path), check_owner=False)
    env = cfg.environment("staging")
    assert env.listen == "[::1]:8998"
    assert env.exec == req.exec and env.builds == "/srv/b\\s"
    assert (env.drain, env.watch, env.standby) == (1, 2.5, 0)
    assert cfg.app == init.DEFAULT_APP
    assert cfg.router_exec == config.Config.router_exec
    assert '# router_exec = "/usr/local/bin/alive-switch-router"' in path.read_text()


def test_adds_an_environment_without_touching_the_rest(path: Path) -> None:
    path.parent.mkdir(mode=0o755)
    original = (Path(__file__).parents[2] / "examples/alive-switch.toml").read_text()
    original += "# a comment of the operator's, and no newline at the end"
    path.write_text(original)
    path.chmod(0o640)
    written = init.write(path, request("canary", 7000, (7001, 7002)), app=None,
                         router_exec=ROUTER)
    assert not written.created and written.app == "alive"
    text = path.read_text()
    assert text.startswith(original + "\n")
    assert "router_exec" not in text[len(original):]  # the file's own top is kept
    cfg = config.load(str(path), check_owner=False)
    assert sorted(cfg.env) == ["canary", "production", "staging"]
    assert cfg.environment("canary").ports == {"blue": 7001, "green": 7002}
    assert path.stat().st_mode & 0o777 == 0o640


def test_refuses_to_overwrite_an_environment_and_writes_nothing(path: Path) -> None:
    init.write(path, request(), app=None, router_exec=ROUTER)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="already has an environment 'production'") as err:
        init.write(path, request(listen=8000, ports=(8001, 8002)), app=None,
                   router_exec=ROUTER)
    assert err.value.exit_code == 2
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


@pytest.mark.parametrize(("req", "problem"), [
    (request("dup", 9000, (7001, 7002)), "port 9000 is also used by env.production.listen"),
    (init.Request("x", 7000, (7001, 7002), "node server.js", "/b", "/h"),
     "env.x.exec: 'node' is not an absolute path"),
    (init.Request("x", 7000, (7001, 7002), "/usr/bin/node", "builds", "/h"),
     "env.x.builds: 'builds' is not an absolute path"),
    (init.Request("x", 7000, (7001, 7001), "/usr/bin/node", "/b", "/h"),
     "blue and green share port 7001"),
    (init.Request("x", 7000, (7001, 7002), "/usr/bin/node", "/b", "health"),
     "does not start with '/'"),
])
def test_a_result_that_would_not_validate_is_refused(path: Path, req: init.Request,
                                                     problem: str) -> None:
    init.write(path, request(), app=None, router_exec=ROUTER)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="nothing was written") as err:
        init.write(path, req, app=None, router_exec=ROUTER)
    assert problem in err.value.message
    assert str(path) in err.value.message and ".init-" not in err.value.message
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_another_app_name_is_refused(path: Path) -> None:
    init.write(path, request(), app="shop", router_exec=ROUTER)
    with pytest.raises(UsageError, match="is for app 'shop', not 'alive'"):
        init.write(path, request("staging", 8000, (8001, 8002)), app="alive",
                   router_exec=ROUTER)


def test_the_command_line_writes_then_refuses_with_exit_2(path: Path) -> None:
    argv = [*CLI, "--config", str(path), "init", "production", "--listen", "9000",
            "--ports", "9001,9002", "--exec", "/usr/bin/node server.js", "--builds",
            "/srv/alive/builds/production", "--health", "/api/health"]
    first = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert f"wrote {path}: [env.production] of app 'alive'" in first.stdout
    assert config.load(str(path), check_owner=False).environment("production").listen == 9000
    again = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert again.returncode == 2
    assert "already has an environment 'production'" in again.stderr
    bad_ports = subprocess.run(["9001" if a == "9001,9002" else a for a in argv],
                               capture_output=True, text=True, check=False)
    assert bad_ports.returncode == 2 and "expected two ports" in bad_ports.stderr


def test_parse_ports_and_listen() -> None:
    assert init.parse_ports("9001, 9002") == (9001, 9002)
    assert init.parse_listen("9000") == 9000
    assert init.parse_listen("127.0.0.1:9000") == "127.0.0.1:9000"
    for bad in ("9001", "9001,9002,9003", "a,b", ""):
        with pytest.raises(UsageError):
            init.parse_ports(bad)
