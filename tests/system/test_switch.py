"""The switch, end to end in a real systemd with the sample app and real load: deploy,
rollback, status, retirement timers, router restarts and reboot."""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import time

import pytest

from tests.load import Load
from tests.ports import port_block
from tests.system.harness import APP, Env, build_on, listening, wait_for
from tests.system.sandbox import Sandbox

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN, DIRECT = port_block(__name__, 4)
DRAIN, WATCH, STANDBY = 3, 1, 3  # the old color is the fallback for max(3, 1 + 3) = 4 s


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(sandbox, tmp_path_factory.mktemp("switch"), "sw", "prod", LISTEN, BLUE, GREEN)
    e.write_config(drain=DRAIN, watch=WATCH, standby=STANDBY)
    for name in ("A", "B", "C"):
        e.make_build(name)
    e.ok("install", "prod")
    return e


def serves(env: Env, color: str, build: str) -> None:
    """The public port, `systemctl status` and `status --json` all agree."""
    assert build_on(LISTEN) == build
    shown = env.sandbox.systemctl("status", "--no-pager", f"{env.prefix}.service").stdout
    assert f"serving {color} (build {build})" in shown, shown
    info = env.status_json()
    assert (info["live"], info["live_build"]) == (color, build)
    assert info["colors"][color]["role"] == "live"
    assert info["colors"][color]["health"] == "ok"
    assert info["schema"] == 1


def test_deploy_rollback_deploy_serve_exactly_the_expected_build(env: Env) -> None:
    out = env.ok("deploy", "prod", "A")
    for phase in ("preflight", "start", "health", "switching", "watch"):
        assert phase in out
    serves(env, "blue", "A")
    env.ok("deploy", "prod", "B")
    serves(env, "green", "B")
    began = time.monotonic()
    out = env.ok("rollback", "prod")
    warm = time.monotonic() - began
    assert "warm: already running" in out
    serves(env, "blue", "A")
    print(f"\nwarm rollback: {warm:.2f} s wall, of which watch {WATCH} s")
    env.ok("deploy", "prod", "C")
    serves(env, "green", "C")
    assert "nothing to do" in env.ok("deploy", "prod", "C")
    history = env.ok("history", "prod")
    assert history.count(": ok") >= 4


def test_status_table_shows_both_colors(env: Env) -> None:
    out = env.ok("status", "prod")
    assert f"{env.prefix}: green serves C" in out
    assert "role" in out
    assert "live" in out


def test_zero_failed_requests_across_ten_deploys_and_rollbacks(env: Env) -> None:
    steps = ["deploy prod A", "deploy prod B", "rollback prod", "deploy prod C",
             "rollback prod", "rollback prod", "deploy prod A", "deploy prod B",
             "rollback prod", "deploy prod C"]
    with Load(LISTEN, threads=4) as load:
        load.wait_requests(200)
        for step in steps:
            env.ok(*step.split())
            load.wait_requests(50)
        tally = load.stop()
    print(f"\n{len(steps)} deploys/rollbacks under load: {tally.summary()}; "
          f"served by build: {dict(tally.builds)}")
    assert tally.ok > 1000, tally.summary()
    assert tally.failed == 0, f"{tally.summary()}; e.g. {tally.examples}"
    assert set(tally.builds) >= {"A", "B", "C"}


def test_negative_control_restart_without_socket_fails_requests(env: Env) -> None:
    """The old way: the app binds the public port itself and is restarted. The same load
    client must see failures, or its zero above proves nothing."""
    unit = "sw-negative-control.service"
    build = env.make_build("slow", START_DELAY="1")
    env.sandbox.run("systemd-run", f"--unit={unit}", f"--working-directory={build}",
                    "--setenv=HOST=127.0.0.1", f"--setenv=PORT={DIRECT}", sys.executable,
                    APP, check=True)
    try:
        wait_for("direct app", lambda: listening(DIRECT))
        with Load(DIRECT, threads=4) as load:
            load.wait_requests(100)
            env.sandbox.systemctl("restart", unit, check=True)
            wait_for("direct app back", lambda: listening(DIRECT))
            load.wait_requests(100)
            tally = load.stop()
    finally:
        env.sandbox.systemctl("stop", unit)
    print(f"\nnegative control (systemctl restart, no socket unit): {tally.summary()}")
    assert tally.failures["refused"] > 0, tally.summary()


def test_router_restart_under_load_refuses_nothing(env: Env) -> None:
    router = f"{env.prefix}.service"
    with Load(LISTEN, threads=4) as load:
        load.wait_requests(200)
        for _ in range(3):
            pid = env.show(router, "MainPID")
            env.sandbox.systemctl("restart", router, check=True)
            assert env.show(router, "MainPID") != pid
            load.wait_requests(100)
        tally = load.stop()
    print(f"\n3 router restarts under load: {tally.summary()}")
    assert tally.failed == 0, f"{tally.summary()}; e.g. {tally.examples}"
    assert tally.worst_latency < 2.0


def slow_download(seconds: float, size: int, result: dict[str, object],
                  begun: threading.Event) -> None:
    with socket.create_connection(("127.0.0.1", LISTEN), timeout=10) as sock:
        sock.sendall(f"GET /slow?seconds={seconds}&bytes={size} HTTP/1.1\r\nHost: t\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            begun.set()
    begun.set()  # also when nothing came: the test must not wait forever
    head, _, body = data.partition(b"\r\n\r\n")
    result.update(head=head, body_len=len(body), sha=hashlib.sha256(body).hexdigest())


def test_slow_download_finishes_on_the_old_color_within_drain(env: Env) -> None:
    live = env.status_json()["live"]
    size = 2_000_000
    result: dict[str, object] = {}
    begun = threading.Event()
    downloader = threading.Thread(target=slow_download, args=(2.0, size, result, begun))
    downloader.start()
    assert begun.wait(10), "the download never began"  # its first bytes: on the live color
    target = "A" if env.status_json()["live_build"] != "A" else "B"
    env.ok("deploy", "prod", target)
    downloader.join(15)
    assert result["body_len"] == size, result
    assert result["sha"] == hashlib.sha256(b"x" * size).hexdigest()
    assert env.status_json()["live"] != live


def test_old_color_retires_on_time_and_a_rollback_keeps_it(env: Env) -> None:
    info = env.status_json()
    old = info["live"]
    new_build = "C" if info["live_build"] != "C" else "A"
    env.ok("deploy", "prod", new_build)
    new = "green" if old == "blue" else "blue"
    # Inside its window (until T0 + 4 s, as state.json says) the old color stays up. The
    # deploy returned some time after T0: read the window's end, do not assume it.
    until = env.status_json()["fallback"]["until"]
    while time.time() < until - 1:
        assert env.show(env.unit(old), "ActiveState") == "active"
        time.sleep(0.2)
    # Roll back while it is on standby: its timer is cancelled, the other one is armed.
    env.ok("rollback", "prod")
    assert env.status_json()["live"] == old
    wait_for(f"{new} retired", lambda: env.show(env.unit(new), "ActiveState") == "inactive",
             timeout=WATCH + STANDBY + 5)
    time.sleep(1)
    assert env.show(env.unit(old), "ActiveState") == "active"
    assert env.status_json()["live"] == old
    assert build_on(LISTEN) == env.status_json()["live_build"]


def test_reboot_serves_the_live_color(env: Env) -> None:
    info = env.status_json()
    env.sandbox.reboot()
    assert wait_for("socket after reboot", lambda: listening(LISTEN))
    assert wait_for("live build after reboot", lambda: build_on(LISTEN) == info["live_build"],
                    timeout=20)
    assert env.show(env.unit(info["live"]), "ActiveState") == "active"
