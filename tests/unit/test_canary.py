"""Canary steps of a deploy (switcher/ops/canary.py, ops/deploy.py) and the orders of
switcher/ops/orders.py, against the fake router and systemd and real health servers. The
router's own split is tested in the router's tests; tests/system/test_canary.py proves the
whole against real systemd."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from switcher import config, state
from switcher.errors import ConfigError, SwitchedBackError, UsageError
from switcher.model import Canary, Color, Pending, Phase
from switcher.ops import canary, orders
from switcher.ops.canary import Order
from switcher.ops.deploy import PREVIEW_VAR, Deployer
from tests.fakes import FakeRouter, FakeSystemd, answers
from tests.unit.opskit import write_config

pytestmark = pytest.mark.usefixtures("health_servers", "no_host_checks")

BEFORE = answers(996, 4)  # blue's baseline: 0.4 % failed
STEPS = "[env.prod.canary]\nsteps = [10, 50]\nstep_seconds = 0.3\n"


def site(tmp_path: Path, extra: str = "", also: str = STEPS
         ) -> tuple[Deployer, FakeSystemd, FakeRouter, list[str]]:
    cfg = write_config(tmp_path, extra, also)
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True, exist_ok=True)
    sd, router, said = FakeSystemd(), FakeRouter(), []
    return (Deployer(cfg, env, sd, router, say=said.append, run_dir=tmp_path / "run"),
            sd, router, said)


def on_canary(router: FakeRouter, per_look, *, then=None) -> None:
    """While a canary step runs, green answers ``per_look`` more between two looks;
    ``then(router)`` runs at each of those looks too."""
    def traffic(r: FakeRouter) -> None:
        if r.canary is not None:
            r.serve(Color.green, per_look)
            if then is not None:
                then(r)
    router.traffic = traffic


@pytest.fixture
def world(tmp_path: Path):
    """b1 live on blue; green will take b2 with the canary [10, 50]."""
    d, sd, router, said = site(tmp_path)
    d.deploy("b1", force=False, dry_run=False)
    router.window = {Color.blue: BEFORE, Color.green: answers()}
    said.clear()
    return d, sd, router, said


def test_steps_run_in_order_then_the_full_switch(world) -> None:
    d, sd, router, said = world
    on_canary(router, answers(40))
    outcome = d.deploy("b2", force=False, dry_run=False)
    assert outcome.ok
    seed = router.canaries[0].seed
    assert router.canaries == [Canary(Color.green, 10, 1, seed), Canary(Color.green, 50, 2, seed)]
    assert router.switches == [Color.blue, Color.green] and router.canary is None
    steps = [line for line in said if line.startswith("canary step")]
    assert steps[0] == "canary step 1/2: 10 % of clients on green for 0.3 s"
    assert steps[1].startswith("canary step 1/2: 10 % of clients on green (passed: green "
                               "passed on traffic: 0 of ")
    assert steps[1].endswith("blue 0.4 % before the canary)")
    record = state.read_history(d.env_dir)[-1]
    assert record["outcome"] == "ok"
    assert record["canary"]["ended"] == {"how": "passed", "step": 2, "percent": 50, "why": ""}
    assert [r["status"] for r in record["canary"]["records"]] == ["passed", "passed"]
    assert d.load_state().canary is None and d.load_state().active is Color.green


def test_the_share_is_in_state_json_before_the_router_is_told(world) -> None:
    d, _, router, _ = world
    seen: list[tuple[object, object]] = []
    told = router.set_canary

    def spy(c: Canary | None):
        seen.append((d.load_state().canary, d.load_state().pending))
        return told(c)
    router.set_canary = spy  # type: ignore[method-assign]
    d.deploy("b2", force=False, dry_run=False)
    first_canary, first_pending = seen[0]
    assert first_canary == router.canaries[0]
    assert isinstance(first_pending, Pending) and first_pending.phase is Phase.canary


def test_a_failing_step_sends_every_client_back_and_exits_5(world) -> None:
    d, sd, router, said = world
    on_canary(router, answers(5, 5))
    with pytest.raises(SwitchedBackError, match=r"canary step 1 \(10 % of clients on green\) "
                       r"failed \(green: \d+ of \d+ answers failed \(50 %\), blue 0.4 % before "
                       r"the canary\); every client is back on blue and green is stopped"
                       ) as caught:
        d.deploy("b2", force=False, dry_run=False)
    assert caught.value.exit_code == 5
    assert router.canaries[-1] is None and router.switches == [Color.blue]
    assert sd.units["lc-prod@green.service"].active == "inactive"
    after = d.load_state()
    assert after.active is Color.blue and after.canary is None and after.pending is None
    record = state.read_history(d.env_dir)[-1]
    assert record["outcome"] == "switched-back" and record["failed_phase"] == "canary"
    assert record["canary"]["ended"]["step"] == 1
    assert record["canary"]["ended"]["how"] == "failed"


def test_a_dead_canary_color_fails_its_step(world) -> None:
    d, sd, router, _ = world
    on_canary(router, answers(5), then=lambda r: sd.units["lc-prod@green.service"].__setattr__(
        "active", "failed"))
    with pytest.raises(SwitchedBackError, match="canary step 1"):
        d.deploy("b2", force=False, dry_run=False)
    assert router.canaries[-1] is None


def test_abort_from_a_second_deployer_acts_within_a_second(tmp_path: Path) -> None:
    d, sd, router, _ = site(tmp_path, also="[env.prod.canary]\nsteps = [10, 50]\n"
                            "step_seconds = 30\n")
    d.deploy("b1", force=False, dry_run=False)
    router.window = {Color.blue: BEFORE, Color.green: answers()}
    failed: list[BaseException] = []

    def run() -> None:
        try:
            d.deploy("b2", force=False, dry_run=False)
        except SwitchedBackError as exc:
            failed.append(exc)
    deploying = threading.Thread(target=run)
    deploying.start()
    other = Deployer(d.cfg, d.env, sd, router, say=lambda _: None, run_dir=tmp_path / "run")
    wait_for(lambda: d.load_state().canary is not None)
    asked = time.monotonic()
    outcome = orders.give(other, Order.abort)
    took = time.monotonic() - asked
    deploying.join(10)
    assert took < 1.0, f"abort took {took:.2f} s"
    assert "aborted its canary: every client is back on blue" in outcome.message
    assert failed and "canary step 1 (10 % of clients on green) was aborted" in str(failed[0])
    assert router.canaries[-1] is None and d.load_state().canary is None
    assert not (d.env_dir / state.CANARY_ORDER).exists()


def test_promote_from_a_second_deployer_skips_the_steps_left(tmp_path: Path) -> None:
    d, sd, router, _ = site(tmp_path, also="[env.prod.canary]\nsteps = [10, 50]\n"
                            "step_seconds = 30\n")
    d.deploy("b1", force=False, dry_run=False)
    outcomes = []
    deploying = threading.Thread(target=lambda: outcomes.append(
        d.deploy("b2", force=False, dry_run=False)))
    deploying.start()
    other = Deployer(d.cfg, d.env, sd, router, say=lambda _: None, run_dir=tmp_path / "run")
    wait_for(lambda: d.load_state().canary is not None)
    orders.give(other, Order.promote)
    deploying.join(10)
    assert outcomes and outcomes[0].ok
    assert [c.percent for c in router.canaries if c] == [10]
    assert router.switches[-1] is Color.green
    assert outcomes[0].canary["ended"]["how"] == "promoted"


def left_canary(d: Deployer, sd: FakeSystemd, router: FakeRouter) -> Canary:
    """What a deploy SIGKILLed mid-step leaves: green started, the split, state.json."""
    current = d.load_state()
    sd.start("lc-prod@green.service")
    left = Canary(Color.green, 10, 1, "20261202T000000-1")
    state.save_state(d.env_dir, current.with_(
        pending=Pending(Color.green, Phase.canary, left.seed, "b2"), canary=left))
    router.set_canary(left)
    return left


def test_the_next_command_undoes_a_left_canary_and_says_so(world) -> None:
    d, sd, router, said = world
    left_canary(d, sd, router)
    d.deploy("b1", force=True, dry_run=False)
    assert ("reconcile: a canary of green (10 % of clients, step 1) was left by an "
            "interrupted deploy: every client is back on blue") in said
    assert router.canaries[1] is None, "the left split undone before anything else"
    assert "stopped lc-prod@green.service (its deploy was interrupted)" in said


def test_abort_with_no_deploy_running_takes_the_lock_and_undoes_it(world) -> None:
    d, sd, router, said = world
    left_canary(d, sd, router)
    outcome = orders.give(d, Order.abort)
    assert "left by an interrupted deploy was undone: every client is on blue" in outcome.message
    assert router.canary is None and sd.units["lc-prod@green.service"].active == "inactive"
    assert d.load_state().canary is None and d.load_state().pending is None
    assert state.read_history(d.env_dir)[-1]["kind"] == "abort"


def test_promote_with_no_deploy_running_finishes_the_switch(world) -> None:
    d, sd, router, _ = world
    left_canary(d, sd, router)
    outcome = orders.give(d, Order.promote)
    assert outcome.ok and outcome.target is Color.green
    after = d.load_state()
    assert after.active is Color.green and after.canary is None and after.pending is None
    assert router.switches[-1] is Color.green and router.canary is None
    assert after.fallback is not None and after.fallback.color is Color.blue


@pytest.mark.parametrize("order", list(Order))
def test_an_order_with_no_canary_running_is_refused(world, order: Order) -> None:
    d, _, router, _ = world
    before = d.load_state()
    with pytest.raises(UsageError, match=f"no canary is running for prod: nothing to "
                       f"{order.value}; nothing was changed") as caught:
        orders.give(d, order)
    assert caught.value.exit_code == 2
    assert d.load_state() == before and not router.canaries


def test_an_order_for_another_deploy_is_stale_and_dropped(tmp_path: Path) -> None:
    canary.give(tmp_path, Order.abort, "old-deploy")
    assert canary.take(tmp_path, "this-deploy") is None
    assert not (tmp_path / state.CANARY_ORDER).exists()
    canary.give(tmp_path, Order.promote, "this-deploy")
    assert canary.take(tmp_path, "this-deploy") is Order.promote
    assert canary.take(tmp_path, "this-deploy") is None


def test_pre_switch_gets_the_preview_header_and_the_switch_ends_it(tmp_path: Path) -> None:
    out = tmp_path / "preview.txt"
    d, _, router, _ = site(tmp_path, extra=f'pre_switch = "/bin/sh -c \'echo ${PREVIEW_VAR} '
                           f'> {out}\'"', also="")
    d.deploy("b1", force=False, dry_run=False)
    header = out.read_text().strip()
    name, _, token = header.partition(": ")
    assert name == "Alive-Switch-Preview" and len(token) == 32
    assert router.preview is None, "the switch ended it"
    assert token not in (d.env_dir / state.HISTORY).read_text()


def test_a_failed_pre_switch_ends_the_preview(tmp_path: Path) -> None:
    d, _, router, _ = site(tmp_path, extra='pre_switch = "/bin/false"', also="")
    with pytest.raises(Exception, match="pre_switch hook failed"):
        d.deploy("b1", force=False, dry_run=False)
    assert router.preview is None


def test_tcp_mode_has_no_preview(tmp_path: Path) -> None:
    out = tmp_path / "preview.txt"
    d, _, router, _ = site(tmp_path, extra=f'pre_switch = "/bin/sh -c \'echo x${{{PREVIEW_VAR}}}x '
                           f'> {out}\'"', also='[env.prod.router]\nmode = "tcp"\n')
    d.deploy("b1", force=False, dry_run=False)
    assert out.read_text().strip() == "xx"


def test_the_first_deploy_has_no_canary(tmp_path: Path) -> None:
    d, _, router, said = site(tmp_path)
    d.deploy("b1", force=False, dry_run=False)
    assert not router.canaries
    assert "no canary: this is the first deploy, no old color serves clients" in said


def test_dry_run_names_the_canary_steps(world) -> None:
    d, _, router, said = world
    d.deploy("b2", force=False, dry_run=True)
    assert "   6. canary: 10 %, 50 % of clients on green, 0.3 s each, judged on traffic" in said
    assert not router.canaries


def test_cli_steps_replace_the_config_steps(world) -> None:
    d, _, router, _ = world
    d.deploy("b2", force=False, dry_run=False,
             steps=config.Canary(steps=[20], step_seconds=0.1))
    assert [c.percent for c in router.canaries if c] == [20]


@pytest.mark.parametrize(("steps", "seconds", "problem"), [
    ("[50, 25]", 30, r"steps \[50, 25\] do not increase \(50 then 25\)"),
    ("[10, 10]", 30, r"steps \[10, 10\] do not increase \(10 then 10\)"),
    ("[0, 50]", 30, r"step 0 is outside 1-99 percent"),
    ("[5, 100]", 30, r"step 100 is outside 1-99 percent"),
    ("[5]", 0, r"step_seconds 0 is not above 0"),
    ("[5]", -1, r"step_seconds -1 is not above 0"),
])
def test_bad_steps_are_config_errors(tmp_path: Path, steps: str, seconds: float,
                                     problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"env\.prod\.canary: {problem}"):
        write_config(tmp_path, also=f"[env.prod.canary]\nsteps = {steps}\n"
                                    f"step_seconds = {seconds}\n")


def test_pause_twice_and_resume_unpaused_are_refused(world) -> None:
    d, _, router, _ = world
    with pytest.raises(UsageError, match="prod is not paused: nothing to resume"):
        orders.resume(d)
    assert "held until alive-switch resume prod" in orders.pause(d, 5).message
    with pytest.raises(UsageError, match=r"prod is already paused until \d\d:\d\d:\d\d "
                       r"\(0 requests held\); nothing was changed"):
        orders.pause(d, 5)
    assert orders.resume(d).message == "resumed prod: 3 held requests released"
    assert router.paused is None


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.parametrize(("argv", "says"), [
    (["--canary", "50,25"], "--canary 50,25 --step-seconds 0.3: steps [50, 25] do not increase"),
    (["--canary", "5,x"], "'5,x' is not a list of whole percents such as 5,25,50"),
    (["--canary", "10", "--step-seconds", "0"], "step_seconds 0 is not above 0"),
])
def test_cli_canary_options_are_checked_before_anything_changes(
        world, capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    from switcher import cli

    d, _, router, _ = world
    before = d.load_state()
    with pytest.raises(SystemExit) as caught:
        cli.main(["--config", str(d.env_dir.parent.parent / "c.toml"), "deploy", "prod",
                  "b2", *argv])
    assert caught.value.code == 2
    assert says in capsys.readouterr().err
    assert d.load_state() == before and not router.canaries
