"""Mode http end to end in a real systemd with the sample app: keep-alive clients, pipelining
and chunked uploads through 20 deploys and rollbacks without a failure, an Upgrade session
across a switch, the hostile corpus and the app's own log as the proof, and the negative
control (tcp mode pins keep-alive connections to the old color, whose end fails them)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.ports import port_block
from tests.system.harness import Env, build_on, wait_for
from tests.system.sandbox import Sandbox
from tests.unit.test_router_http import HOSTILE, Client

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN = port_block(__name__, 3)
DRAIN, WATCH, STANDBY = 3, 1, 600
HEADER_TIMEOUT = 2
STEPS = 20


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(sandbox, tmp_path_factory.mktemp("http"), "ht", "prod", LISTEN, BLUE, GREEN)
    configure(e, "http")
    for name in ("A", "B", "C"):
        e.make_build(name)
    for name in ("LA", "LB"):  # these log every request (and every bad one) to the journal
        e.make_build(name, ACCESS_LOG="1")
    e.ok("install", "prod")
    e.ok("deploy", "prod", "A")
    return e


def configure(e: Env, mode: str) -> None:
    # `also` lands in the [env.prod.router] table, the last one the harness writes.
    e.write_config(drain=DRAIN, watch=WATCH, standby=STANDBY, mode=mode,
                   also=f"header_timeout = {HEADER_TIMEOUT}\n")


ASK_ROUTER = """
import json, sys
from switcher.router.control import request
print(json.dumps(request(sys.argv[1], {"cmd": "status"}, timeout=5)))
"""


def router_status(e: Env) -> dict[str, Any]:
    done = e.sandbox.run(sys.executable, "-c", ASK_ROUTER,
                         f"/run/alive-switch/{e.prefix}/control.sock", check=True)
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


# -- the app's log as the proof ----------------------------------------------------------------

REQUEST_LOG = re.compile(r'"[A-Z]+ \S+ HTTP/|code \d{3}, message')


def requests_logged_after(journal: str, marker: str) -> list[str]:
    """Request (and bad-request) lines the app logged after the line holding ``marker``,
    health probes left out."""
    after = journal[journal.index(marker):].splitlines()[1:]
    return [line for line in after if REQUEST_LOG.search(line) and "/api/health" not in line]


def test_hostile_requests_never_reach_the_app_and_the_old_color_gets_nothing_after_a_switch(
        env: Env) -> None:
    env.ok("deploy", "prod", "LA")
    old = env.status_json()["live"]
    with Client(LISTEN) as kept:  # a keep-alive connection from before the switch
        assert kept.get("/?marker=before").json()["build"] == "LA"
        before = router_status(env)["total"]
        for name, case in HOSTILE.items():
            request, status = case if isinstance(case, tuple) else (case, 400)
            with Client(LISTEN) as c:
                c.send(request)
                answer = c.response()
                assert answer.status == status, (name, answer)
                assert c.closed(), name
        with Client(LISTEN) as slow:  # slowloris: a head that never ends
            slow.send(b"GET /?marker=slowloris HTTP/1.1\r\nHost: t\r\n")
            time.sleep(0.5)
            slow.send(b"X-Slow: 1\r\n")
            assert slow.response().status == 408
        assert router_status(env)["total"] == before  # nothing went to a color
        env.ok("deploy", "prod", "LB")
        new = env.status_json()["live"]
        assert kept.get("/?marker=after").json()["build"] == "LB"
    old_log = env.sandbox.journal(env.unit(old))
    new_log = env.sandbox.journal(env.unit(new))
    # The log works (a test that cannot fail proves nothing) ...
    assert '"GET /?marker=before HTTP/1.1" 200' in old_log
    assert '"GET /?marker=after HTTP/1.1" 200' in new_log
    # ... and shows neither a hostile request nor, after the switch, any request at all.
    assert requests_logged_after(old_log, "marker=before") == []
    assert "slowloris" not in old_log + new_log
    print(f"\n{len(HOSTILE)} hostile requests + slowloris: refused by the router, "
          "none in the app's log; the old color logged nothing after the switch")


# -- an Upgrade session across a switch --------------------------------------------------------

def test_an_upgrade_session_lives_until_the_drain_ends_then_closes_cleanly(env: Env) -> None:
    info = env.status_json()
    old_build = info["live_build"]
    target = "A" if old_build != "A" else "B"
    with Client(LISTEN, timeout=10) as ws:
        ws.send(b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"\r\n")
        assert ws.response(head_request=True).status == 101
        ws.send(b"one\n")
        assert ws.line() == f"{old_build}: one".encode()
        began = time.monotonic()
        env.ok("deploy", "prod", target)  # returns at T0 + watch, before T0 + drain
        ws.send(b"two\n")
        assert ws.line() == f"{old_build}: two".encode()  # still pinned to its color
        assert build_on(LISTEN) == target  # while everything new goes to the new one
        data = ws.sock.recv(1)  # a clean close is EOF; a reset would raise here
        ended = time.monotonic()
    assert data == b""
    assert ended - began >= DRAIN - 0.1, f"closed {ended - began:.2f} s after the deploy began"
    print(f"\nupgrade session: worked across the switch, closed cleanly "
          f"{ended - began:.2f} s after the deploy began (drain {DRAIN} s)")


# -- 20 deploys and rollbacks under three kinds of load ----------------------------------------

@dataclass
class Tally:
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    builds: collections.Counter[str] = field(default_factory=collections.Counter)

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {detail}")

    def summary(self) -> str:
        return f"{self.ok} ok, {sum(self.failures.values())} failed {dict(self.failures)}"


class Worker(threading.Thread):
    """Runs ``once(client)`` on one keep-alive connection until stopped; a failure is
    counted and a new connection opened."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.tally = Tally()
        self.stopping = threading.Event()
        self.rng = random.Random(os.getpid())

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with Client(LISTEN, timeout=5) as c:
                    while not self.stopping.is_set():
                        self.once(c)
            except (OSError, EOFError, ValueError, AssertionError) as e:
                self.tally.fail(type(e).__name__, str(e)[:200])
                time.sleep(0.05)

    def once(self, c: Client) -> None:
        raise NotImplementedError


class Pipeliner(Worker):
    """Eight GETs at a time in one write; eight answers, in order."""

    def once(self, c: Client) -> None:
        c.send(b"".join(b"GET /?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(8)))
        for _ in range(8):
            answer = c.response()
            assert answer.status == 200, answer
            self.tally.builds[answer.json()["build"]] += 1
            self.tally.ok += 1


class Uploader(Worker):
    """POST /echo with a random chunked body; the app's sha256 must match."""

    def once(self, c: Client) -> None:
        body = self.rng.randbytes(self.rng.randrange(1, 512 * 1024))
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        i = 0
        while i < len(body):
            piece = body[i:i + self.rng.choice((1, 100, 4096, 65536, 200_000))]
            c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            i += len(piece)
        c.send(b"0\r\n\r\n")
        answer = c.response()
        assert answer.status == 200, answer
        got = answer.json()
        assert (got["sha256"], got["bytes"]) == (hashlib.sha256(body).hexdigest(), len(body))
        self.tally.ok += 1


def start_wrk(connections: int = 8) -> subprocess.Popen[str]:
    return subprocess.Popen(["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", "-d600s",
                             f"http://127.0.0.1:{LISTEN}/"], stdout=subprocess.PIPE, text=True)


def router_total(env: Env) -> int | None:
    """What the router has forwarded so far (connections or requests; None while its
    control socket is not up, e.g. just after a restart)."""
    done = env.sandbox.run(sys.executable, "-c", ASK_ROUTER,
                           f"/run/alive-switch/{env.prefix}/control.sock")
    return sum(json.loads(done.stdout)["total"].values()) if done.returncode == 0 else None


def wrk_flowing(env: Env, since: int, connections: int = 8) -> None:
    """Wait until the router has forwarded ``connections`` more (each of wrk's connections
    has reached a color, in either mode), instead of sleeping and hoping."""
    wait_for("wrk's connections through the router",
             lambda: (total := router_total(env)) is not None and total >= since + connections,
             timeout=15)


def stop_wrk(proc: subprocess.Popen[str]) -> dict[str, float]:
    """SIGINT makes wrk stop and print its summary; parse it."""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    latency = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    assert requests and rate and latency, out
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[latency[2]]
    return {"requests": int(requests[1]), "rate": float(rate[1]),
            "max_latency": float(latency[1]) * scale,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "non2xx": int(non2xx[1]) if non2xx else 0}


def steps(env: Env, count: int) -> list[list[str]]:
    """Deploys and rollbacks that each change the live build (a deploy of the live build
    would be a no-op)."""
    info = env.status_json()
    live, previous = info["live_build"], None
    plan = []
    builds = ["A", "B", "C"]
    for i in range(count):
        if previous is not None and i % 3 == 2:
            plan.append(["rollback", "prod"])
            live, previous = previous, live
        else:
            target = next(b for b in builds[i % 3:] + builds if b not in (live, previous))
            plan.append(["deploy", "prod", target])
            live, previous = target, live
    return plan


def test_zero_failures_across_twenty_deploys_and_rollbacks(env: Env) -> None:
    plan = steps(env, STEPS)
    workers = [Pipeliner(), Uploader()]
    wrk = start_wrk()
    for w in workers:
        w.start()
    began = time.monotonic()
    try:
        for step in plan:
            marks = [w.tally.ok for w in workers]
            env.ok(*step)
            deadline = time.monotonic() + 10  # every client got through this switch
            while any(w.tally.ok <= m for w, m in zip(workers, marks, strict=True)):
                assert time.monotonic() < deadline, [w.tally.summary() for w in workers]
                time.sleep(0.02)
    finally:
        took = time.monotonic() - began
        for w in workers:
            w.stopping.set()
        for w in workers:
            w.join(10)
        load = stop_wrk(wrk)
    pipelined, uploads = workers[0].tally, workers[1].tally
    print(f"\n{len(plan)} deploys/rollbacks in {took:.0f} s under load: "
          f"wrk (8 keep-alive connections) {load['requests']:.0f} requests, "
          f"{load['rate']:.0f} req/s, {load['socket_errors']:.0f} socket errors, "
          f"{load['non2xx']:.0f} non-2xx; pipelined {pipelined.summary()} "
          f"(builds {dict(pipelined.builds)}); chunked uploads {uploads.summary()}")
    assert load["requests"] > 1000
    assert load["socket_errors"] == 0, load
    assert load["non2xx"] == 0, load
    for tally in (pipelined, uploads):
        assert not tally.failures, tally.examples
    assert pipelined.ok > 100
    assert uploads.ok >= len(plan)
    assert set(pipelined.builds) >= {"A", "B", "C"}


def test_router_restarts_under_keep_alive_load_fail_nothing(env: Env) -> None:
    """A stopping router answers each busy connection's next request with Connection:
    close and closes the idle ones; the next router takes the reconnections."""
    router = f"{env.prefix}.service"
    before = router_total(env) or 0
    wrk = start_wrk()
    try:
        wrk_flowing(env, before)
        for _ in range(3):
            pid = env.show(router, "MainPID")
            env.sandbox.systemctl("restart", router, check=True)
            assert env.show(router, "MainPID") != pid
            wrk_flowing(env, 0)  # the new router counts from zero
    finally:
        load = stop_wrk(wrk)
    print(f"\n3 router restarts under wrk (8 keep-alive connections): "
          f"{load['requests']:.0f} requests, {load['socket_errors']:.0f} socket errors, "
          f"{load['non2xx']:.0f} non-2xx, worst latency {load['max_latency'] * 1000:.0f} ms")
    assert load["socket_errors"] == 0, load
    assert load["non2xx"] == 0, load


def test_negative_control_tcp_mode_pins_keep_alive_clients_to_the_old_color(env: Env) -> None:
    """The same wrk through the tcp router: its keep-alive connections stay on the old color
    and fail when that color's drain ends. The zero above could not be zero by accident."""
    configure(env, "tcp")
    env.ok("install", "prod")  # the router reloads: new connections are tcp
    before = router_total(env) or 0
    wrk = start_wrk()
    try:
        wrk_flowing(env, before)
        for step in steps(env, 2):
            env.ok(*step)
        # The old colors' drains end: the router closes what wrk still had on them.
        live = env.status_json()["live"]
        wait_for("the old colors' connections to close", lambda: all(
            n == 0 for color, n in router_status(env)["inflight"].items() if color != live),
            timeout=DRAIN + 10)
    finally:
        load = stop_wrk(wrk)
    print(f"\nnegative control (tcp mode, 2 deploys): {load['requests']:.0f} requests, "
          f"{load['socket_errors']:.0f} socket errors, {load['non2xx']:.0f} non-2xx")
    assert load["socket_errors"] > 0, load


def test_the_sandbox_saw_no_stray_socket(env: Env) -> None:
    """The public port is still served, in http mode again."""
    configure(env, "http")
    env.ok("install", "prod")
    with socket.create_connection(("127.0.0.1", LISTEN), timeout=5):
        pass
    assert build_on(LISTEN) == env.status_json()["live_build"]
