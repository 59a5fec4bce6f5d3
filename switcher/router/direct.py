"""Direct mode in the router: the steering's life beside the tcp path that stays the fallback.

- startup: load the program and attach it to the router's network namespace for the public
  socket's address (:mod:`.steer`); take the live color's listener so steering resumes after
  a router restart. A failure is logged and the router serves every connection itself (tcp
  mode's path): the port never refuses.
- ``take(color)`` (the ``steer`` command, sent at the end of the health gate): find the color's
  listener among its unit's processes, put it in the map, close the copy at once
  (:mod:`.listener`). ``select(color)`` (the ``switch``): one map update.
- a listener that closes (a crash, a restart) leaves the map by itself: its connections take
  the router's path until a ``take`` of the new one. Once a second the router looks: when the
  live color's slot is empty and the color answers its health probe (``GET health_path``
  on its own port), it takes the new listener.
- figures: the program counts the connections it steered per color; ``counted()`` gives
  those since its last call (the status probes left out: they are the router's own), which
  the router adds to each color's tally (:meth:`switcher.router.routes.Routes.snapshots`),
  so the watch judges steered connections as tcp mode's forwarded ones.
- shutdown: closing the link and the maps ends the steering; the kernel's normal lookup finds
  the systemd socket again.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn

from switcher.errors import SteerError, UsageError
from switcher.model import Color, RouterSettings
from switcher.router import listener, steer
from switcher.router.activation import log

RETAKE_EVERY = 1.0  # seconds between looks at the live color's slot
PROBE_TIMEOUT = 1.0  # seconds a restarted color has to answer its health probe


class Direct:
    """The steering of one router: what it steers, to which color, and what was taken."""

    def __init__(self, settings: RouterSettings, steering: steer.Steering) -> None:
        self.settings = settings
        self.steering = steering
        self.taken: dict[Color, float] = {}  # when each color's listener was put in the map
        self.read = dict.fromkeys(Color, 0)  # the program's counts at the last counted()
        self.probes = dict.fromkeys(Color, 0)  # status probes steered, not yet left out
        self.watching: asyncio.Task[None] | None = None
        self.closed = False

    @classmethod
    def open(cls, settings: RouterSettings, sockets: list[socket.socket]) -> Direct:
        """Attach the program for the first public socket a color can be steered from."""
        host = settings.colors[Color.blue][0]
        for sock in sockets:
            name = sock.getsockname()
            target = steer.target(name[0], name[1], host) if isinstance(name, tuple) else None
            if target is not None:
                return cls(settings, steer.Steering(target))
        raise SteerError(f"no public socket ({', '.join(_names(sockets))}) receives what colors "
                         f"bound to {host} accept: nothing can be steered",
                         "listen on the colors' host or a wildcard address, or use "
                         'mode = "tcp"')

    def unit(self, color: Color) -> str:
        return f"{self.settings.app}-{self.settings.env}@{color.value}.service"

    async def take(self, color: Color) -> dict[str, Any]:
        """Put ``color``'s listener in the map; the copy is closed before this returns. The
        ``/proc`` scan runs in a thread (it grows with the host's processes); the copy, taken
        back here, never outlives this call."""
        host, port = self.settings.colors[color]
        unit = self.unit(color)
        found = await asyncio.to_thread(listener.locate, unit, host, port)
        if self.closed:  # a reload or shutdown meanwhile: its maps' descriptors are gone
            raise SteerError(f"the router stopped steering while it took {unit}'s listener",
                             "alive-switch status ENV: see the router's mode")
        copy = listener.take(unit, found, host, port)
        try:
            self.steering.insert(color, copy)
        finally:
            copy.close()  # held, it would keep a dead color's port listening
        self.taken[color] = time.time()
        log("info", f"took the listener of {self.unit(color)} on {host}:{port}")
        return {"ok": True, "color": color.value, "taken_at": self.taken[color]}

    def select(self, color: Color | None) -> None:
        self.steering.select(color)

    async def resume(self, live: Color | None) -> None:
        """After a (re)start: take the live color's listener again if it is there (the
        caller selects it)."""
        if live is None:
            return
        try:
            await self.take(live)
        except SteerError as e:
            log("warning", f"not steering to {live} yet: {e}; the router serves it meanwhile")

    def keep_taking(self, live: Callable[[], Color | None]) -> None:
        """Take the live color's listener now, and from then on re-take it whenever it is
        gone from the map and the color is healthy again (systemd restarted it)."""
        self.watching = asyncio.get_running_loop().create_task(self._retake(live))

    async def _retake(self, live: Callable[[], Color | None]) -> None:
        await self.resume(live())
        while True:
            await asyncio.sleep(RETAKE_EVERY)
            try:
                await self._retake_once(live())
            except Exception as e:
                # Whatever one round met (a map that cannot be read, /proc racing a process
                # exit), the next round tries again: this task lives as long as the router.
                log("err", f"re-taking the live color's listener failed: {e!r}")

    async def _retake_once(self, color: Color | None) -> None:
        if color is None or self.steering.holds(color) or not self.settings.health_path:
            return
        host, port = self.settings.colors[color]
        if not await healthy(host, port, self.settings.health_path,
                             self.settings.health_expect):
            return
        try:
            await self.take(color)
        except SteerError as e:
            log("warning", f"{color} answers its health probe but: {e}")

    def counted(self) -> dict[Color, int]:
        """Connections the program steered to each color since the last call, without the
        status probes (a map that cannot be read counts nothing this time)."""
        try:
            now = self.steering.steered()
        except OSError as e:
            log("warning", f"cannot read the steered connections: {e}")
            return dict.fromkeys(Color, 0)
        new = {c: max(now[c] - self.read[c] - self.probes[c], 0) for c in Color}
        self.read, self.probes = now, dict.fromkeys(Color, 0)
        return new

    async def probe(self) -> tuple[Color | None, bool]:
        """The selected color and whether the kernel steers to it, measured by a probe
        connection; one that was steered is left out of ``counted``."""
        selected = self.steering.selected()
        steering = await self.steering.probe()
        if self.closed:  # a reload or shutdown meanwhile: the maps are gone
            return selected, False
        if steering and selected is not None:
            self.probes[selected] += 1
        return selected, steering

    async def status(self) -> dict[str, Any]:
        target = self.steering.target
        family = "ipv4" if target.family == socket.AF_INET else "ipv6"
        selected, steering = await self.probe()
        return {"families": [family], "address": target.address or "any",
                "port": target.port, "selected": _color_name(selected),
                "steering": steering,  # measured, not assumed
                "steered": ({} if self.closed else
                            {c.value: n for c, n in self.steering.steered().items()}),
                "taken_at": {c.value: t for c, t in self.taken.items()}}

    def close(self) -> None:
        self.closed = True
        if self.watching is not None:
            self.watching.cancel()
        self.steering.close()


async def healthy(host: str, port: int, path: str, expect: str) -> bool:
    """Whether ``GET path`` on the color answers a status ``expect`` accepts in time."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                             "Connection: close\r\n\r\n".encode())
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    parts = line.split()
    return len(parts) >= 2 and parts[1].isdigit() and accepts(expect, int(parts[1]))


def accepts(expect: str, code: int) -> bool:
    """``expect`` is "2xx" (a class) or "200,204" (codes)."""
    if expect.endswith("xx"):
        return code // 100 == int(expect[0])
    return str(code) in expect.split(",")


def refuse_outside_direct(mode: str) -> NoReturn:
    raise UsageError(f"steer: the router is in {mode} mode; only direct mode steers",
                     'set router.mode = "direct" and run `alive-switch install ENV`')


def _names(sockets: list[socket.socket]) -> list[str]:
    return [str(s.getsockname()) for s in sockets]


def _color_name(color: Color | None) -> str | None:
    return None if color is None else color.value
