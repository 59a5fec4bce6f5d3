"""An alive-switch environment inside a sandbox: config, builds, the CLI, HTTP probes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from tests.system.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CLI = VENV_BIN / "alive-switch"
ROUTER = VENV_BIN / "alive-switch-router"
APP = ROOT / "examples/app/server.py"
T = TypeVar("T")

ENV_BODY = """\
[env.{env}]
listen = {listen}
ports = {{ blue = {blue}, green = {green} }}
builds = "{builds}"
exec = "{command}"
drain = {drain}
watch = {watch}
standby = {standby}
{extra}
[env.{env}.health]
path = "/api/health"
timeout = {health_timeout}
interval = 0.1
{health_extra}

[env.{env}.unit]
stop_timeout = 5
restart_sec = 1
{unit_extra}
[env.{env}.router]
mode = "{mode}"
restart_drain = 1
"""


@dataclass
class Env:
    """One environment of a test app, configured in ``home`` and run in ``sandbox``."""

    sandbox: Sandbox
    home: Path
    app: str
    env: str
    listen: int
    blue: int
    green: int

    @property
    def config(self) -> Path:
        return self.home / "alive-switch.toml"

    @property
    def builds(self) -> Path:
        return self.home / "builds" / self.env

    @property
    def prefix(self) -> str:
        return f"{self.app}-{self.env}"

    def unit(self, color: str) -> str:
        return f"{self.prefix}@{color}.service"

    def write_config(
        self,
        *,
        drain: float = 1,
        watch: float = 1,
        standby: float = 600,
        health_timeout: float = 5,
        mode: str = "tcp",
        extra: str = "",
        unit_extra: str = "",
        health_extra: str = "",
        listen: str | None = None,
        also: str = "",
        command: str = "",
    ) -> None:
        """Write the config; ``also`` is appended (e.g. another environment's tables);
        ``command`` replaces the sample app as ``exec``."""
        self.builds.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o755)
        body = ENV_BODY.format(
            env=self.env,
            listen=listen or self.listen,
            blue=self.blue,
            green=self.green,
            builds=self.builds,
            command=command or f"{sys.executable} {APP}",
            drain=drain,
            watch=watch,
            standby=standby,
            health_timeout=health_timeout,
            mode=mode,
            extra=extra,
            unit_extra=unit_extra,
            health_extra=health_extra,
        )
        self.config.write_text(
            f'app = "{self.app}"\nrouter_exec = "{ROUTER}"\n\n{body}\n{also}')

    def make_build(self, name: str, **settings: str) -> Path:
        """A build directory; ``settings`` become files the sample app reads (START_DELAY…)."""
        build = self.builds / name
        build.mkdir(parents=True, exist_ok=True)
        for key, value in settings.items():
            (build / key).write_text(value)
        # Newest by mtime, a deterministic order for "the newest build".
        now = time.time()
        os.utime(build, (now, now))
        return build

    def cli(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(
            CLI, "--config", self.config, *args, cwd=self.home, timeout=timeout, env=env
        )

    def ok(self, *args: str, timeout: float = 120) -> str:
        done = self.cli(*args, timeout=timeout)
        assert done.returncode == 0, (
            f"alive-switch {' '.join(args)} → {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    def show(self, unit: str, prop: str) -> str:
        return self.sandbox.systemctl("show", "-P", prop, unit).stdout.strip()

    def status_json(self) -> dict[str, Any]:
        return json.loads(self.ok("status", self.env, "--json"))


def nginx_app(page: str) -> str:
    """A build's start script: nginx on $HOST:$PORT answering "ok" on /api/health and
    ``page`` (the arguments of nginx's ``return``, e.g. "500 broken") on every other path."""
    return r"""#!/bin/sh
dir=/tmp/nginx-$PORT
mkdir -p "$dir"
cat > "$dir/nginx.conf" <<CONF
daemon off; master_process off; pid $dir/pid; error_log stderr;
events { }
http { access_log off; client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  server { listen $HOST:$PORT;
    location = /api/health { return 200 ok; }
    location / { return PAGE; } } }
CONF
exec /usr/sbin/nginx -e stderr -p "$dir/" -c "$dir/nginx.conf"
""".replace("PAGE", page)


STOP_AT_VAR = "ALIVE_SWITCH_TEST_STOP_AT"  # the CLI's fault injection (switcher/deploy.py)


def cli_pid(proc: subprocess.Popen[str]) -> int:
    """The host PID of the alive-switch process nsenter started inside the sandbox."""
    children = wait_for("cli process", lambda: psutil.Process(proc.pid).children())
    return children[0].pid


def stopped(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


def frozen_at(env: Env, phase: str, *args: str, stdout: Any = subprocess.PIPE,
              ) -> tuple[subprocess.Popen[str], int]:
    """Start the CLI with ``args``; return once it has stopped itself entering ``phase``."""
    proc = env.sandbox.popen(
        CLI, "--config", env.config, *args, cwd=env.home,
        env={STOP_AT_VAR: phase}, stdout=stdout, stderr=subprocess.PIPE)
    pid = cli_pid(proc)
    wait_for(f"stopped at {phase}", lambda: stopped(pid), timeout=30)
    return proc, pid


def thaw(proc: subprocess.Popen[str], pid: int) -> None:
    """Let a frozen CLI go on. nsenter stopped itself when its child stopped (job-control
    propagation): wake both, the child first."""
    os.kill(pid, signal.SIGCONT)
    os.kill(proc.pid, signal.SIGCONT)


def kill_frozen(proc: subprocess.Popen[str], pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGCONT)  # so that nsenter sees its child's death and exits
    proc.communicate(timeout=10)


def get(port: int, path: str = "/", timeout: float = 3) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, {"raw": body.decode(errors="replace")}


def build_on(port: int) -> str:
    status, body = get(port)
    assert status == 200, body
    return str(body["build"])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 10, every: float = 0.05
) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (OSError, AssertionError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
