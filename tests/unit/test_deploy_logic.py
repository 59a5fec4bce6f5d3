"""The deploy state machine against fakes of the outside world (systemctl, the router) and a
real HTTP health endpoint. Every guarantee here is also proven against real systemd in
tests/system."""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from switcher import config, state
from switcher.analysis import Figures
from switcher.errors import (
    AbortedError,
    LockHeldError,
    RouterError,
    SwitchedBackError,
    UsageError,
)
from switcher.model import Color, Pending, Phase
from switcher.ops import checks
from switcher.ops.deploy import Deployer
from tests.fakes import FakeRouter, FakeSystemd, answers
from tests.ports import port_block

LISTEN, BLUE, GREEN = port_block(__name__, 3)


class Health(http.server.BaseHTTPRequestHandler):
    status = {BLUE: 200, GREEN: 200}

    def do_GET(self) -> None:
        code = self.status[self.server.server_address[1]]
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module", autouse=True)
def health_servers() -> Iterator[None]:
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", p), Health) for p in (BLUE, GREEN)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    yield
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(autouse=True)
def healthy() -> Iterator[None]:
    Health.status = {BLUE: 200, GREEN: 200}
    yield


@pytest.fixture(autouse=True)
def host_free_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket and port checks read the real host (psutil); the health servers above
    hold the color ports here. tests/system proves those checks against real systemd."""
    monkeypatch.setattr(checks, "CHECKS", [c for c in checks.CHECKS
                                           if c not in (checks.socket_held,
                                                        checks.idle_port_free)])


@pytest.fixture
def world(tmp_path: Path) -> tuple[Deployer, FakeSystemd, FakeRouter, list[str]]:
    return make_world(tmp_path)


def make_world(tmp_path: Path, extra: str = "") -> tuple[Deployer, FakeSystemd, FakeRouter,
                                                          list[str]]:
    builds = tmp_path / "builds"
    for name in ("b1", "b2", "b3"):
        (builds / name).mkdir(parents=True)
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f"""
app = "unit"
state_dir = "{tmp_path / 'state'}"
router_exec = "/usr/local/bin/alive-switch-router"
[env.prod]
listen = {LISTEN}
ports = {{ blue = {BLUE}, green = {GREEN} }}
builds = "{builds}"
exec = "/usr/bin/python3 server.py"
drain = 0.2
watch = 0.3
standby = 30
{extra}
[env.prod.health]
path = "/h"
timeout = 1
interval = 0.05
""")
    cfg = config.load(str(cfg_path))
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True)
    sd, router, said = FakeSystemd(), FakeRouter(), []
    return (Deployer(cfg, env, sd, router, say=said.append, run_dir=tmp_path / "run"),
            sd, router, said)


def test_first_deploy_goes_to_blue_and_enables_it(world) -> None:
    d, sd, router, _ = world
    outcome = d.deploy("b1", force=False, dry_run=False)
    assert (outcome.ok, outcome.target) == (True, Color.blue)
    assert router.switches == [Color.blue]
    current = d.load_state()
    assert (current.active, current.builds[Color.blue], current.pending) == (Color.blue, "b1",
                                                                            None)
    assert sd.units["unit-prod@blue.service"].enabled
    assert not sd.timers, "nothing to retire on a first deploy"
    assert Path(d.env_dir / "blue").resolve().name == "b1"


def test_second_deploy_goes_to_green_and_schedules_blue_retirement(world) -> None:
    d, sd, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    assert router.switches == [Color.blue, Color.green]
    current = d.load_state()
    assert (current.active, current.previous) == (Color.green, Color.blue)
    assert current.fallback is not None and current.fallback.color == Color.blue
    after, argv = sd.timers["unit-prod-retire-blue"]
    assert 29 < after < 31.5
    assert argv[0].startswith("/")
    assert argv[-5:] == ["--config", d.cfg.path, "retire", "prod", "blue"]
    assert sd.units["unit-prod@blue.service"].active == "active", "blue stays on standby"
    assert not sd.units["unit-prod@blue.service"].enabled
    assert sd.units["unit-prod@green.service"].enabled


def test_same_build_live_is_a_noop_unless_forced(world) -> None:
    d, sd, router, said = world
    d.deploy("b1", force=False, dry_run=False)
    calls = len(sd.calls)
    outcome = d.deploy("b1", force=False, dry_run=False)
    assert outcome.ok and "already live" in outcome.message
    assert router.switches == [Color.blue]
    assert not [c for c in sd.calls[calls:] if c[0] in ("start", "stop", "restart")]
    d.deploy("b1", force=True, dry_run=False)
    assert router.switches == [Color.blue, Color.green]


def test_unhealthy_build_aborts_before_the_switch(world) -> None:
    d, sd, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    Health.status[GREEN] = 503
    with pytest.raises(AbortedError, match="green failed its health check") as caught:
        d.deploy("b2", force=False, dry_run=False)
    assert caught.value.exit_code == 3
    assert "journalctl -u unit-prod@green.service" in caught.value.hint
    assert router.switches == [Color.blue]
    assert sd.units["unit-prod@green.service"].active == "inactive"
    current = d.load_state()
    assert (current.active, current.pending) == (Color.blue, None)
    assert state.read_history(d.env_dir)[-1]["outcome"] == "failed"


def test_a_build_that_dies_during_watch_is_switched_back(world) -> None:
    d, sd, router, _ = world
    d.deploy("b1", force=False, dry_run=False)

    real_sleep = d.clock.sleep
    died: list[float] = []

    def die_after_switch(seconds: float) -> None:
        if router.active == Color.green:
            sd.units["unit-prod@green.service"].main_pid = 99999  # systemd restarted it
            died.append(d.clock.now())
        real_sleep(seconds)

    d.clock.sleep = die_after_switch
    with pytest.raises(SwitchedBackError, match="restarted") as caught:
        d.deploy("b2", force=False, dry_run=False)
    assert caught.value.exit_code == 5
    assert router.switches == [Color.blue, Color.green, Color.blue]
    # The failed color may finish its in-flight work for `drain`, not be cut at once: from
    # the switch back, which came after its death was seen and before the deploy ended.
    assert router.drain_until is not None
    assert died[0] + d.env.drain <= router.drain_until <= d.clock.now() + d.env.drain
    assert d.load_state().active == Color.blue
    assert sd.units["unit-prod@green.service"].active == "inactive"


def test_a_switch_back_lets_the_failed_color_finish_its_requests_before_stopping_it(
        world) -> None:
    d, sd, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    real_sleep, real_stop = d.clock.sleep, sd.stop
    left = [3]  # status polls after the switch back that still see a request on green

    def die_after_switch(seconds: float) -> None:
        if router.active == Color.green:
            sd.units["unit-prod@green.service"].main_pid = 99999
            router.inflight["green"] = 1
        real_sleep(seconds)

    def finishing(r: FakeRouter) -> None:
        if r.active == Color.blue and r.inflight["green"]:
            left[0] -= 1
            r.inflight["green"] = int(left[0] > 0)

    seen_at_stop: list[int] = []

    def stop(unit: str) -> None:
        if unit == "unit-prod@green.service":
            seen_at_stop.append(router.inflight["green"])
        real_stop(unit)

    d.clock.sleep, router.traffic, sd.stop = die_after_switch, finishing, stop
    with pytest.raises(SwitchedBackError, match="restarted"):
        d.deploy("b2", force=False, dry_run=False)
    assert left[0] == 0 and seen_at_stop[0] == 0  # stopped once nothing was in flight


def test_rollback_is_warm_and_a_second_one_goes_back(world) -> None:
    d, sd, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    restarts = [c for c in sd.calls if c == ("stop", "unit-prod@blue.service")]
    outcome = d.rollback(dry_run=False)
    assert (outcome.target, outcome.build) == (Color.blue, "b1")
    assert [c for c in sd.calls if c == ("stop", "unit-prod@blue.service")] == restarts, \
        "a warm rollback does not restart the standby color"
    assert "unit-prod-retire-blue" not in sd.timers, "the rollback cancelled blue's timer"
    assert "unit-prod-retire-green" in sd.timers
    d.rollback(dry_run=False)
    assert d.load_state().active == Color.green
    assert router.switches[-2:] == [Color.blue, Color.green]


def test_rollback_without_previous_is_a_usage_error(world) -> None:
    d, *_ = world
    d.deploy("b1", force=False, dry_run=False)
    with pytest.raises(UsageError, match="nothing to roll back to"):
        d.rollback(dry_run=False)


def test_retire_refuses_live_and_fallback_colors(world) -> None:
    d, sd, _, _ = world
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    with pytest.raises(UsageError, match="live color"):
        d.retire(Color.green)
    with pytest.raises(UsageError, match="fallback"):
        d.retire(Color.blue)
    assert sd.units["unit-prod@blue.service"].active == "active"
    d.clock.now = lambda: 10**10
    d.retire(Color.blue)
    assert sd.units["unit-prod@blue.service"].active == "inactive"
    assert d.load_state().fallback is None


def test_interrupted_switch_is_committed_when_the_router_serves_the_target(world) -> None:
    d, _, router, said = world
    d.deploy("b1", force=False, dry_run=False)
    current = d.load_state()
    state.save_state(d.env_dir, current.with_(
        pending=Pending(Color.green, Phase.switching, "x", "b2")))
    router.active = Color.green  # the killed run had switched the router
    d.begin()
    assert d.load_state().active == Color.green
    assert any("finish the interrupted switch" in line for line in said)


def test_interrupted_start_is_undone(world) -> None:
    d, sd, router, said = world
    d.deploy("b1", force=False, dry_run=False)
    state.save_state(d.env_dir, d.load_state().with_(
        pending=Pending(Color.green, Phase.health, "x", "b2")))
    sd.start("unit-prod@green.service")
    d.begin()
    current = d.load_state()
    assert (current.active, current.pending) == (Color.blue, None)
    assert sd.units["unit-prod@green.service"].active == "inactive"
    assert router.active == Color.blue


def test_bad_build_names_change_nothing(world, tmp_path: Path) -> None:
    d, sd, router, _ = world
    (tmp_path / "outside").mkdir()
    (Path(d.env.builds) / "escape").symlink_to(tmp_path / "outside")
    (Path(d.env.builds) / "file").write_text("x")
    for bad in ("../b1", "..", "a/b", str(tmp_path / "outside"), "missing", "escape", "file"):
        with pytest.raises(UsageError):
            d.deploy(bad, force=False, dry_run=False)
    assert router.switches == []
    assert not [c for c in sd.calls if c[0] in ("restart", "stop")]
    assert not (d.env_dir / "blue").exists()


def test_lock_held_is_refused_naming_the_holder(world) -> None:
    d, *_ = world
    with d.lock("deploy prod b9"), pytest.raises(LockHeldError, match="deploy prod b9") as c:
        d.deploy("b1", force=False, dry_run=False)
    assert c.value.exit_code == 4


def test_a_refused_build_never_becomes_the_rollback_target(world) -> None:
    d, _, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    Health.status[BLUE] = 503
    with pytest.raises(AbortedError):
        d.deploy("b3", force=False, dry_run=False)
    assert Path(d.env_dir / "blue").resolve().name == "b1", "the link points back at b1"
    assert d.load_state().builds[Color.blue] == "b1"
    Health.status[BLUE] = 200
    outcome = d.rollback(dry_run=False)
    assert (outcome.target, outcome.build) == (Color.blue, "b1")
    assert Path(d.env_dir / "blue").resolve().name == "b1"


def test_after_a_switch_back_rollback_never_starts_the_failed_build(world) -> None:
    d, sd, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    real_sleep = d.clock.sleep

    def die_after_switch(seconds: float) -> None:
        if router.active == Color.blue:
            sd.units["unit-prod@blue.service"].main_pid = 99999
        real_sleep(seconds)

    d.clock.sleep = die_after_switch
    with pytest.raises(SwitchedBackError):
        d.deploy("b3", force=False, dry_run=False)
    d.clock.sleep = real_sleep
    assert Path(d.env_dir / "blue").resolve().name == "b1"
    assert sd.units["unit-prod@green.service"].enabled, "boot enable back on the live color"
    outcome = d.rollback(dry_run=False)
    assert (outcome.target, outcome.build) == (Color.blue, "b1")


def test_retire_refuses_the_color_state_still_calls_live(world) -> None:
    d, sd, _, _ = world
    d.deploy("b1", force=False, dry_run=False)
    state.save_state(d.env_dir, d.load_state().with_(
        pending=Pending(Color.green, Phase.switching, "x", "b2")))  # killed before the switch
    with pytest.raises(UsageError, match="live color"):
        d.retire(Color.blue)
    assert sd.units["unit-prod@blue.service"].active == "active"


def test_a_linked_build_is_pinned_to_its_target(world) -> None:
    d, *_ = world
    (Path(d.env.builds) / "latest").symlink_to(Path(d.env.builds) / "b2")
    outcome = d.deploy("latest", force=False, dry_run=False)
    assert outcome.build == "b2"
    assert os.readlink(d.env_dir / "blue") == str(Path(d.env.builds) / "b2")


def test_failed_preflight_leaves_the_standby_timer_alone(world, monkeypatch) -> None:
    d, sd, _, _ = world
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    assert "unit-prod-retire-blue" in sd.timers
    failing = checks.Check("disk", checks.Level.failed, "99% used")
    monkeypatch.setattr(checks, "CHECKS", [lambda _s: failing])
    with pytest.raises(AbortedError, match="pre-flight failed"):
        d.deploy("b3", force=False, dry_run=False)
    assert "unit-prod-retire-blue" in sd.timers
    assert d.load_state().fallback is not None


def test_a_standby_color_without_its_retire_timer_gets_one(world) -> None:
    """A run killed between its commit and step 8 left no timer: the next command arms it,
    and only then (begin reads every unit's state in one call)."""
    d, sd, _, said = world
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    d.begin()
    assert sum(call == ("schedule", "unit-prod-retire-blue") for call in sd.calls) == 1
    del sd.timers["unit-prod-retire-blue"]  # as if the run had died before step 8
    _, running = d.begin()
    assert any("blue had no retire timer" in line for line in said)
    assert "unit-prod-retire-blue" in sd.timers
    assert running == {Color.blue: "b1", Color.green: "b2"}


# ---------------------------------------------------------------- the traffic-aware watch

BEFORE = answers(996, 4)  # blue's baseline: 0.4 % of its answers failed


def on_green(router: FakeRouter, per_look: Figures, looks: list[int] | None = None) -> None:
    """From the switch on, green answers ``per_look`` more between two looks."""
    def traffic(r: FakeRouter) -> None:
        if r.active == Color.green:
            r.serve(Color.green, per_look)
            if looks is not None:
                looks.append(1)
    router.traffic = traffic


def second_deploy(world, per_look: Figures, looks: list[int] | None = None):
    d, sd, router, said = world
    d.deploy("b1", force=False, dry_run=False)
    router.window = {Color.blue: BEFORE, Color.green: answers()}
    on_green(router, per_look, looks)
    said.clear()
    return d, sd, router, said


def test_a_color_failing_its_traffic_is_switched_back_with_the_figures(world) -> None:
    d, sd, router, said = second_deploy(world, answers(10, 10))
    with pytest.raises(SwitchedBackError, match=r"green failed during the watch \(green: "
                       r"\d+ of \d+ answers failed \(50 %\), blue 0.4 % before the switch\)"
                       ) as caught:
        d.deploy("b2", force=False, dry_run=False)
    assert caught.value.exit_code == 5
    assert router.switches == [Color.blue, Color.green, Color.blue]
    assert router.asked_seconds == [60.0], "the baseline: analysis.baseline seconds"
    assert sd.units["unit-prod@green.service"].active == "inactive"
    record = state.read_history(d.env_dir)[-1]
    assert record["outcome"] == "switched-back"
    analysis = record["analysis"]
    assert analysis["verdict"]["ok"] is False and analysis["verdict"]["rule"] == "errors"
    assert analysis["verdict"]["message"] in record["message"]
    green, blue = analysis["colors"]["green"], analysis["colors"]["blue"]
    assert green["answers"] >= 50 and green["failed"] == green["5xx"] == green["answers"] // 2
    assert green["window"] == "since the switch"
    assert blue == {"window": "60 s before the switch", "answers": 1000, "failed": 4,
                    "5xx": 4, "failures": {"refused": 0, "reset": 0, "timeout": 0},
                    "p95": None}


def test_a_color_good_on_its_traffic_passes_and_history_keeps_its_figures(world) -> None:
    d, _, router, said = second_deploy(world, answers(40))
    outcome = d.deploy("b2", force=False, dry_run=False)
    assert outcome.ok and router.switches == [Color.blue, Color.green]
    verdict = [line for line in said if "on traffic" in line]
    assert len(verdict) == 1 and re.fullmatch(r"green passed on traffic: 0 of \d+ answers "
                                              r"failed \(0 %\), blue 0.4 % before the switch",
                                              verdict[0])
    analysis = state.read_history(d.env_dir)[-1]["analysis"]
    assert analysis["verdict"] == {"ok": True, "judged": True, "rule": None,
                                   "message": verdict[0]}
    assert analysis["colors"]["green"]["answers"] == router.counters[Color.green].answers
    assert outcome.analysis == analysis


def test_below_min_requests_passes_with_the_note(world) -> None:
    looks: list[int] = []
    d, _, _, said = second_deploy(world, answers(0, 1), looks)
    assert d.deploy("b2", force=False, dry_run=False).ok, "5xx only, but too few to judge"
    note = f"not judged on traffic ({len(looks)} answers)"
    assert note in said
    assert state.read_history(d.env_dir)[-1]["analysis"]["verdict"] == {
        "ok": True, "judged": False, "rule": None, "message": note}


def test_the_first_deploy_is_not_judged_on_traffic(world) -> None:
    d, _, router, said = world
    router.traffic = lambda r: r.serve(Color.blue, answers(0, 100))
    d.deploy("b1", force=False, dry_run=False)
    assert "not judged on traffic (the first deploy: no old color to compare with)" in said
    assert router.asked_seconds == []


def test_a_router_restart_mid_watch_is_re_baselined_never_negative(world) -> None:
    """Green's counters stand at 500 before the switch; the router restarts at the second
    look and counts from zero. What the first router counted since the switch is kept."""
    d, _, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    router.window = {Color.blue: BEFORE, Color.green: answers()}
    router.counters[Color.green] = answers(500)
    looks: list[int] = []

    def traffic(r: FakeRouter) -> None:
        if r.active == Color.green:
            looks.append(1)
            if len(looks) == 2:
                r.restart()
            r.serve(Color.green, answers(30))

    router.traffic = traffic
    assert d.deploy("b2", force=False, dry_run=False).ok
    analysis = state.read_history(d.env_dir)[-1]["analysis"]
    assert analysis["router_restarts"] == 1
    assert analysis["colors"]["green"]["answers"] == 30 * len(looks)


def test_a_failing_color_is_caught_across_a_router_restart(world) -> None:
    """25 failed answers a look, min_requests 50: only the first router's 25 plus the
    second's 25 reach it, at the second look."""
    d, _, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    router.window = {Color.blue: BEFORE, Color.green: answers()}
    looks: list[int] = []

    def traffic(r: FakeRouter) -> None:
        if r.active == Color.green:
            looks.append(1)
            if len(looks) == 2:
                r.restart()
            r.serve(Color.green, answers(0, 25))

    router.traffic = traffic
    with pytest.raises(SwitchedBackError, match="green: 50 of 50 answers failed"):
        d.deploy("b2", force=False, dry_run=False)
    assert len(looks) == 2


SLOW = (939, 0, 0, 0, 0, 0, 0, 50, 11)  # p95 0.61 s
QUICK = (283, 0, 15, 2)                 # p95 0.012 s


def test_a_slow_color_fails_the_latency_rule(world) -> None:
    d, _, router, _ = second_deploy(world, answers(1000, timed=SLOW))
    d.env = dataclasses.replace(d.env, analysis=dataclasses.replace(d.env.analysis,
                                                                    max_latency_ratio=3))
    router.window = {Color.blue: answers(300, timed=QUICK), Color.green: answers()}
    with pytest.raises(SwitchedBackError, match=re.escape(
            "(green: p95 0.61 s > 3 × blue's 0.012 s + 0.05 s); switched back to blue")):
        d.deploy("b2", force=False, dry_run=False)
    assert state.read_history(d.env_dir)[-1]["analysis"]["verdict"]["rule"] == "latency"


def test_an_unreadable_router_alone_fails_no_deploy_and_is_said_once(world) -> None:
    d, _, router, said = second_deploy(world, answers(0, 10))

    def unreachable(r: FakeRouter) -> None:
        r.unreadable = r.active == Color.green

    router.traffic = unreachable
    assert d.deploy("b2", force=False, dry_run=False).ok
    warnings = [line for line in said if "could not be read during the watch" in line]
    assert len(warnings) == 1 and "the process and health checks go on" in warnings[0]
    assert "not judged on traffic (the router's figures could not be read)" in said
    assert state.read_history(d.env_dir)[-1]["analysis"]["unread_looks"] > 1


def test_a_router_without_figures_is_judged_on_health_and_process(world) -> None:
    """A router older than its figures refuses the command: the watch says so and goes on."""
    d, _, router, said = second_deploy(world, answers(0, 10))

    def refuse(seconds: float, timeout: float = 5.0) -> dict[str, object]:
        raise RouterError("router refused 'figures': unknown cmd 'figures'", "")

    router.figures = refuse  # type: ignore[method-assign]
    assert d.deploy("b2", force=False, dry_run=False).ok
    assert any(line.startswith("warning: the router gave no figures before the switch: "
                               "router refused 'figures'") for line in said)
    assert ("not judged on traffic (the router gave no figures before the switch: router "
            "refused 'figures': unknown cmd 'figures')") in said


# -- direct mode -------------------------------------------------------------------------------

DIRECT = '[env.prod.router]\nmode = "direct"'


def test_direct_mode_takes_the_listener_before_the_switch_and_keeps_no_standby(
        tmp_path: Path) -> None:
    d, sd, router, said = make_world(tmp_path, DIRECT)
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    assert router.steered == [Color.blue, Color.green]
    assert router.switches == [Color.blue, Color.green]
    current = d.load_state()
    assert current.fallback is not None
    # T0 + max(drain 0.2, watch 0.3): standby = 30 does not apply in direct mode.
    assert current.fallback.until - current.drain_until == pytest.approx(0.1, abs=0.05)
    assert "unit-prod-retire-blue" not in sd.timers
    assert sd.units["unit-prod@blue.service"].active != "active", "retired when the watch ended"
    assert "retired blue (direct mode: no standby)" in said


def test_direct_mode_aborts_when_the_router_cannot_take_the_listener(tmp_path: Path) -> None:
    d, sd, router, _ = make_world(tmp_path, DIRECT)
    d.deploy("b1", force=False, dry_run=False)
    router.steer_error = "no process of unit-prod@green.service listens on 127.0.0.1:1"
    with pytest.raises(AbortedError, match=r"cannot steer to it: .*no process of") as caught:
        d.deploy("b2", force=False, dry_run=False)
    assert caught.value.exit_code == 3
    assert router.switches == [Color.blue]
    assert sd.units["unit-prod@green.service"].active != "active"


def test_tcp_mode_never_asks_the_router_to_steer(world) -> None:
    d, _, router, _ = world
    d.deploy("b1", force=False, dry_run=False)
    assert router.steered == []


def test_direct_mode_refuses_a_canary_on_the_command_line(tmp_path: Path) -> None:
    d, _, router, _ = make_world(tmp_path, DIRECT)
    d.deploy("b1", force=False, dry_run=False)
    with pytest.raises(UsageError, match=r'--canary: .*"direct": direct mode cannot') as caught:
        d.deploy("b2", force=False, dry_run=False, steps=config.Canary(steps=[5]))
    assert 'mode = "http" or "tcp"' in caught.value.hint
    assert router.switches == [Color.blue]


def test_direct_mode_judges_steered_connections_and_says_what_it_cannot_see(
        tmp_path: Path) -> None:
    d, _, router, said = make_world(tmp_path, DIRECT)
    d.deploy("b1", force=False, dry_run=False)
    router.window = {Color.blue: Figures(connections=1000), Color.green: Figures()}
    on_green(router, Figures(connections=40))  # what the kernel steered, read into the tally
    said.clear()
    assert d.deploy("b2", force=False, dry_run=False).ok
    verdict = [line for line in said if "on traffic" in line]
    assert len(verdict) == 1 and re.fullmatch(
        r"green passed on traffic: 0 of \d+ answers failed \(0 %\), blue 0 % before the "
        r"switch; direct mode: answers are the connections the kernel steered and the "
        r"router's refused connects; what the app answered on them is not seen", verdict[0])
    assert state.read_history(d.env_dir)[-1]["analysis"]["verdict"]["message"] == verdict[0]


def test_direct_mode_fails_a_color_on_the_refused_connects_of_the_routers_path(
        tmp_path: Path) -> None:
    d, _, router, _ = make_world(tmp_path, DIRECT)
    d.deploy("b1", force=False, dry_run=False)
    router.window = {Color.blue: Figures(connections=1000), Color.green: Figures()}
    # green's listener gone: nothing steered to it, the router's connects refused.
    on_green(router, answers(refused=40))
    with pytest.raises(SwitchedBackError, match=r"green: \d+ of \d+ answers failed \(100 %\)"):
        d.deploy("b2", force=False, dry_run=False)
    assert router.switches == [Color.blue, Color.green, Color.blue]


def test_direct_mode_dry_run_says_no_standby(tmp_path: Path) -> None:
    d, _, _, said = make_world(tmp_path, DIRECT)
    d.deploy("b1", force=False, dry_run=False)
    d.deploy("b2", force=False, dry_run=False)
    said.clear()
    d.deploy("b3", force=False, dry_run=True)
    d.rollback(dry_run=True)
    retire = [line for line in said if "retires" in line]
    assert len(retire) == 2 and not any("standby," in line for line in said), said
    assert all("retires at T0 + max(drain, watch)" in line for line in retire)
