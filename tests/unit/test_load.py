"""The load client the system tests count failures with (tests/load.py): its keep-alive
client sends a GET again only when a reused connection closed before any byte of the
answer (RFC 9112 §9.3.1), never on a fresh one, and every other failure is counted."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.load import KeepAliveClient, Load, classify
from tests.routerkit import wait_for

ANSWER = b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"build": "b1"}'
Serve = Callable[[socket.socket, int], None]  # one accepted connection, its number


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, list[int]]]:
    """A server on a free port running ``request.param`` for each connection; (port, the
    connections it accepted, numbered)."""
    serve: Serve = request.param
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[int] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                connections.append(number := len(connections))
                serve(conn, number)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], connections
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)


def _one_then_close(conn: socket.socket, number: int) -> None:
    """Answer one request, then close while idle (a retired color's shutdown)."""
    conn.recv(65536)
    conn.sendall(ANSWER)


def _close_at_once(conn: socket.socket, number: int) -> None:
    pass


def _half_answer(conn: socket.socket, number: int) -> None:
    conn.recv(65536)
    conn.sendall(ANSWER[:-5])


def asked(port: int, times: int) -> tuple[list[tuple[str, str]], int]:
    """``times`` requests from one keep-alive client: their outcomes, and how many of them
    it sent again on a new connection."""
    client = KeepAliveClient(port, timeout=5)
    try:
        return [client.request() for _ in range(times)], client.retried
    finally:
        client.close()


@pytest.mark.parametrize("server", [_one_then_close], indirect=True)
def test_a_reused_connection_closed_while_idle_is_retried_on_a_new_one(
        server: tuple[int, list[int]]) -> None:
    port, connections = server
    outcomes, retried = asked(port, 2)
    assert outcomes == [("ok", "b1"), ("ok", "b1")]
    assert retried == 1 and len(connections) == 2


@pytest.mark.parametrize("server", [_close_at_once], indirect=True)
def test_a_fresh_connection_closed_before_the_answer_is_a_failure(
        server: tuple[int, list[int]]) -> None:
    [(outcome, _)], retried = asked(server[0], 1)
    assert outcome in ("eof", "reset") and retried == 0


@pytest.mark.parametrize("server", [_half_answer], indirect=True)
def test_an_answer_cut_short_is_never_retried(server: tuple[int, list[int]]) -> None:
    [(outcome, _)], retried = asked(server[0], 1)
    assert outcome == "eof" and retried == 0


def _no_length(conn: socket.socket, number: int) -> None:
    conn.recv(65536)
    conn.sendall(b'HTTP/1.1 200 OK\r\n\r\n{"build": "b1"}')  # the body ends at the close


@pytest.mark.parametrize("server", [_no_length], indirect=True)
def test_an_answer_without_a_length_runs_to_the_close_and_is_no_retry(
        server: tuple[int, list[int]]) -> None:
    port, connections = server
    outcomes, retried = asked(port, 2)
    assert outcomes == [("ok", "b1"), ("ok", "b1")]
    assert retried == 0 and len(connections) == 2


@pytest.mark.parametrize("server", [_one_then_close], indirect=True)
def test_the_tally_counts_retries_apart_from_failures(server: tuple[int, list[int]]) -> None:
    with Load(server[0], threads=1, keep_alive=True, max_requests=5) as load:
        # All five, counted from zero: wait_requests counts from its call, after some ran.
        wait_for(lambda: load.tally.ok + load.tally.failed >= 5, what="five requests")
    assert load.tally.ok == 5 and load.tally.failed == 0
    assert load.tally.retried == 4 and "4 retried" in load.tally.summary()


def test_builds_are_read_from_json_with_or_without_spaces() -> None:
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    assert classify(head + b'{"build":"N1","pid":3}') == ("ok", "N1")  # Node's stringify
    assert classify(head + b'{"build": "A"}') == ("ok", "A")
