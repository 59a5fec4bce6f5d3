"""The router as a real subprocess, given its listening socket the way systemd gives it.

The test process binds the public socket and keeps holding it (as systemd does); a tiny
launcher dup2()s it to fd 3, sets LISTEN_FDS=1 and LISTEN_PID to its own PID and execs
``alive-switch-router STATE_DIR``. Colors are threaded TCP servers that greet with their
name and echo. READY=1/STATUS=/WATCHDOG=1/STOPPING=1 arrive on a NOTIFY_SOCKET of the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from switcher import state as files
from switcher.model import Color, Fallback, Pending, Phase, State
from switcher.router.control import ControlError, request
from tests.ports import port_block
from tests.routerkit import ROUTER, Router, blue_live, wait_for, write_settings

_ports = itertools.cycle(port_block(__name__, 90))


# -- colors ------------------------------------------------------------------------------------

class EchoColor(socketserver.ThreadingTCPServer):
    """A color: greets each connection with its name, echoes, answers EOF with EOF."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, name: str, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Echo)
        self.name = name
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.sendall(f"{self.server.name}\n".encode())  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            while data := sock.recv(1 << 18):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def greeting(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"closed before a greeting (got {data!r})")
        data += chunk
    return data.decode().strip()


def first_color(port: int) -> str:
    with connect(port) as sock:
        return greeting(sock)


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def closed_by_peer(sock: socket.socket) -> bool:
    """The peer ended the connection without sending anything."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- the router --------------------------------------------------------------------------------

@pytest.fixture
def colors() -> Iterator[dict[str, EchoColor]]:
    started: dict[str, EchoColor] = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def launch(tmp: Path) -> Iterator[Callable[..., Router]]:
    routers: list[Router] = []

    def start(state: State | None = None, env: dict[str, str] | None = None,
              settings: bool = True, **overrides: Any) -> Router:
        port, blue, green = next(_ports), next(_ports), next(_ports)
        ports = {Color.blue: blue, Color.green: green}
        env_dir = tmp / "state" / "app-test"
        env_dir.mkdir(parents=True, exist_ok=True)
        if settings:
            write_settings(env_dir, tmp, ports, **overrides)
        if state is not None:
            files.save_state(env_dir, state)
        router = Router.spawn(tmp, port, ports, backlog=8, env=env)
        routers.append(router)
        return router

    yield start
    for router in routers:
        router.close()
    for router in routers:  # asyncio reports exceptions in callbacks on stderr
        assert "Traceback" not in router.stderr()
        assert "Exception in" not in router.stderr()


@pytest.fixture
def router(launch: Callable[..., Router]) -> Callable[..., Router]:
    """Start a router and wait for its READY=1."""

    def start(**kwargs: Any) -> Router:
        r = launch(**kwargs)
        r.notified(lambda m: "READY=1" in m)
        return r

    return start


def run_color(colors: dict[str, EchoColor], r: Router, color: Color) -> EchoColor:
    colors[color.value] = EchoColor(color.value, r.ports[color])
    return colors[color.value]


# -- starting ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "why"), [
    pytest.param({}, "LISTEN_FDS is not set", id="no-LISTEN_FDS"),
    pytest.param({"LISTEN_FDS": "1", "LISTEN_PID": "1"}, "meant for PID 1", id="other-PID"),
])
def test_refuses_to_start_without_a_passed_socket(tmp: Path, env: dict[str, str],
                                                  why: str) -> None:
    env_dir = tmp / "app-test"
    env_dir.mkdir()
    write_settings(env_dir, tmp, {Color.blue: next(_ports), Color.green: next(_ports)})
    done = subprocess.run([ROUTER, env_dir], capture_output=True, text=True, timeout=10,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("LISTEN_")} | env, check=False)
    assert done.returncode == 66, done.stderr
    assert "no listening socket was passed" in done.stderr
    assert why in done.stderr
    assert "never binds" in done.stderr
    assert "systemctl start app-test.socket" in done.stderr


def test_without_router_json_exits_with_config_error(launch: Callable[..., Router]) -> None:
    r = launch(settings=False)
    assert r.proc.wait(timeout=10) == 78
    assert "router.json does not exist" in r.stderr()


def test_bad_command_line_is_a_usage_error() -> None:
    done = subprocess.run([ROUTER], capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 64
    assert "usage: alive-switch-router STATE_DIR" in done.stderr


def test_imports_neither_the_cli_nor_jinja2_nor_httpx() -> None:
    code = "import sys, switcher.router.__main__; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=10, check=True).stdout.split())
    assert "switcher.router.server" in loaded  # the check sees what the router imports
    for heavy in ("jinja2", "httpx", "argparse", "switcher.cli", "switcher.config",
                  "switcher.render", "switcher.ops.deploy"):
        assert heavy not in loaded
    outside = {m for m in loaded if m.startswith("switcher.")
               and not m.startswith("switcher.router.")} - {"switcher.router"}
    assert outside == {"switcher.model", "switcher.state", "switcher.errors"}


def test_passes_its_backlog_to_the_shared_socket(router: Callable[..., Router]) -> None:
    r = router(state=blue_live(), backlog=1234)
    assert listen_backlog(r.port) == 1234


def listen_backlog(port: int) -> int:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[2])  # LISTEN Recv-Q Send-Q(=backlog) Local Peer


# -- forwarding --------------------------------------------------------------------------------

def test_forwards_both_ways_with_half_close(router: Callable[..., Router],
                                            colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live())
    run_color(colors, r, Color.blue)
    with connect(r.port) as sock:
        assert greeting(sock) == "blue"
        sock.sendall(b"hello, ")
        sock.sendall(b"world")
        sock.shutdown(socket.SHUT_WR)  # the color sees EOF, and still answers
        assert read_all(sock) == b"hello, world"


def test_client_bytes_sent_before_the_color_answers_are_delivered(
        router: Callable[..., Router], colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live())
    run_color(colors, r, Color.blue)
    with connect(r.port) as sock:
        sock.sendall(b"x" * 300_000)  # held while connecting, beyond the hold limit
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"blue\n" + b"x" * 300_000


def test_large_transfer_both_ways_keeps_every_byte(router: Callable[..., Router],
                                                   colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live())
    run_color(colors, r, Color.blue)
    payload = hashlib.sha256(b"seed").digest() * (16 * 1024 * 1024 // 32)  # 16 MiB
    with connect(r.port) as sock:
        assert greeting(sock) == "blue"
        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = read_all(sock)
        sender.join()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_switch_moves_new_connections_and_leaves_open_ones(router: Callable[..., Router],
                                                           colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live())
    run_color(colors, r, Color.blue)
    run_color(colors, r, Color.green)
    old = connect(r.port)
    assert greeting(old) == "blue"
    answer = r.control({"cmd": "switch", "target": "green", "builds": {"green": "b2"},
                        "fallback": {"color": "blue", "until": time.time() + 60},
                        "drain_until": time.time() + 60})
    assert answer["ok"] is True
    assert answer["serving"] == "green"
    assert answer["previous"] == "blue"
    assert abs(answer["switched_at"] - time.time()) < 5
    with connect(r.port) as new:
        assert greeting(new) == "green"
        assert echo(old, b"still blue") == b"still blue"
        status = r.control({"cmd": "status"})
    assert status["inflight"] == {"blue": 1, "green": 1}
    assert status["total"] == {"blue": 1, "green": 1}
    assert status["serving"] == "green"
    assert status["builds"] == {"blue": "b1", "green": "b2"}
    r.notified(lambda m: "STATUS=serving green (build b2) · blue draining 1" in m)
    old.close()


def test_fallback_only_when_the_live_color_refuses_and_its_window_is_open(
        router: Callable[..., Router], colors: dict[str, EchoColor]) -> None:
    state = State(active=Color.green, previous=Color.blue,
                  fallback=Fallback(Color.blue, time.time() + 60))
    r = router(state=state)
    run_color(colors, r, Color.blue)  # green is down: its port refuses
    with connect(r.port) as sock:
        sock.sendall(b"early bytes")  # held until a color accepts, then sent there
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"blue\nearly bytes"
    assert r.control({"cmd": "status"})["errors"] == {"blue": 0, "green": 1}

    assert r.control({"cmd": "fallback", "fallback": {"color": "blue",
                                                      "until": time.time() - 1}})["ok"]
    with connect(r.port) as sock:
        assert closed_by_peer(sock)  # window closed: no fallback
    assert r.control({"cmd": "fallback", "fallback": None}) == {"ok": True, "fallback": None}
    with connect(r.port) as sock:
        assert closed_by_peer(sock)
    # A window naming the serving color is accepted and never used; blue, though up, is
    # not the fallback any more, so it gets nothing.
    assert r.control({"cmd": "fallback", "fallback": {"color": "green",
                                                      "until": time.time() + 60}})["ok"]
    with connect(r.port) as sock:
        assert closed_by_peer(sock)

    run_color(colors, r, Color.green)
    assert r.control({"cmd": "fallback", "fallback": {"color": "blue",
                                                      "until": time.time() + 60}})["ok"]
    assert first_color(r.port) == "green"  # the live color first, whenever it accepts


@pytest.mark.parametrize("mode", ["tcp", "http"])
def test_without_a_live_color_tcp_closes_and_http_answers_503(
        router: Callable[..., Router], mode: str) -> None:
    r = router(mode=mode)
    r.notified(lambda m: "STATUS=no live color yet" in m)
    with connect(r.port) as sock:
        if mode == "tcp":
            assert closed_by_peer(sock)
        else:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_all(sock)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nConnection: close\r\n" in answer


def test_beyond_max_connections_new_ones_are_turned_away(
        router: Callable[..., Router], colors: dict[str, EchoColor]) -> None:
    # http mode (503) is in test_router_http.py: it needs a color that speaks HTTP.
    r = router(state=blue_live(), max_connections=2)
    run_color(colors, r, Color.blue)
    with connect(r.port) as one, connect(r.port) as two, connect(r.port) as three:
        assert greeting(one) == greeting(two) == "blue"
        assert closed_by_peer(three)
    wait_for(lambda: r.control({"cmd": "status"})["inflight"]["blue"] == 0)
    assert first_color(r.port) == "blue"


def test_connections_that_end_in_every_way_leave_nothing_behind(
        router: Callable[..., Router], colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live())
    run_color(colors, r, Color.blue)
    socks = [connect(r.port) for _ in range(150)]
    for i, sock in enumerate(socks):
        if i % 3 == 0:  # a reset, maybe before the color even answered
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        elif i % 3 == 1:
            sock.close()
        else:
            sock.sendall(b"ping")
    for sock in socks[2::3]:
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"blue\nping"
        sock.close()
    wait_for(lambda: r.control({"cmd": "status"})["inflight"] == {"blue": 0, "green": 0},
             what="every connection to be forgotten")
    assert first_color(r.port) == "blue"


# -- what it serves on start -------------------------------------------------------------------

@pytest.mark.parametrize(("phase", "serves"), [
    (Phase.switching, "green"), (Phase.commit, "green"), (Phase.pre_switch, "blue"),
])
def test_serves_a_pending_target_once_its_intent_is_past_the_switch(
        router: Callable[..., Router], colors: dict[str, EchoColor], phase: Phase,
        serves: str) -> None:
    r = router(state=blue_live(pending=Pending(Color.green, phase, "d1", "b2")))
    run_color(colors, r, Color.blue)
    run_color(colors, r, Color.green)
    assert first_color(r.port) == serves


def test_corrupt_state_json_serves_what_prev_says(launch: Callable[..., Router],
                                                  colors: dict[str, EchoColor], tmp: Path) -> None:
    env_dir = tmp / "state" / "app-test"
    env_dir.mkdir(parents=True)
    files.save_state(env_dir, State(active=Color.green))
    files.save_state(env_dir, State(active=Color.green))  # the first copy becomes .prev
    (env_dir / files.STATE).write_text('{"schema": 1, "active": "gre')
    r = launch()
    r.notified(lambda m: "READY=1" in m)
    run_color(colors, r, Color.green)
    assert first_color(r.port) == "green"
    assert r.control({"cmd": "status"})["state_source"] == "state.json.prev"


def test_unreadable_state_json_and_prev_mean_no_live_color(
        launch: Callable[..., Router], tmp: Path) -> None:
    env_dir = tmp / "state" / "app-test"
    env_dir.mkdir(parents=True)
    (env_dir / files.STATE).write_text("{")
    (env_dir / files.STATE_PREV).write_text("")
    r = launch()
    assert "STATUS=no live color yet" in r.notified(lambda m: "READY=1" in m)
    assert "state.json and its .prev copy are unreadable" in r.stderr()
    assert "alive-switch repair test" in r.stderr()
    answer = r.control({"cmd": "reload"})
    assert answer["ok"] is False
    assert "unreadable" in answer["error"]


def test_serves_without_a_control_socket_it_cannot_create(
        router: Callable[..., Router], colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live(), control_group="no-such-group-here")
    run_color(colors, r, Color.blue)
    assert first_color(r.port) == "blue"
    assert "control_group 'no-such-group-here' does not exist" in r.stderr()
    r.notified(lambda m: "STATUS=serving blue (build b1) · no control socket" in m)


def test_reload_rereads_state_json_on_sighup_and_on_command(
        router: Callable[..., Router], colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live())
    run_color(colors, r, Color.blue)
    run_color(colors, r, Color.green)
    files.save_state(r.env_dir, State(active=Color.green))
    assert first_color(r.port) == "blue"  # not before a reload
    r.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: r.control({"cmd": "status"})["serving"] == "green", what="the reload")
    assert first_color(r.port) == "green"

    assert r.control({"cmd": "switch", "target": "blue"})["ok"]
    assert first_color(r.port) == "blue"  # a switch wins over state.json ...
    assert r.control({"cmd": "reload"}) == {"ok": True, "serving": "green",
                                            "state_source": "state.json",
                                            "restart_needed": []}
    assert first_color(r.port) == "green"  # ... until a reload


# -- draining and stopping ---------------------------------------------------------------------

def test_drain_until_cuts_what_is_left_on_the_old_color(router: Callable[..., Router],
                                                        colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live())
    run_color(colors, r, Color.blue)
    run_color(colors, r, Color.green)
    with connect(r.port) as old:
        assert greeting(old) == "blue"
        drain_until = time.time() + 0.5
        assert r.control({"cmd": "switch", "target": "green", "drain_until": drain_until})["ok"]
        with connect(r.port) as new:
            assert greeting(new) == "green"
            assert echo(old, b"before") == b"before"
            assert closed_by_peer(old)
            assert time.time() >= drain_until - 0.05
            assert echo(new, b"after") == b"after"  # the serving color is never cut
    status = wait_for(lambda: (s := r.control({"cmd": "status"}))["inflight"]["blue"] == 0
                      and s)
    assert status["drain_until"] == pytest.approx(drain_until)


def test_sigterm_lets_open_connections_finish_and_the_socket_keeps_listening(
        router: Callable[..., Router], colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live(), restart_drain=10.0, backlog=1234)
    run_color(colors, r, Color.blue)
    sock = connect(r.port)
    assert greeting(sock) == "blue"
    started = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    r.notified(lambda m: "STOPPING=1" in m)
    assert echo(sock, b"still served") == b"still served"
    sock.close()  # the last connection ends: no need to wait for restart_drain
    assert r.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 5
    # Never shutdown(): the launcher's socket (systemd's, in production) still listens with
    # the router's backlog, and queues connections for the next router.
    assert listen_backlog(r.port) == 1234
    with connect(r.port):
        pass


def test_sigterm_cuts_what_is_still_open_after_restart_drain(
        router: Callable[..., Router], colors: dict[str, EchoColor]) -> None:
    r = router(state=blue_live(), restart_drain=0.5)
    run_color(colors, r, Color.blue)
    with connect(r.port) as sock:
        assert greeting(sock) == "blue"
        started = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        assert r.proc.wait(timeout=5) == 0
        assert 0.45 < time.monotonic() - started < 3
        assert closed_by_peer(sock)
    with connect(r.port):
        pass


def test_shutdown_on_a_shared_listening_socket_would_stop_it_for_every_holder() -> None:
    """Negative control for the test above: what ``shutdown()`` would have done."""
    port = next(_ports)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        other_holder = listener.dup()
        other_holder.shutdown(socket.SHUT_RDWR)
        other_holder.close()
        with pytest.raises(ConnectionRefusedError):
            connect(port)


def test_reports_ready_status_and_feeds_the_watchdog(launch: Callable[..., Router]) -> None:
    r = launch(state=blue_live(), env={"WATCHDOG_USEC": "200000"})
    ready = r.notified(lambda m: "READY=1" in m)
    assert "STATUS=serving blue (build b1)" in ready
    started = time.monotonic()
    r.notified(lambda m: m == "WATCHDOG=1")
    r.notified(lambda m: m == "WATCHDOG=1" and time.monotonic() - started > 0.15)
    assert sum(m == "WATCHDOG=1" for m in r.messages) <= 10


# -- the control socket ------------------------------------------------------------------------

def test_control_protocol(router: Callable[..., Router]) -> None:
    r = router(state=blue_live(fallback=Fallback(Color.green, 1.0)))
    status = r.control({"cmd": "status"})
    assert status == status | {
        "ok": True, "pid": r.proc.pid, "serving": "blue", "mode": "tcp",
        "fallback": {"color": "green", "until": 1.0}, "fallback_open": None,
        "inflight": {"blue": 0, "green": 0}, "total": {"blue": 0, "green": 0},
        "builds": {"blue": "b1", "green": None}, "state_source": "state.json",
        "drain_until": None, "switched_at": None, "stopping": False}
    bad = {
        '{"cmd": "nope"}': "unknown cmd 'nope'",
        "not json": "not JSON",
        "[1, 2]": "one JSON object",
        '{"cmd": "switch", "target": "red"}': "target: expected one of blue, green",
        '{"cmd": "switch", "target": "green", "fallback": {"color": "blue"}}':
            "fallback: expected null or",
        '{"cmd": "switch", "target": "green", "drain_until": "soon"}': "drain_until",
        '{"cmd": "fallback"}': '"fallback" is required',
        '{"cmd": "fallback", "fallback": {"color": "blue", "until": "9"}}': "fallback.until",
    }
    with socket.socket(socket.AF_UNIX) as sock:  # several requests on one connection
        sock.connect(r.control_path)
        lines = sock.makefile("rb")
        for line, error in bad.items():
            sock.sendall(line.encode() + b"\n")
            answer = json.loads(lines.readline())
            assert answer["ok"] is False
            assert error in answer["error"]
        sock.sendall(b'{"cmd": "status"}\n')
        assert json.loads(lines.readline())["serving"] == "blue"  # nothing changed


def test_control_socket_is_0660_in_a_0755_directory(router: Callable[..., Router]) -> None:
    r = router(state=blue_live())
    mode = os.stat(r.control_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    assert stat.S_IMODE(os.stat(Path(r.control_path).parent).st_mode) == 0o755


def test_request_reports_a_router_that_is_not_running(tmp: Path) -> None:
    with pytest.raises(ControlError, match="the router is not running"):
        request(str(tmp / "nothing.sock"), {"cmd": "status"}, timeout=1)


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534"]
ASK = """
import json, sys
from switcher.router.control import ControlError, request
try:
    print(json.dumps(request(sys.argv[1], {"cmd": "status"}, timeout=5)))
except ControlError as e:
    print(json.dumps({"raised": str(e)}))
"""


def ask_as(who: list[str], path: str) -> dict[str, Any]:
    done = subprocess.run([*who, sys.executable, "-c", ASK, path], capture_output=True,
                          text=True, timeout=10, check=True, cwd="/")
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_control_socket_rejects_peers_that_are_neither_root_nor_in_control_group(
        router: Callable[..., Router], tmp: Path) -> None:
    tmp.chmod(0o755)
    r = router(state=blue_live())
    nobody = [*AS_NOBODY, "--clear-groups"]
    assert "permission denied" in ask_as(nobody, r.control_path)["raised"]  # the file mode
    os.chmod(r.control_path, 0o666)  # even so, the router checks who is asking
    answer = ask_as(nobody, r.control_path)
    assert answer["ok"] is False
    assert "permission denied" in answer["error"]
    assert "(uid 65534) is not root" in answer["error"]
    assert r.control({"cmd": "status"})["ok"] is True  # root may


@pytest.mark.parametrize("who", [
    pytest.param([*AS_NOBODY, "--clear-groups"], id="primary-group"),
    pytest.param(["setpriv", "--reuid=65534", "--regid=1", "--groups=65534"],
                 id="supplementary-group"),
])
def test_control_group_members_may_use_the_control_socket(
        router: Callable[..., Router], tmp: Path, who: list[str]) -> None:
    tmp.chmod(0o755)
    r = router(state=blue_live(), control_group="nogroup")
    assert os.stat(r.control_path).st_gid == 65534
    answer = ask_as(who, r.control_path)
    assert answer.get("ok") is True, answer
    assert answer["serving"] == "blue"


# -- flow control ------------------------------------------------------------------------------

MiB = 1 << 20


def send_until_blocked(sock: socket.socket, limit: int) -> int:
    """Bytes ``sock`` could send before the other end stopped taking them (≤ ``limit``)."""
    chunk, sent = b"\0" * MiB, 0
    sock.settimeout(0.5)
    with contextlib.suppress(TimeoutError):
        while sent < limit:
            sent += sock.send(chunk)
    return sent


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def router_pid(r: Router) -> int:
    pid: int = r.control({"cmd": "status"})["pid"]
    return pid


def test_a_color_that_stops_reading_stops_the_client(router: Callable[..., Router]) -> None:
    r = router(state=blue_live())
    before = rss(router_pid(r))
    with socket.socket() as stalled:  # accepts (in the kernel), never reads
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stalled.bind(("127.0.0.1", r.ports[Color.blue]))
        stalled.listen(8)
        with connect(r.port) as sock:
            sent = send_until_blocked(sock, 256 * MiB)
            grown = rss(r.proc.pid) - before
    assert sent < 40 * MiB, f"the client could send {sent / MiB:.0f} MiB"
    assert grown < 16 * MiB, f"the router grew by {grown / MiB:.0f} MiB"


def test_a_client_that_stops_reading_stops_the_color(router: Callable[..., Router]) -> None:
    r = router(state=blue_live())
    before = rss(router_pid(r))
    sent: list[int] = []
    with socket.socket() as flood:
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        flood.bind(("127.0.0.1", r.ports[Color.blue]))
        flood.listen(8)

        def pour() -> None:
            conn, _ = flood.accept()
            with conn:
                sent.append(send_until_blocked(conn, 256 * MiB))

        pourer = threading.Thread(target=pour)
        pourer.start()
        with connect(r.port):  # never read
            pourer.join(timeout=20)
            grown = rss(r.proc.pid) - before
    assert sent[0] < 40 * MiB, f"the color could send {sent[0] / MiB:.0f} MiB"
    assert grown < 16 * MiB, f"the router grew by {grown / MiB:.0f} MiB"
