"""HTTP readiness probes: one probe, and a gate that waits for health with a deadline.

A probe is one ``GET`` on a fresh connection to a color on this host, made with the
standard library's ``http.client``: httpx cost every command that probes 80–100 ms
(importing it, and an SSL context for each client even with ``verify=False``), a third
of the 0.3 s that ``status`` may take and a fifth of a warm rollback's 0.5 s.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass

from switcher.config import Health

MAX_BODY = 1 << 20  # bytes of a health response read for `expect_body`; the rest is ignored


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str  # "200" or why it failed, for messages
    exited: bool = False  # the process under test died or was restarted meanwhile
    answered: bool = False  # it answered (wrongly): the detail says what it answered


def url(host: str, port: int, path: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


def probe(host: str, port: int, health: Health, timeout: float) -> Probe:
    """GET the health path; ``timeout`` bounds the connect and each read."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", health.path, headers={"User-Agent": "alive-switch",
                                                   "Connection": "close"})
        response = conn.getresponse()
        body = response.read(MAX_BODY) if health.expect_body else b""
    except TimeoutError:
        return Probe(False, f"no answer within {timeout:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return Probe(False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        conn.close()
    status = response.status
    if not health.status_ok(status):
        return Probe(False, f"{status} (expected {health.expect_status})", answered=True)
    if health.expect_body and health.expect_body not in body.decode("utf-8", "replace"):
        return Probe(False, f"{status} without {health.expect_body!r} in body", answered=True)
    return Probe(True, str(status))


def wait_healthy(host: str, port: int, health: Health, *, still_running: Callable[[], str],
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Probe:
    """Probe every ``interval`` until healthy or ``health.timeout``.

    ``still_running`` returns "" while the process under test is the one we started, else
    why not (exited, restarted): that ends the wait at once, unhealthy.
    """
    deadline = clock() + health.timeout
    last = Probe(False, "not probed yet")
    while True:
        gone = still_running()
        if gone:
            return Probe(False, gone, exited=True)
        left = deadline - clock()
        if left <= 0:
            return Probe(False, f"{last.detail} after {health.timeout:g} s")
        full = max(health.interval, 1.0)
        this = probe(host, port, health, min(left, full))
        if this.ok:
            gone = still_running()
            return Probe(False, gone, exited=True) if gone else this
        # A last probe that the deadline cut short says only "no answer within 0.002 s":
        # what the color answered before is the reason worth reporting.
        if left >= full or this.answered or not last.answered:
            last = this
        sleep(min(health.interval, max(0.0, deadline - clock())))
