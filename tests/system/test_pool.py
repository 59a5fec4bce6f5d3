"""The pool of idle connections to the colors (switcher/router/http/pool.py) end to end in a
real systemd: deploys and rollbacks under keep-alive load (wrk) and new-connection load
(each request its own connection, so each one takes a pooled connection) fail nothing, with
nginx as the app and with a Node.js app that closes idle connections after 5 s (its
keepAliveTimeout) on its own; after every switch the old color has no idle connection left
in the router, and the new color's are reused."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.load import Load
from tests.ports import port_block
from tests.system.harness import Env, nginx_app, wait_for
from tests.system.sandbox import Sandbox
from tests.system.test_http import router_status, stop_wrk

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN = port_block(__name__, 3)
STEPS = 10  # per app: 20 deploys and rollbacks in all

# Each build answers {"build": its name} on every page (tests/load.py reads it), "ok" on the
# health path.
NGINX_APP = nginx_app("200 '{\"build\": \"BUILD\"}'")
NODE_APP = r"""#!/bin/sh
exec /usr/bin/node -e '
const server = require("http").createServer((req, res) => {
  res.writeHead(200, {"Content-Type": "text/plain"});
  res.end(req.url === "/api/health" ? "ok" : "{\"build\": \"BUILD\"}");
});
server.keepAliveTimeout = 5000;  // Node'"'"'s default, stated: it closes idle connections
server.listen(Number(process.env.PORT), process.env.HOST);
'
"""
NGINX_BUILDS, NODE_BUILDS = ("N1", "N2", "N3"), ("J1", "J2", "J3")


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(sandbox, tmp_path_factory.mktemp("pool"), "pl", "prod", LISTEN, BLUE, GREEN)
    # A short watch and drain: the steps, not the waits, are what is tested.
    e.write_config(drain=1, watch=0.3, mode="http", command="/bin/sh run.sh",
                   also="pool_size = 16\npool_idle = 2\n")
    for name in NGINX_BUILDS:
        e.make_build(name).joinpath("run.sh").write_text(NGINX_APP.replace("BUILD", name))
    for name in NODE_BUILDS:
        e.make_build(name).joinpath("run.sh").write_text(NODE_APP.replace("BUILD", name))
    e.ok("install", "prod")
    e.ok("deploy", "prod", NGINX_BUILDS[0])
    return e


def plan(builds: tuple[str, ...], live: str | None, count: int) -> Iterator[list[str]]:
    """Deploys of ``builds`` in turn, every third step a rollback; each changes the live
    build."""
    previous = None
    for i in range(count):
        if previous is not None and i % 3 == 2:
            yield ["rollback", "prod"]
            live, previous = previous, live
        else:
            target = next(b for b in builds[i % 3:] + builds if b not in (live, previous))
            yield ["deploy", "prod", target]
            live, previous = target, live


def start_wrk(connections: int) -> subprocess.Popen[str]:
    """Keep-alive load until stop_wrk (test_http's, on this module's port)."""
    return subprocess.Popen(["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", "-d600s",
                             f"http://127.0.0.1:{LISTEN}/"], stdout=subprocess.PIPE, text=True)


def switch_under_load(env: Env, builds: tuple[str, ...]) -> None:
    """STEPS deploys and rollbacks among ``builds`` while wrk keeps 4 connections alive and
    4 threads open a connection per request; not one request may fail."""
    wrk = start_wrk(4)
    seen: set[str] = set()
    began = time.monotonic()
    with Load(LISTEN, threads=4, max_seconds=120) as load:
        try:
            for step in plan(builds, env.status_json()["live_build"], STEPS):
                env.ok(*step)
                status = router_status(env)
                serving = status["serving"]
                old = "blue" if serving == "green" else "green"
                # The switch closed the old color's idle connections before it answered.
                assert status["pool"]["idle"][old] == 0, status["pool"]
                load.wait_requests(20)  # the clients get through this switch
                seen.update(load.tally.builds)
            wait_for("the new color's connections pooled", lambda: router_status(env)[
                "pool"]["idle"][router_status(env)["serving"]] > 0, timeout=5)
        finally:
            took = time.monotonic() - began
            keep_alive = stop_wrk(wrk)
    tally = load.tally
    print(f"\n{STEPS} steps over {builds} in {took:.0f} s: new connections {tally.summary()} "
          f"(builds {dict(tally.builds)}); wrk keep-alive {keep_alive}")
    if tally.failed:
        print(tally.examples, json.dumps(router_status(env)["counters"]))
        print(env.sandbox.run("journalctl", "-u", f"{env.prefix}.service", "-n", "60").stdout)
    assert tally.failed == 0, (tally.summary(), tally.examples)
    assert keep_alive["socket_errors"] == 0 and keep_alive["non2xx"] == 0, keep_alive
    assert keep_alive["requests"] > 1000
    assert seen >= set(builds)


def test_nginx_deploys_and_rollbacks_under_both_loads_fail_nothing(env: Env) -> None:
    switch_under_load(env, NGINX_BUILDS)


def test_node_closing_idle_connections_itself_fails_nothing_across_deploys(env: Env) -> None:
    switch_under_load(env, NODE_BUILDS)
    # Idle for pool_idle (2 s, below Node's 5 s): the router closes its pooled connections
    # before Node would, and the next new-connection clients get new ones, no failure.
    wait_for("the pool emptied by pool_idle",
             lambda: sum(router_status(env)["pool"]["idle"].values()) == 0, timeout=5)
    with Load(LISTEN, threads=2, max_seconds=30, max_requests=200) as load:
        load.wait_requests(200)
    assert load.tally.failed == 0, (load.tally.summary(), load.tally.examples[:5])
