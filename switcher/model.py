"""Pure values shared by the CLI and the router: colors, phases, state, router settings.

No I/O here. ``state.json`` (written only by :mod:`switcher.state`) looks like::

    {
      "schema": 1,
      "active": "green",                  # live color, or null before the first deploy
      "previous": "blue",                 # the color that was live before, or null
      "builds": {"blue": "b1", "green": "b2"},   # build each color's link points at
      "pending": null | {"target": "blue", "phase": "switching", "deploy_id": "..."},
      "fallback": null | {"color": "blue", "until": 1790000000.0},
      "drain_until": null | 1790000000.0, # old color's in-flight work is cut at this time
      "canary": null | {"color": "green", "percent": 10, "step": 1, "seed": "..."},
      "deploy_id": "...",                 # of the last committed deploy or rollback
      "updated": 1790000000.0
    }

``fallback`` is the previous live color during its drain/watch/standby window: the only
color the router may use when the live one refuses a connection. ``canary`` is the share of
clients a running canary step sends to a color that is not live yet (only while
``pending.phase`` is ``canary``): a client goes there when its hash, seeded by ``seed``,
falls in the first ``percent`` of the hash space, so a client that moved stays moved as the
share grows.

The router's settings file ``router.json`` (written by ``install``)::

    {"schema": 1, "app": "alive", "env": "production", "mode": "tcp",
     "colors": {"blue": ["127.0.0.1", 9001], "green": ["127.0.0.1", 9002]},
     "backlog": 4096, "max_connections": 10000, "restart_drain": 1.0,
     "header_timeout": 10.0, "idle_timeout": 75.0, "max_header_bytes": 65536,
     "trusted_proxies": [], "control_socket": "/run/alive-switch/alive-production/control.sock",
     "control_group": "", "body_timeout": 60.0, "response_timeout": 60.0,
     "tunnels": ["websocket"], "metrics": "", "health_path": "/api/health",
     "health_expect": "2xx", "pool_size": 64, "pool_idle": 2.0}
"""

from __future__ import annotations

import enum
import ipaddress
import time
from dataclasses import dataclass, field, replace
from typing import Any

STATE_SCHEMA = 1
# The router keeps one snapshot of its per-color figures a second for this long: the
# longest window the control socket's ``figures`` command (and analysis.baseline) can cover.
FIGURES_RING_SECONDS = 300
# The router's latency histogram: the buckets of alive_switch_request_duration_seconds
# (DESIGN.md Part 2), in seconds; answers beyond the last fall in one more bucket.
DURATION_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")  # how the router counts answers


class Color(enum.StrEnum):
    blue = "blue"
    green = "green"

    @property
    def other(self) -> Color:
        return Color.green if self is Color.blue else Color.blue


class Mode(enum.StrEnum):
    http = "http"
    tcp = "tcp"
    direct = "direct"  # the kernel steers to the color's own listener; tcp's path as fallback


class Phase(enum.StrEnum):
    """Deploy phases, in order. A pending intent at or past ``switching`` means the
    router may already serve the target."""

    lock = "lock"
    reconcile = "reconcile"
    preflight = "preflight"  # first: a failed check must leave the standby color as it was
    cancel_timer = "cancel_timer"
    start = "start"
    health = "health"
    pre_switch = "pre_switch"
    canary = "canary"  # a share of clients on the target; the old color is still live
    switching = "switching"
    commit = "commit"
    watch = "watch"
    schedule_retire = "schedule_retire"
    post_switch = "post_switch"
    done = "done"

    @property
    def past_switch(self) -> bool:
        order = list(Phase)
        return order.index(self) >= order.index(Phase.switching)


@dataclass(frozen=True)
class Pending:
    target: Color
    phase: Phase
    deploy_id: str
    build: str

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target.value, "phase": self.phase.value,
                "deploy_id": self.deploy_id, "build": self.build}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Pending:
        return cls(Color(raw["target"]), Phase(raw["phase"]), str(raw["deploy_id"]),
                   str(raw.get("build", "")))


# A request carrying this header with the deploy's token reaches the new color between its
# health gate and the switch (http mode); the router removes it from every request.
PREVIEW_HEADER = "Alive-Switch-Preview"
CANARY_BUCKETS = 10_000  # a client's hash falls in one of these; percent p takes p × 100


@dataclass(frozen=True)
class Canary:
    """A running canary step: ``percent`` of clients (1–99) on ``color``."""

    color: Color
    percent: int
    step: int  # 1-based, of the deploy's step list
    seed: str  # the deploy's id: each deploy moves a different first share of clients

    def to_json(self) -> dict[str, Any]:
        """As state.json and the control socket carry it."""
        return {"color": self.color.value, "percent": self.percent, "step": self.step,
                "seed": self.seed}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Canary:
        percent = int(raw["percent"])
        if not 1 <= percent <= 99:
            raise ValueError(f"canary percent {percent} is outside 1-99")
        return cls(Color(raw["color"]), percent, int(raw["step"]), str(raw["seed"]))


def canary_json(canary: Canary | None) -> dict[str, Any] | None:
    return None if canary is None else canary.to_json()


@dataclass(frozen=True)
class Fallback:
    color: Color
    until: float

    def open_at(self, now: float) -> bool:
        return now < self.until

    def to_json(self) -> dict[str, Any]:
        """As state.json, the control socket and status --json carry it."""
        return {"color": self.color.value, "until": self.until}


def fallback_json(fallback: Fallback | None) -> dict[str, Any] | None:
    return None if fallback is None else fallback.to_json()


def color_name(color: Color | None) -> str | None:
    """A color as JSON carries it: its name, or null."""
    return None if color is None else color.value


@dataclass(frozen=True)
class State:
    active: Color | None = None
    previous: Color | None = None
    builds: dict[Color, str | None] = field(
        default_factory=lambda: {Color.blue: None, Color.green: None})
    pending: Pending | None = None
    fallback: Fallback | None = None
    drain_until: float | None = None
    deploy_id: str = ""
    updated: float = 0.0
    canary: Canary | None = None

    def serving(self) -> Color | None:
        """The color the router should send new work to, reading the intent too."""
        if self.pending is not None and self.pending.phase.past_switch:
            return self.pending.target
        return self.active

    def fallback_at(self, now: float) -> Color | None:
        fb = self.fallback
        if fb is None or not fb.open_at(now) or fb.color == self.serving():
            return None
        return fb.color

    def with_(self, **changes: Any) -> State:
        return replace(self, updated=time.time(), **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "active": color_name(self.active),
            "previous": color_name(self.previous),
            "builds": {c.value: b for c, b in self.builds.items()},
            "pending": self.pending.to_json() if self.pending else None,
            "fallback": fallback_json(self.fallback),
            "drain_until": self.drain_until,
            "canary": canary_json(self.canary),
            "deploy_id": self.deploy_id,
            "updated": self.updated,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> State:
        """Parse; raises KeyError/ValueError/TypeError on a malformed document."""
        if raw.get("schema") != STATE_SCHEMA:
            raise ValueError(f"unknown state schema {raw.get('schema')!r}")
        fb = raw.get("fallback")
        return cls(
            active=_color(raw.get("active")),
            previous=_color(raw.get("previous")),
            builds={c: raw.get("builds", {}).get(c.value) for c in Color},
            pending=Pending.from_json(raw["pending"]) if raw.get("pending") else None,
            fallback=Fallback(Color(fb["color"]), float(fb["until"])) if fb else None,
            drain_until=float(raw["drain_until"]) if raw.get("drain_until") else None,
            deploy_id=str(raw.get("deploy_id", "")),
            updated=float(raw.get("updated", 0.0)),
            canary=Canary.from_json(raw["canary"]) if raw.get("canary") else None,
        )


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def steered_address(public_host: str, color_host: str) -> tuple[int, str | None] | None:
    """Direct mode: (IP version, local address or None for any) of the connections to the
    public socket that may be steered to colors bound to ``color_host`` — only those the
    color's own listener would accept (a loopback-bound color must not become reachable from
    outside through a wildcard public socket). None when there are none."""
    color = ipaddress.ip_address(color_host)
    public = ipaddress.ip_address(public_host.strip("[]") or "::")
    if not color.is_unspecified:
        return (color.version, str(color)) if public in (color, _any(public)) else None
    if public.is_unspecified:
        return color.version, None
    return (color.version, str(public)) if public.version == color.version else None


def _any(address: IPAddress) -> IPAddress:
    """The wildcard address of ``address``'s family."""
    return ipaddress.ip_address("0.0.0.0" if address.version == 4 else "::")


def _color(value: object) -> Color | None:
    return None if value is None else Color(str(value))


@dataclass(frozen=True)
class RouterSettings:
    app: str
    env: str
    mode: Mode
    colors: dict[Color, tuple[str, int]]
    control_socket: str
    backlog: int = 4096
    max_connections: int = 10000
    restart_drain: float = 1.0
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_header_bytes: int = 65536
    trusted_proxies: tuple[str, ...] = ()
    control_group: str = ""
    body_timeout: float = 60.0
    response_timeout: float = 60.0
    tunnels: tuple[str, ...] = ("websocket",)
    metrics: str = ""  # "ADDR:PORT" of the Prometheus listener; "" = off
    # Direct mode: how the router probes a color restarted by systemd before it takes the new
    # listener. health_expect is "2xx" (a class) or codes, "200,204".
    health_path: str = ""
    health_expect: str = "2xx"
    pool_size: int = 64  # http: idle keep-alive connections kept per color (0 = off)
    pool_idle: float = 2.0  # http: seconds an idle pooled connection may be reused

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA, "app": self.app, "env": self.env, "mode": self.mode.value,
            "colors": {c.value: [h, p] for c, (h, p) in self.colors.items()},
            "control_socket": self.control_socket, "backlog": self.backlog,
            "max_connections": self.max_connections, "restart_drain": self.restart_drain,
            "header_timeout": self.header_timeout, "idle_timeout": self.idle_timeout,
            "max_header_bytes": self.max_header_bytes,
            "trusted_proxies": list(self.trusted_proxies), "control_group": self.control_group,
            "body_timeout": self.body_timeout, "response_timeout": self.response_timeout,
            "tunnels": list(self.tunnels), "metrics": self.metrics,
            "health_path": self.health_path, "health_expect": self.health_expect,
            "pool_size": self.pool_size, "pool_idle": self.pool_idle,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RouterSettings:
        return cls(
            app=str(raw["app"]), env=str(raw["env"]), mode=Mode(raw["mode"]),
            colors={Color(c): (str(hp[0]), int(hp[1])) for c, hp in raw["colors"].items()},
            control_socket=str(raw["control_socket"]), backlog=int(raw["backlog"]),
            max_connections=int(raw["max_connections"]),
            restart_drain=float(raw["restart_drain"]),
            header_timeout=float(raw["header_timeout"]), idle_timeout=float(raw["idle_timeout"]),
            max_header_bytes=int(raw["max_header_bytes"]),
            trusted_proxies=tuple(raw.get("trusted_proxies", ())),
            control_group=str(raw.get("control_group", "")),
            body_timeout=float(raw.get("body_timeout", 60.0)),
            response_timeout=float(raw.get("response_timeout", 60.0)),
            tunnels=tuple(str(t) for t in raw.get("tunnels", ("websocket",))),
            metrics=str(raw.get("metrics", "")),
            health_path=str(raw.get("health_path", "")),
            health_expect=str(raw.get("health_expect", "2xx")),
            pool_size=int(raw.get("pool_size", 64)), pool_idle=float(raw.get("pool_idle", 2.0)),
        )
