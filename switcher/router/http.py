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

What the router adds to httptools (llhttp, strict by default: it already refuses CL+TE, a
repeated or invalid Content-Length, bad chunk sizes, obs-fold and bare LF):

- a request line beyond ``MAX_REQUEST_LINE`` → 414; headers beyond ``max_header_bytes``
  → 431 (httptools has no limit at all); versions other than 1.0/1.1 → 505;
- HTTP/1.1 without ``Host``, or any request with two → 400;
- ``Transfer-Encoding`` other than exactly ``chunked`` (or any in HTTP/1.0) → 400;
- an ``Upgrade``/``CONNECT`` request announcing a body → 400;
- every refused request is answered and the connection closed; it is never forwarded (the
  head goes upstream only after the whole chunk it arrived in has parsed cleanly);
- response framing from the request it answers: httptools cannot be told a response answers
  HEAD (MagicStack/httptools#47), so a response to HEAD, CONNECT or an Upgrade is read head
  first (up to its blank line) by a fresh parser that is never shown what follows.

Framing on the way out: requests keep their version; chunked request bodies are re-chunked
(extensions and trailers dropped). Responses are sent as HTTP/1.1; a body the color frames
by chunks or by closing the connection (an HTTP/1.0 app) reaches an HTTP/1.1 client
chunked, so the client connection stays open, and an HTTP/1.0 client raw, then closed.
1xx responses are relayed to HTTP/1.1 clients (``Expect: 100-continue`` is the app's to
answer). Hop-by-hop headers (``Connection`` and what it names, ``Keep-Alive``,
``Proxy-Connection``, ``TE``, ``Transfer-Encoding``, ``Upgrade``) are not forwarded; the
router writes its own.

A color that refuses the connection (nothing sent yet) is replaced by the fallback color
of DESIGN.md, the previous live color inside its window and never a color in its health
gate; failing that, 502. A kept-alive connection the color closed just as a bodiless
request went out is replaced and the request sent again.

``X-Forwarded-For``, ``X-Forwarded-Proto`` and ``Forwarded`` are added to each request;
incoming ones are kept (and appended to) only from ``trusted_proxies``, else replaced.

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
import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Protocol, cast

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from switcher.model import Color, RouterSettings
from switcher.router.activation import log
from switcher.router.tcp import http_error

MAX_REQUEST_LINE = 8192
MAX_RESPONSE_HEAD = 256 * 1024  # a color's response head beyond this is broken
# Client bytes held while no color can take them (connecting, or before an Upgrade's 101).
HOLD_LIMIT = 256 * 1024
CONNECT_TIMEOUT = 10.0  # see tcp.CONNECT_TIMEOUT
LINGER = 2.0  # seconds to read a turned-away client until its EOF (see tcp.Link.refuse)
# When the router stops, a keep-alive connection idle for longer than this is closed at
# once; one idle for less is likely sending its next request, which is answered (with
# Connection: close) rather than raced by a close.
STOP_IDLE = 0.25

CRLF = b"\r\n"
SEP = b": "
HEAD_END = b"\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
UPGRADE = b"Connection: upgrade\r\nUpgrade: "


def bad_request(why: str) -> bytes:
    return http_error("400 Bad Request", f"bad request: {why}")


URI_TOO_LONG = http_error("414 URI Too Long", f"request line longer than {MAX_REQUEST_LINE}")
HEADERS_TOO_LARGE = http_error("431 Request Header Fields Too Large", "headers too large")
REQUEST_TIMEOUT = http_error("408 Request Timeout", "request headers took too long")
VERSION_NOT_SUPPORTED = http_error("505 HTTP Version Not Supported", "HTTP/1.0 and 1.1 only")
NO_LIVE_COLOR = http_error("503 Service Unavailable", "no live color yet")
TOO_MANY = http_error("503 Service Unavailable", "too many connections")
UNREACHABLE = http_error("502 Bad Gateway", "the live color could not be reached")
BROKEN = http_error("502 Bad Gateway", "the live color sent an invalid response")
DRAIN_OVER = http_error("504 Gateway Timeout", "no response before the drain time ended")

# Request headers the router reads or replaces; header names of other lengths are never
# lowercased (most are not these).
REQUEST_WATCH = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
    b"proxy-connection", b"te", b"upgrade", b"x-forwarded-for", b"x-forwarded-proto",
    b"forwarded",
})
RESPONSE_WATCH = frozenset({
    b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
    b"proxy-connection", b"upgrade",
})
REQUEST_LENGTHS = frozenset(len(name) for name in REQUEST_WATCH)
RESPONSE_LENGTHS = frozenset(len(name) for name in RESPONSE_WATCH)
# Connection tokens that name no header to remove.
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})

# Never removed because a Connection header names them.
KEPT = frozenset({b"", b"host", b"content-length"})
# Request kinds: how the response is framed, and whether it may become a tunnel.
PLAIN, HEAD, UPGRADE_REQUEST, CONNECT = range(4)

STATUS = {code: b"HTTP/1.1 %d " % code for code in range(100, 1000)}

# The fast path: a head that arrives whole in one read and matches FAST_REQUEST (a strict
# subset of what llhttp accepts: a known method, an origin-form target, HTTP/1.1, token
# names, values of HTAB/SP/VCHAR/obs-text, CRLF only, exactly one Host and none of the
# headers the router acts on) is relayed as it is plus the forwarding headers; a response
# whose head matches FAST_RESPONSE (framed by one Content-Length alone) is relayed as it
# is. Anything else goes through httptools. tests/unit/test_router_http.py checks that
# llhttp reads whatever these match the same way.
# Possessive loops (nothing is given back: a name holds no ':', a value no CR) and the
# name lookahead only for fields whose first letter could start a watched name: the
# response match took 1.6 us per nginx head before, 1.1 after.
_FIELD = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[\t\x20-\x7e\x80-\xff]*+\r\n"
_OTHER = rb"(?:(?![%s])%s|(?!(?i:%s):)%s)*+"
FAST_REQUEST = re.compile(
    rb"(?:GET|POST|PUT|DELETE|OPTIONS|PATCH) /[\x21-\x7e]{0,%d} HTTP/1\.1\r\n"
    rb"%s(?i:host):[\t\x20-\x7e\x80-\xff]*\r\n%s\r\n" % ((MAX_REQUEST_LINE - 20,) + (
        _OTHER % (b"hHcCtTkKpPuUeExXfF", _FIELD,
                  b"host|content-length|transfer-encoding|connection|keep-alive|te|trailer"
                  b"|proxy-connection|upgrade|expect|x-forwarded-for|x-forwarded-proto"
                  b"|forwarded", _FIELD),) * 2))
# "Connection: keep-alive" (nginx sends it on every response) only restates what HTTP/1.1
# means anyway, so it may pass as it is; any other Connection header takes the slow path.
_RESPONSE_OTHER = (
    rb"(?:(?![cCtTkKpPuU])%s|(?i:connection:[ \t]*keep-alive[ \t]*\r\n)|(?!(?i:%s):)%s)*+"
    % (_FIELD, b"content-length|transfer-encoding|connection|keep-alive|proxy-connection"
               b"|upgrade|trailer", _FIELD))
FAST_RESPONSE = re.compile(
    rb"HTTP/1\.1 (?!204|304)[2-5][0-9][0-9] [\t\x20-\x7e\x80-\xff]*+\r\n"
    rb"%s(?i:content-length):[ \t]*([0-9]{1,15})[ \t]*\r\n%s\r\n" % ((_RESPONSE_OTHER,) * 2))
_now = time.monotonic


class Reject(Exception):  # noqa: N818 - not an error of the router: an answer
    """Raised from a parser callback: answer ``response`` and close."""

    def __init__(self, response: bytes) -> None:
        super().__init__()
        self.response = response


class Unsolicited(Exception):  # noqa: N818
    """A color sent a response nobody asked for."""


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    idle_timeout: float
    max_header_bytes: int
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> Limits:
        trusted = []
        for entry in settings.trusted_proxies:
            try:
                trusted.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                log("warning", f"trusted_proxies: {entry!r} is not an address or network; "
                               "ignored (its X-Forwarded-For will not be trusted)")
        return cls(settings.header_timeout, settings.idle_timeout, settings.max_header_bytes,
                   tuple(trusted))

    def trusts(self, host: str) -> bool:
        if not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


class Backend:
    """One color as http mode sees it: where it listens and what it carries."""

    __slots__ = ("address", "color", "errors", "inflight", "total")

    def __init__(self, color: Color, address: tuple[str, int] | None = None) -> None:
        self.color = color
        self.address = address
        self.inflight = 0  # requests sent and not answered whole, and tunnels
        self.total = 0
        self.errors = 0


class Routes(Protocol):
    """What a connection asks of the router (:class:`switcher.router.server.Router`)."""

    loop: asyncio.AbstractEventLoop
    live: Backend | None  # where new requests go; None: no live color (503)

    def accept(self, conn: Conn) -> bytes | None: ...
    def fallback(self, tried: list[Color]) -> Backend | None: ...
    def gone(self, conn: Conn) -> None: ...


class Request:
    """One request of a client connection, from its first byte until its response is
    relayed whole. ``out`` holds what is still to be sent upstream."""

    # Immutable defaults live on the class: one is made for every request, and the fast
    # path sets just what differs (no __slots__: an instance then costs half as much).
    ready = False  # head parsed and checked: it may go upstream
    done = False  # received whole from the client
    canned: bytes | None = None  # answer this (an error) instead, then close
    kind = PLAIN
    http10 = False
    keep_alive = True
    chunked = False
    body = False
    fast = False  # its response may take the fast path
    head = b""  # as sent upstream: a bodiless request may be sent again

    def __init__(self) -> None:
        self.out: list[bytes] = []


class Conn(asyncio.Protocol):
    """The client side of one connection in http mode."""

    __slots__ = (
        "backend", "begun", "client_eof", "client_full", "closing", "connecting", "dead",
        "fresh", "fwd", "fwd_end", "hdrs", "head_bytes", "head_chunks", "held", "held_size",
        "hosts", "in_head", "length", "limits", "lingering", "parser", "paused", "peer", "queue",
        "req", "routes", "since", "stopping", "te", "tokens", "transport", "trusted", "tunnel",
        "up", "up_full", "upgrade", "upgrading", "url", "xff", "xfp", "xfwd",
    )

    def __init__(self, routes: Routes, limits: Limits) -> None:
        self.routes = routes
        self.limits = limits
        self.transport: asyncio.Transport
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Request] = collections.deque()
        self.req: Request | None = None  # the request being parsed
        self.up: Upstream | None = None  # the connection to a color, if any
        self.connecting: asyncio.Task[None] | None = None
        self.backend: Backend | None = None  # where queue[0] is in flight, if it is
        self.tunnel = False
        self.held: list[bytes] = []  # client bytes after an Upgrade/CONNECT head
        self.held_size = 0
        self.since = _now()  # idle, or reading a head, since then
        self.fresh = True  # no request answered yet: header_timeout applies, not idle_timeout
        self.paused = self.up_full = self.client_full = self.client_eof = self.closing = False
        self.dead = False  # no further request is parsed (refused, upgrading, or the end)
        self.upgrading = False  # after an Upgrade/CONNECT head: hold bytes for the tunnel
        self.lingering = False
        self.stopping = False
        self.peer = ""
        self.trusted = False
        self.fwd = self.fwd_end = b""
        # The head being parsed.
        self.url = b""
        self.hdrs: list[bytes] = []
        self.hosts = 0
        self.length: bytes | None = None
        self.te: bytes | None = None
        self.tokens: bytes | None = None
        self.upgrade = b""
        self.xff: bytes | None = None
        self.xfp: bytes | None = None
        self.xfwd: bytes | None = None
        self.head_bytes = 0  # exact: request line and header fields seen so far
        self.head_chunks = 0  # whole chunks read while a head was still incomplete
        self.begun = 0  # requests begun on this connection
        self.in_head = False

    # -- the client's transport --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        refusal = self.routes.accept(self)
        if refusal is not None:
            self.dead = True
            self._linger(refusal)
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
        continued, begun = self.in_head, self.begun
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
                # httptools keeps an unfinished header to itself, however long: count the
                # chunks that were all head (the head's first chunk is bounded by its size).
                self.head_chunks += len(data)
                if self.head_chunks > self.limits.max_header_bytes + MAX_REQUEST_LINE:
                    self._refuse(HEADERS_TOO_LARGE)
        self._pump()

    def _fast(self, data: bytes) -> bool:
        """Take a whole, plain, bodiless head read in one piece (see FAST_REQUEST)."""
        if len(data) > self.limits.max_header_bytes or FAST_REQUEST.fullmatch(data) is None:
            return False
        req = Request()
        req.ready = req.done = req.fast = True
        req.head = head = data[:-2] + self.fwd_end
        self.queue.append(req)
        up, backend = self.up, self.routes.live
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

    # -- parsing requests (httptools callbacks) ----------------------------------------------

    def on_message_begin(self) -> None:
        req = Request()
        self.req = req
        if not self.queue:
            self.since = _now()
        self.queue.append(req)
        self.begun += 1
        self.url = self.upgrade = b""
        self.hdrs = []
        self.hosts = 0
        self.length = self.te = self.tokens = self.xff = self.xfp = self.xfwd = None
        self.head_bytes = self.head_chunks = 0
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_REQUEST_LINE:
            raise Reject(URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self.head_bytes = self.head_bytes + len(name) + len(value) + 4
        if size > self.limits.max_header_bytes:
            raise Reject(HEADERS_TOO_LARGE)
        if not self.in_head:
            return  # a trailer: dropped
        if len(name) in REQUEST_LENGTHS:
            key = name.lower()
            if key in REQUEST_WATCH:
                self._watched(key, value)
                return
        self.hdrs += (name, SEP, value, CRLF)

    def _watched(self, key: bytes, value: bytes) -> None:
        if key == b"host":
            self.hosts += 1
            self.hdrs += (b"Host", SEP, value, CRLF)
        elif key == b"content-length":
            if self.length is not None:
                raise Reject(bad_request("repeated Content-Length"))
            self.length = value
            self.hdrs += (b"Content-Length", SEP, value, CRLF)
        elif key == b"transfer-encoding":
            if self.te is not None:
                raise Reject(bad_request("repeated Transfer-Encoding"))
            self.te = value
        elif key == b"connection":
            self.tokens = value if self.tokens is None else self.tokens + b"," + value
        elif key == b"upgrade":
            self.upgrade = value
        elif key == b"x-forwarded-for":
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif key == b"x-forwarded-proto":
            self.xfp = value
        elif key == b"forwarded":
            self.xfwd = value if self.xfwd is None else self.xfwd + b", " + value
        # keep-alive, proxy-connection, te: hop by hop, dropped

    def on_headers_complete(self) -> None:
        self.in_head = False
        req = cast(Request, self.req)
        parser = self.parser
        self._check_head(req, parser.get_http_version())
        method = parser.get_method()
        hdrs = self.hdrs
        if self.tokens is not None:
            _drop_named(hdrs, self.tokens)
        if parser.should_upgrade():
            if req.body:
                raise Reject(bad_request("an Upgrade or CONNECT request cannot have a body"))
            if method == b"CONNECT":
                req.kind = CONNECT
            else:
                req.kind = UPGRADE_REQUEST
                hdrs += (UPGRADE, self.upgrade, CRLF)
        else:
            if method == b"HEAD":
                req.kind = HEAD
            req.keep_alive = keep = parser.should_keep_alive()
            req.fast = keep and req.kind == PLAIN and not req.http10
            if not keep:
                if not req.http10:
                    hdrs.append(CLOSE)
            elif req.http10:
                hdrs.append(KEEP_ALIVE)
        if req.chunked:
            hdrs.append(CHUNKED)
        hdrs.append(self._forwarding())
        hdrs.append(CRLF)
        hdrs.insert(0, b"%s %s HTTP/%s\r\n" % (method, self.url, b"1.0" if req.http10 else b"1.1"))
        req.head = head = b"".join(hdrs)
        req.out.append(head)
        req.ready = True

    def _check_head(self, req: Request, version: str) -> None:
        """What llhttp lets through and the router does not: see the module docstring."""
        if version == "1.1":
            if self.hosts != 1:
                raise Reject(bad_request("HTTP/1.1 needs exactly one Host header"))
        elif version == "1.0":
            req.http10 = True
            if self.hosts > 1:
                raise Reject(bad_request("more than one Host header"))
        else:
            raise Reject(VERSION_NOT_SUPPORTED)
        if self.te is not None:
            if req.http10 or self.te.lower() != b"chunked":
                raise Reject(bad_request("Transfer-Encoding must be exactly 'chunked'"))
            req.chunked = req.body = True
        elif self.length is not None:
            req.body = self.length.strip(b"0") != b""

    def on_body(self, body: bytes) -> None:
        req = cast(Request, self.req)
        if req.chunked:
            req.out += (b"%x\r\n" % len(body), body, CRLF)
        else:
            req.out.append(body)

    def on_message_complete(self) -> None:
        req = cast(Request, self.req)
        if req.chunked:
            req.out.append(LAST_CHUNK)
        req.done = True
        self.req = None

    def _forwarding(self) -> bytes:
        if not self.trusted:
            return self.fwd
        return forwarding(self.peer, self.xff, self.xfp, self.xfwd)

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
                self._dispatch(req)
                continue
            up = self.up
            if req.out and up is not None and up.request is req:
                cast(asyncio.Transport, up.transport).writelines(req.out)
                req.out.clear()
            break
        self._flow()

    def _dispatch(self, req: Request) -> None:
        backend = self.routes.live
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
        self.connecting = self.routes.loop.create_task(self._open(backend))

    async def _open(self, backend: Backend) -> None:
        loop = self.routes.loop
        tried = []
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
                backend.errors += 1
                backend.inflight -= 1
                other.inflight += 1
                other.total += 1
                self.backend = backend = other
            except (OSError, TimeoutError):
                break
            else:
                self.connecting = None
                return
        self.connecting = None
        backend.errors += 1
        if self.backend is backend:
            self._fail(UNREACHABLE)

    def upstream_made(self, up: Upstream) -> None:
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
        if backend is not None:  # (_release, inlined: this runs for every response)
            backend.inflight -= 1
            self.backend = None
        up.request = None
        if up.keep and req.done and req.keep_alive and not up.close_client and \
                not self.queue and up.backend is self.routes.live and \
                not (self.stopping or self.client_eof):
            # The usual end: both connections stay, nothing waits (no need for _pump).
            self.since = _now()
            self.fresh = False
            if self.paused:
                self._flow()
            return
        if not (up.keep and req.done and up.backend is self.routes.live):
            # Not reusable, or the color is no longer live: its connection ends here.
            self.up = None
            up.close()
        if up.close_client or not req.keep_alive or \
                (self.client_eof and not self._answerable()):
            self._close()
            return
        self.since = _now()
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
            self._close(abort=True)  # the client must see its response was cut short
        elif up.served and not up.seen and req.done and not req.body and req.kind != CONNECT:
            # A kept-alive connection the color closed as the request went out: nothing was
            # read, nothing answered; send it again on a new connection.
            self._release()
            req.out = [req.head]
            self._pump()
        else:
            up.backend.errors += 1
            self._fail(BROKEN if up.seen else UNREACHABLE)

    def become_tunnel(self, up: Upstream) -> None:
        """The color agreed to an Upgrade or CONNECT: bytes flow both ways from now on."""
        self.tunnel = True
        self.upgrading = False
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
        """Apply header_timeout and idle_timeout (called by the router's sweep)."""
        if self.closing or self.dead or self.backend is not None or self.tunnel:
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

    def leave_idle(self, live: Backend | None) -> None:
        """After a switch: end an idle connection to a color that is no longer live."""
        up = self.up
        if up is not None and self.backend is None and up.backend is not live:
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
            up.close(abort)
        if abort:
            self.transport.abort()
        else:
            self.transport.close()


class Upstream(asyncio.Protocol):
    """The color side: one connection, one request at a time; relays each response."""

    __slots__ = (
        "backend", "buf", "client", "close_client", "conn", "done", "eof", "framing", "hdrs",
        "in_head", "interim", "keep", "length", "opened", "out", "parser", "reason", "remaining",
        "request", "seen", "served", "started", "status", "te", "tokens", "trailers",
        "transport", "upgrade",
    )

    def __init__(self, conn: Conn, backend: Backend) -> None:
        self.conn = conn
        self.backend = backend
        self.client = conn.transport
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.request: Request | None = None
        self.out: list[bytes] = []
        self.served = 0  # requests answered whole on this connection
        self.eof = False
        self.buf = b""
        self.remaining = 0  # fast path: body bytes still to relay as they come
        self.seen = self.started = self.done = self.interim = self.opened = False
        self.keep = self.close_client = self.in_head = False
        self.framing = self.status = 0
        self.reason = self.upgrade = b""
        self.hdrs: list[bytes] = []
        self.trailers: list[bytes] = []
        self.length: bytes | None = None
        self.te: bytes | None = None
        self.tokens: bytes | None = None

    def begin(self, req: Request) -> None:
        self.request = req
        self.seen = self.started = self.done = self.interim = self.opened = False
        self.keep = self.close_client = False
        self.framing = 0

    def reusable(self) -> bool:
        return self.transport is not None and not self.eof and not self.transport.is_closing()

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
            self._broken()  # nothing was asked
            return
        if self.remaining:
            self._relay(data)
            return
        if req.fast and req.done and not self.started and self._fast(data):
            return
        self.seen = True
        try:
            if req.kind != PLAIN and not self.started:
                self._head_first(data)
            else:
                self.parser.feed_data(data)
        except (HttpParserError, Unsolicited):
            if not self.done:
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
        self.conn.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        self.conn.upstream_full(True)

    def resume_writing(self) -> None:
        self.conn.upstream_full(False)

    # -- parsing responses (httptools callbacks) ---------------------------------------------

    def on_message_begin(self) -> None:
        if self.request is None or self.done:
            raise Unsolicited
        self.hdrs = []
        self.trailers = []
        self.length = self.te = self.tokens = None
        self.reason = self.upgrade = b""
        self.status = 0
        self.in_head = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            self.trailers += (name, SEP, value, CRLF)
            return
        if len(name) in RESPONSE_LENGTHS:
            key = name.lower()
            if key in RESPONSE_WATCH:
                if key == b"content-length":
                    self.length = value
                elif key == b"transfer-encoding":
                    self.te = value
                    return
                elif key == b"connection":
                    self.tokens = value if self.tokens is None else self.tokens + b"," + value
                    return
                elif key == b"upgrade":
                    self.upgrade = value
                    return
                else:
                    return  # keep-alive, proxy-connection
        self.hdrs += (name, SEP, value, CRLF)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.status = status = self.parser.get_status_code()
        req = cast(Request, self.request)
        hdrs = self.hdrs
        if self.tokens is not None:
            _drop_named(hdrs, self.tokens)
        if status == 101 or (req.kind == CONNECT and 200 <= status < 300):
            if req.kind != (CONNECT if status > 101 else UPGRADE_REQUEST):
                raise Unsolicited
            if status == 101:
                hdrs += (UPGRADE, self.upgrade, CRLF)
            self.opened = self.started = True  # a tunnel from the end of this head
        elif status < 200:
            self.interim = True
            if req.http10:
                return  # HTTP/1.0 clients get no 1xx
        else:
            self.started = True
            self.framing = self._framing(status, req)
        self._send_head(hdrs)

    def _framing(self, status: int, req: Request) -> int:
        """How the body reaches the client; adds the framing and Connection headers."""
        hdrs = self.hdrs
        conn = self.conn
        # Stopping: the last request received gets the Connection: close.
        keep = req.keep_alive and req.done and not (conn.stopping and len(conn.queue) == 1)
        if req.kind == HEAD or status in (204, 304):
            framing = NO_BODY
        elif self.te is not None:
            if self.te.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
                raise Unsolicited  # a coding the router cannot frame
            framing = CHUNK_FRAMED
        elif self.length is not None:
            framing = LENGTH_FRAMED
        else:
            framing = EOF_FRAMED
        if framing >= CHUNK_FRAMED:
            if req.http10:
                keep = False  # raw, and the end of the connection ends it
            else:
                hdrs.append(CHUNKED)
        if req.kind >= UPGRADE_REQUEST:
            keep = False  # refused: what the client sent next was not parsed
        if not keep:
            hdrs.append(CLOSE)
            self.close_client = True
        elif req.http10:
            hdrs.append(KEEP_ALIVE)
        return framing

    def _send_head(self, hdrs: list[bytes]) -> None:
        hdrs.insert(0, STATUS[self.status] + self.reason + CRLF)
        hdrs.append(CRLF)
        self.out.append(b"".join(hdrs))

    def on_body(self, body: bytes) -> None:
        if self.framing >= CHUNK_FRAMED and not cast(Request, self.request).http10:
            self.out += (b"%x\r\n" % len(body), body, CRLF)
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.keep = self.parser.should_keep_alive()
        self._finish()

    def _finish(self) -> None:
        if self.framing >= CHUNK_FRAMED and not cast(Request, self.request).http10:
            self.out.append(b"0\r\n")
            self.out += self.trailers
            self.out.append(CRLF)
        self.done = True
        self.served += 1

    def _head_first(self, data: bytes) -> None:
        """A response to HEAD, CONNECT or an Upgrade: read its head alone, then decide."""
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(HEAD_END)
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    raise Unsolicited
                self.buf = buf
                return
            end += 4
            block, buf = buf[:end], buf[end:]
            self.parser = parser = httptools.HttpResponseParser(self)
            try:
                parser.feed_data(block)
            except HttpParserUpgrade:
                pass
            except HttpParserError:
                if not self.opened:  # llhttp also "fails" on a 101 without Upgrade
                    raise
            if not self.interim:
                break
            self.interim = False  # a 1xx before the final answer
        self.buf = b""
        if self.opened:
            if buf:
                self.out.append(buf)  # the tunnel's first bytes
        elif cast(Request, self.request).kind == HEAD:
            if buf:
                raise Unsolicited  # nothing may follow the head of an answer to HEAD
            self.keep = parser.should_keep_alive()
            self.parser = httptools.HttpResponseParser(self)
            self.done = True
            self.served += 1
        elif buf:
            parser.feed_data(buf)  # a refused Upgrade/CONNECT: an ordinary response

    def _broken(self) -> None:
        """The color broke HTTP: drop the connection; the client gets 502 if it can."""
        transport = self.transport
        self.seen = True
        if transport is not None:
            transport.abort()


# Response framings, in this order (CHUNK and EOF are re-chunked for HTTP/1.1 clients).
NO_BODY, LENGTH_FRAMED, CHUNK_FRAMED, EOF_FRAMED = range(4)


def forwarding(peer: str, xff: bytes | None, xfp: bytes | None, fwd: bytes | None) -> bytes:
    """The forwarding headers for a request from ``peer``, extending the incoming ones
    (given only for a trusted peer)."""
    addr = peer.encode()
    node = b'"[%s]"' % addr if b":" in addr else addr
    element = b"for=%s;proto=http" % node
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nForwarded: %s\r\n" % (
        addr if xff is None else xff + b", " + addr,
        b"http" if xfp is None else xfp,
        element if fwd is None else fwd + b", " + element)


def _drop_named(hdrs: list[bytes], tokens: bytes) -> None:
    """Remove the headers a Connection header names (besides its options) from ``hdrs``
    (name, ": ", value, CRLF groups, then whole lines)."""
    names = {t.strip().lower() for t in tokens.split(b",")} - CONNECTION_OPTIONS - KEPT
    if not names:
        return
    i = 0
    while i + 3 < len(hdrs):
        if hdrs[i + 1] is SEP and hdrs[i].lower() in names:
            del hdrs[i:i + 4]
        elif hdrs[i + 1] is SEP:
            i += 4
        else:
            i += 1
