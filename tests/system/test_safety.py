"""Safety, against a real systemd under load: pre-flight, bad builds never get a request,
automatic switch-back, bad input, one deploy at a time, crash safety in every phase, the
socket never falls, the audit trail, access to the control socket."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.load import Load
from tests.ports import port_block
from tests.system.harness import (
    APP,
    ENV_BODY,
    ROOT,
    Env,
    build_on,
    frozen_at,
    kill_frozen,
    listening,
    wait_for,
)
from tests.system.sandbox import Sandbox

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN, ELSEWHERE, S_LISTEN, S_BLUE, S_GREEN = port_block(__name__, 7)
PHASES = ["cancel_timer", "preflight", "start", "health", "pre_switch", "canary",
          "canary_step", "switching", "commit", "watch", "schedule_retire", "post_switch"]
CANARY_PHASES = ("canary", "canary_step")  # a deploy's only: a rollback has no canary
CANARY = "\n[env.prod.canary]\nsteps = [50]\nstep_seconds = 0.3\n"


def stage_tables(env: Env) -> str:
    return ENV_BODY.format(
        env="stage", listen=S_LISTEN, blue=S_BLUE, green=S_GREEN, builds=env.builds,
        command=f"{sys.executable} {APP}", drain=1, watch=1, standby=600, health_timeout=2,
        mode="tcp", extra="", unit_extra="", health_extra="")


def configure(env: Env, **overrides: object) -> None:
    settings: dict[str, object] = {"drain": 1, "watch": 2, "standby": 600, "health_timeout": 2,
                                   "also": stage_tables(env)}
    settings.update(overrides)
    env.write_config(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(sandbox, tmp_path_factory.mktemp("safety"), "safe", "prod", LISTEN, BLUE, GREEN)
    configure(e)
    for name in ("good1", "good2"):
        e.make_build(name)
    e.ok("install", "prod")
    e.ok("deploy", "prod", "good1")
    return e


@pytest.fixture(autouse=True)
def default_config(env: Env) -> Iterator[None]:
    configure(env)
    yield
    configure(env)


def live(env: Env) -> tuple[str, str]:
    info = env.status_json()
    return info["live"], info["live_build"]


def other_good(env: Env) -> str:
    return "good2" if live(env)[1] == "good1" else "good1"


def units_snapshot(env: Env) -> dict[str, str]:
    found = {}
    for color in ("blue", "green"):
        found[color] = env.show(env.unit(color), "InvocationID")
        link = env.sandbox.state_dir / env.prefix / color
        found[f"{color} link"] = os.readlink(link) if link.is_symlink() else ""
    return found


# ---------------------------------------------------------------- 1. pre-flight

def test_check_passes_and_names_a_foreign_process_on_the_idle_port(env: Env) -> None:
    out = env.ok("check", "prod")
    assert "0 failed" in out
    for name in ("units", "socket", "port", "restart loops", "disk", "memory", "build"):
        assert f" {name}: " in out
    idle = "green" if live(env)[0] == "blue" else "blue"
    port = GREEN if idle == "green" else BLUE
    env.sandbox.run("systemd-run", "--unit=safe-squatter", sys.executable, "-m", "http.server",
                    "--bind", "127.0.0.1", str(port), check=True)
    try:
        wait_for("squatter", lambda: listening(port))
        done = env.cli("check", "prod")
        assert done.returncode == 3, done.stdout
        assert f"failed   port: {idle}'s port {port} is held by PID" in done.stdout
        assert "http.server" in done.stdout
        before = units_snapshot(env)
        done = env.cli("deploy", "prod", other_good(env))
        assert done.returncode == 3
        assert "pre-flight failed" in done.stderr
        assert units_snapshot(env) == before, "a failed pre-flight touches nothing"
    finally:
        env.sandbox.systemctl("stop", "safe-squatter.service")


def test_sick_live_color_is_a_warning_not_a_block(env: Env) -> None:
    color, build = live(env)
    (env.builds / build / "HEALTH_STATUS").write_text("503")
    env.sandbox.systemctl("restart", env.unit(color), check=True)
    try:
        wait_for("sick", lambda: env.status_json()["colors"][color]["health"] != "ok")
        out = env.ok("check", "prod")
        assert f"warning  live: {color} is unhealthy" in out
        assert "0 failed" in out
    finally:
        (env.builds / build / "HEALTH_STATUS").unlink()
        env.sandbox.systemctl("restart", env.unit(color), check=True)
        wait_for("healthy", lambda: env.status_json()["colors"][color]["health"] == "ok")


# ---------------------------------------------------------------- 2. bad builds

BAD_BUILDS = {
    "exits-at-once": ({"START_EXIT": "3"}, {}, "failed to start"),
    "crashes-before-switch": ({"CRASH_AFTER": "0.5"}, {"extra": 'pre_switch = "/bin/sleep 2"'},
                              "died before the switch"),
    "never-listens": ({"START_DELAY": "600"}, {}, "failed its health check"),
    "listens-elsewhere": ({"LISTEN_PORT": str(ELSEWHERE)}, {}, "failed its health check"),
    "health-500": ({"HEALTH_STATUS": "500"}, {}, "500 (expected 2xx)"),
    "health-times-out": ({"HEALTH_DELAY": "30"}, {}, "no answer within"),
    "lacks-expect-body": ({}, {"health_extra": 'expect_body = "all systems go"'},
                          "without 'all systems go'"),
    "healthy-too-late": ({"START_DELAY": "3"}, {}, "after 2 s"),
}


@pytest.mark.parametrize("case", list(BAD_BUILDS))
def test_bad_build_never_receives_a_request(env: Env, case: str) -> None:
    files, config, words = BAD_BUILDS[case]
    env.make_build(case, **files)
    configure(env, **config)
    color, build = live(env)
    idle = "green" if color == "blue" else "blue"
    with Load(LISTEN, threads=2) as load:
        load.wait_requests(50)
        done = env.cli("deploy", "prod", case)
        load.wait_requests(50)
        tally = load.stop()
    print(f"\n{case}: exit {done.returncode}; load {tally.summary()}")
    assert done.returncode == 3, done.stdout + done.stderr
    assert words in done.stderr
    assert f"journalctl -u {env.unit(idle)}" in done.stderr
    assert tally.failed == 0, tally.examples
    assert set(tally.builds) == {build}, "nothing was served from the bad build"
    assert env.show(env.unit(idle), "ActiveState") in ("inactive", "failed")
    assert live(env) == (color, build)


# ---------------------------------------------------------------- 3. dies after the switch

@pytest.mark.parametrize(("case", "files"), [("dies-in-watch", {"CRASH_AFTER": "1"}),
                                             ("sick-in-watch", {"UNHEALTHY_AFTER": "1"})])
def test_failure_during_watch_switches_back(env: Env, case: str, files: dict[str, str]) -> None:
    env.make_build(case, **files)
    color, build = live(env)
    with Load(LISTEN, threads=2) as load:
        load.wait_requests(50)
        done = env.cli("deploy", "prod", case)
        load.wait_requests(100)
        tally = load.stop()
    in_flight = tally.failures["eof"] + tally.failures["reset"]
    print(f"\n{case}: exit {done.returncode}; load {tally.summary()}; of which {in_flight} "
          "were in flight inside the dying process")
    assert done.returncode == 5, done.stdout + done.stderr
    assert "switched back" in done.stderr
    new_connection_failures = tally.failed - in_flight
    assert new_connection_failures == 0, tally.examples
    assert live(env) == (color, build)
    assert build_on(LISTEN) == build
    last = json.loads((env.sandbox.state_dir / env.prefix / "history.jsonl").read_text()
                      .splitlines()[-1])
    assert (last["outcome"], last["build"]) == ("switched-back", case)


# ---------------------------------------------------------------- 4. bad input

def test_bad_input_changes_nothing(env: Env, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (env.builds / "escape").symlink_to(tmp_path / "outside")
    (env.builds / "a-file").write_text("x")
    env.make_build("unready")
    configure(env, extra='ready_marker = "READY"')
    before = units_snapshot(env)
    for bad in ("../good1", "..", ".", "a/b", str(tmp_path / "outside"), "missing", "escape",
                "a-file", "unready"):
        done = env.cli("deploy", "prod", bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert "next:" in done.stderr, done.stderr
    assert units_snapshot(env) == before
    (env.builds / "escape").unlink()
    (env.builds / "a-file").unlink()


# ---------------------------------------------------------------- 5. one at a time

def test_one_deploy_at_a_time(env: Env) -> None:
    env.ok("install", "stage")
    proc, pid = frozen_at(env, "health", "deploy", "prod", other_good(env))
    try:
        done = env.cli("deploy", "prod", "good1")
        assert done.returncode == 4, done.stderr
        assert "deploy prod" in done.stderr
        assert "pid" in done.stderr
        assert env.cli("rollback", "prod").returncode == 4
        # A retire waits for a deploy by default (its timer must not give up).
        assert env.cli("retire", "prod", "blue", "--wait", "0").returncode == 4
        assert env.cli("install", "prod").returncode == 4
        env.ok("deploy", "stage", "good1")  # another environment deploys meanwhile
        env.sandbox.systemctl("restart", f"{env.prefix}.service", check=True)
        assert env.cli("deploy", "prod", "good1").returncode == 4, "router restart kept lock"
    finally:
        kill_frozen(proc, pid)
    out = env.ok("deploy", "prod", other_good(env))
    assert "reconcile" in out


# ---------------------------------------------------------------- 6. crash safety

@pytest.mark.parametrize("command", ["deploy", "rollback"])
def test_killed_in_every_phase_keeps_serving_and_recovers(env: Env, command: str) -> None:
    configure(env, watch=0.5, also=stage_tables(env) + CANARY)
    phases = [p for p in PHASES if command == "deploy" or p not in CANARY_PHASES]
    with Load(LISTEN, threads=2) as load:
        load.wait_requests(50)
        for phase in phases:
            args = ["deploy", "prod", other_good(env)] if command == "deploy" else [
                "rollback", "prod"]
            if command == "rollback" and env.status_json()["previous"] is None:
                env.ok("deploy", "prod", other_good(env))
            proc, pid = frozen_at(env, phase, *args)
            kill_frozen(proc, pid)
            info = env.status_json()
            # The intent is written inside `start`; from `health` to the switch it is pending.
            if phase in ("health", "pre_switch", *CANARY_PHASES, "switching"):
                assert info["pending"] is not None, (phase, info)
                shown = env.ok("status", "prod")
                assert "interrupted" in shown or "canary: 50 % of clients" in shown, shown
            load.wait_requests(20)
            out = env.ok(*args) if phase in ("cancel_timer", "preflight", "start", "health",
                                            "pre_switch", *CANARY_PHASES) else env.ok(
                "deploy", "prod", other_good(env))
            assert env.status_json()["pending"] is None, (phase, out)
            assert build_on(LISTEN) == env.status_json()["live_build"]
        tally = load.stop()
    print(f"\nkilled {command} in each of {len(phases)} phases: {tally.summary()}")
    assert tally.failed == 0, tally.examples


def test_corrupt_state_needs_repair_and_never_switches_silently(env: Env) -> None:
    color, build = live(env)
    path = env.sandbox.state_dir / env.prefix / "state.json"
    path.write_text(path.read_text()[:40])
    env.sandbox.systemctl("restart", f"{env.prefix}.service", check=True)
    assert build_on(LISTEN) == build, "the router serves .prev"
    done = env.cli("deploy", "prod", other_good(env))
    assert done.returncode == 6
    assert "alive-switch repair prod" in done.stderr
    assert "state" in env.ok("status", "prod")
    out = env.ok("repair", "prod")
    assert "state.json rewritten" in out
    assert live(env) == (color, build)
    env.ok("deploy", "prod", other_good(env))


# ---------------------------------------------------------------- 7. the socket never falls

def socket_inode(env: Env) -> str:
    out = env.sandbox.run("ss", "-Hltne", f"sport = :{LISTEN}").stdout
    return next(part for part in out.split() if part.startswith("ino:"))


def test_the_socket_never_falls(env: Env) -> None:
    inode = socket_inode(env)
    socket_unit = f"{env.prefix}.socket"
    env.make_build("broken", START_EXIT="1")
    for _ in range(10):
        assert env.cli("deploy", "prod", "broken").returncode == 3
    assert socket_inode(env) == inode
    router = f"{env.prefix}.service"
    for _ in range(8):  # a crash-looping router
        pid = int(env.show(router, "MainPID"))
        if pid:
            env.sandbox.run("kill", "-9", str(pid))
        time.sleep(0.05)
    assert env.show(socket_unit, "ActiveState") == "active"
    wait_for("router back", lambda: env.show(router, "ActiveState") == "active")
    for color in ("blue", "green"):  # both colors killed
        # Earlier tests restarted these units by hand; every start counts toward
        # StartLimitBurst, so start this scenario from a clean rate-limit counter.
        env.sandbox.systemctl("reset-failed", env.unit(color))
        pid = int(env.show(env.unit(color), "MainPID"))
        if pid:
            env.sandbox.run("kill", "-9", str(pid))
    assert env.show(socket_unit, "ActiveState") == "active"
    wait_for("live color restarted", lambda: build_on(LISTEN) == live(env)[1], timeout=15)
    storm = env.sandbox.popen("sh", "-c", "for i in $(seq 30); do systemctl daemon-reload; "
                              "done")
    try:
        env.ok("deploy", "prod", other_good(env))
    finally:
        storm.wait(60)
    assert env.show(socket_unit, "ActiveState") == "active"
    assert socket_inode(env) == inode


def test_retirement_ending_in_sigkill_is_a_warning(env: Env) -> None:
    configure(env, standby=0, watch=1)
    env.config.write_text(env.config.read_text().replace("stop_timeout = 5",
                                                         "stop_timeout = 1"))
    env.ok("install", "prod")
    env.make_build("stubborn", IGNORE_SIGTERM="1")
    env.ok("deploy", "prod", "stubborn")
    out = env.ok("deploy", "prod", other_good(env))  # standby 0: stubborn retires at once
    assert "did not stop within unit.stop_timeout (1 s) and was killed" in out
    last = json.loads((env.sandbox.state_dir / env.prefix / "history.jsonl").read_text()
                      .splitlines()[-1])
    assert any("was killed" in w for w in last["warnings"]), last
    configure(env)
    env.ok("install", "prod")


# ---------------------------------------------------------------- 8. audit trail

def test_audit_trail_in_the_journal(env: Env) -> None:
    env.make_build("broken", START_EXIT="1")
    assert env.cli("deploy", "prod", "broken").returncode == 3
    env.ok("deploy", "prod", other_good(env))
    out = env.sandbox.run("journalctl", "--no-pager", "-o", "json",
                          "SYSLOG_IDENTIFIER=alive-switch", f"ALIVE_SWITCH_APP={env.app}").stdout
    entries = [json.loads(line) for line in out.splitlines()]
    kinds = {e.get("ALIVE_SWITCH_KIND") for e in entries}
    assert "deploy" in kinds, kinds
    deploy = next(e for e in entries if e.get("ALIVE_SWITCH_KIND") == "deploy"
                  and e.get("ALIVE_SWITCH_OUTCOME") == "ok")
    for field in ("ALIVE_SWITCH_ENV", "ALIVE_SWITCH_COLOR", "ALIVE_SWITCH_BUILD",
                  "ALIVE_SWITCH_DEPLOY_ID", "ALIVE_SWITCH_PHASE", "ALIVE_SWITCH_TIMINGS"):
        assert field in deploy
    failed = [e for e in entries if e.get("ALIVE_SWITCH_OUTCOME") == "failed"]
    assert failed, "failures are in the journal too"
    assert all(e["PRIORITY"] == "3" for e in failed)


# ---------------------------------------------------------------- 9. access

def test_unprivileged_peer_cannot_switch(env: Env) -> None:
    code = ("import json,sys; from switcher.router.control import request; "
            f"print(json.dumps(request('/run/alive-switch/{env.prefix}/control.sock', "
            "{'cmd': 'switch', 'target': 'blue'}, 3)))")
    done = env.sandbox.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", code, cwd=ROOT)
    assert "ok\": true" not in done.stdout, done.stdout
    assert done.returncode != 0 or "false" in done.stdout
    assert live(env)[0] == env.status_json()["router"]["serving"]
