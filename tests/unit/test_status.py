"""status of every environment and of an unfinished takeover (switcher/ops/status.py).
tests/system/test_real_hosts.py proves the same against a real systemd."""

from __future__ import annotations

import json
from typing import Any

from switcher.model import Color
from switcher.ops import status
from tests.fakes import FakeRouter, FakeSystemd, answers
from tests.unit.opskit import write_config

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


def test_status_names_an_unfinished_takeover() -> None:
    info = {**env_info("prod", "blue"), "takeover": "legacy.service"}
    note = status.render_overview([info])[-1]
    assert note.startswith("note: lc-prod: a takeover of legacy.service did not finish")
    assert "the next deploy, rollback or install" in note


# ---------------------------------------------------------------- the router's figures

def test_status_shows_each_colors_recent_figures_and_the_routers_start(tmp_path) -> None:
    cfg = write_config(tmp_path)
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True)
    sd, router = FakeSystemd(), FakeRouter(started_at=1_790_000_000.0)
    sd.start("lc-prod.service")
    router.recent = {Color.blue: answers(996, 4, timed=(900, 96, 4)),
                     Color.green: answers()}
    info = status.collect(cfg, env, sd, router)
    assert info["schema"] == 1
    assert info["router"]["started_at"] == 1_790_000_000.0
    assert info["colors"]["blue"]["recent"] == {
        "seconds": 60.0, "answers": 1000, "answers_per_s": 16.67, "failed": 4,
        "failure_share": 0.004, "p95_s": 0.0076}
    assert info["colors"]["green"]["recent"] == {
        "seconds": 60.0, "answers": 0, "answers_per_s": 0.0, "failed": 0,
        "failure_share": None, "p95_s": None}
    json.dumps(info)


def test_a_router_without_figures_leaves_them_null(tmp_path) -> None:
    class OldRouter(FakeRouter):
        def status(self, timeout: float = 5.0) -> dict[str, Any]:
            reply = super().status(timeout)
            return {k: v for k, v in reply.items()
                    if k not in ("started_at", "counters", "recent")}

    cfg = write_config(tmp_path)
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True)
    sd = FakeSystemd()
    sd.start("lc-prod.service")
    info = status.collect(cfg, env, sd, OldRouter())
    assert info["router"]["reachable"] and info["router"]["started_at"] is None
    assert info["colors"]["blue"]["recent"] is None is info["colors"]["green"]["recent"]


# ---------------------------------------------------------------- the router's pool

def test_status_shows_the_pool_as_the_router_says_else_as_configured(tmp_path) -> None:
    class PoolingRouter(FakeRouter):
        def status(self, timeout: float = 5.0) -> dict[str, Any]:
            return {**super().status(timeout),
                    "pool": {"size": 8, "idle_s": 1.5, "idle": {"blue": 3, "green": 0}}}

    cfg = write_config(tmp_path)
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True)
    sd = FakeSystemd()
    sd.start("lc-prod.service")
    told = status.collect(cfg, env, sd, PoolingRouter())["router"]["pool"]
    assert told == {"size": 8, "idle_s": 1.5, "idle": {"blue": 3, "green": 0}}
    configured = status.collect(cfg, env, sd, FakeRouter())["router"]["pool"]
    assert configured == {"size": 64, "idle_s": 2.0, "idle": None}


def test_direct_mode_says_whether_the_kernel_steers(tmp_path) -> None:
    cfg = write_config(tmp_path)
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True)
    sd = FakeSystemd()
    sd.start("lc-prod.service")
    for steering, line in ((True, "direct mode: the kernel steers IPv4 connections to the "
                                  "live color"),
                           (False, "direct mode: not steering (no live listener in the map): "
                                   "the router forwards every connection")):
        router = FakeRouter(direct={"families": ["ipv4"], "steering": steering})
        info = status.collect(cfg, env, sd, router)
        assert info["router"]["direct"]["steering"] is steering
        assert f"  {line}" in status.render_table(info)
