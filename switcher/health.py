"""HTTP readiness probes: one probe, and a gate that waits for health with a deadline.

httpx is imported on first use so commands that never probe start fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from switcher.config import Health

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str  # "200" or why it failed, for messages
    exited: bool = False  # the process under test died or was restarted meanwhile


def url(host: str, port: int, path: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


def session() -> httpx.Client:
    """A client to reuse across probes."""
    import httpx  # noqa: PLC0415 - lazy: keeps `status`/`rollback` start-up small

    # Probes are plain http://: skipping TLS set-up saves ~60 ms per client.
    return httpx.Client(trust_env=False, verify=False)  # noqa: S501 - http:// only


def probe(host: str, port: int, health: Health, timeout: float,
          client: httpx.Client | None = None) -> Probe:
    import httpx  # noqa: PLC0415

    target = url(host, port, health.path)
    try:
        if client is None:
            with session() as own:
                response = own.get(target, timeout=timeout)
        else:
            response = client.get(target, timeout=timeout)
    except httpx.TimeoutException:
        return Probe(False, f"no answer within {timeout:g} s")
    except httpx.HTTPError as exc:
        return Probe(False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    if not health.status_ok(response.status_code):
        return Probe(False, f"{response.status_code} (expected {health.expect_status})")
    if health.expect_body and health.expect_body not in response.text:
        return Probe(False, f"{response.status_code} without {health.expect_body!r} in body")
    return Probe(True, str(response.status_code))


def wait_healthy(host: str, port: int, health: Health, *, still_running: Callable[[], str],
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Probe:
    """Probe every ``interval`` until healthy or ``health.timeout``.

    ``still_running`` returns "" while the process under test is the one we started, else
    why not (exited, restarted): that ends the wait at once, unhealthy.
    """
    deadline = clock() + health.timeout
    last = Probe(False, "not probed yet")
    with session() as client:
        while True:
            gone = still_running()
            if gone:
                return Probe(False, gone, exited=True)
            left = deadline - clock()
            if left <= 0:
                return Probe(False, f"{last.detail} after {health.timeout:g} s")
            last = probe(host, port, health, min(left, max(health.interval, 1.0)), client)
            if last.ok:
                gone = still_running()
                return Probe(False, gone, exited=True) if gone else last
            sleep(min(health.interval, max(0.0, deadline - clock())))
