"""The router's control socket, and :func:`request`, the client the CLI uses to talk to it.

A Unix stream socket (``RouterSettings.control_socket``, mode 0660, group ``control_group``
if set). Each request is one JSON object on one line; each answer is one JSON object on one
line; a connection may carry several requests in turn. Peers other than root or members of
``control_group`` (checked with SO_PEERCRED / SO_PEERGROUPS) get ``{"ok": false, ...}``.

    → {"cmd": "status"}
    ← {"ok": true, "pid": 4242, "app": "alive", "env": "production", "mode": "tcp",
       "serving": "green", "fallback": {"color": "blue", "until": 1790000600.0},
       "fallback_open": "blue", "inflight": {"blue": 3, "green": 12},
       "total": {"blue": 812, "green": 95}, "errors": {"blue": 0, "green": 0},
       "builds": {"blue": "b1", "green": "b2"}, "state_source": "state.json",
       "drain_until": 1790000010.0, "switched_at": 1790000000.0, "stopping": false,
       "started_at": 1789990000.0,
       "pool": {"size": 64, "idle_s": 2.0, "idle": {"blue": 0, "green": 5}},
       "counters": {"blue": FIGURES, "green": FIGURES},
       "recent": {"seconds": 60.0, "blue": FIGURES, "green": FIGURES},
       "direct": DIRECT}                      (direct mode only)
    → {"cmd": "figures", "seconds": 60}
    ← {"ok": true, "started_at": 1789990000.0, "seconds": 60.0,
       "colors": {"blue": FIGURES, "green": FIGURES}}
    → {"cmd": "switch", "target": "green", "fallback": {"color": "blue", "until": <epoch>},
       "drain_until": <epoch>, "builds": {"green": "b2"}}
    ← {"ok": true, "serving": "green", "previous": "blue", "switched_at": <epoch>}
    → {"cmd": "fallback", "fallback": null}
    ← {"ok": true, "fallback": null}
    → {"cmd": "steer", "color": "green"}     (direct mode: take green's listener into the map)
    ← {"ok": true, "color": "green", "taken_at": <epoch>}
    → {"cmd": "reload"}
    ← {"ok": true, "serving": "green", "state_source": "state.json", "restart_needed": []}
    → {"cmd": "canary", "canary": {"color": "green", "percent": 10, "step": 1,
                                    "seed": "<deploy id>"}}
    ← {"ok": true, "canary": {"color": "green", "percent": 10, "step": 1, "seed": "..."}}
    → {"cmd": "canary", "canary": null}
    ← {"ok": true, "canary": null}
    → {"cmd": "preview", "color": "green", "token": "<16-128 of A-Za-z0-9_->"}
    ← {"ok": true, "preview": "green"}
    → {"cmd": "preview", "color": null}
    ← {"ok": true, "preview": null}
    → {"cmd": "pause", "max_wait": 5.0}
    ← {"ok": true, "paused_until": 1790000005.0}
    → {"cmd": "resume"}
    ← {"ok": true, "released": 3}
    → anything else
    ← {"ok": false, "error": "unknown cmd 'foo'; one of: canary, fallback, figures, pause,
       preview, reload, resume, status, steer, switch"}

``status`` also carries ``"canary": {...} | null`` (the split in effect), ``"preview":
"green" | null`` (never the token) and ``"paused": {"until": <epoch>, "held": N} | null``.

``canary``: from its answer on, a client whose key (:func:`switcher.router.split.client_key`:
http per request, the peer or the X-Forwarded-For hop a trusted proxy saw; tcp per
connection, the peer) hashes below ``percent × 100`` of ``model.CANARY_BUCKETS``
(:mod:`switcher.router.split`: blake2b keyed by ``seed``) goes to ``color``, every other
client to the serving color. Refused when ``color`` is the serving color or has no address,
or ``percent`` is outside 1-99. A ``switch`` ends it (and the preview); a reload or a
restart reads it from ``state.json`` again. A refused connect to the canary color falls back
to the serving color (counted ``refused`` against the canary color).

``preview`` (http mode only): a request carrying ``Alive-Switch-Preview: <token>`` (exact,
compared in constant time) goes to ``color``; the header is removed from every request
before forwarding. The token is kept in memory only (a restart drops it) and never appears
in a reply, an error or a log line: no error of this command repeats a value it was sent.

``pause`` (``max_wait`` above 0, at most 3600 s; refused "already paused until …" while
paused): http mode holds every request whose head is complete (in-flight ones finish) until
``resume`` sends them on, or until ``paused_until``, when each is answered 503 with
``Retry-After: 1`` (counted for no color: it never reached one). tcp mode stops accepting:
new connections wait in the listening socket's backlog until ``resume`` or
``paused_until``. ``resume`` is refused "not paused" when not paused. A pause outlives a
router restart through ``pause.json`` (:mod:`switcher.router.server`).

DIRECT is what the kernel does (:mod:`switcher.router.direct`)::

    {"families": ["ipv4"], "address": "127.0.0.1", "port": 9000, "selected": "green",
     "steering": true, "steered": {"blue": 0, "green": 5120},
     "taken_at": {"green": 1790000000.0}}

``steering`` is measured at each ``status``: a probe connection to the public address is
counted by the program only when the kernel handed it to a color's listener (false when no
listener is in the live slot, or another program for the port chose first). ``steered``
counts the connections handed to each color since the router started; the router's own
``counters`` stay flat for them. Without a loaded program: ``{"steering": false, "problem":
...}``.

FIGURES is one color's account (:class:`switcher.router.tally.Tally`):

    {"responses": {"1xx": 0, "2xx": 812, "3xx": 0, "4xx": 3, "5xx": 1},
     "failures": {"refused": 0, "reset": 0, "timeout": 0},
     "connections": 0,
     "duration": {"le": [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                  "counts": [700, 90, 20, 4, 2, 0, 0, 0, 0, 0, 0, 0], "sum": 4.21}}

``responses`` are the color's answers by class (http mode); ``failures`` what the router saw
itself: ``refused`` (a connect refused, counted against this color even when the fallback
then served the client), ``reset`` (the connection broke, or the color broke HTTP), and
``timeout`` (no answer within ``response_timeout``; tcp: no accept within the connect
timeout). ``connections`` are the client connections forwarded to the color (tcp mode).
``duration`` is a histogram of request head received → last byte relayed (http mode):
``counts[i]`` answers took at most ``le[i]`` seconds and more than ``le[i-1]``; the last
count is beyond 10 s. ``counters`` are cumulative since ``started_at``, when this router
process started: a restarted router starts from zero, and callers re-baseline. ``recent``
and ``figures`` are differences over the last ``seconds`` (at most 300, from a ring of one
snapshot a second; ``seconds`` in the answer is what the ring covered, less for a router
younger than that).

``pool``: http mode's idle connections kept per color for the next client (at most
``size`` each, reused within ``idle_s``; :mod:`.http.pool`), ``idle`` how many wait now.

``switch`` answers once every new connection goes to ``target``; open connections stay
where they are until ``drain_until``, when those on other colors are cut. Its ``fallback``
and ``drain_until`` describe the new timeline whole: left out, they are null. ``builds``
is merged into what the router knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import inspect
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from switcher.errors import SwitchError
from switcher.model import Canary, Color, Fallback
from switcher.router.activation import log
from switcher.router.split import TOKEN

# Linux's SO_PEERGROUPS (asm-generic value), which the socket module does not export.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
LINE_LIMIT = 64 * 1024

Reply = dict[str, Any]


class ControlSocketError(SwitchError):
    """The router could not create its control socket."""


class ControlError(SwitchError):
    """The CLI could not get an answer from the router."""


class RouterUnreachableError(ControlError):
    """Nothing listens on the control socket: the router is not running."""


class BadRequestError(Exception):
    pass


class Commands(Protocol):
    """What the control socket drives (:class:`switcher.router.server.Router`)."""

    def status(self) -> Awaitable[Reply]: ...
    def switch(self, target: Color, fallback: Fallback | None, drain_until: float | None,
               builds: dict[Color, str | None]) -> Reply: ...
    def set_fallback(self, fallback: Fallback | None) -> Reply: ...
    def steer(self, color: Color) -> Awaitable[Reply]: ...
    def reload(self) -> Reply: ...
    def figures(self, seconds: float) -> Reply: ...
    def set_canary(self, canary: Canary | None) -> Reply: ...
    def set_preview(self, color: Color | None, token: str) -> Reply: ...
    def pause(self, max_wait: float) -> Reply: ...
    def resume(self) -> Reply: ...


# A request's handler: most answer at once; status and steer are awaited.
Handler = Callable[[Commands, dict[str, Any]], Reply | Awaitable[Reply]]


# -- requests ----------------------------------------------------------------------------------

async def dispatch(commands: Commands, line: bytes) -> Reply:
    """Answer one request line; never raises. ``status`` and ``steer`` are awaited: they
    wait on a probe connection and a ``/proc`` scan, and the router serves meanwhile."""
    try:
        message = json.loads(line)
        reply = _handler(message)(commands, message)
        return await reply if inspect.isawaitable(reply) else reply
    except ValueError as e:
        return {"ok": False, "error": f"not JSON: {e}"}
    except (BadRequestError, SwitchError) as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:
        # The command's name only: a preview request carries its token.
        log("err", f"control request {_cmd_of(line)!r} failed: {e!r}")
        return {"ok": False, "error": f"internal error: {e!r}"}


def _cmd_of(line: bytes) -> object:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message.get("cmd") if isinstance(message, dict) else None


def _handler(message: object) -> Handler:
    if not isinstance(message, dict):
        raise BadRequestError("a request is one JSON object on one line")
    cmd = message.get("cmd")
    handler = HANDLERS.get(cmd) if isinstance(cmd, str) else None
    if handler is None:
        raise BadRequestError(f"unknown cmd {cmd!r}; one of: {', '.join(sorted(HANDLERS))}")
    return handler


def _status(commands: Commands, message: dict[str, Any]) -> Awaitable[Reply]:
    return commands.status()


def _switch(commands: Commands, message: dict[str, Any]) -> Reply:
    return commands.switch(_color(message.get("target"), "target"),
                           _fallback(message.get("fallback")),
                           _epoch(message.get("drain_until"), "drain_until"),
                           _builds(message.get("builds")))


def _set_fallback(commands: Commands, message: dict[str, Any]) -> Reply:
    if "fallback" not in message:
        raise BadRequestError('"fallback" is required: null or {"color": ..., "until": <epoch>}')
    return commands.set_fallback(_fallback(message["fallback"]))


def _steer(commands: Commands, message: dict[str, Any]) -> Awaitable[Reply]:
    return commands.steer(_color(message.get("color"), "color"))


def _reload(commands: Commands, message: dict[str, Any]) -> Reply:
    return commands.reload()


def _figures(commands: Commands, message: dict[str, Any]) -> Reply:
    seconds = message.get("seconds")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        raise BadRequestError(f"seconds: expected a number of seconds, got {seconds!r}")
    return commands.figures(float(seconds))


def _set_canary(commands: Commands, message: dict[str, Any]) -> Reply:
    if "canary" not in message:
        raise BadRequestError(f'"canary" is required: null or {CANARY_SHAPE}')
    return commands.set_canary(_canary(message["canary"]))


def _set_preview(commands: Commands, message: dict[str, Any]) -> Reply:
    """No error here names a value the request carried: it may be the token."""
    if "color" not in message:
        raise BadRequestError('preview: "color" is required: a color, or null for none')
    color = message["color"]
    if color is None:
        return commands.set_preview(None, "")
    if not isinstance(color, str) or color not in Color.__members__:
        raise BadRequestError(f"preview.color: expected one of {', '.join(Color)} or null")
    token = message.get("token")
    if not isinstance(token, str) or TOKEN.fullmatch(token) is None:
        raise BadRequestError("preview.token: expected 16-128 characters of A-Za-z0-9_- "
                              "(the value is not shown)")
    return commands.set_preview(Color(color), token)


def _pause(commands: Commands, message: dict[str, Any]) -> Reply:
    wait = message.get("max_wait")
    if not isinstance(wait, int | float) or isinstance(wait, bool) or \
            not 0 < wait <= MAX_PAUSE:
        raise BadRequestError(f"max_wait: expected seconds above 0 and at most {MAX_PAUSE}, "
                              f"got {wait!r}")
    return commands.pause(float(wait))


def _resume(commands: Commands, message: dict[str, Any]) -> Reply:
    return commands.resume()


HANDLERS: dict[str, Handler] = {
    "status": _status, "switch": _switch, "fallback": _set_fallback, "reload": _reload,
    "figures": _figures, "canary": _set_canary, "preview": _set_preview, "pause": _pause,
    "resume": _resume, "steer": _steer,
}
CANARY_SHAPE = '{"color": ..., "percent": 1-99, "step": N, "seed": "..."}'
MAX_PAUSE = 3600  # seconds: a pause is for a migration, not a maintenance window


def _color(value: object, name: str) -> Color:
    if isinstance(value, str) and value in Color.__members__:
        return Color(value)
    raise BadRequestError(f"{name}: expected one of {', '.join(Color)}, got {value!r}")


def _epoch(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise BadRequestError(f"{name}: expected a Unix time in seconds or null, got {value!r}")


def _fallback(value: object) -> Fallback | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"color", "until"}:
        raise BadRequestError(f'fallback: expected null or {{"color": ..., "until": <epoch>}}, '
                         f"got {value!r}")
    until = _epoch(value["until"], "fallback.until")
    if until is None:
        raise BadRequestError("fallback.until: expected a Unix time in seconds, got null")
    return Fallback(_color(value["color"], "fallback.color"), until)


def _canary(value: object) -> Canary | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"color", "percent", "step", "seed"}:
        raise BadRequestError(f"canary: expected null or {CANARY_SHAPE}, got {value!r}")
    percent, step, seed = value["percent"], value["step"], value["seed"]
    if not _integer(percent) or not 1 <= percent <= 99:
        raise BadRequestError(f"canary.percent: expected a whole number 1-99, got {percent!r}")
    if not _integer(step) or step < 1:
        raise BadRequestError(f"canary.step: expected a whole number from 1, got {step!r}")
    if not isinstance(seed, str) or not seed:
        raise BadRequestError(f"canary.seed: expected the deploy's id, got {seed!r}")
    return Canary(_color(value["color"], "canary.color"), percent, step, seed)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _builds(value: object) -> dict[Color, str | None]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequestError(f'builds: expected an object like {{"green": "b2"}}, '
                              f"got {value!r}")
    builds: dict[Color, str | None] = {}
    for color, build in value.items():
        if build is not None and not isinstance(build, str):
            raise BadRequestError(f"builds.{color}: expected a build name or null, got {build!r}")
        builds[_color(color, "builds")] = build
    return builds


# -- who may ask -------------------------------------------------------------------------------

def refusal(sock: Any, gid: int | None, group: str) -> str | None:
    """Why the peer of ``sock`` may not use the control socket, or None if it may."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, primary = struct.unpack("3i", creds)
    if uid == 0 or (gid is not None and (primary == gid or gid in _peer_groups(sock))):
        return None
    allowed = f"root or a member of group {group!r}" if group else "root"
    return f"permission denied: pid {pid} (uid {uid}) is not {allowed}"


def _peer_groups(sock: Any) -> set[int]:
    for count in (256, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            return set()
        return set(struct.unpack(f"{len(raw) // 4}I", raw))
    return set()


# -- the server --------------------------------------------------------------------------------

class ControlServer:
    def __init__(self, path: Path, gid: int | None, group: str, commands: Commands) -> None:
        self.path = path
        self.gid = gid
        self.group = group
        self.commands = commands
        self.server: asyncio.AbstractServer | None = None
        self.inode = 0

    async def start(self) -> None:
        sock = _bind(self.path, self.gid)
        self.inode = self.path.stat().st_ino
        self.server = await asyncio.start_unix_server(self._serve, sock=sock, limit=LINE_LIMIT)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self.inode:  # not a newer router's socket
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        denied = refusal(writer.get_extra_info("socket"), self.gid, self.group)
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                reply = ({"ok": False, "error": denied} if denied
                         else await dispatch(self.commands, line))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
                if denied:
                    break
        except ValueError:  # a line beyond LINE_LIMIT
            writer.write(b'{"ok": false, "error": "request line too long"}\n')
        except ConnectionError:
            pass
        finally:
            writer.close()


async def open_control(path: str, group: str, commands: Commands) -> ControlServer:
    """Create the control socket and serve it; raises ControlSocketError."""
    gid = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ControlSocketError(f"control_group {group!r} does not exist",
                                     f"create it (groupadd {group}) or change control_group"
                                     ) from None
    server = ControlServer(Path(path), gid, group, commands)
    try:
        await server.start()
    except OSError as e:
        raise ControlSocketError(f"cannot create the control socket {path}: {e}",
                                 "check that the router runs as root") from e
    return server


def _bind(path: Path, gid: int | None) -> socket.socket:
    """Bind under a temporary name, set mode and group, then rename into place: the socket
    is never reachable with looser permissions."""
    _makedirs(path.parent)
    if _answers(path):
        raise ControlSocketError(f"another router already answers on {path}",
                                 f"systemctl status {path.parent.name}.service")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o660)
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.replace(tmp, path)
        sock.listen(16)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return sock


def _makedirs(directory: Path) -> None:
    if directory.is_dir():
        return
    _makedirs(directory.parent)
    with contextlib.suppress(FileExistsError):
        directory.mkdir()
        directory.chmod(0o755)  # whatever the umask


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


# -- the client --------------------------------------------------------------------------------

def request(path: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the router at ``path``; return its answer (``ok`` may be false).

    Raises RouterUnreachableError when no router listens there, ControlError when it cannot be
    asked (permission) or does not answer within ``timeout`` seconds.
    """
    unit = f"{Path(path).parent.name}.service"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            line = _read_line(sock, deadline)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise RouterUnreachableError(f"the router is not running: {path}: {e.strerror}",
                                    f"systemctl start {unit}") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}",
                               "run as root or as a member of the environment's control_group"
                               ) from None
        except TimeoutError:
            raise ControlError(f"no answer from the router on {path} within {timeout:g} s",
                               f"systemctl status {unit}") from None
        except OSError as e:
            raise ControlError(f"talking to the router on {path} failed: {e}",
                               f"systemctl status {unit}") from None
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlError(f"the router on {path} answered {line[:200]!r}, not a JSON object",
                           f"journalctl -u {unit} -n 50")
    return answer


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "closed without an answer")
        buf += chunk
    return bytes(buf[:buf.index(b"\n")])
