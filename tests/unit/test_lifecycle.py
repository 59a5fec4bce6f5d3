"""Pure and near-pure pieces of issue 8 against fakes: deploy hooks (timeout, output in
history, the color's environment), build pruning, the takeover plan and its undo, uninstall
and logs. tests/system/test_real_hosts.py proves the same against a real systemd."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from switcher import config, render, state
from switcher.errors import AbortedError, NeedsRepairError, UsageError
from switcher.lock import Lock
from switcher.model import Color, Pending, Phase, State
from switcher.ops import checks, install, lifecycle, status
from switcher.ops.deploy import Deployer
from switcher.ops.lifecycle import BuildDir, protected_builds, select_prunable
from switcher.ops.takeover import runner as takeover
from switcher.ops.takeover.runner import TEST_FAIL_VAR, Gap, Legacy, Plan, Step, Takeover, port_free
from switcher.routerctl import FakeRouter
from switcher.systemd import FakeSystemd
from tests.ports import port_block

LISTEN, BLUE, GREEN = port_block(__name__, 3)


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def health_servers() -> Iterator[None]:
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", p), Healthy) for p in (BLUE, GREEN)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def no_host_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket and port checks read the real host; the health servers hold the ports."""
    monkeypatch.setattr(checks, "CHECKS", [c for c in checks.CHECKS
                                           if c not in (checks.socket_held,
                                                        checks.idle_port_free)])
    monkeypatch.setattr(takeover, "PREFLIGHT", tuple(c for c in takeover.PREFLIGHT
                                                     if c is not checks.idle_port_free))


def write_config(tmp_path: Path, extra: str = "", also: str = "") -> config.Config:
    builds = tmp_path / "builds"
    for name in ("b1", "b2"):
        (builds / name).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "c.toml"
    path.write_text(f"""
app = "lc"
state_dir = "{tmp_path / 'state'}"
[env.prod]
listen = {LISTEN}
ports = {{ blue = {BLUE}, green = {GREEN} }}
builds = "{builds}"
exec = "/usr/bin/python3 server.py"
environment = {{ FROM_CONFIG = "yes" }}
drain = 0.1
watch = 0.1
standby = 30
{extra}
[env.prod.health]
path = "/h"
timeout = 1
interval = 0.05
{also}""")
    return config.load(str(path))


def write_config_path_free() -> config.Config:
    """A config for pure functions: nothing on disk is read but the file itself."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_config(Path(tmp))


def deployer(tmp_path: Path, extra: str = "") -> tuple[Deployer, FakeSystemd, list[str]]:
    cfg = write_config(tmp_path, extra)
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True)
    sd, said = FakeSystemd(), []
    return (Deployer(cfg, env, sd, FakeRouter(), say=said.append, run_dir=tmp_path / "run"),
            sd, said)


# ---------------------------------------------------------------- hooks

@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_pre_switch_failure_aborts_with_its_output_in_history(tmp_path: Path) -> None:
    d, sd, said = deployer(tmp_path, extra='pre_switch = "/bin/sh -c \'echo migrating $COLOR '
                                             '$PORT $ALIVE_SWITCH_BUILD $FROM_CONFIG; exit 7\'"')
    with pytest.raises(AbortedError, match=r"pre_switch hook failed \(exit 7\)") as caught:
        d.deploy("b1", force=False, dry_run=False)
    assert caught.value.exit_code == 3
    assert sd.units["lc-prod@blue.service"].active == "inactive", "the new color is stopped"
    assert d.load_state().active is None
    record = state.read_history(d.env_dir)[-1]
    assert record["outcome"] == "failed"
    (hook,) = record["hooks"]
    assert (hook["name"], hook["outcome"]) == ("pre_switch", "exit 7")
    assert hook["output"] == [f"migrating blue {BLUE} b1 yes"]
    assert f"    pre_switch: migrating blue {BLUE} b1 yes" in said


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_post_switch_failure_is_a_warning_and_traffic_stays(tmp_path: Path) -> None:
    d, _, said = deployer(tmp_path, extra='post_switch = "/bin/false"')
    outcome = d.deploy("b1", force=False, dry_run=False)
    assert outcome.ok
    assert d.load_state().active == Color.blue
    assert any("post_switch hook failed (exit 1)" in w for w in outcome.warnings)
    assert any(line.startswith("warning: post_switch hook failed") for line in said)
    assert state.read_history(d.env_dir)[-1]["hooks"][0]["outcome"] == "exit 1"


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_hook_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    d, sd, _ = deployer(tmp_path, extra=f'pre_switch = "/bin/sh -c \'echo started; '
                                        f'sleep 30 & echo $! > {pidfile}; wait\'"\n'
                                        'hook_timeout = 0.5')
    with pytest.raises(AbortedError, match=r"timed out after 0.5 s"):
        d.deploy("b1", force=False, dry_run=False)
    hook = state.read_history(d.env_dir)[-1]["hooks"][0]
    assert hook["output"] == ["started"]
    assert hook["seconds"] < 5
    child = int(pidfile.read_text())
    assert not Path(f"/proc/{child}").exists() or \
        Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", "the hook's child was killed"
    assert sd.units["lc-prod@blue.service"].active == "inactive"


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_no_hooks_configured_records_none(tmp_path: Path) -> None:
    d, _, _ = deployer(tmp_path)
    outcome = d.deploy("b1", force=False, dry_run=False)
    assert outcome.hooks == []
    assert state.read_history(d.env_dir)[-1]["hooks"] == []


# ---------------------------------------------------------------- prune

def test_prune_selection_keeps_the_newest_and_every_protected_build() -> None:
    found = [BuildDir(name, mtime) for name, mtime in
             (("b1", 1), ("b2", 2), ("b10", 2), ("b3", 3), ("live", 0), ("old", 0.5))]
    doomed, kept = select_prunable(found, 2, {"live": "live on blue (prod)"})
    assert [b.name for b in doomed] == ["old", "b1", "b2"], "oldest first; b10 > b2 at a tie"
    assert kept == {"b3": "among the newest", "b10": "among the newest",
                    "live": "live on blue (prod)"}
    doomed, kept = select_prunable(found, 0, {"live": "x", "b3": "y"})
    assert {b.name for b in doomed} == {"b1", "b2", "b10", "old"}
    assert select_prunable(found, 10, {})[0] == []


def test_protected_builds_name_live_standby_pending_and_links() -> None:
    current = State(active=Color.green, previous=Color.blue,
                    builds={Color.blue: "b1", Color.green: "b2"},
                    pending=Pending(Color.blue, Phase.start, "d", "b3"))
    why = protected_builds("prod", current, {Color.blue: "b3", Color.green: "b4"})
    assert set(why) == {"b1", "b2", "b3", "b4"}
    assert why["b2"] == "live on green (prod)"
    assert why["b1"] == "standby/previous on blue (prod)"
    assert why["b3"].startswith("pending deploy to blue")


def test_prune_never_removes_a_build_another_environment_uses(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, also=f"""
[env.stage]
listen = {LISTEN + 100}
ports = {{ blue = {BLUE + 100}, green = {GREEN + 100} }}
builds = "{tmp_path / 'builds'}"
exec = "/usr/bin/python3 server.py"
[env.stage.health]
path = "/h"
""")
    builds = tmp_path / "builds"
    for n, name in enumerate(("b1", "b2", "b3", "b4", "b5")):
        (builds / name).mkdir(parents=True, exist_ok=True)
        (builds / name / "data").write_bytes(b"x" * 10_000)
        os.utime(builds / name, (1000 + n, 1000 + n))
    (builds / "current").symlink_to(builds / "b1")  # a link inside builds is never pruned
    stage_dir = cfg.env_dir(cfg.env["stage"])
    stage_dir.mkdir(parents=True)
    state.save_state(stage_dir, State(active=Color.blue, builds={Color.blue: "current",
                                                                 Color.green: None}))
    said: list[str] = []
    result = lifecycle.prune(cfg, cfg.env["prod"], 1, dry_run=False, say=said.append,
                             lock_for=lambda e, what: Lock(tmp_path / f"{e.name}.lock",
                                                                 what))
    assert sorted(p.name for p in builds.iterdir()) == ["b1", "b5", "current"]
    assert [name for name, _ in result.removed] == ["b2", "b3", "b4"]
    assert result.freed >= 30_000
    assert "kept b1: live on blue (stage), through current" in said
    assert said[-1].startswith(f"freed {result.freed} bytes")


def test_prune_dry_run_removes_nothing_and_refuses_unreadable_state(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    env = cfg.env["prod"]
    lock_for = lambda e, what: Lock(tmp_path / "l.lock", what)  # noqa: E731
    said: list[str] = []
    result = lifecycle.prune(cfg, env, 0, dry_run=True, say=said.append, lock_for=lock_for)
    assert {name for name, _ in result.removed} == {"b1", "b2"}
    assert (tmp_path / "builds/b1").is_dir() and said[-1].startswith("would free")
    cfg.env_dir(env).mkdir(parents=True)
    (cfg.env_dir(env) / state.STATE).write_text("{not json")
    with pytest.raises(NeedsRepairError, match="nothing was pruned"):
        lifecycle.prune(cfg, env, 0, dry_run=False, say=said.append, lock_for=lock_for)
    assert (tmp_path / "builds/b1").is_dir()


# ---------------------------------------------------------------- uninstall and logs

def test_uninstall_removes_only_its_own_files_and_units(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    env = cfg.env["prod"]
    unit_dir = tmp_path / "units"
    install.write_units(render.render(cfg, env), unit_dir)
    (unit_dir / "lc-prod@blue.service.d/operator.conf").write_text("[Service]\nNice=5\n")
    (unit_dir / "other-prod.socket").write_text("# not ours\n")
    sd = FakeSystemd()
    for unit in ("lc-prod.socket", "lc-prod.service", "lc-prod@blue.service"):
        sd.start(unit)
        sd.enable(unit)
    cfg.env_dir(env).mkdir(parents=True)
    said: list[str] = []
    lifecycle.uninstall(cfg, env, sd, unit_dir, purge=False, say=said.append,
                        lock=Lock(tmp_path / "l.lock", "uninstall"))
    stops = [unit for call, unit in sd.calls if call == "stop"]
    assert stops[0] == "lc-prod.socket", "the socket stops first"
    assert not any(sd.units[u].enabled for u in sd.units)
    assert sorted(p.relative_to(unit_dir).as_posix() for p in unit_dir.rglob("*")) == [
        "lc-prod@blue.service.d", "lc-prod@blue.service.d/operator.conf", "other-prod.socket"]
    assert any("kept" in line and "operator" not in line and ".d" in line for line in said)
    assert ("cancel", "lc-prod-retire-blue") in sd.calls
    assert state.read_history(cfg.env_dir(env))[-1]["kind"] == "uninstall"
    lifecycle.uninstall(cfg, env, sd, unit_dir, purge=True, say=said.append,
                        lock=Lock(tmp_path / "l.lock", "uninstall"))
    assert not cfg.env_dir(env).exists()


def test_journal_argv() -> None:
    cfg = write_config_path_free()
    env = cfg.env["prod"]
    assert lifecycle.journal_argv(cfg, env, None, follow=False, lines=None) == [
        "journalctl", "--unit=lc-prod.socket", "--unit=lc-prod.service",
        "--unit=lc-prod@blue.service", "--unit=lc-prod@green.service"]
    assert lifecycle.journal_argv(cfg, env, Color.green, follow=True, lines=20) == [
        "journalctl", "--unit=lc-prod@green.service", "--lines=20", "--follow"]


# ---------------------------------------------------------------- install reports

def test_install_says_what_changed_and_when_it_takes_effect(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    unit_dir, sd = tmp_path / "units", ShowFake({"lc-prod.socket": {"Listen":
                                                                    f"[::]:{LISTEN} (Stream)"}})
    said: list[str] = []
    install.install(cfg, cfg.env["prod"], sd, unit_dir, rebind=False, dry_run=False,
                    say=said.append)
    assert f"wrote {unit_dir}/lc-prod@.service (new)" in said
    sd.start("lc-prod@blue.service")
    cfg = write_config(tmp_path, extra='user = "nobody"')
    said.clear()
    install.install(cfg, cfg.env["prod"], sd, unit_dir, rebind=False, dry_run=False,
                    say=said.append)
    assert said[0] == f"changed: lc-prod@.service (wrote {unit_dir}/lc-prod@.service)"
    assert "takes effect on the next start of a color" in said[1]
    assert "lc-prod@blue.service" in said[1]


def test_install_refuses_while_another_process_holds_the_port(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    with socket.create_server(("127.0.0.1", LISTEN)):
        holders = install.port_holders(LISTEN)
        assert [h.pid for h in holders] == [os.getpid()]
        with pytest.raises(UsageError, match="EADDRINUSE") as caught:
            install.install(cfg, cfg.env["prod"], FakeSystemd(), tmp_path / "units",
                            rebind=False, dry_run=False, say=print)
        assert "--takeover" in caught.value.hint
    assert not (tmp_path / "units").exists(), "nothing was written"


# ---------------------------------------------------------------- takeover

def plan_for(unit: str, *, active: bool = True, enabled: bool = True) -> Plan:
    legacy = Legacy(unit, active, enabled, f"/etc/systemd/system/{unit}", ())
    return Plan("prod", legacy, "b1", render.unit_names("lc", "prod"), "lc-prod@blue.service",
                "9000", Path("/var/lib/alive-switch/lc-prod/takeover"))


def test_takeover_plan_with_the_routers_name_hands_over_from_a_stand_in() -> None:
    p = plan_for("lc-prod.service")
    steps = [step for step, _ in p.steps()]
    assert steps.index(Step.health) < steps.index(Step.disable_legacy) \
        < steps.index(Step.commit) < steps.index(Step.cut_over) \
        < steps.index(Step.start_router) < steps.index(Step.swap_router)
    write_units = dict(p.steps())[Step.write_units]
    assert "lc-prod.service stays lc-prod.service's file" in write_units
    assert p.first_router == p.stand_in == "lc-prod-takeover.service"


def test_takeover_plan_of_another_unit_starts_the_router_right_after_the_cut_over() -> None:
    p = plan_for("legacy.service")
    steps = [step for step, _ in p.steps()]
    assert Step.swap_router not in steps
    assert steps[steps.index(Step.cut_over) + 1] == Step.start_router
    assert p.first_router == "lc-prod.service"
    quiet = [step for step, _ in plan_for("legacy.service", active=False,
                                          enabled=False).steps()]
    assert Step.cut_over not in quiet and Step.disable_legacy not in quiet
    assert Step.bind in quiet
    assert "is restored" in plan_for("legacy.service").describe()[-1]


def test_gap_line() -> None:
    assert "no probe was refused" in Gap(probes=10, bind_after=0.03).line()
    gap = Gap(refused=5, probes=50, first=1.0, last=1.04, bind_after=0.06)
    assert gap.line() == ("gap: the public port refused connections for 42 ms (5 of 50 probes,"
                          " one every 2 ms); stop → socket bound 60 ms")


class ShowFake(FakeSystemd):
    """FakeSystemd that also shows the properties it is given (FragmentPath, Listen…)."""

    def __init__(self, extra: dict[str, dict[str, str]]) -> None:
        super().__init__()
        self.extra = extra

    def show(self, unit: str, *props: str) -> dict[str, str]:
        return {**super().show(unit, *props),
                **{p: v for p, v in self.extra.get(unit, {}).items() if p in props}}


def takeover_world(tmp_path: Path, legacy: str) -> tuple[Deployer, ShowFake, Path]:
    d, _, _ = deployer(tmp_path)
    shutil.rmtree(d.env_dir)  # a host that never ran alive-switch
    unit_dir = tmp_path / "units"
    (unit_dir / f"{legacy}.d").mkdir(parents=True)
    (unit_dir / legacy).write_text("[Service]\nExecStart=/usr/bin/legacy\n")
    (unit_dir / f"{legacy}.d/env.conf").write_text("[Service]\nEnvironment=A=1\n")
    sd = ShowFake({legacy: {"FragmentPath": str(unit_dir / legacy),
                            "DropInPaths": str(unit_dir / f"{legacy}.d/env.conf")}})
    sd.start(legacy)
    sd.enable(legacy)
    d.sd = sd
    return d, sd, unit_dir


@pytest.mark.usefixtures("no_host_checks")
def test_a_takeover_whose_build_fails_to_start_changes_nothing(tmp_path: Path) -> None:
    d, sd, unit_dir = takeover_world(tmp_path, "lc-prod.service")
    sd.fail_start.add("lc-prod@blue.service")
    before = sorted(p.as_posix() for p in unit_dir.rglob("*"))
    with pytest.raises(AbortedError, match="nothing was changed") as caught:
        Takeover(d, unit_dir).run("lc-prod", "b1", dry_run=False)
    assert caught.value.exit_code == 3
    assert sorted(p.as_posix() for p in unit_dir.rglob("*")) == before
    assert (unit_dir / "lc-prod.service").read_text().startswith("[Service]")
    assert not d.env_dir.exists()
    assert ("stop", "lc-prod.service") not in sd.calls
    assert sd.units["lc-prod.service"].enabled and sd.units["lc-prod.service"].active == "active"
    assert sd.units["lc-prod@blue.service"].active == "inactive"


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_a_takeover_of_the_routers_name_replaces_its_file_and_drop_ins(tmp_path: Path) -> None:
    d, sd, unit_dir = takeover_world(tmp_path, "lc-prod.service")
    legacy_text = (unit_dir / "lc-prod.service").read_text()
    result = Takeover(d, unit_dir).run("lc-prod.service", "b1", dry_run=False)
    calls = [c for c in sd.calls if c[0] in ("stop", "start", "daemon-reload")]
    stop = calls.index(("stop", "lc-prod.service"))
    # PID 1's cut-over binds the socket at once; the stand-in serves until the swap
    assert calls[stop + 1:stop + 3] == [("start", "lc-prod.socket"),
                                        ("stop", "lc-prod-takeover.service")]
    assert calls[-3:] == [("daemon-reload", ""), ("stop", "lc-prod-takeover.service"),
                          ("start", "lc-prod.service")]
    assert (unit_dir / "lc-prod.service").read_text().startswith("# Rendered by alive-switch")
    assert "Service=lc-prod.service" in (unit_dir / "lc-prod.socket").read_text()
    assert not (unit_dir / "lc-prod-takeover.service").exists()
    assert not (d.env_dir / "takeover/intent.json").exists()
    assert not (unit_dir / "lc-prod.service.d").exists()
    backup = d.env_dir / "takeover"
    assert (backup / "lc-prod.service.bak").read_text() == legacy_text
    assert (backup / "lc-prod.service.d/env.conf").exists()
    assert d.load_state().active == Color.blue and d.router.status()["serving"] == "blue"
    assert all(sd.units[u].enabled for u in ("lc-prod.socket", "lc-prod.service",
                                             "lc-prod@blue.service"))
    assert result.gap.bind_after > 0
    assert state.read_history(d.env_dir)[-1]["takeover"]["legacy"] == "replaced"


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_a_takeover_failing_after_the_stop_restores_the_legacy_unit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, sd, unit_dir = takeover_world(tmp_path, "legacy.service")
    monkeypatch.setenv(TEST_FAIL_VAR, "start_router")
    with pytest.raises(AbortedError, match=r"legacy\.service was restored"):
        Takeover(d, unit_dir).run("legacy.service", "b1", dry_run=False)
    assert sd.units["legacy.service"].active == "active"
    assert sd.units["legacy.service"].enabled
    assert sd.calls.index(("stop", "lc-prod.socket")) < len(sd.calls) - 1
    assert sd.units["lc-prod.socket"].active == "inactive"
    assert sorted(p.name for p in unit_dir.iterdir()) == ["legacy.service", "legacy.service.d"]
    assert not d.env_dir.exists()


def test_port_free_sees_a_listener_on_any_address() -> None:
    with socket.create_server(("127.0.0.1", LISTEN)):
        assert not port_free(str(LISTEN), LISTEN), "[::] dual-stack overlaps 127.0.0.1"
        assert not port_free(f"127.0.0.1:{LISTEN}", LISTEN)
    assert port_free(str(LISTEN), LISTEN)


# ---------------------------------------------------------------- status of every env

def env_info(env: str, live: str | None, *, pending_restart: bool = False) -> dict[str, Any]:
    def color(name: str) -> dict[str, Any]:
        running = name == live
        return {"state": "active" if running else "inactive", "role": "live" if running
                else "idle", "health": "ok", "restart_pending": running and pending_restart}

    return {"app": "lc", "env": env, "live": live, "live_build": "b1" if live else None,
            "router": {"active": "active"}, "colors": {"blue": color("blue"),
                                                       "green": color("green")},
            "last": {"kind": "deploy", "outcome": "ok"} if live else None,
            "state_error": None, "pending": None}


def test_status_overview_has_one_line_per_environment_and_notes() -> None:
    lines = status.render_overview([env_info("prod", "blue", pending_restart=True),
                                    env_info("stage", None)])
    assert lines[0].split() == ["ENV", "LIVE", "BUILD", "ROUTER", "BLUE", "GREEN", "LAST"]
    assert lines[1].split() == ["prod", "blue", "b1", "active", "live", "ok", "inactive",
                                "deploy", "ok"]
    assert lines[2].split() == ["stage", "-", "-", "active", "inactive", "inactive", "-"]
    assert lines[3] == "note: lc-prod: restart pending: blue started before the config changed"


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_a_failure_after_the_cut_over_is_a_warning_not_a_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, sd, unit_dir = takeover_world(tmp_path, "legacy.service")
    monkeypatch.setenv(TEST_FAIL_VAR, "enable")
    result = Takeover(d, unit_dir).run("legacy.service", "b1", dry_run=False)
    assert result.warnings and "injected failure at step enable" in result.warnings[0]
    assert sd.units["legacy.service"].active == "inactive"
    assert d.load_state().active == Color.blue
    assert state.read_history(d.env_dir)[-1]["outcome"] == "ok"


# ---------------------------------------------------------------- a takeover whose CLI died

def die(*_args: object, **_kwargs: object) -> None:
    raise SystemExit("killed")  # stands for SIGKILL: nothing of the CLI runs after it


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_a_later_command_completes_a_takeover_killed_after_its_cut_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, sd, unit_dir = takeover_world(tmp_path, "lc-prod.service")
    with monkeypatch.context() as m:
        m.setattr(Takeover, "complete", die)
        with pytest.raises(SystemExit):
            Takeover(d, unit_dir).run("lc-prod.service", "b1", dry_run=False)
    assert (d.env_dir / "takeover/intent.json").exists()
    assert sd.units["lc-prod-takeover.service"].active == "active", "the stand-in serves"
    current, _ = d.begin()
    assert current.active == Color.blue
    assert not (d.env_dir / "takeover/intent.json").exists()
    assert (unit_dir / "lc-prod.service").read_text().startswith("# Rendered by alive-switch")
    assert not (unit_dir / "lc-prod-takeover.service").exists()
    assert sd.units["lc-prod-takeover.service"].active == "inactive"
    assert all(sd.units[u].enabled for u in ("lc-prod.socket", "lc-prod.service",
                                             "lc-prod@blue.service"))
    record = state.read_history(d.env_dir)[-1]
    assert record["outcome"] == "ok" and "completed by a later command" in record["warnings"][0]


def killed_before_the_cut_over(d: Deployer, unit_dir: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A takeover of legacy.service whose CLI died after its commit, before the cut-over."""
    with monkeypatch.context() as m:
        m.setattr(Takeover, "_cut_over", die)
        m.setattr(Takeover, "_restore", lambda *_a: None)
        with pytest.raises(SystemExit):
            Takeover(d, unit_dir).run("legacy.service", "b1", dry_run=False)


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_a_later_command_undoes_a_takeover_killed_before_its_cut_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, sd, unit_dir = takeover_world(tmp_path, "legacy.service")
    killed_before_the_cut_over(d, unit_dir, monkeypatch)
    assert d.load_state().active == Color.blue, "committed before the cut-over"
    assert not sd.units["legacy.service"].enabled
    with pytest.raises(AbortedError, match="interrupted takeover was undone"):
        d.deploy("b2", force=False, dry_run=False)
    assert sd.units["legacy.service"].active == "active"
    assert sd.units["legacy.service"].enabled
    assert sd.units["lc-prod@blue.service"].active == "inactive"
    assert d.load_state().active is None
    assert not (d.env_dir / "takeover/intent.json").exists()
    assert state.read_history(d.env_dir)[-1]["takeover"]["legacy"] == "restored"


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_the_takeover_run_again_undoes_the_killed_one_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, sd, unit_dir = takeover_world(tmp_path, "legacy.service")
    killed_before_the_cut_over(d, unit_dir, monkeypatch)
    assert not sd.units["legacy.service"].enabled, "the killed run had disabled it"
    result = Takeover(d, unit_dir).run("legacy.service", "b1", dry_run=False)
    assert result.plan.legacy.enabled, "read after the undo: it was enabled before all this"
    assert result.legacy == "replaced" and d.load_state().active == Color.blue
    backup = json.loads((d.env_dir / "takeover/legacy.json").read_text())
    assert backup["was_enabled"] is True


def test_status_names_an_unfinished_takeover() -> None:
    info = {**env_info("prod", "blue"), "takeover": "legacy.service"}
    note = status.render_overview([info])[-1]
    assert note.startswith("note: lc-prod: a takeover of legacy.service did not finish")
    assert "the next deploy, rollback or install" in note
