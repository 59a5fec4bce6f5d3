"""Real hosts, against a real systemd: the cut-over from a legacy unit that binds the public
port itself (`install --takeover`, under load, with the gap measured), a failed takeover
that changes nothing, a takeover that fails after the stop and restores the legacy unit,
deploy hooks, config changes, `status` of every environment, `logs`, `prune`, `uninstall`.

Two environments of one app: `prod`, whose legacy unit has the router's own name
(`rh-prod.service`, the seed's situation), and `stage`, whose legacy unit is `rh-legacy`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from tests.load import Load, Tally
from tests.ports import port_block
from tests.system.harness import APP, CLI, ENV_BODY, Env, build_on, get, listening, wait_for
from tests.system.sandbox import Sandbox, kill_group

pytestmark = pytest.mark.system
P_LISTEN, P_BLUE, P_GREEN, S_LISTEN, S_BLUE, S_GREEN = port_block(__name__, 6)
APP_NAME = "rh"
PROD_LEGACY = "rh-prod.service"  # the router's own name
STAGE_LEGACY = "rh-legacy.service"
GAP_LIMIT = 0.5  # seconds of refused connections a takeover may cause (target: < 0.1)
LEGACY_UNIT = """\
[Unit]
Description=legacy {name}: the app binds the public port itself
[Service]
Environment=HOST=127.0.0.1 PORT={port}
WorkingDirectory={build}
ExecStart={python} {app}
Restart=on-failure
[Install]
WantedBy=multi-user.target
"""


@dataclass
class Envs:
    prod: Env
    stage: Env

    def configure(self, prod_extra: str = "") -> None:
        stage = self.stage
        body = ENV_BODY.format(
            env="stage", listen=S_LISTEN, blue=S_BLUE, green=S_GREEN, builds=stage.builds,
            command=f"{sys.executable} {APP}", drain=0.5, watch=0.5, standby=30,
            health_timeout=5, mode="tcp", extra="", unit_extra="", health_extra="")
        stage.builds.mkdir(parents=True, exist_ok=True)
        self.prod.write_config(drain=0.5, watch=0.5, standby=30, extra=prod_extra, also=body)


@pytest.fixture(scope="module")
def envs(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Envs:
    home = tmp_path_factory.mktemp("real-hosts")
    both = Envs(Env(sandbox, home, APP_NAME, "prod", P_LISTEN, P_BLUE, P_GREEN),
                Env(sandbox, home, APP_NAME, "stage", S_LISTEN, S_BLUE, S_GREEN))
    both.configure()
    for e in (both.prod, both.stage):
        e.make_build("legacy")
        e.make_build("bad", START_EXIT="1")
        e.make_build("B1")
        e.make_build("B2")
        e.make_build("B3")
    start_legacy(both.prod, PROD_LEGACY, dropin="[Service]\nEnvironment=LEGACY_DROPIN=1\n")
    start_legacy(both.stage, STAGE_LEGACY)
    return both


def start_legacy(env: Env, name: str, dropin: str = "") -> None:
    unit_dir = env.sandbox.unit_dir
    (unit_dir / name).write_text(LEGACY_UNIT.format(
        name=name, port=env.listen, build=env.builds / "legacy", python=sys.executable, app=APP))
    if dropin:
        (unit_dir / f"{name}.d").mkdir(exist_ok=True)
        (unit_dir / f"{name}.d" / "legacy.conf").write_text(dropin)
    env.sandbox.systemctl("daemon-reload", check=True)
    env.sandbox.systemctl("enable", "--now", name, check=True)
    wait_for(f"{name} serving", lambda: build_on(env.listen) == "legacy")


class Refusals:
    """Connects to a port every millisecond: how long it refused connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.refused: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Refusals:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except ConnectionRefusedError:
                self.refused.append(began)
            except OSError:
                pass
            self._stop.wait(0.001)

    @property
    def window(self) -> float:
        return self.refused[-1] - self.refused[0] + 0.001 if self.refused else 0.0


@dataclass
class Cutover:
    done: subprocess.CompletedProcess[str]
    tally: Tally
    window: float

    def report(self, what: str) -> str:
        gap = next((line for line in self.done.stdout.splitlines() if line.startswith("gap:")),
                   "no gap line")
        return (f"\n{what}: refused for {self.window * 1000:.1f} ms seen from the test; "
                f"the CLI says {gap!r}; load: {self.tally.summary()}")


def cut_over(env: Env, *args: str, extra_env: dict[str, str] | None = None) -> Cutover:
    with Load(env.listen, threads=4) as load, Refusals(env.listen) as refusals:
        load.wait_requests(100)
        done = env.cli("install", env.env, *args, env=extra_env)
        load.wait_requests(100)
        tally = load.stop()
    return Cutover(done, tally, refusals.window)


def only_stop_failures(tally: Tally) -> bool:
    """Failures a legacy process's own stop causes: refused while nothing listens, reset or
    cut short for connections it had accepted but not answered."""
    return set(tally.failures) <= {"refused", "reset", "eof"}


# ---------------------------------------------------------------- takeover

def test_dry_run_prints_the_plan_and_changes_nothing(envs: Envs) -> None:
    prod = envs.prod
    out = prod.ok("install", "prod", "--takeover", PROD_LEGACY, "B1", "--dry-run")
    assert f"takeover of {PROD_LEGACY}" in out
    lines = out.splitlines()
    cut = next(i for i, line in enumerate(lines) if f"PID 1 stops {PROD_LEGACY}" in line)
    write = next(i for i, line in enumerate(lines) if f"write {PROD_LEGACY} over" in line)
    assert cut < write, "the router's file replaces the legacy one only after the stop"
    assert "starts rh-prod.socket as soon as" in lines[cut]
    assert not (prod.sandbox.unit_dir / "rh-prod.socket").exists()
    assert not (prod.sandbox.state_dir / "rh-prod").exists()
    assert prod.show(PROD_LEGACY, "ActiveState") == "active"


def test_plain_install_refuses_while_a_legacy_unit_holds_the_port(envs: Envs) -> None:
    for env, legacy in ((envs.stage, STAGE_LEGACY), (envs.prod, PROD_LEGACY)):
        done = env.cli("install", env.env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "EADDRINUSE" in done.stderr
        assert f"--takeover {legacy}" in done.stderr
        assert not (env.sandbox.unit_dir / f"{env.prefix}.socket").exists()
        assert build_on(env.listen) == "legacy"


def test_a_takeover_with_a_bad_build_changes_nothing(envs: Envs) -> None:
    stage = envs.stage
    result = cut_over(stage, "--takeover", STAGE_LEGACY, "bad")
    print(result.report("failed takeover (bad build)"))
    assert result.done.returncode == 3, result.done.stdout + result.done.stderr
    assert "nothing was changed" in result.done.stderr
    assert result.tally.failed == 0, "the legacy unit served throughout"
    assert stage.show(STAGE_LEGACY, "ActiveState") == "active"
    assert stage.sandbox.systemctl("is-enabled", STAGE_LEGACY).stdout.strip() == "enabled"
    assert not list(stage.sandbox.unit_dir.glob("rh-stage*")), "no unit left behind"
    assert not (stage.sandbox.state_dir / "rh-stage").exists(), "no state left behind"
    assert stage.show(stage.unit("blue"), "ActiveState") in ("inactive", "")
    assert build_on(S_LISTEN) == "legacy"


def test_takeover_of_a_differently_named_unit_under_load(envs: Envs) -> None:
    stage = envs.stage
    legacy_text = (stage.sandbox.unit_dir / STAGE_LEGACY).read_text()
    result = cut_over(stage, "--takeover", STAGE_LEGACY, "B1")
    print(result.report(f"takeover of {STAGE_LEGACY}"))
    assert result.done.returncode == 0, result.done.stdout + result.done.stderr
    assert "gap: " in result.done.stdout
    assert only_stop_failures(result.tally), result.tally.summary()
    assert result.window < GAP_LIMIT, result.report("too long")
    assert result.tally.builds["B1"] > 0 and result.tally.builds["legacy"] > 0
    serves_blue(stage, "B1")
    assert stage.show(STAGE_LEGACY, "ActiveState") == "inactive"
    assert stage.sandbox.systemctl("is-enabled", STAGE_LEGACY).stdout.strip() == "disabled"
    backup = stage.sandbox.state_dir / "rh-stage/takeover"
    assert (backup / f"{STAGE_LEGACY}.bak").read_text() == legacy_text
    assert json.loads((backup / "legacy.json").read_text())["was_enabled"] is True
    record = json.loads((stage.sandbox.state_dir / "rh-stage/history.jsonl")
                        .read_text().splitlines()[-1])
    assert record["takeover"]["unit"] == STAGE_LEGACY and record["outcome"] == "ok"


def step_seconds(out: str, step: str) -> float:
    line = next(line for line in out.splitlines() if line.split()[:1] == [step])
    return float(line.split()[1])


def serves_blue(env: Env, build: str) -> None:
    assert build_on(env.listen) == build
    for unit in (f"{env.prefix}.socket", f"{env.prefix}.service", env.unit("blue")):
        assert env.show(unit, "ActiveState") == "active", unit
        # is-enabled reads the links; systemd's UnitFileState may be cached after
        # `enable --no-reload`.
        assert env.sandbox.systemctl("is-enabled", unit).stdout.strip() == "enabled", unit
    ss = env.sandbox.run("ss", "-Hltnp", f"sport = :{env.listen}").stdout
    assert "systemd" in ss, ss
    info = env.status_json()
    assert (info["live"], info["live_build"]) == ("blue", build)


def test_a_takeover_that_fails_after_the_stop_restores_the_legacy_unit(envs: Envs) -> None:
    prod = envs.prod
    unit_dir = prod.sandbox.unit_dir
    legacy_text = (unit_dir / PROD_LEGACY).read_text()
    result = cut_over(prod, "--takeover", PROD_LEGACY, "B1",
                      extra_env={"ALIVE_SWITCH_TEST_TAKEOVER_FAIL": "start_router"})
    print(result.report("takeover failing after the stop (restored)"))
    assert result.done.returncode == 3, result.done.stdout + result.done.stderr
    assert f"{PROD_LEGACY} was restored" in result.done.stderr
    assert only_stop_failures(result.tally), result.tally.summary()
    wait_for("legacy serving again", lambda: build_on(P_LISTEN) == "legacy")
    assert (unit_dir / PROD_LEGACY).read_text() == legacy_text
    assert (unit_dir / f"{PROD_LEGACY}.d/legacy.conf").exists(), "its drop-in is back"
    assert prod.sandbox.systemctl("is-enabled", PROD_LEGACY).stdout.strip() == "enabled"
    assert not (unit_dir / "rh-prod.socket").exists()
    assert prod.show("rh-prod.socket", "LoadState") == "not-found"


def test_a_takeover_killed_before_its_cut_over_is_undone_by_the_next_command(
        envs: Envs) -> None:
    prod = envs.prod
    result = cut_over(prod, "--takeover", PROD_LEGACY, "B1",
                      extra_env={"ALIVE_SWITCH_TEST_TAKEOVER_KILL": "commit"})
    assert result.done.returncode in (-9, 137), result.done.stdout + result.done.stderr
    assert result.tally.failed == 0, "the legacy unit served throughout"
    assert prod.show(prod.unit("blue"), "ActiveState") == "active", "killed after health"
    assert prod.sandbox.systemctl("is-enabled", PROD_LEGACY).stdout.strip() == "disabled"
    done = prod.cli("deploy", "prod", "B2")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "ended before its cut-over: undoing it" in done.stdout
    assert "interrupted takeover was undone" in done.stderr
    assert prod.show(prod.unit("blue"), "ActiveState") == "inactive"
    assert prod.sandbox.systemctl("is-enabled", PROD_LEGACY).stdout.strip() == "enabled"
    assert build_on(P_LISTEN) == "legacy"
    assert last_record(prod)["takeover"]["legacy"] == "restored"  # type: ignore[index]


def test_a_takeover_killed_in_its_cut_over_is_finished_by_pid_1_and_the_next_command(
        envs: Envs) -> None:
    prod = envs.prod
    unit_dir = prod.sandbox.unit_dir
    result = cut_over(prod, "--takeover", PROD_LEGACY, "B1",
                      extra_env={"ALIVE_SWITCH_TEST_TAKEOVER_KILL": "cut_over"})
    print(result.report("takeover whose CLI was SIGKILLed as the cut-over began"))
    assert result.done.returncode in (-9, 137), result.done.stdout + result.done.stderr
    assert only_stop_failures(result.tally), result.tally.summary()
    assert result.window < GAP_LIMIT, result.report("too long")
    wait_for("blue serving", lambda: build_on(P_LISTEN) == "B1")
    assert prod.show("rh-prod-takeover.service", "ActiveState") == "active", "the stand-in"
    assert prod.status_json()["takeover"] == PROD_LEGACY
    assert "did not finish" in prod.ok("status", "prod")
    out = prod.ok("deploy", "prod", "B2")
    assert "ended after its cut-over: completing it" in out
    assert build_on(P_LISTEN) == "B2"
    assert (unit_dir / PROD_LEGACY).read_text().startswith("# Rendered by alive-switch")
    assert not (unit_dir / "rh-prod-takeover.service").exists()
    assert not (prod.sandbox.state_dir / "rh-prod/takeover/intent.json").exists()
    assert prod.status_json()["takeover"] is None
    assert prod.sandbox.systemctl("is-enabled", "rh-prod.socket").stdout.strip() == "enabled"
    # Back to the seed's situation for the next test: a legacy unit serving the port.
    prod.ok("uninstall", "prod", "--purge")
    start_legacy(prod, PROD_LEGACY, dropin="[Service]\nEnvironment=LEGACY_DROPIN=1\n")


def test_takeover_of_the_unit_with_the_routers_name_under_load(envs: Envs) -> None:
    prod = envs.prod
    unit_dir = prod.sandbox.unit_dir
    legacy_text = (unit_dir / PROD_LEGACY).read_text()
    result = cut_over(prod, "--takeover", PROD_LEGACY, "B1")
    print(result.report(f"takeover of {PROD_LEGACY} (the router's name)"))
    assert result.done.returncode == 0, result.done.stdout + result.done.stderr
    assert only_stop_failures(result.tally), result.tally.summary()
    assert result.window < GAP_LIMIT, result.report("too long")
    swap = step_seconds(result.done.stdout, "swap_router")
    print(f"swap_router (no connection refused meanwhile) {swap * 1000:.0f} ms")
    serves_blue(prod, "B1")
    assert (unit_dir / PROD_LEGACY).read_text().startswith("# Rendered by alive-switch")
    assert not (unit_dir / f"{PROD_LEGACY}.d").exists(), "the legacy drop-in was set aside"
    backup = prod.sandbox.state_dir / "rh-prod/takeover"
    assert (backup / f"{PROD_LEGACY}.bak").read_text() == legacy_text
    assert (backup / f"{PROD_LEGACY}.d/legacy.conf").exists()
    environ = prod.sandbox.run("cat", f"/proc/{prod.show(PROD_LEGACY, 'MainPID')}/environ")
    assert "LEGACY_DROPIN" not in environ.stdout, "the router runs without the legacy drop-in"


# ---------------------------------------------------------------- hooks

def last_record(env: Env) -> dict[str, object]:
    lines = (env.sandbox.state_dir / env.prefix / "history.jsonl").read_text().splitlines()
    return dict(json.loads(lines[-1]))


def test_pre_switch_failure_aborts_and_the_old_color_keeps_serving(envs: Envs) -> None:
    prod = envs.prod
    envs.configure(prod_extra="pre_switch = \"/bin/sh -c 'echo migrating $COLOR $PORT "
                              "$ALIVE_SWITCH_BUILD; exit 7'\"")
    blue_pid = prod.show(prod.unit("blue"), "MainPID")
    done = prod.cli("deploy", "prod", "B2")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "pre_switch hook failed (exit 7)" in done.stderr
    assert f"pre_switch: migrating green {P_GREEN} B2" in done.stdout
    assert build_on(P_LISTEN) == "B1"
    assert prod.show(prod.unit("blue"), "MainPID") == blue_pid, "blue untouched"
    assert prod.show(prod.unit("green"), "ActiveState") == "inactive", "green stopped"
    (hook,) = last_record(prod)["hooks"]  # type: ignore[misc]
    assert hook["outcome"] == "exit 7"
    assert hook["output"] == [f"migrating green {P_GREEN} B2"]
    journal = prod.sandbox.run("journalctl", "--no-pager", "-o", "cat", "-t",
                               "alive-switch-hook").stdout
    assert f"migrating green {P_GREEN} B2" in journal
    assert "pre_switch hook: exit 7" in journal


def test_a_hook_that_hangs_is_killed_at_hook_timeout(envs: Envs) -> None:
    prod = envs.prod
    envs.configure(prod_extra='pre_switch = "/bin/sleep 60"\nhook_timeout = 1')
    began = time.monotonic()
    done = prod.cli("deploy", "prod", "B2")
    took = time.monotonic() - began
    assert done.returncode == 3, done.stdout + done.stderr
    assert "timed out after 1 s" in done.stderr
    assert took < 15
    assert build_on(P_LISTEN) == "B1"
    assert "sleep 60" not in prod.sandbox.run("ps", "-eo", "args").stdout


def test_post_switch_failure_is_reported_and_traffic_stays(envs: Envs) -> None:
    prod = envs.prod
    envs.configure(prod_extra="post_switch = \"/bin/sh -c 'echo cache not warmed >&2; "
                              "exit 2'\"")
    done = prod.cli("deploy", "prod", "B2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning: post_switch hook failed (exit 2)" in done.stdout
    assert build_on(P_LISTEN) == "B2"
    (hook,) = last_record(prod)["hooks"]  # type: ignore[misc]
    assert (hook["outcome"], hook["output"]) == ("exit 2", ["cache not warmed"])
    envs.configure()


# ---------------------------------------------------------------- config changes, status

def test_a_changed_environment_is_reported_and_flagged_until_restart(envs: Envs) -> None:
    prod = envs.prod
    envs.configure(prod_extra='environment = { FEATURE = "on" }')
    try:
        out = prod.ok("install", "prod")
        assert "changed: rh-prod@.service" in out
        assert "takes effect on the next start of a color" in out
        info = prod.status_json()
        assert info["live"] == "green"
        assert info["colors"]["green"]["restart_pending"] is True
        assert "restart pending: green started before the config changed" in prod.ok(
            "status", "prod")
        # Blue runs B1 on standby: a deploy of B1 would reuse it as it is. B3 starts it afresh.
        prod.ok("deploy", "prod", "B3")
        info = prod.status_json()
        assert info["colors"]["blue"]["restart_pending"] is False
        assert info["colors"]["green"]["restart_pending"] is True, "green: standby, old config"
        assert get(P_BLUE, "/env")[1]["FEATURE"] == "on"
    finally:
        envs.configure()
        prod.ok("install", "prod")


def test_status_without_env_lists_every_environment(envs: Envs) -> None:
    out = envs.prod.ok("status")
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["ENV", "LIVE", "BUILD", "ROUTER"]
    assert any(row.split()[:3] == ["prod", "blue", "B3"] for row in rows), out
    assert any(row.split()[:3] == ["stage", "blue", "B1"] for row in rows), out
    listed = json.loads(envs.prod.ok("status", "--json"))
    assert listed["schema"] == 1
    assert [e["env"] for e in listed["environments"]] == ["prod", "stage"]


# ---------------------------------------------------------------- logs

def test_logs_reads_the_environments_units(envs: Envs) -> None:
    prod = envs.prod
    everything = prod.ok("logs", "prod", "--lines", "200")
    assert "alive-switch router of rh prod" in everything
    assert "serving build B1 color blue" in everything
    green = prod.ok("logs", "prod", "green")
    assert "color green" in green and "color blue" not in green


def test_logs_follow_keeps_running(envs: Envs) -> None:
    prod = envs.prod
    proc = prod.sandbox.popen(CLI, "--config", prod.config, "logs", "prod", "-f", "-n", "5",
                              cwd=prod.home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        assert proc.poll() is None, "journalctl --follow is still running"
    finally:
        kill_group(proc)
        out = proc.stdout.read() if proc.stdout else ""
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    assert out.strip(), "it printed the last entries first"


# ---------------------------------------------------------------- prune

def test_prune_keeps_the_newest_and_every_build_in_use(envs: Envs) -> None:
    prod = envs.prod
    old = time.time() - 86400
    for n in range(4):
        build = prod.make_build(f"old{n}")
        (build / "payload").write_bytes(os.urandom(100_000))
        os.utime(build, (old + n, old + n))
    # The builds in use get old mtimes too: only their role must keep them.
    for name in ("B1", "B2", "B3"):
        os.utime(prod.builds / name, (old - 10, old - 10))
    before = sorted(p.name for p in prod.builds.iterdir())
    dry = prod.ok("prune", "prod", "--keep", "1", "--dry-run")
    assert "would remove" in dry
    assert sorted(p.name for p in prod.builds.iterdir()) == before
    out = prod.ok("prune", "prod", "--keep", "1")
    left = sorted(p.name for p in prod.builds.iterdir())
    print(f"\nprune: {out.strip().splitlines()[-1]}; left {left}")
    assert "B3" in left and "B2" in left, "live and standby stay"
    assert not {"old0", "old3", "B1"} & set(left)
    assert len(left) == 3  # the newest (bad/legacy, made at set-up) + live + standby
    freed = int(out.split("freed ")[1].split()[0])
    assert freed >= 400_000
    assert "kept B3: live on blue" in out
    assert build_on(P_LISTEN) == "B3"


# ---------------------------------------------------------------- uninstall

def test_uninstall_removes_one_environment_and_purge_its_state(envs: Envs) -> None:
    stage, prod = envs.stage, envs.prod
    out = stage.ok("uninstall", "stage")
    assert "stopped rh-stage.socket" in out
    assert "removed /etc/systemd/system/rh-stage.socket" in out
    assert not listening(S_LISTEN)
    assert not list(stage.sandbox.unit_dir.glob("rh-stage*"))
    assert stage.show("rh-stage.socket", "LoadState") == "not-found"
    assert stage.show(stage.unit("blue"), "ActiveState") == "inactive"
    assert (stage.sandbox.state_dir / "rh-stage/state.json").exists(), "state kept"
    assert (stage.sandbox.unit_dir / STAGE_LEGACY).exists(), "the legacy file is not ours"
    assert build_on(P_LISTEN) == "B3", "prod untouched"
    assert "no unit of rh-stage is installed" in stage.ok("uninstall", "stage")
    purged = stage.ok("uninstall", "stage", "--purge")
    assert "the takeover backup" in purged
    assert not (stage.sandbox.state_dir / "rh-stage").exists()
    assert (prod.sandbox.state_dir / "rh-prod/state.json").exists()
    assert build_on(P_LISTEN) == "B3"
