"""A bounded load client that classifies every failure: refused, reset, early EOF, timeout,
non-2xx. One new connection per request (the hard case for a switch), from a few threads,
until stopped or until its count or time bound is reached.

With ``record=True`` the tally also keeps every request as a ``Request(time, outcome,
build)`` (wall-clock completion time, so it lines up with history records), for a timeline.
Off by default: a long run would hold millions of them."""

from __future__ import annotations

import collections
import errno
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

REQUEST = b"GET / HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n"
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
    requests: list[Request] = field(default_factory=list)  # only with Load(record=True)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def summary(self) -> str:
        classes = ", ".join(f"{c} {self.failures.get(c, 0)}" for c in CLASSES)
        return (
            f"{self.ok + self.failed} requests, {self.failed} failed ({classes}); "
            f"worst latency {self.worst_latency * 1000:.0f} ms"
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
    ) -> None:
        self.port, self.timeout, self.record = port, timeout, record
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
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            with self._lock:
                if self.tally.ok + self.tally.failed >= self.max_requests:
                    return
            began = time.monotonic()
            outcome, build = one_request(self.port, self.timeout)
            took = time.monotonic() - began
            done = time.time()
            with self._lock:
                if self.record:
                    self.tally.requests.append(Request(done, outcome, build))
                self.tally.worst_latency = max(self.tally.worst_latency, took)
                if outcome == "ok":
                    self.tally.ok += 1
                    self.tally.builds[build] += 1
                else:
                    self.tally.failures[outcome] += 1
                    if len(self.tally.examples) < 10:
                        self.tally.examples.append(f"{outcome}: {build}")


def one_request(port: int, timeout: float) -> tuple[str, str]:
    """(class, build or detail) of one GET / on a new connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(REQUEST)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except TimeoutError:
        return "timeout", ""
    except ConnectionRefusedError:
        return "refused", ""
    except ConnectionResetError:
        return "reset", ""
    except OSError as exc:
        return ("reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else "other"), str(exc)
    return classify(data)


def classify(data: bytes) -> tuple[str, str]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return "eof", repr(data[:80])
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].startswith(b"2"):
        return "non2xx", repr(head[:80])
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        ),
        None,
    )
    if length is not None and len(body) < length:
        return "eof", f"{len(body)}/{length} body bytes"
    marker = b'"build": "'
    start = body.find(marker)
    build = (
        body[start + len(marker) : body.find(b'"', start + len(marker))].decode()
        if start >= 0
        else "?"
    )
    return "ok", build
