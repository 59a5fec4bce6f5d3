"""Switch latency, seen from outside the router.

The router serves blue (nginx) under a steady new-connection load (wrk, ``Connection:
close``). Green is :class:`Stamp`, a listener that notes the monotonic time of each accept
and closes. One trial: send ``switch green`` on an open control connection (time T0), read
the acknowledgement (T_ack), wait for green's first accept (T_first); then switch back to
blue and let the load settle. Reported: T_first − T0 (the switch latency: command → first
new connection on the new color) and T_ack − T0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from benchmarks.targets import CLIENT_CPU, SMALL_PATH, Target, pinned

SETTLE = 0.15  # seconds on blue between trials


class Stamp:
    """Green: accepts, notes when, closes. ``arm()`` then ``first_after(timeout)``."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(4096)
        self.sock.settimeout(0.1)
        self.port = port
        self.first: float | None = None
        self.armed_at = float("inf")
        self.accepted = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="stamp", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            if self.first is None and now >= self.armed_at:
                self.first = now
                self.accepted.set()
            conn.close()

    def arm(self) -> None:
        """Watch for the first accept from now on (a late one of an earlier trial is not it)."""
        self.first = None
        self.accepted.clear()
        self.armed_at = time.monotonic()

    def first_after(self, timeout: float) -> float | None:
        self.accepted.wait(timeout)
        return self.first

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


@dataclass
class Trial:
    ack_ms: float
    first_ms: float | None


class Control:
    """One open connection to the router's control socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""

    def ask(self, message: dict[str, object]) -> dict[str, object]:
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the router closed its control connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        reply: dict[str, object] = json.loads(line)
        if reply.get("ok") is not True:
            raise RuntimeError(f"the router refused {message}: {reply}")
        return reply

    def close(self) -> None:
        self.sock.close()


def measure(router: Target, stamp: Stamp, trials: int) -> list[Trial]:
    """``trials`` switches blue → green under load, each followed by a switch back."""
    assert router.control is not None
    seconds = trials * (SETTLE + 0.1) + 5
    load = subprocess.Popen(
        pinned(CLIENT_CPU, ["wrk", "-t1", "-c4", f"-d{seconds:.0f}s", "-H", "Connection: close",
                            f"{router.url}{SMALL_PATH}"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    control = Control(router.control)
    results = []
    try:
        time.sleep(0.5)  # the load is on
        for _ in range(trials):
            results.append(_trial(control, stamp))
            control.ask({"cmd": "switch", "target": "blue"})
            time.sleep(SETTLE)
    finally:
        control.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(load.pid, signal.SIGKILL)
        load.wait()
    return results


def _trial(control: Control, stamp: Stamp) -> Trial:
    stamp.arm()
    t0 = time.monotonic()
    control.ask({"cmd": "switch", "target": "green"})
    acked = time.monotonic()
    first = stamp.first_after(timeout=2.0)
    return Trial(ack_ms=(acked - t0) * 1000,
                 first_ms=None if first is None else (first - t0) * 1000)
