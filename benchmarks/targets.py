"""What the load goes through: a backend and the proxies in front of it, as real processes.

    wrk (CLIENT_CPU) ─┬─────────────────────────────────────────────▶ nginx  (SERVER_CPU)
                      ├─▶ alive-switch-router tcp / http ───────────▶   │
                      ├─▶ haproxy tcp / http (nbthread 1) ─────────▶   │
                      └─▶ systemd-socket-proxyd ────────────────────▶   │

Everything listens on 127.0.0.1, on ports from a fixed block below the ephemeral range
(never ``bind(0)``: wrk fills the ephemeral range with TIME_WAIT sockets). The router and
systemd-socket-proxyd get their listening socket the way systemd gives it: this process
binds it and keeps holding it, a launcher ``dup2``s it to fd 3, sets ``LISTEN_FDS=1`` and
``LISTEN_PID`` to its own PID, and execs the proxy. Each process is one PID (nginx runs
without a master process, haproxy in the foreground) and is stopped by that PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from switcher import state as files
from switcher.model import Color, Mode, RouterSettings, State
from tests.launch import LAUNCH
from tests.ports import bindable

PORTS = range(24000, 24101)  # the benchmark's block
CLIENT_CPU, SERVER_CPU = 0, 1
SMALL_PATH, BIG_PATH = "/small", "/1m"
SMALL_BODY = b"alive-switch benchmark: a small response from nginx\n" * 2  # 106 bytes
BIG_SIZE = 1 << 20
VENV_BIN = Path(sys.executable).parent
ROUTER = VENV_BIN / "alive-switch-router"
SOCKET_PROXYD = Path("/lib/systemd/systemd-socket-proxyd")


NGINX_CONF = """\
worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
        location = {small} {{ try_files /small.txt =404; }}
        location = {big} {{ try_files /1m.bin =404; }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 8000
defaults
    mode {mode}
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 127.0.0.1:{port} backlog 4096
    default_backend nginx
backend nginx
    server nginx 127.0.0.1:{backend}
"""


class TargetError(RuntimeError):
    """A target could not be started (the message says which and shows its log)."""


def pick_ports(count: int) -> list[int]:
    """``count`` ports of the block that a listener can bind now."""
    free = [port for port in PORTS if bindable(port)][:count]
    if len(free) < count:
        raise TargetError(f"only {len(free)} of {count} ports free in "
                          f"{PORTS.start}-{PORTS.stop - 1}; something else listens there")
    return free


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """argv run on one CPU (taskset), when the machine has more than one."""
    if (os.cpu_count() or 1) < 2:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


@dataclass
class Target:
    """One thing wrk can be pointed at; ``proc`` is None for the direct connection."""

    name: str       # "direct", "router-tcp", "haproxy-http", ...
    kind: str       # "direct", "router", "haproxy", "socket-proxyd"
    mode: str       # "tcp" or "http": which HAProxy mode it is compared with
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    control: str | None = None  # the router's control socket
    listener: socket.socket | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        """Resident memory of the process and all its children, in bytes (0: none)."""
        if self.proc is None:
            return 0
        try:
            top = psutil.Process(self.proc.pid)
            return sum(p.memory_info().rss for p in [top, *top.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its children so far (0: none)."""
        if self.proc is None:
            return 0.0
        try:
            top = psutil.Process(self.proc.pid)
            return sum(t.user + t.system for t in
                       (p.cpu_times() for p in [top, *top.children(recursive=True)]))
        except psutil.NoSuchProcess:
            return 0.0

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise TargetError(f"{self.name} exited with {self.proc.returncode}; "
                              f"its log:\n{self.log_text()}")

    def log_text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM this target's own PID, SIGKILL it if it lingers, reap it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


class Targets:
    """Starts the targets in ``tmp`` and stops every one of them (by PID) on close()."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Target] = []

    def close(self) -> None:
        for target in reversed(self.started):
            target.stop()

    def _spawn(self, target: Target, argv: list[str], pass_fds: tuple[int, ...] = (),
               env: dict[str, str] | None = None) -> Target:
        target.log = self.tmp / f"{target.name}.log"
        with target.log.open("wb") as log:
            target.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, pass_fds=pass_fds,
                                           env=env, cwd=self.tmp)
        self.started.append(target)
        return target

    # -- the backend ---------------------------------------------------------------------------

    def nginx(self, port: int) -> Target:
        www = self.tmp / "www"
        www.mkdir()
        (www / "small.txt").write_bytes(SMALL_BODY)
        (www / "1m.bin").write_bytes(os.urandom(BIG_SIZE))
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=self.tmp, port=port, small=SMALL_PATH,
                                          big=BIG_PATH))
        argv = ["nginx", "-p", f"{self.tmp}/", "-c", str(conf)]
        checked = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True,
                                 check=False)
        if checked.returncode != 0:
            raise TargetError(f"nginx refused its config {conf}:\n{checked.stderr}")
        return self._spawn(Target("direct", "direct", "direct", port), pinned(SERVER_CPU, argv))

    def big_sha256(self) -> str:
        return hashlib.sha256((self.tmp / "www" / "1m.bin").read_bytes()).hexdigest()

    # -- the proxies ---------------------------------------------------------------------------

    def haproxy(self, mode: str, port: int, backend: int) -> Target:
        conf = self.tmp / f"haproxy-{mode}.cfg"
        conf.write_text(HAPROXY_CONF.format(mode=mode, port=port, backend=backend))
        argv = ["haproxy", "-db", "-f", str(conf)]
        checked = subprocess.run([*argv, "-c", "-q"], capture_output=True, text=True,
                                 check=False)
        if checked.returncode != 0:
            raise TargetError(f"haproxy refused its config {conf}:\n{checked.stderr}")
        return self._spawn(Target(f"haproxy-{mode}", "haproxy", mode, port),
                           pinned(SERVER_CPU, argv))

    def router(self, mode: Mode, port: int, blue: int, green: int,
               baseline: Path | None = None) -> Target:
        """The router in ``mode`` serving blue (the backend); green is the switch target.

        ``baseline``: run the ``switcher`` package found there instead (an older revision,
        to compare with in the same run)."""
        suffix = "@baseline" if baseline else ""
        env_dir = self.tmp / "state" / f"bench-{mode.value}{suffix.replace('@', '-')}"
        env_dir.mkdir(parents=True)
        control = str(env_dir.parent.parent / "run" / env_dir.name / "control.sock")
        files.save_router_settings(env_dir, RouterSettings(
            app="bench", env=mode.value, mode=mode,
            colors={Color.blue: ("127.0.0.1", blue), Color.green: ("127.0.0.1", green)},
            control_socket=control))
        files.save_state(env_dir, State(active=Color.blue,
                                        builds={Color.blue: "nginx", Color.green: "stamp"}))
        target = Target(f"router-{mode.value}{suffix}", "router", mode.value, port,
                        control=control)
        return self._activated(target, [str(ROUTER), str(env_dir)],
                               {"PYTHONPATH": str(baseline)} if baseline else {})

    def socket_proxyd(self, port: int, backend: int) -> Target:
        target = Target("socket-proxyd", "socket-proxyd", "tcp", port)
        return self._activated(target, [str(SOCKET_PROXYD), f"127.0.0.1:{backend}"])

    def _activated(self, target: Target, argv: list[str],
                   extra_env: dict[str, str] | None = None) -> Target:
        """Run argv with its listening socket passed as systemd passes it."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", target.port))
        listener.listen(4096)
        target.listener = listener
        fd = listener.fileno()
        launch = [sys.executable, "-c", LAUNCH, str(fd), *argv]
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "PYTHONPATH")} | (extra_env or {})
        return self._spawn(target, pinned(SERVER_CPU, launch), pass_fds=(fd,), env=env)


# -- readiness and a checksum ------------------------------------------------------------------

def get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(target: Target, timeout: float = 15) -> None:
    """Until ``target`` answers the small path with 200 (and, for the router, its control
    socket exists)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        target.check_alive()
        try:
            status, body = get(target.port, SMALL_PATH, timeout=2)
            if status == 200 and body == SMALL_BODY and (
                    target.control is None or Path(target.control).exists()):
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TargetError(f"{target.name} on port {target.port} did not answer within "
                      f"{timeout:g} s (last: {last!r}); its log:\n{target.log_text()}")


def big_sha256_via(target: Target) -> str:
    status, body = get(target.port, BIG_PATH, timeout=30)
    if status != 200:
        return f"HTTP {status}"
    return hashlib.sha256(body).hexdigest()


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError as e:
            return f"unavailable: {e}"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (
            done.stdout or done.stderr).strip() else "?"

    return {
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "systemd": first_line([str(SOCKET_PROXYD), "--version"]),
        "python": sys.version.split()[0],
    }


def which_missing() -> list[str]:
    tools = ["nginx", "haproxy", "wrk", "taskset", str(SOCKET_PROXYD), str(ROUTER)]
    return [tool for tool in tools if shutil.which(tool) is None]
