"""The router's life: startup → serve → shutdown.

- startup: read ``router.json`` and the router's view of ``state.json``; serve each socket
  systemd passed (with ``backlog``: asyncio and uvloop would otherwise ``listen(100)`` on
  the shared socket, and it stays 100 after the router exits), the control socket and the
  metrics listener (if ``metrics`` is set; :mod:`.metrics`); then READY=1, STATUS= about
  once a second when it changed, and WATCHDOG=1 from the event loop.
- serve: each accepted connection gets the handler of the mode in effect then — a
  :class:`switcher.router.tcp.Link` (mode tcp, forwards the connection) or a
  :class:`switcher.router.http.proxy.Conn` (mode http, forwards its requests) — and keeps
  it for its life, so a reload that changes the mode applies to new connections only. Where
  they go is :mod:`switcher.router.routes`'s (the table); commands are answered by
  :mod:`switcher.router.control`. Signal handlers only queue the signal; the loop acts on
  it in ``handle_term`` (SIGTERM, SIGINT) and ``handle_hup`` (SIGHUP, the unit's ExecReload).
- direct mode: the kernel hands new connections to the live color's own listener
  (:mod:`switcher.router.direct`); what it does not steer reaches the router, which forwards
  it as in tcp mode. ``switch`` is then also a map update, ``steer`` takes a listener.
- shutdown: STOPPING=1; close our servers, which closes our descriptor of the listening
  socket and never calls ``shutdown()`` on it (that would stop it for every holder, systemd
  included: the kernel keeps queueing connections for the next router); let open
  connections finish for ``restart_drain`` seconds (http: a connection idle for a while is
  closed at once, one in use after its next response, sent with ``Connection: close``),
  then cut the rest.

The view of state: on start the router serves ``State.serving()`` (``active``, or a pending
target past the switch) with the fallback window and ``drain_until`` of ``state.json`` (or
``.prev`` when it does not parse). A ``switch`` command wins over the file until a reload
or a restart. The canary of ``state.json`` is kept too, so a router restarted mid-canary keeps
the share; a preview is memory only.

``pause.json``, the one file the router writes (in the state directory, beside
``state.json``; temp file, fsync, rename, fsync the directory)::

    {"until": 1790000005.0}   # Unix time the pause ends if no resume comes first

It is written by ``pause`` and removed by ``resume`` or when the pause runs out; a router
that starts while it names a future time is paused until then (an unreadable or past one
is removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from switcher import state as files
from switcher.errors import NeedsRepairError, SteerError, SwitchError, UsageError
from switcher.model import Canary, Color, Fallback, Mode, RouterSettings, State, canary_json
from switcher.router import metrics, tcp
from switcher.router.activation import Notifier, log
from switcher.router.control import ControlServer, ControlSocketError, open_control
from switcher.router.direct import Direct, refuse_outside_direct
from switcher.router.http import proxy
from switcher.router.http.request import Limits
from switcher.router.metrics import ColorMetrics, Metrics, MetricsServer
from switcher.router.routes import Routes
from switcher.router.tally import RECENT_SECONDS, RING_SECONDS, Snapshot, figures_json

# Modes whose pause stops accepting (new connections wait in the backlog): http holds
# requests instead; direct mode also stops steering.
STOPS_ACCEPTING = (Mode.tcp, Mode.direct)
STATUS_EVERY = 1.0  # seconds between STATUS= checks (each update costs PID 1 ~0.1 ms)
PAUSE_FILE = "pause.json"  # the one file the router writes (see the module docstring)


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
                 deploy_id=saved.deploy_id, updated=saved.updated, canary=saved.canary)
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
    """The router's lifecycle, its control commands and what it reports to systemd; the
    routing itself is ``routes``'s."""

    def __init__(self, env_dir: Path, settings: RouterSettings,
                 sockets: list[socket.socket]) -> None:
        self.loop = asyncio.get_running_loop()
        self.env_dir = env_dir
        self.sockets = sockets
        self.settings = settings
        try:
            view, self.source = load_view(env_dir)
        except NeedsRepairError as e:
            log("err", f"{e}; no live color until it is repaired")
            view, self.source = State(), "none"
        self.routes = Routes(self.loop, settings, view)
        self.handler = self._handler(settings)
        self.switched_at: float | None = None
        self.notifier = Notifier()
        self.servers: list[asyncio.AbstractServer] = []
        self.control: ControlServer | None = None
        self.control_problem = ""
        self.metrics: MetricsServer | None = None
        self.metrics_problem = ""
        self.direct: Direct | None = None  # direct mode's steering, when attached
        self.direct_problem = ""
        self.started_at = time.time()  # a restarted router counts from zero again
        self.signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self.paused_until: float | None = None
        self.pause_timer: asyncio.TimerHandle | None = None

    def _handler(self, settings: RouterSettings) -> Callable[[], asyncio.Protocol]:
        """What handles a connection accepted from now on: the mode is decided here, once
        per connection, never again on its path."""
        if settings.mode is Mode.http:
            return functools.partial(proxy.Conn, self.routes, Limits.from_settings(settings))
        return functools.partial(tcp.Link, self.routes)  # direct mode: its fallback path

    def _connection(self) -> asyncio.Protocol:
        return self.handler()

    @property
    def view(self) -> State:
        return self.routes.view

    @property
    def stopping(self) -> bool:
        return self.routes.stopping

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        _raise_nofile_limit()
        listening = ", ".join(_address(s) for s in self.sockets)
        self._restore_pause()
        if not (self.paused_until is not None and self.settings.mode in STOPS_ACCEPTING):
            await self._accept()
        try:
            self.control = await open_control(self.settings.control_socket,
                                              self.settings.control_group, self)
        except ControlSocketError as e:
            # Traffic matters more than deploys: serve, and say so in STATUS= and the log.
            log("err", f"{e}; serving without a control socket")
            self.control_problem = "no control socket"
        await self._open_metrics()
        self._steer_or_not()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        self.routes.schedule_cut()
        self.routes.start_sweeping()
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
        log("info", f"{sig.name}: stopping; {self.routes.open} connections get "
                    f"{self.settings.restart_drain:g} s to finish")

    async def shutdown(self) -> None:
        routes = self.routes
        self.notifier.send("STOPPING=1")
        for server in self.servers:
            server.close()  # our descriptor only; never shutdown() the shared socket
        routes.stop()
        if routes.open:
            self.notifier.status(self.status_line())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.restart_drain):
                    await routes.idle.wait()
        if routes.open:
            log("warning", f"cutting {routes.open} connections still open after "
                           f"restart_drain = {self.settings.restart_drain:g} s")
            routes.cut_all()
            await asyncio.sleep(0)  # let the transports report their loss
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self._close_direct()
        log("info", "stopped")

    async def _accept(self) -> None:
        for sock in self.sockets:
            self.servers.append(await self.loop.create_server(
                self._connection, sock=sock, backlog=self.settings.backlog))
        if self.paused_until is not None and self.settings.mode is Mode.tcp:
            self._stop_accepting()  # paused again while this ran

    def _stop_accepting(self) -> None:
        """tcp pause: close our servers, each on a copy of its socket kept open, so the
        socket keeps listening and new connections wait in its backlog (never shutdown():
        that would stop it for systemd too)."""
        if not self.servers:
            return
        self.sockets = [sock.dup() for sock in self.sockets]
        for server in self.servers:
            server.close()
        self.servers = []

    async def _open_metrics(self) -> None:
        address = self.settings.metrics
        if not address:
            return
        server = MetricsServer(self.scrape)
        try:
            await server.start(address)
        except (OSError, ValueError) as e:
            # Like the control socket: traffic matters more than its figures.
            log("err", f"cannot serve metrics on {address}: {e}; serving without them")
            self.metrics_problem = "no metrics listener"
            return
        self.metrics = server
        self.metrics_problem = ""

    def _steer_or_not(self) -> None:
        """Attach the steering in direct mode (detach it otherwise). A program the kernel
        refuses leaves the router serving every connection itself, and saying so."""
        if self.settings.mode is not Mode.direct:
            self._close_direct()
            return
        if self.direct is not None:  # a reload: color addresses, health probe, the view
            self.direct.settings = self.settings
            self._steer_to(self.view.active)
            return
        try:
            self.direct = Direct.open(self.settings, self.sockets)
        except SteerError as e:
            log("err", f"direct mode cannot steer: {e}; the router serves every connection")
            self.direct_problem = "not steering"
            return
        self.direct_problem = ""
        self.routes.outside = self.direct.counted
        self._steer_to(self.view.active)  # steered once keep_taking has its listener
        self.direct.keep_taking(lambda: self.view.active)

    def _steer_to(self, color: Color | None) -> None:
        """Direct mode: steer new connections to ``color`` — to nobody while paused, so
        they wait in the public socket's backlog like tcp mode's."""
        if self.direct is not None:
            self.direct.select(None if self.paused_until is not None else color)

    def _close_direct(self) -> None:
        if self.direct is not None:
            self.routes.count_outside(self.direct.counted())  # the last ones steered
            self.routes.outside = None
            self.direct.close()
            self.direct = None

    def _move_metrics(self) -> None:
        """A reload changed ``metrics``: close the old listener, open the new one (in a task:
        reload answers at once, and a bind that fails is logged like one at startup)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.metrics_problem = ""
        self.loop.create_task(self._open_metrics())

    # -- commands (called by control) --------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        view = self.view
        fallback = view.fallback
        backends = self.routes.backends
        return {
            "ok": True, "pid": os.getpid(), "app": self.settings.app, "env": self.settings.env,
            "mode": self.settings.mode.value, "serving": _name(view.active),
            "fallback": _fallback_json(fallback),
            "fallback_open": _name(view.fallback_at(time.time())),
            "inflight": {c.value: b.inflight for c, b in backends.items()},
            "total": {c.value: b.total for c, b in backends.items()},
            "errors": {c.value: b.errors for c, b in backends.items()},
            "builds": {c.value: b for c, b in view.builds.items()},
            "state_source": self.source, "drain_until": view.drain_until,
            "switched_at": self.switched_at, "stopping": self.stopping,
            "started_at": self.started_at,
            "pool": {"size": self.settings.pool_size, "idle_s": self.settings.pool_idle,
                     "idle": {c.value: len(b.pool) for c, b in backends.items()}},
            "metrics": self.metrics.address if self.metrics is not None else "",
            "allocated_blocks": sys.getallocatedblocks(),  # flat under load: benchmarks/
            "counters": _per_color(zip(Color, self.routes.snapshots(), strict=True)),
            "recent": self._recent(),
            "canary": canary_json(split.canary) if (split := self.routes.split) else None,
            "preview": _name(preview.target.color) if (preview := self.routes.preview)
            else None,
            "paused": None if self.paused_until is None else
            {"until": self.paused_until, "held": len(self.routes.held)},
            **({"direct": await self._direct_status()} if self.settings.mode is Mode.direct
               else {}),
        }

    async def _direct_status(self) -> dict[str, Any]:
        if self.direct is None:
            return {"steering": False, "problem": self.direct_problem}
        return await self.direct.status()

    def _recent(self) -> dict[str, Any]:
        covered, figures = self.routes.figures(RECENT_SECONDS)
        return {"seconds": round(covered, 3), **_per_color(figures.items())}

    def figures(self, seconds: float) -> dict[str, Any]:
        if not 0 < seconds <= RING_SECONDS:
            raise UsageError(f"figures: seconds must be above 0 and at most {RING_SECONDS} "
                             f"(the ring's length), got {seconds!r}")
        covered, figures = self.routes.figures(seconds)
        return {"ok": True, "started_at": self.started_at, "seconds": round(covered, 3),
                "colors": _per_color(figures.items())}

    def scrape(self) -> str:
        routes = self.routes
        live = routes.live
        builds = self.view.builds
        snaps = routes.snapshots()  # first: it reads in what the kernel steered
        return metrics.render(Metrics(
            env=self.settings.env, switches=routes.switches,
            canary_percent=routes.split.canary.percent if routes.split is not None else 0,
            connections=routes.accepted + routes.steered,
            colors=[ColorMetrics(c.value, snap, routes.inflight(c), live is not None and
                                 live.color is c, builds.get(c) or "")
                    for c, snap in zip(Color, snaps, strict=True)]))

    def switch(self, target: Color, fallback: Fallback | None, drain_until: float | None,
               builds: dict[Color, str | None]) -> dict[str, Any]:
        """Serve ``target`` from now on. A fallback naming the serving color is kept but
        never used (``State.fallback_at`` skips it)."""
        if target not in self.settings.colors:
            raise UsageError(f"no address for {target} in {self.env_dir / 'router.json'}")
        # In effect from here on: every new connection (tcp) and request (http) reads
        # routes.live.
        before = self.routes.switch(target, fallback, drain_until, builds)
        self._steer_to(target)  # direct mode: one map update, new connections go to target
        self.switched_at = time.time()
        log("notice", f"switched {before or 'nothing'} → {target}: {self.status_line()}")
        return {"ok": True, "serving": target.value, "previous": _name(before),
                "switched_at": self.switched_at}

    async def steer(self, color: Color) -> dict[str, Any]:
        """Put ``color``'s listener in the steering's map (steered only once it is live)."""
        if self.direct is None:
            if self.settings.mode is Mode.direct:
                raise SteerError(f"direct mode is not steering: {self.direct_problem}",
                                 f"journalctl -u {self.env_dir.name}.service -n 50")
            refuse_outside_direct(self.settings.mode.value)
        return await self.direct.take(color)

    def set_fallback(self, fallback: Fallback | None) -> dict[str, Any]:
        self.routes.set_fallback(fallback)
        log("info", f"fallback window: {_fallback_json(fallback)}")
        return {"ok": True, "fallback": _fallback_json(fallback)}

    def set_canary(self, canary: Canary | None) -> dict[str, Any]:
        if canary is not None and self.settings.mode is Mode.direct:
            raise UsageError("canary: in direct mode the kernel steers every new connection "
                             "to one listener; no share of clients can be split off",
                             'use mode = "http" or "tcp" for canary steps')
        self.routes.set_canary(canary)
        log("notice", f"canary: {self._canary_text() or 'none, every client to the live color'}")
        return {"ok": True, "canary": canary_json(canary)}

    def set_preview(self, color: Color | None, token: str) -> dict[str, Any]:
        if color is not None and self.settings.mode is not Mode.http:
            raise UsageError(f"preview needs mode = \"http\"; this router is in "
                             f"{self.settings.mode} mode")
        self.routes.set_preview(color, token)  # never logged: the token is a secret
        log("notice", f"preview: requests with the preview token go to {color}" if color
                      else "preview: off")
        return {"ok": True, "preview": _name(color)}

    def pause(self, max_wait: float) -> dict[str, Any]:
        if self.paused_until is not None:
            raise UsageError(f"already paused until {_clock(self.paused_until)}",
                             "alive-switch resume ENV")
        until = time.time() + max_wait
        path = self.env_dir / PAUSE_FILE
        try:
            files.write_atomic(path, json.dumps({"until": until}).encode() + b"\n")
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e}; not paused",
                             "check the state directory") from None
        self._pause_until(until)
        log("notice", f"paused until {_clock(until)} (max_wait {max_wait:g} s)")
        return {"ok": True, "paused_until": until}

    def resume(self) -> dict[str, Any]:
        if self.paused_until is None:
            raise UsageError("not paused")
        released = self._end_pause(expired=False)
        log("notice", f"resumed: {released} held requests go on")
        return {"ok": True, "released": released}

    def _pause_until(self, until: float) -> None:
        self.paused_until = until
        self.routes.pause()
        if self.settings.mode in STOPS_ACCEPTING:
            self._stop_accepting()
        self._steer_to(None)
        self.pause_timer = self.loop.call_later(max(until - time.time(), 0.0),
                                                self._pause_over)

    def _pause_over(self) -> None:
        self.pause_timer = None
        answered = self._end_pause(expired=True)
        log("notice", f"the pause ran out: {answered} held requests answered 503")

    def _end_pause(self, expired: bool) -> int:
        if self.pause_timer is not None:
            self.pause_timer.cancel()
            self.pause_timer = None
        self.paused_until = None
        self._forget_pause()
        self._steer_to(self.view.active)
        if not self.servers and not self.stopping:
            self.loop.create_task(self._accept())
        return self.routes.resume(expired)

    def _restore_pause(self) -> None:
        """A pause outlives a restart: pause.json holds its end."""
        path = self.env_dir / PAUSE_FILE
        try:
            until = float(files.read_json(path)["until"])
        except FileNotFoundError:
            return
        except (*files.UNREADABLE, TypeError) as e:
            log("warning", f"{path} is unreadable ({e!r}): not paused")
            self._forget_pause()
            return
        if until <= time.time():
            self._forget_pause()
            return
        self._pause_until(until)
        log("notice", f"still paused until {_clock(until)} ({path})")

    def _forget_pause(self) -> None:
        path = self.env_dir / PAUSE_FILE
        try:
            path.unlink()
            files.fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as e:
            log("warning", f"cannot remove {path}: {e}; a restarted router would pause again "
                           "until its time")

    def _canary_text(self) -> str:
        split = self.routes.split
        if split is None:
            return ""
        canary = split.canary
        return f"canary {canary.percent}% of clients on {canary.color} (step {canary.step})"

    def reload(self) -> dict[str, Any]:
        """Re-read router.json and state.json; all or nothing. A new mode applies to the
        connections accepted from now on."""
        settings = load_settings(self.env_dir)
        view, source = load_view(self.env_dir)
        restart = [key for key in ("backlog", "control_socket", "control_group")
                   if getattr(settings, key) != getattr(self.settings, key)]
        metrics_moved = settings.metrics != self.settings.metrics
        self.settings = settings
        if metrics_moved:
            self._move_metrics()
        self.handler = self._handler(settings)
        self.routes.reload(settings, view)
        self._steer_or_not()
        self.source, self.switched_at = source, None
        log("notice", f"reloaded: {self.status_line()} (view from {source})"
                      + (f"; restart to apply {', '.join(restart)}" if restart else ""))
        return {"ok": True, "serving": _name(view.active), "state_source": source,
                "restart_needed": restart}

    # -- reporting to systemd ----------------------------------------------------------------

    def status_line(self) -> str:
        live = self.view.active
        routes = self.routes
        if self.stopping:
            parts = [f"stopping: {routes.open} connections finishing"]
        elif live is None:
            parts = ["no live color yet"]
        else:
            build = self.view.builds.get(live)
            parts = [f"serving {live} (build {build})" if build else f"serving {live}"]
        parts += [f"{c} draining {routes.inflight(c)}"
                  for c in Color if c != live and routes.inflight(c)
                  and (routes.split is None or routes.split.target.color is not c)]
        if canary := self._canary_text():
            parts.append(canary)
        if self.paused_until is not None:
            parts.append(f"paused until {_clock(self.paused_until)} "
                         f"({len(routes.held)} held)")
        parts += [problem for problem in (self.control_problem, self.metrics_problem,
                                          self.direct_problem) if problem]
        return " · ".join(parts)

    def _tick_status(self) -> None:
        self.notifier.status(self.status_line())
        self.loop.call_later(STATUS_EVERY, self._tick_status)

    def _tick_watchdog(self, interval: float) -> None:
        # Fed from the event loop: a stuck loop stops the pings and systemd restarts us.
        self.notifier.send("WATCHDOG=1")
        self.loop.call_later(interval, self._tick_watchdog, interval)


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def _per_color(figures: Iterable[tuple[Color, Snapshot]]) -> dict[str, Any]:
    """{color: FIGURES} from (Color, Snapshot) pairs."""
    return {c.value: figures_json(snap) for c, snap in figures}


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
