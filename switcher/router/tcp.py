"""One forwarded connection: bytes both ways between a client and a color.

    client ⇄ Link ─────── Upstream ⇄ color (host, port)
             (client side, owns the connection's state)

Each side writes what it reads straight into the other side's transport: asyncio Protocols,
not streams, so a chunk costs one callback and one ``write``. Flow control: when one side's
write buffer is full, the other side stops reading until it drains. Half-close: EOF from one
side becomes ``write_eof`` on the other, and both close once both directions have ended.
A running canary step picks the color per connection by the client's address
(:meth:`.routes.Routes.pick`). Until the color accepts, the client's first bytes are held
back: nothing has gone upstream, so a refused connection can still be sent to the fallback
color (a canary color that refuses falls back to the live one).

Both uvloop and asyncio set TCP_NODELAY on every TCP transport they create or accept.
A Link never writes a byte of its own into the stream: a client turned away (no live color,
too many connections, no color reachable) is closed, whatever mode the router is in by then.
"""

from __future__ import annotations

import asyncio
from typing import cast

from switcher.model import Color
from switcher.router.routes import Backend, Routes
from switcher.router.tally import Failure

# Colors listen on the same host: a connect either completes or is refused at once, unless
# the color is stuck (its accept queue full), where the kernel would retry SYNs for minutes.
CONNECT_TIMEOUT = 10.0
# Client bytes held while the color connects; beyond this the client is not read further.
HOLD_LIMIT = 256 * 1024


class Link(asyncio.Protocol):
    """The client side of one connection, on the color of ``backend`` (its account)."""

    __slots__ = ("backend", "client_eof", "closing", "connecting", "held", "held_paused",
                 "held_size", "routes", "timed_out", "transport", "tried", "upstream",
                 "upstream_eof")

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.transport: asyncio.Transport
        self.upstream: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.tried: list[Color] = []
        self.connecting: asyncio.Task[None] | None = None
        self.timed_out = False  # the color did not accept within CONNECT_TIMEOUT
        self.held: list[bytes] = []
        self.held_size = 0
        self.held_paused = False
        self.client_eof = False
        self.upstream_eof = False
        self.closing = False

    # -- the client's transport --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        routes = self.routes
        live = routes.live if routes.split is None else routes.pick(_peer(transport))
        if live is None or not routes.accept(self):
            self.close()  # no live color yet, or too many connections
            return
        self._assign(live)
        self.connecting = routes.loop.create_task(self._connect(live))

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
        elif self.backend is not None:
            self._hold(data)
        # else: turned away; what the client still sends is read and dropped

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None:
            if self.upstream_eof:
                self.close()  # both ways ended: close() sends the FIN, no shutdown() first
            else:
                upstream.write_eof()
            return True
        return self.backend is not None  # connecting: EOF goes upstream once connected

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        self.close(abort=exc is not None)
        self._forget()
        self.routes.gone(self)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream_eof:
            self.upstream.resume_reading()

    # -- called by the routing table --------------------------------------------------------

    @property
    def busy_on(self) -> Color | None:
        backend = self.backend
        return None if backend is None else backend.color

    def check(self, now: float) -> None:
        pass  # no timeouts in tcp mode

    def leave_idle(self, routes: Routes) -> None:
        pass  # a connection stays with its color until it ends or its drain time is over

    def stop(self) -> None:
        pass  # open connections finish, for restart_drain

    def release(self, expired: bool) -> None:
        pass  # tcp mode pauses by not accepting: no connection is ever held

    def cut(self) -> None:
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        """Close both sides (once); ``abort`` drops buffered data instead of flushing it."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            _close(upstream, abort)
        if not self.closing:
            self.closing = True
            _close(self.transport, abort)

    # -- the color's side --------------------------------------------------------------------

    def _assign(self, backend: Backend) -> None:
        old = self.backend
        if old is not None:
            old.inflight -= 1
        backend.inflight += 1
        self.backend = backend
        self.tried.append(backend.color)

    def _forget(self) -> None:
        backend = self.backend
        if backend is not None:
            backend.inflight -= 1
            self.backend = None

    async def _connect(self, backend: Backend) -> None:
        loop = self.routes.loop
        address = cast(tuple[str, int], backend.address)
        while True:
            # A plain timer, not asyncio.timeout(): that costs a Timeout object, task lookups
            # and three getpid() calls per connection, 5-9% of the router's CPU per new
            # connection (benchmarks/run --baseline: "CPU µs per new connection").
            timer = loop.call_later(CONNECT_TIMEOUT, self._connect_timed_out)
            try:
                await loop.create_connection(self._upstream, *address)
            except ConnectionRefusedError:
                # Nothing was sent yet: the table may name another color (live or fallback).
                other = self.routes.fallback(self.tried)
                if other is None:
                    break
                backend.failed(Failure.refused)
                self._assign(other)
                backend = other
                address = cast(tuple[str, int], other.address)
            except asyncio.CancelledError:
                if not self.timed_out:
                    raise  # close() while connecting
                break
            except OSError:
                break
            else:
                self.connecting = None
                return
            finally:
                timer.cancel()
        self.connecting = None
        backend.failed(Failure.timeout if self.timed_out else Failure.refused)
        self._forget()
        self.close()

    def _connect_timed_out(self) -> None:
        if self.connecting is not None:
            self.timed_out = True
            self.connecting.cancel()

    def _upstream(self) -> Upstream:
        return Upstream(self)

    def upstream_made(self, transport: asyncio.Transport) -> None:
        if self.closing:  # the client left while we were connecting
            transport.abort()
            return
        self.upstream = transport
        backend = self.backend
        if backend is not None:
            backend.total += 1
            backend.tally.connections += 1
        if self.held:
            if self.held_paused:
                self.held_paused = False
                self.transport.resume_reading()
            transport.write(b"".join(self.held))
            self.held.clear()
        if self.client_eof:
            transport.write_eof()

    def upstream_eof_received(self) -> bool:
        self.upstream_eof = True
        if self.client_eof:
            self.close()  # both ways ended: close() sends the FIN, no shutdown() first
        elif not self.closing:
            self.transport.write_eof()
        return True

    def upstream_lost(self, exc: BaseException | None) -> None:
        self.upstream = None
        if exc is not None or not self.closing:
            self.close(abort=exc is not None)

    def pause_client(self) -> None:
        if not self.closing:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if not self.closing and not self.client_eof:
            self.transport.resume_reading()

    def _hold(self, data: bytes) -> None:
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > HOLD_LIMIT and not self.held_paused:
            self.held_paused = True
            self.transport.pause_reading()


class Upstream(asyncio.Protocol):
    """The color side of one connection: forwards to the client, reports to its Link."""

    __slots__ = ("client", "link")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.client = link.transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.link.upstream_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def eof_received(self) -> bool:
        return self.link.upstream_eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.link.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.link.pause_client()

    def resume_writing(self) -> None:
        self.link.resume_client()


def _peer(transport: asyncio.BaseTransport) -> bytes:
    """The client's key for a canary split: its address (an IPv4 one as a v4-mapped IPv6
    peer shows it, written as IPv4, the same key either way)."""
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) else ""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host.encode()


def _close(transport: asyncio.Transport, abort: bool) -> None:
    if abort:
        transport.abort()
    else:
        transport.close()
