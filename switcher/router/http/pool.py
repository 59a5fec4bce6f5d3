"""Idle keep-alive connections to a color, kept for the next request of any client.

    Conn A ── its client leaves ── give(up) ──▶ Pool(color) [oldest … newest]  ≤ pool_size
    Conn B ── a new request ────── take() ◀──┘  (newest first: the least likely to be closed)

A client connection keeps its own connection to the color while it lives (keep-alive
clients never touch the pool); when it ends, a connection to the live color whose last
response was whole and let it stay open goes to the pool instead of being closed, and the
next request of any client connection takes it rather than opening one. That is what
HAProxy's ``http-reuse safe`` and nginx's upstream ``keepalive`` do, and what makes
short-lived clients cheap: no connect and no accept per request.

The color may close an idle connection whenever its own keep-alive timeout says (Node: 5 s),
so the rules make reuse safe by construction:

- a pooled connection's protocol watches its transport while idle: an EOF, a close or a
  stray byte takes it out of the pool at once (``lost``), whatever client used it last;
- ``take`` skips a connection whose transport is closing, or idle for ``pool_idle`` or more
  (below the apps' timeouts), and closes it; the router's sweep closes those too (``prune``);
- only a request that may be sent again (:func:`resendable`) goes on a reused connection:
  when the color closes it at the very moment it is reused, before a byte of the answer,
  the request goes again on a new connection (DESIGN.md Part 1), never to a client error;
- only the live color's connections are given; on a switch or reload the table closes every
  other color's at once (:meth:`Pool.clear`), so none is used after T0.

A pooled connection carries no request: the in-flight count and the drain never see it.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

from switcher.router.http.request import Request
from switcher.router.http.wire import CONNECT, SAFE_METHODS


class Idle(Protocol):
    """A connection to a color as the pool keeps it (:class:`.proxy.Upstream` is one)."""

    pool: Pool | None  # the pool holding it while idle, else None
    idle_since: float  # monotonic time, no later than the end of its last response
    transport: asyncio.Transport | None

    def close(self, abort: bool = False) -> None: ...


def resendable(req: Request) -> bool:
    """Whether ``req`` may be sent again when its connection closes before a byte of the
    answer: whole and bodiless, of a safe method (the app cannot have acted on it; RFC 9110
    §9.2.2), and not sent again already."""
    return req.done and not req.body and req.kind != CONNECT and not req.resent and \
        req.head.partition(b" ")[0] in SAFE_METHODS


class Pool:
    """One color's idle connections, newest last; at most ``size``, none older than ``idle``."""

    __slots__ = ("idle", "size", "waiting")

    def __init__(self, size: int = 0, idle: float = 0.0) -> None:
        self.size = size
        self.idle = idle
        self.waiting: collections.deque[Idle] = collections.deque()

    def __len__(self) -> int:
        return len(self.waiting)

    def give(self, up: Idle, now: float) -> bool:
        """Keep ``up`` for the next request; False (the caller closes it) if it is too old
        or the pool is off. A full pool closes its oldest instead."""
        transport = up.transport
        if self.size <= 0 or transport is None or transport.is_closing() or \
                transport.get_write_buffer_size() or now - up.idle_since >= self.idle:
            return False
        waiting = self.waiting
        if len(waiting) >= self.size:
            self._close(waiting.popleft())
        # Read while idle, whatever its last client asked: an EOF must reach lost() now.
        transport.resume_reading()
        up.pool = self
        waiting.append(up)
        return True

    def take(self, now: float) -> Idle | None:
        """The newest idle connection still fit to carry a request, if any."""
        waiting = self.waiting
        while waiting:
            up = waiting.pop()
            up.pool = None
            transport = up.transport
            if transport is not None and not transport.is_closing() and \
                    now - up.idle_since < self.idle:
                return up
            up.close()
        return None

    def lost(self, up: Idle) -> None:
        """``up`` saw an EOF, a close or a stray byte while idle: it is no longer kept."""
        up.pool = None
        # (at most size entries, and a loss is rare next to a take)
        if up in self.waiting:
            self.waiting.remove(up)

    def prune(self, now: float) -> None:
        """Close the connections idle for ``idle`` or more (the oldest are first)."""
        waiting = self.waiting
        while waiting and now - waiting[0].idle_since >= self.idle:
            self._close(waiting.popleft())

    def clear(self) -> None:
        """Close every idle connection (a switch, a reload, the end)."""
        waiting = self.waiting
        while waiting:
            self._close(waiting.popleft())

    def configure(self, size: int, idle: float) -> None:
        """New settings (a reload): what is kept now was kept under the old ones."""
        self.clear()
        self.size = size
        self.idle = idle

    @staticmethod
    def _close(up: Idle) -> None:
        up.pool = None
        up.close()
