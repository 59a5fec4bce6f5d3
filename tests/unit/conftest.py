"""Fixtures shared by the unit tests (the operations' helpers are in opskit.py)."""

from __future__ import annotations

import http.server
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from switcher.ops import checks
from switcher.ops.takeover import runner as takeover
from tests.unit.opskit import BLUE, GREEN


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def health_servers() -> Iterator[None]:
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", p), Healthy) for p in (BLUE, GREEN)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def no_host_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket and port checks read the real host; the health servers hold the ports."""
    monkeypatch.setattr(checks, "CHECKS", [c for c in checks.CHECKS
                                           if c not in (checks.socket_held,
                                                        checks.idle_port_free)])
    monkeypatch.setattr(takeover, "PREFLIGHT", tuple(c for c in takeover.PREFLIGHT
                                                     if c is not checks.idle_port_free))
