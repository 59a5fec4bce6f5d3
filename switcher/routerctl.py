"""The CLI's side of the router's control socket (protocol: :mod:`switcher.router.control`),
behind a small interface so the deploy logic can be tested with a fake router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from switcher.errors import RouterError, SwitchError
from switcher.model import Color, Fallback, fallback_json

CONTROL_TIMEOUT = 5.0


class Router(Protocol):
    def status(self, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]: ...
    def switch(self, target: Color, fallback: Fallback | None,
               drain_until: float | None, builds: dict[Color, str | None]) -> dict[str, Any]: ...
    def set_fallback(self, fallback: Fallback | None) -> None: ...


def serving(status: dict[str, Any]) -> Color | None:
    value = status.get("serving")
    return Color(value) if value else None


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

    def switch(self, target: Color, fallback: Fallback | None,
               drain_until: float | None, builds: dict[Color, str | None]) -> dict[str, Any]:
        return self._request({
            "cmd": "switch", "target": target.value,
            "fallback": fallback_json(fallback), "drain_until": drain_until,
            "builds": {c.value: b for c, b in builds.items()},
        }, CONTROL_TIMEOUT)

    def set_fallback(self, fallback: Fallback | None) -> None:
        self._request({"cmd": "fallback", "fallback": fallback_json(fallback)}, CONTROL_TIMEOUT)
