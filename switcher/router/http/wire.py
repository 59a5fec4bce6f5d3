"""HTTP/1.x on the wire: bytes, canned answers, the fast-path regexes, forwarding headers.

Everything here is a constant or a pure function of bytes; :mod:`.request` and
:mod:`.response` apply it to heads, :mod:`.proxy` to connections. A canned answer is a
whole response the router writes itself, always ``Connection: close``::

    HTTP/1.1 503 Service Unavailable\r\n
    Content-Type: text/plain; charset=utf-8\r\n
    Content-Length: 18\r\n
    Connection: close\r\n
    \r\n
    no live color yet\n
"""

from __future__ import annotations

import re

MAX_REQUEST_LINE = 8192
MAX_RESPONSE_HEAD = 256 * 1024  # a color's response head beyond this is broken
# Bytes of chunk framing (sizes, extensions, line ends) a chunked request body may have
# beyond the bytes of data it frames: 32 MiB of extensions or a body in 1-byte chunks → 400.
CHUNK_FRAMING = 64 * 1024

CRLF = b"\r\n"
SEP = b": "
HEAD_END = b"\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
UPGRADE = b"Connection: upgrade\r\nUpgrade: "


def http_error(status: str, text: str, extra: str = "") -> bytes:
    body = f"{text}\n".encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


def bad_request(why: str) -> bytes:
    return http_error("400 Bad Request", f"bad request: {why}")


URI_TOO_LONG = http_error("414 URI Too Long", f"request line longer than {MAX_REQUEST_LINE}")
HEADERS_TOO_LARGE = http_error("431 Request Header Fields Too Large", "headers too large")
REQUEST_TIMEOUT = http_error("408 Request Timeout", "request headers took too long")
# RFC 9110 §15.6.6: 505 refuses the *major version* of HTTP a request used (HTTP/2.0 and
# HTTP/0.9 in an HTTP/1 request line); a line of another protocol (RTSP/1.0, ICE/1.0) is not
# an HTTP request line at all: RFC 9112 §3 (HTTP-name is "HTTP", case-sensitive) → 400.
VERSION_NOT_SUPPORTED = http_error("505 HTTP Version Not Supported", "HTTP/1.0 and 1.1 only")
METHOD_NOT_ALLOWED = http_error("405 Method Not Allowed", "CONNECT is not allowed here")
NO_LIVE_COLOR = http_error("503 Service Unavailable", "no live color yet")
TOO_MANY = http_error("503 Service Unavailable", "too many connections")
UNREACHABLE = http_error("502 Bad Gateway", "the live color could not be reached")
BROKEN = http_error("502 Bad Gateway", "the live color sent an invalid response")
BODY_TIMEOUT = http_error("408 Request Timeout", "the request body stalled")
RESPONSE_TIMEOUT = http_error("504 Gateway Timeout", "the live color did not answer in time")
DRAIN_OVER = http_error("504 Gateway Timeout", "no response before the drain time ended")
# A request held by a pause that ended without a resume (it never reached a color).
PAUSED = http_error("503 Service Unavailable", "paused; try again", "Retry-After: 1\r\n")

# Routes a request to the preview color when it carries the preview token; never forwarded.
PREVIEW = b"alive-switch-preview"

# Request headers the router reads or replaces; header names of other lengths are never
# lowercased (most are not these).
REQUEST_WATCH = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
    b"proxy-connection", b"te", b"upgrade", b"x-forwarded-for", b"x-forwarded-proto",
    b"forwarded", PREVIEW,
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
# Methods whose request may be sent again when a kept-alive connection to the color closed
# before it answered (bodiless ones only): the app cannot have changed anything.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# Request kinds: how the response is framed, and whether it may become a tunnel.
# NOT_UPGRADED: an Upgrade the router does not tunnel, sent as an ordinary request.
PLAIN, HEAD, UPGRADE_REQUEST, CONNECT, NOT_UPGRADED = range(5)

# Response framings, in this order (CHUNK and EOF are re-chunked for HTTP/1.1 clients).
NO_BODY, LENGTH_FRAMED, CHUNK_FRAMED, EOF_FRAMED = range(4)

STATUS = {code: b"HTTP/1.1 %d " % code for code in range(100, 1000)}

# The fast path: a head that arrives whole in one read and matches FAST_REQUEST (a strict
# subset of what llhttp accepts: a known method, an origin-form target, HTTP/1.1, token
# names, values of HTAB/SP/VCHAR/obs-text, CRLF only, exactly one Host and none of the
# headers the router acts on, Alive-Switch-Preview included: the router removes it from every
# request) is relayed as it is plus the forwarding headers; a response
# whose head matches FAST_RESPONSE (framed by one Content-Length alone) is relayed as it
# is. Anything else goes through httptools. tests/unit/test_router_http.py checks that
# llhttp reads whatever these match the same way.
# Possessive loops (nothing is given back: a name holds no ':', a value no CR) and the
# name lookahead only for fields whose first letter could start a watched name: the
# response match took 1.6 us per nginx head before, 1.1 after.
_FIELD = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[\t\x20-\x7e\x80-\xff]*+\r\n"
# Fields starting with "a" only look for Alive-Switch-Preview (Accept* and Authorization are
# common: the whole name lookahead on them cost 0.35 us per browser head).
_OTHER = (rb"(?:(?![%saA])%s|(?![aA])(?!(?i:%s):)%s"
          rb"|(?=[aA])(?!(?i:alive-switch-preview):)%s)*+")
FAST_REQUEST = re.compile(
    rb"(?:GET|POST|PUT|DELETE|OPTIONS|PATCH) /[\x21-\x7e]{0,%d} HTTP/1\.1\r\n"
    rb"%s(?i:host):[\t\x20-\x7e\x80-\xff]*\r\n%s\r\n" % ((MAX_REQUEST_LINE - 20,) + (
        _OTHER % (b"hHcCtTkKpPuUeExXfF", _FIELD,
                  b"host|content-length|transfer-encoding|connection|keep-alive|te|trailer"
                  b"|proxy-connection|upgrade|expect|forwarded|x[-_]real[-_]ip"
                  b"|x[-_]forwarded[-_][!#$%&'*+\\-.^_`|~0-9A-Za-z]*", _FIELD, _FIELD),) * 2))
# "Connection: keep-alive" (nginx sends it on every response) only restates what HTTP/1.1
# means anyway, so it may pass as it is; any other Connection header takes the slow path.
_RESPONSE_OTHER = (
    rb"(?:(?![cCtTkKpPuU])%s|(?i:connection:[ \t]*keep-alive[ \t]*\r\n)|(?!(?i:%s):)%s)*+"
    % (_FIELD, b"content-length|transfer-encoding|connection|keep-alive|proxy-connection"
               b"|upgrade|trailer", _FIELD))
FAST_RESPONSE = re.compile(
    rb"HTTP/1\.1 (?!204|304)[2-5][0-9][0-9] [\t\x20-\x7e\x80-\xff]*+\r\n"
    rb"%s(?i:content-length):[ \t]*([0-9]{1,15})[ \t]*\r\n%s\r\n" % ((_RESPONSE_OTHER,) * 2))


# llhttp reads three protocols, HTTP, RTSP and ICE (``SOURCE /x ICE/1.0``, ``RTSP/1.0 200
# OK``), and tells only the version, so the router reads the name from the bytes the start
# line arrived in. The line could be anywhere in them (after a previous request's body, or
# a 1xx), so every place it could be is checked: the place it is cannot pass. A name is a run
# of capitals then "/", so that a header value ("Referer: GET / now") is never taken for one.
_SPACES = re.compile(rb" *")
_NAME = re.compile(rb"[A-Z]+/")


def _past_spaces(raw: bytes, pos: int) -> int:
    spaces = _SPACES.match(raw, pos)
    return pos if spaces is None else spaces.end()


def foreign_request_line(raw: bytes, method: bytes, target: bytes) -> bytes | None:
    """The protocol (``RTSP/``…) of a request line ``method target NAME/x.y`` in ``raw`` whose
    NAME is not HTTP, if there is one; llhttp takes any number of spaces between the parts."""
    lead = method + b" "
    usual = b"%s %s HTTP/" % (method, target)
    at = raw.find(lead)
    while at >= 0:
        if not raw.startswith(usual, at):  # (the usual line, at a third of the cost)
            pos = _past_spaces(raw, at + len(lead))
            after = pos + len(target)
            if raw.startswith(target, pos) and raw.startswith(b" ", after):
                name = _NAME.match(raw, _past_spaces(raw, after))
                if name is not None and name[0] != b"HTTP/":
                    return name[0]
        at = raw.find(lead, at + 1)
    return None


def foreign_status_line(raw: bytes, version: str, status: int) -> bytes | None:
    """The protocol of a status line ``NAME/version status`` starting a line of ``raw`` whose
    NAME is not HTTP, if there is one."""
    needle = b"/%s %d" % (version.encode(), status)
    at = raw.find(needle)
    while at >= 0:
        start = raw.rfind(b"\n", 0, at) + 1
        if start != at - 4 or not raw.startswith(b"HTTP", start):
            name = _NAME.fullmatch(raw, start, at + 1)
            if name is not None and name[0] != b"HTTP/":
                return name[0]
        at = raw.find(needle, at + 1)
    return None


def start_line_tail(raw: bytes) -> bytes:
    """What to keep of ``raw`` for a start line still unchecked at the end of a read: from
    after its third-last line end. httptools reports a header only once the next one begins,
    so the line may have ended, and one header too (llhttp takes no bare LF)."""
    cut = len(raw)
    for _ in range(3):
        cut = raw.rfind(b"\n", 0, cut)
        if cut < 0:
            break
    return raw[cut + 1:]


def is_forwarding(name: bytes) -> bool:
    """Whether a request header names a forwarding header, spelled in any case and with
    ``_`` for ``-`` (WSGI servers read ``X_Forwarded_For`` as ``X-Forwarded-For``)."""
    key = name.lower().replace(b"_", b"-")
    return key.startswith(b"x-forwarded-") or key in (b"forwarded", b"x-real-ip")


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


def drop_named(hdrs: list[bytes], tokens: bytes) -> None:
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
