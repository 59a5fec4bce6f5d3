"""The takeover (switcher/ops/takeover/): its plan, undo, the real cut-over against a fake systemd,
a killed run resumed. tests/system/test_real_hosts.py proves the same against a real systemd."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from switcher import state
from switcher.errors import AbortedError
from switcher.model import Color
from switcher.names import Names
from switcher.ops.deploy import Deployer
from switcher.ops.site import TAKEOVER_FAIL_VAR
from switcher.ops.takeover.runner import Gap, Legacy, Plan, Step, Takeover, port_free
from tests.unit.opskit import LISTEN, ShowFake, deployer

# ---------------------------------------------------------------- takeover

def plan_for(unit: str, *, active: bool = True, enabled: bool = True) -> Plan:
    legacy = Legacy(unit, active, enabled, f"/etc/systemd/system/{unit}", ())
    return Plan("prod", legacy, "b1", Names("lc", "prod"), "lc-prod@blue.service",
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
    monkeypatch.setenv(TAKEOVER_FAIL_VAR, "start_router")
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


@pytest.mark.usefixtures("health_servers", "no_host_checks")
def test_a_failure_after_the_cut_over_is_a_warning_not_a_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, sd, unit_dir = takeover_world(tmp_path, "legacy.service")
    monkeypatch.setenv(TAKEOVER_FAIL_VAR, "enable")
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


