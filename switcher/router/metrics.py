"""Prometheus metrics at ``router.metrics`` (``GET /metrics``, text format 0.0.4).

    alive_switch_responses_total{env,color,code}            counter (code 1xx … 5xx)
    alive_switch_upstream_failures_total{env,color,reason}  counter (refused, reset, timeout)
    alive_switch_request_duration_seconds{env,color}        histogram (tally.BOUNDS)
    alive_switch_inflight{env,color}                        gauge
    alive_switch_live{env,color}                            gauge (1 live, else 0)
    alive_switch_color_info{env,color,build}                gauge (1)
    alive_switch_canary_percent{env}                        gauge
    alive_switch_switches_total{env}                        counter
    alive_switch_connections_total{env}                     counter (client connections;
                                                            direct mode: steered ones too)

Every series is there from the start, at 0. The exposition is written here rather than by
prometheus_client: that library would cost the router's start an import (57 ms measured
with ``python -X importtime``) and its counters take a lock per increment on the request
path; here the request path only increments the router's own integers (:mod:`.tally`) and
a scrape reads them.

The listener is its own asyncio server, never the public port: one request per connection
(a head of at most HEAD_LIMIT bytes within READ_TIMEOUT), then ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from switcher.router.tally import BOUNDS, Failure, Snapshot, figures_json

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
HEAD_LIMIT = 8192
READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class ColorMetrics:
    color: str
    tally: Snapshot
    inflight: int
    live: bool
    build: str

    @functools.cached_property
    def figures(self) -> dict[str, Any]:
        """The tally as FIGURES, read once per scrape."""
        return figures_json(self.tally)


@dataclass(frozen=True)
class Metrics:
    """What one scrape shows."""

    env: str
    colors: list[ColorMetrics]
    canary_percent: float
    switches: int
    connections: int


def render(m: Metrics) -> str:
    env = f'env="{_escape(m.env)}"'
    out: list[str] = []
    _family(out, "responses_total", "counter", "Answers of each color by status class.",
            [(f'{env},color="{c.color}",code="{code}"', n) for c in m.colors
             for code, n in c.figures["responses"].items()])
    _family(out, "upstream_failures_total", "counter",
            "Failures the router saw itself, by reason.",
            [(f'{env},color="{c.color}",reason="{f.name}"',
              c.figures["failures"][f.name]) for c in m.colors for f in Failure])
    _histogram(out, env, m.colors)
    _family(out, "inflight", "gauge", "Requests (tcp: connections) in flight on each color.",
            [(f'{env},color="{c.color}"', c.inflight) for c in m.colors])
    _family(out, "live", "gauge", "1 for the color that gets new work, else 0.",
            [(f'{env},color="{c.color}"', int(c.live)) for c in m.colors])
    _family(out, "color_info", "gauge", "The build each color runs.",
            [(f'{env},color="{c.color}",build="{_escape(c.build)}"', 1) for c in m.colors])
    _family(out, "canary_percent", "gauge", "Percent of clients on the canary color.",
            [(env, m.canary_percent)])
    _family(out, "switches_total", "counter", "Switches of the live color.",
            [(env, m.switches)])
    _family(out, "connections_total", "counter", "Client connections accepted.",
            [(env, m.connections)])
    return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help_text: str,
            series: list[tuple[str, float]]) -> None:
    out.append(f"# HELP alive_switch_{name} {help_text}")
    out.append(f"# TYPE alive_switch_{name} {kind}")
    out.extend(f"alive_switch_{name}{{{labels}}} {_number(value)}" for labels, value in series)


def _histogram(out: list[str], env: str, colors: list[ColorMetrics]) -> None:
    name = "alive_switch_request_duration_seconds"
    out.append(f"# HELP {name} Request head received to last byte relayed.")
    out.append(f"# TYPE {name} histogram")
    for c in colors:
        duration = c.figures["duration"]
        labels = f'{env},color="{c.color}"'
        running = 0
        for bound, count in zip((*(f"{b:g}" for b in BOUNDS), "+Inf"), duration["counts"],
                                strict=True):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {_number(duration['sum'])}")
        out.append(f"{name}_count{{{labels}}} {running}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- the listener ------------------------------------------------------------------------------

class MetricsServer:
    """Answers ``GET /metrics`` with ``scrape()``'s text; anything else 404 or 405."""

    def __init__(self, scrape: Callable[[], str]) -> None:
        self.scrape = scrape
        self.server: asyncio.AbstractServer | None = None
        self.address = ""

    async def start(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.server = await asyncio.start_server(self._serve, host.strip("[]"), int(port),
                                                 limit=HEAD_LIMIT, reuse_address=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._answer(head.split(b"\r\n", 1)[0]))
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a peer that sends no head in time, or too much: closed
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, request_line: bytes) -> bytes:
        method, _, rest = request_line.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if target != b"/metrics":
            return _response(b"404 Not Found", b"text/plain", b"try GET /metrics\n")
        if method not in (b"GET", b"HEAD"):
            return _response(b"405 Method Not Allowed", b"text/plain", b"GET /metrics\n")
        body = self.scrape().encode()
        return _response(b"200 OK", CONTENT_TYPE, b"" if method == b"HEAD" else body,
                         len(body))


def _response(status: bytes, content_type: bytes, body: bytes, length: int | None = None
              ) -> bytes:
    size = len(body) if length is None else length
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type +
            b"\r\nContent-Length: " + str(size).encode() + b"\r\nConnection: close\r\n\r\n"
            + body)
