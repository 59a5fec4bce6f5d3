"""Direct mode end to end in a real systemd: the kernel hands new connections to the live
color's own listener (the router's counters stay flat), the router takes what the kernel
does not steer, deploys under new-connection load fail nothing (the sample app; the Node.js
example twenty times, with keep-alive clients that retry and a slow request in flight across
each switch), a dead live color or router never refuses the port, and after a reboot the
router steers again.

The sandbox shares the host's network namespace: the program the router attaches steers
this module's public port on 127.0.0.1 only (the colors' host), and dies with the router."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from typing import Any

import pytest

from tests.load import Load, classify, failure, one_request
from tests.netns import Netns
from tests.ports import port_block
from tests.system.harness import CLI, ROOT, Env, build_on, get, listening, wait_for
from tests.system.sandbox import Sandbox, kill_group
from tests.system.test_http import router_status

pytestmark = pytest.mark.system
(LISTEN, BLUE, GREEN, NODE_LISTEN, NODE_BLUE, NODE_GREEN, WIDE_LISTEN, WIDE_BLUE,
 WIDE_GREEN) = port_block(__name__, 9)
NODE = "/usr/bin/node"
NODE_APP = ROOT / "examples/node/server.js"
STEPS = 20  # deploys and rollbacks of the Node.js example, alternating
# A slow request, sent to the old color just before a switch, which server.js answers only
# this long after its SIGTERM: in flight across the retirement, finished by the shutdown.
AFTER_STOP_MS = 200
# The old color is the fallback for max(DRAIN, WATCH) after a switch (no standby in direct
# mode): long enough for the killed-color test to find it there.
DRAIN, WATCH = 20, 1
PROOF = 3000  # requests that must succeed without the router seeing one
OUTSIDE = 50  # requests from another network namespace to the wildcard public socket


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(sandbox, tmp_path_factory.mktemp("direct"), "dr", "prod", LISTEN, BLUE, GREEN)
    e.write_config(drain=DRAIN, watch=WATCH, mode="direct")
    for name in ("A", "B"):
        e.make_build(name)
    e.ok("install", "prod")
    e.ok("deploy", "prod", "A")
    return e


def router_connections(status: dict[str, Any]) -> int:
    """Client connections the router itself forwarded, both colors (``counters`` also has
    the ones the kernel steered)."""
    return sum(status["total"].values())


def steered(status: dict[str, Any]) -> dict[str, int]:
    return dict(status["direct"]["steered"])


def test_check_probes_what_direct_mode_needs(env: Env) -> None:
    assert "ok       direct mode: CAP_BPF, CAP_NET_ADMIN, ptrace access" in env.ok("check", "prod")


def test_the_kernel_steers_while_the_routers_counters_stay_flat(env: Env) -> None:
    before = router_status(env)
    assert before["direct"]["steering"] is True, before["direct"]
    assert before["direct"]["families"] == ["ipv4"]
    with Load(LISTEN, threads=2) as load:
        load.wait_requests(PROOF, timeout=60)
    tally = load.tally
    after = router_status(env)
    print(f"\ndirect: {tally.summary()}; router connections {router_connections(before)} → "
          f"{router_connections(after)}; steered {steered(before)} → {steered(after)}")
    assert tally.failed == 0, tally.examples
    assert router_connections(after) == router_connections(before)
    assert steered(after)["blue"] - steered(before)["blue"] >= tally.ok
    assert set(tally.builds) == {"A"}
    shown = env.ok("status", "prod")
    assert "direct mode: the kernel steers IPv4 connections to the live color" in shown, shown
    assert env.status_json()["router"]["direct"]["steering"] is True


def test_negative_control_without_steering_the_router_takes_every_connection(env: Env) -> None:
    env.write_config(drain=DRAIN, watch=WATCH, mode="tcp")
    env.ok("install", "prod")  # a reload: the router detaches the program
    try:
        before = router_status(env)
        assert "direct" not in before
        with Load(LISTEN, threads=2) as load:
            load.wait_requests(500, timeout=60)
        after = router_status(env)
        assert load.tally.failed == 0, load.tally.examples
        assert router_connections(after) - router_connections(before) >= load.tally.ok
    finally:
        env.write_config(drain=DRAIN, watch=WATCH, mode="direct")
        env.ok("install", "prod")
    resumed = router_status(env)["direct"]
    assert resumed["steering"] is True and resumed["selected"] == "blue", resumed


def test_deploys_under_new_connection_load_fail_nothing(env: Env) -> None:
    before = router_status(env)
    with Load(LISTEN, threads=4) as load:
        load.wait_requests(200)
        for step in ("deploy prod B", "rollback prod", "deploy prod B"):
            out = env.ok(*step.split())
            assert "health" in out
            # The watch judges the connections the kernel steered to the new color.
            judged = re.search(r"passed on traffic: 0 of (\d+) answers failed", out)
            assert judged and int(judged.group(1)) >= 50, out
            assert "direct mode: answers are the connections the kernel steered" in out
            load.wait_requests(200)
    after = router_status(env)
    print(f"\ndeploys: {load.tally.summary()}; router connections "
          f"{router_connections(after) - router_connections(before)} of them")
    assert load.tally.failed == 0, load.tally.examples
    assert build_on(LISTEN) == "B"
    assert after["direct"]["selected"] == "green" and after["direct"]["steering"] is True
    assert steered(after)["green"] > steered(before)["green"]
    assert router_connections(after) == router_connections(before)
    counted = after["counters"]["green"]["connections"] - before["counters"]["green"][
        "connections"]
    # The steered connections are in green's figures, less the status probes (the watch's).
    assert 0.9 * (steered(after)["green"] - steered(before)["green"]) <= counted <= (
        steered(after)["green"] - steered(before)["green"])


def main_pid(env: Env, unit: str) -> int:
    return int(env.show(unit, "MainPID"))


def kill(env: Env, pid: int) -> None:
    """SIGKILL a process of the sandbox (``pid`` as its systemd knows it)."""
    env.sandbox.run("kill", "-9", str(pid), check=True)


def test_the_router_killed_twice_under_load_fails_nothing_and_steers_again(env: Env) -> None:
    router = f"{env.prefix}.service"
    with Load(LISTEN, threads=4) as load:
        for _ in range(2):
            load.wait_requests(200)
            first = main_pid(env, router)
            kill(env, first)
            wait_for("a new router", lambda gone=first: main_pid(env, router) not in (0, gone),
                     timeout=10)
        load.wait_requests(200)
    # Steered connections never passed through the router: its death cut none of them.
    assert load.tally.failed == 0, load.tally.examples
    direct = wait_for("steering again", lambda: router_status(env)["direct"]["steering"]
                      and router_status(env)["direct"])
    assert direct["selected"] == "green"


def test_the_live_color_killed_reaches_the_fallback_through_the_router(env: Env) -> None:
    assert build_on(LISTEN) == "B"  # green live, blue (A) the fallback for DRAIN seconds
    old = main_pid(env, env.unit("green"))
    kill(env, old)
    wait_for("green's listener gone", lambda: not listening(GREEN))
    # Not steered (the listener left the map with its process), refused by green: blue.
    assert build_on(LISTEN) == "A"
    # status measures it too (unless systemd's restart, RestartSec=1, already brought green
    # back and the router re-took it: then green has a new PID).
    assert (router_status(env)["direct"]["steering"] is False
            or main_pid(env, env.unit("green")) not in (0, old))
    # No copy held green's port: systemd's restart binds it again.
    wait_for("green restarted and listening",
             lambda: main_pid(env, env.unit("green")) not in (0, old) and listening(GREEN))
    # Once the new green answers its health probe, the router takes its new listener.
    direct = wait_for("steering again", lambda: router_status(env)["direct"]["steering"]
                      and router_status(env)["direct"])
    assert direct["selected"] == "green"
    assert build_on(LISTEN) == "B"


@pytest.fixture(scope="module")
def wide(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """Public socket on every IPv4 address, colors on 127.0.0.1 (the sample app), in the
    same sandbox as ``env``."""
    e = Env(env.sandbox, tmp_path_factory.mktemp("wide"), "dw", "prod", WIDE_LISTEN,
            WIDE_BLUE, WIDE_GREEN)
    e.write_config(drain=1, watch=1, mode="direct", listen=f'"0.0.0.0:{WIDE_LISTEN}"')
    e.make_build("W")
    e.ok("install", "prod")
    e.ok("deploy", "prod", "W")
    return e


def test_a_connection_from_another_network_namespace_is_not_steered_to_a_loopback_color(
        wide: Env) -> None:
    """The program steers local address 127.0.0.1 only: a connection that reaches the
    wildcard public socket on another address is the router's (which forwards it to the
    color over loopback, as the color's own listener would never have accepted it)."""
    outside = Netns("dw")
    host_side = f"asw{os.getpid() % 10**6}"  # a link in this (the host's) namespace
    # 198.18.0.0/15 is for network tests (RFC 2544): no host's real routes use it.
    subnet = f"198.{18 + os.getpid() % 2}.{os.getpid() % 250}"
    try:
        subprocess.run(["ip", "link", "add", host_side, "type", "veth", "peer", "name", "eth0",
                        "netns", outside.name], check=True)
        subprocess.run(["ip", "addr", "add", f"{subnet}.1/24", "dev", host_side], check=True)
        subprocess.run(["ip", "link", "set", host_side, "up"], check=True)
        outside.ip("addr", "add", f"{subnet}.2/24", "dev", "eth0")
        outside.ip("link", "set", "eth0", "up")
        before = router_status(wide)
        answers = outside.run(lambda: [one_request(WIDE_LISTEN, 5, host=f"{subnet}.1")
                                       for _ in range(OUTSIDE)])
        between = router_status(wide)
        local = [one_request(WIDE_LISTEN, 5) for _ in range(OUTSIDE)]
        after = router_status(wide)
    finally:
        subprocess.run(["ip", "link", "delete", host_side], check=False)
        outside.delete()
    assert answers == [("ok", "W")] * OUTSIDE
    assert local == [("ok", "W")] * OUTSIDE
    assert before["direct"]["steering"] is True, before["direct"]
    # From outside: every connection the router's; the kernel steered only the status
    # call's own probe (to 127.0.0.1).
    assert router_connections(between) - router_connections(before) == OUTSIDE
    assert sum(steered(between).values()) - sum(steered(before).values()) <= 1
    # From this namespace to 127.0.0.1: steered, the router's figures flat.
    assert router_connections(after) == router_connections(between)
    assert steered(after)["blue"] - steered(between)["blue"] >= OUTSIDE


@pytest.fixture(scope="module")
def node(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """examples/node/server.js, whose SIGTERM handler is the drain (server.close()), in
    the same sandbox as ``env`` (its own app name and ports)."""
    e = Env(env.sandbox, tmp_path_factory.mktemp("node"), "dn", "prod", NODE_LISTEN,
            NODE_BLUE, NODE_GREEN)
    e.write_config(drain=1, watch=1, mode="direct", command=f"{NODE} {NODE_APP}")
    for name in ("N1", "N2"):
        e.make_build(name)
    e.ok("install", "prod")
    e.ok("deploy", "prod", "N1")
    return e


class Slow(threading.Thread):
    """One GET /slow?until=stop on a new connection, which the color answers only once it
    is told to stop: ``sent`` once the kernel has given it to a listener and the request is
    on its way; then (class, build) and when it ended."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sent = threading.Event()
        self.result: tuple[str, str] = ("timeout", "never ended")
        self.ended = 0.0
        self.start()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", NODE_LISTEN), timeout=10) as sock:
                sock.sendall(f"GET /slow?until=stop&ms={AFTER_STOP_MS} HTTP/1.1\r\n"
                             "Host: slow\r\nConnection: close\r\n\r\n".encode())
                self.sent.set()
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            self.result = classify(data)
        except OSError as exc:
            self.result = failure(exc)
        finally:
            self.sent.set()
            self.ended = time.time()


def held_step(node: Env, step: str) -> tuple[Slow, str, float]:
    """Run ``step`` with a slow request sent to the live color while its pre_switch hook
    waits: (the request, the build it was sent to, when the router switched)."""
    live = get(NODE_LISTEN)[1]["build"]
    for flag in ("switching", "go"):
        (node.home / flag).unlink(missing_ok=True)
    cli = node.sandbox.popen(CLI, "--config", node.config, *step.split(), cwd=node.home,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for("the pre_switch hook (or the CLI's end)",
                 lambda: (node.home / "switching").exists() or cli.poll() is not None,
                 timeout=60)
        if cli.poll() is not None:
            out, err = cli.communicate()
            raise AssertionError(f"{step} → {cli.returncode} before its switch\n{out}\n{err}")
        request = Slow()
        assert request.sent.wait(timeout=10)
        (node.home / "go").touch()
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            kill_group(cli)
    assert cli.returncode == 0, f"{step} → {cli.returncode}\n{out}\n{err}"
    request.join(timeout=15)
    return request, live, router_status(node)["switched_at"]


def test_node_twenty_deploys_and_rollbacks_fail_nothing_and_finish_slow_requests(
        node: Env) -> None:
    """New-connection clients, keep-alive clients that retry an idle connection's close
    (RFC 9112 §9.3.1), and a slow request in flight across each switch and retirement."""
    hold = (f"/bin/sh -c 'touch {node.home}/switching; "
            f"while [ ! -e {node.home}/go ]; do sleep 0.02; done'")
    node.write_config(drain=1, watch=1, mode="direct", command=f"{NODE} {NODE_APP}",
                      extra=f"pre_switch = {json.dumps(hold)}\n")
    slow: list[tuple[Slow, str, float]] = []
    try:
        with Load(NODE_LISTEN, threads=3) as load, \
                Load(NODE_LISTEN, threads=2, keep_alive=True) as kept:
            load.wait_requests(200)
            kept.wait_requests(200)
            for i in range(STEPS):
                slow.append(held_step(node, "deploy prod N2" if i % 2 == 0 else "rollback prod"))
                load.wait_requests(100)
                kept.wait_requests(100)
    finally:
        node.write_config(drain=1, watch=1, mode="direct", command=f"{NODE} {NODE_APP}")
    print(f"\nnode, {STEPS} deploys and rollbacks: {load.tally.summary()}; keep-alive: "
          f"{kept.tally.summary()}")
    assert load.tally.failed == 0, load.tally.examples
    assert kept.tally.failed == 0, kept.tally.examples
    assert set(kept.tally.builds) == {"N1", "N2"}  # they moved on as each color retired
    for request, live, switched in slow:
        assert request.result == ("ok", live), request.result  # answered by the old color
        assert switched < request.ended  # sent before the switch, answered after it
    assert get(NODE_LISTEN)[1]["build"] == "N1"
    assert router_status(node)["direct"]["steering"] is True


def test_node_under_keep_alive_load_across_a_switch_prints_what_wrk_counts(node: Env) -> None:
    """Keep-alive connections stay with the color they opened on until its app closes them
    (server.js: Connection: close after SIGTERM, idle ones closed). wrk never retries, so
    what it counts is printed, the trade README's direct-mode section states."""
    wrk = subprocess.Popen(["wrk", "-t1", "-c8", "-d6s", "--timeout", "2s",
                            f"http://127.0.0.1:{NODE_LISTEN}/"], stdout=subprocess.PIPE,
                           text=True)
    try:
        node.ok("deploy", "prod", "N2")
        out, _ = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.communicate()
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: .*", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    print(f"\nwrk keep-alive across a direct-mode switch (node): {requests} requests; "
          f"{errors.group(0) if errors else 'no socket errors'}; "
          f"non-2xx {non2xx.group(1) if non2xx else 0}")
    assert requests > 1000
    assert get(NODE_LISTEN)[1]["build"] == "N2"


def test_after_a_reboot_the_socket_listens_and_the_router_steers_again(env: Env) -> None:
    live = env.status_json()["live"]
    env.sandbox.reboot()  # the program died with the old router: nothing was pinned
    wait_for("socket after reboot", lambda: listening(LISTEN))
    wait_for("served after reboot", lambda: build_on(LISTEN) == "B")
    # The router may start before the live color listens: it takes the listener once the
    # color answers its health probe.
    direct = wait_for("steering after reboot", lambda: router_status(env)["direct"]["steering"]
                      and router_status(env)["direct"], timeout=20)
    assert direct["selected"] == live
