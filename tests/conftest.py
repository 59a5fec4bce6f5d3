"""Shared by every test: sockets that say where they were opened.

A socket collected unclosed fails the run (``filterwarnings = error`` turns its
ResourceWarning into PytestUnraisableExceptionWarning), but the warning names only the
object, e.g. ``<socket.socket fd=12, family=2, type=1, proto=0, laddr=('0.0.0.0', 0)>``, and
it fires wherever the collector happens to run, often in another test. So every socket the
test process opens remembers the test code that opened it, and shows it in its repr::

    <OriginSocket ... opened at tests/unit/test_router_http.py:59 in __init__ ← ...>

A three-frame walk per socket: cheaper than tracemalloc, which would slow every allocation.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parents[1])
FRAMES = 3  # of the project's own code, innermost first


class OriginSocket(socket.socket):
    __slots__ = ("origin",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origin = _origin()

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, opened at {getattr(self, 'origin', '?')}>"


def _origin() -> str:
    frame = sys._getframe(2)  # the cheap way to the caller's frames
    found: list[str] = []
    while frame is not None and len(found) < FRAMES:
        path = frame.f_code.co_filename
        if path.startswith(ROOT) and "/.venv/" not in path:
            found.append(f"{path[len(ROOT) + 1:]}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return " ← ".join(found) or "outside the project"


socket.socket = OriginSocket  # type: ignore[misc]
