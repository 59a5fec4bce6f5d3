"""Mode "http" under seeded mutations of request and response framing (issue 19).

A generator (seeded, so every run sends the same bytes; ``MUTATION_SEED`` picks another
run) mutates well-formed requests — line ends, whitespace, duplicated or added framing
headers, lengths, chunk sizes, versions, smuggling shapes, how the bytes are split — and
asks the color for mutated responses. A recording color parses everything it receives
with llhttp (strict) and answers each request with its target in ``X-Answers``. Invariants:

- the color receives only well-formed requests, each one of the requests the client's
  bytes of that case hold as llhttp (strict) frames them — a request hidden in a body
  ("smuggled") never reaches it;
- every response the client reads answers one of those requests, in the order it sent
  them, and none twice;
- no forwarding header a client wrote (``X-Forwarded-For: 6.6.6.6``, ``X_Forwarded_For``…)
  reaches the color: the client is not a trusted proxy;
- the router never crashes and keeps serving other clients.

The checker returns what it saw broken rather than asserting, so that the negative controls
at the end can run it against routers that break a rule on purpose and show it notices.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest

from switcher import state as files
from switcher.model import Color
from tests.ports import port_block
from tests.routerkit import Router, blue_live, write_settings

_ports = itertools.cycle(port_block(__name__, 9))
SEED = int(os.environ.get("MUTATION_SEED", "19"))
CASES = 300
TAG = re.compile(rb"/k(\d+)x")
CLAIM = b"6.6.6.6"  # the address every forwarding header of the mutations claims


# -- the recording color -----------------------------------------------------------------------

class _Requests:
    def __init__(self) -> None:
        self.url = b""
        self.done: list[bytes] = []
        self.claims: list[bytes] = []  # forwarding headers that carry CLAIM

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower().replace(b"_", b"-")  # as a WSGI server reads it
        if CLAIM in value and (key.startswith(b"x-forwarded-") or
                               key in (b"forwarded", b"x-real-ip")):
            self.claims.append(name + b": " + value)

    def on_message_complete(self) -> None:
        self.done.append(self.url)
        self.url = b""


class RecordingColor:
    def __init__(self, port: int) -> None:
        self.urls: list[bytes] = []
        self.errors: list[str] = []
        self.claims: list[bytes] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(256)
        self.open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reqs = _Requests()
        parser = httptools.HttpRequestParser(reqs)
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError as e:
                    with self.lock:
                        self.errors.append(f"{e!r} in {data[:300]!r}")
                    return
                with self.lock:
                    self.claims += reqs.claims
                reqs.claims.clear()
                while reqs.done:
                    url = reqs.done.pop(0)
                    with self.lock:
                        self.urls.append(url)
                    if not self._answer(conn, url):
                        return
        with self.lock:
            self.open.discard(conn)

    def _answer(self, conn: socket.socket, url: bytes) -> bool:
        """Answer; False: a mutated response was sent and the connection ends."""
        if b"/resp-" not in url:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Answers: %s\r\nContent-Length: %d\r\n\r\n%s"
                         % (url, len(url), url))
            return True
        conn.sendall(mutated_response(random.Random(url), url))
        return False

    def stop(self) -> None:
        self.sock.close()
        with self.lock:
            for conn in list(self.open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


def mutated_response(rng: random.Random, url: bytes) -> bytes:
    body = b"answer"
    head = [b"HTTP/1.1 200 OK", b"X-Answers: " + url]
    framing = rng.choice([
        [b"Content-Length: 6"], [b"Content-Length: 7"], [b"Content-Length: 5"],
        [b"Content-Length: 6", b"Content-Length: 7"], [b"Content-Length: 6, 6"],
        [b"Transfer-Encoding: chunked"], [b"Transfer-Encoding: chunked, gzip"],
        [b"Transfer-Encoding: gzip, chunked"], [b"Transfer-Encoding: xchunked"],
        [b"Transfer-Encoding: chunked", b"Content-Length: 6"], [],
    ])
    head += framing
    chunked = any(b"chunked" in f for f in framing)
    payload = (rng.choice([b"6", b"zz", b"6;" + b"e" * 100, b"7", b"-6"]) + b"\r\n" + body
               + b"\r\n0\r\n\r\n") if chunked else body
    out = b"\r\n".join(head) + b"\r\n\r\n" + payload
    for _ in range(rng.randrange(3)):
        out = rng.choice([
            lambda b: b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + b,
            lambda b: b.replace(b"\r\n", b"\n", 1),
            lambda b: b.replace(b" 200 OK", rng.choice([b" 2000 OK", b" 200", b"  200 OK"])),
            lambda b: b + b"HTTP/1.1 200 OK\r\nX-Answers: /unsolicited\r\n\r\n",
            lambda b: b.replace(b"X-Answers", b"X-Answers\x00", 1) if rng.random() < 0.3
            else b,
        ])(out)
    return out


# -- the mutated requests ----------------------------------------------------------------------

HEADERS = [
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding:  chunked", b"Transfer-Encoding: chunked, identity",
    b"transfer-encoding: CHUNKED", b" Transfer-Encoding: chunked",
    b"Transfer-Encoding\t: chunked", b"Content-Length: 3", b"Content-Length: 0",
    b"Host: other", b"Connection: close", b"Connection: upgrade", b"Upgrade: h2c",
    b"Upgrade: websocket", b"Expect: 100-continue", b"X_Forwarded_For: 6.6.6.6",
    b"X-Forwarded-For: 6.6.6.6", b"Content-Length: 5\r\nContent-Length: 6",
]


def base_request(rng: random.Random, tag: bytes) -> bytes:
    host = b"Host: t\r\n"
    return rng.choice([
        b"GET %s/a HTTP/1.1\r\n%s\r\n" % (tag, host),
        b"POST %s/b HTTP/1.1\r\n%sContent-Length: 5\r\n\r\nhello" % (tag, host),
        b"POST %s/c HTTP/1.1\r\n%sTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        % (tag, host),
        b"GET %s/d HTTP/1.1\r\n%s\r\nGET %s/e HTTP/1.1\r\n%s\r\n" % (tag, host, tag, host),
        b"GET %s/resp-%d HTTP/1.1\r\n%s\r\n" % (tag, rng.randrange(10**6), host),
        b"POST %s/f HTTP/1.1\r\n%sContent-Length: 38\r\n\r\n"
        b"GET %s/smuggled HTTP/1.1\r\nHost: t\r\n\r\n" % (tag, host, tag),
        b"GET %s/i HTTP/1.1\r\n%sX-Forwarded-For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n\r\n"
        % (tag, host),
        # CL.TE and TE.CL: both framings, each hiding a request from the other
        b"POST %s/g HTTP/1.1\r\n%sContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET %s/smuggled HTTP/1.1\r\nHost: t\r\n\r\n" % (tag, host, tag),
        b"POST %s/h HTTP/1.1\r\n%sTransfer-Encoding: chunked\r\nContent-Length: 42\r\n\r\n"
        b"0\r\n\r\nGET %s/smuggled HTTP/1.1\r\nHost: t\r\n\r\n" % (tag, host, tag),
    ])


def mutate(rng: random.Random, data: bytes) -> bytes:
    op = rng.randrange(9)
    if op == 0 and b"\r\n" in data:  # one line end bare
        at = rng.choice([m.start() for m in re.finditer(rb"\r\n", data)])
        return data[:at] + b"\n" + data[at + 2:]
    if op == 1:  # a stray byte
        at = rng.randrange(len(data) + 1)
        return data[:at] + rng.choice([b" ", b"\t", b"\x00", b"\x0b", b"\r", b"\n", b":",
                                       b",", b"\x7f", b"\xff"]) + data[at:]
    if op == 2:  # a lost byte
        at = rng.randrange(len(data))
        return data[:at] + data[at + 1:]
    if op == 3:  # a framing header added
        return data.replace(b"\r\n", b"\r\n" + rng.choice(HEADERS) + b"\r\n", 1)
    if op == 4:  # a header repeated
        lines = data.split(b"\r\n")
        if len(lines) > 2:
            at = rng.randrange(1, len(lines) - 1)
            lines.insert(at, lines[at])
        return b"\r\n".join(lines)
    if op == 5:
        return re.sub(rb"Content-Length: \d+", b"Content-Length: " + rng.choice(
            [b"0", b"4", b"6", b"-1", b"+5", b" 5", b"5 5", b"0x5", b"9" * 20]), data, count=1)
    if op == 6:
        return data.replace(b"HTTP/1.1", rng.choice(
            [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b"http/1.1"]), 1)
    if op == 7:
        return data.replace(b"5\r\nhello", rng.choice(
            [b"6\r\nhello", b"4\r\nhello", b"5;ext\r\nhello", b"05\r\nhello", b"0x5\r\nhello",
             b"5 \r\nhello", b"5;" + b"e" * 9000 + b"\r\nhello"]), 1)
    return re.sub(rb"(?m)^([A-Za-z-]+):", lambda m: m[1].swapcase() + b":", data, count=1)


def make_case(rng: random.Random, case: int) -> tuple[bytes, list[int]]:
    data = base_request(rng, b"/k%dx" % case)
    for _ in range(rng.randrange(4)):
        data = mutate(rng, data)
    cuts = sorted(rng.sample(range(1, len(data)), min(rng.randrange(3), len(data) - 1)))
    return data, cuts


# -- the client --------------------------------------------------------------------------------

class _Responses:
    def __init__(self) -> None:
        self.answers: list[bytes] = []
        self.current: bytes | None = None
        self.status = 0
        self.parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-answers":
            self.current = value

    def on_message_complete(self) -> None:
        assert self.parser is not None
        if self.parser.get_status_code() >= 200 and self.current is not None:
            self.answers.append(self.current)
        self.current = None


def exchange(port: int, data: bytes, cuts: list[int]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(OSError):
            for a, b in itertools.pairwise([0, *cuts, len(data)]):
                sock.sendall(data[a:b])
            sock.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
        return got


def answers(got: bytes) -> list[bytes]:
    parsed = _Responses()
    parser = parsed.parser = httptools.HttpResponseParser(parsed)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(got)  # a response the client could not parse fails the test
    return parsed.answers


def client_requests(data: bytes) -> list[bytes]:
    """The targets of the requests in ``data`` as llhttp (strict) frames them, up to the
    first error: the reference every response and every forwarded request must match."""
    reqs = _Requests()
    with contextlib.suppress(httptools.HttpParserError):  # Upgrade is one of its subclasses
        httptools.HttpRequestParser(reqs).feed_data(data)
    return reqs.done


# -- the checker ------------------------------------------------------------------------------

@dataclass
class Run:
    """What one run of the seeded cases saw."""

    violations: list[str] = field(default_factory=list)
    answered: int = 0  # cases the color answered at least once
    refused: int = 0  # cases the router refused (4xx)
    forwarded: int = 0  # requests the color received


def client_violations(data: bytes, got: bytes) -> tuple[list[bytes], list[str]]:
    """What the client read for one case's bytes (the requests answered), and the
    invariants that broke: every response answers a request it sent, in order, none twice."""
    try:
        seen = answers(got)
    except httptools.HttpParserError as e:
        return [], [f"the client could not parse its answer ({e}): {data!r} -> {got[:300]!r}"]
    targets = client_requests(data)
    problems = []
    if len(seen) != len(set(seen)):
        problems.append(f"a request answered twice: {data!r} -> {got[:300]!r}")
    if not all(a in targets for a in seen):
        problems.append(f"an answer to a request not sent: {data!r} -> {got[:300]!r}")
    elif seen != sorted(seen, key=targets.index):
        problems.append(f"answers out of order: {data!r} -> {got[:300]!r}")
    return seen, problems


def color_violations(color: RecordingColor, sent: dict[int, bytes]) -> list[str]:
    """The color got only well-formed requests the client's bytes held, and no forwarding
    header a client wrote."""
    with color.lock:
        errors, urls, claims = list(color.errors), list(color.urls), list(color.claims)
    problems = [f"the color could not parse what it received: {e}" for e in errors]
    # A mutation may hit a case's tag too (/k89/…, /,k289x/…), so a request is checked
    # against what every case sent: one hidden in case N's body (/kNx/smuggled) still
    # fails, as only case N holds its tag.
    framed = {url for data in sent.values() for url in client_requests(data)} | {b"/canary"}
    for url in urls:  # the color got only what a client sent
        if url not in framed:
            tag = TAG.match(url)
            data = sent.get(int(tag[1]), b"") if tag is not None else b""
            problems.append(f"the color received {url!r}, which no client sent (its case: "
                            f"{data!r})")
    problems += [f"a client's forwarding header reached the color: {c!r}" for c in claims]
    return problems


def canary(port: int) -> list[str]:
    try:
        got = exchange(port, b"GET /canary HTTP/1.1\r\nHost: t\r\n\r\n", [])
        if answers(got) == [b"/canary"]:
            return []
    except (OSError, httptools.HttpParserError) as e:
        got = repr(e).encode()
    return [f"the router stopped serving other clients: {got[:300]!r}"]


def check(r: Router, color: RecordingColor, cases: int = CASES, first: bool = False) -> Run:
    """Send the seeded cases through the router; ``first``: stop at the first checkpoint
    (every 25 cases) that saw a violation."""
    rng = random.Random(SEED)
    run = Run()
    sent: dict[int, bytes] = {}
    for case in range(cases):
        data, cuts = make_case(rng, case)
        sent[case] = data
        got = exchange(r.port, data, cuts)
        seen, problems = client_violations(data, got)
        run.violations += problems
        run.answered += bool(seen)
        run.refused += got.startswith(b"HTTP/1.1 4")
        if case % 25 == 24:
            run.violations += canary(r.port)
            if first and (run.violations or color_violations(color, sent)):
                break
    run.violations += canary(r.port)
    if r.proc.poll() is not None:
        run.violations.append(f"the router exited with {r.proc.returncode}")
    run.violations += color_violations(color, sent)
    with color.lock:
        run.forwarded = len(color.urls)
    return run


@pytest.fixture
def launch(tmp: Path) -> Iterator[Callable[..., tuple[Router, RecordingColor]]]:
    """Start a router in http mode (``program``: a variant of it) with a recording color."""
    started: list[tuple[Router, RecordingColor]] = []

    def launch_(program: list[str] | None = None,
                **settings: Any) -> tuple[Router, RecordingColor]:
        port, blue, green = next(_ports), next(_ports), next(_ports)
        env_dir = tmp / "state" / "app-test"
        env_dir.mkdir(parents=True, exist_ok=True)
        ports = {Color.blue: blue, Color.green: green}
        write_settings(env_dir, tmp, ports, mode="http", header_timeout=2.0, **settings)
        files.save_state(env_dir, blue_live())
        color = RecordingColor(blue)
        try:
            r = Router.spawn(tmp, port, ports, backlog=256, program=program)
        except BaseException:
            color.stop()
            raise
        started.append((r, color))
        r.notified(lambda m: "READY=1" in m)
        return r, color

    yield launch_
    for r, color in started:
        r.close()
        color.stop()
    for r, _ in started:
        assert "Traceback" not in r.stderr(), r.stderr()
        assert "Exception in" not in r.stderr(), r.stderr()


def test_mutated_framing_never_smuggles_misroutes_or_stops_the_router(
        launch: Callable[..., tuple[Router, RecordingColor]]) -> None:
    r, color = launch()
    run = check(r, color)
    assert not run.violations, run.violations[:5]
    # The mutations left enough requests to check, and enough refusals to mean something.
    assert run.forwarded > CASES // 4
    assert run.answered > CASES // 4 and run.refused > CASES // 10, run


# -- negative controls: the checker notices a router that breaks a rule -----------------------

# The router, its request parser made lenient as llhttp allows: a request with both
# Content-Length and Transfer-Encoding (the classic smuggling shape, RFC 9112 §6.1) is read.
LENIENT_ROUTER = """
import sys
import httptools

class Lenient(httptools.HttpRequestParser):
    def __init__(self, protocol):
        super().__init__(protocol)
        self.set_dangerous_leniencies(lenient_chunked_length=True)

httptools.HttpRequestParser = Lenient
from switcher.router.__main__ import main
sys.exit(main())
"""


@pytest.mark.parametrize(("variant", "expected"), [
    ({"program": [sys.executable, "-c", LENIENT_ROUTER]}, "the color could not parse"),
    ({"trusted_proxies": ("127.0.0.1",)}, "forwarding header reached the color"),
], ids=["lenient-framing", "client-trusted"])
def test_the_checker_sees_a_router_that_breaks_a_rule(
        launch: Callable[..., tuple[Router, RecordingColor]], variant: dict[str, Any],
        expected: str) -> None:
    r, color = launch(**variant)
    run = check(r, color, first=True)
    assert any(expected in v for v in run.violations), run.violations[:5]
