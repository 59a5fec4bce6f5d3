"""Prometheus metrics (switcher/router/metrics.py): the exposition as Prometheus's own parser
reads it, and the listener of a real router subprocess."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from switcher.model import State
from switcher.router.metrics import ColorMetrics, Metrics, render
from switcher.router.tally import BOUNDS, ZERO, Tally
from tests.ports import port_block
from tests.routerkit import Router, close_all, ready_router, wait_for, write_settings

_ports = itertools.cycle(port_block(__name__, 20))

FAMILIES = {"alive_switch_responses", "alive_switch_upstream_failures",
            "alive_switch_request_duration_seconds", "alive_switch_inflight",
            "alive_switch_live", "alive_switch_color_info", "alive_switch_canary_percent",
            "alive_switch_switches", "alive_switch_connections"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def fresh(env: str = "production") -> Metrics:
    return Metrics(env=env, canary_percent=0, switches=0, connections=0,
                   colors=[ColorMetrics("blue", ZERO, 0, True, 'b"1\\'),
                           ColorMetrics("green", ZERO, 0, False, "")])


def test_every_series_is_there_at_zero_from_the_start() -> None:
    text = render(fresh())
    assert {f.name for f in text_string_to_metric_families(text)} == FAMILIES
    got = samples(text)
    for color in ("blue", "green"):
        for code in ("1xx", "2xx", "3xx", "4xx", "5xx"):
            assert got[("alive_switch_responses_total",
                        (("code", code), ("color", color), ("env", "production")))] == 0
        for reason in ("refused", "reset", "timeout"):
            assert ("alive_switch_upstream_failures_total",
                    (("color", color), ("env", "production"), ("reason", reason))) in got
        buckets = [k for k in got if k[0] == "alive_switch_request_duration_seconds_bucket"
                   and ("color", color) in k[1]]
        assert len(buckets) == len(BOUNDS) + 1
    assert value(text, "alive_switch_live", env="production", color="blue") == 1
    assert value(text, "alive_switch_live", env="production", color="green") == 0
    assert value(text, "alive_switch_color_info", env="production", color="blue",
                 build='b"1\\') == 1  # escaped, and read back whole
    assert value(text, "alive_switch_canary_percent", env="production") == 0


def test_counts_histogram_and_sums_read_back() -> None:
    tally = Tally()
    for seconds in (0.001, 0.3, 20.0):
        tally.answered(200, seconds)
    tally.answered(502, 0.004)
    m = Metrics(env="e", canary_percent=5, switches=3, connections=9,
                colors=[ColorMetrics("blue", tally.snapshot(), 2, False, "b1")])
    text = render(m)
    assert value(text, "alive_switch_responses_total", env="e", color="blue", code="2xx") == 3
    assert value(text, "alive_switch_responses_total", env="e", color="blue", code="5xx") == 1
    bucket = "alive_switch_request_duration_seconds_bucket"
    assert value(text, bucket, env="e", color="blue", le="0.005") == 2
    assert value(text, bucket, env="e", color="blue", le="0.5") == 3
    assert value(text, bucket, env="e", color="blue", le="+Inf") == 4
    assert value(text, "alive_switch_request_duration_seconds_count", env="e",
                 color="blue") == 4
    assert value(text, "alive_switch_request_duration_seconds_sum", env="e",
                 color="blue") == pytest.approx(20.305)
    assert value(text, "alive_switch_inflight", env="e", color="blue") == 2
    assert value(text, "alive_switch_switches_total", env="e") == 3
    assert value(text, "alive_switch_connections_total", env="e") == 9
    assert value(text, "alive_switch_canary_percent", env="e") == 5


# -- the listener of a real router -------------------------------------------------------------

@pytest.fixture
def router(tmp: Path) -> Iterator[Callable[..., Router]]:
    routers: list[Router] = []

    def start(state: State | None = None, **overrides: Any) -> Router:
        routers.append(ready_router(tmp, _ports, state, **overrides))
        return routers[-1]

    yield start
    close_all(routers)


def ask(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_router_serves_metrics_on_their_own_listener(router: Callable[..., Router]) -> None:
    metrics_port = next(_ports)
    r = router(mode="http", metrics=f"127.0.0.1:{metrics_port}")
    answer = ask(metrics_port, b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert b"Connection: close" in head
    text = body.decode()
    assert {f.name for f in text_string_to_metric_families(text)} == FAMILIES
    assert value(text, "alive_switch_live", env="test", color="blue") == 1
    assert value(text, "alive_switch_color_info", env="test", color="blue", build="b1") == 1
    with socket.create_connection(("127.0.0.1", r.port), timeout=5):
        pass  # one client connection accepted: the counter moves on the next scrape
    wait_for(lambda: value(ask(metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n")
                           .partition(b"\r\n\r\n")[2].decode(),
                           "alive_switch_connections_total", env="test") == 1,
             what="connections_total at 1")
    assert ask(metrics_port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert ask(metrics_port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    head_only = ask(metrics_port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head_only.startswith(b"HTTP/1.1 200 ") and head_only.endswith(b"\r\n\r\n")


def test_a_metrics_address_in_use_leaves_the_router_serving(
        router: Callable[..., Router]) -> None:
    metrics_port = next(_ports)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", metrics_port))
        holder.listen()
        r = router(mode="tcp", metrics=f"127.0.0.1:{metrics_port}")
        assert "cannot serve metrics on" in r.stderr()
        assert r.control({"cmd": "status"})["ok"]


def test_a_reload_moves_the_metrics_listener(router: Callable[..., Router], tmp: Path) -> None:
    first, second = next(_ports), next(_ports)
    r = router(mode="http", metrics=f"127.0.0.1:{first}")
    assert ask(first, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    write_settings(r.env_dir, tmp, r.ports, mode="http", metrics=f"127.0.0.1:{second}")
    assert r.control({"cmd": "reload"})["restart_needed"] == []
    wait_for(lambda: r.control({"cmd": "status"})["metrics"] == f"127.0.0.1:{second}",
             what="the new listener")
    assert ask(second, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    with pytest.raises(ConnectionRefusedError):
        ask(first, b"GET /metrics HTTP/1.0\r\n\r\n")
