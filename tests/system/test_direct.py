"""Direct mode end to end in a real systemd: the kernel hands new connections to the live
color's own listener (the router's counters stay flat), the router takes what the kernel
does not steer, deploys under new-connection load fail nothing (the sample app and the
Node.js example), a dead live color or router never refuses the port, and after a reboot
the router steers again.

The sandbox shares the host's network namespace: the program the router attaches steers
this module's public port on 127.0.0.1 only (the colors' host), and dies with the router."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from tests.load import Load
from tests.ports import port_block
from tests.system.harness import ROOT, Env, build_on, get, listening, wait_for
from tests.system.sandbox import Sandbox
from tests.system.test_http import router_status

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN, NODE_LISTEN, NODE_BLUE, NODE_GREEN = port_block(__name__, 6)
NODE = "/usr/bin/node"
NODE_APP = ROOT / "examples/node/server.js"
# The old color is the fallback for max(DRAIN, WATCH) after a switch (no standby in direct
# mode): long enough for the killed-color test to find it there.
DRAIN, WATCH = 20, 1
PROOF = 3000  # requests that must succeed without the router seeing one


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
    """Client connections the router itself forwarded, both colors."""
    return sum(f["connections"] for f in status["counters"].values())


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
            load.wait_requests(200)
    after = router_status(env)
    print(f"\ndeploys: {load.tally.summary()}; router connections "
          f"{router_connections(after) - router_connections(before)} of them")
    assert load.tally.failed == 0, load.tally.examples
    assert build_on(LISTEN) == "B"
    assert after["direct"]["selected"] == "green" and after["direct"]["steering"] is True
    assert steered(after)["green"] > steered(before)["green"]
    assert router_connections(after) == router_connections(before)


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


def test_node_deploys_and_rollbacks_under_new_connection_load_fail_nothing(node: Env) -> None:
    with Load(NODE_LISTEN, threads=4) as load:
        load.wait_requests(200)
        for step in ("deploy prod N2", "rollback prod", "rollback prod", "rollback prod"):
            node.ok(*step.split())
            load.wait_requests(200)
    print(f"\nnode: {load.tally.summary()}")
    assert load.tally.failed == 0, load.tally.examples
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
