"""The router's counters (switcher/router/tally.py): the pure pieces, then what a real router
subprocess counts in front of real HTTP colors (answers by class on the fast and the slow
path, durations, refused/reset/timeout, tcp connections) and the ``figures`` command."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from switcher.model import Color, Fallback, Mode, RouterSettings, State
from switcher.router.routes import Routes
from switcher.router.tally import (
    BOUNDS,
    RING_SECONDS,
    ZERO,
    Failure,
    Ring,
    Tally,
    figures_json,
    minus,
)
from tests.ports import port_block
from tests.routerkit import Router, blue_live, close_all, ready_router, wait_for

_ports = itertools.cycle(port_block(__name__, 30))


# -- the pure pieces ---------------------------------------------------------------------------

def test_durations_fall_in_prometheus_le_buckets() -> None:
    tally = Tally()
    for seconds in (0.0, 0.005, 0.0051, 0.3, 10.0, 10.5):
        tally.answered(200, seconds)
    counts = figures_json(tally.snapshot())["duration"]["counts"]
    # le is "less than or equal": 0.005 is in the first bucket, 0.0051 in the second.
    assert counts == [2, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1]
    assert len(counts) == len(BOUNDS) + 1


def test_a_snapshot_reads_as_figures_and_differences_subtract() -> None:
    tally = Tally()
    tally.answered(200, 0.001)
    older = tally.snapshot()
    tally.answered(503, 0.2)
    tally.answered(404, 0.02)
    tally.failures[Failure.refused] += 1
    tally.connections += 2
    figures = figures_json(minus(tally.snapshot(), older))
    assert figures["responses"] == {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 1, "5xx": 1}
    assert figures["failures"] == {"refused": 1, "reset": 0, "timeout": 0}
    assert figures["connections"] == 2
    assert sum(figures["duration"]["counts"]) == 2
    assert figures["duration"]["sum"] == pytest.approx(0.22)
    assert figures_json(ZERO)["responses"]["2xx"] == 0


def test_the_ring_gives_the_window_asked_for_or_all_it_has() -> None:
    ring = Ring(1, now=100.0)
    for second in range(1, RING_SECONDS + 50):
        ring.mark(100.0 + second, ((float(second),),))
    now = 100.0 + RING_SECONDS + 49
    covered, (snap,) = ring.since(now, 60)
    assert covered == 60 and snap == (now - 100.0 - 60,)
    covered, _ = ring.since(now, 10_000)
    assert covered == RING_SECONDS  # the oldest kept
    young = Ring(1, now=5.0)
    assert young.since(7.5, 60) == (2.5, (ZERO,))  # younger than asked: since the start


def test_connections_counted_outside_the_router_are_read_into_every_figure() -> None:
    """Direct mode: what the steering counted since the last read joins each color's
    connections whenever the tallies are read (status, figures, the ring's mark)."""
    loop = asyncio.new_event_loop()
    try:
        settings = RouterSettings(app="a", env="e", mode=Mode.direct,
                                  control_socket="/nonexistent",
                                  colors={Color.blue: ("127.0.0.1", 1),
                                          Color.green: ("127.0.0.1", 2)})
        routes = Routes(loop, settings, blue_live())
        steered = iter([{Color.blue: 5, Color.green: 0}, {Color.blue: 2, Color.green: 1}])
        routes.outside = lambda: next(steered)
        routes._mark()  # what the timer does every second
        _, window = routes.figures(60)
        if routes.marking is not None:
            routes.marking.cancel()
    finally:
        loop.close()
    assert [figures_json(s)["connections"] for s in routes.ring.marks[-1][1]] == [5, 0]
    assert figures_json(window[Color.blue])["connections"] == 7
    assert figures_json(window[Color.green])["connections"] == 1
    assert routes.steered == 8 and routes.accepted == 0  # the router accepted none of them


# -- what a real router counts -----------------------------------------------------------------

class Answers(http.server.BaseHTTPRequestHandler):
    """/status/N (Content-Length: the fast path), /chunked/N (the slow path), /slow/S,
    /never (no answer until the test ends), /cut (half a body, then the end)."""

    protocol_version = "HTTP/1.1"
    released = threading.Event()

    def do_GET(self) -> None:
        kind, _, arg = self.path.strip("/").partition("/")
        if kind == "never":
            self.released.wait(30)
            return
        if kind == "slow":
            time.sleep(float(arg))
        if kind == "cut":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
            self.close_connection = True
            return
        status = int(arg) if kind in ("status", "chunked") else 200
        self.send_response(status)
        if kind == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"2\r\nok\r\n0\r\n\r\n")
        else:
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def serve() -> Iterator[Callable[[int], Server]]:
    servers: list[Server] = []

    def start(port: int) -> Server:
        server = Server(("127.0.0.1", port), Answers)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    Answers.released.clear()
    yield start
    Answers.released.set()
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def router(tmp: Path) -> Iterator[Callable[..., Router]]:
    routers: list[Router] = []

    def start(state: State | None = None, **overrides: Any) -> Router:
        routers.append(ready_router(tmp, _ports, state, **overrides))
        return routers[-1]

    yield start
    close_all(routers)


def get(port: int, path: str, timeout: float = 5.0) -> int:
    """One request on its own connection, read to its end (a client that left early would
    make the router drop the rest of the answer, uncounted); the status code (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def counters(r: Router, color: str) -> dict[str, Any]:
    figures: dict[str, Any] = r.control({"cmd": "status"})["counters"][color]
    return figures


def test_answers_are_counted_by_class_on_both_paths(router: Callable[..., Router],
                                                    serve: Callable[[int], Server]) -> None:
    r = router(mode="http")
    serve(r.ports[Color.blue])
    for path in ("/status/200", "/status/404", "/status/500", "/chunked/503", "/chunked/201"):
        get(r.port, path)
    blue = wait_for(lambda: (c := counters(r, "blue"))["responses"]["5xx"] == 2 and c,
                    what="two 5xx counted")
    assert blue["responses"] == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 2}
    assert blue["failures"] == {"refused": 0, "reset": 0, "timeout": 0}
    assert sum(blue["duration"]["counts"]) == 5
    assert counters(r, "green")["responses"]["2xx"] == 0


def test_a_duration_runs_from_the_head_to_the_last_byte(router: Callable[..., Router],
                                                        serve: Callable[[int], Server]) -> None:
    r = router(mode="http")
    serve(r.ports[Color.blue])
    assert get(r.port, "/slow/0.3") == 200
    duration = wait_for(lambda: sum((d := counters(r, "blue")["duration"])["counts"]) and d)
    assert duration["counts"][BOUNDS.index(0.5)] == 1  # 0.25 < 0.3 s ≤ 0.5
    assert 0.3 <= duration["sum"] < 0.5


def test_a_refused_connect_counts_against_the_refusing_color_not_the_fallback(
        router: Callable[..., Router], serve: Callable[[int], Server]) -> None:
    r = router(blue_live(fallback=Fallback(Color.green, time.time() + 600)), mode="http")
    serve(r.ports[Color.green])  # blue listens nowhere
    assert get(r.port, "/status/200") == 200
    wait_for(lambda: counters(r, "green")["responses"]["2xx"] == 1, what="green's answer")
    blue = counters(r, "blue")
    assert blue["failures"]["refused"] == 1 and blue["responses"]["2xx"] == 0


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_a_color_that_listens_nowhere_is_refused(router: Callable[..., Router],
                                                 mode: str) -> None:
    r = router(mode=mode)
    assert get(r.port, "/status/200") in (0, 502)
    wait_for(lambda: counters(r, "blue")["failures"]["refused"] == 1, what="refused counted")


def test_no_answer_within_response_timeout_is_a_timeout(router: Callable[..., Router],
                                                        serve: Callable[[int], Server]) -> None:
    r = router(mode="http", response_timeout=1.0)
    serve(r.ports[Color.blue])
    assert get(r.port, "/never") == 504
    assert counters(r, "blue")["failures"]["timeout"] == 1


def test_a_response_cut_short_is_a_reset(router: Callable[..., Router],
                                         serve: Callable[[int], Server]) -> None:
    r = router(mode="http")
    serve(r.ports[Color.blue])
    get(r.port, "/cut")
    wait_for(lambda: counters(r, "blue")["failures"]["reset"] == 1, what="reset counted")
    assert counters(r, "blue")["responses"]["2xx"] == 0


def test_tcp_mode_counts_connections(router: Callable[..., Router],
                                     serve: Callable[[int], Server]) -> None:
    r = router(mode="tcp")
    serve(r.ports[Color.blue])
    for _ in range(3):
        assert get(r.port, "/status/200") == 200
    wait_for(lambda: counters(r, "blue")["connections"] == 3, what="3 connections")
    assert counters(r, "blue")["responses"]["2xx"] == 0  # tcp mode reads no answers


def test_figures_cover_a_window_and_status_carries_the_start(
        router: Callable[..., Router], serve: Callable[[int], Server]) -> None:
    before = time.time()
    r = router(mode="http")
    serve(r.ports[Color.blue])
    get(r.port, "/status/500")
    # Counted once its last byte is relayed, which may be just after the client read the head.
    status = wait_for(lambda: (s := r.control({"cmd": "status"}))["counters"]["blue"]
                      ["responses"]["5xx"] and s, what="the 500 counted")
    assert before <= status["started_at"] <= time.time()
    assert status["recent"]["blue"]["responses"]["5xx"] == 1
    assert status["recent"]["seconds"] <= 60
    window = r.control({"cmd": "figures", "seconds": 300})
    assert window["colors"]["blue"] == status["counters"]["blue"]  # younger than 300 s
    assert window["started_at"] == status["started_at"]
    for bad in (0, -1, 301, "60", None, True):
        answer = r.control({"cmd": "figures", "seconds": bad})
        assert not answer["ok"] and "seconds" in answer["error"], answer


def accept_queue(listener: socket.socket) -> int:
    """Connections waiting in a listener's accept queue (tcp_info.tcpi_unacked, for a
    listening socket, is its backlog)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[24:28], "little")


def test_a_request_queued_on_a_color_that_stops_listening_goes_to_the_fallback(
        router: Callable[..., Router], serve: Callable[[int], Server]) -> None:
    r = router(blue_live(fallback=Fallback(Color.green, time.time() + 600)), mode="http")
    serve(r.ports[Color.green])
    with socket.socket() as deaf:  # blue: listens, never accepts, then closes
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deaf.bind(("127.0.0.1", r.ports[Color.blue]))
        deaf.listen(8)
        answer: list[int] = []
        client = threading.Thread(target=lambda: answer.append(get(r.port, "/status/200")))
        client.start()
        wait_for(lambda: accept_queue(deaf) == 1, what="the request queued on blue")
    client.join(10)
    # The kernel reset the queued connection: nothing was read, so the GET went again, and
    # blue, gone now, refused it to the fallback.
    assert answer == [200]
    blue = counters(r, "blue")
    assert blue["failures"]["reset"] == 1 and blue["failures"]["refused"] == 1
    assert counters(r, "green")["responses"]["2xx"] == 1
