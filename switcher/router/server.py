"""The router's life: startup → serve → shutdown.

- startup: read ``router.json`` and the router's view of ``state.json``; serve each socket
  systemd passed (with ``backlog``: asyncio and uvloop would otherwise ``listen(100)`` on
  the shared socket, and it stays 100 after the router exits) and the control socket; then
  READY=1, STATUS= about once a second when it changed, and WATCHDOG=1 from the event loop.
- serve: connections are forwarded by :mod:`switcher.router.tcp` (mode tcp) or requests by
  :mod:`switcher.router.http` (mode http), commands answered by
  :mod:`switcher.router.control`. Signal handlers only queue the signal; the loop acts on
  it in ``handle_term`` (SIGTERM, SIGINT) and ``handle_hup`` (SIGHUP, the unit's ExecReload).
- shutdown: STOPPING=1; close our servers, which closes our descriptor of the listening
  socket and never calls ``shutdown()`` on it (that would stop it for every holder, systemd
  included: the kernel keeps queueing connections for the next router); let open
  connections finish for ``restart_drain`` seconds (http: a connection idle for a while is
  closed at once, one in use after its next response, sent with ``Connection: close``),
  then cut the rest.

The view of state: on start the router serves ``State.serving()`` (``active``, or a pending
target past the switch) with the fallback window and ``drain_until`` of ``state.json`` (or
``.prev`` when it does not parse). A ``switch`` command wins over the file until a reload
or a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from switcher import state as files
from switcher.errors import NeedsRepairError, SwitchError, UsageError
from switcher.model import Color, Fallback, Mode, RouterSettings, State
from switcher.router import http, tcp
from switcher.router.activation import Notifier, log
from switcher.router.control import ControlServer, ControlSocketError, open_control

STATUS_EVERY = 1.0  # seconds between STATUS= checks (each update costs PID 1 ~0.1 ms)
SWEEP_EVERY = 0.5  # seconds between checks of http timeouts (no per-request timers)


class SettingsError(UsageError):
    """router.json is missing or unreadable."""


def load_settings(env_dir: Path) -> RouterSettings:
    path = env_dir / files.ROUTER_SETTINGS
    try:
        return files.load_router_settings(env_dir)
    except FileNotFoundError:
        raise SettingsError(f"{path} does not exist",
                            "`alive-switch install ENV` writes it") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise SettingsError(f"{path} is unreadable: {e!r}",
                            "rewrite it with `alive-switch install ENV`") from None


def load_view(env_dir: Path) -> tuple[State, str]:
    """The router's view of ``state.json``: ``active`` is what it serves, no intent left.
    Returns (view, source file)."""
    saved, source = files.load_state_lenient(env_dir)
    if source == "none" and any((env_dir / name).exists()
                                for name in (files.STATE, files.STATE_PREV)):
        raise NeedsRepairError(f"{env_dir / files.STATE} and its .prev copy are unreadable",
                               f"alive-switch repair {env_dir.name.rpartition('-')[2]}")
    view = State(active=saved.serving(), previous=saved.previous, builds=dict(saved.builds),
                 fallback=saved.fallback, drain_until=saved.drain_until,
                 deploy_id=saved.deploy_id, updated=saved.updated)
    return view, source


def run(env_dir: Path, settings: RouterSettings, sockets: list[socket.socket]) -> None:
    """Serve until SIGTERM/SIGINT (then drain); uvloop when installed."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_main(env_dir, settings, sockets))


def _loop_factory() -> Any:
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _main(env_dir: Path, settings: RouterSettings, sockets: list[socket.socket]) -> None:
    router = Router(env_dir, settings, sockets)
    await router.startup()
    try:
        await router.serve()
    finally:
        await router.shutdown()


class Router:
    """Routes connections to the serving color and answers control commands."""

    def __init__(self, env_dir: Path, settings: RouterSettings,
                 sockets: list[socket.socket]) -> None:
        self.loop = asyncio.get_running_loop()
        self.env_dir = env_dir
        self.sockets = sockets
        self.settings = settings
        self.colors = settings.colors
        self.http = settings.mode is Mode.http
        try:
            self.view, self.source = load_view(env_dir)
        except NeedsRepairError as e:
            log("err", f"{e}; no live color until it is repaired")
            self.view, self.source = State(), "none"
        self.switched_at: float | None = None
        self.links: dict[Color, set[tcp.Link]] = {c: set() for c in Color}
        # http mode: every client connection; requests in flight are counted per color.
        self.conns: set[http.Conn] = set()
        self.backends = {c: http.Backend(c, settings.colors.get(c)) for c in Color}
        self.limits = http.Limits.from_settings(settings)
        self.live: http.Backend | None = None
        self._serve_view(self.view)
        self.open = 0
        self.total = dict.fromkeys(Color, 0)
        self.errors = dict.fromkeys(Color, 0)
        self.notifier = Notifier()
        self.servers: list[asyncio.AbstractServer] = []
        self.control: ControlServer | None = None
        self.control_problem = ""
        self.signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self.stopping = False
        self.idle = asyncio.Event()
        self.cut_timer: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        _raise_nofile_limit()
        listening = ", ".join(_address(s) for s in self.sockets)
        for sock in self.sockets:
            self.servers.append(await self.loop.create_server(
                self._connection, sock=sock, backlog=self.settings.backlog))
        try:
            self.control = await open_control(self.settings.control_socket,
                                              self.settings.control_group, self)
        except ControlSocketError as e:
            # Traffic matters more than deploys: serve, and say so in STATUS= and the log.
            log("err", f"{e}; serving without a control socket")
            self.control_problem = "no control socket"
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        self._schedule_cut()
        self.loop.call_later(SWEEP_EVERY, self._sweep)
        line = self.status_line()
        self.notifier.ready(line)
        if self.notifier.enabled:
            self.loop.call_later(STATUS_EVERY, self._tick_status)
            interval = self.notifier.watchdog_interval()
            if interval:
                self._tick_watchdog(interval)
        log("info", f"{line}; listening on {listening} (backlog {self.settings.backlog}, "
                    f"{self.settings.mode} mode, view from {self.source})")

    async def serve(self) -> None:
        while True:
            sig = await self.signals.get()
            if sig == signal.SIGHUP:
                self.handle_hup()
            else:
                self.handle_term(sig)
                return

    def handle_hup(self) -> None:
        try:
            self.reload()
        except SwitchError as e:
            log("err", f"reload failed, nothing changed: {e}")

    def handle_term(self, sig: signal.Signals) -> None:
        log("info", f"{sig.name}: stopping; {self.open} connections get "
                    f"{self.settings.restart_drain:g} s to finish")

    async def shutdown(self) -> None:
        self.stopping = True
        self.notifier.send("STOPPING=1")
        for server in self.servers:
            server.close()  # our descriptor only; never shutdown() the shared socket
        for conn in list(self.conns):
            conn.stop()
        if self.open:
            self.notifier.status(self.status_line())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.restart_drain):
                    await self.idle.wait()
        if self.open:
            log("warning", f"cutting {self.open} connections still open after "
                           f"restart_drain = {self.settings.restart_drain:g} s")
            self._cut(set(Color))
            for conn in list(self.conns):  # http: idle keep-alive connections too
                conn.cut()
            await asyncio.sleep(0)  # let the transports report their loss
        if self.control is not None:
            self.control.close()
        log("info", "stopped")

    # -- routing (called by tcp.Link) --------------------------------------------------------

    def _connection(self) -> tcp.Link | http.Conn:
        if self.http:
            return http.Conn(self, self.limits)
        return tcp.Link(self)

    def admit(self, link: tcp.Link) -> None:
        color = self.view.active
        if color is None or color not in self.colors:
            link.refuse(tcp.NO_LIVE_COLOR if self.http else None)
        elif self.open >= self.settings.max_connections:
            link.refuse(tcp.TOO_MANY if self.http else None)
        else:
            self._assign(link, color)
            link.forward(self.colors[color])

    def retry(self, link: tcp.Link) -> tuple[str, int] | None:
        """After ``link``'s color refused: the serving color or the open fallback, if not
        tried yet. Never any other color."""
        for color in (self.view.active, self.view.fallback_at(time.time())):
            if color is not None and color not in link.tried and color in self.colors:
                self._count_error(link)
                self._assign(link, color)
                return self.colors[color]
        return None

    def connected(self, link: tcp.Link) -> None:
        if link.color is not None:
            self.total[link.color] += 1

    def failed(self, link: tcp.Link) -> None:
        self._count_error(link)
        self._forget(link)
        link.refuse(tcp.UNREACHABLE if self.http else None)

    def closed(self, link: tcp.Link) -> None:
        self._forget(link)

    def _assign(self, link: tcp.Link, color: Color) -> None:
        if link.color is None:
            self.open += 1
        else:
            self.links[link.color].discard(link)
        self.links[color].add(link)
        link.color = color
        link.tried.append(color)

    def _forget(self, link: tcp.Link) -> None:
        if link.color is not None:
            self.links[link.color].discard(link)
            link.color = None
            self.open -= 1
            if self.open == 0 and self.stopping:
                self.idle.set()

    def _count_error(self, link: tcp.Link) -> None:
        if link.color is not None:
            self.errors[link.color] += 1

    def _cut(self, colors: set[Color]) -> int:
        doomed = [link for color in colors for link in self.links[color]]
        for link in doomed:
            link.close(abort=True)
        busy = [conn for conn in self.conns if conn.busy_on in colors]
        for conn in busy:
            conn.cut()
        return len(doomed) + len(busy)

    def _schedule_cut(self) -> None:
        """At ``drain_until``, cut what is still open on colors other than the serving one."""
        if self.cut_timer is not None:
            self.cut_timer.cancel()
            self.cut_timer = None
        if self.view.drain_until is not None:
            delay = self.view.drain_until - time.time()
            self.cut_timer = self.loop.call_later(max(delay, 0.0), self._cut_draining)

    # -- routing (called by http.Conn) -------------------------------------------------------

    def accept(self, conn: http.Conn) -> bytes | None:
        """Count a new client connection in, or say why it is turned away."""
        if self.open >= self.settings.max_connections:
            return http.TOO_MANY
        self.open += 1
        self.conns.add(conn)
        return None

    def fallback(self, tried: list[Color]) -> http.Backend | None:
        """After a refused connect: the serving color or the open fallback, if not tried
        yet. Never any other color."""
        for color in (self.view.active, self.view.fallback_at(time.time())):
            if color is not None and color not in tried and color in self.colors:
                return self.backends[color]
        return None

    def gone(self, conn: http.Conn) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            self.open -= 1
            if self.open == 0 and self.stopping:
                self.idle.set()

    def _serve_view(self, view: State) -> None:
        """Serve ``view``: new requests go to its active color from now on."""
        self.view = view
        active = view.active
        self.live = self.backends[active] if active in self.colors else None

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns):
            conn.check(now)
        self.loop.call_later(SWEEP_EVERY, self._sweep)

    def _inflight(self, color: Color) -> int:
        """tcp: connections open; http: requests (and tunnels) in flight."""
        return len(self.links[color]) + self.backends[color].inflight

    def _cut_draining(self) -> None:
        self.cut_timer = None
        others = {c for c in Color if c != self.view.active}
        if cut := self._cut(others):
            log("notice", f"drain time is over: cut {cut} connections on "
                          f"{'/'.join(sorted(others))}")

    # -- commands (called by control) --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        view = self.view
        fallback = view.fallback
        return {
            "ok": True, "pid": os.getpid(), "app": self.settings.app, "env": self.settings.env,
            "mode": self.settings.mode.value, "serving": _name(view.active),
            "fallback": _fallback_json(fallback),
            "fallback_open": _name(view.fallback_at(time.time())),
            "inflight": {c.value: self._inflight(c) for c in Color},
            "total": {c.value: n + self.backends[c].total for c, n in self.total.items()},
            "errors": {c.value: n + self.backends[c].errors for c, n in self.errors.items()},
            "builds": {c.value: b for c, b in view.builds.items()},
            "state_source": self.source, "drain_until": view.drain_until,
            "switched_at": self.switched_at, "stopping": self.stopping,
        }

    def switch(self, target: Color, fallback: Fallback | None, drain_until: float | None,
               builds: dict[Color, str | None]) -> dict[str, Any]:
        """Serve ``target`` from now on. A fallback naming the serving color is kept but
        never used (``State.fallback_at`` skips it)."""
        if target not in self.colors:
            raise UsageError(f"no address for {target} in {self.env_dir / 'router.json'}")
        before = self.view.active
        # In effect from here on: admit() reads view.active for every new connection, and
        # http.Conn reads self.live for every request.
        self._serve_view(replace(self.view, active=target, fallback=fallback,
                                 drain_until=drain_until, builds={**self.view.builds, **builds},
                                 previous=before if before not in (None, target)
                                 else self.view.previous))
        for conn in list(self.conns):
            conn.leave_idle(self.live)
        self.switched_at = time.time()
        self._schedule_cut()
        log("notice", f"switched {before or 'nothing'} → {target}: {self.status_line()}")
        return {"ok": True, "serving": target.value, "previous": _name(before),
                "switched_at": self.switched_at}

    def set_fallback(self, fallback: Fallback | None) -> dict[str, Any]:
        self.view = replace(self.view, fallback=fallback)
        log("info", f"fallback window: {_fallback_json(fallback)}")
        return {"ok": True, "fallback": _fallback_json(fallback)}

    def reload(self) -> dict[str, Any]:
        """Re-read router.json and state.json; all or nothing."""
        settings = load_settings(self.env_dir)
        view, source = load_view(self.env_dir)
        restart = [key for key in ("backlog", "control_socket", "control_group")
                   if getattr(settings, key) != getattr(self.settings, key)]
        self.settings, self.colors = settings, settings.colors
        self.http = settings.mode is Mode.http
        self.limits = http.Limits.from_settings(settings)
        for color, backend in self.backends.items():
            backend.address = settings.colors.get(color)
        self._serve_view(view)
        self.source, self.switched_at = source, None
        for conn in list(self.conns):
            conn.leave_idle(self.live)
        self._schedule_cut()
        log("notice", f"reloaded: {self.status_line()} (view from {source})"
                      + (f"; restart to apply {', '.join(restart)}" if restart else ""))
        return {"ok": True, "serving": _name(view.active), "state_source": source,
                "restart_needed": restart}

    # -- reporting to systemd ----------------------------------------------------------------

    def status_line(self) -> str:
        live = self.view.active
        if self.stopping:
            parts = [f"stopping: {self.open} connections finishing"]
        elif live is None:
            parts = ["no live color yet"]
        else:
            build = self.view.builds.get(live)
            parts = [f"serving {live} (build {build})" if build else f"serving {live}"]
        parts += [f"{c} draining {self._inflight(c)}"
                  for c in Color if c != live and self._inflight(c)]
        if self.control_problem:
            parts.append(self.control_problem)
        return " · ".join(parts)

    def _tick_status(self) -> None:
        self.notifier.status(self.status_line())
        self.loop.call_later(STATUS_EVERY, self._tick_status)

    def _tick_watchdog(self, interval: float) -> None:
        # Fed from the event loop: a stuck loop stops the pings and systemd restarts us.
        self.notifier.send("WATCHDOG=1")
        self.loop.call_later(interval, self._tick_watchdog, interval)


def _name(color: Color | None) -> str | None:
    return None if color is None else color.value


def _fallback_json(fallback: Fallback | None) -> dict[str, Any] | None:
    return None if fallback is None else {"color": fallback.color.value, "until": fallback.until}


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return str(name)


def _raise_nofile_limit() -> None:
    """Each forwarded connection takes two descriptors: use all the unit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
