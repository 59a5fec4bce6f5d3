"""Pure decisions: which color a deploy or rollback starts, whether it is a no-op, whether
the target is warm, and how to reconcile a state left by a killed run. No I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from switcher.errors import UsageError
from switcher.model import Color, Phase, State


class Kind(enum.StrEnum):
    deploy = "deploy"
    rollback = "rollback"


@dataclass(frozen=True)
class Plan:
    kind: Kind
    target: Color
    build: str
    old: Color | None
    warm: bool = False  # the target already runs this build: no restart, just a health check
    noop: bool = False  # already live: nothing to do

    def phases(self) -> list[Phase]:
        if self.noop:
            return []
        skip = {Phase.lock, Phase.reconcile, Phase.done}
        return [p for p in Phase if p not in skip]

    def describe(self) -> list[str]:
        if self.noop:
            return [f"build {self.build} is already live on {self.target}: nothing to do "
                    "(--force deploys it again)"]
        start = (f"{self.target} already runs {self.build}: health check only" if self.warm
                 else f"point {self.target} at {self.build}, (re)start {self.target}")
        old = self.old.value if self.old else "nothing"
        return [
            f"{self.kind} {self.build} to {self.target} (live now: {old})",
            f"  1. cancel any retire timer of {self.target}; pre-flight checks",
            f"  2. {start}",
            f"  3. health gate on {self.target}; pre_switch hook",
            f"  4. switch the router to {self.target}; commit",
            f"  5. watch {self.target}; {old} drains and stays on standby, then retires",
            "  6. post_switch hook; enable the new color at boot; history",
        ]


def plan_deploy(state: State, build: str, *, force: bool, running: dict[Color, str | None]
                ) -> Plan:
    """``running[c]``: the build color c runs now, or None when it is not running."""
    live = state.active
    if live is not None and state.builds.get(live) == build and not force:
        return Plan(Kind.deploy, live, build, live, noop=True)
    target = live.other if live is not None else Color.blue
    return Plan(Kind.deploy, target, build, live, warm=running.get(target) == build)


def plan_rollback(state: State, running: dict[Color, str | None]) -> Plan:
    target = state.previous
    build = state.builds.get(target) if target else None
    if target is None or not build or target == state.active:
        raise UsageError("nothing to roll back to: no previous live color is recorded",
                         "deploy a build by name instead (alive-switch deploy ENV BUILD)")
    return Plan(Kind.rollback, target, build, state.active, warm=running.get(target) == build)


class Reconcile(enum.Enum):
    nothing = "state and router agree"
    commit = "finish the interrupted switch: the router already serves the target"
    undo = "undo the interrupted deploy: the router still serves the old color"
    resync = "the router serves another color than state.json: switch it back"


def reconcile(state: State, router_serving: Color | None) -> Reconcile:
    pending = state.pending
    if pending is None:
        return Reconcile.nothing if router_serving == state.active else Reconcile.resync
    if pending.phase.past_switch and router_serving == pending.target:
        return Reconcile.commit
    return Reconcile.undo
