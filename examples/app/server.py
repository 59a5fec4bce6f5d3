"""A tiny HTTP app to deploy with alive-switch: the sample app and the system tests' app.

Standard library only (Python 3.11+). Run it from a build directory, the way a color unit
does (``WorkingDirectory=`` is the build, ``ExecStart=`` the command)::

    cd /srv/alive/builds/production/b1 && HOST=127.0.0.1 PORT=9001 python3 /path/to/server.py

Settings: each is read from the environment variable or, failing that, from a file of the
same name in the working directory, so that two builds run by the same unit can behave
differently (a test makes a "bad build" by dropping a file into it)::

    HOST, PORT      where to listen (required; a HOST with ":" is IPv6, brackets allowed)
    LISTEN_PORT     listen here instead of PORT (a build that "listens elsewhere")
    BUILD           build identity (default: the working directory's basename)
    COLOR           reported as is (the color units set it)
    HEALTH_PATH     default /api/health
    HEALTH_STATUS   status code the health path answers (default 200)
    START_DELAY     seconds to wait before binding (a slow or hanging start)
    START_EXIT      exit at once with this code instead of serving (a build that fails)
    CRASH_AFTER     exit 1 this many seconds after it started serving (a build that crashes)
    HEALTH_DELAY    seconds the health path takes to answer (a health check that times out)
    UNHEALTHY_AFTER the health path answers 500 from this many seconds after serving began
    PAGE_DELAY      seconds every other GET takes to start its answer (a slow build; a large
                    value: a build that never answers its pages, released when it stops)
    DEAF_AFTER      close the listening socket this many seconds after serving began, and
                    stay up (a build that stops listening)
    IGNORE_SIGTERM  "1": ignore SIGTERM (a build systemd must SIGKILL at stop_timeout)
    ACCESS_LOG      "1": log every request to stderr (off: it floods the journal under load)

Endpoints (every response has Content-Length, so HTTP/1.1 keep-alive works)::

    GET /, GET <HEALTH_PATH>     {"build": ..., "color": ..., "pid": ..., "port": ...}
    GET /slow?seconds=N&bytes=M  M bytes ("x") sent evenly over N seconds
    POST /echo                   {"sha256": <hex digest of the body>, "bytes": <length>}
                                 (Content-Length or Transfer-Encoding: chunked)
    GET /upgrade + Upgrade: X    101 Switching Protocols, then a raw echo: each read comes
                                 back prefixed with "<build>: ", until EOF
    GET /env                     the process environment as a JSON object
    GET /argv                    sys.argv as a JSON array

Non-UTF-8 bytes in /env and /argv come out as lone surrogates ("\\udcXX", Python's
surrogateescape), so ``s.encode("utf-8", "surrogateescape")`` on the client gives the
exact bytes back.

Lifecycle: startup (START_DELAY, bind, listen) -> serve -> on SIGTERM or SIGINT: stop
accepting, close idle keep-alive connections, let in-flight requests finish (answering
``Connection: close``), exit 0. Exit codes: 0 stopped, 1 could not listen or crashed on
purpose (CRASH_AFTER), 2 bad settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
SLOW_MAX_SECONDS = 3600.0
SLOW_MAX_BYTES = 1 << 30
ECHO_CHUNK = 1 << 16
IDLE_TIMEOUT = 120.0  # seconds a keep-alive connection may sit idle
ACCEPT_POLL = 0.1  # seconds the accept loop may take to notice a stop


class SettingsError(Exception):
    """A setting is missing or malformed; the message names it."""


def setting(name: str, default: str | None = None) -> str | None:
    """The environment variable ``name``, else the file ``name`` in the cwd, else default."""
    if name in os.environ:
        return os.environ[name]
    try:
        return Path(name).read_text().strip()
    except FileNotFoundError:
        return default


def number(name: str, default: float | None = None) -> float | None:
    raw = setting(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    build: str
    color: str
    health_path: str
    health_status: int
    start_delay: float
    start_exit: int | None
    crash_after: float | None
    health_delay: float
    unhealthy_after: float | None
    access_log: bool
    page_delay: float
    deaf_after: float | None

    @classmethod
    def load(cls) -> Settings:
        host = setting("HOST")
        port = number("LISTEN_PORT") or number("PORT")
        if not host or port is None:
            raise SettingsError("HOST and PORT must be set (e.g. HOST=127.0.0.1 PORT=9001)")
        start_exit = number("START_EXIT")
        return cls(
            host=host.removeprefix("[").removesuffix("]"),
            port=int(port),
            build=setting("BUILD") or Path.cwd().name,
            color=setting("COLOR", "") or "",
            health_path=setting("HEALTH_PATH", "/api/health") or "/api/health",
            health_status=int(number("HEALTH_STATUS", 200) or 200),
            start_delay=number("START_DELAY", 0.0) or 0.0,
            start_exit=None if start_exit is None else int(start_exit),
            crash_after=number("CRASH_AFTER"),
            health_delay=number("HEALTH_DELAY", 0.0) or 0.0,
            unhealthy_after=number("UNHEALTHY_AFTER"),
            access_log=setting("ACCESS_LOG", "") == "1",
            page_delay=number("PAGE_DELAY", 0.0) or 0.0,
            deaf_after=number("DEAF_AFTER"),
        )


def log(message: str) -> None:
    print(f"app[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


class AppServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows which connections are mid-request, to stop gracefully."""

    allow_reuse_address = True
    daemon_threads = False  # server_close() joins the handler threads: in-flight work ends
    block_on_close = True
    request_queue_size = 1024  # socketserver's default of 5 drops connections under load

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.stopping = False
        self.stopped = threading.Event()  # releases the answers PAGE_DELAY holds
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._busy: dict[socket.socket, bool] = {}
        super().__init__((settings.host, settings.port), Handler)

    def identity(self) -> dict[str, Any]:
        s = self.settings
        return {"build": s.build, "color": s.color, "pid": os.getpid(), "port": s.port}

    def process_request(self, request: Any, client_address: Any) -> None:
        # Registered here, in the accept loop, so that once shutdown() has returned every
        # accepted connection is known to stop().
        with self._lock:
            self._busy[request] = False
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._busy.pop(request, None)
        super().shutdown_request(request)

    def mark(self, request: socket.socket, *, busy: bool) -> bool:
        """Record whether a connection is mid-request; False once the server is stopping."""
        with self._lock:
            self._busy[request] = busy
            return not self.stopping

    def go_deaf(self) -> None:
        log("DEAF_AFTER: closing the listening socket, staying up")
        self.shutdown()
        self.socket.close()

    def stop(self) -> None:
        """Stop accepting, close idle connections, wait for the in-flight requests."""
        self.stopped.set()
        self.shutdown()
        self.socket.close()
        with self._lock:
            self.stopping = True
            idle = [conn for conn, busy in self._busy.items() if not busy]
        for conn in idle:
            # SHUT_RD wakes a handler blocked reading the next request (it sees EOF) but
            # still lets it answer a request that was already read.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: AppServer
    timeout = IDLE_TIMEOUT
    # Head and body go out in two writes: with Nagle, the body waits for the client's
    # delayed ACK (~40 ms), which caps a keep-alive connection near 25 requests/s.
    disable_nagle_algorithm = True

    def parse_request(self) -> bool:
        self.server.mark(self.request, busy=True)
        return super().parse_request()

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if not self.server.mark(self.request, busy=False):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.settings.access_log:
            super().log_message(format, *args)

    def log_error(self, format: str, *args: Any) -> None:
        super().log_message(format, *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == self.server.settings.health_path:
            self.send_health()
            return
        if self.server.settings.page_delay:
            self.server.stopped.wait(self.server.settings.page_delay)
        if url.path == "/":
            self.send_json(self.server.identity())
        elif url.path == "/slow":
            self.send_slow(parse_qs(url.query))
        elif url.path == "/env":
            self.send_json(dict(os.environ))
        elif url.path == "/argv":
            self.send_json(sys.argv)
        elif url.path == "/upgrade" and self.headers.get("Upgrade"):
            self.send_upgrade()
        else:
            self.send_json({"error": f"no such path: {url.path}"}, HTTPStatus.NOT_FOUND)

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/echo":
            self.send_json({"error": "POST only to /echo"}, HTTPStatus.NOT_FOUND)
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.echo_chunked()
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.send_json({"error": "Content-Length required"}, HTTPStatus.LENGTH_REQUIRED)
            return
        digest, remaining = hashlib.sha256(), int(length)
        while remaining:
            chunk = self.rfile.read(min(remaining, ECHO_CHUNK))
            if not chunk:
                self.close_connection = True
                return
            digest.update(chunk)
            remaining -= len(chunk)
        self.send_json({"sha256": digest.hexdigest(), "bytes": int(length)})

    def echo_chunked(self) -> None:
        digest, total = hashlib.sha256(), 0
        while size := int(self.rfile.readline(ECHO_CHUNK).split(b";")[0], 16):
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.read(2) != b"\r\n":
                self.close_connection = True
                return
            digest.update(chunk)
            total += size
        while self.rfile.readline(ECHO_CHUNK) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields
        self.send_json({"sha256": digest.hexdigest(), "bytes": total})

    def send_upgrade(self) -> None:
        """A raw tunnel, as a WebSocket would be once upgraded."""
        self.send_response(HTTPStatus.SWITCHING_PROTOCOLS)
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", self.headers["Upgrade"])
        self.end_headers()
        self.wfile.flush()
        prefix = f"{self.server.settings.build}: ".encode()
        while data := self.rfile.read1(ECHO_CHUNK):
            self.wfile.write(prefix + data)
            self.wfile.flush()
        self.close_connection = True

    def send_health(self) -> None:
        settings = self.server.settings
        time.sleep(settings.health_delay)
        sick = (settings.unhealthy_after is not None
                and time.monotonic() - self.server.started > settings.unhealthy_after)
        self.send_json(self.server.identity(), 500 if sick else settings.health_status)

    def send_json(self, value: object, status: int = HTTPStatus.OK) -> None:
        body = json.dumps(value).encode() + b"\n"
        self.send_head(status, "application/json", len(body))
        self.wfile.write(body)

    def send_head(self, status: int, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        if self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def send_slow(self, query: dict[str, list[str]]) -> None:
        try:
            seconds = min(float(query.get("seconds", ["1"])[0]), SLOW_MAX_SECONDS)
            total = min(int(query.get("bytes", ["0"])[0]), SLOW_MAX_BYTES)
        except ValueError:
            self.send_json({"error": "seconds and bytes must be numbers"}, HTTPStatus.BAD_REQUEST)
            return
        self.send_head(HTTPStatus.OK, "application/octet-stream", total)
        self.wfile.flush()
        steps = max(1, min(total, int(seconds * 20)))
        start, sent = time.monotonic(), 0
        for step in range(1, steps + 1):
            time.sleep(max(0.0, start + seconds * step / steps - time.monotonic()))
            chunk = total * step // steps - sent
            self.wfile.write(b"x" * chunk)
            self.wfile.flush()
            sent += chunk


def wait_for_stop(timeout: float | None = None) -> signal.Signals | None:
    """The stop signal received (blocking for at most timeout seconds), or None."""
    if timeout is None:
        return signal.Signals(signal.sigwait(STOP_SIGNALS))
    info = signal.sigtimedwait(STOP_SIGNALS, timeout)
    return None if info is None else signal.Signals(info.si_signo)


def serve(settings: Settings) -> int:
    """Startup -> serve -> graceful stop."""
    if settings.start_delay and wait_for_stop(settings.start_delay):
        log("stopped before it started")
        return 0
    if settings.start_exit is not None:
        log(f"START_EXIT: exiting with {settings.start_exit} instead of serving")
        return settings.start_exit
    try:
        server = AppServer(settings)
    except OSError as exc:
        log(f"cannot listen on {settings.host}:{settings.port}: {exc}")
        return 1
    threading.Thread(target=server.serve_forever, args=(ACCEPT_POLL,), name="accept").start()
    if settings.deaf_after is not None:
        deaf = threading.Timer(settings.deaf_after, server.go_deaf)
        deaf.daemon = True
        deaf.start()
    log(
        f"serving build {settings.build} color {settings.color or '-'} "
        f"on {settings.host}:{settings.port}"
    )
    received = wait_for_stop(settings.crash_after)
    while received is not None and setting("IGNORE_SIGTERM", "") == "1":
        log(f"IGNORE_SIGTERM: ignoring {received.name}")
        received = wait_for_stop(settings.crash_after)
    if received is None:
        log(f"CRASH_AFTER: crashing {settings.crash_after} s after it started serving")
        os._exit(1)
    log(f"got {received.name}, stopping: finishing in-flight requests")
    server.stop()
    log("stopped gracefully")
    return 0


def main() -> int:
    # Blocked before any thread starts, so every thread inherits the mask and only
    # sigwait() in the main thread ever takes a stop signal.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        settings = Settings.load()
    except SettingsError as exc:
        log(f"bad settings: {exc}")
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
