"""A bounded load client that classifies every failure: refused, reset, early EOF, timeout,
non-2xx. One new connection per request (the hard case for a switch), from a few threads,
until stopped or until its count or time bound is reached. With ``keep_alive=True`` each
thread keeps one connection open instead and, like browsers (RFC 9112 §9.3.1), sends its
GET again on a new connection when a reused one closes before any byte of the answer: the
tally counts those in ``retried``, never as failures.

With ``record=True`` the tally also keeps every request as a ``Request(time, outcome,
build)`` (wall-clock completion time, so it lines up with history records), for a timeline.
Off by default: a long run would hold millions of them."""

from __future__ import annotations

import collections
import errno
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

KEEP_ALIVE = b"GET / HTTP/1.1\r\nHost: load\r\n\r\n"
BUILD = re.compile(rb'"build": ?"([^"]*)"')  # json.dumps or Node's JSON.stringify
CLASSES = ("refused", "reset", "eof", "timeout", "non2xx", "other")


class Request(NamedTuple):
    time: float  # time.time() when it completed
    outcome: str  # "ok" or one of CLASSES
    build: str  # the build that answered ("" or a detail for a failure)


@dataclass
class Tally:
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    builds: collections.Counter[str] = field(default_factory=collections.Counter)
    worst_latency: float = 0.0
    examples: list[str] = field(default_factory=list)
    retried: int = 0  # keep-alive requests sent again after an idle connection closed
    requests: list[Request] = field(default_factory=list)  # only with Load(record=True)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def add(self, outcome: str, build: str) -> None:
        """Count one request's (class, build or detail); the caller holds the lock."""
        if outcome == "ok":
            self.ok += 1
            self.builds[build] += 1
        else:
            self.failures[outcome] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{outcome}: {build}")

    def summary(self) -> str:
        classes = ", ".join(f"{c} {self.failures.get(c, 0)}" for c in CLASSES)
        return (
            f"{self.ok + self.failed} requests, {self.failed} failed ({classes}); "
            f"worst latency {self.worst_latency * 1000:.0f} ms"
            + (f"; {self.retried} retried on a new connection" if self.retried else "")
        )


class Load:
    """``with Load(port) as load: ...`` then ``load.tally``."""

    def __init__(
        self,
        port: int,
        threads: int = 4,
        timeout: float = 3.0,
        max_seconds: float = 240,
        max_requests: int = 2_000_000,
        record: bool = False,
        keep_alive: bool = False,
    ) -> None:
        self.port, self.timeout, self.record = port, timeout, record
        self.keep_alive = keep_alive
        self.deadline = time.monotonic() + max_seconds
        self.max_requests = max_requests
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Tally:
        self._stop.set()
        for t in self._threads:
            t.join()
        return self.tally

    def wait_requests(self, count: int, timeout: float = 30) -> None:
        """Block until ``count`` more requests completed (so load really ran)."""
        target = self.tally.ok + self.tally.failed + count
        end = time.monotonic() + timeout
        while self.tally.ok + self.tally.failed < target:
            if time.monotonic() > end:
                raise AssertionError(f"load made no progress: {self.tally.summary()}")
            time.sleep(0.01)

    def _run(self) -> None:
        client = KeepAliveClient(self.port, self.timeout) if self.keep_alive else None
        try:
            self._requests(client)
        finally:
            if client is not None:
                client.close()

    def _requests(self, client: KeepAliveClient | None) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            with self._lock:
                if self.tally.ok + self.tally.failed >= self.max_requests:
                    return
            began = time.monotonic()
            if client is None:
                outcome, build = one_request(self.port, self.timeout)
            else:
                outcome, build = client.request()
                with self._lock:
                    self.tally.retried += client.retried
                client.retried = 0
            took = time.monotonic() - began
            done = time.time()
            with self._lock:
                if self.record:
                    self.tally.requests.append(Request(done, outcome, build))
                self.tally.worst_latency = max(self.tally.worst_latency, took)
                self.tally.add(outcome, build)


def one_request(port: int, timeout: float, path: str = "/", source: str = "",
                headers: str = "", host: str = "127.0.0.1") -> tuple[str, str]:
    """(class, build or detail) of one GET ``path`` on a new connection to ``host``, from
    the address ``source`` when given, with the extra header lines ``headers``
    ("Name: value\r\n"…)."""
    request = f"GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n{headers}\r\n"
    try:
        with socket.create_connection((host, port), timeout=timeout,
                                      source_address=(source, 0) if source else None) as sock:
            sock.sendall(request.encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError as exc:
        return failure(exc)
    return classify(data)


def failure(exc: OSError) -> tuple[str, str]:
    if isinstance(exc, TimeoutError):
        return "timeout", ""
    if isinstance(exc, ConnectionRefusedError):
        return "refused", ""
    if isinstance(exc, ConnectionResetError) or exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset", ""
    return "other", str(exc)


class KeepAliveClient:
    """One client's keep-alive connection. A GET sent on a reused connection that closes
    before any byte of its answer is sent again on a new one (RFC 9112 §9.3.1 allows it
    for idempotent requests: the server closed it while idle, as a retired color does)."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.sock: socket.socket | None = None
        self.retried = 0

    def request(self) -> tuple[str, str]:
        reused = self.sock is not None
        try:
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
            try:
                self.sock.sendall(KEEP_ALIVE)
            except (BrokenPipeError, ConnectionResetError):
                raise ClosedIdleError("reset") from None
            data, close = self._answer(self.sock)
        except ClosedIdleError as closed:
            self.close()
            if not reused:
                return closed.outcome, "closed before any byte of the answer"
            self.retried += 1
            return self.request()
        except OSError as exc:
            self.close()
            return failure(exc)
        except ValueError as exc:  # a Content-Length that is not a number
            self.close()
            return "other", str(exc)
        if close:
            self.close()
        return classify(data)

    def _answer(self, sock: socket.socket) -> tuple[bytes, bool]:
        """The whole answer (head and Content-Length body) and whether the server closes.
        Without a Content-Length the body runs to the close (the apps here send one)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = _recv_or_closed(sock, first=not data)
            if not chunk:
                return data, True
            data += chunk
        head = data.partition(b"\r\n\r\n")[0].lower()
        length = _content_length(head)
        if length is None:
            while chunk := sock.recv(65536):
                data += chunk
            return data, True
        while len(data.partition(b"\r\n\r\n")[2]) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
        return data, b"connection: close" in head

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class ClosedIdleError(Exception):
    """The connection closed before any byte of the answer: ``outcome`` "eof" or "reset"."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _recv_or_closed(sock: socket.socket, first: bool) -> bytes:
    """The next bytes of an answer; ClosedIdleError when the ``first`` read finds the
    connection closed."""
    try:
        chunk = sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        if first:
            raise ClosedIdleError("reset") from None
        raise
    if not chunk and first:
        raise ClosedIdleError("eof")
    return chunk


def _content_length(head: bytes) -> int | None:
    return next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                 if line.lower().startswith(b"content-length:")), None)


def classify(data: bytes) -> tuple[str, str]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return "eof", repr(data[:80])
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].startswith(b"2"):
        return "non2xx", repr(head[:80])
    length = _content_length(head)
    if length is not None and len(body) < length:
        return "eof", f"{len(body)}/{length} body bytes"
    found = BUILD.search(body)
    return "ok", found.group(1).decode() if found else "?"
