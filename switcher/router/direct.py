"""Direct mode in the router: the steering's life beside the tcp path that stays the fallback.

- startup: load the program and attach it to the router's network namespace for the public
  socket's address (:mod:`.steer`); take the live color's listener so steering resumes after
  a router restart. A failure is logged and the router serves every connection itself (tcp
  mode's path): the port never refuses.
- ``take(color)`` (the ``steer`` command, sent at the end of the health gate): find the color's
  listener among its unit's processes, put it in the map, close the copy at once
  (:mod:`.listener`). ``select(color)`` (the ``switch``): one map update.
- a listener that closes (a crash, a restart) leaves the map by itself: its connections take
  the router's path until a ``take`` of the new one.
- shutdown: closing the link and the maps ends the steering; the kernel's normal lookup finds
  the systemd socket again.
"""

from __future__ import annotations

import socket
import time
from typing import Any, NoReturn

from switcher.errors import SteerError, UsageError
from switcher.model import Color, RouterSettings
from switcher.router import listener, steer
from switcher.router.activation import log


class Direct:
    """The steering of one router: what it steers, to which color, and what was taken."""

    def __init__(self, settings: RouterSettings, steering: steer.Steering) -> None:
        self.settings = settings
        self.steering = steering
        self.taken: dict[Color, float] = {}  # when each color's listener was put in the map

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

    def take(self, color: Color) -> dict[str, Any]:
        """Put ``color``'s listener in the map; the copy is closed before this returns."""
        host, port = self.settings.colors[color]
        copy = listener.take(self.unit(color), host, port)
        try:
            self.steering.insert(color, copy)
        finally:
            copy.close()  # held, it would keep a dead color's port listening
        self.taken[color] = time.time()
        log("info", f"took the listener of {self.unit(color)} on {host}:{port}")
        return {"ok": True, "color": color.value, "taken_at": self.taken[color]}

    def select(self, color: Color | None) -> None:
        self.steering.select(color)

    def resume(self, live: Color | None) -> None:
        """After a (re)start: steer to the live color again if its listener is there."""
        if live is None:
            return
        try:
            self.take(live)
        except SteerError as e:
            log("warning", f"not steering to {live} yet: {e}; the router serves it meanwhile")
        self.select(live)

    def status(self) -> dict[str, Any]:
        target = self.steering.target
        family = "ipv4" if target.family == socket.AF_INET else "ipv6"
        return {"families": [family], "address": target.address or "any",
                "port": target.port, "selected": _color_name(self.steering.selected()),
                "steering": self.steering.probe(),  # measured, not assumed
                "steered": {c.value: n for c, n in self.steering.steered().items()},
                "taken_at": {c.value: t for c, t in self.taken.items()}}

    def close(self) -> None:
        self.steering.close()


def refuse_outside_direct(mode: str) -> NoReturn:
    raise UsageError(f"steer: the router is in {mode} mode; only direct mode steers",
                     'set router.mode = "direct" and run `alive-switch install ENV`')


def _names(sockets: list[socket.socket]) -> list[str]:
    return [str(s.getsockname()) for s in sockets]


def _color_name(color: Color | None) -> str | None:
    return None if color is None else color.value
