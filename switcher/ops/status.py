"""``status`` and ``history``: what serves, what runs, what happened. Read-only.

``status --json`` (schema 1)::

    {"schema": 1, "app": "alive", "env": "production",
     "live": "green", "live_build": "b2", "previous": "blue",
     "pending": null | {"target": .., "phase": .., "deploy_id": .., "build": ..},
     "fallback": null | {"color": "blue", "until": 1790000000.0},
     "canary": null | {"color": "green", "percent": 10, "step": 1},
     "router": {"unit": .., "active": "active", "serving": "green", "reachable": true,
                "inflight": {"blue": 0, "green": 3}, "started_at": 1790000000.0 | null,
                "paused": null | {"until": 1790000000.0, "held": 0},
                "mode": "tcp" | null,
                "direct": {"families": ["ipv4"], "steering": true, …},   (direct mode only)
                "pool": null | {"size": 64, "idle_s": 2.0,
                                "idle": null | {"blue": 0, "green": 5}}},
     "colors": {"blue": {"unit": .., "state": "active", "sub": "running", "build": "b1",
                         "pid": 123, "memory_bytes": 123456, "uptime_s": 12.5,
                         "health": "ok" | "failing: …" | "not running",
                         "inflight": 0, "role": "live" | "standby" | "idle",
                         "restart_pending": false,
                         "recent": null | {"seconds": 60.0, "answers": 812,
                                           "answers_per_s": 13.5, "failed": 3,
                                           "failure_share": 0.0037 | null,
                                           "p95_s": 0.012 | null}},
                "green": {..}},
     "last": {history record} | null,
     "state_error": null | "why state.json could not be read",
     "takeover": null | "legacy.service"}   (a takeover whose CLI died before its end)

``recent``: what the router saw of the color over its last ``seconds`` (60, or less for a
younger router): answers (responses, failures it saw, tcp connections), how many failed
(5xx, refused, reset, timeout), their share (null without answers) and p95 in seconds
(null with nothing timed); null when the router is unreachable or reports no figures.
``started_at``: when the router process started (its counters count from then).
``canary``: the share of clients a canary step sends to a color that is not live yet, as
``state.json`` has it (the running deploy writes it; one that was killed left it for the
next command to undo). ``paused``: new requests are held until ``resume`` or ``until``.
``direct``: the router's direct-mode report as its control socket gives it
(:mod:`switcher.router.control`): the families steered and ``steering``, measured by a probe
connection that the kernel's program counted (false: connections take the router's path).
``pool`` (http mode): the idle connections the router keeps per color for the next client,
as the running router says (else as configured, ``idle`` null); null in other modes.

``restart_pending``: the color runs a process started before its installed config (unit
file, drop-ins, environment_file) last changed; its next start applies that config.

``status`` without ENV (``collect_all``) gives ``{"schema": 1, "environments": [...]}``,
one object as above per environment, and ``render_overview`` one line per environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from switcher import health, routerctl, state
from switcher.analysis import Figures, percent
from switcher.config import Config, Environment
from switcher.errors import RouterError
from switcher.model import Color, Mode, State, color_name
from switcher.names import Names
from switcher.routerctl import Router
from switcher.systemd import Systemd

SCHEMA = 1
PROBE_TIMEOUT = 1.0
CELL_MAX = 40  # characters of a table cell (a long health failure) before "…"
CLOCK_SLACK = 0.01  # seconds: converting systemd's monotonic start time to wall time
COLOR_PROPS = ("ActiveState", "SubState", "MainPID", "MemoryCurrent",
               "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic",
               "FragmentPath", "DropInPaths")


def collect(cfg: Config, env: Environment, sd: Systemd, router: Router) -> dict[str, Any]:
    env_dir = cfg.env_dir(env)
    state_error = None
    try:
        current = state.load_state(env_dir)
    except state.UNREADABLE as exc:
        current, _ = state.load_state_lenient(env_dir)
        state_error = f"{env_dir / state.STATE}: {exc}; run `alive-switch repair {env.name}`"
    names = Names(cfg.app, env.name)
    router_unit = names.router
    colors = {c: names.color(c) for c in Color}
    # One systemctl call for the three units (each call costs ~10 ms).
    props = sd.show_many([router_unit, *colors.values()], *COLOR_PROPS)
    router_info, recent = _router(props[router_unit]["ActiveState"], router, router_unit)
    router_info["pool"] = _pool(env, router_info.pop("pool", None))
    history = state.read_history(env_dir)
    return {
        "schema": SCHEMA, "app": cfg.app, "env": env.name,
        "live": color_name(current.active), "live_build": current.builds.get(current.active)
        if current.active else None, "previous": color_name(current.previous),
        "pending": current.pending.to_json() if current.pending else None,
        "fallback": current.to_json()["fallback"],
        "canary": _canary(current),
        "router": router_info,
        "colors": {c.value: {**_color(env, colors[c], props[colors[c]], current, c,
                                      router_info=router_info), "recent": recent.get(c)}
                   for c in Color},
        "last": next((r for r in reversed(history) if r.get("kind") != "reconcile"), None),
        "state_error": state_error,
        "takeover": _unfinished_takeover(env_dir),
    }


def _canary(current: State) -> dict[str, Any] | None:
    left = current.canary
    if left is None:
        return None
    return {"color": left.color.value, "percent": left.percent, "step": left.step}


def _unfinished_takeover(env_dir: Path) -> str | None:
    """The legacy unit of a takeover whose CLI died before its end, if any."""
    try:
        return str(json.loads((env_dir / state.TAKEOVER_INTENT).read_text())["unit"])
    except state.UNREADABLE:
        return None


TAKEOVER_NOTE = ("a takeover of {unit} did not finish (its CLI ended): the next deploy, "
                 "rollback or install of this environment finishes or undoes it")


def _router(active: str, router: Router, unit: str
            ) -> tuple[dict[str, Any], dict[Color, dict[str, Any]]]:
    """The router's part of status, and each color's recent figures (when it has them)."""
    info: dict[str, Any] = {"unit": unit, "active": active,
                            "reachable": False, "serving": None, "inflight": {},
                            "started_at": None, "paused": None}
    if info["active"] != "active":
        return info, {}
    try:
        reply = router.status(timeout=PROBE_TIMEOUT)
    except RouterError as exc:
        info["error"] = exc.message
        return info, {}
    info.update(reachable=True, serving=reply.get("serving"), inflight=reply.get("inflight", {}),
                paused=reply.get("paused"), mode=reply.get("mode"), pool=reply.get("pool"))
    if isinstance(reply.get("direct"), dict):
        info["direct"] = reply["direct"]
    try:
        reading = routerctl.recent(reply)
    except ValueError:  # a router older than its figures
        return info, {}
    info["started_at"] = reading.started_at
    return info, {c: _recent(f, reading.seconds or 0.0) for c, f in reading.colors.items()}


def _pool(env: Environment, told: dict[str, Any] | None) -> dict[str, Any] | None:
    """The router's pool as it said (a router older than pools says nothing), else as
    configured."""
    if env.mode is not Mode.http:
        return None
    return told or {"size": env.router.pool_size, "idle_s": env.router.pool_idle, "idle": None}


def _steering(direct: dict[str, Any]) -> str:
    families = "/".join(f.replace("ip", "IP") for f in direct.get("families", ()))
    if direct.get("steering"):
        return f"the kernel steers {families} connections to the live color"
    why = direct.get("problem") or "no live listener in the map"
    return f"not steering ({why}): the router forwards every connection"


def _recent(figures: Figures, seconds: float) -> dict[str, Any]:
    p95 = figures.p95
    return {"seconds": seconds, "answers": figures.answers,
            "answers_per_s": round(figures.answers / seconds, 2) if seconds > 0 else None,
            "failed": figures.failed,
            "failure_share": round(figures.share, 6) if figures.answers else None,
            "p95_s": None if p95 is None else round(p95, 4)}


def _color(env: Environment, unit: str, props: dict[str, str], current: State,
           color: Color, *, router_info: dict[str, Any]) -> dict[str, Any]:
    running = props["ActiveState"] == "active"
    entered = int(props.get("ActiveEnterTimestampMonotonic") or 0)
    memory = props.get("MemoryCurrent", "")
    role = ("live" if current.serving() == color
            else "standby" if running and current.fallback_at(time.time()) == color
            else "idle")
    return {
        "unit": unit, "state": props["ActiveState"], "sub": props["SubState"],
        "build": current.builds.get(color), "pid": int(props["MainPID"] or 0) or None,
        "memory_bytes": int(memory) if memory.isdigit() else None,
        "uptime_s": round(time.monotonic() - entered / 1e6, 1) if running and entered else None,
        "health": _health(env, color) if running else "not running",
        "inflight": router_info["inflight"].get(color.value, 0), "role": role,
        "restart_pending": running and _predates_config(env, props),
    }


def _predates_config(env: Environment, props: dict[str, str]) -> bool:
    """Whether the running process started before its config files last changed (systemd
    reads ExecStart=, Environment= and EnvironmentFile= only when a unit starts)."""
    started_mono = int(props.get("ExecMainStartTimestampMonotonic") or 0) or int(
        props.get("ActiveEnterTimestampMonotonic") or 0)
    if not started_mono:
        return False
    # systemd's monotonic clock is CLOCK_MONOTONIC, the same as time.monotonic().
    started = time.time() - (time.monotonic() - started_mono / 1e6)
    files = [props.get("FragmentPath", ""), *props.get("DropInPaths", "").split()]
    if env.environment_file:
        files.append(env.environment_file)
    changed = 0.0
    for path in filter(None, files):
        with contextlib.suppress(OSError):
            changed = max(changed, os.stat(path).st_mtime)
    return started < changed - CLOCK_SLACK


def _health(env: Environment, color: Color) -> str:
    probe = health.probe(env.host, env.port(color), env.health, PROBE_TIMEOUT)
    return "ok" if probe.ok else f"failing: {probe.detail}"


def render_table(info: dict[str, Any]) -> list[str]:
    live = info["live"]
    lines = [f"{info['app']}-{info['env']}: " + (
        f"{live} serves {info['live_build']}" if live else "no live color yet")
        + (f" (previous: {info['previous']})" if info.get("previous") else "")]
    if info["state_error"]:
        lines.append(f"  state: {info['state_error']}")
    canary = info.get("canary")
    if canary:
        lines.append(f"  canary: {canary['percent']} % of clients on {canary['color']} "
                     f"(step {canary['step']}); if no deploy runs it any more, the next "
                     "command sends them back")
    elif info["pending"]:
        p = info["pending"]
        lines.append(f"  interrupted: {p['target']} at phase {p['phase']} (the next command "
                     "reconciles it)")
    if info.get("takeover"):
        lines.append("  " + TAKEOVER_NOTE.format(unit=info["takeover"]))
    r = info["router"]
    lines.append(f"  router: {r['active']}, serving {r['serving'] or 'nothing'}"
                 + ("" if r["reachable"] or r["active"] != "active" else " (control socket "
                    "not answering)") + _router_age(info))
    lines += _pool_line(r.get("pool"))
    if "direct" in r:
        lines.append(f"  direct mode: {_steering(r['direct'])}")
    paused = r.get("paused")
    if paused:
        lines.append(f"  paused: {paused.get('held', 0)} requests held until alive-switch "
                     f"resume {info['env']}, at most {_duration(paused['until'] - time.time())}"
                     " more")
    fallback = info.get("fallback")
    if fallback and fallback["until"] > time.time():
        left = _duration(fallback["until"] - time.time())
        lines.append(f"  fallback: {fallback['color']} for {left} more (instant rollback), "
                     "then its retire timer stops it")
    rows: list[tuple[str, ...]] = [("", "blue", "green")]
    for key, label in (("role", "role"), ("state", "unit"), ("build", "build"), ("pid", "pid"),
                       ("memory_bytes", "memory"), ("uptime_s", "uptime"),
                       ("health", "health"), ("inflight", "in flight")):
        rows.append((label, *(_cell(key, info["colors"][c][key], info["colors"][c])
                              for c in ("blue", "green"))))
    rows += _traffic_rows(info["colors"])
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
              .rstrip() for row in rows]
    lines += [f"  restart pending: {c} started before the config changed; its next start "
              "applies it" for c in ("blue", "green") if info["colors"][c].get("restart_pending")]
    last = info["last"]
    if last:
        phases = last.get("phases") or {}
        took = (f", took {sum(phases.values()):.2f} s (switch "
                f"{phases.get('switching', 0) * 1000:.0f} ms)" if "switching" in phases else "")
        lines.append(f"  last: {last.get('kind')} {last.get('build') or ''} → "
                     f"{last.get('color') or ''}: {last.get('outcome')}{took}, "
                     f"{_duration(time.time() - last['time'])} ago "
                     f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['time']))})")
    return lines


def _pool_line(pool: dict[str, Any] | None) -> list[str]:
    """``  pool: up to 64 idle connections per color, reused within 2 s (idle now: …)``."""
    if pool is None:
        return []
    if not pool["size"]:
        return ["  pool: off (a connection to a color per client connection)"]
    idle = pool["idle"]
    now = "" if idle is None else " (idle now: " + ", ".join(
        f"{c} {idle.get(c, 0)}" for c in ("blue", "green")) + ")"
    return [f"  pool: up to {pool['size']} idle connections per color, reused within "
            f"{pool['idle_s']:g} s{now}"]


def _router_age(info: dict[str, Any]) -> str:
    """``, up 2 h 5 min (figures below: its last 60 s)`` when the router said."""
    started = info["router"].get("started_at")
    if started is None:
        return ""
    recent = [c["recent"] for c in info["colors"].values() if c.get("recent")]
    window = f" (figures below: its last {recent[0]['seconds']:g} s)" if recent else ""
    return f", up {_duration(time.time() - started)}{window}"


def _traffic_rows(colors: dict[str, Any]) -> list[tuple[str, ...]]:
    """answers/s, failed (share) and p95 over the router's recent window, per color."""
    figures = [colors[c].get("recent") for c in ("blue", "green")]
    if not any(figures):
        return []
    cells: dict[str, list[str]] = {"answers/s": [], "failed": [], "p95": []}
    for recent in figures:
        rate, share, p95 = ((recent["answers_per_s"], recent["failure_share"],
                             recent["p95_s"]) if recent else (None, None, None))
        cells["answers/s"].append("-" if rate is None else f"{rate:.1f}")
        cells["failed"].append("-" if share is None else percent(share))
        cells["p95"].append("-" if p95 is None else f"{p95 * 1000:.0f} ms" if p95 < 1
                            else f"{p95:.2f} s")
    return [(label, *values) for label, values in cells.items()]


def collect_all(infos: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": SCHEMA, "environments": infos}


def render_overview(infos: list[dict[str, Any]]) -> list[str]:
    """One line per environment: what serves, the router, each color, the last deploy."""
    rows: list[tuple[str, ...]] = [("ENV", "LIVE", "BUILD", "ROUTER", "BLUE", "GREEN", "LAST")]
    notes = []
    for info in infos:
        last = info["last"]
        rows.append((info["env"], info["live"] or "-", info["live_build"] or "-",
                     info["router"]["active"], _color_cell(info["colors"]["blue"]),
                     _color_cell(info["colors"]["green"]),
                     f"{last.get('kind')} {last.get('outcome')}" if last else "-"))
        prefix = f"{info['app']}-{info['env']}"
        if info["state_error"]:
            notes.append(f"{prefix}: {info['state_error']}")
        if info["pending"]:
            notes.append(f"{prefix}: interrupted at {info['pending']['phase']} (the next "
                         "command reconciles it)")
        if info.get("takeover"):
            notes.append(f"{prefix}: " + TAKEOVER_NOTE.format(unit=info["takeover"]))
        notes += [f"{prefix}: restart pending: {c} started before the config changed"
                  for c in ("blue", "green") if info["colors"][c].get("restart_pending")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return lines + [f"note: {n}" for n in notes]


def _color_cell(color: dict[str, Any]) -> str:
    """``live ok``, ``standby``, ``idle failing``, or the unit's state when not running."""
    if color["state"] != "active":
        return str(color["state"])
    health = "ok" if color["health"] == "ok" else "failing"
    return f"{color['role']} {health}"


def _cell(key: str, value: Any, color: dict[str, Any] | None = None) -> str:
    if key == "state" and color is not None and color.get("sub"):
        return f"{value} ({color['sub']})"
    if value is None:
        return "-"
    if key == "memory_bytes":
        return f"{value / 1048576:.1f} MiB"
    if key == "uptime_s":
        return _duration(value)
    text = str(value)
    return text if len(text) <= CELL_MAX else text[:CELL_MAX - 1] + "…"


def _duration(seconds: float) -> str:
    """``42 s``, ``13 min 32 s``, ``2 h 5 min``, ``3 d 4 h``: like systemctl's "… ago"."""
    s = max(0, round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                      ("min", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size} {unit}" + (f" {rest} {sub}" if rest else "")
    return f"{s} s"


def history_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("time", 0)))
        phases = " ".join(f"{k}={v:.2f}s" for k, v in (r.get("phases") or {}).items())
        what = f"{r.get('kind')} {r.get('build') or ''} → {r.get('color') or ''}".strip()
        tail = f" [{r['message']}]" if r.get("outcome") != "ok" and r.get("message") else ""
        lines.append(f"{when}  {what}: {r.get('outcome')}{tail}  {phases}".rstrip())
    return lines
