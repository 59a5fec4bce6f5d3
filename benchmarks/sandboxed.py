"""Figures that need a real systemd: warm rollback and ``alive-switch status`` start-up.

They run in the system tests' sandbox (tests/system/sandbox.py: systemd 252 as PID 1 of
private namespaces, one at a time per machine; ``SANDBOX_LOCK_WAIT`` seconds are waited
for another one to end) with a tiny environment of the sample app (tests/system/harness.py):
install, deploy A (blue), deploy B (green), then rollbacks back and forth. Each rollback is
warm (the other color is on standby), so it is a health check and a switch, then the
``watch`` phase, which a deploy or rollback always waits out by design (set to WATCH here).

Reported per rollback: the wall time of the whole command (through ``nsenter``, interpreter
start included) and, from its record in ``history.jsonl``, the time to switch (the phases up
to and including ``switching``) and the ``watch`` phase.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.system.harness import Env
from tests.system.sandbox import Sandbox

WATCH = 0.1  # seconds: `watch` in the benchmark's config (the smallest sensible)
APP, ENV = "bench", "prod"
STATUS_IMPORTS = "import switcher.cli, switcher.ops.status, switcher.systemd, switcher.routerctl"
BEFORE_SWITCH = ("cancel_timer", "preflight", "start", "health", "pre_switch", "switching")


@dataclass
class Figures:
    rollback_wall_s: list[float] = field(default_factory=list)
    rollback_to_switch_s: list[float] = field(default_factory=list)
    rollback_watch_s: list[float] = field(default_factory=list)
    rollback_warm: list[bool] = field(default_factory=list)
    rollback_phases: list[dict[str, float]] = field(default_factory=list)
    status_wall_s: list[float] = field(default_factory=list)
    python_wall_s: list[float] = field(default_factory=list)  # `python -c pass`, same path
    imports_wall_s: list[float] = field(default_factory=list)  # python importing what status does


def measure(root: Path, ports: list[int], rollbacks: int, statuses: int,
            say: Callable[[str], None]) -> Figures:
    listen, blue, green = ports
    figures = Figures()
    box = Sandbox(root / "sandbox")
    say("booting a systemd sandbox (waits while another one runs)")
    with box.boot(timeout=60):
        env = Env(box, root / "home", APP, ENV, listen, blue, green)
        env.home.mkdir()
        env.write_config(drain=1, watch=WATCH, standby=600)
        env.make_build("A")
        env.make_build("B")
        env.ok("install", ENV)
        env.ok("deploy", ENV, "A")
        env.ok("deploy", ENV, "B")
        say(f"{rollbacks} warm rollbacks")
        for _ in range(rollbacks):
            began = time.monotonic()
            out = env.ok("rollback", ENV)
            figures.rollback_wall_s.append(time.monotonic() - began)
            figures.rollback_warm.append("warm: already running" in out)
        for record in _history(box, rollbacks):
            phases = record["phases"]
            figures.rollback_phases.append(phases)
            figures.rollback_to_switch_s.append(sum(phases.get(p, 0.0) for p in BEFORE_SWITCH))
            figures.rollback_watch_s.append(phases.get("watch", 0.0))
        say(f"{statuses} × alive-switch status --json")
        for _ in range(statuses):
            figures.status_wall_s.append(_timed(lambda: env.ok("status", ENV, "--json")))
            figures.python_wall_s.append(_timed(
                lambda: box.run(sys.executable, "-c", "pass", check=True)))
            figures.imports_wall_s.append(_timed(
                lambda: box.run(sys.executable, "-c", STATUS_IMPORTS, check=True)))
    return figures


def _timed(action: Callable[[], Any]) -> float:
    began = time.monotonic()
    action()
    return time.monotonic() - began


def _history(box: Sandbox, last: int) -> list[dict[str, Any]]:
    """The last ``last`` rollback records (the sandbox's state dir is a host directory)."""
    path = box.state_dir / f"{APP}-{ENV}" / "history.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "rollback" and r.get("outcome") == "ok"][-last:]
