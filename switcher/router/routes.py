"""The routing table: which color gets new work, and one account per color for both modes.

    Routes ── live ──▶ Backend(color, address)   inflight · total · errors · tally
      │ conns: every client connection admitted (a tcp.Link or an http.proxy.Conn)
      │ view:  the router's State (active color, fallback window, drain_until, canary)
      │ split: the canary step in effect (a share of clients on another color), or None
      │ preview: requests with the preview token go to its color, or None
      │ paused: http requests are held here (``held``) until resume or the pause's end

``plain`` is True when none of split, preview and pause is set: the hot path then reads
``live`` and nothing else (no hashing, no header looked at twice).

A client connection is handled by the handler of the mode it was accepted in and asks the
table only what does not depend on the mode: the live color, the fallback after a refused
connect, that it is gone. The account of a color means the same in both modes where it
can: ``inflight`` is what "drained" waits for (tcp: connections open on the color; http:
requests sent and not answered whole, and tunnels), ``total`` what the color took (tcp:
connections it accepted; http: requests sent to it), ``errors`` what failed on it
(refused, unreachable, broken), and ``tally`` the same failures by reason with its answers
(:mod:`.tally`); ``accepted`` counts client connections, ``switches`` the switches.
In direct mode the kernel hands most connections to the colors without the router:
``outside`` (the steering's ``counted``) gives those, and every read of the tallies adds
them to each color's ``connections`` and to ``steered`` first.
http mode keeps a color's idle connections in its ``pool`` (:mod:`.http.pool`): only the
live color's, so every change of what is served closes the others' at once.

Timers: at ``drain_until`` the table cuts what is left on colors other than the serving one;
every ``SWEEP_EVERY`` it lets each connection apply its own timeouts (no per-request timer)
and closes pooled connections idle too long, and every ``MARK_EVERY`` it puts a snapshot of
every tally in the ring.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from switcher.errors import UsageError
from switcher.model import Canary, Color, Fallback, RouterSettings, State
from switcher.router.activation import log
from switcher.router.http.pool import Pool
from switcher.router.split import Preview, Split
from switcher.router.tally import Failure, Ring, Snapshot, Tally, minus

SWEEP_EVERY = 0.5  # seconds between checks of http timeouts (no per-request timers)
MARK_EVERY = 1.0  # seconds between snapshots in the ring


class Backend:
    """One color: where it listens and what it carries (the same account in both modes)."""

    __slots__ = ("address", "color", "errors", "inflight", "pool", "tally", "total")

    def __init__(self, color: Color, address: tuple[str, int] | None = None,
                 pool: Pool | None = None) -> None:
        self.color = color
        self.pool = Pool() if pool is None else pool  # http: idle connections to it
        self.address = address  # None: the color has no address in router.json
        self.inflight = 0
        self.total = 0
        self.errors = 0
        self.tally = Tally()

    def failed(self, failure: Failure) -> None:
        self.errors += 1
        self.tally.failures[failure] += 1


class Client(Protocol):
    """A client connection of either mode, as the table drives it."""

    @property
    def busy_on(self) -> Color | None:
        """The color its work in flight is on, if any."""

    def check(self, now: float) -> None: ...
    def leave_idle(self, routes: Routes) -> None: ...
    def cut(self) -> None: ...
    def stop(self) -> None: ...
    def release(self, expired: bool) -> None: ...


class Routes:
    """The serving color, the fallback, the accounts and the client connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: RouterSettings,
                 view: State) -> None:
        self.loop = loop
        self.max_connections = settings.max_connections
        self.backends = {c: Backend(c, settings.colors.get(c),
                                    Pool(settings.pool_size, settings.pool_idle)) for c in Color}
        self.conns: set[Client] = set()
        self.view = view
        self.live: Backend | None = None  # where new work goes; None: no live color
        self.split: Split[Backend] | None = None
        self.preview: Preview[Backend] | None = None  # memory only: a restart drops it
        self.paused = False
        self.held: set[Client] = set()  # connections whose next request waits for resume
        self.plain = True
        self.serve(view)
        self.stopping = False
        self.idle = asyncio.Event()  # set when stopping and the last connection is gone
        self.cut_timer: asyncio.TimerHandle | None = None
        self.sweeping: asyncio.TimerHandle | None = None
        self.accepted = 0  # client connections admitted, ever
        self.switches = 0
        self.steered = 0  # client connections the kernel handed to a color (direct mode)
        self.outside: Callable[[], dict[Color, int]] | None = None  # new steered, per color
        self.ring = Ring(len(self.backends), time.monotonic())
        self.marking: asyncio.TimerHandle | None = None

    # -- called by connections ---------------------------------------------------------------

    @property
    def open(self) -> int:
        return len(self.conns)

    def accept(self, conn: Client) -> bool:
        """Count a new client connection in, unless there are ``max_connections``."""
        if len(self.conns) >= self.max_connections:
            return False
        self.conns.add(conn)
        self.accepted += 1
        return True

    def gone(self, conn: Client) -> None:
        self.held.discard(conn)
        if conn in self.conns:
            self.conns.discard(conn)
            if not self.conns and self.stopping:
                self.idle.set()

    def fallback(self, tried: list[Color]) -> Backend | None:
        """After a refused connect (nothing sent yet): the serving color or the open
        fallback, if not tried yet. Never any other color."""
        view = self.view
        for color in (view.active, view.fallback_at(time.time())):
            if color is not None and color not in tried:
                backend = self.backends[color]
                if backend.address is not None:
                    return backend
        return None

    # -- what is served ----------------------------------------------------------------------

    def serve(self, view: State) -> None:
        """Serve ``view``: new work goes to its active color from now on."""
        self.view = view
        active = view.active
        live = self.backends[active] if active is not None else None
        self.live = live if live is not None and live.address is not None else None
        self.split = self._split(view.canary)
        self._plain()

    def _split(self, canary: Canary | None) -> Split[Backend] | None:
        """The split of ``canary``, if it can apply: a color other than the live one,
        with an address (else, every client to the live color)."""
        if canary is None or self.live is None:
            return None
        backend = self.backends[canary.color]
        if backend is self.live or backend.address is None:
            log("warning", f"canary on {canary.color} ignored: it is the live color or has "
                           "no address; every client goes to the live color")
            return None
        return Split(canary, backend)

    def _plain(self) -> None:
        self.plain = self.split is None and self.preview is None and not self.paused

    def pick(self, client: bytes) -> Backend | None:
        """Where new work of this client goes (the live color unless a canary takes it)."""
        split = self.split
        if split is not None and split.takes(client):
            return split.target
        return self.live

    def other_color(self, color: Color, what: str) -> Backend:
        """The backend of ``color`` for a canary or a preview: not the live one, with an
        address; raises UsageError."""
        if self.live is None:
            raise UsageError(f"{what}: no live color yet", "deploy first")
        backend = self.backends[color]
        if backend is self.live:
            raise UsageError(f"{what}: {color} is the live color; a {what} needs the other one")
        if backend.address is None:
            raise UsageError(f"{what}: {color} has no address in router.json",
                             "alive-switch install ENV")
        return backend

    def set_canary(self, canary: Canary | None) -> None:
        """Send ``canary.percent`` of clients to its color from now on (None: none)."""
        if canary is not None:
            self.other_color(canary.color, "canary")
        self.view = replace(self.view, canary=canary)
        self.split = self._split(canary)
        self._plain()
        # No cut: what a withdrawn canary color has in flight finishes there (the CLI waits
        # for it before stopping the color); a drain's cut is a switch's business.
        self._leave_idle()

    def set_preview(self, color: Color | None, token: str) -> None:
        self.preview = None if color is None else Preview(token, self.other_color(color,
                                                                                  "preview"))
        self._plain()
        self._leave_idle()

    def pause(self) -> None:
        """Hold every http request whose turn comes from now on (tcp: the router stops
        accepting instead)."""
        self.paused = True
        self._plain()

    def resume(self, expired: bool) -> int:
        """End the pause: held requests go on (``expired``: are answered 503); returns how
        many were held."""
        self.paused = False
        self._plain()
        held, self.held = self.held, set()
        for conn in held:
            conn.release(expired)
        return len(held)

    def takes_work(self, backend: Backend) -> bool:
        """Whether new work may go to ``backend`` (so a connection to it may be kept)."""
        if backend is self.live:
            return True
        split, preview = self.split, self.preview
        return (split is not None and split.target is backend) or \
            (preview is not None and preview.target is backend)

    def switch(self, target: Color, fallback: Fallback | None, drain_until: float | None,
               builds: dict[Color, str | None]) -> Color | None:
        """Serve ``target`` from now on; returns the color served before."""
        view = self.view
        before = view.active
        self.serve(replace(view, active=target, fallback=fallback, drain_until=drain_until,
                           builds={**view.builds, **builds},
                           previous=before if before not in (None, target) else view.previous,
                           canary=None))
        self.preview = None  # a switch ends a canary and a preview: all clients on target
        self._plain()
        self.switches += 1
        self._after_change()
        return before

    def set_fallback(self, fallback: Fallback | None) -> None:
        self.view = replace(self.view, fallback=fallback)

    def reload(self, settings: RouterSettings, view: State) -> None:
        """New addresses and a new view, read again from the state directory."""
        self.max_connections = settings.max_connections
        for color, backend in self.backends.items():
            backend.address = settings.colors.get(color)
            backend.pool.configure(settings.pool_size, settings.pool_idle)
        self.serve(view)
        self._after_change()

    def _after_change(self) -> None:
        self._leave_idle()
        self.schedule_cut()

    def _leave_idle(self) -> None:
        for backend in self.backends.values():
            if not self.takes_work(backend):
                backend.pool.clear()  # none is used after T0
        for conn in list(self.conns):
            conn.leave_idle(self)

    def inflight(self, color: Color) -> int:
        return self.backends[color].inflight

    # -- figures -----------------------------------------------------------------------------

    def snapshots(self) -> tuple[Snapshot, ...]:
        """Every color's tally now, in Color order (with what was counted outside)."""
        if self.outside is not None:
            self.count_outside(self.outside())
        return tuple(self.backends[c].tally.snapshot() for c in Color)

    def count_outside(self, connections: dict[Color, int]) -> None:
        """Connections that reached each color without the router (direct mode)."""
        for color, n in connections.items():
            self.backends[color].tally.connections += n
            self.steered += n

    def figures(self, seconds: float) -> tuple[float, dict[Color, Snapshot]]:
        """What each color did over the last ``seconds`` (as far as the ring reaches):
        (the seconds covered, a Snapshot of differences per color)."""
        now = time.monotonic()
        covered, older = self.ring.since(now, seconds)
        newer = self.snapshots()
        return covered, {c: minus(n, o) for c, n, o in zip(Color, newer, older, strict=True)}

    # -- timers ------------------------------------------------------------------------------

    def start_sweeping(self) -> None:
        self.sweeping = self.loop.call_later(SWEEP_EVERY, self._sweep)
        self.marking = self.loop.call_later(MARK_EVERY, self._mark)

    def _mark(self) -> None:
        self.ring.mark(time.monotonic(), self.snapshots())
        self.marking = self.loop.call_later(MARK_EVERY, self._mark)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns):
            conn.check(now)
        for backend in self.backends.values():
            backend.pool.prune(now)
        self.sweeping = self.loop.call_later(SWEEP_EVERY, self._sweep)

    def schedule_cut(self) -> None:
        """At ``drain_until``, cut what is still open on colors other than the serving one."""
        if self.cut_timer is not None:
            self.cut_timer.cancel()
            self.cut_timer = None
        if self.view.drain_until is not None:
            delay = self.view.drain_until - time.time()
            self.cut_timer = self.loop.call_later(max(delay, 0.0), self._cut_draining)

    def _cut_draining(self) -> None:
        self.cut_timer = None
        # A canary or preview color started after this drain began is not draining.
        keep = {self.view.active} | {b.target.color for b in (self.split, self.preview)
                                     if b is not None}
        others = {c for c in Color if c not in keep}
        if cut := self.cut(others):
            log("notice", f"drain time is over: cut {cut} connections on "
                          f"{'/'.join(sorted(others))}")

    # -- the end -----------------------------------------------------------------------------

    def cut(self, colors: set[Color]) -> int:
        """Cut the connections with work in flight on ``colors``; returns how many."""
        doomed = [conn for conn in self.conns if conn.busy_on in colors]
        for conn in doomed:
            conn.cut()
        return len(doomed)

    def stop(self) -> None:
        self.stopping = True
        self._clear_pools()
        if self.held:  # the next router keeps the pause (pause.json); these get 503 now
            self.resume(expired=True)
        for conn in list(self.conns):
            conn.stop()

    def cut_all(self) -> None:
        self._clear_pools()
        self.cut(set(Color))
        for conn in list(self.conns):  # http: idle keep-alive connections too
            conn.cut()

    def _clear_pools(self) -> None:
        for backend in self.backends.values():
            backend.pool.clear()
