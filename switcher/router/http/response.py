"""How a color's response reaches the client: its head rebuilt, its body framed.

Responses are sent as HTTP/1.1; a body the color frames by chunks or by closing the
connection (an HTTP/1.0 app) reaches an HTTP/1.1 client chunked, so the client connection
stays open, and an HTTP/1.0 client raw, then closed. 1xx responses are relayed to HTTP/1.1
clients (``Expect: 100-continue`` is the app's to answer). httptools cannot be told a
response answers HEAD (MagicStack/httptools#47), so a response to HEAD, CONNECT or an
Upgrade is read head first (up to its blank line) by a fresh parser that is never shown
what follows.
"""

from __future__ import annotations

from typing import cast

import httptools
from httptools import HttpParserError, HttpParserUpgrade

from switcher.router.http.request import Request
from switcher.router.http.wire import (
    CHUNK_FRAMED,
    CHUNKED,
    CLOSE,
    CONNECT,
    CRLF,
    EOF_FRAMED,
    HEAD,
    HEAD_END,
    KEEP_ALIVE,
    LENGTH_FRAMED,
    MAX_RESPONSE_HEAD,
    NO_BODY,
    RESPONSE_LENGTHS,
    RESPONSE_WATCH,
    SEP,
    STATUS,
    UPGRADE,
    UPGRADE_REQUEST,
    drop_named,
    foreign_status_line,
    start_line_tail,
)


class Unsolicited(Exception):  # noqa: N818
    """A color sent a response nobody asked for."""


class ResponseReader:
    """The httptools callbacks of a connection to a color (:class:`.proxy.Upstream` is
    one): the response to ``request`` is read, its head rebuilt into ``out``."""

    __slots__ = ("buf", "chunk", "close_client", "done", "framing", "hdrs", "in_head", "interim",
                 "keep", "length", "line", "opened", "parser", "reason", "served", "started",
                 "status", "te", "tokens", "trailers", "upgrade")

    # Set by the connection.
    request: Request | None
    out: list[bytes]

    def last_before_stop(self) -> bool:
        """Whether the router stops and this response answers the client's last request."""
        raise NotImplementedError

    def init_reader(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.served = 0  # requests answered whole on this connection
        self.buf = b""
        self.started = self.done = self.interim = self.opened = False
        self.keep = self.close_client = self.in_head = False
        self.framing = self.status = 0
        self.reason = self.upgrade = b""
        self.hdrs: list[bytes] = []
        self.trailers: list[bytes] = []
        self.length: bytes | None = None
        self.te: bytes | None = None
        self.tokens: bytes | None = None
        self.chunk = b""  # the read being parsed
        self.line: bytes | None = None  # from a read that holds the status line being read

    def feed(self, data: bytes) -> None:
        """Parse a read of the color's; a status line is checked on the way (see wire)."""
        if self.line is not None:  # begun in an earlier read
            self.line += data
        self.chunk = data
        try:
            self.parser.feed_data(data)
        finally:
            self.chunk = b""
        if self.line is not None:
            self.line = start_line_tail(self.line)
            if len(self.line) > MAX_RESPONSE_HEAD:
                raise Unsolicited

    def on_message_begin(self) -> None:
        if self.request is None or self.done:
            raise Unsolicited
        self.line = self.chunk
        self.hdrs = []
        self.trailers = []
        self.length = self.te = self.tokens = None
        self.reason = self.upgrade = b""
        self.status = 0
        self.in_head = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.line is not None:
            self._check_status_line()  # it has ended
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
        if self.line is not None:
            self._check_status_line()
        self.status = status = self.parser.get_status_code()
        req = cast(Request, self.request)
        hdrs = self.hdrs
        if self.tokens is not None:
            drop_named(hdrs, self.tokens)
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
            self.framing = self._framing(status, req)  # may refuse: nothing sent yet
            self.started = True
        self._send_head(hdrs)

    def _check_status_line(self) -> None:
        """Only HTTP/1.0 and HTTP/1.1: llhttp also reads HTTP/2.0, HTTP/0.9, RTSP/1.0 and
        ICE/1.0 status lines; from a color, any of them is a broken answer (502)."""
        raw, self.line = cast(bytes, self.line), None
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.0", "1.1") or \
                foreign_status_line(raw, version, parser.get_status_code()) is not None:
            raise Unsolicited

    def _framing(self, status: int, req: Request) -> int:
        """How the body reaches the client; adds the framing and Connection headers."""
        hdrs = self.hdrs
        # Stopping: the last request received gets the Connection: close.
        keep = req.keep_alive and req.done and not self.last_before_stop()
        chunked = CHUNKED
        if req.kind == HEAD or status in (204, 304):
            framing = NO_BODY
        elif self.te is not None:
            chunked = self._codings(req, self.te)
            framing = CHUNK_FRAMED
        elif self.length is not None:
            framing = LENGTH_FRAMED
        else:
            framing = EOF_FRAMED
        if framing >= CHUNK_FRAMED:
            if req.http10:
                keep = False  # raw, and the end of the connection ends it
            else:
                hdrs.append(chunked)
        if req.kind >= UPGRADE_REQUEST:
            keep = False  # refused: what the client sent next was not parsed
        if not keep:
            hdrs.append(CLOSE)
            self.close_client = True
        elif req.http10:
            hdrs.append(KEEP_ALIVE)
        return framing

    @staticmethod
    def _codings(req: Request, te: bytes) -> bytes:
        """The Transfer-Encoding line for a body the color chunked: the codings besides
        chunked (gzip…) stay, as the body is still encoded by them."""
        codings, _, last = te.lower().rpartition(b",")
        if last.strip() != b"chunked":
            raise Unsolicited  # a coding the router cannot frame
        if not codings.strip(b" \t,"):
            return CHUNKED
        if req.http10:
            raise Unsolicited  # an HTTP/1.0 client cannot be told of them
        return b"Transfer-Encoding: %s, chunked\r\n" % te[:len(codings)].strip()

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
                if len(buf) > MAX_RESPONSE_HEAD or b"\n\n" in buf:
                    raise Unsolicited  # too long, or ended by bare LFs (llhttp refuses them)
                self.buf = buf
                return
            end += 4
            block, buf = buf[:end], buf[end:]
            self.parser = parser = httptools.HttpResponseParser(self)
            try:
                self.feed(block)
            except HttpParserUpgrade:
                pass
            except HttpParserError:
                if not self.opened:  # llhttp also "fails" on a 101 without Upgrade
                    raise
            if self.opened or self.status >= 200:
                break
            self.interim = False  # a 1xx before the final answer: read the next head
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
            self.feed(buf)  # a refused Upgrade/CONNECT: an ordinary response

