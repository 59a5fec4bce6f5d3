"""Mode "http": requests, not connections, go to the live color.

    client ⇄ Conn ─────── one request at a time ─────── Upstream ⇄ color (host, port)
             parses requests (httptools)                  parses responses (httptools)

A Conn reads the requests of one client connection and sends each to the color that is live
when the request's turn comes: the previous response has been relayed whole by then (requests
go upstream one at a time, as HAProxy sends them), so after a switch the *next* request of a
keep-alive connection goes to the new color, and the connection to the old one is closed. A
pipelined request waits behind the one in flight, and the client is not read further
meanwhile: responses keep their order across a switch and a client cannot queue unbounded
work. Bodies stream both ways with flow control; nothing is buffered whole. A switch never
closes a client connection.

Every refused request is answered and the connection closed; it is never forwarded (the
head goes upstream only after the whole chunk it arrived in has parsed cleanly). The rules
are :mod:`.request`'s, the response framing :mod:`.response`'s, the bytes :mod:`.wire`'s.

A running canary step sends a request to the canary color when its client's key (the peer,
or behind a trusted proxy the X-Forwarded-For hop it saw: :func:`.split.client_key`) falls
in the step's share; a request carrying the preview token goes to the preview color. The
fast path never sees either (it takes no X-Forwarded-* or Alive-Switch-Preview header, so
its client is the peer): while one is set, or a pause is, its requests are steered by
``_pump`` (``Routes.plain`` is the one check the hot path pays). A paused router holds a
request whose head is complete until ``resume`` (then it goes on) or the pause's end (then
503 with ``Retry-After: 1``).

A color that refuses the connection (nothing sent yet) is replaced by the fallback color
of DESIGN.md, the previous live color inside its window and never a color in its health
gate; failing that, 502. A connection the color closed before answering a byte of a
bodiless request of a safe method (GET, HEAD, OPTIONS, TRACE) is replaced and the request
sent again, once (a new connection that finds the color gone finds the fallback); any other
gets 502, never a second copy. A connection whose client has gone waits in the color's
pool for the next request of any client (:mod:`.pool`: only such a request takes one).

Upgrade (101) and CONNECT (2xx) turn the connection into a tunnel pinned to its color,
counted in flight until it ends; after a switch the router closes it, cleanly, when the old
color's drain window ends (:meth:`Conn.cut`). In flight (what "drained" waits for) means a
request sent and its response not relayed whole, or a tunnel.

Timeouts (checked by the router's sweep, :meth:`Conn.check`, so no request arms a timer):
a request's head must arrive within ``header_timeout`` (else 408; a connection that sends
nothing is closed then), and an idle keep-alive connection is closed after
``idle_timeout``. When the router stops, a connection idle for ``STOP_IDLE`` is closed and
a busy one gets ``Connection: close`` on the response to the last request it sent.

The common case takes a fast path (see FAST_REQUEST/FAST_RESPONSE): a whole plain head is
checked by one regex, a strict subset of what llhttp accepts, and relayed as it is; so is
a response framed by one Content-Length. Everything else goes through httptools.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from typing import cast

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from switcher.model import Color
from switcher.router.http.pool import Pool, resendable
from switcher.router.http.request import Limits, Reject, Request, RequestReader
from switcher.router.http.response import ResponseReader, Unsolicited
from switcher.router.http.wire import (
    BODY_TIMEOUT,
    BROKEN,
    CHUNK_FRAMING,
    CRLF,
    DRAIN_OVER,
    EOF_FRAMED,
    FAST_REQUEST,
    FAST_RESPONSE,
    HEAD_END,
    HEADERS_TOO_LARGE,
    MAX_REQUEST_LINE,
    NO_LIVE_COLOR,
    PAUSED,
    PLAIN,
    REQUEST_TIMEOUT,
    RESPONSE_TIMEOUT,
    TOO_MANY,
    UNREACHABLE,
    URI_TOO_LONG,
    bad_request,
    forwarding,
)
from switcher.router.routes import Backend, Routes
from switcher.router.split import client_key
from switcher.router.tally import Failure

# Client bytes held while no color can take them (connecting, or before an Upgrade's 101).
HOLD_LIMIT = 256 * 1024
CONNECT_TIMEOUT = 10.0  # see tcp.CONNECT_TIMEOUT
LINGER = 2.0  # seconds to read a turned-away client until its EOF (see Conn._linger)
# When the router stops, a keep-alive connection idle for longer than this is closed at
# once; one idle for less is likely sending its next request, which is answered (with
# Connection: close) rather than raced by a close.
STOP_IDLE = 0.25

_now = time.monotonic


class Conn(RequestReader, asyncio.Protocol):
    """The client side of one connection in http mode (its requests read by
    :class:`.request.RequestReader`)."""

    __slots__ = (
        "backend", "client_eof", "client_full", "closing", "connecting", "dead", "fresh", "fwd",
        "fwd_end", "held", "held_size", "limits", "lingering", "parser", "paused", "peer",
        "queue", "routes", "stopping", "transport", "trusted", "tunnel", "up", "up_full",
        "upgrading", "waiting",
    )

    def __init__(self, routes: Routes, limits: Limits) -> None:
        self.routes = routes
        self.limits = limits
        self.transport: asyncio.Transport
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Request] = collections.deque()
        self.init_reader()
        self.up: Upstream | None = None  # the connection to a color, if any
        self.connecting: asyncio.Task[None] | None = None
        self.backend: Backend | None = None  # where queue[0] is in flight, if it is
        self.tunnel = False
        self.held: list[bytes] = []  # client bytes after an Upgrade/CONNECT head
        self.held_size = 0
        self.fresh = True  # no request answered yet: header_timeout applies, not idle_timeout
        self.paused = self.up_full = self.client_full = self.client_eof = self.closing = False
        self.dead = False  # no further request is parsed (refused, upgrading, or the end)
        self.upgrading = False  # after an Upgrade/CONNECT head: hold bytes for the tunnel
        self.lingering = False
        self.stopping = False
        self.peer = ""
        self.trusted = False
        self.fwd = self.fwd_end = b""
        self.waiting = False  # its next request is held by a pause

    # -- the client's transport --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.routes.accept(self):
            self.dead = True
            self._linger(TOO_MANY)
            return
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else ""
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        self.peer = host
        self.trusted = self.limits.trusts(host)
        self.fwd = forwarding(host, None, None, None)
        self.fwd_end = self.fwd + CRLF

    def data_received(self, data: bytes) -> None:
        if not self.queue and not self.in_head and not self.dead and not self.tunnel and \
                data.endswith(HEAD_END) and self._fast(data):
            return
        if self.tunnel:
            up = self.up
            if up is not None and up.transport is not None:
                up.transport.write(data)
            return
        if self.dead:
            if self.upgrading:
                self._hold(data)
            return  # else refused: read and dropped
        continued, begun, reading = self.in_head, self.begun, self.req
        received = 0 if reading is None else reading.received
        self.reading(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as e:
            self.dead = self.upgrading = True  # what follows is the tunnel's, if agreed
            rest = data[e.args[0]:]
            if rest:
                self._hold(rest)
        except HttpParserCallbackError as e:
            context = e.__context__
            self._refuse(context.response if isinstance(context, Reject)
                         else bad_request(str(e)))
        except HttpParserError as e:
            self._refuse(bad_request(str(e) or "malformed request"))
        else:
            if continued and self.in_head and begun == self.begun:
                self._count_head(len(data))
            elif reading is not None and reading is self.req:
                self._count_framing(reading, len(data) - (reading.received - received))
            self._bound_line()
        self.chunk = b""  # not held while the connection waits
        self._pump()

    def _bound_line(self) -> None:
        """A request line still unchecked after a read is held for the next: not too much."""
        if self.line is not None and not self.line_unfinished():
            self._refuse(URI_TOO_LONG)

    def _count_head(self, size: int) -> None:
        """httptools keeps an unfinished header to itself, however long: count the chunks
        that were all head (the head's first chunk is bounded by its size)."""
        self.head_chunks += size
        if self.head_chunks > self.limits.max_header_bytes + MAX_REQUEST_LINE:
            self._refuse(HEADERS_TOO_LARGE)

    def _count_framing(self, req: Request, framing: int) -> None:
        """Chunk sizes, extensions and line ends may not outgrow the data they frame by
        more than CHUNK_FRAMING: that bounds extensions (httptools has no limit) and the
        cost of tiny chunks (a callback each)."""
        if not req.chunked:
            return
        req.framing += framing
        if req.framing > CHUNK_FRAMING + req.received:
            self._refuse(bad_request("chunk framing larger than the data it frames"))

    def _fast(self, data: bytes) -> bool:
        """Take a whole, plain, bodiless head read in one piece (see FAST_REQUEST)."""
        if len(data) > self.limits.max_header_bytes or FAST_REQUEST.fullmatch(data) is None:
            return False
        req = Request()
        req.ready = req.done = req.fast = True
        req.head = head = data[:-2] + self.fwd_end
        req.began = self.since = _now()  # response_timeout and the duration run from here
        self.queue.append(req)
        routes = self.routes
        up = self.up
        backend = routes.live if routes.plain else None  # else: _pump steers it
        if up is not None and backend is not None and up.backend is backend and \
                not up.eof and up.transport is not None and not self.paused:
            # Kept alive to the live color: straight there (what _pump would do, for less).
            self.backend = backend
            backend.inflight += 1
            backend.total += 1
            up.begin(req)
            up.transport.write(head)
        else:
            req.out.append(head)
            self._pump()
        return True

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.tunnel:
            up = self.up
            if up is None or up.eof or up.transport is None:
                self._close()
            else:
                up.transport.write_eof()
        elif self.lingering or (self.backend is None and not self._answerable()):
            self._close()
        elif self.queue and not self.queue[0].done:
            self._close(abort=True)  # a request cut short can never be answered
        return True  # half-closed: what is in flight is still answered, then the end

    def connection_lost(self, exc: BaseException | None) -> None:
        self._close(abort=exc is not None)
        self.routes.gone(self)
        # The parser holds our bound methods, and we hold it: without this, the memory of
        # a closed connection (an unfinished head: up to max_header_bytes) would come back
        # only when the cycle collector runs.
        del self.parser

    def pause_writing(self) -> None:
        self.client_full = True
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_full = False
        up = self.up
        if up is not None and up.transport is not None and not up.eof:
            up.transport.resume_reading()

    # -- sending requests to a color ---------------------------------------------------------

    def _pump(self) -> None:
        """Send what can be sent of the request at the head of the queue."""
        queue = self.queue
        while queue and not self.closing:
            req = queue[0]
            if not req.ready:
                break
            if req.canned is not None:
                self._answer(req.canned)
                return
            if self.backend is None:
                if not self.routes.plain and self._hold_for_pause():
                    break
                self._dispatch(req)
                continue
            up = self.up
            if req.out and up is not None and up.request is req:
                cast(asyncio.Transport, up.transport).writelines(req.out)
                req.out.clear()
            break
        self._flow()

    def _hold_for_pause(self) -> bool:
        routes = self.routes
        if not routes.paused:
            return False
        self.waiting = True
        routes.held.add(self)
        return True

    def release(self, expired: bool) -> None:
        """The pause holding the next request is over: send it on, or (the pause ran out)
        answer it 503 with Retry-After, uncounted: it never reached a color."""
        self.waiting = False
        if self.closing or not self.queue:
            return
        req = self.queue[0]
        if expired:
            req.canned = PAUSED
        else:
            # Its timeouts and its duration run from now: a pause longer than
            # response_timeout must not turn into a 504, nor count as the color's slowness.
            req.began = self.since = _now()
        self._pump()

    def _steer(self, req: Request) -> Backend | None:
        """Where a request goes while a canary or a preview is set."""
        routes = self.routes
        preview = routes.preview
        if preview is not None and preview.matches(req.preview):
            return preview.target
        if routes.split is None:
            return routes.live
        return routes.pick(client_key(self.peer, req.xff, self.limits.trusts))

    def _dispatch(self, req: Request) -> None:
        routes = self.routes
        backend = routes.live if routes.plain else self._steer(req)
        if backend is None or backend.address is None:
            req.canned = NO_LIVE_COLOR
            return
        self.backend = backend
        backend.inflight += 1
        backend.total += 1
        up = self.up
        if up is not None:
            if up.backend is backend and up.reusable():
                up.begin(req)
                return
            self.up = None
            up.close()
        if resendable(req) and (idle := backend.pool.take(_now())) is not None:
            self.up = up = cast(Upstream, idle)
            up.attach(self, req)
            return
        self.connecting = self.routes.loop.create_task(self._open(backend))

    async def _open(self, backend: Backend) -> None:
        loop = self.routes.loop
        tried = []
        failure = Failure.refused  # how the last color tried failed, unless it timed out
        while True:
            tried.append(backend.color)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.create_connection(functools.partial(Upstream, self, backend),
                                                 *cast(tuple[str, int], backend.address))
            except ConnectionRefusedError:
                # Nothing was sent: the fallback color may take it (never any other color).
                other = self.routes.fallback(tried)
                if other is None or other.address is None or self.backend is not backend:
                    break
                backend.failed(Failure.refused)
                backend.inflight -= 1
                other.inflight += 1
                other.total += 1
                self.backend = backend = other
            except TimeoutError:
                failure = Failure.timeout
                break
            except OSError:
                break
            else:
                return  # (upstream_made let go of this task: another may be running now)
        self.connecting = None
        backend.failed(failure)
        if self.backend is backend:
            self._fail(UNREACHABLE)

    def upstream_made(self, up: Upstream) -> None:
        # Made: nothing is left to cancel. Cancelling the connect's task from here on (its
        # client leaves before it resumes) makes uvloop close the transport without a
        # connection_lost: a dead connection the pool would hand to the next request.
        self.connecting = None
        if self.closing or self.backend is not up.backend or not self.queue:
            cast(asyncio.Transport, up.transport).abort()
            return
        self.up = up
        up.begin(self.queue[0])
        if self.client_full:
            cast(asyncio.Transport, up.transport).pause_reading()
        self._pump()

    # -- what colors answer (called by Upstream) ---------------------------------------------

    def response_done(self, up: Upstream) -> None:
        req = self.queue.popleft()
        backend = self.backend
        now = _now()
        if backend is not None:  # (_release, inlined: this runs for every response)
            backend.inflight -= 1
            backend.tally.answered(up.status, now - req.began)
            self.backend = None
        up.request = None
        routes = self.routes
        current = up.backend is routes.live or (not routes.plain and
                                                routes.takes_work(up.backend))
        if up.keep and req.done and req.keep_alive and not up.close_client and \
                not self.queue and current and not (self.stopping or self.client_eof):
            # The usual end: both connections stay, nothing waits (no need for _pump).
            self.since = now
            self.fresh = False
            if self.paused:
                self._flow()
            return
        if not (up.keep and req.done and current):
            # Not reusable, or the color is no longer live: its connection ends here.
            self.up = None
            up.close()
        if up.close_client or not req.keep_alive or \
                (self.client_eof and not self._answerable()):
            self._close()
            return
        self.since = now
        self.fresh = False
        self._pump()

    def upstream_lost(self, up: Upstream, exc: BaseException | None) -> None:
        if up is not self.up or self.closing:
            return
        self.up = None
        if self.tunnel:
            self._close(abort=exc is not None)
            return
        if self.backend is None or up.request is None:
            return  # an idle connection ended: the next request opens another
        req = self.queue[0]
        if up.started:
            up.backend.failed(Failure.reset)
            self._close(abort=True)  # the client must see its response was cut short
        elif not up.seen and resendable(req):
            # Nothing was read, nothing answered: send it again on a new connection, once.
            # Only a safe method: the app may have acted on anything else before closing
            # (RFC 9110 §9.2.2). A kept-alive connection closed as the request went out is
            # the color's keep-alive timeout racing ours; a new connection closed before a
            # byte is the color's failure (its listener closed with it queued, say), and the
            # new connect then finds the fallback if the color is gone, as nginx's
            # proxy_next_upstream does for idempotent requests.
            if not up.served:
                up.backend.failed(Failure.reset)
            req.resent = True
            self._release()
            req.out = [req.head]
            self._pump()
        else:
            up.backend.failed(Failure.reset)
            self._fail(BROKEN if up.seen else UNREACHABLE)

    def become_tunnel(self, up: Upstream) -> None:
        """The color agreed to an Upgrade or CONNECT: bytes flow both ways from now on."""
        self.tunnel = True
        self.upgrading = False
        if self.backend is not None and self.queue:
            self.backend.tally.answered(up.status, _now() - self.queue[0].began)
        self.queue.clear()
        up.request = None
        transport = cast(asyncio.Transport, up.transport)
        if self.held:
            transport.writelines(self.held)
            self.held.clear()
            self.held_size = 0
        if self.client_eof:
            transport.write_eof()
        self._flow()

    def color_eof(self) -> None:
        """The color half-closed its side of the tunnel."""
        if self.client_eof:
            self._close()
        else:
            self.transport.write_eof()

    def upstream_full(self, full: bool) -> None:
        self.up_full = full
        self._flow()

    # -- timeouts, switches, the end (called by the router) ----------------------------------

    @property
    def busy_on(self) -> Color | None:
        """The color of the request or tunnel in flight, if any."""
        backend = self.backend
        return None if backend is None else backend.color

    def check(self, now: float) -> None:
        """Apply the timeouts (called by the router's sweep): header_timeout and
        idle_timeout between requests, body_timeout and response_timeout in flight."""
        if self.closing or self.tunnel or self.waiting:
            return  # (held by a pause: its end answers it)
        if self.backend is not None:
            self._check_in_flight(now)
            return
        if self.dead:
            return
        queue = self.queue
        if self.stopping and not queue and now - self.since > STOP_IDLE:
            self._close()
            return
        if queue or self.fresh:
            if now - self.since > self.limits.header_timeout:
                if queue and not queue[0].ready:
                    self._refuse(REQUEST_TIMEOUT)
                    self._pump()
                else:
                    self._close()  # not a byte of a request: nothing to answer
        elif now - self.since > self.limits.idle_timeout:
            self._close()

    def _check_in_flight(self, now: float) -> None:
        """``since`` is when the client last sent body bytes, or when its request ended."""
        queue = self.queue
        if not queue or self.lingering:
            return
        req, up = queue[0], self.up
        if not req.done:
            # Only while the client is read: a color that does not read holds the body back.
            if not self.paused and now - self.since > self.limits.body_timeout:
                if up is not None and up.started:
                    self._close(abort=True)  # its answer had begun: no room for ours
                else:
                    self._fail(BODY_TIMEOUT)
        elif (up is None or not up.seen) and now - self.since > self.limits.response_timeout:
            backend = cast(Backend, self.backend)
            backend.failed(Failure.timeout)
            self._fail(RESPONSE_TIMEOUT)

    def leave_idle(self, routes: Routes) -> None:
        """After a switch (or a canary or preview change): end an idle connection to a
        color that takes no new work."""
        up = self.up
        if up is not None and self.backend is None and not routes.takes_work(up.backend):
            self.up = None
            up.close()

    def cut(self) -> None:
        """The drain time of this connection's color is over (or the router stops)."""
        if self.closing:
            return
        if self.tunnel:
            self._close()  # flushed both ways, then FIN: a clean end
        elif self.backend is not None:
            up = self.up
            if up is not None and up.started:
                self._close(abort=True)
            else:
                self._fail(DRAIN_OVER)
        else:
            self._close()

    def stop(self) -> None:
        """The router stops: finish what is in flight and close after it; an idle connection
        is closed once it has been idle for STOP_IDLE (see check())."""
        self.stopping = True
        self.check(_now())

    # -- internals ---------------------------------------------------------------------------

    def _answerable(self) -> bool:
        """Whether a queued request can still be answered."""
        return any(req.ready for req in self.queue)

    def _refuse(self, response: bytes) -> None:
        """The request being read is refused: it is answered in its turn, then the end."""
        self.dead = True
        self.in_head = False
        self.line = None
        req = self.req
        if req is None:
            if self.queue and not self.queue[-1].keep_alive:
                return  # the client said that was its last request: this is noise
            req = Request()
            self.queue.append(req)
        self.req = None
        req.canned = response
        req.ready = True
        req.out.clear()
        if self.queue[0] is req and self.backend is not None:
            # Its head went upstream already (the body was bad): the color must not get
            # the rest, and will discard the request it cannot complete.
            up = self.up
            if up is not None and up.started:
                self._close(abort=True)  # its answer had begun: no room for ours
                return
            self._release()
            self.up = None
            if up is not None:
                up.close(abort=True)
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None

    def _fail(self, response: bytes) -> None:
        """The request in flight cannot be answered by a color: answer ``response``."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self._release()
        if self.queue:
            req = self.queue[0]
            req.canned = response
            req.ready = True
        up, self.up = self.up, None
        if up is not None:
            up.close(abort=True)
        self._pump()

    def _answer(self, response: bytes) -> None:
        self.queue.clear()
        self._release()
        up, self.up = self.up, None
        if up is not None:
            up.close()
        self._linger(response)

    def _linger(self, response: bytes) -> None:
        """Answer and close; until the client's EOF (or LINGER), read and drop what it
        sends: closing with unread bytes would reset the connection, which can destroy the
        answer before the client has read it."""
        self.dead = self.lingering = True
        self.upgrading = False
        self.held.clear()
        transport = self.transport
        transport.write(response)
        if self.client_eof:
            self._close()
            return
        transport.write_eof()
        self.routes.loop.call_later(LINGER, self._close)
        if self.paused:
            self.paused = False
            transport.resume_reading()

    def _release(self) -> None:
        backend = self.backend
        if backend is not None:
            backend.inflight -= 1
            self.backend = None

    def _hold(self, data: bytes) -> None:
        self.held.append(data)
        self.held_size += len(data)

    def _flow(self) -> None:
        """Read the client only while what it sends can go somewhere."""
        if self.closing or self.lingering:
            return
        queue = self.queue
        if self.tunnel:
            pause = self.up_full
        elif self.dead:
            pause = self.held_size > HOLD_LIMIT
        elif not queue or not queue[0].ready:
            pause = False
        elif len(queue) > 1:
            pause = True
        else:
            up = self.up
            pause = self.up_full or up is None or up.request is not queue[0]
        if pause != self.paused:
            self.paused = pause
            if not pause:
                self.since = _now()  # body_timeout counts only while the client is read
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _close(self, abort: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self._release()
        self.queue.clear()
        up, self.up = self.up, None
        if up is not None:
            up.release(abort)
        if abort:
            self.transport.abort()
        else:
            self.transport.close()


class Upstream(ResponseReader, asyncio.Protocol):
    """The color side: one connection, one request at a time; relays each response (read
    by :class:`.response.ResponseReader`)."""

    __slots__ = ("backend", "client", "conn", "eof", "idle_since", "out", "pool", "remaining",
                 "request", "seen", "transport")

    def __init__(self, conn: Conn, backend: Backend) -> None:
        self.conn = conn
        self.backend = backend
        self.client = conn.transport
        self.transport: asyncio.Transport | None = None
        self.request: Request | None = None
        self.out: list[bytes] = []
        self.init_reader()
        self.eof = False
        self.remaining = 0  # fast path: body bytes still to relay as they come
        self.seen = False
        self.pool: Pool | None = None  # while idle in its color's pool (see .pool)
        self.idle_since = 0.0

    def begin(self, req: Request) -> None:
        self.request = req
        self.seen = self.started = self.done = self.interim = self.opened = False
        self.keep = self.close_client = False
        self.framing = 0

    def last_before_stop(self) -> bool:
        conn = self.conn
        return conn.stopping and len(conn.queue) == 1

    def reusable(self) -> bool:
        return self.transport is not None and not self.eof and not self.transport.is_closing()

    def attach(self, conn: Conn, req: Request) -> None:
        """Taken from the pool to carry ``req`` of ``conn``."""
        self.conn = conn
        self.client = conn.transport
        self.begin(req)
        if conn.client_full:
            cast(asyncio.Transport, self.transport).pause_reading()

    def release(self, abort: bool = False) -> None:
        """Its client connection ends: to the pool if it may carry another client's request
        (its last response whole and kept alive, its color taking new work), else closed."""
        conn = self.conn
        if abort or not self.keep or not self.done or self.request is not None or self.eof \
                or self.buf or conn.routes.stopping or not conn.routes.takes_work(self.backend):
            self.close(abort)
            return
        # conn.since is no later than the end of the last response (when the color's
        # keep-alive timer started): the age the pool sees is never less than the real one.
        self.idle_since = conn.since
        if not self.backend.pool.give(self, _now()):
            self.close()

    def close(self, abort: bool = False) -> None:
        self.request = None
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()

    # -- the color's transport ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.upstream_made(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn.tunnel:
            self.client.write(data)
            return
        req = self.request
        if req is None or self.done:
            self._broken()  # nothing was asked (idle in the pool: it leaves as it closes)
            return
        if self.remaining:
            self._relay(data)
            return
        # Only on the first read of a response: once httptools has begun a head, a later
        # read may start inside one of its values and look like a head of its own.
        if req.fast and req.done and not self.seen and self._fast(data):
            return
        self.seen = True
        began = self.started  # whether any of this response reached the client before
        try:
            if req.kind != PLAIN and not began:
                self._head_first(data)
            else:
                self.feed(data)
        except (HttpParserError, Unsolicited):
            if not self.done:
                if not began:  # its head is still ours: the client gets a 502 instead
                    self.started = False
                    self.out.clear()
                self._broken()
                return
            self.keep = False  # bytes after a whole response: relay it, drop the connection
        out = self.out
        if out:
            self.client.writelines(out)
            out.clear()
        if self.opened:
            conn.become_tunnel(self)
        elif self.done:
            conn.response_done(self)

    def _fast(self, data: bytes) -> bool:
        """Relay a whole head framed by Content-Length alone as it is (see FAST_RESPONSE)."""
        head = FAST_RESPONSE.match(data)
        if head is None:
            return False
        conn = self.conn
        length = int(head[1])
        body = len(data) - head.end()
        if body > length or conn.stopping or conn.dead:
            return False
        self.seen = self.started = True
        self.status = (data[9] - 48) * 100  # the class is all the tally needs
        self.client.write(data)
        if body == length:
            self.keep = self.done = True
            self.served += 1
            conn.response_done(self)
        else:
            self.remaining = length - body
        return True

    def _relay(self, data: bytes) -> None:
        """The rest of a fast response's body."""
        left = self.remaining
        keep = len(data) <= left  # what follows was not asked for: the connection ends
        if not keep:
            data = data[:left]
        self.client.write(data)
        self.remaining = left - len(data)
        if not self.remaining:
            self._fast_done(keep)

    def _fast_done(self, keep: bool) -> None:
        self.keep = keep
        self.done = True
        self.served += 1
        self.conn.response_done(self)

    def eof_received(self) -> bool:
        self.eof = True
        if self.pool is not None:
            self._lost_idle()  # the color's keep-alive timeout: closed, not reused
            return False
        conn = self.conn
        if conn.tunnel:
            if not conn.closing:
                conn.color_eof()
            return True
        if self.started and not self.done and self.framing == EOF_FRAMED:
            self._finish()  # an HTTP/1.0-style body: the connection's end is its end
            if self.out:
                self.client.writelines(self.out)
                self.out.clear()
            conn.response_done(self)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.pool is not None:
            self.pool.lost(self)  # no client is waiting on it
        else:
            self.conn.upstream_lost(self, exc)
        del self.parser  # the same cycle as Conn's (see Conn.connection_lost)

    def pause_writing(self) -> None:
        self.conn.upstream_full(True)

    def resume_writing(self) -> None:
        self.conn.upstream_full(False)

    def _lost_idle(self) -> None:
        """The color closed it while idle in the pool: out of the pool now, and closed."""
        cast(Pool, self.pool).lost(self)
        self.close()

    def _broken(self) -> None:
        """The color broke HTTP: drop the connection; the client gets 502 if it can."""
        transport = self.transport
        self.seen = True
        if transport is not None:
            transport.abort()

