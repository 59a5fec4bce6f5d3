"""Mode "http" against hostile and broken peers (issue 19): each test reproduces one finding.

The colors here are scripted: each connection runs a function the test gives, on a socket
whose every received byte is recorded, so a test decides exactly how a color misbehaves.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httptools
import pytest

from switcher import state as files
from switcher.model import Color
from tests.ports import port_block
from tests.routerkit import Router, blue_live, wait_for, write_settings

_ports = itertools.cycle(port_block(__name__, 30))

Script = Callable[["Peer"], None]


class Peer:
    """One connection the router opened to a scripted color."""

    def __init__(self, sock: socket.socket, record: Callable[[bytes], None]) -> None:
        self.sock = sock
        self.record = record
        self.buf = b""

    def head(self) -> bytes:
        """The next request head (through its blank line); EOFError at the end."""
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.record(data)
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class ScriptedColor:
    """127.0.0.1:port; connection n runs ``scripts[min(n, len - 1)]``."""

    def __init__(self, port: int, *scripts: Script) -> None:
        self.scripts = scripts
        self.received: list[bytes] = []
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(1024)
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def all_bytes(self) -> bytes:
        with self.lock:
            return b"".join(self.received)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                script = self.scripts[min(self.connections, len(self.scripts) - 1)]
                self.connections += 1
                self.open.add(conn)
            threading.Thread(target=self._serve, args=(conn, script), daemon=True).start()

    def _serve(self, conn: socket.socket, script: Script) -> None:
        try:
            with conn:
                script(Peer(conn, self._record))
        except (OSError, EOFError):
            pass
        finally:
            with self.lock:
                self.open.discard(conn)

    def _record(self, data: bytes) -> None:
        with self.lock:
            self.received.append(data)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            for conn in list(self.open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def start(tmp: Path) -> Iterator[Callable[..., tuple[Router, ScriptedColor]]]:
    """Start a router in http mode with blue live and scripted; wait for READY=1."""
    routers: list[Router] = []
    colors: list[ScriptedColor] = []

    def start_(*scripts: Script, **overrides: Any) -> tuple[Router, ScriptedColor]:
        port, blue, green = next(_ports), next(_ports), next(_ports)
        ports = {Color.blue: blue, Color.green: green}
        env_dir = tmp / "state" / "app-test"
        env_dir.mkdir(parents=True, exist_ok=True)
        write_settings(env_dir, tmp, ports, mode="http", **overrides)
        files.save_state(env_dir, blue_live())
        color = ScriptedColor(blue, *scripts)
        colors.append(color)
        r = Router.spawn(tmp, port, ports, backlog=1024)
        routers.append(r)
        r.notified(lambda m: "READY=1" in m)
        return r, color

    yield start_
    for r in routers:
        r.close()
    for c in colors:
        c.stop()
    for r in routers:
        assert "Traceback" not in r.stderr(), r.stderr()
        assert "Exception in" not in r.stderr(), r.stderr()


def client(r: Router, timeout: float = 5) -> socket.socket:
    return socket.create_connection(("127.0.0.1", r.port), timeout=timeout)


def read_response(sock: socket.socket, head_request: bool = False) -> tuple[bytes, bytes]:
    """(head, body) of one response framed by Content-Length, or by the end."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"EOF before a whole head; got {buf!r}")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if head_request or head.split(b" ")[1][:1] == b"1":
        return head, b""
    if length is None:
        while data := sock.recv(65536):
            body += data
        return head, body
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"EOF after {len(body)} of {length} body bytes")
        body += data
    return head, body[:length]


def status(head: bytes) -> int:
    return int(head.split(b" ")[1])


def ok(peer: Peer, body: bytes = b"ok") -> None:
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def serve_ok(peer: Peer) -> None:
    while True:
        peer.head()
        ok(peer)


# -- 1. response desync ------------------------------------------------------------------------

def test_a_response_head_split_inside_a_status_like_value_keeps_its_status(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    """The fast path must decide only on a whole head it read itself, not on the second
    read of a head httptools has begun."""
    sent_first = threading.Event()

    def split_head(peer: Peer) -> None:
        peer.head()
        peer.send(b"HTTP/1.1 403 Forbidden\r\nX-Note: ")
        sent_first.set()
        time.sleep(0.2)  # two reads for the router: nothing to wait on from here
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ndenied")
        serve_ok(peer)

    r, _ = start(split_head)
    with client(r) as c:
        c.sendall(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        head, body = read_response(c)
        assert status(head) == 403
        assert b"X-Note: HTTP/1.1 200 OK" in head
        assert body == b"denied"
        c.sendall(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
        head, body = read_response(c)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body == b"ok"


# -- 2. non-idempotent requests replayed -------------------------------------------------------

def serve_one_then_drop(peer: Peer) -> None:
    """Answer the first request; read the second, then close without answering."""
    peer.head()
    ok(peer)
    peer.head()


@pytest.mark.parametrize("method", ["POST", "PATCH", "DELETE", "PUT"])
def test_a_request_that_is_not_safe_is_never_sent_twice(
        start: Callable[..., tuple[Router, ScriptedColor]], method: str) -> None:
    r, color = start(serve_one_then_drop, serve_ok)
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status(read_response(c)[0]) == 200
        c.sendall(f"{method} /once HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".encode())
        head, _ = read_response(c)
    assert status(head) == 502
    assert color.all_bytes.count(f"{method} /once".encode()) == 1


def test_a_safe_bodiless_request_is_sent_again_on_a_new_connection(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, color = start(serve_one_then_drop, serve_ok)
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status(read_response(c)[0]) == 200
        c.sendall(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status(read_response(c)[0]) == 200
    assert color.all_bytes.count(b"GET /again") == 2


# -- 3. slow bodies and slow colors -----------------------------------------------------------

def reads_forever(peer: Peer) -> None:
    peer.head()
    while data := peer.sock.recv(65536):
        peer.record(data)


def test_a_stalled_request_body_gets_408_and_frees_both_connections(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, color = start(reads_forever, body_timeout=0.5, header_timeout=5, idle_timeout=5)
    clients = [client(r) for _ in range(20)]
    try:
        for c in clients:
            c.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n"
                      b"0123456789")
        for c in clients:
            head, _ = read_response(c)
            assert status(head) == 408
            assert c.recv(1) == b""  # then closed
        wait_for(lambda: not color.open, what="every color connection to close")
    finally:
        for c in clients:
            c.close()


def test_a_color_that_does_not_start_its_answer_gets_504_counted_as_a_failure(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, color = start(reads_forever, response_timeout=0.5)
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # the fast path
        assert status(read_response(c)[0]) == 504
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")  # the slow one
        assert status(read_response(c)[0]) == 504
    assert r.control({"cmd": "status"})["errors"]["blue"] == 2
    wait_for(lambda: not color.open, what="the color connections to close")


def test_a_body_held_back_by_a_color_that_does_not_read_is_not_timed_out(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    release = threading.Event()

    def slow_reader(peer: Peer) -> None:
        head = peer.head()
        release.wait(10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got = len(peer.buf)
        while got < length:
            data = peer.sock.recv(1 << 20)
            if not data:
                return
            got += len(data)
        ok(peer)

    r, _ = start(slow_reader, body_timeout=0.5)
    size = 64 << 20
    with client(r, timeout=10) as c:
        c.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        sender = threading.Thread(target=c.sendall, args=(b"x" * size,), daemon=True)
        sender.start()
        time.sleep(1.5)  # three body_timeouts while the color reads nothing
        release.set()
        sender.join(10)
        assert status(read_response(c)[0]) == 200


# -- 4. tunnels --------------------------------------------------------------------------------

def tunnel_echo(peer: Peer) -> None:
    head = peer.head()
    if head.startswith(b"CONNECT"):
        peer.send(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    else:
        peer.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\n\r\n")
    while data := peer.sock.recv(65536):
        peer.record(data)
        peer.send(data)


def test_connect_is_refused_unless_tunnels_allow_it(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, color = start(tunnel_echo)
    with client(r) as c:
        c.sendall(b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n")
        assert status(read_response(c)[0]) == 405
    assert color.connections == 0


@pytest.mark.parametrize("target", [b"/", b"example"])
def test_connect_needs_an_authority_target(
        start: Callable[..., tuple[Router, ScriptedColor]], target: bytes) -> None:
    r, color = start(tunnel_echo, tunnels=("websocket", "connect"))
    with client(r) as c:
        c.sendall(b"CONNECT %s HTTP/1.1\r\nHost: example:443\r\n\r\n" % target)
        assert status(read_response(c)[0]) == 400
    assert color.connections == 0


def test_connect_is_a_tunnel_when_allowed(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, _ = start(tunnel_echo, tunnels=("websocket", "connect"))
    with client(r) as c:
        c.sendall(b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n")
        assert status(read_response(c, head_request=True)[0]) == 200
        c.sendall(b"raw bytes")
        assert c.recv(100) == b"raw bytes"


@pytest.mark.parametrize(("tunnels", "offered"), [
    (("websocket",), b"h2c"),
    (("websocket", "h2c"), b"h2c"),  # never, whatever the settings say
    (("websocket",), b"echo"),
])
def test_an_upgrade_to_a_protocol_not_allowed_goes_as_an_ordinary_request(
        start: Callable[..., tuple[Router, ScriptedColor]], tunnels: tuple[str, ...],
        offered: bytes) -> None:
    r, color = start(tunnel_echo, tunnels=tunnels)
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  b"Upgrade: %s\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" % offered)
        head, _ = read_response(c, head_request=True)
        assert status(head) == 502  # the color's 101 answered nothing it was asked
    received = color.all_bytes
    assert received.startswith(b"GET / HTTP/1.1\r\n")
    assert b"upgrade" not in received.lower()
    assert b"HTTP2-Settings" not in received
    assert b"PRI *" not in received


def test_an_upgrade_to_an_allowed_protocol_is_a_tunnel(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, color = start(tunnel_echo)
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                  b"Upgrade: h2c, WebSocket\r\n\r\n")
        assert status(read_response(c, head_request=True)[0]) == 101
        c.sendall(b"frame")
        assert c.recv(100) == b"frame"
    assert b"Upgrade: WebSocket\r\n" in color.all_bytes


# -- 5. forwarding headers in every spelling ---------------------------------------------------

@pytest.mark.parametrize("name", [
    "X_Forwarded_For", "x_forwarded_for", "X-Forwarded-Host", "X_Forwarded_Proto",
    "X-Real-IP", "X_Real_Ip", "FORWARDED", "X-Forwarded-Port",
])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_forwarding_headers_in_any_spelling_from_an_untrusted_peer_are_dropped(
        start: Callable[..., tuple[Router, ScriptedColor]], name: str, fast: bool) -> None:
    r, color = start(serve_ok)
    extra = "" if fast else "Accept-Encoding: x\r\nTransfer-Encoding: chunked\r\n"
    body = b"" if fast else b"0\r\n\r\n"
    with client(r) as c:
        c.sendall(f"POST / HTTP/1.1\r\nHost: t\r\n{extra}{name}: 6.6.6.6\r\n\r\n".encode()
                  + body)
        assert status(read_response(c)[0]) == 200
    received = color.all_bytes
    assert b"6.6.6.6" not in received
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in received


# -- 6. transfer codings a color adds ----------------------------------------------------------

def gzip_chunked(peer: Peer) -> None:
    peer.head()
    peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
              b"4\r\nGZIP\r\n0\r\n\r\n")
    serve_ok(peer)


def test_a_transfer_coding_besides_chunked_reaches_the_client(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, _ = start(gzip_chunked)
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        buf = b""
        while not buf.endswith(b"0\r\n\r\n"):
            data = c.recv(65536)
            assert data, buf
            buf += data
    head = buf.partition(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding: gzip, chunked" in head


def test_a_transfer_coding_an_http10_client_cannot_read_is_a_502(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, _ = start(gzip_chunked)
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        head, _ = read_response(c)
    assert status(head) == 502


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked, gzip\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nGZIP\r\n0\r\n\r\n",
])
def test_bad_response_framing_before_any_byte_reached_the_client_is_a_502(
        start: Callable[..., tuple[Router, ScriptedColor]], framing: bytes) -> None:
    def broken(peer: Peer) -> None:
        peer.head()
        peer.send(b"HTTP/1.1 200 OK\r\n" + framing)
        with contextlib.suppress(OSError):
            peer.head()

    r, _ = start(broken, serve_ok)
    with client(r) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = read_response(c)
    assert status(head) == 502


# -- 7. HEAD after a 1xx -----------------------------------------------------------------------

def early_hints_then_head(peer: Peer) -> None:
    while True:
        peer.head()
        peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")


def test_head_answered_with_a_1xx_then_the_final_response(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    r, _ = start(early_hints_then_head)
    with client(r) as c:
        for _ in range(2):  # and the connection still serves
            c.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
            buf = b""
            while buf.count(b"\r\n\r\n") < 2:
                data = c.recv(65536)
                assert data, buf
                buf += data
            interim, final, rest = buf.split(b"\r\n\r\n", 2)
            assert status(interim) == 103
            assert status(final) == 200
            assert b"Content-Length: 1234" in final
            assert rest == b""


def test_a_body_after_a_head_answer_is_a_502(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    def head_with_body(peer: Peer) -> None:
        peer.head()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
        with contextlib.suppress(OSError):
            peer.head()

    r, _ = start(head_with_body, serve_ok)
    with client(r) as c:
        c.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = read_response(c, head_request=True)
    assert status(head) == 502


def test_a_bare_lf_head_answering_head_is_a_502_not_a_wait(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    def bare_lf(peer: Peer) -> None:
        peer.head()
        peer.send(b"HTTP/1.1 200 OK\nContent-Length: 4\n\n")
        with contextlib.suppress(OSError):
            peer.head()

    r, _ = start(bare_lf, serve_ok)
    with client(r, timeout=3) as c:
        c.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = read_response(c, head_request=True)
    assert status(head) == 502



# -- 9. chunk framing -------------------------------------------------------------------------

@pytest.mark.parametrize("pieces", [
    [b"5;" + b"e" * 4096 + b"\r\nhello\r\n"] * 64,  # 256 KiB of extensions
    [b"1\r\nx\r\n"] * 40000,  # a body in 1-byte chunks
], ids=["long-extensions", "tiny-chunks"])
def test_chunk_framing_is_bounded_by_the_data_it_frames(
        start: Callable[..., tuple[Router, ScriptedColor]], pieces: list[bytes]) -> None:
    r, _ = start(reads_forever)
    with client(r) as c:
        c.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(OSError):  # the router may stop reading once it refused
            for piece in pieces:
                c.sendall(piece)
        head, body = read_response(c)
    assert status(head) == 400
    assert b"chunk framing" in body


# -- 10. protocols other than HTTP/1.x ---------------------------------------------------------
# llhttp also reads RTSP/x.y and ICE/x.y start lines (and HTTP/2.0, HTTP/0.9) and tells only
# the version: test_llhttp_reads_these_protocols pins what it takes.

def _llhttp_takes(parser: type[httptools.HttpRequestParser | httptools.HttpResponseParser],
                  data: bytes) -> str | None:
    p = parser(object())
    try:
        p.feed_data(data)
    except httptools.HttpParserError:
        return None
    return p.get_http_version()


def test_llhttp_reads_these_protocols() -> None:
    """What the router must refuse itself; when llhttp changes, so must this list."""
    request = httptools.HttpRequestParser
    response = httptools.HttpResponseParser
    for line, version in [
        (b"SOURCE /x ICE/1.0", "1.0"), (b"SOURCE /x ICE/1.1", "1.1"),
        (b"OPTIONS /x RTSP/1.0", "1.0"), (b"GET /x RTSP/1.1", "1.1"), (b"GET /x RTSP/2.0", "2.0"),
        (b"GET /x HTTP/2.0", "2.0"), (b"GET /x HTTP/0.9", "0.9"), (b"GET /x", "0.9"),
        (b"GET   /x   HTTP/1.1", "1.1"), (b"GET /x HTTP/1.2", None), (b"GET /x HTTP/3.0", None),
        (b"GET /x ICE/1.0", None), (b"GET /x http/1.1", None), (b"GET /x PRI/1.0", None),
    ]:
        assert _llhttp_takes(request, line + b"\r\nHost: t\r\n\r\n") == version, line
    for line, version in [
        (b"ICE/1.0 200 OK", "1.0"), (b"RTSP/1.0 200 OK", "1.0"), (b"RTSP/2.0 200 OK", "2.0"),
        (b"HTTP/2.0 200 OK", "2.0"), (b"HTTP/0.9 200 OK", "0.9"), (b"ICE 200 OK", None),
        (b"HTTP/1.2 200 OK", None),
    ]:
        assert _llhttp_takes(response, line + b"\r\nContent-Length: 0\r\n\r\n") == version, line


NOT_HTTP = {
    "ICE": (b"SOURCE /x ICE/1.0\r\nHost: t\r\n\r\n", 400),
    "ICE/1.1": (b"SOURCE /x ICE/1.1\r\nHost: t\r\n\r\n", 400),
    "RTSP": (b"OPTIONS /x RTSP/1.0\r\nHost: t\r\n\r\n", 400),
    "RTSP/1.1 GET": (b"GET /x RTSP/1.1\r\nHost: t\r\nUser-Agent: a\r\n\r\n", 400),
    "RTSP asterisk, no header": (b"OPTIONS * RTSP/1.0\r\n\r\n", 400),
    "RTSP POST with a body": (b"POST /x RTSP/1.0\r\nContent-Length: 2\r\n\r\nab", 400),
    "RTSP between runs of spaces": (b"GET   /x    RTSP/1.1\r\nHost: t\r\n\r\n", 400),
    "RTSP/2.0": (b"GET /x RTSP/2.0\r\nHost: t\r\n\r\n", 400),
    "HTTP/2.0": (b"GET /x HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    "HTTP/0.9": (b"GET /x\r\n\r\n", 505),
}


def send_in_pieces(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    """Send ``data`` cut at ``cuts``, pausing between pieces so the router reads each alone
    (mostly: a test that needs it every time cuts once)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pause = 0.02 if len(cuts) < 5 else 0.002
    for a, b in itertools.pairwise([0, *cuts, len(data)]):
        sock.sendall(data[a:b])
        time.sleep(pause)


def cuts_for(how: str, data: bytes) -> list[int]:
    line_end = data.index(b"\r\n")
    return {
        "whole": [],
        "inside the protocol name": [data.rindex(b" ", 0, line_end) + 3],
        "after the request line": [line_end + 2],  # httptools has reported nothing yet
        "inside the first header": [line_end + 4],
        "byte by byte": list(range(1, len(data))),
    }[how]


@pytest.mark.parametrize("how", ["whole", "inside the protocol name", "after the request line",
                                 "inside the first header", "byte by byte"])
def test_a_request_line_of_another_protocol_is_refused_and_never_forwarded(
        start: Callable[..., tuple[Router, ScriptedColor]], how: str) -> None:
    r, color = start(serve_ok)
    for name, (request, expected) in NOT_HTTP.items():
        with client(r) as c:
            send_in_pieces(c, request, cuts_for(how, request))
            head, body = read_response(c)
        assert status(head) == expected, (name, head, body)
        if expected == 400:
            assert b"is not HTTP" in body, (name, body)
    assert color.connections == 0
    assert color.all_bytes == b""


@pytest.mark.parametrize("first", [
    b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
], ids=["bodiless", "length", "chunked"])
def test_a_request_line_of_another_protocol_behind_a_good_request_is_refused_in_turn(
        start: Callable[..., tuple[Router, ScriptedColor]], first: bytes) -> None:
    r, color = start(serve_ok)
    with client(r) as c:
        c.sendall(first + b"GET /x RTSP/1.1\r\nHost: t\r\n\r\n")
        got = b""
        while data := c.recv(65536):  # both answers, then the end
            got += data
    assert re.fullmatch(rb"HTTP/1\.1 200 OK\r\n.*?\r\n\r\nokHTTP/1\.1 400 Bad Request\r\n.*"
                        rb"RTSP/ is not HTTP.*", got, re.DOTALL), got
    assert color.all_bytes.count(b"/a HTTP/1.1\r\n") == 1
    assert b"/x" not in color.all_bytes


@pytest.mark.parametrize("request_", [
    b"SOURCE /x HTTP/1.1\r\nHost: t\r\n\r\n",  # an HTTP method too (Icecast's)
    b"GET  /x  HTTP/1.1\r\nHost: t\r\n\r\n",  # runs of spaces: llhttp takes them
    b"GET /x HTTP/1.1\r\nHost: t\r\nUser-Agent: VLC RTSP/1.0\r\nX-Say: GET / RTSP\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 17\r\n\r\nGET /x RTSP/1.0\r\n",
], ids=["SOURCE", "spaces", "protocol names in values", "a request line in the body"])
def test_http_requests_that_mention_other_protocols_still_pass(
        start: Callable[..., tuple[Router, ScriptedColor]], request_: bytes) -> None:
    """The negative control: what is HTTP/1.1 is forwarded, however it mentions RTSP."""
    r, color = start(serve_ok)
    with client(r) as c:
        c.sendall(request_)
        assert status(read_response(c)[0]) == 200
    assert b" /x HTTP/1.1\r\n" in color.all_bytes


@pytest.mark.parametrize(("spaces", "piece", "expected", "settings"), [
    (20_000, 10_000, 400, {}),
    (100_000, 10_000, 414, {}),  # more than a line and a header can take
    (20_000, 20_000, 414, {"max_header_bytes": 1024}),  # so is the first read alone
])
def test_a_request_line_padded_with_spaces_across_reads_is_still_read_whole(
        start: Callable[..., tuple[Router, ScriptedColor]], spaces: int, piece: int,
        expected: int, settings: dict[str, int]) -> None:
    """llhttp takes any number of spaces between the parts of a request line: the router holds
    a line across reads until it ends, up to a bound, so its protocol is never missed."""
    r, color = start(serve_ok, **settings)
    with client(r) as c:
        with contextlib.suppress(OSError):  # refused before the end: the rest may not go
            for n in range(spaces // piece):
                c.sendall(b"GET" * (n == 0) + b" " * piece)
                time.sleep(0.02)
            c.sendall(b"/x RTSP/1.1\r\nHost: t\r\n\r\n")
        head, _ = read_response(c)
    assert status(head) == expected
    assert color.connections == 0


def foreign_answers(peer: Peer) -> None:
    """Answer ``/N/how`` with status line N of FOREIGN_STATUS, sent the way ``how`` says."""
    head = peer.head()
    _, index, how = head.split(b" ")[1].split(b"/")
    line = FOREIGN_STATUS[int(index)]
    if head.startswith(b"HEAD"):
        response = line + b"\r\nContent-Length: 2\r\n\r\n"
    else:
        response = line + b"\r\nContent-Length: 2\r\n\r\nok"
    if how == b"after-1xx":
        response = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + response
    cut = line.index(b"/") if b"/" in line else 2
    for piece in ([response[:cut], response[cut:]] if how == b"split" else [response]):
        peer.send(piece)
        time.sleep(0.02)
    with contextlib.suppress(OSError):
        peer.head()  # until the router drops the connection


FOREIGN_STATUS = [b"ICE/1.0 200 OK", b"RTSP/1.0 200 OK", b"RTSP/1.1 200 OK", b"RTSP/2.0 200 OK",
                  b"HTTP/2.0 200 OK", b"HTTP/0.9 200 OK", b"ICE 200 OK"]  # llhttp refuses the last


@pytest.mark.parametrize("how", ["whole", "split", "after-1xx", "head"])
def test_a_response_of_another_protocol_is_a_502_counted_against_the_color(
        start: Callable[..., tuple[Router, ScriptedColor]], how: str) -> None:
    r, color = start(foreign_answers)
    method = b"HEAD" if how == "head" else b"GET"
    for index, line in enumerate(FOREIGN_STATUS):
        with client(r) as c:
            c.sendall(b"%s /%d/%s HTTP/1.1\r\nHost: t\r\n\r\n" % (method, index, how.encode()))
            head, _ = read_response(c, head_request=how == "head")
            while status(head) < 200:
                head, _ = read_response(c, head_request=how == "head")
        assert status(head) == 502, (line, head)
    assert r.control({"cmd": "status"})["errors"]["blue"] == len(FOREIGN_STATUS)
    assert color.connections == len(FOREIGN_STATUS)  # none was kept for the next request


# -- 8. memory of closed connections -----------------------------------------------------------

def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def accepted(pid: int, port: int) -> int:
    """Client connections the router holds: its sockets whose local port is ``port``
    (sd_notify opens a socket now and then: a plain count of descriptors would see it)."""
    fds = f"/proc/{pid}/fd"
    inodes = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            inodes.add(os.readlink(f"{fds}/{fd}").removeprefix("socket:[").rstrip("]"))
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "01" and \
                fields[9] in inodes:
            count += 1
    return count


def test_memory_of_closed_connections_comes_back_without_the_cycle_collector(
        start: Callable[..., tuple[Router, ScriptedColor]]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    try:
        r, _ = start(serve_ok, header_timeout=60, idle_timeout=60)
        pid = r.proc.pid
        unfinished = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n"
        after = []
        for _ in range(6):
            clients: list[socket.socket] = []
            try:
                for _ in range(10):  # in batches, so the accept queue never overflows
                    batch = [client(r) for _ in range(100)]
                    clients += batch
                    for c in batch:
                        for _ in range(60):
                            c.sendall(unfinished[:1024])
                    want = len(clients)
                    wait_for(lambda want=want: accepted(pid, r.port) >= want, timeout=20,
                             what=f"the router to accept {len(clients)} connections")
            finally:
                for c in clients:
                    c.close()
            wait_for(lambda: accepted(pid, r.port) == 0, timeout=20,
                     what="the router to close every connection")
            after.append(rss_mib(pid))
        assert max(after) - after[0] < 30, f"router RSS after each round, MiB: {after}"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
