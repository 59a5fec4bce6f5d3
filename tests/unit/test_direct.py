"""Direct mode in the router: the steering takes a color's listener out of another process
and steers to it; when that process goes, connections fall back to the public socket.
Each test in its own network namespace (tests/netns.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from switcher.errors import SteerError
from switcher.model import Color, Mode, RouterSettings
from switcher.router import direct, listener
from tests.netns import Netns
from tests.routerkit import close_all, ready_router, write_settings

PUBLIC, BLUE, GREEN = 20200, 20201, 20202
SETTINGS = RouterSettings(app="app", env="test", mode=Mode.direct,
                          colors={Color.blue: ("127.0.0.1", BLUE),
                                  Color.green: ("127.0.0.1", GREEN)},
                          control_socket="/nonexistent/control.sock", health_path="/h")
# A color: answers each connection with a 200 carrying its name, until stdin closes.
APP = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
def serve():
    while True:
        c, _ = s.accept(); c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\n" + sys.argv[2].encode())
        c.close()
threading.Thread(target=serve, daemon=True).start()
print("up", flush=True); sys.stdin.read()
"""


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns("direct")
    yield ns
    ns.delete()


@contextlib.contextmanager
def color(name: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """The app of ``name`` (started from the calling thread: in its namespace)."""
    proc = subprocess.Popen([sys.executable, "-c", APP, str(port), name],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def units(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """unit name → PID: who runs which color here (no systemd in unit tests)."""
    pids: dict[str, int] = {}
    monkeypatch.setattr(listener, "unit_pids", lambda unit: [pids[unit]] if unit in pids else [])
    return pids


def public() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", PUBLIC))
    sock.settimeout(2)
    return sock


def answer() -> bytes:
    """What a new connection to the public port gets: a color's name, or b"" when the public
    socket (the router's path) took it."""
    with socket.create_connection(("127.0.0.1", PUBLIC), timeout=2) as c:
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


def _steers_and_falls_back(units: dict[str, int]) -> list[object]:
    seen: list[object] = []
    with public() as pub, color("green", GREEN) as green:
        units["app-test@green.service"] = green.pid
        steering = direct.Direct.open(SETTINGS, [pub])
        try:
            asyncio.run(steering.take(Color.green))
            steering.select(Color.green)
            seen += [answer(), asyncio.run(steering.status())["steering"]]
            stop(green)  # the app exits: its listener leaves the map by itself
            pub.settimeout(0)
            with socket.create_connection(("127.0.0.1", PUBLIC), timeout=2):
                pub.accept()[0].close()
            seen.append("public")
            seen.append(asyncio.run(steering.status())["steering"])
            with socket.create_server(("127.0.0.1", GREEN)):  # no copy keeps it bound
                seen.append("rebound")
        finally:
            steering.close()
    return seen


def test_steers_to_the_taken_listener_and_falls_back_when_its_app_exits(
        netns: Netns, units: dict[str, int]) -> None:
    assert netns.run(_steers_and_falls_back, units) == [b"green", True, "public", False,
                                                       "rebound"]


def _resume(units: dict[str, int]) -> tuple[bytes, dict[str, object]]:
    with public() as pub, color("blue", BLUE) as blue:
        units["app-test@blue.service"] = blue.pid
        steering = direct.Direct.open(SETTINGS, [pub])
        try:
            # What a (re)started router does for the live color:
            asyncio.run(steering.resume(Color.blue))
            steering.select(Color.blue)
            return answer(), asyncio.run(steering.status())
        finally:
            steering.close()


def test_a_started_router_resumes_steering_to_the_live_color(
        netns: Netns, units: dict[str, int]) -> None:
    got, status = netns.run(_resume, units)
    assert got == b"blue"
    assert status["families"] == ["ipv4"] and status["selected"] == "blue"
    assert status["steered"] == {"blue": 2, "green": 0}  # the connection and the probe


def _counted(units: dict[str, int]) -> list[object]:
    with public() as pub, color("blue", BLUE) as blue:
        units["app-test@blue.service"] = blue.pid
        steering = direct.Direct.open(SETTINGS, [pub])
        try:
            asyncio.run(steering.take(Color.blue))
            steering.select(Color.blue)
            for _ in range(3):
                answer()
            # The probe counts here:
            seen: list[object] = [asyncio.run(steering.status())["steered"]]
            seen += [steering.counted(), steering.counted()]
            answer()
            return [*seen, steering.counted()]
        finally:
            steering.close()


def test_what_the_program_steered_is_read_once_without_the_status_probes(
        netns: Netns, units: dict[str, int]) -> None:
    raw, first, again, later = netns.run(_counted, units)
    assert raw == {"blue": 4, "green": 0}  # three connections and the status probe
    assert first == {Color.blue: 3, Color.green: 0}
    assert again == {Color.blue: 0, Color.green: 0}
    assert later == {Color.blue: 1, Color.green: 0}


def _take_missing(units: dict[str, int]) -> str:
    with public() as pub:
        steering = direct.Direct.open(SETTINGS, [pub])
        try:
            with pytest.raises(SteerError) as caught:
                asyncio.run(steering.take(Color.green))
            return str(caught.value)
        finally:
            steering.close()


def test_taking_a_color_that_does_not_listen_says_so(netns: Netns,
                                                     units: dict[str, int]) -> None:
    assert "no process of app-test@green.service" in netns.run(_take_missing, units)


def _unsteerable() -> str:
    with socket.create_server(("127.0.0.2", PUBLIC)) as pub:
        with pytest.raises(SteerError) as caught:
            direct.Direct.open(SETTINGS, [pub])
        return str(caught.value)


def test_a_public_socket_the_colors_never_accept_on_is_refused(netns: Netns) -> None:
    assert 'nothing can be steered' in netns.run(_unsteerable)


def _retaken(units: dict[str, int], logged: list[str]) -> tuple[bool, bool, bytes]:
    with public() as pub, color("green", GREEN) as first:
        units["app-test@green.service"] = first.pid
        steering = direct.Direct.open(SETTINGS, [pub])
        try:
            asyncio.run(steering.take(Color.green))
            steering.select(Color.green)
            stop(first)  # systemd restarts it: a new process, a new listener
            held_after_exit = steering.steering.holds(Color.green)

            async def watch() -> tuple[bool, bytes]:
                steering.keep_taking(lambda: Color.green)
                while not any("not steering to green yet" in m for m in logged):
                    await asyncio.sleep(0.01)  # the router's first take found no listener
                with color("green-2", GREEN) as second:
                    units["app-test@green.service"] = second.pid
                    for _ in range(500):  # now the rounds, once it answers its health probe
                        if steering.steering.holds(Color.green):
                            return True, answer()
                        await asyncio.sleep(0.01)
                    return False, b""

            return held_after_exit, *asyncio.run(watch())
        finally:
            steering.close()


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the router logs, as messages."""
    messages: list[str] = []
    monkeypatch.setattr(direct, "log", lambda _level, message: messages.append(message))
    return messages


def test_a_live_color_restarted_is_taken_again_once_healthy(
        netns: Netns, units: dict[str, int], logged: list[str]) -> None:
    assert netns.run(_retaken, units, logged) == (False, True, b"green-2")


def test_a_round_of_re_taking_that_fails_leaves_the_next_round_to_try(
        netns: Netns, units: dict[str, int], logged: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    probed = direct.healthy
    calls = []

    async def broken_once(*args: Any) -> bool:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a round that met the unexpected")
        return await probed(*args)

    monkeypatch.setattr(direct, "healthy", broken_once)
    assert netns.run(_retaken, units, logged) == (False, True, b"green-2")
    assert len(calls) >= 2
    assert any("a round that met the unexpected" in m for m in logged), logged


async def _ticks_while(work: Any) -> tuple[Any, int]:
    """What ``work`` returns, and how many 10 ms ticks the loop made meanwhile."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.get_running_loop().create_task(tick())
    try:
        return await work, ticks
    finally:
        ticking.cancel()


def _slow_scan(units: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, int]:
    located = listener.locate

    def slow(unit: str, host: str, port: int) -> tuple[int, int]:
        found = located(unit, host, port)
        time.sleep(0.5)  # a /proc with many processes, a busy host
        return found

    monkeypatch.setattr(listener, "locate", slow)
    with public() as pub, color("green", GREEN) as green:
        units["app-test@green.service"] = green.pid
        steering = direct.Direct.open(SETTINGS, [pub])
        try:
            _, ticks = asyncio.run(_ticks_while(steering.take(Color.green)))
            steering.select(Color.green)
            return answer(), ticks
        finally:
            steering.close()


def test_a_slow_listener_scan_leaves_the_routers_loop_serving(
        netns: Netns, units: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    got, ticks = netns.run(_slow_scan, units, monkeypatch)
    assert got == b"green"
    assert ticks >= 10, "the scan blocked the loop"  # about 50 in 0.5 s


def _full_backlog() -> tuple[bool, int]:
    """A probe that cannot connect (nothing steered, the public socket's queue full: its SYN
    is dropped) takes its whole timeout."""
    with socket.socket() as pub:
        pub.bind(("127.0.0.1", PUBLIC))
        pub.listen(0)
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", PUBLIC))
            steering = direct.Direct.open(SETTINGS, [pub])
            try:
                status, ticks = asyncio.run(_ticks_while(steering.status()))
                return status["steering"], ticks
            finally:
                steering.close()
        finally:
            for filler in fillers:
                filler.close()


def test_a_status_probe_that_hangs_leaves_the_routers_loop_serving(netns: Netns) -> None:
    steering, ticks = netns.run(_full_backlog)
    assert steering is False
    assert ticks >= 20, "the probe blocked the loop"  # about 100 in its 1 s timeout


@pytest.mark.parametrize(("expect", "code", "ok"), [
    ("2xx", 204, True), ("2xx", 503, False), ("200,204", 204, True), ("200,204", 201, False)])
def test_the_probe_accepts_what_health_expect_status_does(expect: str, code: int,
                                                          ok: bool) -> None:
    assert direct.accepts(expect, code) is ok


def _router_in_direct_mode(tmp: Path) -> list[Any]:
    router = ready_router(tmp, iter([20300, 20301, 20302]), mode="direct")
    try:
        seen: list[Any] = [router.control({"cmd": "status"})]
        seen.append(router.control({"cmd": "steer", "color": "green"}))
        router.control({"cmd": "pause", "max_wait": 30})
        seen.append(router.control({"cmd": "status"})["direct"]["selected"])
        router.control({"cmd": "resume"})
        seen.append(router.control({"cmd": "status"})["direct"]["selected"])
        seen.append(router.control({"cmd": "canary", "canary": {
            "color": "green", "percent": 10, "step": 1, "seed": "x"}}))
        write_settings(router.env_dir, tmp, router.ports, mode="tcp")
        router.control({"cmd": "reload"})
        seen.append(router.control({"cmd": "status"}))
        seen.append(router.control({"cmd": "steer", "color": "green"}))
        return seen
    finally:
        close_all([router])


def test_the_router_attaches_in_direct_mode_and_detaches_on_a_reload_to_tcp(
        netns: Netns, tmp: Path) -> None:
    (direct_status, steer_missing, paused, resumed, canary, tcp_status,
     steer_refused) = netns.run(_router_in_direct_mode, tmp)
    assert direct_status["mode"] == "direct"
    assert direct_status["direct"]["families"] == ["ipv4"]
    assert direct_status["direct"]["steering"] is False  # blue, live, runs nowhere here
    assert not steer_missing["ok"] and "no process of app-test@green.service" in (
        steer_missing["error"])
    assert (paused, resumed) == (None, "blue"), "no steering while paused"
    assert not canary["ok"] and "direct mode" in canary["error"]
    assert tcp_status["mode"] == "tcp" and "direct" not in tcp_status
    assert not steer_refused["ok"] and "only direct mode steers" in steer_refused["error"]
