"""status of every environment and of an unfinished takeover (switcher/ops/status.py).
tests/system/test_real_hosts.py proves the same against a real systemd."""

from __future__ import annotations

from typing import Any

from switcher.ops import status

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
