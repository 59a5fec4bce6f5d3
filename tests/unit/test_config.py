"""Every bad config is an error naming the file, the key and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from switcher import config
from switcher.errors import ConfigError

GOOD = """\
app = "alive"
state_dir = "/var/lib/alive-switch"
router_exec = "/usr/local/bin/alive-switch-router"

[env.production]
listen = 9000
ports = { blue = 9001, green = 9002 }
builds = "/srv/alive/builds/production"
exec = "/usr/bin/node server.js"

[env.production.health]
path = "/api/health"

[env.staging]
listen = 8998
ports = { blue = 8996, green = 8997 }
builds = "/srv/alive/builds/staging"
exec = "/usr/bin/node server.js"

[env.staging.health]
path = "/api/health"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "alive-switch.toml"
    path.write_text(text)
    return str(path)


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.path == path
    assert path in str(caught.value)
    assert caught.value.hint, "every config error says what to do next"
    return caught.value


def test_good_config_has_the_documented_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    env = cfg.environment("production")
    assert (env.host, env.drain, env.watch, env.standby) == ("127.0.0.1", 10, 10, 600)
    assert (env.health.timeout, env.health.interval, env.health.expect_status) == (60, 0.5, "2xx")
    assert (env.unit.start_timeout, env.unit.stop_timeout, env.unit.restart_sec) == (60, 30, 10)
    assert (env.unit.start_limit_burst, env.unit.start_limit_interval) == (3, 300)
    assert (env.router.mode, env.router.backlog, env.router.max_connections) == (
        "http", 4096, 10000)
    assert (env.checks.disk_max_percent, env.checks.memory_min_mb) == (80, 500)
    assert env.hook_timeout == 300
    assert env.unit.hardening == "default"
    assert (env.analysis.max_error_rate, env.analysis.min_requests, env.analysis.baseline,
            env.analysis.max_latency_ratio) == (0.02, 50, 60, 0)
    assert env.router.metrics == ""
    assert (env.router.pool_size, env.router.pool_idle) == (64, 2)


def test_example_config_loads() -> None:
    cfg = config.load(str(Path(__file__).parents[2] / "examples/alive-switch.toml"),
                      check_owner=False)
    assert set(cfg.env) == {"production", "staging"}
    assert cfg.environment("production").listen_port == 9000


@pytest.mark.parametrize(("text", "key", "words"), [
    ("app = [", "", "not valid TOML"),
    (GOOD + "\n[env.production.unit]\nstart_timout = 5\n",
     "env.production.unit.start_timout", "did you mean 'start_timeout'"),
    (GOOD.replace('app = "alive"', 'ap = "alive"'), "ap", "did you mean 'app'"),
    (GOOD.replace('app = "alive"\n', ""), "app", "missing required key"),
    (GOOD.replace('exec = "/usr/bin/node server.js"\n', "", 1), "env.production.exec",
     "missing required key"),
    (GOOD.replace("[env.production.health]\npath", "[env.production.health]\ntimeout = 3\n#"),
     "env.production.health.path", "missing required key"),
    (GOOD.replace("listen = 9000", "listen = 70000"), "env.production.listen", "1–65535"),
    (GOOD.replace("blue = 9001", "blue = 0"), "env.production.ports.blue", "1–65535"),
    (GOOD.replace("blue = 9001", "blue = 9002"), "env.production.ports", "share port"),
    (GOOD.replace("blue = 9001", "blue = 9000"), "env.production.ports", "public port"),
    (GOOD.replace("blue = 8996", "blue = 9001"), "env.staging.ports.blue", "also used"),
    (GOOD.replace('app = "alive"', 'app = "al ive"'), "app", "unit-name part"),
    (GOOD.replace('app = "alive"', 'app = "al@ive"'), "app", "unit-name part"),
    (GOOD.replace("[env.staging]", '[env."st/g"]').replace("[env.staging.health]",
                                                           '[env."st/g".health]'),
     "env.st/g", "unit-name part"),
    (GOOD.replace('builds = "/srv/alive/builds/production"', 'builds = "builds"'),
     "env.production.builds", "not an absolute path"),
    (GOOD.replace('state_dir = "/var/lib/alive-switch"', 'state_dir = "var"'), "state_dir",
     "not an absolute path"),
    (GOOD.replace('router_exec = "/usr/local/bin/alive-switch-router"',
                  'router_exec = "alive-switch-router"'), "router_exec", "not an absolute path"),
    (GOOD.replace('exec = "/usr/bin/node server.js"', 'exec = ""', 1), "env.production.exec",
     "empty command"),
    (GOOD.replace('exec = "/usr/bin/node server.js"', 'exec = "node server.js"', 1),
     "env.production.exec", "not an absolute path"),
    (GOOD.replace('exec = "/usr/bin/node server.js"', 'exec = "-/usr/bin/node"', 1),
     "env.production.exec", "systemd prefix"),
    (GOOD.replace('exec = "/usr/bin/node server.js"', 'exec = "+/usr/bin/node"', 1),
     "env.production.exec", "systemd prefix"),
    (GOOD.replace('exec = "/usr/bin/node server.js"', 'exec = "@/usr/bin/node x"', 1),
     "env.production.exec", "systemd prefix"),
    (GOOD.replace('exec = "/usr/bin/node server.js"', 'exec = "/usr/bin/node \\\\"', 1),
     "env.production.exec", "backslash"),
    (GOOD.replace('exec = "/usr/bin/node server.js"',
                  'exec = "/usr/bin/node\\nExecStartPre=/bin/evil"', 1),
     "env.production.exec", "newline"),
    (GOOD.replace('path = "/api/health"', 'path = "api/health"', 1),
     "env.production.health.path", "does not start with '/'"),
    (GOOD.replace('path = "/api/health"', 'path = "/api/health"\ntimeout = 0', 1),
     "env.production.health.timeout", "greater than 0"),
    (GOOD.replace("listen = 9000", "listen = 9000\nwatch = -1"), "env.production.watch",
     "greater than 0"),
    (GOOD.replace("listen = 9000", "listen = 9000\nstandby = -5"), "env.production.standby",
     "negative"),
    (GOOD.replace("listen = 9000", 'listen = 9000\nenvironment = { A = "x\\ny" }'),
     "env.production.environment.A", "newline"),
    (GOOD.replace("listen = 9000", 'listen = "localhost:9000"'), "env.production.listen",
     "ADDR:PORT"),
    (GOOD.replace("listen = 9000", 'listen = 9000\ndrain = "ten"'), "env.production.drain",
     "expected number"),
    (GOOD + '\n[env.production.router]\nmode = "htp"\n', "env.production.router.mode",
     "did you mean 'http'"),
    (GOOD + "\n[env.production.router]\nprocesses = 2\n", "env.production.router.processes",
     "not supported yet"),
    *((GOOD + f"\n[env.production.analysis]\n{line}\n", f"env.production.analysis.{key}", words)
      for line, key, words in [
          ("max_error_rate = 1.5", "max_error_rate", "outside 0–1"),
          ("max_error_rate = -0.01", "max_error_rate", "outside 0–1"),
          ("max_error_rate = nan", "max_error_rate", "outside 0–1"),
          ("min_requests = 0", "min_requests", "below 1"),
          ("min_requests = -5", "min_requests", "below 1"),
          ("min_requests = 50.5", "min_requests", "expected int"),
          ("baseline = 0", "baseline", "the router keeps the last 300 s"),
          ("baseline = 301", "baseline", "outside (0, 300]"),
          ("max_latency_ratio = -1", "max_latency_ratio", "negative"),
          ("max_eror_rate = 0.1", "max_eror_rate", "did you mean 'max_error_rate'"),
      ]),
    *((GOOD + f'\n[env.production.router]\nmetrics = "{value}"\n', "env.production.router.metrics",
       words) for value, words in [
          ("9100", "not ADDR:PORT"),
          ("localhost:9100", "not ADDR:PORT"),
          ("127.0.0.1:", "not ADDR:PORT"),
          ("999.1.1.1:9100", "not an IP address"),
          ("::1:9100", "not ADDR:PORT"),
          ("[127.0.0.1]:9100", "IPv6 address goes in brackets"),
          ("127.0.0.1:0", "outside 1–65535"),
          ("127.0.0.1:70000", "outside 1–65535"),
          ("127.0.0.1:9000", "also env.production.listen"),
          ("[::1]:9000", "also env.production.listen"),
          ("127.0.0.1:9001", "also env.production.ports.blue"),
          ("0.0.0.0:9002", "also env.production.ports.green"),
          ("[::]:9002", "also env.production.ports.green"),
      ]),
    (GOOD + '\n[env.production.router]\nmetrics = "127.0.0.1:8997"\n',
     "env.staging.ports.green", "also used by env.production.router.metrics"),
    *((GOOD + f"\n[env.production.router]\n{line}\n", f"env.production.router.{key}", words)
      for line, key, words in [
          ("pool_size = -1", "pool_size", "negative"),
          ("pool_size = 8.5", "pool_size", "expected int"),
          ("pool_size = true", "pool_size", "expected int"),
          ("pool_idle = 0", "pool_idle", "must be greater than 0"),
          ("pool_idle = -2", "pool_idle", "must be greater than 0"),
          ("pool_idel = 2", "pool_idel", "did you mean 'pool_idle'"),
      ]),
])
def test_bad_config_is_refused_naming_key_and_fix(tmp_path: Path, text: str, key: str,
                                                  words: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert words in str(error)


def test_metrics_may_share_a_port_number_on_another_address(tmp_path: Path) -> None:
    """Only an overlapping address clashes: the colors bind 127.0.0.1 only."""
    cfg = config.load(write(tmp_path, GOOD + '\n[env.production.router]\n'
                            'metrics = "127.0.0.2:9001"\n'))
    assert cfg.env["production"].router.metrics == "127.0.0.2:9001"
    for good in ("127.0.0.1:9100", "[::1]:9100", "0.0.0.0:9100"):
        text = GOOD + f'\n[env.production.router]\nmetrics = "{good}"\n'
        assert config.load(write(tmp_path, text)).env["production"].router.metrics == good


def test_analysis_edges_are_accepted(tmp_path: Path) -> None:
    text = GOOD + ("\n[env.production.analysis]\nmax_error_rate = 0\nmin_requests = 1\n"
                   "baseline = 300\nmax_latency_ratio = 3\n")
    analysis = config.load(write(tmp_path, text)).env["production"].analysis
    assert (analysis.max_error_rate, analysis.min_requests, analysis.baseline,
            analysis.max_latency_ratio) == (0, 1, 300, 3)


def test_environment_file_must_be_root_owned_0600(tmp_path: Path) -> None:
    secret = tmp_path / "secret.env"
    secret.write_text("TOKEN=x\n")
    secret.chmod(0o644)
    text = GOOD.replace("listen = 9000", f'listen = 9000\nenvironment_file = "{secret}"')
    error = load_error(tmp_path, text)
    assert error.key == "env.production.environment_file"
    assert "0600" in str(error)
    assert f"chmod 600 {secret}" in error.hint
    secret.chmod(0o600)
    assert config.load(write(tmp_path, text)).env["production"].environment_file == str(secret)
    os.chown(secret, 65534, 65534)
    assert "uid 65534" in str(load_error(tmp_path, text))


def test_missing_environment_names_the_configured_ones(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match="production, staging") as caught:
        cfg.environment("prod")
    assert "production" in caught.value.hint


def test_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as caught:
        config.load(str(tmp_path / "nope.toml"))
    assert "ALIVE_SWITCH_CONFIG" in caught.value.hint


def test_group_writable_config_or_directory_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    os.chmod(path, 0o664)
    assert "writable by group or others" in str(load_error(tmp_path, GOOD))
    os.chmod(path, 0o644)
    tmp_path.chmod(0o777)
    try:
        assert "writable by group or others" in str(load_error(tmp_path, GOOD))
    finally:
        tmp_path.chmod(0o755)
    os.chown(path, 65534, 0)
    assert "not root" in str(load_error(tmp_path, GOOD))


def direct(listen: str, host: str = "127.0.0.1") -> str:
    return GOOD.replace("listen = 9000", f"listen = {listen}\nhost = \"{host}\"").replace(
        "[env.production.health]", '[env.production.router]\nmode = "direct"\n\n'
                                   "[env.production.health]")


def test_direct_mode_keeps_no_standby(tmp_path: Path) -> None:
    env = config.load(write(tmp_path, direct("9000"))).environment("production")
    assert (env.mode, env.standby, env.standby_applied) == (config.Mode.direct, 600, 0)
    assert config.load(write(tmp_path, GOOD)).environment("production").standby_applied == 600


@pytest.mark.parametrize(("listen", "host"), [('"10.0.0.1:9000"', "127.0.0.1"),
                                              ('"[::1]:9000"', "127.0.0.1")])
def test_direct_mode_refuses_what_it_could_not_steer(tmp_path: Path, listen: str,
                                                     host: str) -> None:
    error = load_error(tmp_path, direct(listen, host))
    assert error.key == "env.production.router.mode"
    assert "cannot steer" in str(error) and 'mode = "tcp"' in str(error)


@pytest.mark.parametrize("listen", ['"127.0.0.1:9000"', '"0.0.0.0:9000"', "9000"])
def test_direct_mode_accepts_a_public_address_the_colors_accept(tmp_path: Path,
                                                                listen: str) -> None:
    config.load(write(tmp_path, direct(listen)))


@pytest.mark.parametrize("stack", ["node", "gunicorn", "uvicorn"])
def test_the_app_examples_load_in_direct_mode_with_time_to_shut_down(stack: str) -> None:
    example = Path(__file__).parents[2] / f"examples/{stack}/alive-switch.toml"
    env = config.load(str(example), check_owner=False).environment("production")
    assert (env.mode, env.standby_applied) == (config.Mode.direct, 0)
    assert env.unit.stop_timeout == 30 and env.router.backlog == 4096


def test_direct_mode_refuses_canary_steps_naming_the_modes_that_have_them(tmp_path: Path) -> None:
    text = direct("9000") + "\n[env.production.canary]\nsteps = [5, 50]\n"
    error = load_error(tmp_path, text)
    assert error.key == "env.production.canary.steps"
    assert 'mode = "http" or "tcp"' in str(error)
