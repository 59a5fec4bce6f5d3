"""switcher/router/http/pool.py: idle connections to a color, reused by the next client.

The router runs in this process (its table and connections on a uvloop loop in a thread)
so that a test can look into a color's pool and hold the loop still at the moment that
matters; colors and clients are plain sockets in threads. Every color answers with its
name and keeps connections alive until told to close them (its keep-alive timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from switcher.model import Color, Mode, RouterSettings, State
from switcher.router.http.proxy import Conn
from switcher.router.http.request import Limits
from switcher.router.routes import Routes
from tests.ports import port_block
from tests.routerkit import wait_for

_ports = itertools.cycle(port_block(__name__, 30))
T = TypeVar("T")


class Color_:  # noqa: N801 - a color server; "Color" is the enum
    """HTTP/1.1 on 127.0.0.1:port: ``GET /`` → 200 with the color's name, ``/slow?s=N`` after
    N seconds; a connection idle for ``keep_alive`` seconds is closed (None: never)."""

    def __init__(self, name: str, port: int, keep_alive: float | None = None) -> None:
        self.name = name
        self.keep_alive = keep_alive
        self.connections = 0
        self.requests = 0
        self.early = False  # answer the next connection's first request before it arrives
        self.answered_early = threading.Event()
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(256)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def answer_early(self) -> None:
        """The next connection gets its first answer at once, its request read after."""
        self.early = True

    def close_idle(self) -> None:
        """Close every open connection now (the FIN leaves before this returns)."""
        with self.lock:
            for conn in self.open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.close_idle()
        self.thread.join(5)

    @property
    def open_count(self) -> int:
        with self.lock:
            return len(self.open)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.keep_alive)
        buf = b""
        answered, self.early = self.early, False
        try:
            with conn:
                if answered:
                    self._answer(conn, b"GET / HTTP/1.1")
                    self.answered_early.set()
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    if answered:
                        answered = False  # its answer went first
                        continue
                    self._answer(conn, head)
        except OSError:  # the keep-alive timeout (TimeoutError) too
            pass
        finally:
            with self.lock:
                self.open.discard(conn)

    def _answer(self, conn: socket.socket, head: bytes) -> None:
        with self.lock:
            self.requests += 1
        target = head.split(b" ")[1]
        if target.startswith(b"/slow"):
            time.sleep(float(target.partition(b"=")[2]))
        body = self.name.encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class InProcessRouter:
    """The http router's table and connections on a uvloop loop in a thread of this process."""

    def __init__(self, port: int, colors: dict[Color, int], **settings: Any) -> None:
        self.port = port
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.settings = RouterSettings(
            app="app", env="test", mode=Mode.http, control_socket="",
            colors={c: ("127.0.0.1", p) for c, p in colors.items()}, **settings)
        view = State(active=Color.blue, builds={Color.blue: "b1", Color.green: "b2"})
        self.routes: Routes = self.call(Routes, self.loop, self.settings, view)
        self.call(self.routes.start_sweeping)
        limits = Limits.from_settings(self.settings)
        self.server = asyncio.run_coroutine_threadsafe(self.loop.create_server(
            lambda: Conn(self.routes, limits), "127.0.0.1", port, reuse_address=True),
            self.loop).result(5)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the loop's thread; its result."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # handed to the caller
                done.set_exception(e)
        self.loop.call_soon_threadsafe(run)
        return done.result(5)

    def pooled(self, color: Color) -> int:
        return self.call(lambda: len(self.routes.backends[color].pool))

    def switch(self, target: Color) -> None:
        self.call(self.routes.switch, target, None, None, {})

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The loop stands still inside the block: what happens meanwhile waits in sockets."""
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            release.wait(5)
        self.loop.call_soon_threadsafe(hold)
        entered.wait(5)
        try:
            yield
        finally:
            release.set()

    def close(self) -> None:
        self.server.close()
        self.call(self.routes.cut_all)
        wait_for(lambda: self.call(lambda: self.routes.open) == 0, what="connections closed")
        for timer in (self.routes.sweeping, self.routes.marking):
            if timer is not None:
                self.loop.call_soon_threadsafe(timer.cancel)
        asyncio.run_coroutine_threadsafe(self.server.wait_closed(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# -- clients ----------------------------------------------------------------------------------

def response(sock: socket.socket) -> tuple[int, bytes]:
    """Read one response framed by Content-Length: (status, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"EOF before a whole head: {buf!r}")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            raise EOFError("EOF in the body")
        body += data
    return int(head.split(b" ")[1]), body


def get(port: int, path: str = "/", method: str = "GET", extra: bytes = b"") -> tuple[int, bytes]:
    """One request on a new connection that asks to close after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        body = b"x" if method == "POST" else b""
        sock.sendall(b"%s %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n%s"
                     b"Content-Length: %d\r\n\r\n%s" % (method.encode(), path.encode(),
                                                       extra, len(body), body))
        return response(sock)


@pytest.fixture
def colors() -> Iterator[dict[Color, Color_]]:
    started: dict[Color, Color_] = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def start(colors: dict[Color, Color_]) -> Iterator[Callable[..., InProcessRouter]]:
    routers: list[InProcessRouter] = []

    def run(keep_alive: float | None = None, **settings: Any) -> InProcessRouter:
        port, blue, green = next(_ports), next(_ports), next(_ports)
        colors[Color.blue] = Color_("blue", blue, keep_alive)
        colors[Color.green] = Color_("green", green, keep_alive)
        routers.append(InProcessRouter(port, {Color.blue: blue, Color.green: green},
                                       **settings))
        return routers[-1]

    yield run
    for router in routers:
        router.close()


# -- reuse ------------------------------------------------------------------------------------

def test_clients_that_leave_hand_their_connection_to_the_next(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    r = start(pool_size=4, pool_idle=30.0)
    for _ in range(20):
        assert get(r.port) == (200, b"blue")
    assert colors[Color.blue].connections == 1
    assert r.pooled(Color.blue) == 1


def test_a_pool_of_size_zero_keeps_nothing(start: Callable[..., InProcessRouter],
                                           colors: dict[Color, Color_]) -> None:
    r = start(pool_size=0)
    for _ in range(5):
        assert get(r.port) == (200, b"blue")
    assert colors[Color.blue].connections == 5
    wait_for(lambda: colors[Color.blue].open_count == 0, what="every connection closed")


def test_the_pool_keeps_at_most_pool_size_the_newest(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    r = start(pool_size=2, pool_idle=30.0)
    clients = [socket.create_connection(("127.0.0.1", r.port), timeout=5) for _ in range(5)]
    try:
        for sock in clients:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert response(sock) == (200, b"blue")
    finally:
        for sock in clients:
            sock.close()
    wait_for(lambda: colors[Color.blue].open_count == 2, what="3 of 5 closed")
    assert r.pooled(Color.blue) == 2


def test_a_connection_idle_for_pool_idle_is_closed_not_reused(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    r = start(pool_size=4, pool_idle=0.2)
    assert get(r.port) == (200, b"blue")
    # The sweep (every 0.5 s) closes it; a take after 0.2 s would too.
    wait_for(lambda: colors[Color.blue].open_count == 0, what="the idle connection closed")
    assert r.pooled(Color.blue) == 0
    assert get(r.port) == (200, b"blue")
    assert colors[Color.blue].connections == 2


def test_a_request_with_a_body_never_takes_a_pooled_connection(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    """It could not be sent again if the color closed the connection as it went out."""
    r = start(pool_size=4, pool_idle=30.0)
    assert get(r.port) == (200, b"blue")
    assert get(r.port, method="POST") == (200, b"blue")
    assert colors[Color.blue].connections == 2


# -- the color closes idle connections --------------------------------------------------------

def test_an_idle_connection_the_color_closes_leaves_the_pool_at_once(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    r = start(pool_size=4, pool_idle=30.0)
    assert get(r.port) == (200, b"blue")
    assert r.pooled(Color.blue) == 1
    colors[Color.blue].close_idle()
    wait_for(lambda: r.pooled(Color.blue) == 0, what="the closed connection out of the pool")
    assert get(r.port) == (200, b"blue")
    assert r.routes.backends[Color.blue].errors == 0


def test_a_pooled_connection_the_color_closes_as_it_is_taken_costs_no_request(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    """The race: the color's FIN is in the router's socket, not yet read, when the next
    request takes the connection. The request goes out on it, the EOF follows, and the
    request is sent again on a new connection: the client sees 200, not a 502 or a hang."""
    r = start(pool_size=4, pool_idle=30.0)
    assert get(r.port) == (200, b"blue")
    assert r.pooled(Color.blue) == 1
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        wait_for(lambda: r.call(lambda: r.routes.open) == 1, what="the client accepted")
        with r.held():
            # In this order, so that the loop reads the request before the EOF.
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            colors[Color.blue].close_idle()
            wait_for(lambda: colors[Color.blue].open_count == 0, what="the color's close")
        assert response(sock) == (200, b"blue")
    assert colors[Color.blue].connections == 2  # the pooled one, then the resend's
    assert r.routes.backends[Color.blue].errors == 0  # the router's own race, not the color's


def test_a_connection_whose_client_left_as_it_was_made_is_pooled_alive(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The other race: the answer is read, and its client gone, in the loop iteration after
    the connection was made, before the task that made it resumed. Cancelling that task
    then (uvloop) closes the transport without telling its protocol: were it pooled, the
    next request would be written to a dead handle and its client get nothing."""
    r = start(pool_size=4, pool_idle=30.0)
    blue = colors[Color.blue]
    blue.answer_early()
    made = Conn.upstream_made

    def made_once_answered(conn: Conn, up: Any) -> None:
        blue.answered_early.wait(5)  # the answer is in the router's socket: read next
        made(conn, up)
    monkeypatch.setattr(Conn, "upstream_made", made_once_answered)
    assert get(r.port) == (200, b"blue")
    monkeypatch.undo()
    assert get(r.port) == (200, b"blue")
    assert get(r.port) == (200, b"blue")
    assert blue.connections == 1


def test_a_color_closing_idle_connections_under_load_causes_no_client_error(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    """Its keep-alive timeout (20 ms) far below pool_idle: takes race its closes all along."""
    r = start(keep_alive=0.02, pool_size=8, pool_idle=30.0)
    failures: list[str] = []

    def new_connections() -> None:
        for i in range(150):
            try:
                status, _ = get(r.port)
            except OSError as e:
                failures.append(repr(e))
                continue
            if status != 200:
                failures.append(str(status))
            if i % 10 == 0:
                time.sleep(0.02)  # let some idle ones reach the color's timeout

    def keep_alive() -> None:
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
            for i in range(150):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                status, _ = response(sock)
                if status != 200:
                    failures.append(str(status))
                if i % 10 == 0:
                    time.sleep(0.025)  # past the color's timeout: its connection closes

    threads = [threading.Thread(target=new_connections) for _ in range(4)]
    threads += [threading.Thread(target=keep_alive) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert colors[Color.blue].requests >= 900
    assert r.routes.backends[Color.blue].errors == 0


# -- switches and the drain -------------------------------------------------------------------

def test_a_switch_closes_the_old_colors_idle_connections_at_once(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    r = start(pool_size=8, pool_idle=30.0)
    clients = [socket.create_connection(("127.0.0.1", r.port), timeout=5) for _ in range(3)]
    try:
        for sock in clients:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert response(sock) == (200, b"blue")
    finally:
        for sock in clients:
            sock.close()
    wait_for(lambda: r.pooled(Color.blue) == 3, what="3 pooled")
    r.switch(Color.green)
    blue = colors[Color.blue]
    asked = blue.requests
    # Long before pool_idle: the switch closed them.
    wait_for(lambda: blue.open_count == 0, timeout=1.0, what="blue's idle connections closed")
    for _ in range(10):
        assert get(r.port) == (200, b"green")
    assert blue.requests == asked
    assert r.pooled(Color.blue) == 0
    assert r.pooled(Color.green) == 1


def test_the_drain_still_waits_for_a_request_in_flight(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    r = start(pool_size=8, pool_idle=30.0)
    answer: list[tuple[int, bytes]] = []
    slow = threading.Thread(target=lambda: answer.append(get(r.port, "/slow?s=0.5")))
    slow.start()
    wait_for(lambda: r.call(r.routes.inflight, Color.blue) == 1, what="the request in flight")
    r.switch(Color.green)
    assert get(r.port) == (200, b"green")
    assert r.call(r.routes.inflight, Color.blue) == 1  # still waited for
    slow.join(10)
    assert answer == [(200, b"blue")]
    assert r.call(r.routes.inflight, Color.blue) == 0
    # Answered after T0: its connection closes instead of waiting for a client.
    wait_for(lambda: colors[Color.blue].open_count == 0, what="blue's connection closed")
    assert r.pooled(Color.blue) == 0


def test_a_preview_colors_connections_are_pooled_until_the_preview_ends(
        start: Callable[..., InProcessRouter], colors: dict[Color, Color_]) -> None:
    """A color that takes new work without being live (preview, canary) keeps its idle
    connections; when it stops taking work they close at once, as after a switch."""
    r = start(pool_size=8, pool_idle=30.0)
    r.call(r.routes.set_preview, Color.green, "t0ken")
    for _ in range(5):
        assert get(r.port, extra=b"Alive-Switch-Preview: t0ken\r\n") == (200, b"green")
    assert get(r.port) == (200, b"blue")
    assert colors[Color.green].connections == 1
    assert r.pooled(Color.green) == 1
    r.call(r.routes.set_preview, None, "")
    wait_for(lambda: colors[Color.green].open_count == 0, timeout=1.0,
             what="green's idle connection closed")
    assert r.pooled(Color.green) == 0
    assert get(r.port, extra=b"Alive-Switch-Preview: t0ken\r\n") == (200, b"blue")
