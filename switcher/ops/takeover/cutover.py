"""The critical section of a takeover, run by PID 1 rather than by the CLI.

``install --takeover`` starts this module as a transient service (``systemd-run``, then waits for
RESULT_FILE)::

    python -m switcher.ops.takeover.cutover LEGACY SOCKET LISTEN_ADDRESS PORT RESULT_FILE TIMEOUT

It stops LEGACY in the background, binds SOCKET (``systemctl start``) the moment LEGACY has
closed its listener (not when it has exited: it may drain for long), and writes
``{"ok": true, "bind_after_ms": …}`` to RESULT_FILE. If the port is not free within TIMEOUT
seconds or the socket does not start, it starts LEGACY again, writes ``{"ok": false,
"error": …}`` and exits 1.

Why a separate process under systemd: between the stop and the bind, nothing listens on the
public port. Run by the CLI, a CLI killed there (a lost SSH session, an OOM kill) would leave
the port closed for good; run by PID 1, the cut-over finishes, or LEGACY comes back, whatever
happens to the CLI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Protocol

PORT_POLL = 0.001  # seconds between bind attempts while LEGACY still holds the port


def port_free(listen: str, port: int) -> bool:
    """Whether the socket unit could bind ``listen`` now (SO_REUSEADDR, as systemd binds)."""
    if ":" in listen:
        host = listen.rsplit(":", 1)[0].strip("[]")
        candidates = [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
    else:  # a bare port: systemd binds [::] (dual-stack), or 0.0.0.0 without IPv6
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    for family, host in candidates:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and host == "::":
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            continue  # no IPv6 here: try the next way systemd would bind
        return True
    return False


class Systemctl:
    """How the cut-over drives PID 1: ``systemctl``. The unit tests give ``cut_over`` an
    in-memory stand-in instead, so they run this module's own logic."""

    def begin_stop(self, unit: str) -> subprocess.Popen[str]:
        """Start stopping ``unit`` in the background (it may drain for long)."""
        return subprocess.Popen(["systemctl", "stop", unit], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def start(self, unit: str) -> None:
        """Start ``unit``; RuntimeError with systemctl's words when it fails."""
        done = subprocess.run(["systemctl", "start", unit], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or f"systemctl start {unit} failed")


class Stopping(Protocol):
    returncode: int | None
    stderr: IO[str] | None

    def poll(self) -> int | None: ...
    def wait(self) -> int: ...


class Manager(Protocol):
    def begin_stop(self, unit: str) -> Stopping: ...
    def start(self, unit: str) -> None: ...


def cut_over(legacy: str, socket_unit: str, listen: str, port: int, timeout: float, *,
             manager: Manager | None = None) -> float:
    """Stop ``legacy``, bind ``socket_unit``; seconds from the stop to the bind. On failure
    ``legacy`` is started again and RuntimeError raised."""
    units = manager or Systemctl()
    began = time.monotonic()
    stopping = units.begin_stop(legacy)
    try:
        _wait_free(listen, port, stopping, timeout)
        units.start(socket_unit)
    except RuntimeError as exc:
        stopping.wait()
        with contextlib.suppress(RuntimeError):
            units.start(legacy)
        raise RuntimeError(f"{exc}; started {legacy} again") from None
    bound = time.monotonic() - began
    stopping.wait()  # the rest of LEGACY's own graceful stop
    return bound


def _wait_free(listen: str, port: int, stopping: Stopping, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_free(listen, port):
        if stopping.poll() is not None:
            if stopping.returncode != 0:
                said = stopping.stderr.read().strip() if stopping.stderr else ""
                raise RuntimeError(f"stopping the legacy unit failed: {said}")
            if not port_free(listen, port):
                raise RuntimeError(f"port {port} is still held after the legacy unit stopped")
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} was still held {timeout:g} s after the stop")
        time.sleep(PORT_POLL)


def main(argv: list[str], manager: Manager | None = None) -> int:
    legacy, socket_unit, listen, port, result, timeout = argv
    try:
        bound = cut_over(legacy, socket_unit, listen, int(port), float(timeout),
                         manager=manager)
    except RuntimeError as exc:
        _write(Path(result), {"ok": False, "error": str(exc)})
        print(f"cut-over failed: {exc}", file=sys.stderr)
        return 1
    _write(Path(result), {"ok": True, "bind_after_ms": round(bound * 1000, 1)})
    print(f"{legacy} stopped, {socket_unit} bound {bound * 1000:.0f} ms after the stop")
    return 0


def _write(path: Path, outcome: dict[str, object]) -> None:
    """Atomically: the CLI polls for the file and must never read half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(outcome) + "\n")
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
