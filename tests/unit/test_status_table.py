"""`alive-switch status ENV` as a table: the colors side by side, readable values."""

from __future__ import annotations

import time
from typing import Any

from switcher.ops import status


def info(**changes: Any) -> dict[str, Any]:
    now = time.time()
    color = {"unit": "", "state": "active", "sub": "running", "build": "b1", "pid": 1234,
             "memory_bytes": 31457280, "uptime_s": 812.4, "health": "ok", "inflight": 3,
             "role": "live"}
    base: dict[str, Any] = {
        "schema": 1, "app": "alive", "env": "production", "live": "blue", "live_build": "b1",
        "previous": "green", "pending": None, "state_error": None,
        "fallback": {"color": "green", "until": now + 42.4},
        "router": {"unit": "alive-production.service", "active": "active", "serving": "blue",
                   "reachable": True, "inflight": {"blue": 3, "green": 0}},
        "colors": {"blue": color, "green": {
            **color, "build": "b2", "pid": 99, "uptime_s": 7300, "inflight": 0,
            "role": "standby", "health": "failing: ConnectError: [Errno 111] Connection "
                                        "refused by the peer"}},
        "last": {"kind": "rollback", "build": "b1", "color": "blue", "outcome": "ok",
                 "phases": {"health": 0.5, "switching": 0.004, "watch": 1.0}, "time": now - 5},
    }
    return {**base, **changes}


def test_colors_side_by_side_with_readable_values() -> None:
    lines = status.render_table(info())
    assert lines[0] == "alive-production: blue serves b1 (previous: green)"
    assert lines[2].startswith("  fallback: green for 42 s more")
    table = {line.split()[0]: line for line in lines[3:12]}
    assert table["blue"].split() == ["blue", "green"]
    assert table["role"].split() == ["role", "live", "standby"]
    assert table["unit"].split() == ["unit", "active", "(running)", "active", "(running)"]
    assert table["uptime"].split() == ["uptime", "13", "min", "32", "s", "2", "h", "1", "min"]
    assert table["memory"].split() == ["memory", "30.0", "MiB", "30.0", "MiB"]
    assert table["health"].endswith("…") and len(table["health"].split("ok", 1)[1]) < 60
    # Every row's green column starts where the header's does.
    column = lines[3].index("green")
    assert all(line[column - 2:column] == "  " for line in lines[4:12])
    assert lines[-1].startswith("  last: rollback b1 → blue: ok, took 1.50 s (switch 4 ms), "
                                "5 s ago (")


def test_nothing_live_yet_and_nothing_running() -> None:
    idle = {"unit": "", "state": "inactive", "sub": "dead", "build": None, "pid": None,
            "memory_bytes": None, "uptime_s": None, "health": "not running", "inflight": 0,
            "role": "idle"}
    lines = status.render_table(info(live=None, live_build=None, previous=None,
                                     fallback=None, last=None,
                                     colors={"blue": idle, "green": idle}))
    assert lines[0] == "alive-production: no live color yet"
    assert not any("fallback" in line or "last:" in line for line in lines)
    assert any(line.split() == ["pid", "-", "-"] for line in lines)


def test_durations() -> None:
    assert [status._duration(s) for s in (0, 59.6, 60, 812, 7300, 90000)] == [
        "0 s", "1 min", "1 min", "13 min 32 s", "2 h 1 min", "1 d 1 h"]


def test_the_routers_recent_figures_side_by_side() -> None:
    recent = {"seconds": 60.0, "answers": 1000, "answers_per_s": 16.67, "failed": 4,
              "failure_share": 0.004, "p95_s": 0.0123}
    base = info()
    colors = {"blue": {**base["colors"]["blue"], "recent": recent},
              "green": {**base["colors"]["green"], "recent": {
                  **recent, "answers": 0, "answers_per_s": 0.0, "failed": 0,
                  "failure_share": None, "p95_s": None}}}
    lines = status.render_table(info(colors=colors, router={
        **base["router"], "started_at": time.time() - 7300}))
    assert lines[1] == ("  router: active, serving blue, up 2 h 1 min (figures below: its "
                        "last 60 s)")
    table = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert table["answers/s"] == ["16.7", "0.0"]
    assert table["failed"] == ["0.4", "%", "-"]
    assert table["p95"] == ["12", "ms", "-"]


def test_no_figures_no_rows() -> None:
    lines = status.render_table(info())
    assert not any(line.split()[0] in ("answers/s", "p95") for line in lines)
    assert lines[1] == "  router: active, serving blue"


def test_the_pool_line_says_its_bounds_and_what_waits() -> None:
    pool = {"size": 64, "idle_s": 2.0, "idle": {"blue": 5, "green": 0}}
    lines = status.render_table(info(router={**info()["router"], "pool": pool}))
    assert lines[2] == ("  pool: up to 64 idle connections per color, reused within 2 s "
                        "(idle now: blue 5, green 0)")
    off = status.render_table(info(router={**info()["router"], "pool": {**pool, "size": 0}}))
    assert off[2] == "  pool: off (a connection to a color per client connection)"


def test_a_canary_and_a_pause_are_shown() -> None:
    router = {**info()["router"], "paused": {"until": time.time() + 20.2, "held": 7}}
    lines = status.render_table(info(
        canary={"color": "green", "percent": 10, "step": 1},
        pending={"target": "green", "phase": "start", "deploy_id": "d", "build": "b2"},
        router=router))
    assert ("  canary: 10 % of clients on green (step 1); if no deploy runs it any more, the "
            "next command sends them back") in lines
    assert not any("interrupted" in line for line in lines), "a canary says what it is"
    assert "  paused: 7 requests held until alive-switch resume production, at most 20 s more" \
        in lines
