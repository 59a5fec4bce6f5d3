"""The CLI's side of the router's control socket (protocol: :mod:`switcher.router.control`),
behind a small interface so the deploy logic can be tested with a fake router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from switcher.analysis import Figures
from switcher.errors import RouterError, SwitchError
from switcher.model import (
    FIGURES_RING_SECONDS,
    Canary,
    Color,
    Fallback,
    canary_json,
    fallback_json,
)

CONTROL_TIMEOUT = 5.0


class Router(Protocol):
    def status(self, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]: ...
    def figures(self, seconds: float, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]: ...
    def switch(self, target: Color, fallback: Fallback | None,
               drain_until: float | None, builds: dict[Color, str | None]) -> dict[str, Any]: ...
    def set_fallback(self, fallback: Fallback | None) -> None: ...
    def set_canary(self, canary: Canary | None) -> dict[str, Any]: ...
    def set_preview(self, color: Color | None, token: str = "") -> None: ...
    def pause(self, max_wait: float) -> dict[str, Any]: ...
    def resume(self) -> dict[str, Any]: ...
    def steer(self, color: Color) -> None: ...


def serving(status: dict[str, Any]) -> Color | None:
    value = status.get("serving")
    return Color(value) if value else None


@dataclass(frozen=True)
class Reading:
    """Per-color figures from one answer of the router, and when that router started (its
    counters count from then: a new start time is a new router, counting from zero)."""

    started_at: float
    colors: dict[Color, Figures]
    seconds: float | None = None  # what a window covered; None: cumulative counters


def counters(status: dict[str, Any]) -> Reading:
    """The cumulative counters of a ``status`` answer; ValueError when it has none (a router
    older than its figures) or they are malformed."""
    return _reading(status.get("started_at"), status.get("counters"), None)


def recent(status: dict[str, Any]) -> Reading:
    """The ``recent`` window of a ``status`` answer (the router's last 60 s, or less)."""
    window = status.get("recent")
    if not isinstance(window, dict):
        raise ValueError("the router's status has no recent figures")
    return _reading(status.get("started_at"), window, _seconds(window))


def window(reply: dict[str, Any]) -> Reading:
    """The answer of a ``figures`` command."""
    return _reading(reply.get("started_at"), reply.get("colors"), _seconds(reply))


def _reading(started: Any, colors: Any, seconds: float | None) -> Reading:
    if not isinstance(colors, dict) or not isinstance(started, int | float):
        raise ValueError("the router's answer has no per-color figures with a start time "
                         "(a router older than its figures?)")
    return Reading(float(started), {c: Figures.from_json(colors.get(c.value, {}))
                                    for c in Color}, seconds)


def _seconds(reply: dict[str, Any]) -> float:
    value = reply.get("seconds")
    if not isinstance(value, int | float):
        raise ValueError(f"the router's figures cover no stated seconds: {value!r}")
    return float(value)


@dataclass
class ControlSocket:
    path: str
    router_unit: str

    def _request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        from switcher.router.control import request  # noqa: PLC0415

        try:
            reply = request(self.path, message, timeout)
        except SwitchError as exc:
            raise RouterError(exc.message, exc.hint) from None
        except (OSError, ValueError) as exc:
            raise RouterError(f"router control socket {self.path}: {exc}",
                              f"is the router running? systemctl status {self.router_unit}; "
                              f"journalctl -u {self.router_unit} -n 50") from None
        if not reply.get("ok"):
            raise RouterError(f"router refused {message.get('cmd')!r}: {reply.get('error')}",
                              f"journalctl -u {self.router_unit} -n 50")
        return reply

    def status(self, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        return self._request({"cmd": "status"}, timeout)

    def figures(self, seconds: float, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        """Per-color differences over the last ``seconds`` (the ring holds at most 300)."""
        return self._request({"cmd": "figures", "seconds": min(seconds, FIGURES_RING_SECONDS)},
                             timeout)

    def switch(self, target: Color, fallback: Fallback | None,
               drain_until: float | None, builds: dict[Color, str | None]) -> dict[str, Any]:
        return self._request({
            "cmd": "switch", "target": target.value,
            "fallback": fallback_json(fallback), "drain_until": drain_until,
            "builds": {c.value: b for c, b in builds.items()},
        }, CONTROL_TIMEOUT)

    def set_fallback(self, fallback: Fallback | None) -> None:
        self._request({"cmd": "fallback", "fallback": fallback_json(fallback)}, CONTROL_TIMEOUT)

    def set_canary(self, canary: Canary | None) -> dict[str, Any]:
        """Send ``canary.percent`` of clients to ``canary.color`` (None: every client to the
        live color); answered once new work goes by the new split."""
        return self._request({"cmd": "canary", "canary": canary_json(canary)}, CONTROL_TIMEOUT)

    def set_preview(self, color: Color | None, token: str = "") -> None:
        """Requests carrying the preview header with ``token`` go to ``color`` (None: off)."""
        self._request({"cmd": "preview", "color": None if color is None else color.value,
                       "token": token}, CONTROL_TIMEOUT)

    def pause(self, max_wait: float) -> dict[str, Any]:
        return self._request({"cmd": "pause", "max_wait": max_wait}, CONTROL_TIMEOUT)

    def resume(self) -> dict[str, Any]:
        return self._request({"cmd": "resume"}, CONTROL_TIMEOUT)

    def steer(self, color: Color) -> None:
        """Direct mode: the router takes ``color``'s listener into the kernel's map."""
        self._request({"cmd": "steer", "color": color.value}, CONTROL_TIMEOUT)
