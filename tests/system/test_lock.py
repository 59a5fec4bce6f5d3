"""Commands that wait their turn, against a real systemd (switcher/lock.py): a standby timer
that fires as a deploy starts never fails the deploy, in either order, and ``--wait``
queues one command behind another.

Both orders are made to happen, not hoped for, with the CLI's fault injection:
- *retire first*: the manager's environment carries ``ALIVE_SWITCH_TEST_STOP_AT=retire``,
  so the retire that the real timer starts freezes holding the lock; a deploy then starts,
  must say it waits, and finishes once the retire is let go;
- *deploy first*: a deploy freezes holding the lock before it cancels the timer; the
  timer's service starts (what the timer does when it fires), must wait, and is cancelled by
  the deploy once the deploy is let go.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.load import Load
from tests.ports import port_block
from tests.system.harness import (
    CLI,
    STOP_AT_VAR,
    Env,
    frozen_at,
    stopped,
    thaw,
    wait_for,
)
from tests.system.sandbox import Sandbox

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN = port_block(__name__, 3)
ROUNDS = 20  # of each order
WAITING = "waiting for another alive-switch command"
# A short window: the timer of a deploy made with it fires a moment after that deploy.
SHORT = {"drain": 0.2, "watch": 0.2, "standby": 0.2}
# A long one: the timer stays armed while the test fires its service itself.
LONG = {"drain": 0.2, "watch": 0.2, "standby": 600}


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(sandbox, tmp_path_factory.mktemp("lock"), "lk", "prod", LISTEN, BLUE, GREEN)
    e.write_config(**LONG)
    for name in ("A", "B"):
        e.make_build(name)
    e.ok("install", "prod")
    e.ok("deploy", "prod", "A")
    e.ok("deploy", "prod", "B")  # blue on standby, its timer armed: where round 0 begins
    yield e


def retire_unit(env: Env, color: str) -> str:
    return f"{env.prefix}-retire-{color}"


def live(env: Env) -> tuple[str, str]:
    """The live color and build, from state.json (``status`` would cost a CLI start)."""
    state = json.loads((env.sandbox.state_dir / env.prefix / "state.json").read_text())
    return state["active"], state["builds"][state["active"]]


def untimed(env: Env) -> list[str]:
    """Colors that run, are not live, and have neither an armed timer nor a running retire."""
    color, _ = live(env)
    other = "green" if color == "blue" else "blue"
    units = [env.unit(other), f"{retire_unit(env, other)}.timer",
             f"{retire_unit(env, other)}.service"]
    shown = env.sandbox.systemctl("show", "-P", "ActiveState", *units, check=True).stdout
    unit, timer, retire = shown.split()
    if unit == "active" and timer != "active" and retire not in ("active", "activating"):
        return [f"{other} (timer {timer}, retire {retire})"]
    return []


def retire_process(env: Env, color: str) -> psutil.Process | None:
    """The retire that systemd started for ``color`` (a child of the sandbox's PID 1)."""
    assert env.sandbox.pid is not None
    for child in psutil.Process(env.sandbox.pid).children():
        with_args = child.cmdline()
        if with_args[-3:] == ["retire", env.env, color]:
            return child
    return None


def background_deploy(env: Env, build: str, out: Path) -> subprocess.Popen[str]:
    with out.open("w") as sink:
        return env.sandbox.popen(CLI, "--config", env.config, "deploy", "prod", build,
                                 cwd=env.home, stdout=sink, stderr=subprocess.STDOUT)


def retire_first(env: Env, out: Path) -> float:
    """The last deploy used SHORT: its timer fires, its retire freezes holding the lock, a
    deploy starts and waits, the retire goes on. Returns how long the deploy waited."""
    old, build = live(env)
    idle = "green" if old == "blue" else "blue"
    retire = wait_for(f"the {idle} retire frozen with the lock",
                      lambda: (p := retire_process(env, idle)) and stopped(p.pid) and p,
                      timeout=10)
    env.write_config(**LONG)
    deploy = background_deploy(env, "B" if build == "A" else "A", out)
    wait_for("the deploy to say it waits", lambda: WAITING in out.read_text(), timeout=30)
    began = time.monotonic()
    retire.resume()
    assert deploy.wait(60) == 0, out.read_text()
    text = out.read_text()
    assert text.count(WAITING) == 1, text
    assert "`retire prod" in text
    return time.monotonic() - began


def deploy_first(env: Env) -> None:
    """The last deploy used LONG: a deploy freezes holding the lock before it cancels the
    timer, the timer's service starts and waits, the deploy goes on and cancels it."""
    old, build = live(env)
    idle = "green" if old == "blue" else "blue"
    env.write_config(**SHORT)
    proc, pid = frozen_at(env, "cancel_timer", "deploy", "prod", "B" if build == "A" else "A")
    env.sandbox.systemctl("start", "--no-block", f"{retire_unit(env, idle)}.service",
                          check=True)
    wait_for("the retire to say it waits",
             lambda: WAITING in env.sandbox.journal(f"{retire_unit(env, idle)}.service"),
             timeout=30)
    thaw(proc, pid)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{out}\n{err}"
    assert env.show(f"{retire_unit(env, idle)}.service", "ActiveState") != "active"
    assert retire_process(env, idle) is None


def test_a_retire_and_a_deploy_never_fail_each_other(env: Env, tmp_path: Path) -> None:
    env.sandbox.systemctl("set-environment", f"{STOP_AT_VAR}=retire", check=True)
    waited: list[float] = []
    try:
        with Load(LISTEN, threads=2) as load:
            load.wait_requests(50)
            for round_ in range(ROUNDS):
                deploy_first(env)
                assert untimed(env) == [], f"round {round_}, deploy first"
                waited.append(retire_first(env, tmp_path / f"deploy-{round_}.out"))
                assert untimed(env) == [], f"round {round_}, retire first"
            tally = load.stop()
    finally:
        env.sandbox.systemctl("unset-environment", STOP_AT_VAR, check=True)
    print(f"\n{ROUNDS} rounds of each order: {tally.summary()}; a deploy waited for a "
          f"retire at most {max(waited):.2f} s after it was let go")
    assert tally.failed == 0, f"{tally.summary()}; e.g. {tally.examples}"


def test_wait_queues_behind_a_deploy_and_without_it_exit_4_at_once(env: Env,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "rollback.out"
    _, build = live(env)
    proc, pid = frozen_at(env, "health", "deploy", "prod", "B" if build == "A" else "A")
    try:
        began = time.monotonic()
        refused = env.cli("deploy", "prod", build, "--force")
        assert refused.returncode == 4, refused.stderr
        assert "`deploy prod" in refused.stderr and "--wait SECONDS" in refused.stderr
        bounded = env.cli("rollback", "prod", "--wait", "0.5")
        assert bounded.returncode == 4, bounded.stderr
        assert "(waited 0.5 s)" in bounded.stderr
        assert WAITING in bounded.stdout
        assert time.monotonic() - began < 10
        with out.open("w") as sink:
            queued = env.sandbox.popen(CLI, "--config", env.config, "rollback", "prod",
                                       "--wait", "60", cwd=env.home, stdout=sink,
                                       stderr=subprocess.STDOUT)
        line = wait_for("the rollback to say it waits", lambda: out.read_text(), timeout=30)
        assert WAITING in line and "`deploy prod" in line and "at most 60 s" in line, line
    finally:
        thaw(proc, pid)
    said, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{said}\n{err}"
    assert queued.wait(60) == 0, out.read_text()
    assert live(env)[1] == build, "the queued rollback ran after the deploy"


def test_wait_must_be_a_number_of_seconds(env: Env) -> None:
    for bad in ("-1", "soon", "inf", "nan"):
        done = env.cli("deploy", "prod", "--wait", bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert "is not a number of seconds" in done.stderr
