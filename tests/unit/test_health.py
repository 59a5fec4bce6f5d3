"""The health probe against real sockets: what counts as healthy, and how failures read."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from switcher import health
from switcher.config import Health
from switcher.health import Probe, probe, wait_healthy
from tests.ports import port_block

PORT, SILENT, CLOSED = port_block(__name__, 3)


class Server:
    """Answers each connection with ``reply`` (raw bytes), then closes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.sock.settimeout(0.1)
        self.reply = b""
        self.requests: list[bytes] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(PORT)
    yield s
    s.close()


def response(status: str, body: bytes, *, chunked: bool = False) -> bytes:
    if chunked:
        return (b"HTTP/1.1 %s\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                % (status.encode(), len(body), body))
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status.encode(), len(body), body)


def test_a_2xx_is_healthy_and_the_request_is_plain(server: Server) -> None:
    server.reply = response("204 No Content", b"")
    result = probe("127.0.0.1", PORT, Health(path="/api/health?x=1"), timeout=2)
    assert (result.ok, result.detail) == (True, "204")
    head = server.requests[0]
    assert head.startswith(b"GET /api/health?x=1 HTTP/1.1\r\n")
    assert b"Host: 127.0.0.1:%d\r\n" % PORT in head


@pytest.mark.parametrize(("health", "reply", "ok", "detail"), [
    (Health(path="/"), response("503 Service Unavailable", b"no"), False,
     "503 (expected 2xx)"),
    (Health(path="/", expect_status=[200, 301]), response("301 Moved", b""), True, "301"),
    (Health(path="/", expect_status=[200]), response("204 No Content", b""), False,
     "204 (expected [200])"),
    (Health(path="/", expect_body="ready"), response("200 OK", b"all ready"), True, "200"),
    (Health(path="/", expect_body="ready"), response("200 OK", b"all ready", chunked=True),
     True, "200"),
    (Health(path="/", expect_body="ready"), response("200 OK", b"starting"), False,
     "200 without 'ready' in body"),
])
def test_status_and_body_decide(server: Server, health: Health, reply: bytes, ok: bool,
                                detail: str) -> None:
    server.reply = reply
    result = probe("127.0.0.1", PORT, health, timeout=2)
    assert (result.ok, result.detail) == (ok, detail)


def test_garbage_is_unhealthy_and_says_why(server: Server) -> None:
    server.reply = b"SSH-2.0-OpenSSH_9.2\r\n"
    result = probe("127.0.0.1", PORT, Health(path="/"), timeout=2)
    assert not result.ok
    assert "BadStatusLine" in result.detail


def test_a_refused_connection_is_unhealthy() -> None:
    result = probe("127.0.0.1", CLOSED, Health(path="/"), timeout=2)
    assert not result.ok
    assert "ConnectionRefusedError" in result.detail


def test_a_silent_color_times_out() -> None:
    with socket.create_server(("127.0.0.1", SILENT)):  # accepts (backlog), never answers
        began = time.monotonic()
        result = probe("127.0.0.1", SILENT, Health(path="/"), timeout=0.3)
        took = time.monotonic() - began
    assert (result.ok, result.detail) == (False, "no answer within 0.3 s")
    assert took < 2


def test_the_gate_waits_until_healthy(server: Server) -> None:
    server.reply = response("503 Service Unavailable", b"")
    flip = threading.Timer(0.3, lambda: setattr(server, "reply", response("200 OK", b"")))
    flip.start()
    result = wait_healthy("127.0.0.1", PORT, Health(path="/", timeout=5, interval=0.05),
                          still_running=lambda: "")
    flip.join()
    assert (result.ok, result.detail) == (True, "200")
    assert len(server.requests) > 1


def test_the_gate_ends_when_the_process_is_gone(server: Server) -> None:
    server.reply = response("503 Service Unavailable", b"")
    calls = iter(["", "", "exited (status 1)"])
    result = wait_healthy("127.0.0.1", PORT, Health(path="/", timeout=5, interval=0.05),
                          still_running=lambda: next(calls))
    assert (result.ok, result.detail, result.exited) == (False, "exited (status 1)", True)


def test_the_gate_gives_up_at_its_timeout_with_the_last_reason(server: Server) -> None:
    server.reply = response("503 Service Unavailable", b"")
    result = wait_healthy("127.0.0.1", PORT, Health(path="/", timeout=0.3, interval=0.05),
                          still_running=lambda: "")
    assert (result.ok, result.detail) == (False, "503 (expected 2xx) after 0.3 s")


def test_a_probe_the_deadline_cut_short_does_not_hide_the_real_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's last probe may get only what is left of the timeout (2 ms once, under load):
    its "no answer within 0.002 s" must not replace what the color did answer."""
    now = [0.0]
    budgets: list[float] = []

    def scripted(_host: str, _port: int, _health: Health, timeout: float) -> Probe:
        budgets.append(timeout)
        if timeout < 1.0:  # too short for this color to answer
            return Probe(False, f"no answer within {timeout:g} s")
        return Probe(False, "200 without 'go' in body", answered=True)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(health, "probe", scripted)
    result = wait_healthy("127.0.0.1", PORT, Health(path="/", timeout=1.5, interval=0.5,
                                                   expect_body="go"),
                          still_running=lambda: "", clock=lambda: now[0], sleep=sleep)
    assert budgets == [1.0, 1.0, 0.5], budgets  # the last one was cut short
    assert result.detail == "200 without 'go' in body after 1.5 s"
