"""The rules a request head must pass before any of it goes to a color.

What the router adds to httptools (llhttp, strict by default: it already refuses CL+TE, a
repeated or invalid Content-Length, bad chunk sizes, obs-fold and bare LF):

- a request line beyond ``MAX_REQUEST_LINE`` → 414; headers beyond ``max_header_bytes``
  → 431 (httptools has no limit at all); versions other than 1.0/1.1 → 505;
- a request line of another protocol llhttp also reads (``SOURCE /x ICE/1.0``,
  ``OPTIONS * RTSP/1.0``) → 400, read from the raw bytes (httptools tells only the version);
- HTTP/1.1 without ``Host``, or any request with two → 400;
- ``Transfer-Encoding`` other than exactly ``chunked`` (or any in HTTP/1.0) → 400;
- an ``Upgrade``/``CONNECT`` request announcing a body → 400;
- ``CONNECT`` → 405 unless ``router.tunnels`` holds ``"connect"``, and 400 without a
  ``host:port`` target; ``Upgrade`` is forwarded only for the protocols in
  ``router.tunnels`` (``h2c`` never: its frames would bypass every rule here); a request
  offering none of them goes as an ordinary one, its connection's last.

A head is rebuilt on the way out: it keeps its version; hop-by-hop headers (``Connection``
and what it names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Transfer-Encoding``,
``Upgrade``) are dropped and the router writes its own (a client's ``Connection: close``
ends the client's connection, not the one to the color); chunked bodies are re-chunked
(extensions and trailers dropped). ``X-Forwarded-For``, ``X-Forwarded-Proto`` and
``Forwarded`` are added; incoming ones are kept (and appended to) only from
``trusted_proxies``, else replaced; from any other peer, every header whose name
normalizes (case, ``_`` for ``-``) to ``X-Forwarded-*``, ``Forwarded`` or ``X-Real-IP`` is
dropped. ``Alive-Switch-Preview`` is never forwarded, whatever its value: its value is kept
on the request (``preview``) for the router to compare with the preview token, as is a
trusted peer's incoming ``X-Forwarded-For`` (``xff``) for a canary's client key.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from dataclasses import dataclass
from typing import cast

import httptools

from switcher.model import RouterSettings
from switcher.router.activation import log
from switcher.router.http.wire import (
    CHUNKED,
    CLOSE,
    CONNECT,
    CRLF,
    HEAD,
    HEADERS_TOO_LARGE,
    KEEP_ALIVE,
    LAST_CHUNK,
    MAX_REQUEST_LINE,
    METHOD_NOT_ALLOWED,
    NOT_UPGRADED,
    PLAIN,
    PREVIEW,
    REQUEST_LENGTHS,
    REQUEST_WATCH,
    SEP,
    UPGRADE,
    UPGRADE_REQUEST,
    URI_TOO_LONG,
    VERSION_NOT_SUPPORTED,
    bad_request,
    drop_named,
    foreign_request_line,
    forwarding,
    is_forwarding,
    start_line_tail,
)

_now = time.monotonic
# What a request line held across reads may take beyond its target (method, spaces, version)
# and one header before it is refused as too long (llhttp takes any number of spaces).
LINE_SLACK = 256


class Reject(Exception):  # noqa: N818 - not an error of the router: an answer
    """Raised from a parser callback: answer ``response`` and close."""

    def __init__(self, response: bytes) -> None:
        super().__init__()
        self.response = response


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    idle_timeout: float
    max_header_bytes: int
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    body_timeout: float = 60.0
    response_timeout: float = 60.0
    upgrades: frozenset[bytes] = frozenset({b"websocket"})  # never h2c
    connect: bool = False

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> Limits:
        trusted = []
        for entry in settings.trusted_proxies:
            try:
                trusted.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                log("warning", f"trusted_proxies: {entry!r} is not an address or network; "
                               "ignored (its X-Forwarded-For will not be trusted)")
        tunnels = {t.lower().encode() for t in settings.tunnels}
        return cls(settings.header_timeout, settings.idle_timeout, settings.max_header_bytes,
                   tuple(trusted), settings.body_timeout, settings.response_timeout,
                   frozenset(tunnels - {b"connect", b"h2c"}), b"connect" in tunnels)

    def tunnelled(self, upgrade: bytes) -> bytes:
        """The protocols of an Upgrade header that may be tunnelled (b"": none)."""
        offered = [p.strip() for p in upgrade.split(b",")]
        return b", ".join(p for p in offered
                          if p.partition(b"/")[0].lower() in self.upgrades)

    def trusts(self, host: str) -> bool:
        if not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


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
    resent = False  # sent again once already (see Conn.upstream_lost)
    began = 0.0  # monotonic time its head was read whole (the duration runs from here)
    head = b""  # as sent upstream: a bodiless request may be sent again
    received = 0  # chunked: body bytes read so far
    framing = 0  # chunked: bytes of chunk framing read so far (roughly: see Conn)
    preview: bytes | None = None  # its Alive-Switch-Preview value (b"": sent twice)
    xff: bytes | None = None  # a trusted peer's incoming X-Forwarded-For

    def __init__(self) -> None:
        self.out: list[bytes] = []


class RequestReader:
    """The httptools callbacks of a client connection (:class:`.proxy.Conn` is one): each
    request's head is read, checked and rebuilt into a :class:`Request` on ``queue``."""

    __slots__ = ("begun", "chunk", "hdrs", "head_bytes", "head_chunks", "hosts", "in_head",
                 "length", "line", "preview", "req", "since", "te", "tokens", "upgrade", "url",
                 "xff", "xfp", "xfwd")

    # Set by the connection.
    limits: Limits
    parser: httptools.HttpRequestParser
    queue: collections.deque[Request]
    trusted: bool
    peer: str
    fwd: bytes

    def init_reader(self) -> None:
        self.req: Request | None = None  # the request being parsed
        self.since = _now()  # idle, or reading a head, since then
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
        self.preview: bytes | None = None
        self.head_bytes = 0  # exact: request line and header fields seen so far
        self.head_chunks = 0  # whole chunks read while a head was still incomplete
        self.begun = 0  # requests begun on this connection
        self.in_head = False
        self.chunk = b""  # the read being parsed (set by the connection around each feed)
        self.line: bytes | None = None  # from a read that holds the request line being read

    def reading(self, data: bytes) -> None:
        """Before a read is parsed: a request line begun in an earlier one goes on in it."""
        self.chunk = data
        if self.line is not None:
            self.line += data

    def line_unfinished(self) -> bool:
        """After a read was parsed with the request line still unchecked: keep what can be of
        it; False when that is longer than any head the router takes."""
        line = self.line = start_line_tail(cast(bytes, self.line))
        return len(line) <= MAX_REQUEST_LINE + LINE_SLACK + self.limits.max_header_bytes

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
        self.preview = None
        self.head_bytes = self.head_chunks = 0
        self.in_head = True
        self.line = self.chunk

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_REQUEST_LINE:
            raise Reject(URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.line is not None:
            self._check_line()  # the request line has ended
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
        if name[:1] in b"xXfF" and not self.trusted and is_forwarding(name):
            return  # X-Real-IP, X-Forwarded-Host, X_Forwarded_For…: the client's own claim
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
        elif key == PREVIEW:
            self.preview = value if self.preview is None else b""  # twice: matches nothing
        # keep-alive, proxy-connection, te: hop by hop, dropped

    def on_headers_complete(self) -> None:
        self.in_head = False
        req = cast(Request, self.req)
        req.began = _now()
        parser = self.parser
        self._check_head(req, parser.get_http_version())
        method = parser.get_method()
        hdrs = self.hdrs
        if self.tokens is not None:
            drop_named(hdrs, self.tokens)
        if parser.should_upgrade():
            if req.body:
                raise Reject(bad_request("an Upgrade or CONNECT request cannot have a body"))
            if method == b"CONNECT":
                self._check_connect()
                req.kind = CONNECT
            elif protocols := self.limits.tunnelled(self.upgrade):
                req.kind = UPGRADE_REQUEST
                hdrs += (UPGRADE, protocols, CRLF)
            else:
                # No protocol it may tunnel: an ordinary request, and the connection's last
                # (the parser stops at an Upgrade: what follows is never read).
                req.kind = NOT_UPGRADED
                hdrs.append(CLOSE)
        else:
            if method == b"HEAD":
                req.kind = HEAD
            req.keep_alive = keep = parser.should_keep_alive()
            req.fast = keep and req.kind == PLAIN and not req.http10
            if req.http10:
                # Even on a client's last request: the connection to the color may carry
                # another client's next (.pool); the router ends the client's after it.
                hdrs.append(KEEP_ALIVE)
        if req.chunked:
            hdrs.append(CHUNKED)
        hdrs.append(self._forwarding())
        hdrs.append(CRLF)
        hdrs.insert(0, b"%s %s HTTP/%s\r\n" % (method, self.url, b"1.0" if req.http10 else b"1.1"))
        req.head = head = b"".join(hdrs)
        req.out.append(head)
        req.ready = True
        self._keep_for_routing(req)

    def _keep_for_routing(self, req: Request) -> None:
        """What a canary or preview may steer the request by (read only when one is set)."""
        if self.preview is not None:
            req.preview = self.preview
        if self.trusted and self.xff is not None:
            req.xff = self.xff

    def _check_line(self) -> None:
        raw, self.line = cast(bytes, self.line), None
        protocol = foreign_request_line(raw, self.parser.get_method(), self.url)
        if protocol is not None:
            raise Reject(bad_request(f"{protocol.decode()} is not HTTP: the request line must "
                                     "end in HTTP/1.0 or HTTP/1.1"))

    def _check_connect(self) -> None:
        if not self.limits.connect:
            raise Reject(METHOD_NOT_ALLOWED)
        if self.url.startswith(b"/") or b":" not in self.url:
            raise Reject(bad_request("CONNECT needs a host:port target"))

    def _check_head(self, req: Request, version: str) -> None:
        """What llhttp lets through and the router does not: see the module docstring."""
        if self.line is not None:
            self._check_line()
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
        self.since = _now()  # body_timeout: the client is sending
        req = cast(Request, self.req)
        if req.chunked:
            req.received += len(body)
            req.out += (b"%x\r\n" % len(body), body, CRLF)
        else:
            req.out.append(body)

    def on_message_complete(self) -> None:
        req = cast(Request, self.req)
        if req.chunked:
            req.out.append(LAST_CHUNK)
        req.done = True
        self.since = _now()  # response_timeout runs from here
        self.req = None

    def _forwarding(self) -> bytes:
        if not self.trusted:
            return self.fwd
        return forwarding(self.peer, self.xff, self.xfp, self.xfwd)

